"""Environment variables through `pagedserve serve`: one test per variable, each also showing that a flag
wins over it. Parsing only (serve_configs); tests/test_pull.py and test_ollama_models.py run real servers."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pagedserve.cli.main import serve_configs
from pagedserve.config.environment import ENVIRONMENT


def configs(command_line: str, environ: dict[str, str]):
    return serve_configs(command_line.split(), environ)


def test_pagedserve_host():
    assert configs("serve", {"PAGEDSERVE_HOST": "0.0.0.0"})[1].host == "0.0.0.0"
    assert configs("serve --host 10.0.0.1", {"PAGEDSERVE_HOST": "0.0.0.0"})[1].host == "10.0.0.1"


def test_pagedserve_port():
    assert configs("serve", {"PAGEDSERVE_PORT": "9000"})[1].port == 9000
    assert configs("serve --port 9001", {"PAGEDSERVE_PORT": "9000"})[1].port == 9001
    with pytest.raises(ValueError, match="PAGEDSERVE_PORT='http'"):
        configs("serve", {"PAGEDSERVE_PORT": "http"})


@pytest.mark.parametrize("value, address", [
    ("0.0.0.0", ("0.0.0.0", 11434)), ("0.0.0.0:11434", ("0.0.0.0", 11434)), (":8080", ("127.0.0.1", 8080)),
    ("http://10.1.2.3", ("10.1.2.3", 80)), ("https://example.com:8443/", ("example.com", 8443)),
    ("[::1]:9000", ("::1", 9000)), ("localhost", ("localhost", 11434)),
])
def test_ollama_host(value, address):
    _, server = configs("serve", {"OLLAMA_HOST": value})
    assert (server.host, server.port) == address


def test_pagedserve_disable_shm_allreduce():
    assert not configs("serve", {})[0].disable_custom_all_reduce
    assert configs("serve", {"PAGEDSERVE_DISABLE_SHM_ALLREDUCE": "1"})[0].disable_custom_all_reduce
    assert configs("serve --disable-custom-all-reduce", {})[0].disable_custom_all_reduce
    assert not configs("serve --no-disable-custom-all-reduce",
                       {"PAGEDSERVE_DISABLE_SHM_ALLREDUCE": "1"})[0].disable_custom_all_reduce


def test_ollama_host_under_flags_and_pagedserve_variables():
    _, server = configs("serve --port 8000", {"OLLAMA_HOST": "0.0.0.0:11434"})
    assert (server.host, server.port) == ("0.0.0.0", 8000)
    _, server = configs("serve", {"OLLAMA_HOST": "0.0.0.0:11434", "PAGEDSERVE_PORT": "8000"})
    assert (server.host, server.port) == ("0.0.0.0", 8000)


def test_ollama_flag_listens_where_ollama_clients_look():
    assert (configs("serve --ollama", {})[1].host, configs("serve --ollama", {})[1].port) == ("127.0.0.1", 11434)
    assert configs("serve --ollama --port 9000", {})[1].port == 9000
    assert configs("serve --ollama", {"OLLAMA_HOST": "0.0.0.0:12345"})[1].port == 12345
    assert configs("serve", {})[1].port == 8000


def test_pagedserve_api_key():
    assert configs("serve", {"PAGEDSERVE_API_KEY": "p", "VLLM_API_KEY": "v"})[1].api_key == ("p",)
    assert configs("serve --api-key flag", {"PAGEDSERVE_API_KEY": "p"})[1].api_key == ("flag",)


def test_vllm_api_key():
    assert configs("serve", {"VLLM_API_KEY": "v"})[1].api_key == ("v",)
    assert configs("serve --api-key flag", {"VLLM_API_KEY": "v"})[1].api_key == ("flag",)
    assert configs("serve", {})[1].api_key == ()


def test_ollama_models(tmp_path):
    engine, _ = configs("serve", {"OLLAMA_MODELS": str(tmp_path)})
    assert engine.models_dir == str(tmp_path)
    assert configs("serve --models-dir /other", {"OLLAMA_MODELS": str(tmp_path)})[0].models_dir == "/other"


def test_ollama_keep_alive():
    assert configs("serve", {"OLLAMA_KEEP_ALIVE": "10m"})[1].keep_alive == "10m"
    assert configs("serve --keep-alive -1", {"OLLAMA_KEEP_ALIVE": "10m"})[1].keep_alive == "-1"
    with pytest.raises(ValueError, match="invalid duration 'soon'"):
        configs("serve", {"OLLAMA_KEEP_ALIVE": "soon"})


def test_ollama_origins():
    server = configs("serve", {"OLLAMA_ORIGINS": "http://a.example, https://b.example"})[1]
    assert server.allowed_origins == ("http://a.example", "https://b.example")
    assert configs("serve", {"OLLAMA_ORIGINS": "*"})[1].allowed_origins == ("*",)
    assert configs("serve --allowed-origins http://c", {"OLLAMA_ORIGINS": "*"})[1].allowed_origins == ("http://c",)


def test_ollama_num_parallel():
    assert configs("serve", {"OLLAMA_NUM_PARALLEL": "4"})[0].max_num_seqs == 4
    assert configs("serve --max-num-seqs 8", {"OLLAMA_NUM_PARALLEL": "4"})[0].max_num_seqs == 8
    with pytest.raises(ValueError, match="OLLAMA_NUM_PARALLEL='0'"):
        configs("serve", {"OLLAMA_NUM_PARALLEL": "0"})


def test_ollama_context_length():
    assert configs("serve", {"OLLAMA_CONTEXT_LENGTH": "8192"})[0].max_model_len == 8192
    assert configs("serve --max-model-len 2048", {"OLLAMA_CONTEXT_LENGTH": "8192"})[0].max_model_len == 2048


def test_ollama_max_loaded_models():
    assert configs("serve", {"OLLAMA_MAX_LOADED_MODELS": "2"})[1].max_loaded_models == 2
    assert configs("serve --max-loaded-models 1", {"OLLAMA_MAX_LOADED_MODELS": "2"})[1].max_loaded_models == 1
    assert configs("serve", {})[1].max_loaded_models is None


def test_vllm_cpu_kvcache_space():
    assert configs("serve", {"VLLM_CPU_KVCACHE_SPACE": "4"})[0].kv_cache_space == 4.0
    assert configs("serve", {"VLLM_CPU_KVCACHE_SPACE": "0"})[0].kv_cache_space is None   # vLLM's "default"
    assert configs("serve --kv-cache-space 0.5", {"VLLM_CPU_KVCACHE_SPACE": "4"})[0].kv_cache_space == 0.5


def test_vllm_cpu_omp_threads_bind():
    assert configs("serve", {"VLLM_CPU_OMP_THREADS_BIND": "0-3,8"})[0].cpu_threads_bind == "0-3,8"
    assert configs("serve --cpu-threads-bind 1", {"VLLM_CPU_OMP_THREADS_BIND": "0-3"})[0].cpu_threads_bind == "1"
    with pytest.raises(ValueError, match="CPU list"):
        configs("serve", {"VLLM_CPU_OMP_THREADS_BIND": "3-1"})


def test_vllm_logging_level():
    assert configs("serve", {"VLLM_LOGGING_LEVEL": "DEBUG"})[1].log_level == "debug"
    assert configs("serve --log-level WARNING", {"VLLM_LOGGING_LEVEL": "DEBUG"})[1].log_level == "warning"
    assert configs("serve", {})[1].log_level == "info"


def test_vllm_use_modelscope():
    assert configs("serve", {"VLLM_USE_MODELSCOPE": "True"})[0].use_modelscope is True
    assert configs("serve", {"VLLM_USE_MODELSCOPE": "0"})[0].use_modelscope is False
    assert configs("serve --no-use-modelscope", {"VLLM_USE_MODELSCOPE": "1"})[0].use_modelscope is False


def test_pagedserve_use_modelscope():
    assert configs("serve", {"PAGEDSERVE_USE_MODELSCOPE": "1", "VLLM_USE_MODELSCOPE": "0"})[0].use_modelscope


def test_vllm_log_stats_interval():
    assert configs("serve", {"VLLM_LOG_STATS_INTERVAL": "2.5"})[1].log_stats_interval == 2.5
    assert configs("serve", {"VLLM_LOG_STATS_INTERVAL": "-1"})[1].log_stats_interval == 10.0   # as vLLM
    assert configs("serve --log-stats-interval 1", {"VLLM_LOG_STATS_INTERVAL": "5"})[1].log_stats_interval == 1.0


def test_config_file_between_the_environment_and_the_flags(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("port: 9100\nmax_num_seqs: 3\n")
    engine, server = configs(f"serve --config {path}", {"PAGEDSERVE_PORT": "9000", "OLLAMA_NUM_PARALLEL": "7",
                                                          "OLLAMA_CONTEXT_LENGTH": "1024"})
    assert (server.port, engine.max_num_seqs, engine.max_model_len) == (9100, 3, 1024)


def test_the_environment_is_read_once_into_the_config_and_named_in_one_line(caplog):
    from pagedserve.cli.main import build_parser
    from pagedserve.cli.options import environment_line, gather_options

    options = gather_options(build_parser().parse_args("serve --port 1".split()),
                             {"OLLAMA_HOST": "0.0.0.0:11434", "VLLM_API_KEY": "secret", "UNRELATED": "x"})
    line = environment_line(options)
    assert line == "from the environment: OLLAMA_HOST (host), VLLM_API_KEY (api_key)"
    assert "secret" not in line


def test_help_names_the_variable_behind_each_flag():
    result = subprocess.run([sys.executable, "-m", "pagedserve", "serve", "--help"], capture_output=True, text=True,
                            timeout=120, env={"COLUMNS": "2000", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for variable in ENVIRONMENT:
        assert any(line.lstrip().startswith(variable.name) for line in lines), variable.name   # the epilog
        for option in variable.options:
            flag = "--" + option.replace("_", "-")
            starts = [i for i, line in enumerate(lines) if line.lstrip().startswith((flag + " ", flag + ","))]
            assert starts, flag
            end = next((i for i in range(starts[0] + 1, len(lines)) if lines[i].lstrip().startswith("-")), len(lines))
            described = " ".join(lines[starts[0]:end])
            assert variable.name in described, (variable.name, described)
