"""How one chat request with `tools` is served: what reaches the chat template, which grammar (if any)
shapes the answer, and which parser reads the calls out of it.

A chat template that renders `tools` gets them as they are (assistant tool_calls' arguments as objects,
as templates expect), and:

  tool_choice auto       the model decides; its text is parsed with --tool-call-parser (vLLM refuses auto
                         without --enable-auto-tool-choice, and so do we)
  tool_choice none       no parsing: the answer is content
  tool_choice required   a grammar makes the answer a JSON list of {"name", "parameters"} (vLLM's form);
                         with parallel_tool_calls false, exactly one
  named function         a grammar makes the answer that function's arguments

A template without a tools section (SmolLM2's) would drop them silently. There we do what llama-server's
generic format does: the tools and the answer's form go into the system message, and a grammar makes the
answer one JSON object, {"tool_calls": [{"name", "arguments"}, ...]} ({"tool_call": {...}} with
parallel_tool_calls false) or, unless a call is required, {"response": "..."}; earlier calls and tool
results become text in that form; a named tool_choice is a single call of that tool in the same form. A
small model that never writes a tool call of its own accord still can here: the grammar makes a call one
of the only two answers it may give.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

from pagedserve.sampling_params import SamplingParamsError, StructuredOutputsParams
from pagedserve.server.tool_parsers import GenericJsonParser, JsonListParser, NamedToolParser, ToolParser, make_parser

logger = logging.getLogger(__name__)

GENERIC_PARSER = "hermes"      # Ollama's parser when the template renders tools and no flag names one
# NOTE: with a concrete example (the first tool's name and parameters) small models pick the call form far
# more often when a request needs it than with an abstract <tool name> placeholder.
_GENERIC_PROMPT = ("You have tools:\n{tools}\n\nIf the user's request needs a tool, answer {example} with the "
                   "tool's name and arguments, and nothing else.{response}")
_GENERIC_RESPONSE = ' If not, answer {"response": "<your reply>"}.'
_logged: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class ToolPlan:
    messages: list[dict[str, Any]]
    template_tools: list[dict[str, Any]] | None      # what the chat template gets as `tools`
    structured_outputs: StructuredOutputsParams | None   # the request's grammar, tools' and its own
    new_parser: Callable[[], ToolParser] | None      # one parser per choice; None: the answer is content
    max_calls: int | None


def plan_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, tool_choice: Any,
               parallel_tool_calls: bool | None, chat_template: str | None, tool_call_parser: str | None,
               enable_auto_tool_choice: bool, model: str,
               structured_outputs: StructuredOutputsParams | None = None) -> ToolPlan:
    """`structured_outputs` is the request's own (response_format, format). Raises SamplingParamsError
    (a 400) for bad tools or a tool_choice this server cannot honour."""
    choice = _tool_choice(tools, tool_choice)
    if not tools:
        return ToolPlan(messages, None, structured_outputs, None, None)
    check_tools(tools)
    max_calls = 1 if parallel_tool_calls is False else None
    if choice == "auto" and not (enable_auto_tool_choice and tool_call_parser):
        raise SamplingParamsError("tool_choice", '"auto" tool choice requires --enable-auto-tool-choice and '
                                                 '--tool-call-parser to be set')
    uses_template = template_has_tools(chat_template)
    if choice == "none":
        return ToolPlan(template_messages(messages) if uses_template else generic_messages(messages, None, max_calls),
                        tools if uses_template else None, structured_outputs, None, None)
    if uses_template:
        parser_name = tool_call_parser or GENERIC_PARSER
        _log_once(model, "the chat template renders the tools", f"the {parser_name} parser")
        messages = template_messages(messages)
        if choice == "auto":
            return ToolPlan(messages, tools, structured_outputs, lambda: make_parser(parser_name), max_calls)
        if choice == "required":
            return ToolPlan(messages, tools, _only(structured_outputs, _required_schema(tools, max_calls)),
                            JsonListParser, max_calls)
        function = _named_tool(tools, choice)["function"]
        return ToolPlan(messages, tools, _only(structured_outputs, _parameters(function)),
                        lambda: NamedToolParser(function["name"]), 1)
    _log_once(model, "the chat template has no tools section: the tools go in a generic system prompt",
              "a JSON grammar (llama-server's generic format)")
    if isinstance(choice, dict):        # one call of that tool, in the form the prompt shows
        only = [_named_tool(tools, choice)]
        return ToolPlan(generic_messages(messages, only, 1, response=False), None,
                        _only(structured_outputs, _generic_calls_schema(only, 1)), GenericJsonParser, 1)
    calls = _generic_calls_schema(tools, max_calls)
    if choice == "required":
        schema = _only(structured_outputs, calls)
    else:
        schema = StructuredOutputsParams(json={"anyOf": [calls, _generic_response_schema(structured_outputs)]})
    return ToolPlan(generic_messages(messages, tools, max_calls, response=choice == "auto"), None, schema,
                    GenericJsonParser, max_calls)


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


def generic_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, max_calls: int | None,
                     response: bool = True) -> list[dict[str, Any]]:
    """The conversation for a template without tools: the tools and the answer's form in the system message,
    earlier calls and their results as JSON text in that form."""
    converted = []
    for message in messages:
        if not isinstance(message, dict):
            converted.append(message)
            continue
        calls = message.get("tool_calls")
        if message.get("role") == "assistant" and calls:
            objects = [_call_object(call) for call in calls]
            text = json.dumps({"tool_call": objects[0]} if max_calls == 1 and len(objects) == 1
                              else {"tool_calls": objects}, ensure_ascii=False)
            message = {"role": "assistant", "content": text}
        elif message.get("role") == "tool":
            content = message.get("content")
            result: dict[str, Any] = {"content": content if isinstance(content, str) else json.dumps(content)}
            name = message.get("name") or message.get("tool_name")
            if isinstance(name, str) and name:
                result = {"name": name, **result}
            message = {"role": "user", "content": json.dumps({"tool_response": result}, ensure_ascii=False)}
        converted.append(message)
    if tools:
        function = tools[0]["function"]
        example_call = {"name": function["name"], "arguments": {
            name: f"<{name}>" for name in (_parameters(function).get("properties") or {})}}
        example = {"tool_call": example_call} if max_calls == 1 else {"tool_calls": [example_call]}
        prompt = _GENERIC_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools),
                                        example=json.dumps(example, ensure_ascii=False),
                                        response=_GENERIC_RESPONSE if response else "")
        if converted and isinstance(converted[0], dict) and converted[0].get("role") == "system":
            first = converted[0]
            content = first.get("content")
            converted[0] = {**first, "content": f"{content}\n\n{prompt}" if isinstance(content, str) and content
                            else prompt}
        else:
            converted.insert(0, {"role": "system", "content": prompt})
    return converted


def _only(requested: StructuredOutputsParams | None, schema: dict[str, Any]) -> StructuredOutputsParams:
    if requested is not None:
        raise SamplingParamsError("tool_choice", "a required or named tool_choice cannot be combined with "
                                                 "response_format or structured_outputs")
    return StructuredOutputsParams(json=schema)


def _call_options(tools: list[dict[str, Any]], arguments_key: str) -> list[dict[str, Any]]:
    """One schema per tool: its name and its parameters under `arguments_key`."""
    return [{"type": "object", "properties": {"name": {"type": "string", "enum": [tool["function"]["name"]]},
                                              arguments_key: _parameters(tool["function"])},
             "required": ["name", arguments_key], "additionalProperties": False} for tool in tools]


def _generic_calls_schema(tools: list[dict[str, Any]], max_calls: int | None) -> dict[str, Any]:
    options = _call_options(tools, "arguments")
    call: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    if max_calls == 1:
        return {"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"],
                "additionalProperties": False}
    return {"type": "object", "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1}},
            "required": ["tool_calls"], "additionalProperties": False}


def _generic_response_schema(requested: StructuredOutputsParams | None) -> dict[str, Any]:
    """{"response": ...}: a string, or what the request's own JSON response_format asks for."""
    value: Any = {"type": "string"}
    if requested is not None:
        if requested.json is not None:
            value = json.loads(requested.json) if isinstance(requested.json, str) else requested.json
        elif requested.json_object:
            value = {"type": "object"}
        else:
            raise SamplingParamsError("structured_outputs", "with tools on a chat template without a tools "
                                                            "section, only a JSON response_format can be combined")
    return {"type": "object", "properties": {"response": value}, "required": ["response"],
            "additionalProperties": False}


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


def _named_tool(tools: list[dict[str, Any]], tool_choice: dict[str, Any]) -> dict[str, Any]:
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else tool_choice.get("name")
    for tool in tools:
        if tool["function"]["name"] == name:
            return tool
    raise SamplingParamsError("tool_choice", f"tool_choice names {name!r}, which is not among the tools")


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def _required_schema(tools: list[dict[str, Any]], max_calls: int | None) -> dict[str, Any]:
    """vLLM's grammar for tool_choice "required": a list of calls, each one tool's name and parameters."""
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": _call_options(tools, "parameters")}}
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


def _log_once(model: str, how: str, reader: str) -> None:
    if (model, how) not in _logged:
        _logged.add((model, how))
        logger.info("%s: %s; tool calls are read with %s", model, how, reader)
