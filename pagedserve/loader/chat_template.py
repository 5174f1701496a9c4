"""Rendering chat messages into a prompt with the model's (or the user's) Jinja chat template."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class NoChatTemplateError(ValueError):
    pass


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flatten OpenAI-style content parts ([{"type": "text", "text": ...}]) into plain strings."""
    normalized = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError("each message must be an object with a 'role'")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if isinstance(part, str):
                    texts.append(part)
                elif isinstance(part, dict) and part.get("type") in ("text", "input_text"):
                    texts.append(str(part.get("text", "")))
                else:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"message content part of type {kind!r} is not supported (text only)")
            content = "\n".join(texts)
        normalized.append({**message, "content": "" if content is None else content})
    return normalized


def render_chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], *,
                       add_generation_prompt: bool = True, continue_final_message: bool = False,
                       chat_template: str | None = None, tools: list[dict] | None = None,
                       chat_template_kwargs: dict[str, Any] | None = None) -> str:
    template = chat_template or tokenizer.chat_template
    if not template:
        raise NoChatTemplateError(
            "this model has no chat template, so chat requests cannot be formatted; use the completions "
            "API, or start the server with --chat-template FILE_OR_STRING")
    kwargs = dict(chat_template_kwargs or {})
    tool_list: list[dict[str, Any] | Callable[..., Any]] | None = list(tools) if tools is not None else None
    try:
        rendered = tokenizer.apply_chat_template(
            normalize_messages(messages), tokenize=False, chat_template=template, tools=tool_list,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message, **kwargs)
    except ValueError:
        raise
    except Exception as error:   # jinja2 raises its own types for template errors and raise_exception()
        raise ValueError(f"chat template failed: {error}") from None
    assert isinstance(rendered, str), "apply_chat_template(tokenize=False) returns text"
    return rendered
