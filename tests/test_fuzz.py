"""Fuzzed request bodies against a live server: whatever a client sends, the answer is never a 5xx.

Bodies are drawn from the pydantic request models themselves: each field's annotation becomes a
hypothesis strategy (Any: any JSON value), fields are left out at random, and one field in a few
gets a value of the wrong kind. Generation is kept short by the server's own limits (a default
output cap of 8 tokens, one sequence at a time) and by capping the token counts a body asks for.
"""
from __future__ import annotations

import types
import typing
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pagedserve.server.ollama.protocol import ChatBody, GenerateBody
from pagedserve.server.openai.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from tests.server_process import ServerProcess

MODEL = "smollm2-135m-instruct"
# the fields that say how much work a request asks for, and the most a fuzzed one may ask
_WORK_FIELDS = {"max_tokens": 4, "max_completion_tokens": 4, "n": 2, "best_of": 2, "num_predict": 4, "num_ctx": 4096,
                "logprobs": 3, "top_logprobs": 3, "prompt_logprobs": 3, "min_tokens": 2}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)


def strategy_for(annotation: Any) -> st.SearchStrategy:
    """Values of a field's type; Any and the model's own nested types become JSON values."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return json_values
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(strategy_for(arg) for arg in args))
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=4)
    if origin is dict:
        return st.dictionaries(st.text(max_size=12), strategy_for(args[1]), max_size=4)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return st.fixed_dictionaries({}, optional=fields_of(annotation))
    if annotation is str:
        return st.text(max_size=40)
    if annotation is int:
        return st.integers(-5, 5) | st.integers(-2**70, 2**70)
    if annotation is float:
        return st.floats(-5, 5) | st.floats(allow_nan=False)
    return st.from_type(annotation)


def fields_of(model: type[BaseModel]) -> dict[str, st.SearchStrategy]:
    return {field.alias or name: strategy_for(field.annotation) for name, field in model.model_fields.items()}


def _bounded(body: dict[str, Any]) -> dict[str, Any]:
    for name, most in _WORK_FIELDS.items():
        for holder in (body, body.get("options") if isinstance(body.get("options"), dict) else {}):
            value = holder.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > most:
                holder[name] = most
    return body


def bodies(model: type[BaseModel], fixed: dict[str, Any]) -> st.SearchStrategy:
    wrong_kind = st.dictionaries(st.sampled_from(sorted(fields_of(model))), json_values, max_size=1)
    return st.builds(lambda drawn, wrong: _bounded({**drawn, **fixed, **wrong}),
                     st.fixed_dictionaries({}, optional=fields_of(model)), wrong_kind)


@pytest.fixture(scope="module")
def server():
    with ServerProcess([MODEL, "--max-model-len", "1024", "--kv-cache-space", "0.1", "--max-num-seqs", "2",
                        "--default-max-tokens", "8", "--log-level", "warning"]).running() as process:
        yield process


ROUTES = [
    ("/v1/chat/completions", ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", CompletionRequest, {}),
    ("/tokenize", TokenizeRequest, {}),
    ("/api/chat", ChatBody, {"model": MODEL}),
    ("/api/generate", GenerateBody, {"model": MODEL}),
]


@pytest.mark.parametrize("path, model, fixed", ROUTES, ids=[route[0] for route in ROUTES])
def test_no_fuzzed_body_gets_a_5xx(server, path, model, fixed):
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        @settings(max_examples=60, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(body=bodies(model, fixed) | bodies(model, {}))
        def answers_below_500(body: dict[str, Any]) -> None:
            response = client.post(path, json=body)
            assert response.status_code < 500, (body, response.text)

        answers_below_500()
    assert httpx.get(server.url("/health")).status_code == 200
    server.check_log()
