"""Tool-call parsers on outputs as models write them: parsed whole, and streamed split at every character
(and one character at a time), the streamed deltas add up to exactly the whole parse."""
from __future__ import annotations

import json

import pytest

from pagedserve.config.server import TOOL_CALL_PARSERS
from pagedserve.server.tool_parsers import (TOOL_PARSERS, GenericJsonParser, JsonListParser, NamedToolParser,
                                            ToolCallStream, ToolParser, make_parser, parse_tool_calls)

WEATHER = {"city": "Paris", "unit": "celsius"}

# (parser, output, expected content, expected [(name, arguments as a dict)])
RECORDED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     None, [("get_weather", WEATHER)]),
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
               '"celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n'
               '</tool_call>', "Let me check.", [("get_weather", WEATHER), ("get_time", {"tz": "Europe/Paris"})]),
    # a model that stops (EOS) before writing the closing tag
    ("hermes", '<tool_call>\n{"name": "search", "arguments": {"q": "a \\"quoted\\" {brace}"}}',
     None, [("search", {"q": 'a "quoted" {brace}'})]),
    ("hermes", '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},\n'
               '{"name": "get_time", "arguments": {"tz": "UTC"}}\n]</tool_call>',
     None, [("get_weather", WEATHER), ("get_time", {"tz": "UTC"})]),
    ("hermes", "The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    ("hermes", "<tool_call>\nnot json at all\n</tool_call>", "<tool_call>\nnot json at all\n</tool_call>", []),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     None, [("get_weather", WEATHER)]),
    ("llama3_json", '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": [1, 2]}}',
     None, [("a", {"x": 1}), ("b", {"y": [1, 2]})]),
    ("llama3_json", "Paris is in France.", "Paris is in France.", []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
     None, [("get_weather", WEATHER)]),
    ("mistral", 'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}',
     "Sure.", [("get_weather", WEATHER)]),
    ("pythonic", '[get_weather(city="Paris", unit="celsius"), get_time(tz="UTC")]',
     None, [("get_weather", WEATHER), ("get_time", {"tz": "UTC"})]),
    ("pythonic", "[not a call list", "[not a call list", []),
    # the generic format (a template without tools): the grammar makes the answer one of these objects
    ("generic", '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                '{"name": "get_time", "arguments": {"tz": "UTC"}}]}',
     None, [("get_weather", WEATHER), ("get_time", {"tz": "UTC"})]),
    ("generic", '{ "tool_call" : {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}} }',
     None, [("get_weather", WEATHER)]),
    ("generic", '{"response": "It is \\"sunny\\"\\nin Paris \\u00e9\\ud83d\\ude00 \\\\o/"}',
     'It is "sunny"\nin Paris \u00e9\U0001f600 \\o/', []),
    ("generic", '{"response": {"city": "Paris", "tags": ["a}"]}}', '{"city": "Paris", "tags": ["a}"]}', []),
    ("generic", '{"response": 42}', "42", []),
    ("generic", '{"response": "cut short by max_tok', "cut short by max_tok", []),
    ("generic", "no JSON at all", "no JSON at all", []),
]
PARSERS: dict[str, type[ToolParser]] = {**TOOL_PARSERS, "generic": GenericJsonParser}


def test_every_parser_flag_has_a_parser():
    assert set(TOOL_CALL_PARSERS) == set(TOOL_PARSERS)


@pytest.mark.parametrize("parser_name, output, content, expected", RECORDED)
def test_whole_outputs(parser_name, output, content, expected):
    got_content, calls = parse_tool_calls(PARSERS[parser_name](), output)
    assert got_content == content
    assert [(call.name, json.loads(call.arguments)) for call in calls] == expected
    assert len({call.id for call in calls}) == len(calls)


def stream(parser, pieces: list[str]) -> tuple[str, list[dict]]:
    """Feed the pieces; return the content and each call as the deltas built it."""
    parsed = ToolCallStream(parser)
    content = ""
    calls: list[dict] = []
    for number, piece in enumerate(pieces):
        delta = parsed.feed(piece, is_finished=number == len(pieces) - 1)
        content += delta.content
        for item in delta.tool_calls:
            if "id" in item:
                assert item["index"] == len(calls) and item["type"] == "function"
                assert item["function"]["arguments"] == ""
                calls.append({"id": item["id"], "name": item["function"]["name"], "arguments": ""})
            else:
                assert set(item) == {"index", "function"} and set(item["function"]) == {"arguments"}
                calls[item["index"]]["arguments"] += item["function"]["arguments"]
    return content, calls


@pytest.mark.parametrize("parser_name, output, content, expected", RECORDED)
def test_streamed_outputs_split_anywhere_add_up_to_the_whole(parser_name, output, content, expected):
    whole_content, whole_calls = parse_tool_calls(PARSERS[parser_name](), output)
    splits = [[output[:cut], output[cut:]] for cut in range(1, len(output))] + [list(output)]
    for pieces in splits:
        streamed_content, streamed_calls = stream(PARSERS[parser_name](), pieces)
        assert streamed_content.strip() == (whole_content or ""), pieces
        assert [(c["name"], c["arguments"]) for c in streamed_calls] == \
            [(c.name, c.arguments) for c in whole_calls], pieces


def test_arguments_stream_before_the_call_is_complete():
    parsed = ToolCallStream(make_parser("hermes"))
    first = parsed.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', is_finished=False)
    assert [item["function"] for item in first.tool_calls] == [{"name": "get_weather", "arguments": ""},
                                                              {"arguments": '{"city": "Pa'}]
    second = parsed.feed('ris"}}\n</tool_call>', is_finished=True)
    assert second.tool_calls == [{"index": 0, "function": {"arguments": 'ris"}'}}]


def test_required_and_named_outputs():
    content, calls = parse_tool_calls(JsonListParser(), '[{"name": "a", "parameters": {"x": 1}}, '
                                                        '{"name": "b", "parameters": {}}]')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}), ("b", {})]
    content, calls = parse_tool_calls(NamedToolParser("get_weather"), '{"city": "Paris"}')
    assert content is None and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    _, only_first = parse_tool_calls(JsonListParser(), '[{"name": "a", "parameters": {}}, {"name": "b", '
                                                       '"parameters": {}}]', max_calls=1)
    assert [c.name for c in only_first] == ["a"]


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
TOOLS_TEMPLATE = "{% for tool in tools %}{{ tool.function.name }}{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"


def plan(tool_choice=None, template=TOOLS_TEMPLATE, parser="hermes", enabled=True, parallel=None, requested=None):
    from pagedserve.server.tool_parsers.plan import plan_tools

    return plan_tools(HISTORY, [TOOL], tool_choice, parallel, template, parser, enabled, "m", requested)


NO_TOOLS_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


def test_auto_needs_the_flags_as_in_vllm():
    from pagedserve.sampling_params import SamplingParamsError

    with pytest.raises(SamplingParamsError, match="--enable-auto-tool-choice"):
        plan(enabled=False)
    assert plan("required", enabled=False).structured_outputs is not None


def test_a_template_with_tools_gets_them_and_object_arguments():
    tools = plan()
    assert tools.template_tools == [TOOL] and tools.structured_outputs is None
    assert tools.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert type(tools.new_parser()).__name__ == "HermesParser"


def test_a_template_without_tools_gets_the_generic_format_and_history_as_json():
    import jsonschema

    tools = plan(template=NO_TOOLS_TEMPLATE, parser="mistral")
    assert tools.template_tools is None and isinstance(tools.new_parser(), GenericJsonParser)
    system = tools.messages[0]
    assert system["role"] == "system" and '"get_weather"' in system["content"]
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "<city>"}}]}' in system["content"]
    assert '{"response": ' in system["content"]
    assert json.loads(tools.messages[2]["content"]) == {"tool_calls": [{"name": "get_weather",
                                                                       "arguments": {"city": "Paris"}}]}
    assert json.loads(tools.messages[3]["content"]) == {"tool_response": {"content": "21 C"}}
    assert tools.messages[3]["role"] == "user"
    # the grammar's schema admits exactly a call of a known tool with valid arguments, or a response
    schema = tools.structured_outputs.json
    jsonschema.validate({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}, schema)
    jsonschema.validate({"response": "Sunny."}, schema)
    for wrong in ({"tool_calls": [{"name": "nope", "arguments": {"city": "Paris"}}]},
                  {"tool_calls": [{"name": "get_weather", "arguments": {}}]}, {"tool_calls": []}, {"response": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)


def test_generic_required_single_call_named_and_a_json_response_format():
    import jsonschema

    from pagedserve.sampling_params import SamplingParamsError, StructuredOutputsParams

    one = plan("required", template=NO_TOOLS_TEMPLATE, parallel=False)
    system = one.messages[0]["content"]
    assert '{"tool_call": {"name": "get_weather"' in system and '"response"' not in system
    jsonschema.validate({"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                        one.structured_outputs.json)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"response": "no"}, one.structured_outputs.json)
    named = plan({"type": "function", "function": {"name": "get_weather"}}, template=NO_TOOLS_TEMPLATE)
    assert named.structured_outputs.json == one.structured_outputs.json and named.max_calls == 1
    assert isinstance(named.new_parser(), GenericJsonParser)
    answer = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    nested = plan(template=NO_TOOLS_TEMPLATE, requested=StructuredOutputsParams(json=answer))
    jsonschema.validate({"response": {"n": 3}}, nested.structured_outputs.json)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"response": "three"}, nested.structured_outputs.json)
    with pytest.raises(SamplingParamsError, match="only a JSON response_format"):
        plan(template=NO_TOOLS_TEMPLATE, requested=StructuredOutputsParams(regex="a+"))
    with pytest.raises(SamplingParamsError, match="cannot be combined"):
        plan("required", requested=StructuredOutputsParams(json=answer))
    assert plan(requested=StructuredOutputsParams(regex="a+")).structured_outputs.regex == "a+"


def test_required_and_named_are_grammars():
    required = plan("required", parallel=False)
    schema = required.structured_outputs.json
    assert schema["type"] == "array" and schema["maxItems"] == 1
    assert schema["items"]["anyOf"][0]["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    named = plan({"type": "function", "function": {"name": "get_weather"}})
    assert named.structured_outputs.json == TOOL["function"]["parameters"]


def test_server_flags_for_tools_and_template_kwargs():
    from pagedserve.config import ServerConfig

    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        ServerConfig(enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="tool_call_parser must be one of"):
        ServerConfig(tool_call_parser="nope")
    config = ServerConfig(default_chat_template_kwargs='{"enable_thinking": false}')
    assert config.chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(ValueError, match="JSON object"):
        ServerConfig(default_chat_template_kwargs="[1]")


def test_ollama_think():
    from pagedserve.sampling_params import SamplingParamsError
    from pagedserve.server.ollama.protocol import think_options

    qwen3 = "{% if enable_thinking %}<think>{% endif %}"
    assert think_options(None, None, qwen3, "m").template_kwargs is None
    on = think_options(True, None, qwen3, "m")
    assert on.template_kwargs == {"enable_thinking": True} and on.reasoning_parser == "qwen3" and on.show
    off = think_options(False, None, qwen3, "m")
    assert off.template_kwargs == {"enable_thinking": False} and not off.show
    assert think_options("high", "deepseek_r1", None, "m").template_kwargs == {"enable_thinking": True,
                                                                              "reasoning_effort": "high"}
    with pytest.raises(SamplingParamsError, match='"m" does not support thinking'):
        think_options(True, None, "{{ messages }}", "m")
    with pytest.raises(SamplingParamsError, match="invalid think value"):
        think_options("max", None, qwen3, "m")
