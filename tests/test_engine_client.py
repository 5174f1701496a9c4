"""The EngineClient and its step loop (AsyncEngine) with a tiny checkpoint: requests checked before they are
queued, abort and client disconnect free the KV blocks, and an engine failure reaches every open stream
while the loop keeps serving."""
from __future__ import annotations

import asyncio

import pytest

from pagedserve.config import EngineConfig
from pagedserve.engine.async_engine import EngineDeadError, RequestFailedError
from pagedserve.engine.engine_client import EngineClient
from pagedserve.engine.processor import ChatOptions
from pagedserve.sampling_params import OutputKind, SamplingParams
from pagedserve.server.streaming import collect_final


@pytest.fixture(scope="module")
def client(tiny_llama_dir):
    engine_client = EngineClient.start(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=32,
                                                    max_num_batched_tokens=64, max_model_len=256, num_threads=1))
    yield engine_client
    engine_client.shutdown()


def long_params(**changes) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 200, "ignore_eos": True,
                             "output_kind": OutputKind.DELTA, **changes})


async def wait_for(condition, timeout: float = 30.0) -> None:
    """Poll `condition` on the event loop (the engine steps on its own thread) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def all_blocks_free(client: EngineClient) -> bool:
    stats = client.stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_blocks == stats.num_blocks


def test_requests_are_checked_before_anything_is_queued(client):
    async def run():
        with pytest.raises(ValueError, match="maximum context length is 256"):
            await client.generate(list(range(5, 255)), SamplingParams(max_tokens=20))
        with pytest.raises(ValueError, match="token ids must be in") as error:
            await client.generate([1, 10**6], SamplingParams())
        assert error.value.param == "prompt"
        with pytest.raises(ValueError, match="n must be at most"):
            await client.generate("hi", SamplingParams(n=1000))
        with pytest.raises(ValueError, match="the prompt is empty"):
            await client.generate("", SamplingParams(), add_special_tokens=False)
    asyncio.run(run())
    assert all_blocks_free(client)


def test_a_chat_prompt_is_rendered_and_answered(client):
    async def run():
        prompt = await client.render_chat([{"role": "user", "content": "hello"}], ChatOptions())
        assert prompt.text.endswith("<|im_start|>assistant\n") and prompt.token_ids
        assert await client.tokenize(prompt.text, add_special_tokens=False) == prompt.token_ids
        stream = await client.generate(prompt.token_ids, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                                        output_kind=OutputKind.FINAL_ONLY))
        outputs = [output async for output in stream]
        assert len(outputs) == 1 and outputs[0].finished and len(outputs[0].outputs[0].token_ids) == 5
    asyncio.run(run())


def test_abort_frees_the_blocks(client):
    async def run():
        stream = await client.generate("hello world", long_params())
        first = await stream.__anext__()
        assert not first.finished
        assert client.stats().num_running == 1
        stream.abort()
        await wait_for(lambda: all_blocks_free(client))
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
    asyncio.run(run())


class _DisconnectingRequest:
    """What Starlette's Request gives collect_final: `receive()`, answering that the client hung up once
    `hang_up` is set."""

    def __init__(self) -> None:
        self.hang_up = asyncio.Event()

    async def receive(self) -> dict:
        await self.hang_up.wait()
        return {"type": "http.disconnect"}


def test_a_client_that_disconnects_aborts_its_requests(client):
    async def run():
        streams = [await client.generate(prompt, long_params(output_kind=OutputKind.FINAL_ONLY))
                   for prompt in ("one two", "three four")]
        request = _DisconnectingRequest()
        collecting = asyncio.ensure_future(collect_final(streams, request))
        await wait_for(lambda: client.stats().num_running == 2)
        request.hang_up.set()
        assert await collecting is None
        await wait_for(lambda: all_blocks_free(client))
    asyncio.run(run())


def test_an_engine_failure_reaches_every_stream_and_the_loop_goes_on(client, monkeypatch):
    engine = client._core.engine
    failures = []
    real_execute = engine.runner.execute

    def execute_once_failing(*args, **kwargs):
        if not failures:
            failures.append(True)
            raise RuntimeError("injected step failure")
        return real_execute(*args, **kwargs)

    async def run():
        streams = [await client.generate(prompt, long_params()) for prompt in ("alpha", "beta", "gamma")]
        monkeypatch.setattr(engine.runner, "execute", execute_once_failing)
        for stream in streams:
            with pytest.raises(RequestFailedError) as failed:
                async for _ in stream:
                    pass
            assert "injected step failure" in str(failed.value.__cause__)
        await wait_for(lambda: all_blocks_free(client))
        assert client.is_running
        after = await client.generate("delta", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        outputs = [output async for output in after]
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 3
    asyncio.run(run())


def test_a_fault_in_one_requests_output_fails_it_alone(client, monkeypatch):
    from pagedserve.engine import detokenizer

    real_add_token = detokenizer.IncrementalDetokenizer.add_token

    def add_token(self, token_id):
        if "<fault>" in self._stops:
            raise RuntimeError("injected detokenizer failure")
        return real_add_token(self, token_id)

    async def run():
        healthy = await client.generate("alpha", long_params(max_tokens=20))
        faulty = await client.generate("beta", long_params(stop=["<fault>"]))
        monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "add_token", add_token)
        with pytest.raises(RequestFailedError) as failed:
            async for _ in faulty:
                pass
        assert "injected detokenizer failure" in str(failed.value.__cause__)
        outputs = [output async for output in healthy]
        assert outputs[-1].finished and outputs[-1].outputs[0].num_output_tokens == 20
        await wait_for(lambda: all_blocks_free(client))
        assert client.is_running
    asyncio.run(run())


def test_a_dead_loop_fails_every_stream_refuses_requests_and_says_so(tiny_llama_dir):
    deaths: list[BaseException] = []
    dying = EngineClient.start(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=16, max_model_len=128,
                                            num_threads=1), on_dead=deaths.append)
    engine = dying._core.engine

    class Fatal(BaseException):
        pass

    def step():
        raise Fatal("injected")

    async def run():
        stream = await dying.generate("alpha", long_params(max_tokens=50))
        engine.step = step
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        await wait_for(lambda: bool(deaths))
        assert not dying.is_running and isinstance(deaths[0], Fatal)
        with pytest.raises(EngineDeadError):
            await dying.generate("beta", long_params(max_tokens=50))
    try:
        asyncio.run(run())
    finally:
        dying.shutdown()


def test_the_offline_llm_raises_a_requests_failure(tiny_llama_dir, monkeypatch):
    from pagedserve.engine import detokenizer
    from pagedserve.engine.llm import LLM

    def add_token(self, token_id):
        raise RuntimeError("injected detokenizer failure")

    llm = LLM(str(tiny_llama_dir), num_kv_blocks=16, max_model_len=128, num_threads=1)
    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "add_token", add_token)
    with pytest.raises(RuntimeError, match="injected detokenizer failure"):
        llm.generate("alpha", SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished_requests()
