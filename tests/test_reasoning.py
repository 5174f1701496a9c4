"""The <think> reasoning parsers, whole and streamed in awkward pieces. No model, no server."""
from __future__ import annotations

import pytest

from pagedserve.server.reasoning import ReasoningParser, split_reasoning

R1_CASES = [
    ("<think>Let me see.</think>Paris.", ("Let me see.", "Paris.")),
    ("Let me see.</think>Paris.", ("Let me see.", "Paris.")),            # the template opened <think>
    ("\n<think>\nhmm\n</think>\n\nParis.", ("\n\nhmm\n", "\n\nParis.")),
    ("Still thinking when cut off", ("Still thinking when cut off", None)),
    ("<think>only thoughts</think>", ("only thoughts", None)),
    ("a</think>b</think><think>c", ("a", "b</think><think>c")),             # after the end: verbatim
    ("", ("", None)),
]

QWEN3_CASES = [
    ("Paris.", (None, "Paris.")),                                         # thinking disabled: no tags
    ("<think>Let me see.</think>Paris.", ("Let me see.", "Paris.")),
    ("<think>\ncut off", ("\ncut off", None)),
    ("x</think>y", (None, "x</think>y")),                                 # no <think>: nothing to split
    ("a<think>b</think>c", ("b", "ac")),
    ("", (None, "")),
]

TEXTS = [text for text, _ in R1_CASES + QWEN3_CASES] + ["<<think>>", "</thin", "<think</think>>", "a < b </ c"]


def stream(name: str, pieces: list[str], prompt: str = "") -> tuple[str | None, str | None, list[tuple[str, str]]]:
    """Feed pieces as a server would; (reasoning, content) the way split_reasoning reports them, and deltas."""
    parser = ReasoningParser(name, prompt)
    deltas = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    pairs = [(d.reasoning, d.content) for d in deltas]
    if not parser.has_reasoning:
        return None, content, pairs
    return reasoning, content or None, pairs


@pytest.mark.parametrize("text, expected", R1_CASES)
def test_deepseek_r1_whole_output(text, expected):
    assert split_reasoning("deepseek_r1", text) == expected


@pytest.mark.parametrize("text, expected", QWEN3_CASES)
def test_qwen3_whole_output(text, expected):
    assert split_reasoning("qwen3", text) == expected


def test_qwen3_reasons_when_the_prompt_opens_think():
    prompt = "<|im_start|>assistant\n<think>\n"
    assert split_reasoning("qwen3", "hmm</think>Paris.", prompt) == ("hmm", "Paris.")
    assert split_reasoning("qwen3", "hmm, cut off", prompt) == ("hmm, cut off", None)


@pytest.mark.parametrize("name", ["deepseek_r1", "qwen3"])
@pytest.mark.parametrize("text", TEXTS)
def test_streaming_in_any_two_pieces_or_per_character_matches_whole(name, text):
    expected = split_reasoning(name, text)
    for cut in range(len(text) + 1):
        assert stream(name, [text[:cut], text[cut:]])[:2] == expected, (text[:cut], text[cut:])
    assert stream(name, list(text))[:2] == expected


def test_split_tags_are_held_back_until_complete():
    reasoning, content, deltas = stream("deepseek_r1", ["<th", "ink>Let me", " see.</th", "ink>", "Par", "is."])
    assert (reasoning, content) == ("Let me see.", "Paris.")
    assert deltas == [("", ""), ("Let me", ""), (" see.", ""), ("", ""), ("", "Par"), ("", "is."), ("", "")]
    for piece_reasoning, piece_content in deltas:
        assert "<" not in piece_reasoning + piece_content


def test_a_false_tag_start_is_released_with_the_next_piece():
    _, _, deltas = stream("qwen3", ["1 <", " 2 and <t", "able>"])
    assert deltas == [("", "1 "), ("", "< 2 and "), ("", "<table>"), ("", "")]


def test_unknown_parser_is_refused():
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        ReasoningParser("granite")
