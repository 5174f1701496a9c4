"""Incremental detokenization and stop strings for one sequence.

Text is produced with the tokenizers library's `DecodeStream`, primed with the prompt so the first
token decodes as a continuation (" Paris", not "Paris"). It yields nothing until a token completes a
UTF-8 character, so a streamed Chinese character or emoji never arrives broken. Stop strings are
matched on the text; while streaming, the last `len(longest stop) - 1` characters are held back in
case they turn out to be the start of a stop string.
"""
from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from pagedserve.sampling_params import SamplingParams

# Prompt tokens given to the stream as context; a few are enough for spacing and merges.
_PROMPT_CONTEXT_TOKENS = 8


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(ids=prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:],
                                    skip_special_tokens=params.skip_special_tokens)
        self._stops = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._holdback = max((len(s) for s in self._stops), default=1) - 1
        self.text = ""
        self._num_emitted_chars = 0

    def add_token(self, token_id: int) -> str | None:
        """Append one token's text; returns the stop string if the text now contains one (then the
        text is cut at it, or after it when the request includes stop strings in the output)."""
        piece = self._stream.step(self._tokenizer, token_id)
        if not piece:
            return None
        search_from = max(len(self.text) - self._holdback, 0)
        self.text += piece
        matches = [(index, stop) for stop in self._stops if (index := self.text.find(stop, search_from)) != -1]
        if not matches:
            return None
        index, stop = min(matches)
        self.text = self.text[:index + len(stop) if self._include_stop else index]
        return stop

    @property
    def emitted_text(self) -> str:
        return self.text[:self._num_emitted_chars]

    def take_new_text(self, is_finished: bool) -> str:
        """The text not handed out yet, minus a possible stop-string prefix unless the sequence ended."""
        end = len(self.text) if is_finished else max(len(self.text) - self._holdback, self._num_emitted_chars)
        new_text = self.text[self._num_emitted_chars:end]
        self._num_emitted_chars = end
        return new_text
