"""`pagedserve serve` flag parsing: guide command lines, spellings, --config files, sizes, log lines.

Parsing only: no model loads and no server starts.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from pagedserve.cli.main import serve_configs
from pagedserve.cli.options import ACCEPTED_FLAGS

NO_ENV: dict[str, str] = {}


def configs(command_line: str, environ=NO_ENV):
    return serve_configs(command_line.split(), environ)


def test_seed_line_deepseek_r1_with_underscores_and_equals():
    engine, server = configs("serve MODEL --served_model_name DeepSeek-R1-1.5B --max_model_len 2048 "
                             "--tensor-parallel-size 1 --dtype=half --gpu-memory-utilization=0.9 --api_key OPENWEBUI123")
    assert engine.model == "MODEL" and engine.max_model_len == 2048 and engine.dtype == "half"
    assert engine.tensor_parallel_size == 1 and engine.gpu_memory_utilization == 0.9
    assert server.served_model_name == ("DeepSeek-R1-1.5B",)
    assert server.api_key == ("OPENWEBUI123",)
    assert (server.host, server.port) == ("127.0.0.1", 8000)


def test_seed_line_quantized_eager():
    engine, server = configs("serve MODEL --tensor-parallel-size 1 --max-model-len 16384 --port 8102 "
                             "--quantization bitsandbytes --enforce-eager")
    assert engine.max_model_len == 16384 and engine.quantization == "bitsandbytes" and engine.enforce_eager
    assert server.port == 8102


def test_seed_line_four_gpus():
    engine, server = configs("serve MODEL --tensor-parallel-size 4 --dtype float16 --max-model-len 128000 "
                             "--api-key my-secret-key")
    assert (engine.tensor_parallel_size, engine.dtype, engine.max_model_len) == (4, "float16", 128000)
    assert server.api_key == ("my-secret-key",)


def test_seed_line_model_after_the_flags():
    engine, server = configs("serve --host 0.0.0.0 --port 8000 --max-model-len 2048 --gpu-memory-utilization 0.9 "
                             "--tensor-parallel-size 1 MODEL")
    assert engine.model == "MODEL" and engine.max_model_len == 2048
    assert (server.host, server.port) == ("0.0.0.0", 8000)


def test_seed_line_with_a_json_config_file(tmp_path):
    path = tmp_path / "engine_config.json"
    path.write_text(json.dumps({"max-model-len": "4k", "served_model_name": ["a", "b"], "port": 9000,
                                "enable-prefix-caching": False, "api_key": "from-file"}))
    engine, server = configs(f"serve MODEL --host 0.0.0.0 --port 8000 --config {path}")
    assert engine.max_model_len == 4000 and engine.enable_prefix_caching is False
    assert server.port == 8000 and server.host == "0.0.0.0"           # the command line wins
    assert server.served_model_name == ("a", "b") and server.api_key == ("from-file",)


def test_yaml_config_file_and_command_line_precedence(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model: from-file\nmax_model_len: 32K\nblock-size: 32\nreasoning-parser: deepseek_r1\n"
                    "allowed-origins: ['http://a', 'http://b']\n")
    engine, server = configs(f"serve --config {path} --block-size 8")
    assert engine.model == "from-file" and engine.max_model_len == 32768 and engine.block_size == 8
    assert server.reasoning_parser == "deepseek_r1" and server.allowed_origins == ("http://a", "http://b")
    engine, _ = configs(f"serve MODEL --config {path}")
    assert engine.model == "MODEL"


def test_config_file_unknown_option_is_named(tmp_path, caplog):
    path = tmp_path / "config.yaml"
    path.write_text("max_model_len: 2048\nno_such_option: 1\n")
    with caplog.at_level(logging.INFO, logger="pagedserve"):
        configs(f"serve --config {path}")
    assert [r.getMessage() for r in caplog.records if "no_such_option" in r.getMessage()] == [
        f"config file {path}: unknown option 'no_such_option' ignored"]


@pytest.mark.parametrize("text, expected", [("2048", 2048), ("32k", 32000), ("32K", 32768), ("1.5k", 1500)])
def test_sizes(text, expected):
    engine, _ = configs(f"serve --max-model-len {text} --max-num-batched-tokens={text}")
    assert engine.max_model_len == expected and engine.max_num_batched_tokens == expected


def test_dash_and_underscore_spellings_and_equals_agree():
    spellings = ["--max-num-seqs 8 --block-size 32 --kv-cache-space 0.5 --max-request-body-bytes 1M",
                 "--max_num_seqs 8 --block_size 32 --kv_cache_space 0.5 --max_request_body_bytes 1M",
                 "--max-num-seqs=8 --block_size=32 --kv-cache-space=0.5 --max_request_body_bytes=1M"]
    results = {str(configs("serve " + spelling)) for spelling in spellings}
    assert len(results) == 1
    engine, server = configs("serve " + spellings[0])
    assert (engine.max_num_seqs, engine.block_size, engine.kv_cache_space) == (8, 32, 0.5)
    assert server.max_request_body_bytes == 2**20


def test_server_flags():
    engine, server = configs(
        "serve --served-model-name a b --served-model-name c --api-key k1 --api-key k2 --seed 7 "
        "--no-enable-prefix-caching --disable-log-requests --disable-log-stats --uvicorn-log-level warning "
        "--allowed-origins [\"http://x\",\"http://y\"] --allowed-methods GET POST --allow-credentials "
        "--ssl-keyfile key.pem --ssl-certfile cert.pem --reasoning-parser qwen3 --chat-template {{x}} "
        "--override-generation-config {\"temperature\":0.6}")
    assert server.served_model_name == ("a", "b", "c") and server.api_key == ("k1", "k2")
    assert engine.seed == 7 and engine.enable_prefix_caching is False and engine.chat_template == "{{x}}"
    assert server.disable_log_requests and server.disable_log_stats and server.uvicorn_log_level == "warning"
    assert server.allowed_origins == ("http://x", "http://y") and server.allowed_methods == ("GET", "POST")
    assert server.allow_credentials and (server.ssl_keyfile, server.ssl_certfile) == ("key.pem", "cert.pem")
    assert server.reasoning_parser == "qwen3" and server.generation_overrides == {"temperature": 0.6}
    assert "k1" not in repr(server)


def test_api_key_from_the_environment():
    assert configs("serve", {"VLLM_API_KEY": "v"})[1].api_key == ("v",)
    assert configs("serve", {"PAGEDSERVE_API_KEY": "p", "VLLM_API_KEY": "v"})[1].api_key == ("p",)
    assert configs("serve --api-key flag", {"VLLM_API_KEY": "v"})[1].api_key == ("flag",)
    assert configs("serve")[1].api_key == ()


def test_defaults():
    engine, server = configs("serve")
    assert engine.model == "smollm2-135m-instruct"
    assert (server.host, server.port, server.served_model_name, server.api_key) == ("127.0.0.1", 8000, (), ())


def test_flags_that_cannot_apply_log_exactly_one_line_each(caplog):
    command_line = ("serve MODEL --quantization bitsandbytes "
                    "--kv-cache-dtype fp8 --swap-space 4 --cpu-offload-gb 2 --trust-remote-code --load-format "
                    "safetensors --tokenizer-mode auto --enforce-eager --gpu-memory-utilization 0.9 --device cpu")
    with caplog.at_level(logging.INFO, logger="pagedserve"):
        configs(command_line)
    messages = [record.getMessage() for record in caplog.records]
    for flag in ("--quantization", "--kv-cache-dtype", "--swap-space", "--cpu-offload-gb", "--trust-remote-code",
                 "--load-format", "--tokenizer-mode", "--gpu-memory-utilization"):
        assert sum(message.startswith(flag) for message in messages) == 1, (flag, messages)
    assert len(messages) == 8


def test_flags_that_apply_log_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="pagedserve"):
        engine, _ = configs("serve --tensor-parallel-size 4 --pipeline-parallel-size 2 --device cpu "
                            "--max-model-len 2048 --enforce-eager --distributed-executor-backend ray "
                            "--distributed-timeout-seconds 60")
    assert caplog.records == []
    assert (engine.tensor_parallel_size, engine.pipeline_parallel_size) == (4, 2)
    assert (engine.distributed_executor_backend, engine.distributed_timeout_seconds) == ("ray", 60)


def test_every_accepted_flag_parses():
    for name, (kind, _reason) in ACCEPTED_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        configs(f"serve {flag}" if kind is bool else f"serve {flag}=1")


@pytest.mark.parametrize("command_line, message", [
    ("serve --port 70000", "port"),
    ("serve --override-generation-config [1]", "override_generation_config"),
    ("serve --ssl-keyfile key.pem", "ssl_certfile"),
    ("serve MODEL --model OTHER", "given twice"),
])
def test_bad_values_are_value_errors(command_line, message):
    with pytest.raises(ValueError, match=message):
        configs(command_line)


def test_bad_choice_exits_with_usage_error():
    with pytest.raises(SystemExit):
        configs("serve --reasoning-parser granite")


def test_help_runs():
    result = subprocess.run([sys.executable, "-m", "pagedserve", "serve", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    assert "--served-model-name" in result.stdout and "--api-key" in result.stdout


def test_omp_wait_policy_is_set_before_torch_loads_openmp(tiny_llama_dir):
    """From the command line it reaches OpenMP's environment; too late (torch already loaded) it says so."""
    import os

    environ = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-m", "pagedserve", "generate", "--model", str(tiny_llama_dir),
                             "--prompt", "hi", "--max-tokens", "2", "--omp-wait-policy", "passive",
                             "--num-threads", "1"], capture_output=True, text=True, timeout=300, env=environ)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "on cpu (1 thread, OpenMP wait passive)" in result.stderr
    assert "cannot apply" not in result.stderr

    late = subprocess.run([sys.executable, "-c", "import torch; from pagedserve import LLM; "
                           f"LLM({str(tiny_llama_dir)!r}, omp_wait_policy='active')"],
                          capture_output=True, text=True, timeout=300, env=environ)
    assert late.returncode == 0, late.stderr[-2000:]
    assert "omp_wait_policy=active cannot apply" in late.stderr and "OMP_WAIT_POLICY=ACTIVE" in late.stderr
