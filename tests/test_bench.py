"""`pagedserve bench`: the commands run and report every field (their speed is not asserted here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.bench.datasets import BenchPrompt, make_prompts, random_prompts
from pagedserve.bench.report import summarize
from pagedserve.bench.serve import LoadConfig, RequestResult, _one_request, request_body
from pagedserve.cli.main import build_parser
from pagedserve.loader.source import resolve_model
from pagedserve.loader.tokenizer import load_tokenizer
from tests.server_process import ServerProcess

ROOT = Path(__file__).parent.parent
LATENCY_FIELDS = [f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p99")]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedserve", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("smollm2-135m-instruct"))


def test_random_prompts_are_reproducible_by_seed_and_differ_across_seeds():
    tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    first = random_prompts(tokenizer, 3, 32, 8, seed=1)
    again = random_prompts(tokenizer, 3, 32, 8, seed=1)
    other = random_prompts(tokenizer, 3, 32, 8, seed=2)
    assert [p.text for p in first] == [p.text for p in again]
    assert [p.text for p in first] != [p.text for p in other]
    assert all(len(p.token_ids) == 32 and p.output_len == 8 for p in first)
    assert len({p.text for p in first}) == 3


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["smollm2-135m-instruct", "--served-model-name", "bench-model",
                        "--disable-log-requests"]).running() as process:
        yield process


def test_bench_serve_reports_throughput_and_latencies(server, tmp_path):
    result_file = tmp_path / "result.json"
    done = run_cli("bench", "serve", "--base-url", server.base_url, "--tokenizer", "smollm2-135m-instruct",
                   "--dataset", "random", "--input-len", "16", "--output-len", "8", "--num-prompts", "4",
                   "--max-concurrency", "2", "--ignore-eos", "--seed", "3", "--save-result", str(result_file))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Output token throughput (tok/s):" in done.stdout and "Median TTFT (ms):" in done.stdout
    report = json.loads(result_file.read_text())
    assert report["model"] == "bench-model"                   # found on /v1/models
    assert report["completed"] == 4 and report["failed"] == 0
    assert report["total_output_tokens"] == 4 * 8             # --ignore-eos: every request runs to its length
    assert report["total_input_tokens"] >= 4 * 16 - 4
    assert report["output_throughput"] > 0 and report["request_throughput"] > 0
    for field in LATENCY_FIELDS:
        assert report[field] >= 0, field
    assert report["median_ttft_ms"] > 0 and report["median_e2el_ms"] >= report["median_ttft_ms"]


def test_bench_serve_counts_failures_for_an_unknown_model(server):
    done = run_cli("bench", "serve", "--base-url", server.base_url, "--model", "no-such-model", "--tokenizer",
                   "smollm2-135m-instruct", "--input-len", "8", "--output-len", "4", "--num-prompts", "2")
    assert done.returncode == 1
    assert "Failed requests:                  2" in done.stdout and "HTTP 404" in done.stdout


@pytest.mark.parametrize("command", ["throughput", "latency"])
def test_offline_bench_commands(command, tmp_path):
    output = tmp_path / "out.json"
    extra = ["--iterations", "1"] if command == "latency" else []
    done = run_cli("bench", command, "--model", "smollm2-135m-instruct", "--input-len", "8", "--output-len", "4",
                   "--num-prompts", "2", "--output-json", str(output), *extra)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(output.read_text())
    if command == "throughput":
        assert report["backend"] == "pagedserve" and report["output_tokens"] == 2 * 4
        assert report["output_tokens_per_s"] > 0 and report["requests_per_s"] > 0
    else:
        assert report["batch_size"] == 2 and report["avg_latency_s"] > 0 and report["decode_tokens_per_s"] > 0


def test_a_stream_of_tokens_without_text_still_counts():
    """With --ignore-eos a model may emit only special tokens: empty text, yet tokens that took time."""
    chunks = [{"choices": [{"index": 0, "text": ""}]}] * 3 + [{"choices": [], "usage": {"prompt_tokens": 4,
                                                                                         "completion_tokens": 3}}]
    result, _ = _stream_through_mock(chunks, LoadConfig("http://test", "m", ignore_eos=True))
    assert result.ok and result.output_tokens == 3 and len(result.itls) == 2


# ---- what the requests carry ----------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


def _stream_through_mock(chunks: list[dict], config: LoadConfig, prompt: BenchPrompt | None = None,
                         is_structured: bool = False) -> tuple[RequestResult, dict]:
    """One request against a server that answers with `chunks` as SSE; the result and the body sent."""
    import asyncio

    import httpx

    sent: dict = {}
    body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"

    def answer(request: httpx.Request) -> httpx.Response:
        sent.update(url=str(request.url), body=json.loads(request.content))
        return httpx.Response(200, text=body)

    async def one():
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return await _one_request(client, config, prompt or BenchPrompt([1] * 4, "x", 3), is_structured)

    return asyncio.run(one()), sent


def test_request_bodies_carry_the_schema_as_each_api_names_it():
    prompt = BenchPrompt([1, 2], "question", 7, system="shared system prompt")
    chat = LoadConfig("http://h", "m", endpoint="/v1/chat/completions", ignore_eos=True, json_schema=SCHEMA)
    body = request_body(chat, prompt, is_structured=True)
    assert body["messages"] == [{"role": "system", "content": "shared system prompt"},
                                {"role": "user", "content": "question"}]
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "bench", "schema": SCHEMA, "strict": True}}
    assert body["max_tokens"] == 7 and body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and "prompt" not in body
    assert "response_format" not in request_body(chat, prompt, is_structured=False)

    completions = LoadConfig("http://h", "m", json_schema=SCHEMA)
    body = request_body(completions, prompt, is_structured=True)
    assert body["prompt"] == "shared system prompt\n\nquestion" and "messages" not in body
    assert body["structured_outputs"] == {"json": SCHEMA} and "response_format" not in body
    assert "ignore_eos" not in body
    plain = request_body(LoadConfig("http://h", "m"), BenchPrompt([1], "only", 3), is_structured=True)
    assert plain["prompt"] == "only" and "structured_outputs" not in plain   # no schema: nothing to send


def test_structured_output_ratio_picks_that_share_of_requests_by_seed():
    config = LoadConfig("http://h", "m", json_schema=SCHEMA, structured_output_ratio=0.25, seed=5)
    picked = config.structured_indices(16)
    assert len(picked) == 4 and picked <= set(range(16))
    assert picked == LoadConfig("http://h", "m", json_schema=SCHEMA, structured_output_ratio=0.25,
                                seed=5).structured_indices(16)
    assert LoadConfig("http://h", "m", json_schema=SCHEMA).structured_indices(16) == set(range(16))
    assert LoadConfig("http://h", "m").structured_indices(16) == set()
    with pytest.raises(ValueError, match="structured_output_ratio"):
        LoadConfig("http://h", "m", structured_output_ratio=1.5)


def test_chat_stream_times_the_first_content_not_the_role_announcement():
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              {"choices": [{"index": 0, "delta": {"content": '{"ok"'}}]},
              {"choices": [{"index": 0, "delta": {"content": ": true}"}}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
              {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5}}]
    config = LoadConfig("http://test", "m", endpoint="/v1/chat/completions", json_schema=SCHEMA)
    result, sent = _stream_through_mock(chunks, config, is_structured=True)
    assert sent["url"] == "http://test/v1/chat/completions" and "response_format" in sent["body"]
    assert result.ok and result.text == '{"ok": true}' and result.finish_reason == "stop"
    assert len(result.itls) == 1                       # two chunks with content: one gap between them
    assert result.output_tokens == 5 and result.prompt_tokens == 9   # the server's usage wins
    report = summarize([result], 1.0, 1, float("inf"), SCHEMA)
    assert (report["structured_requests"], report["structured_stopped"], report["structured_valid"]) == (1, 1, 1)


def test_report_counts_how_structured_answers_ended():
    results = [RequestResult(ok=True, output_tokens=8, is_structured=True, finish_reason="stop", text='{"ok": 1}'),
               RequestResult(ok=True, output_tokens=8, is_structured=True, finish_reason="stop", text='{"ok": true}'),
               RequestResult(ok=True, output_tokens=16, is_structured=True, finish_reason="length", text='{"ok'),
               RequestResult(ok=True, output_tokens=16, finish_reason="length", text="free text")]
    report = summarize(results, 2.0, 4, float("inf"), SCHEMA)
    assert report["structured_requests"] == 3 and report["structured_stopped"] == 2
    assert report["structured_valid"] == 1             # 1 is not a boolean
    assert report["total_output_tokens"] == 48 and report["output_throughput"] == 24.0
    assert report["mean_output_tokens"] == 12.0 and report["min_output_tokens"] == 8
    assert report["finish_reasons"] == {"stop": 2, "length": 2}


# ---- datasets -------------------------------------------------------------------------------------

def _shape(*flags: str) -> dict:
    from pagedserve.cli.bench import _dataset_shape

    return _dataset_shape(build_parser().parse_args(["bench", "serve", *flags]))


def _endpoint(*flags: str) -> str:
    from pagedserve.cli.bench import _endpoint_for

    return _endpoint_for(build_parser().parse_args(["bench", "serve", *flags]))


def test_endpoint_from_flag_backend_or_dataset():
    assert _endpoint() == "/v1/completions"
    assert _endpoint("--dataset", "shared-prefix") == "/v1/chat/completions"
    assert _endpoint("--backend", "openai-chat") == "/v1/chat/completions"           # vLLM's spelling
    assert _endpoint("--backend", "vllm", "--dataset", "shared-prefix") == "/v1/completions"
    assert _endpoint("--backend", "openai-chat", "--endpoint", "/v1/completions") == "/v1/completions"


def test_dataset_defaults_and_flags():
    assert _shape() == {"num_prompts": 32, "input_len": 128, "output_len": 128, "prefix_len": 0}
    assert _shape("--dataset", "long-prompt") == {"num_prompts": 8, "input_len": 1500, "output_len": 16,
                                                  "prefix_len": 0}
    assert _shape("--dataset", "shared-prefix") == {"num_prompts": 64, "input_len": 24, "output_len": 32,
                                                    "prefix_len": 1000}
    # vLLM's prefix_repetition spellings
    assert _shape("--dataset-name", "shared-prefix", "--prefix-repetition-prefix-len", "200",
                  "--prefix-repetition-suffix-len", "10", "--num-prompts", "4")["prefix_len"] == 200


def test_long_prompt_prompts_are_long_and_each_different(tokenizer):
    prompts = make_prompts("long-prompt", tokenizer, num_prompts=3, input_len=1500, output_len=16, seed=1)
    assert len({p.text for p in prompts}) == 3 and all(p.system is None for p in prompts)
    for prompt in prompts:
        assert len(prompt.token_ids) == 1500 and prompt.output_len == 16
        assert 1400 <= len(tokenizer.encode(prompt.text)) <= 1600   # the text the server gets is about as long


def test_shared_prefix_prompts_share_one_system_prompt(tokenizer):
    prompts = make_prompts("shared-prefix", tokenizer, num_prompts=64, input_len=24, output_len=32, seed=1,
                           prefix_len=1000)
    assert len(prompts) == 64 and len({p.system for p in prompts}) == 1
    assert len({p.text for p in prompts}) == 64        # a different question each
    assert 900 <= len(tokenizer.encode(prompts[0].system)) <= 1100
    assert all(len(p.token_ids) == 24 and p.output_len == 32 for p in prompts)
    assert prompts[0].messages()[0] == {"role": "system", "content": prompts[0].system}
    other = make_prompts("shared-prefix", tokenizer, num_prompts=2, input_len=24, output_len=32, seed=2,
                         prefix_len=1000)
    assert other[0].system != prompts[0].system        # another seed, another prefix: nothing cached across runs


# ---- end to end against the real server -----------------------------------------------------------

def test_bench_serve_with_a_schema_on_every_request(server, tmp_path):
    """A grammar that completes ends the answer even with --ignore-eos; the report says so and checks it."""
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps({"enum": ["yes", "no"]}))   # no room for whitespace: it always ends
    for endpoint in ("/v1/chat/completions", "/v1/completions"):
        result_file = tmp_path / "structured.json"
        done = run_cli("bench", "serve", "--base-url", server.base_url, "--tokenizer", "smollm2-135m-instruct",
                       "--endpoint", endpoint, "--input-len", "8", "--output-len", "24", "--num-prompts", "3",
                       "--max-concurrency", "3", "--ignore-eos", "--json-schema-path", str(schema_file),
                       "--save-result", str(result_file))
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Structured requests:              3 (3 ended by the grammar, 3 of those valid" in done.stdout
        report = json.loads(result_file.read_text())
        assert report["endpoint"] == endpoint and report["structured_output_ratio"] == 1.0
        assert report["finish_reasons"] == {"stop": 3}
        assert report["total_output_tokens"] < 3 * 24   # shorter than --ignore-eos alone would make them


def test_bench_serve_refuses_a_file_that_is_no_schema(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": 12}')
    done = run_cli("bench", "serve", "--base-url", "http://127.0.0.1:9", "--model", "m", "--json-schema-path",
                   str(bad))
    assert done.returncode != 0 and "--json-schema-path" in done.stderr


def test_bench_serve_shared_prefix_on_the_chat_endpoint(server, tmp_path):
    result_file = tmp_path / "shared.json"
    done = run_cli("bench", "serve", "--base-url", server.base_url, "--tokenizer", "smollm2-135m-instruct",
                   "--dataset", "shared-prefix", "--prefix-len", "64", "--input-len", "8", "--output-len", "4",
                   "--num-prompts", "4", "--max-concurrency", "2", "--ignore-eos", "--save-result", str(result_file))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(result_file.read_text())
    assert report["endpoint"] == "/v1/chat/completions" and report["dataset"] == "shared-prefix"
    assert report["completed"] == 4 and report["total_output_tokens"] == 4 * 4
    assert report["total_input_tokens"] > 4 * (64 + 8)   # the system prompt, the question and the template
    assert report["median_ttft_ms"] > 0


# ---- offline: MoE decode against transformers, embeddings against sentence-transformers ---------------

@pytest.fixture(scope="module")
def small_moe(tmp_path_factory) -> Path:
    """bench/make_moe.py's checkpoint, shrunk to test size (8 experts, top-2 as the real one)."""
    folder = tmp_path_factory.mktemp("bench-moe")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "make_moe.py"), str(folder), "--family", "qwen3_moe",
                           "--hidden-size", "64", "--num-layers", "2", "--expert-size", "32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    # (transformers 5 writes Qwen3-MoE's num_experts as num_local_experts)
    assert config.get("num_experts", config.get("num_local_experts")) == 8 and config["num_experts_per_tok"] == 2
    return folder


@pytest.mark.parametrize("backend", ["pagedserve", "hf"])
def test_moe_decode_latency_on_both_backends(backend, small_moe, tmp_path):
    output = tmp_path / "latency.json"
    done = run_cli("bench", "latency", "--backend", backend, "--model", str(small_moe), "--dtype", "float32",
                   "--input-len", "8", "--output-len", "6", "--num-prompts", "4", "--iterations", "1",
                   "--output-json", str(output))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["backend"] == {"pagedserve": "pagedserve", "hf": "transformers"}[backend]
    assert report["batch_size"] == 4 and report["output_len"] == 6 and report["iterations"] == 1
    assert report["median_latency_s"] > 0 and report["median_prefill_s"] > 0
    assert report["decode_tokens_per_s"] > 0 and report["dtype"] == "float32"   # both backends as asked


@pytest.mark.parametrize("backend", ["pagedserve", "st"])
def test_embed_bench_on_minilm(backend, tmp_path):
    from tests.test_embeddings import minilm_dir

    output = tmp_path / "embed.json"
    done = run_cli("bench", "embed", "--backend", backend, "--model", str(minilm_dir()), "--num-prompts", "8",
                   "--input-len", "16", "--iterations", "1", "--output-json", str(output))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["backend"] == {"pagedserve": "pagedserve", "st": "sentence-transformers"}[backend]
    assert report["num_texts"] == 8 and report["dtype"] == "float32"
    assert report["embeddings_per_s"] > 0 and report["input_tokens"] >= 8 * 16


def test_compare_table_has_a_column_per_workload():
    """bench/compare.py's table: random at each concurrency, the long prompt's and the shared prefix's TTFT."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    options, servers = compare.parse_servers(["--concurrency", "1", "16", "--server", "a", "--", "srv", "--port", "1",
                                              "--server", "b", "--", "other", "--port=2"])
    assert options == ["--concurrency", "1", "16"]
    assert servers == [("a", ["srv", "--port", "1"]), ("b", ["other", "--port=2"])]
    args = argparse.Namespace(concurrency=[1, 16], workloads=["random", "long-prompt", "shared-prefix"],
                              long_prompt_len=1500, shared_prefix_concurrency=16)
    run = {"output_throughput": 50.0, "median_ttft_ms": 120.0, "median_tpot_ms": 11.5}
    rows = [{"name": "a", "random": {1: run, 16: run}, "long-prompt": {**run, "median_ttft_ms": 900.0},
             "shared-prefix": {**run, "median_ttft_ms": 300.0}, "ready_s": 5.0, "peak_rss_gib": 1.25},
            {"name": "b", "error": "not ready"}]
    lines = compare.table(rows, args).splitlines()
    assert "TTFT 1500-tok prompt med (ms)" in lines[0] and "shared-prefix TTFT med @16 (ms)" in lines[0]
    assert lines[2] == "| a | 50.0 | 50.0 | 120 | 120 | 11.5 | 11.5 | 900 | 300 | 5.0 | 1.25 |"
    assert lines[3].count("–") == 10                 # a server that never got ready: every cell empty
