"""Sampling defaults merge in one place: one model and one request give the same SamplingParams on every
path (offline LLM, the OpenAI routes, the Ollama routes, the terminal chat)."""
from __future__ import annotations

import json
import shutil
import time

import pytest
from fastapi.testclient import TestClient

from pagedserve import LLM
from pagedserve.cli.chat_backends import EngineChat
from pagedserve.config import EngineConfig, ServerConfig
from pagedserve.sampling_params import OutputKind
from pagedserve.server.app import create_app
from pagedserve.server.ollama.protocol import sampling_params as ollama_params
from pagedserve.server.openai.protocol import ChatCompletionRequest, CompletionRequest
from pagedserve.store.defaults import ModelDefaults, SamplingDefaults, sampling_defaults
from pagedserve.store.models_dir import create_model

ENGINE = dict(num_kv_blocks=32, max_num_batched_tokens=64, num_threads=1)
# The checkpoint says temperature 0.9 and top_p 0.8; the Modelfile overrides temperature and adds top_k
# and a token limit; the request adds seed and min_p.
GENERATION_CONFIG = {"temperature": 0.9, "top_p": 0.8, "repetition_penalty": 1.1, "eos_token_id": 2}
MODELFILE = "FROM {folder}\nPARAMETER temperature 0.3\nPARAMETER top_k 7\nPARAMETER num_predict 12\n"
EXPECTED = dict(temperature=0.3, top_p=0.8, top_k=7, repetition_penalty=1.1, max_tokens=12, seed=5, min_p=0.05)


@pytest.fixture(scope="module")
def tuned_model(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned")
    folder = root / "checkpoint"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    models = root / "models"
    create_model("tuned", MODELFILE.format(folder=folder), models, root)
    return EngineConfig(model="tuned", models_dir=str(models), **ENGINE)


def fields(params) -> dict:
    return {name: getattr(params, name) for name in EXPECTED}


def served_defaults(config: EngineConfig, **server_options) -> SamplingDefaults:
    app = create_app(ServerConfig(**server_options), config)
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        return app.state.server.lookup("tuned").engine.sampling_defaults


def test_one_model_and_request_give_the_same_params_on_every_path(tuned_model):
    served = served_defaults(tuned_model)
    llm = LLM(tuned_model.model, **{k: v for k, v in vars(tuned_model).items() if k != "model"})
    chat = EngineChat(tuned_model)
    messages = [{"role": "user", "content": "hi"}]
    paths = {
        "LLM": llm.processor.sampling_defaults.params({"seed": 5, "min_p": 0.05}),
        "OpenAI chat": ChatCompletionRequest(messages=messages, seed=5, min_p=0.05).to_sampling_params(
            served, OutputKind.FINAL_ONLY),
        "OpenAI completions": CompletionRequest(prompt="hi", max_tokens=None, seed=5, min_p=0.05).to_sampling_params(
            served, OutputKind.FINAL_ONLY),
        "Ollama": ollama_params({"seed": 5, "min_p": 0.05}, served, stream=False)[0],
        "terminal chat": chat.sampling_params({"seed": 5, "min_p": 0.05}),
    }
    chat.client.shutdown()
    for name, params in paths.items():
        assert fields(params) == EXPECTED, name
    # What a request sets wins everywhere, in each API's spelling.
    assert ChatCompletionRequest(messages=messages, temperature=0.7).to_sampling_params(
        served, OutputKind.DELTA).temperature == 0.7
    assert ollama_params({"temperature": 0.7}, served, stream=True)[0].temperature == 0.7
    # Without a request's sampling params, the offline API uses the model's defaults, as vLLM's does.
    assert fields(llm.get_default_sampling_params()) == {**EXPECTED, "seed": None, "min_p": 0.0}


def test_server_options_change_the_merge(tuned_model):
    without_checkpoint = served_defaults(tuned_model, generation_config="vllm")
    assert dict(without_checkpoint.values) == {"temperature": 0.3, "top_k": 7, "max_tokens": 12}
    overridden = served_defaults(tuned_model, override_generation_config='{"temperature": 0.5, "top_p": 0.6}')
    assert overridden.values["temperature"] == 0.5 and overridden.values["top_p"] == 0.6
    assert overridden.values["top_k"] == 7


def test_the_merge_order_and_the_apis_fallbacks():
    defaults = sampling_defaults({"temperature": 0.9, "top_p": 0.8, "do_sample": True},
                                 ModelDefaults.from_parameters({"temperature": 0.3, "seed": -1}),
                                 {"top_p": 0.5})
    assert dict(defaults.values) == {"temperature": 0.3, "top_p": 0.5}   # do_sample and seed -1 are not defaults
    assert defaults.resolve({"temperature": None, "top_k": 3}, {"top_k": 40, "min_p": 0.1}) == {
        "temperature": 0.3, "top_p": 0.5, "top_k": 3, "min_p": 0.1}
    # OpenAI's API leaves top_k alone; Ollama's falls back to its own 40.
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "q"}]).to_sampling_params(
        defaults, OutputKind.FINAL_ONLY).top_k == 0
    assert ollama_params(None, defaults, stream=False)[0].top_k == 40
