"""Every flag of vLLM 0.32's `serve` parses, read from vLLM's own parser's list (tests/data, recorded from the
vllm 0.32.0 wheel) and checked against its recorded `vllm serve --help=all`; SGLang's spellings and the
`python -m ...api_server` entry point too. Parsing only, except the one entry-point test."""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.cli.main import build_parser, serve_configs

DATA = Path(__file__).parent / "data"
RECORDED = json.loads((DATA / "vllm-0.32.0-serve-flags.json").read_text())["flags"]
# Flags whose value must be valid for pagedserve too, or that need a companion to be valid.
# vLLM refuses --enable-auto-tool-choice without a parser too
COMPANIONS = {"--ssl-keyfile": ["--ssl-certfile", "cert.pem"], "--enable-auto-tool-choice": ["--tool-call-parser", "hermes"],
              "--lora-modules": ["--enable-lora"],
              # our safe default (not vLLM's): credentials only with an explicit --allowed-origins list
              "--allow-credentials": ["--allowed-origins", "https://chat.example.com"]}
# The recorded example is a placeholder; the flag takes a JSON object
EXAMPLES = {"--default-chat-template-kwargs": '{"enable_thinking": false}'}


def _our_choices(flag: str) -> list[str] | None:
    action = build_parser()._subparsers._group_actions[0].choices["serve"]._option_string_actions.get(flag)
    return list(action.choices) if action is not None and action.choices else None


CHOICES = {entry["flags"][0]: _our_choices(entry["flags"][0]) for entry in RECORDED}


def test_the_recorded_list_is_the_recorded_help():
    """The JSON and the help text come from the same parser: the same flags, nothing left out."""
    help_text = (DATA / "vllm-0.32.0-serve-help.txt").read_text()
    in_help = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", help_text))
    recorded = {flag for entry in RECORDED for flag in entry["flags"]}
    assert recorded <= in_help
    assert len(RECORDED) == 316


@pytest.mark.parametrize("entry", RECORDED, ids=[entry["flags"][0] for entry in RECORDED])
def test_every_vllm_serve_flag_parses(entry, tmp_path, caplog):
    flag = entry["flags"][0]
    if not entry["takes_value"]:
        values = []
    elif flag == "--config":
        (tmp_path / "config.yaml").write_text("max_model_len: 2048\n")
        values = [str(tmp_path / "config.yaml")]
    else:
        values = [CHOICES[flag][0] if CHOICES[flag] else EXAMPLES.get(flag, entry["example"])]
    for spelling in entry["flags"]:
        if spelling.startswith("--no-"):
            continue
        with caplog.at_level(logging.INFO, logger="pagedserve"):
            serve_configs(["serve", spelling, *values, *COMPANIONS.get(flag, [])], {})


def test_an_accepted_flag_logs_one_line_saying_why(caplog):
    with caplog.at_level(logging.INFO, logger="pagedserve"):
        serve_configs(["serve", "--fully-sharded-loras", "--max-cpu-loras", "4", "-ep", "--speculative-config",
                       '{"method": "ngram"}', "--lora-target-modules", "q_proj", "v_proj"], {})
    messages = [record.getMessage() for record in caplog.records]
    assert sorted(message.split(" ")[0] for message in messages) == [
        "--enable-expert-parallel", "--fully-sharded-loras", "--lora-target-modules", "--max-cpu-loras",
        "--speculative-config"]
    assert any(message.startswith("--fully-sharded-loras has no effect here: LoRA tuning for GPUs")
               for message in messages)


def test_help_lists_the_accepted_flags_in_their_own_sections():
    result = subprocess.run([sys.executable, "-m", "pagedserve", "serve", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    accepted = result.stdout[result.stdout.index("accepted vLLM flags, no effect here"):]
    for flag in ("--swap-space", "--fully-sharded-loras", "--data-parallel-size", "--speculative-config", "--hf-token"):
        assert flag in accepted
    assert "LoRA tuning for GPUs" in accepted
    engine_and_server = result.stdout[:result.stdout.index("accepted vLLM flags")]
    assert "--max-model-len" in engine_and_server and "--enable-lora" in engine_and_server
    assert "--enable-lora" not in accepted and "--fully-sharded-loras" not in engine_and_server


def test_vllm_spellings_of_real_flags():
    engine, server = serve_configs(["serve", "--max-model-len", "auto", "--num-gpu-blocks-override", "64",
                                    "--log-level", "DEBUG", "-tp", "1"], {})
    assert engine.max_model_len is None and engine.num_kv_blocks == 64 and server.log_level == "debug"


def test_sglang_model_path_and_tp():
    engine, server = serve_configs(["serve", "--model-path", "org/model", "--tp", "2", "--port", "30000"], {})
    assert (engine.model, engine.tensor_parallel_size, server.port) == ("org/model", 2, 30000)
    assert serve_configs(["serve", "--model_path", "x", "--tp-size", "1"], {})[0].model == "x"


def test_enforce_eager_keeps_the_cpu_kernels_and_disable_cpu_kernels_turns_them_off(tiny_llama_dir):
    from pagedserve.engine.platform import Platform
    from pagedserve.kernels import cpu_kernels_available

    engine, _ = serve_configs(["serve", str(tiny_llama_dir), "--enforce-eager", "--device", "cpu",
                               "--dtype", "float32"], {})
    assert Platform.resolve(engine, None, is_quantized=True).use_cpu_kernels == cpu_kernels_available()
    assert not Platform.resolve(engine.replace(disable_cpu_kernels=True), None, is_quantized=True).use_cpu_kernels


def test_python_m_entrypoint_as_the_guides_write_it():
    """`python -m vllm.entrypoints.openai.api_server --model ...` with our name: the same parser as `serve`."""
    from pagedserve.entrypoints.openai.api_server import parse_args

    args = parse_args(["--model", "/models", "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
                       "--dtype", "float16", "--max-model-len", "128000", "--api-key", "KEY"])
    assert args.command == "serve" and args.model_flags == ["/models"] and args.max_model_len == 128000
    result = subprocess.run([sys.executable, "-m", "pagedserve.entrypoints.openai.api_server", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--tensor-parallel-size" in result.stdout
