"""How one chat request with `tools` is served: what reaches the chat template, which grammar (if any)
forces a call, and which parser reads the calls out of the answer.

  tool_choice auto       the model decides; its text is parsed with --tool-call-parser (vLLM refuses auto
                         without --enable-auto-tool-choice, and so do we)
  tool_choice none       no parsing: the answer is content
  tool_choice required   a grammar makes the answer a JSON list of {"name", "parameters"} (vLLM's form);
                         with parallel_tool_calls false, exactly one
  named function         a grammar makes the answer that function's arguments

A chat template that renders `tools` gets them as they are (assistant tool_calls' arguments as objects,
as templates expect). One without a tools section (SmolLM2's) would drop them silently; there the tools go
into a generic system prompt in the hermes format (llama-server's generic format does the same), earlier
calls and results become text in that format, and the hermes parser reads the answer.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

from pagedserve.sampling_params import SamplingParamsError, StructuredOutputsParams
from pagedserve.server.tool_parsers import JsonListParser, NamedToolParser, ToolParser, make_parser

logger = logging.getLogger(__name__)

GENERIC_PARSER = "hermes"
_GENERIC_PROMPT = (
    "You can call the following tools. To call one, answer with only a tool call in this format (one per call):\n"
    "<tool_call>\n{{\"name\": \"<tool name>\", \"arguments\": <a JSON object of its parameters>}}\n</tool_call>\n"
    "Otherwise, answer normally.\n\nTools:\n{tools}")
_logged: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class ToolPlan:
    messages: list[dict[str, Any]]
    template_tools: list[dict[str, Any]] | None      # what the chat template gets as `tools`
    structured_outputs: StructuredOutputsParams | None
    new_parser: Callable[[], ToolParser] | None      # one parser per choice; None: the answer is content
    max_calls: int | None


def plan_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, tool_choice: Any,
               parallel_tool_calls: bool | None, chat_template: str | None, tool_call_parser: str | None,
               enable_auto_tool_choice: bool, model: str) -> ToolPlan:
    """Raises SamplingParamsError (a 400) for bad tools or a tool_choice this server cannot honour."""
    choice = _tool_choice(tools, tool_choice)
    if not tools:
        return ToolPlan(messages, None, None, None, None)
    check_tools(tools)
    max_calls = 1 if parallel_tool_calls is False else None
    if choice == "auto" and not (enable_auto_tool_choice and tool_call_parser):
        raise SamplingParamsError("tool_choice", '"auto" tool choice requires --enable-auto-tool-choice and '
                                                 '--tool-call-parser to be set')
    uses_template = template_has_tools(chat_template)
    if choice == "none":
        return ToolPlan(template_messages(messages) if uses_template else generic_messages(messages, None),
                        tools if uses_template else None, None, None, None)
    parser_name = tool_call_parser if uses_template and tool_call_parser else GENERIC_PARSER
    _log_once(model, "the chat template renders the tools" if uses_template else
              "the chat template has no tools section: the tools go in a generic system prompt", parser_name)
    messages = template_messages(messages) if uses_template else generic_messages(messages, tools)
    template_tools = tools if uses_template else None
    if choice == "auto":
        return ToolPlan(messages, template_tools, None, lambda: make_parser(parser_name), max_calls)
    if choice == "required":
        return ToolPlan(messages, template_tools, StructuredOutputsParams(json=_required_schema(tools, max_calls)),
                        JsonListParser, max_calls)
    function = _named_function(tools, choice)
    return ToolPlan(messages, template_tools, StructuredOutputsParams(json=_parameters(function)),
                    lambda: NamedToolParser(function["name"]), 1)


def check_tools(tools: list[dict[str, Any]]) -> None:
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise SamplingParamsError("tools", f"tools[{index}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise SamplingParamsError("tools", f"tools[{index}].function has no name")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise SamplingParamsError("tools", f"tools[{index}].function.parameters must be a JSON schema object")


def template_has_tools(chat_template: str | None) -> bool:
    """Whether the template renders `tools` at all (a template that never names them drops them)."""
    return bool(chat_template) and "tools" in str(chat_template)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool_calls with their arguments as objects: templates write them with `| tojson`."""
    converted = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if calls:
            message = {**message, "tool_calls": [_with_object_arguments(call) for call in calls]}
        converted.append(message)
    return converted


def generic_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The conversation for a template without tools: the tool prompt in the system message, earlier calls
    and their results as text in the format the prompt asks for."""
    converted = []
    for message in messages:
        if not isinstance(message, dict):
            converted.append(message)
            continue
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and calls:
            text = "\n".join("<tool_call>\n" + json.dumps(_call_object(call), ensure_ascii=False) + "\n</tool_call>"
                             for call in calls)
            content = message.get("content")
            message = {"role": "assistant", "content": f"{content}\n{text}" if isinstance(content, str) and content
                       else text}
        elif message.get("role") == "tool":
            content = message.get("content")
            message = {"role": "user", "content": "<tool_response>\n" + (content if isinstance(content, str)
                                                                         else json.dumps(content)) + "\n</tool_response>"}
        converted.append(message)
    if tools:
        prompt = _GENERIC_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))
        if converted and isinstance(converted[0], dict) and converted[0].get("role") == "system":
            first = converted[0]
            content = first.get("content")
            converted[0] = {**first, "content": f"{content}\n\n{prompt}" if isinstance(content, str) and content
                            else prompt}
        else:
            converted.insert(0, {"role": "system", "content": prompt})
    return converted


def _tool_choice(tools: list[dict[str, Any]] | None, tool_choice: Any) -> str | dict[str, Any]:
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise SamplingParamsError("tool_choice", f"tool_choice must be auto, none, required or "
                                                     f"{{\"type\": \"function\", ...}}; got {tool_choice!r}")
        if tool_choice == "required" and not tools:
            raise SamplingParamsError("tool_choice", "tool_choice 'required' needs tools")
        return tool_choice
    if isinstance(tool_choice, dict):
        if not tools:
            raise SamplingParamsError("tool_choice", "a named tool_choice needs tools")
        return tool_choice
    raise SamplingParamsError("tool_choice", f"tool_choice must be a string or an object, got {tool_choice!r}")


def _named_function(tools: list[dict[str, Any]], tool_choice: dict[str, Any]) -> dict[str, Any]:
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else tool_choice.get("name")
    for tool in tools:
        if tool["function"]["name"] == name:
            return tool["function"]
    raise SamplingParamsError("tool_choice", f"tool_choice names {name!r}, which is not among the tools")


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def _required_schema(tools: list[dict[str, Any]], max_calls: int | None) -> dict[str, Any]:
    """vLLM's grammar for tool_choice "required": a list of calls, each one tool's name and parameters."""
    options = [{"type": "object", "properties": {"name": {"type": "string", "enum": [tool["function"]["name"]]},
                                                 "parameters": _parameters(tool["function"])},
                "required": ["name", "parameters"], "additionalProperties": False} for tool in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
    if max_calls is not None:
        schema["maxItems"] = max_calls
    return schema


def _call_object(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function", {}) if isinstance(call, dict) else {}
    return {"name": function.get("name"), "arguments": _arguments_object(function.get("arguments"))}


def _with_object_arguments(call: Any) -> Any:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    function = call["function"]
    return {**call, "function": {**function, "arguments": _arguments_object(function.get("arguments"))}}


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments if arguments is not None else {}


def _log_once(model: str, how: str, parser: str) -> None:
    if (model, how) not in _logged:
        _logged.add((model, how))
        logger.info("%s: %s; tool calls are read with the %s parser", model, how, parser)
