"""Structured output with the real SmolLM2: answers parse as the schema, full-match the regex, are one of
the choices, whatever the sampling method, with n > 1, under preemption, with prefix caching and stop
strings; bad specs are refused before anything is queued; each spec compiles once."""
from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from pagedserve.engine.llm import LLM
from pagedserve.engine.sequence import Sequence
from pagedserve.engine.structured_output import GrammarCompiler, GrammarError, GrammarMatchers
from pagedserve.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputsParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "scores"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a user of a web site as JSON."}]

SAMPLING_METHODS = [
    {"temperature": 0},
    {"temperature": 0.9, "seed": 3},
    {"temperature": 1.0, "top_p": 0.8},
    {"temperature": 1.2, "top_k": 5},
    {"temperature": 1.0, "min_p": 0.1},
    {"temperature": 0.7, "repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.5},
    {"temperature": 0.8, "logit_bias": {90: 5.0}},
]


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    return LLM(str(smollm2_path), max_num_batched_tokens=128, num_kv_blocks=512)


def schema_params(max_tokens: int = 150, **sampling) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, structured_outputs=StructuredOutputsParams(json=PERSON), **sampling)


def test_json_schema_answers_validate_with_every_sampling_method_and_n(llm):
    params = [schema_params(n=2 if index < 2 else 1, **method) for index, method in enumerate(SAMPLING_METHODS)]
    outputs = llm.chat([ASK] * len(SAMPLING_METHODS), params)
    for method, output in zip(SAMPLING_METHODS, outputs):
        for completion in output.outputs:
            assert completion.finish_reason == "stop", (method, completion.text)
            jsonschema.validate(json.loads(completion.text), PERSON)


def test_regex_choice_grammar_and_json_object(llm):
    regex = r"[A-Z][a-z]{2,8} \d{3}-\d{4}"
    choices = ["red", "green", "light blue"]
    specs = [StructuredOutputsParams(regex=regex), StructuredOutputsParams(choice=choices),
             StructuredOutputsParams(grammar='root ::= "(" digit+ ("+" digit+)* ")"\ndigit ::= [0-9]'),
             StructuredOutputsParams(json_object=True)]
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=7, n=2, structured_outputs=spec)
              for spec in specs[:3]]
    params.append(SamplingParams(max_tokens=150, temperature=0, structured_outputs=specs[3]))
    regex_out, choice_out, grammar_out, object_out = llm.chat([ASK] * 4, params)
    for completion in regex_out.outputs:
        assert re.fullmatch(regex, completion.text), completion.text
    for completion in choice_out.outputs:
        assert completion.text in choices
    for completion in grammar_out.outputs:
        assert completion.finish_reason == "length" or re.fullmatch(r"\(\d+(\+\d+)*\)", completion.text)
    object_text = object_out.outputs[0].text
    assert object_text.startswith("{")
    if object_out.outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(object_text), dict)


def test_offline_api_takes_a_plain_dict_like_vllm(llm):
    output = llm.generate("The answer is", SamplingParams(max_tokens=10, structured_outputs={"choice": ["A", "B"]}))
    assert output[0].outputs[0].text in ("A", "B")


def test_preempted_sequences_stay_valid(smollm2_path):
    small = LLM(str(smollm2_path), num_kv_blocks=10, max_model_len=160, max_num_batched_tokens=64)
    outputs = small.chat([ASK] * 3, [schema_params(temperature=0.8, seed=seed, max_tokens=100) for seed in range(3)])
    assert small.engine.scheduler.num_preemptions > 0
    for output in outputs:
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), PERSON)


def test_prefix_cached_prompts_and_stop_strings(llm):
    first = llm.chat(ASK, schema_params(temperature=0))[0]
    again = llm.chat(ASK, schema_params(temperature=0))[0]
    assert again.num_cached_tokens > 0
    assert again.outputs[0].text == first.outputs[0].text
    jsonschema.validate(json.loads(again.outputs[0].text), PERSON)
    # A stop string still ends the answer where it appears (the JSON is then cut, as the user asked).
    stopped = llm.chat(ASK, schema_params(temperature=0, stop=['"age"']))[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.text == first.outputs[0].text.split('"age"')[0]


def test_each_spec_compiles_once(llm):
    grammars = llm.processor.grammars
    spec = StructuredOutputsParams(regex=r"(yes|no) [0-9]")
    before = grammars.num_compiles
    llm.generate(["a", "b", "c", "d"], SamplingParams(max_tokens=5, structured_outputs=spec))
    llm.generate("e", SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(regex=spec.regex)))
    assert grammars.num_compiles == before + 1


@pytest.mark.parametrize("spec, words", [
    ({"json": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "properties/a/type"),
    ({"json": '{"type": '}, "not valid JSON"),
    ({"regex": "[a-"}, "regex"),
    ({"grammar": 'root ::= "a" | '}, "grammar"),
    ({"choice": []}, "choice"),
    ({"regex": "a", "choice": ["a"]}, "exactly one"),
])
def test_bad_specs_are_refused_before_anything_is_queued(llm, spec, words):
    with pytest.raises(SamplingParamsError) as raised:
        llm.generate("hi", SamplingParams(max_tokens=5, structured_outputs=spec))
    assert raised.value.param == "structured_outputs"
    assert words in str(raised.value)
    assert not llm.engine.has_unfinished_requests()


def test_a_compile_that_does_not_finish_in_time_is_refused(llm):
    compiler = GrammarCompiler(llm.get_tokenizer(), llm.engine.model_config.vocab_size, llm.engine.eos_token_ids,
                               timeout_seconds=0.05)
    release = threading.Event()
    compiler._pool.submit(release.wait)      # the compile thread is busy: the grammar cannot be ready in time
    try:
        with pytest.raises(GrammarError, match="did not compile within"):
            compiler.compile(StructuredOutputsParams(regex="[0-9]+"))
    finally:
        release.set()
    compiler.timeout_seconds = 30
    assert compiler.compile(StructuredOutputsParams(regex="[0-9]+")) is not None
    compiler.shutdown()


def test_a_matcher_out_of_step_with_its_tokens_is_rebuilt(llm):
    grammar = llm.processor.grammars.compile(StructuredOutputsParams(regex="[0-9]+x"))
    tokenizer = llm.get_tokenizer()
    seq = Sequence("r", [1, 2, 3], SamplingParams(), max_tokens=10)
    matchers = GrammarMatchers()
    matchers.add(seq.seq_id, grammar)
    for token_id in tokenizer.encode("12", add_special_tokens=False):
        seq.append_token(token_id)      # appended without accept(): as after a state reset
    matcher = matchers.matcher_for(seq)
    assert matchers.num_rebuilds == 1 and matcher is not None
    assert not matcher.accept_token(tokenizer.encode("a", add_special_tokens=False)[0])
    assert matcher.accept_string("3x")


def test_the_grammar_applies_after_the_reasoning_ends(llm):
    """With starts_after (the server sets it to "</think>" for a reasoning model), the text before the
    marker is free and the rest follows the grammar."""
    tokenizer = llm.get_tokenizer()
    grammar = llm.processor.grammars.compile(StructuredOutputsParams(regex="[0-9]+"))
    marker = tuple(tokenizer.encode(" done:", add_special_tokens=False))
    seq = Sequence("r", [1, 2, 3], SamplingParams(), max_tokens=50)
    matchers = GrammarMatchers()
    matchers.add(seq.seq_id, grammar, marker)
    for token_id in tokenizer.encode("I think it is", add_special_tokens=False):
        seq.append_token(token_id)
        assert matchers.matcher_for(seq) is None         # still reasoning: unconstrained
        matchers.accept(seq)
    for token_id in marker:
        seq.append_token(token_id)
    matcher = matchers.matcher_for(seq)
    assert matcher is not None and matchers.num_rebuilds == 0
    seq.append_token(tokenizer.encode("42", add_special_tokens=False)[0])
    matchers.accept(seq)
    assert matchers.matcher_for(seq) is matcher and matchers.num_rebuilds == 0
    assert not matcher.accept_string("x") and matcher.accept_string("7")


def test_structural_tags_in_vllms_form_compile_and_constrain(llm):
    tag = {"structures": [{"begin": "<function=get_weather>", "end": "</function>",
                           "schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                      "required": ["city"]}}],
           "triggers": ["<function="]}
    grammar = llm.processor.grammars.compile(StructuredOutputsParams(structural_tag=tag))
    matchers = GrammarMatchers()
    seq = Sequence("r", [1], SamplingParams(), max_tokens=10)
    matchers.add(seq.seq_id, grammar)
    matcher = matchers.matcher_for(seq)
    assert matcher.accept_string("Let me look. <function=get_weather>")
    assert not matcher.accept_string("nonsense")
    assert matcher.accept_string('{"city": "Paris"}</function>')


def test_a_complete_grammar_ends_the_answer_under_min_tokens_and_ignore_eos(llm):
    for extra in ({"min_tokens": 8}, {"ignore_eos": True}):
        params = SamplingParams(max_tokens=20, temperature=0, structured_outputs={"choice": ["yes", "no"]}, **extra)
        completion = llm.generate("Is the sky blue? Answer:", params)[0].outputs[0]
        assert completion.text in ("yes", "no") and completion.finish_reason == "stop", (extra, completion)
