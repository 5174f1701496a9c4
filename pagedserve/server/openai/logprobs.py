"""The engine's per-position logprobs in the API's three shapes: chat, legacy completions, prompt.

Each engine position is `{token_id: Logprob}` with the chosen token first, then the top
alternatives. -inf is sent as -9999.0, as vLLM does, since JSON has no infinity.
"""
from __future__ import annotations

from typing import Any, Callable

from pagedserve.outputs import Logprob, PositionLogprobs

_FLOOR = -9999.0


def chat_logprobs(positions: list[PositionLogprobs], num_top: int) -> dict[str, Any]:
    """OpenAI chat: `{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`."""
    content = []
    for position in positions:
        _, chosen = _chosen(position)
        top = [entry for entry in _by_rank(position) if entry.rank <= num_top][:num_top]
        content.append({**_chat_entry(chosen), "top_logprobs": [_chat_entry(entry) for entry in top]})
    return {"content": content}


def completion_logprobs(token_ids: list[int], positions: list[PositionLogprobs | None], num_top: int,
                        decode: Callable[[int], str], text_offset: int = 0) -> dict[str, Any]:
    """Legacy completions: parallel lists `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`.

    A None position (the first prompt token, which nothing predicts) has null logprobs.
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token_id, position in zip(token_ids, positions):
        if position is None:
            text = decode(token_id)
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            _, chosen = _chosen(position)
            text = _text(chosen)
            token_logprobs.append(_value(chosen))
            top = {_text(entry): _value(entry) for entry in _by_rank(position) if entry.rank <= num_top}
            top.setdefault(text, _value(chosen))
            top_logprobs.append(top)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def prompt_logprobs(positions: list[PositionLogprobs | None] | None) -> list[dict[str, Any] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt position None or `{token_id: {logprob, rank, decoded_token}}`."""
    if positions is None:
        return None
    return [None if position is None else
            {str(token_id): {"logprob": _value(entry), "rank": entry.rank, "decoded_token": entry.decoded_token}
             for token_id, entry in position.items()}
            for position in positions]


def _chosen(position: PositionLogprobs) -> tuple[int, Logprob]:
    return next(iter(position.items()))


def _by_rank(position: PositionLogprobs) -> list[Logprob]:
    return sorted(position.values(), key=lambda entry: entry.rank)


def _chat_entry(entry: Logprob) -> dict[str, Any]:
    text = _text(entry)
    return {"token": text, "logprob": _value(entry), "bytes": list(text.encode("utf-8"))}


def _text(entry: Logprob) -> str:
    return entry.decoded_token or ""


def _value(entry: Logprob) -> float:
    return max(entry.logprob, _FLOOR)
