"""The incremental detokenizer with real byte-level tokenizers: the tiny BPE of conftest.py (whose
alphabet has a token for every byte, so any character can be split across as many tokens as it has
bytes) and SmolLM2's. Each test streams token by token as the engine does: `add_token`, then
`take_new_text` (finished once a stop string matched or the tokens run out)."""
from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.sampling_params import SamplingParams
from tests.conftest import build_tokenizer



def _byte_symbols() -> dict[int, str]:
    """Byte-level BPE's (GPT-2's) alphabet: each byte is one printable character in token strings."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {byte: chr(byte) for byte in printable}
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + len(symbols) - len(printable))
    return symbols


BYTE_TO_SYMBOL = _byte_symbols()


@pytest.fixture(scope="module")
def tiny():
    return build_tokenizer()


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from pagedserve.loader.source import resolve_model
    from pagedserve.loader.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model("smollm2-135m-instruct"))


@dataclass
class Streamed:
    pieces: list[str]          # what take_new_text handed out after each token
    text: str                  # the final text (emitted_text once finished)
    stop: str | None           # the stop string that ended it
    num_tokens_used: int


def stream(tokenizer, output_ids: list[int], prompt_ids: list[int] | None = None, **params) -> Streamed:
    prompt_ids = prompt_ids if prompt_ids is not None else tokenizer.encode("Hi", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer.backend_tokenizer, prompt_ids, SamplingParams(**params))
    pieces, stop, num_used = [], None, 0
    for index, token_id in enumerate(output_ids):
        stop = detokenizer.add_token(token_id)
        num_used += 1
        is_finished = stop is not None or index == len(output_ids) - 1
        pieces.append(detokenizer.take_new_text(is_finished))
        if stop is not None:
            break
    assert "".join(pieces) == detokenizer.emitted_text == detokenizer.text    # the streamed pieces add up
    return Streamed(pieces, detokenizer.emitted_text, stop, num_used)


def byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte of `text`."""
    backend = tokenizer.backend_tokenizer
    token_ids = [backend.token_to_id(BYTE_TO_SYMBOL[byte]) for byte in text.encode()]
    assert None not in token_ids
    return token_ids


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def complete_prefix(tokenizer, token_ids: list[int]) -> str:
    """The complete characters in the bytes of `token_ids` (an unfinished one at the end left out)."""
    symbols = "".join(tokenizer.backend_tokenizer.id_to_token(token_id) for token_id in token_ids)
    symbol_to_byte = {symbol: byte for byte, symbol in BYTE_TO_SYMBOL.items()}
    return bytes(symbol_to_byte[symbol] for symbol in symbols).decode("utf-8", errors="ignore")


# ---- characters split across tokens ------------------------------------------------------------------

@pytest.mark.parametrize("text", ["你好，世界！", "🎉🚀 ok", "é and ß", "a🎉b北c"])
def test_a_character_split_into_byte_tokens_arrives_whole_once_its_last_byte_does(tiny, text):
    token_ids = byte_tokens(tiny, text)
    result = stream(tiny, token_ids)
    assert result.text == text
    so_far = ""
    for num_tokens, piece in enumerate(result.pieces, start=1):
        assert "\ufffd" not in piece
        so_far += piece
        # After each token: every character whose last byte has arrived, and nothing else.
        assert so_far == complete_prefix(tiny, token_ids[:num_tokens])


def test_smollm2_splits_chinese_and_emoji_into_several_tokens_and_none_arrive_broken(smollm2):
    text = "北京是中国的首都。🎉🚀 你好，世界！"
    token_ids = encode(smollm2, text)
    assert len(token_ids) > len(text)           # some characters take 2-3 tokens
    result = stream(smollm2, token_ids)
    assert result.text == text
    assert all("\ufffd" not in piece for piece in result.pieces)
    assert "" in result.pieces                  # a token that only starts a character adds nothing yet


@pytest.mark.parametrize("text", ["北京🎉", "a🚀", "🎉🚀 x", "你好，世界！", "é"])
def test_a_sequence_that_ends_inside_a_character_keeps_its_whole_characters(tiny, text):
    """Cut after every token: the final text is every complete character, and an unfinished last one
    is left out (as vLLM leaves it out: it would only be U+FFFD), also when whole characters shared
    its token. Streamed or not, it is the same text."""
    for token_ids in (byte_tokens(tiny, text), encode(tiny, text)):
        for cut in range(1, len(token_ids) + 1):
            result = stream(tiny, token_ids[:cut])
            assert result.text == complete_prefix(tiny, token_ids[:cut]), (token_ids, cut)


def test_smollm2_ending_after_a_token_with_a_whole_emoji_and_half_of_the_next(smollm2):
    token_ids = encode(smollm2, "Go 🎉🚀")
    for cut in range(1, len(token_ids) + 1):
        result = stream(smollm2, token_ids[:cut])
        assert result.text == smollm2.decode(token_ids[:cut]).rstrip("\ufffd")
    assert stream(smollm2, token_ids).text == "Go 🎉🚀"


def test_random_tokens_stream_the_same_text_as_a_whole_decode(tiny):
    """Any token sequence, however broken its bytes: the pieces add up to the text the tokens decode
    to, less an unfinished character at the very end."""
    rng = random.Random(0)
    vocab_size = len(tiny)
    for _ in range(300):
        token_ids = [rng.randrange(3, vocab_size) for _ in range(rng.randrange(1, 12))]
        result = stream(tiny, token_ids)
        assert result.text == tiny.decode(token_ids).rstrip("\ufffd"), token_ids


# ---- the prompt as context -----------------------------------------------------------------------------

def test_the_first_token_continues_the_prompt(smollm2):
    prompt = encode(smollm2, "The capital of France is")
    result = stream(smollm2, encode(smollm2, " Paris, of course."), prompt)
    assert result.pieces[0] == " Paris"
    assert result.text == " Paris, of course."


@pytest.mark.parametrize("prompt_text, output_text", [("I like 🎉", "🚀 and more"), ("北京", "是首都")])
def test_a_prompt_of_token_ids_that_ends_inside_a_character(tiny, prompt_text, output_text):
    """A prompt given as token ids can stop in the middle of a character (a client continuing an answer
    that was cut off): the output's first token completes it. The output shows that character, once,
    and none of the prompt's own text."""
    token_ids = byte_tokens(tiny, prompt_text + output_text)
    num_prompt = len(prompt_text.encode()) + 2          # two bytes of the output's first character
    result = stream(tiny, token_ids[num_prompt:], token_ids[:num_prompt])
    assert result.text == output_text
    # Also with the tokenizer's own merges, where one token holds a whole character and half of the next.
    merged = encode(tiny, "🎉🚀 x")
    assert stream(tiny, merged[2:], encode(tiny, "Hi ") + merged[:2]).text == "🚀 x"


# ---- stop strings ----------------------------------------------------------------------------------------

def test_a_stop_string_split_across_tokens_is_held_back_and_cut(tiny):
    token_ids = byte_tokens(tiny, "1, 2, 3, 4, 5, 6")
    cut = stream(tiny, token_ids, stop=["4, 5"])
    assert cut.text == "1, 2, 3, " and cut.stop == "4, 5"
    assert cut.num_tokens_used == len("1, 2, 3, 4, 5")           # it ended as soon as the stop was complete
    assert all("4" not in piece for piece in cut.pieces)         # no part of the stop was ever streamed
    kept = stream(tiny, token_ids, stop=["4, 5"], include_stop_str_in_output=True)
    assert kept.text == "1, 2, 3, 4, 5" and kept.stop == "4, 5"


def test_text_that_only_starts_like_a_stop_string_is_streamed_once_it_cannot_match(tiny):
    result = stream(tiny, byte_tokens(tiny, "x 4, 6 and 4, 4, 5 y"), stop=["4, 5"])
    assert result.text == "x 4, 6 and 4, " and result.stop == "4, 5"
    assert "".join(result.pieces[:len("x 4, 6 an")]) == "x 4, 6"    # held back only len(stop) - 1 characters
    # A possible start of a stop string at the very end is given when the tokens run out.
    ending = stream(tiny, byte_tokens(tiny, "ends with 4,"), stop=["4, 5"])
    assert ending.text == "ends with 4," and ending.stop is None


def test_the_earliest_of_several_stop_strings_wins(tiny):
    token_ids = byte_tokens(tiny, "hello world, bye")
    result = stream(tiny, token_ids, stop=["world", "lo", "never"])
    assert result.text == "hel" and result.stop == "lo"
    assert stream(tiny, token_ids, stop=["bye", "o w"], include_stop_str_in_output=True).text == "hello w"
    # Inside one token: the text after the stop in the same token is dropped too.
    merged = encode(tiny, "The capital of France is Paris.")
    assert tiny.backend_tokenizer.id_to_token(merged[1]) == "Ġcapital"
    inside = stream(tiny, merged, stop=["api"])
    assert inside.text == "The c" and inside.stop == "api" and inside.num_tokens_used == 2


def test_a_stop_string_of_split_characters(tiny):
    result = stream(tiny, byte_tokens(tiny, "今天天气很好。明天"), stop=["很好"])
    assert result.text == "今天天气" and result.stop == "很好"
    assert result.num_tokens_used == len("今天天气很好".encode())


def test_stop_strings_count_only_after_min_tokens(tiny):
    """As with EOS and stop_token_ids: a stop string ends the answer only once min_tokens tokens are out
    (one that ends inside the first min_tokens tokens does not count, as in vLLM)."""
    token_ids = byte_tokens(tiny, "a.b.c.d")
    assert stream(tiny, token_ids, stop=["."]).text == "a"
    later = stream(tiny, token_ids, stop=["."], min_tokens=3)
    assert later.text == "a.b" and later.stop == "." and later.num_tokens_used == 4
    assert stream(tiny, byte_tokens(tiny, "ab.cd"), stop=["b.c"], min_tokens=2).text == "a"     # ends in token 4
    assert stream(tiny, byte_tokens(tiny, "ab.cd"), stop=["b.c"], min_tokens=4).text == "ab.cd"


# ---- special tokens --------------------------------------------------------------------------------------

def test_special_tokens_are_skipped_or_kept(tiny):
    end = tiny.convert_tokens_to_ids("<|im_end|>")
    start = tiny.convert_tokens_to_ids("<|im_start|>")
    token_ids = [*encode(tiny, "Hello"), start, *encode(tiny, " world"), end]
    assert stream(tiny, token_ids).text == "Hello world"
    kept = stream(tiny, token_ids, skip_special_tokens=False)
    assert kept.text == "Hello<|im_start|> world<|im_end|>"
    # A special token between the bytes of a character does not break it.
    split = byte_tokens(tiny, "好")
    assert stream(tiny, [split[0], end, *split[1:]]).text == "好"


# ---- through the engine: streamed, cumulative and final text agree ------------------------------------

def test_the_engines_output_kinds_agree_on_every_text(tiny_llama_dir, restore_torch_threads):
    """Random weights over the tiny vocabulary draw plenty of lone byte tokens, so answers often end
    inside a character: the DELTA pieces, the last CUMULATIVE text and the FINAL_ONLY text are the same,
    the tokens' own text less an unfinished last character."""
    from pagedserve import LLM
    from pagedserve.sampling_params import OutputKind

    llm = LLM(str(tiny_llama_dir), num_kv_blocks=64, num_threads=1)
    engine, tokenizer = llm.engine, llm.get_tokenizer()
    num_ending_inside = 0
    for seed in range(12):
        texts = {}
        for kind in OutputKind:
            params = SamplingParams(temperature=1.0, seed=seed, max_tokens=3 + seed, output_kind=kind)
            engine.add_request(llm.processor.process(kind.value, "你好，世界 🎉", params))
        streamed, token_ids = [], []
        while engine.has_unfinished_requests():
            for output in engine.step():
                completion = output.outputs[0]
                if output.request_id == OutputKind.DELTA.value:
                    streamed.append(completion.text)
                    token_ids.extend(completion.token_ids)
                else:
                    texts[output.request_id] = completion.text
        decoded = tokenizer.decode(token_ids, skip_special_tokens=True)
        num_ending_inside += decoded.endswith("\ufffd")
        assert texts == {OutputKind.CUMULATIVE.value: "".join(streamed),
                         OutputKind.FINAL_ONLY.value: "".join(streamed)}, seed
        assert "".join(streamed) == decoded.rstrip("\ufffd"), seed
    assert num_ending_inside > 0        # the case this test is about did happen
