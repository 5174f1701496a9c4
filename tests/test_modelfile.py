"""Modelfiles, Go-template translation, durations, created-model manifests and Ollama's options: the pure
parts of the Ollama compatibility, in milliseconds (one test loads a tiny tokenizer)."""
from __future__ import annotations

import math

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pagedserve.config import EngineConfig
from pagedserve.config.duration import format_duration, parse_duration
from pagedserve.store.go_template import is_go_template, translate_go_template
from pagedserve.store.defaults import ModelDefaults, SamplingDefaults
from pagedserve.store.models_dir import (ModelManifest, create_model, default_model_name, find_manifest, list_manifests,
                                    models_dir, remove_manifest, resolve_named_model)
from pagedserve.store.modelfile import parse_modelfile
from pagedserve.server.ollama.protocol import sampling_params

# The Modelfile of ../shared/seed-requests.md, as people write it.
SEED_MODELFILE = '''FROM /data/models/DeepSeek-R1-Q4_K_M.gguf
PARAMETER num_ctx 8192
PARAMETER temperature 0.6
TEMPLATE "<｜User｜>{{ .System }} {{ .Prompt }}<｜Assistant｜>"
'''


def render(template: str, messages: list[dict], **context) -> str:
    # transformers renders chat templates with trim_blocks and lstrip_blocks on
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(template).render(messages=messages, add_generation_prompt=True, **context)


# ---- Modelfile ------------------------------------------------------------------------------------

def test_seed_modelfile_parses():
    modelfile = parse_modelfile(SEED_MODELFILE)
    assert modelfile.from_ == "/data/models/DeepSeek-R1-Q4_K_M.gguf"
    assert modelfile.parameters == {"num_ctx": 8192, "temperature": 0.6}
    assert modelfile.template == "<｜User｜>{{ .System }} {{ .Prompt }}<｜Assistant｜>"
    assert parse_modelfile(modelfile.to_text()) == modelfile


def test_modelfile_syntax():
    modelfile = parse_modelfile('\ufeff# a comment\nfrom  ./model.gguf\n\nparameter stop "<|im_end|>"\n'
                                'PARAMETER stop </s>\nPARAMETER top_k 20\nPARAMETER repeat_last_n 64\n'
                                'SYSTEM """You are\na pirate."""\nMESSAGE user Hi\nMESSAGE assistant "Arr!"\n'
                                'LICENSE MIT\n')
    assert modelfile.from_ == "./model.gguf"
    assert modelfile.parameters == {"stop": ["<|im_end|>", "</s>"], "top_k": 20}   # repeat_last_n: ignored
    assert modelfile.system == "You are\na pirate." and modelfile.license == "MIT"
    assert modelfile.messages == (("user", "Hi"), ("assistant", "Arr!"))
    assert parse_modelfile(modelfile.to_text()) == modelfile


@pytest.mark.parametrize("text, message", [
    ("PARAMETER temperature 0.5\n", "no FROM"),
    ("FROM x\nPARAMETER temperature hot\n", "line 2: PARAMETER temperature: 'hot' is not a number"),
    ("FROM x\nPARAMETER num_ctx 1.5\n", "not a whole number"),
    ("FROM x\nPARAMETER flavour sweet\n", "unknown parameter 'flavour'"),
    ("FROM x\nFLAVOUR sweet\n", "unknown command 'FLAVOUR'"),
    ('FROM x\nSYSTEM """never closed\n', "unterminated"),
    ("FROM x\nMESSAGE robot hi\n", "MESSAGE role"),
    ("FROM x\nADAPTER ./lora.gguf\n", "ADAPTER is not supported"),
])
def test_bad_modelfiles(text, message):
    with pytest.raises(ValueError, match=message):
        parse_modelfile(text)


# ---- Go templates -----------------------------------------------------------------------------------

def test_seed_go_template_renders_like_ollama():
    template = parse_modelfile(SEED_MODELFILE).template
    assert is_go_template(template) and not is_go_template("{{ messages[0]['content'] }}")
    jinja = translate_go_template(template, add_bos=True)
    assert render(jinja, [{"role": "user", "content": "hi"}], bos_token="<s>") == "<s><｜User｜> hi<｜Assistant｜>"
    # Ollama renders each past turn whole (this template has no {{ .Response }}, so answers vanish), and
    # a system message only in the turn where it appears.
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    expected = "<s><｜User｜>Be brief. a<｜Assistant｜><｜User｜> c<｜Assistant｜>"
    assert render(jinja, conversation, bos_token="<s>") == expected


def test_go_template_with_conditions_response_and_trimming():
    template = ("{{- if .System }}<|system|>\n{{ .System }}</s>\n{{ end -}}\n"
                "<|user|>\n{{ .Prompt }}</s>\n<|assistant|>\n{{ .Response }}</s>\n")
    jinja = translate_go_template(template)
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}]
    assert render(jinja, conversation) == ("<|user|>\na</s>\n<|assistant|>\nb</s>\n"
                                           "<|user|>\nc</s>\n<|assistant|>\n")
    with_system = render(jinja, [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}])
    assert with_system == "<|system|>\nS</s>\n<|user|>\na</s>\n<|assistant|>\n"


@pytest.mark.parametrize("template", ["{{ range .Messages }}{{ .Content }}{{ end }}", "{{ if .System }}x",
                                      "{{ .Prompt | upper }}", "{{ end }}"])
def test_go_templates_that_cannot_be_translated(template):
    with pytest.raises(ValueError, match="TEMPLATE"):
        translate_go_template(template)


# ---- durations and Ollama's options -------------------------------------------------------------------

@pytest.mark.parametrize("value, seconds", [("5m", 300), ("1h30m", 5400), ("300ms", 0.3), ("1.5s", 1.5), (300, 300),
                                            ("300", 300), ("0", 0), (0, 0), (-1, math.inf), ("-1m", math.inf)])
def test_durations(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m5", "", True])
def test_bad_durations(value):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)


def test_format_duration():
    assert [format_duration(s) for s in (300, 5400, 0.25, math.inf)] == ["5m", "1h30m", "250ms", "forever"]


def test_ollama_options_map_onto_sampling_params():
    params, num_ctx = sampling_params({"num_predict": 5, "temperature": 0, "top_k": 3, "seed": 7, "stop": "x",
                                       "repeat_penalty": 1.1, "num_ctx": 64, "mirostat": 2}, SamplingDefaults(),
                                      stream=True)
    assert (params.max_tokens, params.temperature, params.top_k, params.seed) == (5, 0.0, 3, 7)
    assert params.stop == ["x"] and params.repetition_penalty == 1.1 and num_ctx == 64
    defaults, _ = sampling_params(None, SamplingDefaults.merge({"temperature": 0.2}), stream=False)
    assert (defaults.temperature, defaults.top_k, defaults.top_p, defaults.max_tokens) == (0.2, 40, 0.9, None)
    unlimited, _ = sampling_params({"num_predict": -1, "seed": -1, "top_k": -1},
                                   SamplingDefaults.merge({"max_new_tokens": 9, "seed": 3}), stream=False)
    assert (unlimited.max_tokens, unlimited.seed, unlimited.top_k) == (None, None, 0)


@pytest.mark.parametrize("options, message", [
    ({"temperature": "hot"}, 'option "temperature" must be of type float32'),
    ({"num_predict": True}, 'option "num_predict" must be of type integer'),
    ({"stop": [1]}, 'option "stop" must be of an array of strings'),
    ({"temperature": -1}, "temperature must be non-negative"),
])
def test_bad_ollama_options(options, message):
    with pytest.raises(ValueError, match=message):
        sampling_params(options, SamplingDefaults(), stream=False)


# ---- created models -------------------------------------------------------------------------------------

def test_models_dir_is_chosen_in_one_place(tmp_path):
    assert models_dir(tmp_path / "flag", {"PAGEDSERVE_MODELS": "/env"}) == tmp_path / "flag"
    assert str(models_dir(None, {"PAGEDSERVE_MODELS": "/env"})) == "/env"
    assert str(models_dir(None, {"XDG_DATA_HOME": "/data"})) == "/data/pagedserve/models"


def test_model_defaults_start_chats_as_ollama_does():
    defaults = ModelDefaults.from_parameters({"temperature": 0.1, "num_predict": -1, "seed": -1, "num_ctx": 99,
                                              "repeat_penalty": 1.2}, "Be a pirate.", (("user", "Hi"),))
    assert defaults.generation == {"temperature": 0.1, "max_new_tokens": None, "repetition_penalty": 1.2}
    question = [{"role": "user", "content": "Q"}]
    assert [m["role"] for m in defaults.chat_messages(question)] == ["system", "user", "user"]
    own_system = [{"role": "system", "content": "mine"}, *question]
    assert defaults.chat_messages(own_system)[1]["content"] == "mine"
    params = SamplingDefaults.merge(defaults.generation).params()
    assert params.temperature == 0.1 and params.max_tokens is None and params.repetition_penalty == 1.2


def test_create_flattens_parents_and_resolves_names(tmp_path, tiny_llama_dir):
    directory = tmp_path / "models"
    base = create_model("base", f"FROM {tiny_llama_dir.name}\nPARAMETER num_ctx 128\nPARAMETER top_k 5\n"
                                "SYSTEM be brief\n", directory, tiny_llama_dir.parent)
    assert base.source == str(tiny_llama_dir) and base.chat_template is None
    child = create_model("child:v1", "FROM base\nPARAMETER top_k 7\nTEMPLATE {{ .Prompt }}!\n", directory, tmp_path)
    assert child.source == str(tiny_llama_dir) and child.parent == "base"
    assert child.modelfile.parameters == {"num_ctx": 128, "top_k": 7} and child.modelfile.system == "be brief"
    assert render(child.chat_template, [{"role": "user", "content": "hi"}], bos_token="<s>") == "hi!"
    assert [m.name for m in list_manifests(directory)] == ["base", "child:v1"]
    assert find_manifest("base:latest", directory) == base
    assert ModelManifest.from_json(child.to_json()) == child
    config, defaults = resolve_named_model(EngineConfig(model="child:v1", models_dir=str(directory),
                                                        max_model_len=100))
    assert (config.model, config.max_model_len, config.chat_template) == (str(tiny_llama_dir), 100, child.chat_template)
    assert defaults.generation == {"top_k": 7} and defaults.system == "be brief"
    assert default_model_name("child:v1", directory) == "child:v1"
    assert default_model_name(str(tiny_llama_dir), directory) == tiny_llama_dir.name
    remove_manifest("base", directory)
    assert find_manifest("base", directory) is None


@pytest.mark.parametrize("name, text, message", [
    ("ok", "FROM ./nowhere.gguf\n", "no such file or folder"),
    ("bad/name", "FROM x\n", "invalid model name"),
    ("ok", "FROM {dir}\nTEMPLATE {{% if %}}\n", "neither a valid Jinja template"),
])
def test_create_refuses(tmp_path, tiny_llama_dir, name, text, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, text.format(dir=tiny_llama_dir), tmp_path / "models", tmp_path)
