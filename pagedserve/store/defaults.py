"""Sampling defaults, merged in one place, and what a created model (a Modelfile) adds to its checkpoint.

A request's sampling field comes from, in order: the request itself; `--override-generation-config`;
the Modelfile's PARAMETERs; the checkpoint's generation_config.json; the API's own default (OpenAI's
and Ollama's differ); SamplingParams' default. The first three below the request are merged once per
loaded model into `SamplingDefaults`; every path that builds SamplingParams (the OpenAI routes, the
Ollama routes, the terminal chat, the offline `LLM`) asks it with `resolve()`. No torch here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from pagedserve.sampling_params import SamplingParams

# Modelfile PARAMETER -> key of the generation defaults (generation_config.json's names where it has one).
_MODELFILE_KEYS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop", "num_predict": "max_new_tokens",
}
# generation-default key (generation_config.json's spelling) -> SamplingParams field. Other keys of a
# generation_config.json (eos_token_id, do_sample, ...) are not sampling defaults.
GENERATION_TO_SAMPLING = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop", "max_new_tokens": "max_tokens",
}


@dataclass(frozen=True)
class SamplingDefaults:
    """A model's sampling defaults as SamplingParams fields, e.g. {"temperature": 0.6, "max_tokens": 512}."""

    values: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def merge(cls, *layers: Mapping[str, Any] | None) -> SamplingDefaults:
        """Generation-default dicts (generation_config.json's key names), lowest priority first."""
        merged: dict[str, Any] = {}
        for layer in layers:
            for key, value in (layer or {}).items():
                if key in GENERATION_TO_SAMPLING:
                    merged[GENERATION_TO_SAMPLING[key]] = value
        return cls(MappingProxyType(merged))

    def resolve(self, request: Mapping[str, Any], fallbacks: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """SamplingParams keyword arguments: what the request set (None: not set) over these defaults
        over the API's `fallbacks`; fields none of them sets are left to SamplingParams."""
        values = {**(fallbacks or {}), **self.values}
        values.update({name: value for name, value in request.items() if value is not None})
        return values

    def params(self, request: Mapping[str, Any] | None = None, fallbacks: Mapping[str, Any] | None = None
               ) -> SamplingParams:
        return SamplingParams(**self.resolve(request or {}, fallbacks))

    def __bool__(self) -> bool:
        return bool(self.values)


@dataclass(frozen=True)
class ModelDefaults:
    """What a created model adds on top of its checkpoint: sampling defaults, a system prompt and
    opening messages."""

    generation: dict[str, Any] = field(default_factory=dict)   # generation-default keys, e.g. repetition_penalty
    system: str | None = None
    messages: tuple[tuple[str, str], ...] = ()                  # (role, content) opening every chat

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any], system: str | None = None,
                        messages: tuple[tuple[str, str], ...] = ()) -> ModelDefaults:
        """From Modelfile PARAMETERs (Ollama's names); num_ctx is the engine's business, not sampling's."""
        generation = {_MODELFILE_KEYS[name]: value for name, value in parameters.items() if name in _MODELFILE_KEYS}
        if "max_new_tokens" in generation and generation["max_new_tokens"] <= 0:
            generation["max_new_tokens"] = None   # -1 (no limit) and -2 (fill the context)
        if "seed" in generation and generation["seed"] < 0:
            del generation["seed"]                 # Ollama's -1: a random seed
        return cls(generation=generation, system=system, messages=tuple(messages))

    def chat_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The model's opening messages, then the request's; the model's system prompt first unless
        the request starts with its own (as Ollama does)."""
        if not self.system and not self.messages:
            return messages
        combined = [{"role": role, "content": content} for role, content in self.messages] + list(messages)
        if self.system and (not messages or messages[0].get("role") != "system"):
            combined.insert(0, {"role": "system", "content": self.system})
        return combined


def sampling_defaults(generation_config: Mapping[str, Any], model_defaults: ModelDefaults,
                      overrides: Mapping[str, Any] | None = None,
                      use_generation_config: bool = True) -> SamplingDefaults:
    """The one merge of a loaded model's defaults: generation_config.json (unless `use_generation_config`
    is off, vLLM's `--generation-config vllm`) < Modelfile PARAMETERs < `--override-generation-config`."""
    return SamplingDefaults.merge(generation_config if use_generation_config else None, model_defaults.generation,
                                  overrides)
