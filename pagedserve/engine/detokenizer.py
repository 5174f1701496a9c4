"""Incremental detokenization and stop strings for one sequence.

Text is produced with the tokenizers library's `DecodeStream`, primed with the end of the prompt so the
first token decodes as a continuation (" Paris", not "Paris"). It yields nothing until a token completes a
UTF-8 character, so a streamed Chinese character or emoji never arrives broken. When the sequence ends
inside a character, the whole characters the stream still holds are given and the unfinished one is left
out (as vLLM leaves it out: it could only be U+FFFD). Stop strings are matched on the text once
`min_tokens` tokens are out; while streaming, the last `len(longest stop) - 1` characters are held back in
case they turn out to be the start of a stop string.
"""
from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from pagedserve.sampling_params import SamplingParams

# Prompt tokens given to the stream as context; a few are enough for spacing and merges.
_PROMPT_CONTEXT_TOKENS = 8
_REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        self._token_ids: list[int] = []     # given to the stream: the prompt's last tokens, then the output
        self._num_decoded = 0               # of those, how many the stream has turned into text
        for token_id in prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]:
            self._step(token_id)
        # NOTE: a prompt of token ids may end inside a character; the stream then holds that character
        # and any whole ones that share its tokens. They are the prompt's text, not the output's.
        self._num_prompt_chars_held = len(self._held_text())
        self._stops = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._holdback = max((len(s) for s in self._stops), default=1) - 1
        self._num_output_tokens = 0
        self._is_stopped = False
        self.text = ""
        self._num_emitted_chars = 0

    def add_token(self, token_id: int) -> str | None:
        """Append one token's text; returns the stop string if the text now contains one (then the
        text is cut at it, or after it when the request includes stop strings in the output)."""
        self._num_output_tokens += 1
        return self._append(self._step(token_id))

    @property
    def emitted_text(self) -> str:
        return self.text[:self._num_emitted_chars]

    def take_new_text(self, is_finished: bool) -> str:
        """The text not handed out yet, minus a possible stop-string prefix unless the sequence ended."""
        if is_finished:
            self._flush()
        end = len(self.text) if is_finished else max(len(self.text) - self._holdback, self._num_emitted_chars)
        new_text = self.text[self._num_emitted_chars:end]
        self._num_emitted_chars = end
        return new_text

    def _step(self, token_id: int) -> str:
        self._token_ids.append(token_id)
        piece = self._stream.step(self._tokenizer, token_id)
        if not piece:
            return ""
        self._num_decoded = len(self._token_ids)
        return piece

    def _append(self, piece: str) -> str | None:
        num_skipped = min(len(piece), self._num_prompt_chars_held)
        self._num_prompt_chars_held -= num_skipped
        piece = piece[num_skipped:]
        if not piece or self._is_stopped:
            return None
        num_chars_before = len(self.text)
        self.text += piece
        if self._num_output_tokens <= self._min_tokens:
            return None
        # A stop string counts when it ends in the new text (so not inside the first min_tokens tokens).
        matches = [(index, stop) for stop in self._stops
                   if (index := self.text.find(stop, max(num_chars_before - len(stop) + 1, 0))) != -1]
        if not matches:
            return None
        index, stop = min(matches)
        self.text = self.text[:index + len(stop) if self._include_stop else index]
        self._is_stopped = True
        return stop

    def _flush(self) -> None:
        """The sequence ended: add the whole characters the stream still holds back, once."""
        self._append(self._held_text())
        self._num_decoded = len(self._token_ids)

    def _held_text(self) -> str:
        """The text of the tokens the stream has not decoded yet, without an unfinished last character."""
        held_ids = self._token_ids[self._num_decoded:]
        if not held_ids:
            return ""
        context_ids = self._token_ids[max(self._num_decoded - _PROMPT_CONTEXT_TOKENS, 0):self._num_decoded]
        context = self._tokenizer.decode(context_ids, skip_special_tokens=self._skip_special_tokens)
        text = self._tokenizer.decode(context_ids + held_ids, skip_special_tokens=self._skip_special_tokens)
        held = text[len(context):] if text.startswith(context) else self._tokenizer.decode(
            held_ids, skip_special_tokens=self._skip_special_tokens)
        return held.rstrip(_REPLACEMENT_CHARACTER)
