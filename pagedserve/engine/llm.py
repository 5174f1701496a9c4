"""The offline API: `LLM(model).generate(prompts, params)` and `.chat(messages, params)`."""
from __future__ import annotations

from typing import Any, Sequence as SequenceOf, cast

from tqdm.auto import tqdm

from pagedserve.config import DEFAULT_MODEL, EngineConfig
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.lora import LoRAError, LoRARequest
from pagedserve.engine.processor import ChatOptions, InputProcessor
from pagedserve.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import OutputKind, SamplingParams
from pagedserve.store.models_dir import resolve_named_model


# What vLLM's LLM takes as prompts: a text, token ids, a TextPrompt / TokensPrompt dict, or a list of them.
PromptsArg = str | list[int] | dict[str, Any] | SequenceOf[str | list[int] | dict[str, Any]]


def _prompt_list(prompts: PromptsArg) -> list[str | list[int]]:
    one = isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and bool(prompts)
                                                and isinstance(prompts[0], int))
    return [_prompt(prompt) for prompt in ([prompts] if one else list(cast(SequenceOf[Any], prompts)))]


def _prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return str(prompt["prompt"])
        raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids'; got keys {sorted(prompt)}")
    if isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
        return prompt
    raise ValueError(f"a prompt must be a text, a list of token ids or a prompt dict; got {type(prompt).__name__}")


class LLM:
    """Offline generation: `LLM(model).generate(prompts, params)` and `.chat(messages, params)`."""

    def __init__(self, model: str = DEFAULT_MODEL, **engine_args: Any) -> None:
        """`model`: also the name of a model made with `pagedserve create`, whose PARAMETERs become the
        default sampling params and whose SYSTEM starts each chat."""
        config, model_defaults = resolve_named_model(EngineConfig(model=model, **engine_args))
        self.engine = LLMEngine(config)
        self.processor = InputProcessor.for_engine(self.engine, model_defaults)
        self._next_id = 0

    def shutdown(self) -> None:
        """Stop the model's worker ranks (tensor / pipeline parallel); nothing to do for one rank."""
        self.engine.shutdown()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` uses when given none: the model's defaults (generation_config.json, Modelfile
        PARAMETERs) over SamplingParams' own, as vLLM's LLM does."""
        return self.processor.sampling_defaults.params()

    def generate(self, prompts: PromptsArg,
                 sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
                 use_tqdm: bool = False,
                 lora_request: LoRARequest | SequenceOf[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """`prompts`: text, token ids, vLLM's {"prompt": text} / {"prompt_token_ids": ids}, or a list of
        these. `lora_request`: one adapter for every prompt, or one (or None: the base model) per prompt; each is
        loaded on first use, as vLLM's LLM does."""
        prompt_list = _prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = _params_per_prompt(sampling_params, len(prompt_list))
        loras = self._loras_per_prompt(lora_request, len(prompt_list))
        # NOTE: every prompt is checked before any is queued, so a bad one leaves nothing behind.
        requests = []
        for prompt, params, lora in zip(prompt_list, params_list, loras):
            requests.append(self.processor.process(str(self._next_id), prompt,
                                                   params.replace(output_kind=OutputKind.FINAL_ONLY),
                                                   lora_name=lora.lora_name if lora is not None else None))
            self._next_id += 1
        for request in requests:
            self.engine.add_request(request)
        return self._run([request.request_id for request in requests], use_tqdm)

    def _loras_per_prompt(self, lora_request: LoRARequest | SequenceOf[LoRARequest | None] | None,
                          num_prompts: int) -> list[LoRARequest | None]:
        """One adapter (or None) per prompt, each loaded if it is not yet."""
        loras = list(lora_request) if isinstance(lora_request, SequenceOf) else [lora_request] * num_prompts
        if len(loras) != num_prompts:
            raise ValueError(f"got {len(loras)} lora requests for {num_prompts} prompts")
        for lora in loras:
            if lora is not None:
                self._ensure_lora(lora)
        return loras

    def _ensure_lora(self, lora: LoRARequest) -> None:
        loaded = {adapter.name: adapter for adapter in self.engine.list_loras()}
        adapter = loaded.get(lora.lora_name)
        if adapter is None:
            self.engine.add_lora(lora.lora_name, lora.lora_path)
        elif adapter.path != lora.lora_path:
            raise LoRAError(f"a different adapter is loaded as '{lora.lora_name}' ({adapter.path})")

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        is_one = bool(messages) and isinstance(messages[0], dict)
        conversations = cast(list[list[dict[str, Any]]], [messages] if is_one else messages)
        options = ChatOptions(add_generation_prompt=add_generation_prompt, chat_template=chat_template,
                              chat_template_kwargs=chat_template_kwargs)
        prompts = [self.processor.render_chat(conversation, options).token_ids for conversation in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def embed(self, prompts: PromptsArg,
              pooling_params: PoolingParams | None = None, *, truncate_prompt_tokens: int | None = None,
              use_tqdm: bool = False, lora_request: LoRARequest | SequenceOf[LoRARequest | None] | None = None
              ) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (text or token ids), pooled as the model's config says; needs a model
        served for embeddings (an encoder, or runner="pooling"). `lora_request` as for `generate`."""
        prompt_list = _prompt_list(prompts)
        params = pooling_params or PoolingParams()
        requests = []
        for prompt, lora in zip(prompt_list, self._loras_per_prompt(lora_request, len(prompt_list))):
            requests.append(self.processor.process_pooling(str(self._next_id), prompt, params,
                                                           truncate_prompt_tokens, keep_end=True,
                                                           lora_name=lora.lora_name if lora is not None else None))
            self._next_id += 1
        for request in requests:
            self.engine.add_request(request)
        outputs = self._run([request.request_id for request in requests], use_tqdm)
        return [EmbeddingRequestOutput(output.request_id, output.prompt_token_ids,
                                       EmbeddingOutput(output.embedding or []))
                for output in outputs]

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        progress = tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        results[output.request_id] = output
                        progress.update(1)
                for error in self.engine.take_failures().values():
                    raise error   # one request failed (the engine aborted it): the call fails, as it would have
        except BaseException:
            self.engine.abort_request(request_ids)
            raise
        finally:
            progress.close()
        return [results[request_id] for request_id in request_ids]


def _params_per_prompt(params: SamplingParams | SequenceOf[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return list(params)
