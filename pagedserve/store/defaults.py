"""What a created model (a Modelfile) adds on top of its checkpoint: sampling defaults, a system prompt
and opening messages. Requests override the sampling defaults field by field. No torch here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedserve.sampling_params import SamplingParams

# Modelfile PARAMETER -> key of the generation defaults (generation_config.json's names where it has one).
_GENERATION_KEYS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop", "num_predict": "max_new_tokens",
}
# generation default key -> SamplingParams field, for the offline LLM API.
_SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                    "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
                    "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop",
                    "max_new_tokens": "max_tokens"}


@dataclass(frozen=True)
class ModelDefaults:
    generation: dict[str, Any] = field(default_factory=dict)   # generation-default keys, e.g. repetition_penalty
    system: str | None = None
    messages: tuple[tuple[str, str], ...] = ()                  # (role, content) opening every chat

    @classmethod
    def from_parameters(cls, parameters: dict[str, Any], system: str | None = None,
                        messages: tuple[tuple[str, str], ...] = ()) -> ModelDefaults:
        """From Modelfile PARAMETERs (Ollama's names); num_ctx is the engine's business, not sampling's."""
        generation = {_GENERATION_KEYS[name]: value for name, value in parameters.items() if name in _GENERATION_KEYS}
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

    def sampling_params(self) -> SamplingParams:
        """SamplingParams with these defaults (the rest SamplingParams' own), for the offline API."""
        values = {_SAMPLING_FIELDS[key]: value for key, value in self.generation.items() if key in _SAMPLING_FIELDS}
        return SamplingParams(**values)
