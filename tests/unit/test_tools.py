"""Tool calling (gateway/tools.py): what `tools` and `tool_choice` ask for, the schema a forced call
is held to, and the reading of an output into content and calls, the same whole or streamed in
any pieces."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from common.errors import BadRequest
from gateway import tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"$ref": "#/$defs/n"}, "b": {"$ref": "#/$defs/n"}},
    "$defs": {"n": {"type": "integer"}}}}}
NOPARAMS = {"type": "function", "function": {"name": "now"}}


def streamed(plan: tools.Plan, text: str, reason: str, rng: random.Random) -> tuple[str, list[dict], str]:
    """What a client assembles from the chunks of `text` cut at random places, as the openai SDK
    does: content concatenated, each call's arguments concatenated by index."""
    reader, content, calls = tools.Reader(plan), "", {}
    cuts = sorted(rng.choices(range(len(text) + 1), k=rng.randint(0, 3 * len(text))))  # empty pieces too
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    outs = [reader.push(p) for p in pieces] + [reader.finish()]
    for c, deltas in outs:
        content += c
        for d in deltas:
            if "id" in d:
                assert d["index"] not in calls and d["type"] == "function"
                calls[d["index"]] = {"id": d["id"], "type": "function", "function": dict(d["function"])}
            else:
                calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
    return content, [calls[i] for i in sorted(calls)], reader.finish_reason(reason)


def same_but_ids(a: list[dict], b: list[dict]) -> bool:
    strip = lambda calls: [{**c, "id": None} for c in calls]  # noqa: E731 - ids are new each reading
    return strip(a) == strip(b)


HERMES = [
    ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
     '{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', "Sure.",
     [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]),
    ('<tool_call>{"name": "now", "arguments": {}}</tool_call>', None, [("now", {})]),
    ('<tool_call>{"name": "now"}', None, [("now", {})]),                           # unclosed at the end
    ('No tools needed: 2 < 3 and <tool_cal is no tag.  ', 'No tools needed: 2 < 3 and <tool_cal is no tag.  ', []),
    ('<tool_call>[{"name": "now", "arguments": {}}, {"name": "add", "arguments": {"a": 2}}]</tool_call>', None,
     [("now", {}), ("add", {"a": 2})]),                                          # a list in one tag (SmolLM2)
    ('<tool_call>{"name": "now", "arguments": {}}</tool_ca', None, [("now", {})]),  # cut inside the closing tag
    ('<tool_call>{"name": ["now"]}</tool_call><tool_call>[{"name": {"a": 1}}]</tool_call>',  # names not strings
     '<tool_call>{"name": ["now"]}</tool_call><tool_call>[{"name": {"a": 1}}]</tool_call>', []),
    ('<tool_call>' + "[" * 5000 + '</tool_call>', '<tool_call>' + "[" * 5000 + '</tool_call>', []),  # nested deep
    ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>',                   # not one of the tools
     '<tool_call>{"name": "nope", "arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "add", "argu', '<tool_call>{"name": "add", "argu', []),  # cut short ("length")
    ('<tool_call>not json</tool_call> then <tool_call>{"name":"now","arguments":{}}</tool_call>',
     "<tool_call>not json</tool_call> then", [("now", {})]),
    ('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>\nDone: it is 3.', "Done: it is 3.",
     [("add", {"a": 1})]),
]


@pytest.mark.parametrize("text, content, calls", HERMES)
def test_hermes_output_reads_into_content_and_calls_alike_whole_or_in_any_pieces(text, content, calls):
    plan = tools.plan([WEATHER, ADD, NOPARAMS], "auto", None)
    got_content, got_calls, reason = tools.read_whole(plan, text, "stop")
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls
    assert reason == ("tool_calls" if calls else "stop")
    assert len({c["id"] for c in got_calls}) == len(calls) and all(c["id"].startswith("call_") for c in got_calls)
    assert tools.read_whole(plan, text, "length")[2] == "length"
    rng = random.Random(len(text))
    for _ in range(30 if len(text) < 1000 else 3):
        c, k, r = streamed(plan, text, "stop", rng)
        assert (c or None if k else c) == got_content and same_but_ids(k, got_calls) and r == reason, (c, k)


def test_parallel_tool_calls_false_keeps_the_first_call():
    plan = tools.plan([WEATHER, ADD], "auto", False)
    content, calls, _ = tools.read_whole(plan, HERMES[0][0], "stop")
    assert content == "Sure." and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert tools.plan([WEATHER, ADD], "required", False).schema()["maxItems"] == 1
    assert "maxItems" not in tools.plan([WEATHER, ADD], "required", True).schema()


def test_required_reads_each_element_of_the_array_and_the_named_call_streams_its_arguments():
    plan = tools.plan([WEATHER, ADD], "required", None)
    text = ' [ {"name": "add", "parameters": {"a": 1, "b": 2}} ,\n{"name":"get_weather","parameters":{"city":"x}, ]"}}]'
    content, calls, reason = tools.read_whole(plan, text, "stop")
    assert content is None and reason == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("add", {"a": 1, "b": 2}), ("get_weather", {"city": "x}, ]"})]
    rng = random.Random(7)
    for _ in range(30):
        c, k, r = streamed(plan, text, "stop", rng)
        assert c == "" and same_but_ids(k, calls) and r == reason
    nested = ('[{"name": "add", "parameters": {"a": 1, "deep": ' + '{"x": [' * 3000 + "]}" * 3000 + '}}, '
              '{"name": "add", "parameters": {"a": 2, "s": "\\"}{]\\\\"}}]')  # escapes, braces in strings
    reader, got = tools.Reader(plan), []
    for i in range(0, len(nested), 3):
        got += reader.push(nested[i:i + 3])[1]
    # nested past what Python's json reads: no call (whole or streamed); the next element is read
    assert [json.loads(c["function"]["arguments"]) for c in got] == [{"a": 2, "s": '"}{]\\'}]
    # cut short before an element was whole: the text as content, as it is
    assert tools.read_whole(plan, ' [{"name": "add", "par', "length") == (' [{"name": "add", "par', [], "length")
    named = tools.plan([WEATHER, ADD], {"type": "function", "function": {"name": "add"}}, None)
    content, calls, reason = tools.read_whole(named, '{"a": 1, "b": 2}', "stop")
    assert content is None and reason == "stop" and len(calls) == 1  # a forced call keeps "stop", as OpenAI's
    assert calls[0]["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    reader = tools.Reader(named)
    first, later = reader.push('{"a"'), reader.push(": 1}")
    assert first == ("", [{"index": 0, "id": first[1][0]["id"], "type": "function",
                           "function": {"name": "add", "arguments": '{"a"'}}])
    assert later == ("", [{"index": 0, "function": {"arguments": ": 1}"}}]) and reader.finish() == ("", [])


def test_the_schemas_a_forced_call_is_held_to():
    named = tools.plan([WEATHER, ADD, NOPARAMS], {"type": "function", "function": {"name": "get_weather"}}, None)
    assert named.schema() == WEATHER["function"]["parameters"]
    assert tools.plan([NOPARAMS], {"type": "function", "function": {"name": "now"}}, None).schema() == {
        "type": "object", "properties": {}}
    required = tools.plan([WEATHER, ADD], "required", None).schema()
    assert required["$defs"] == {"n": {"type": "integer"}}  # hoisted to the root its refs point at
    branches = required["items"]["anyOf"]
    assert [b["properties"]["name"] for b in branches] == [{"type": "string", "enum": ["get_weather"]},
                                                           {"type": "string", "enum": ["add"]}]
    assert "$defs" not in branches[1]["properties"]["parameters"] and "$defs" in ADD["function"]["parameters"]
    clash = {"type": "function", "function": {"name": "sub", "parameters": {"$defs": {"n": {"type": "string"}}}}}
    with pytest.raises(BadRequest, match="differently"):
        tools.plan([ADD, clash], "required", None).schema()
    not_schemas = {"type": "function", "function": {"name": "sub", "parameters": {"$defs": []}}}
    with pytest.raises(BadRequest, match="not an object") as info:
        tools.plan([ADD, not_schemas], "required", None).schema()
    assert info.value.param == "tools"
    old_style = {"type": "function", "function": {"name": "mul", "parameters": {  # pydantic v1, zod-to-json-schema
        "type": "object", "properties": {"x": {"$ref": "#/definitions/X"}}, "definitions": {"X": {"type": "integer"}}}}}
    both = tools.plan([ADD, old_style], "required", None).schema()
    assert both["$defs"] == {"n": {"type": "integer"}} and both["definitions"] == {"X": {"type": "integer"}}
    from common import grammar

    assert grammar.from_request("json", both)  # the refs resolve at the root
    assert tools.plan([WEATHER], "none", None).schema() is None and tools.plan([WEATHER], "auto", None).schema() is None


@pytest.mark.parametrize("given, choice, param", [
    ({"type": "function"}, None, "tools"), ([{"type": "function", "function": {"name": ""}}], None, "tools"),
    ([{"type": "retrieval", "function": {"name": "f"}}], None, "tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], None, "tools"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], None, "tools"),
    ([WEATHER, WEATHER], None, "tools"), ([WEATHER] * 129, None, "tools"),
    ([WEATHER], "sometimes", "tool_choice"), ([WEATHER], {"type": "function", "function": {"name": "add"}}, "tool_choice"),
    ([WEATHER], {"type": "function"}, "tool_choice"), (None, "required", "tool_choice"),
])
def test_malformed_tools_and_choices_are_a_400_naming_the_field(given, choice, param):
    with pytest.raises(BadRequest) as info:
        tools.plan(given, choice, None)
    assert info.value.param == param


def test_defaults_and_message_tool_calls_for_the_template():
    assert tools.plan([WEATHER], None, None).mode == "auto" and tools.plan(None, None, None) is None
    assert tools.plan([], "auto", None) is None and tools.plan([WEATHER], "none", None).mode == "none"
    out = tools.template_messages([{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}},
                                   {"id": "c2", "function": {"name": "now", "arguments": "not json"}}])
    assert out == [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}},
                   {"id": "c2", "type": "function", "function": {"name": "now", "arguments": "not json"}}]
    for bad in ("x", [{"function": {"name": 3}}], [{"function": {"name": "f", "arguments": {"a": 1}}}]):
        with pytest.raises(BadRequest) as info:
            tools.template_messages(bad)
        assert info.value.param == "messages"


def test_auto_reads_hermes_only_where_the_template_writes_json_calls():
    qwen = 'For each function call, return a json object within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": '
    coder = "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>"
    assert tools.parser_for(qwen) == "hermes" and tools.parser_for(coder) == "none"
    assert tools.parser_for("{% for m in messages %}{{ m.content }}{% endfor %}") == "none"
    llama31 = ('Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
               "{{- '<|python_tag|>' + tool_call.name }}")
    assert tools.parser_for(llama31) == "llama3_json" and tools.parser_for(llama31.split(".")[0]) == "llama3_json"
    assert tools.parser_for("{%- if message.tool_calls %}{{- '[TOOL_CALLS][' }}") == "mistral"
    functionary = "{{- '<|python_tag|>' + code }}{{- '<function=' + call.name + '>' }}"  # its own format
    assert tools.parser_for(functionary) == "none"


LLAMA3 = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "now", "parameters": {}}', None,
     [("add", {"a": 1, "b": 2}), ("now", {})]),                                  # parallel calls, after the tag
    ('\n {"name": "now", "arguments": {}}', None, [("now", {})]),                 # leading whitespace, "arguments"
    ('The weather is {"sunny": true}.', 'The weather is {"sunny": true}.', []),  # a call only at the start
    ('{"sunny": true}', '{"sunny": true}', []),                                  # JSON that is no call: text
    ('{"name": "nope", "parameters": {}}', '{"name": "nope", "parameters": {}}', []),  # not one of the tools
    ('{"name": "add", "parameters": {"a": 1', '{"name": "add", "parameters": {"a": 1', []),  # cut short
    ('<|python_ta', '<|python_ta', []),                                            # a tag's start, then the end
    ('<|python_tag|>' + "[" * 5000, '<|python_tag|>' + "[" * 5000, []),           # nested deep
    ('Paris is sunny.', 'Paris is sunny.', []),
    ('\n\n {"sunny": true}', '\n\n {"sunny": true}', []),                    # no call: the text verbatim
    ('\n' * 3000 + 'Hi', '\n' * 3000 + 'Hi', []),                              # long leading whitespace
    ('{"name": "add", "parameters": {"a": ' + "[" * 990 + "]" * 990 + '}}',    # decodes, but would not re-encode
     None, "deep"),
]

MISTRAL = [
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": {}}]', None,
     [("get_weather", {"city": "Paris"}), ("now", {})]),                         # v0.3: a JSON array
    ('Let me look.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]add[ARGS]{"a": 1}', "Let me look.",
     [("get_weather", {"city": "Paris"}), ("add", {"a": 1})]),                   # v11: name[ARGS]{...}
    ('[TOOL_CALLS]nope[ARGS]{}', '[TOOL_CALLS]nope[ARGS]{}', []),                  # not one of the tools
    ('[TOOL_CALLS]add[ARGS]{"a": ', '[TOOL_CALLS]add[ARGS]{"a": ', []),            # cut short
    ('[TOOL_CALLS] not json', '[TOOL_CALLS] not json', []),
    ('No calls [TOOL_CAL', 'No calls [TOOL_CAL', []),                              # a tag's start, then the end
    ('Sunny in Paris.', 'Sunny in Paris.', []),
    ('[TOOL_CALLS]{"name": "now", "arguments": {}}', None, [("now", {})]),        # a bare object: one call
    ('[TOOL_CALLS][{"name": "now", "arguments": {}}][TOOL_CALLS][{"name": "add", "arguments": {"a": 1}}]', None,
     [("now", {}), ("add", {"a": 1})]),                                          # the array form, tag repeated
    ('[TOOL_CALLS][TOOL_CALLS]add[ARGS]{"a": 2}', None, [("add", {"a": 2})]),      # an empty segment
]


@pytest.mark.parametrize("parser, text, content, calls", [("llama3_json", *c) for c in LLAMA3] +
                         [("mistral", *c) for c in MISTRAL])
def test_llama3_json_and_mistral_outputs_read_alike_whole_or_in_any_pieces(parser, text, content, calls):
    """As hermes above: the calls read from a whole output, and the same from its pieces
    streamed at random cuts; an output whose calls do not read as calls to the tools is text."""
    plan = dataclasses.replace(tools.plan([WEATHER, ADD, NOPARAMS], "auto", None), parser=parser)
    if calls == "deep":  # either a call or the text, never a RecursionError out of the reader
        got_content, got_calls, _ = tools.read_whole(plan, text, "stop")
        assert got_content == text if not got_calls else got_content is None
        return
    got_content, got_calls, reason = tools.read_whole(plan, text, "stop")
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls
    assert reason == ("tool_calls" if calls else "stop")
    rng = random.Random(len(text))
    for _ in range(30 if len(text) < 1000 else 3):
        c, k, r = streamed(plan, text, "stop", rng)
        assert (c or None if k else c) == got_content and same_but_ids(k, got_calls) and r == reason, (c, k)
    one = dataclasses.replace(plan, parallel=False)  # parallel_tool_calls false: the first call
    assert [c["function"]["name"] for c in tools.read_whole(one, text, "stop")[1]] == [n for n, _ in calls[:1]]
