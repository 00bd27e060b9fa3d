"""Anthropic's Messages API on the gateway (gateway/messages_api.py): what a request becomes on
chat, what it refuses, and its answer, whole and streamed, read back by the official anthropic SDK
(over a transport that answers with our events: the SDK's own parsing and its stream helper's
accumulation of the blocks)."""

from __future__ import annotations

import asyncio
import json

import anthropic
import httpx2
import pytest

from common.errors import BadRequest, ContextLengthExceeded, NotFound, UpstreamError
from gateway.jobs import Limits, chat_jobs, deltas
from gateway.messages_api import AnthropicErrors, MessagesForm, MessagesRequest, count_tokens
from gateway.openai_types import ChatRequest
from gateway.responses import Totals, chat_body
from tests.unit.test_gateway_requests import Replay
from tests.unit.test_responses_api import limits_of, stream_of, tokenizer  # noqa: F401 - a fixture

ADD = {"name": "add", "description": "Adds", "input_schema": {"type": "object", "properties": {
    "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}
CHAT_ADD = {"type": "function", "function": {"name": "add", "parameters": ADD["input_schema"], "description": "Adds"}}
SAID = ('<think>\nThe user wants a sum.\n</think>\n\nLet me add.\n<tool_call>\n{"name": "add", "arguments": '
        '{"a": 1, "b": 2}}\n</tool_call>')


def jobs_of(body: dict, tokenizer, limits: Limits):
    request = MessagesRequest(**{"max_tokens": 32, **body})
    form = MessagesForm(request)
    try:
        return form, chat_jobs(form.as_chat, tokenizer, limits)
    except BadRequest as exc:
        raise request.renamed(exc) from None


def run(job, tokenizer, ids: list[int], cached: int = 0):
    """The deltas of a job whose output is `ids` (the first token's event saying `cached` prompt
    tokens came from the prefix cache), and their totals."""
    class Cached(Replay):
        async def generate(self, request_id, prompt_ids, sampling, prompt_logprobs=None):
            async for event in super().generate(request_id, prompt_ids, sampling, prompt_logprobs):
                yield event.model_copy(update={"cached_tokens": cached}) if event.index == 0 else event

    async def go():
        return [d async for d in deltas(Cached(ids), tokenizer, job)]

    out, totals = asyncio.run(go()), Totals()
    for d in out:
        totals.add(d)
    return out, totals


def sdk(sse: str) -> anthropic.Anthropic:
    """An anthropic client whose every call is answered with `sse`."""
    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=sse.encode())

    return anthropic.Anthropic(base_url="http://test", api_key="x", max_retries=0,
                               http_client=httpx2.Client(transport=httpx2.MockTransport(answer)))


ASK = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "1+2"}]}


def test_a_conversation_of_blocks_is_the_chat_it_stands_for(tokenizer):
    """system blocks; a user's text blocks; an assistant's text, thinking (left out) and tool_use
    blocks (one message with its calls); a user's tool_results (tool messages, in order) and the
    text after them; sampling fields and the tools carry over."""
    limits = limits_of(tokenizer, tool_parser="hermes")
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Add 1 and 2,"},
                                     {"type": "text", "text": "then 3 and 4.",
                                      "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Two sums.", "signature": "abc"},
            {"type": "text", "text": "On it."},
            {"type": "tool_use", "id": "t1", "name": "add", "input": {"a": 1, "b": 2}},
            {"type": "tool_use", "id": "t2", "name": "add", "input": {"a": 3, "b": 4}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "3"},
                                     {"type": "tool_result", "tool_use_id": "t2",
                                      "content": [{"type": "text", "text": "7"}], "is_error": False},
                                     {"type": "text", "text": "Now say both."}]}]
    form, [job] = jobs_of({"model": "m", "system": [{"type": "text", "text": "Be brief."}], "messages": messages,
                           "tools": [ADD], "max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "seed": 7,
                           "stop_sequences": ["END"], "metadata": {"user_id": "u1"}}, tokenizer, limits)
    calls = [{"id": f"t{i}", "type": "function", "function": {"name": "add", "arguments": json.dumps(args)}}
             for i, args in ((1, {"a": 1, "b": 2}), (2, {"a": 3, "b": 4}))]
    chat = ChatRequest(model="m", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 2,\nthen 3 and 4."},
        {"role": "assistant", "content": "On it.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "t1", "content": "3"}, {"role": "tool", "tool_call_id": "t2", "content": "7"},
        {"role": "user", "content": "Now say both."}],
        tools=[CHAT_ADD], max_completion_tokens=9, temperature=0.5, top_p=0.9, top_k=5, seed=7, stop=["END"])
    [expected] = chat_jobs(chat, tokenizer, limits)
    assert job.prompt_ids == expected.prompt_ids
    assert [m.for_template() for m in form.as_chat.messages] == [m.for_template() for m in chat.messages]
    s = job.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (9, 0.5, 0.9, 5, 7)
    assert job.stops == ["END"] and form.as_chat.user == "u1"
    assert job.tools.mode == "auto" and job.tools.names == {"add"}


def test_a_final_assistant_turn_is_continued_and_tool_choice_maps_to_chats(tokenizer):
    limits = limits_of(tokenizer)
    form, [job] = jobs_of({"messages": [{"role": "user", "content": "Name a colour."},
                                        {"role": "assistant", "content": "The colour is"}]}, tokenizer, limits)
    [expected] = chat_jobs(ChatRequest(messages=[{"role": "user", "content": "Name a colour."},
                                                 {"role": "assistant", "content": "The colour is"}],
                                       add_generation_prompt=False, continue_final_message=True), tokenizer, limits)
    assert job.prompt_ids == expected.prompt_ids and form.as_chat.continue_final_message
    assert tokenizer.decode(job.prompt_ids).endswith("The colour is")

    for choice, chat_choice in (({"type": "any"}, "required"), ({"type": "none"}, "none"),
                                ({"type": "tool", "name": "add"}, {"type": "function", "function": {"name": "add"}})):
        form, [job] = jobs_of({**ASK, "tools": [ADD], "tool_choice": choice}, tokenizer, limits)
        assert form.as_chat.tool_choice == chat_choice
        [chat_job] = chat_jobs(ChatRequest(messages=ASK["messages"], tools=[CHAT_ADD], tool_choice=chat_choice),
                               tokenizer, limits)
        assert job.sampling.grammar == chat_job.sampling.grammar
    form, _ = jobs_of({**ASK, "tools": [ADD], "tool_choice": {"type": "any", "disable_parallel_tool_use": True}},
                      tokenizer, limits)
    assert form.as_chat.parallel_tool_calls is False
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    form, [job] = jobs_of({**ASK, "output_config": {"format": {"type": "json_schema", "schema": schema},
                                                    "effort": "low"}}, tokenizer, limits)
    [chat_job] = chat_jobs(ChatRequest(messages=ASK["messages"], response_format={
        "type": "json_schema", "json_schema": {"name": "c", "schema": schema}}), tokenizer, limits)
    assert job.sampling.grammar == chat_job.sampling.grammar != ""
    assert form.as_chat.chat_template_kwargs == {"reasoning_effort": "low", "enable_thinking": False}
    for thinking in ({"type": "disabled"}, None):  # off unless asked, as Anthropic's (Qwen3's template: on)
        form, _ = jobs_of({**ASK, "thinking": thinking}, tokenizer, limits)
        assert form.as_chat.chat_template_kwargs == {"enable_thinking": False}
    form, _ = jobs_of({**ASK, "thinking": {"type": "adaptive"}}, tokenizer, limits)
    assert form.as_chat.chat_template_kwargs == {"enable_thinking": True}
    form, _ = jobs_of({**ASK, "thinking": {"type": "enabled", "budget_tokens": 2048},
                       "chat_template_kwargs": {"enable_thinking": False}}, tokenizer, limits)
    assert form.as_chat.chat_template_kwargs == {"enable_thinking": False}  # the explicit one wins


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": None}, "max_tokens"),
    ({**ASK, "max_tokens": 0}, "max_tokens"),
    ({**ASK, "messages": []}, "messages"),
    ({**ASK, "messages": [{"role": "system", "content": "x"}]}, "messages"),
    ({**ASK, "messages": [{"role": "user"}]}, "messages"),
    ({**ASK, "messages": ["x"]}, "messages"),
    ({**ASK, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages"),
    ({**ASK, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages"),
    ({**ASK, "messages": [{"role": "user", "content": [{"type": "tool_result", "content": "3"}]}]}, "messages"),
    ({**ASK, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {}}]}]}]}, "messages"),
    ({**ASK, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                            "input": "{}"}]}]}, "messages"),
    ({**ASK, "messages": [{"role": "assistant", "content": [{"type": "server_tool_use", "id": "t"}]}]}, "messages"),
    ({**ASK, "system": [{"type": "image"}]}, "system"),
    ({**ASK, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools"),
    ({**ASK, "tools": [{"name": "f"}]}, "tools"),
    ({**ASK, "tools": ["f"]}, "tools"),
    ({**ASK, "tools": [None]}, "tools"),
    ({**ASK, "tools": [5]}, "tools"),
    ({**ASK, "tools": [{"name": "", "input_schema": {}}]}, "tools"),
    ({**ASK, "tools": [ADD], "tool_choice": "auto"}, "tool_choice"),
    ({**ASK, "tools": [ADD], "tool_choice": {"type": "tool"}}, "tool_choice"),
    ({**ASK, "tools": [ADD], "tool_choice": {"type": "any", "disable_parallel_tool_use": "yes"}}, "tool_choice"),
    ({**ASK, "tools": [ADD], "tool_choice": {"type": "tool", "name": "sub"}}, "tool_choice"),
    ({**ASK, "thinking": {"type": "on"}}, "thinking"),
    ({**ASK, "thinking": {"type": "enabled", "budget_tokens": "lots"}}, "thinking"),
    ({**ASK, "metadata": {"user_id": 5}}, "metadata"),
    ({**ASK, "output_config": {"format": {"type": "json_object"}}}, "output_config"),
    ({**ASK, "output_config": {"format": {"type": "json_schema", "schema": "{}"}}}, "output_config"),
    ({**ASK, "output_config": {"effort": "huge"}}, "output_config"),
    ({**ASK, "output_config": {"format": {"type": "json_schema", "schema": {"type": "nonsense"}}}}, "output_config"),
    ({**ASK, "mcp_servers": [{"type": "url", "url": "http://x"}]}, "mcp_servers"),
    ({**ASK, "container": "c1"}, "container"),
    ({**ASK, "temperature": 2.5}, "temperature"),
    ({**ASK, "stop_sequences": ["x" * 600]}, "stop_sequences"),
    ({**ASK, "tools": [{**ADD, "input_schema": {"type": "object", "x": float("nan")}}]}, "tools"),
    ({**ASK, "system": "\ud800"}, "system"),
    ({**ASK, "tools": [{**ADD, "input_schema": {"enum": [1, "\udfff", 1]}}]}, "tools"),
])
def test_what_it_cannot_serve_is_a_400_naming_its_field(tokenizer, body, param):
    with pytest.raises(BadRequest) as info:
        jobs_of(body, tokenizer, limits_of(tokenizer, tool_parser="hermes"))
    assert info.value.param == param, info.value.message


def test_chats_errors_come_back_in_this_apis_names_and_a_wrong_model_is_a_404(tokenizer):
    limits = limits_of(tokenizer)
    with pytest.raises(ContextLengthExceeded) as info:
        jobs_of({**ASK, "max_tokens": 600}, tokenizer, limits)
    assert info.value.param == "max_tokens" and "max_completion_tokens" not in info.value.message
    with pytest.raises(NotFound):
        jobs_of({**ASK, "model": "claude-sonnet-4-5"}, tokenizer, limits)
    with pytest.raises(BadRequest) as info:
        jobs_of({**ASK, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                                   "input": {}}]}]}, tokenizer, limits)
    assert "tool_use" in info.value.message and info.value.param == "messages"


def test_count_tokens_is_the_prompt_a_message_request_is_prefilled_with(tokenizer):
    limits = limits_of(tokenizer, tool_parser="hermes")
    body = {"system": "Be brief.", "messages": [{"role": "user", "content": "1+2"}], "tools": [ADD]}
    _, [job] = jobs_of(body, tokenizer, limits)
    assert count_tokens(MessagesRequest(**body), tokenizer, limits) == {"input_tokens": len(job.prompt_ids)}
    with pytest.raises(BadRequest) as info:  # what /v1/messages refuses, count_tokens refuses too, in its words
        count_tokens(MessagesRequest(messages=[{"role": "system", "content": "x"}]), tokenizer, limits)
    assert info.value.param == "messages" and "'user' or 'assistant'" in info.value.message
    with pytest.raises(BadRequest) as info:  # chat's words renamed where they are this API's fields only
        count_tokens(MessagesRequest(messages=[{"role": "user", "content": "x"}],
                                     chat_template_kwargs={"add_generation_prompt": True}), tokenizer, limits)
    assert info.value.param == "chat_template_kwargs" and "'add_generation_prompt'" in info.value.message


def test_a_calls_arguments_nested_past_what_can_be_written_are_an_empty_input_not_a_500(tokenizer):
    """A model's text is not ours to trust: arguments nested 3000 deep (past Python's parser) or 200
    (past what a tool_use input may be) give input {} in the whole message, and stream as they came
    (the SDK's own accumulator gives up on them past its parser's depth: the client's to judge);
    5 deep is kept, and read back by the SDK's stream helper."""
    limits = limits_of(tokenizer, tool_parser="hermes")
    for depth, kept in ((3000, False), (200, False), (5, True)):
        deep = "[" * depth + "1" + "]" * depth
        for body, said in (({**ASK, "tools": [ADD], "max_tokens": 400},
                            '<tool_call>{"name": "add", "arguments": "{\\"a\\": ' + deep.replace('"', '\\"')
                            + '}"}</tool_call>'),
                           ({**ASK, "tools": [ADD], "tool_choice": {"type": "tool", "name": "add"}, "max_tokens": 400},
                            '{"a": ' + deep + "}")):
            form, [job] = jobs_of(body, tokenizer, limits)
            ids = tokenizer(said, add_special_tokens=False)["input_ids"]
            job.sampling = job.sampling.model_copy(update={"max_tokens": len(ids) + 1})
            out, totals = run(job, tokenizer, ids + [2])
            whole = form.body(job, totals, tokenizer)
            json.dumps(whole)  # it can be written
            [call] = [b for b in whole["content"] if b["type"] == "tool_use"]
            assert (call["input"] != {}) == kept, (depth, call["input"])
            sse = stream_of(form, job, tokenizer, out, totals)
            events = [json.loads(block.split("\ndata: ", 1)[1]) for block in sse.strip().split("\n\n")]
            args = "".join(e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"
                           and e["delta"]["type"] == "input_json_delta")
            assert deep in args and events[-1]["type"] == "message_stop"
            if kept:
                with sdk(sse).messages.stream(**ASK) as stream:
                    assert stream.get_final_message().content[-1].input == call["input"]


def test_thinking_an_answer_and_a_call_stream_as_the_whole_message_says(tokenizer):
    """A thinking block, a text block and a tool_use: streamed, the SDK's stream helper builds the
    message the whole answer is (tool ids aside); stop_reason tool_use; the usage counts the
    prefix cache's tokens apart, as Anthropic's does."""
    limits = limits_of(tokenizer, tool_parser="hermes", reasoning_parser="qwen3")
    ids = tokenizer(SAID, add_special_tokens=False)["input_ids"]
    form, [job] = jobs_of({**ASK, "tools": [ADD], "max_tokens": len(ids) + 1}, tokenizer, limits)
    out, totals = run(job, tokenizer, ids + [2], cached=4)
    whole = form.body(job, totals, tokenizer)
    assert [b["type"] for b in whole["content"]] == ["thinking", "text", "tool_use"]
    thinking, text, call = whole["content"]
    assert thinking == {"type": "thinking", "thinking": "The user wants a sum.", "signature": ""}
    assert text == {"type": "text", "text": "Let me add."}
    assert (call["name"], call["input"]) == ("add", {"a": 1, "b": 2})
    assert (whole["stop_reason"], whole["stop_sequence"]) == ("tool_use", None)
    assert whole["usage"] == {"input_tokens": len(job.prompt_ids) - 4, "cache_creation_input_tokens": 0,
                              "cache_read_input_tokens": 4, "output_tokens": len(ids) + 1}
    assert whole["id"] == f"msg_{job.request_id}" and whole["model"] == "m"

    # what chat's message says of the same output
    message = chat_body(job, totals, tokenizer)["choices"][0]["message"]
    assert thinking["thinking"] == message["reasoning_content"] and text["text"] == message["content"].strip()
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [call["input"]]

    sse = stream_of(form, job, tokenizer, out, totals)
    blocks = sse.strip().split("\n\n")
    events = [json.loads(block.split("\ndata: ", 1)[1]) for block in blocks]
    assert all(block.startswith(f"event: {e['type']}\n") for block, e in zip(blocks, events))
    assert [e["type"] for e in events[:2]] == ["message_start", "ping"]
    assert [e["type"] for e in events[-2:]] == ["message_delta", "message_stop"]
    assert events[0]["message"]["usage"]["cache_read_input_tokens"] == 4

    from anthropic.types import Message, RawMessageStreamEvent
    from pydantic import TypeAdapter

    Message.model_validate(whole)  # strictly as the SDK's own models have them (its client reads leniently)
    for e in events:
        if e["type"] != "ping":  # Anthropic's keep-alive, which the SDK skips (not one of its event types)
            TypeAdapter(RawMessageStreamEvent).validate_python(e)
    with sdk(sse).messages.stream(**ASK) as stream:
        said = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert said == "Let me add."

    def without_ids(m):
        return [{k: v for k, v in b.items() if k != "id"} for b in m["content"]]

    assert without_ids(final.model_dump(exclude_none=True)) == without_ids(whole)
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == len(ids) + 1


def test_stop_reasons_max_tokens_stop_sequence_end_turn_and_an_empty_output(tokenizer):
    limits = limits_of(tokenizer)
    ids = tokenizer("Paris is the capital of France.", add_special_tokens=False)["input_ids"]
    form, [job] = jobs_of({**ASK, "max_tokens": 3}, tokenizer, limits)
    out, totals = run(job, tokenizer, ids[:3])
    whole = form.body(job, totals, tokenizer)
    assert whole["stop_reason"] == "max_tokens"
    assert whole["content"] == [{"type": "text", "text": tokenizer.decode(ids[:3])}]
    events = list(sdk(stream_of(form, job, tokenizer, out, totals)).messages.create(**ASK, stream=True))
    assert events[-2].type == "message_delta" and events[-2].delta.stop_reason == "max_tokens"

    form, [job] = jobs_of({**ASK, "stop_sequences": ["zzz", "capital"]}, tokenizer, limits)
    out, totals = run(job, tokenizer, ids)
    whole = form.body(job, totals, tokenizer)
    assert (whole["stop_reason"], whole["stop_sequence"]) == ("stop_sequence", "capital")
    assert whole["content"][0]["text"] == "Paris is the "
    with sdk(stream_of(form, job, tokenizer, out, totals)).messages.stream(**ASK) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence, final.content[0].text) == ("stop_sequence", "capital",
                                                                                "Paris is the ")

    form, [job] = jobs_of(ASK, tokenizer, limits)
    out, totals = run(job, tokenizer, ids + [2])
    assert (form.body(job, totals, tokenizer)["stop_reason"], totals.stop) == ("end_turn", None)
    out, totals = run(job, tokenizer, [2])  # EOS first: one empty text block, as chat's empty content
    assert form.body(job, totals, tokenizer)["content"] == [{"type": "text", "text": ""}]
    with sdk(stream_of(form, job, tokenizer, out, totals)).messages.stream(**ASK) as stream:
        assert stream.get_final_message().content[0].text == ""


def test_a_failure_mid_stream_is_an_error_event_the_sdk_raises(tokenizer):
    limits = limits_of(tokenizer)
    form, [job] = jobs_of(ASK, tokenizer, limits)
    ids = tokenizer("Paris is", add_special_tokens=False)["input_ids"]
    out, _ = run(job, tokenizer, ids)
    writer = form.writer(job, tokenizer)
    sse = "".join(writer.first(out[0])) + (writer.delta(out[0]) or "") + writer.failed(
        UpstreamError("token service 10.0.0.7:9000 failed"))
    assert "10.0.0.7" not in sse and job.request_id in sse
    with pytest.raises(anthropic.APIStatusError) as info:
        with sdk(sse).messages.stream(**ASK) as stream:
            for _ in stream:
                pass
    assert info.value.body["error"]["type"] == "api_error"


def test_errors_on_the_messages_routes_are_anthropics_body_and_others_stay_openais():
    """AnthropicErrors rewrites an error (any layer's) on /v1/messages*; not a 200, not another route."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    async def fail(request):
        status = int(request.query_params["status"])
        if request.query_params.get("plain"):
            return PlainTextResponse("went wrong", status_code=status)
        return JSONResponse({"error": {"message": "bad", "type": "invalid_request_error", "param": "max_tokens",
                                       "code": None}}, status_code=status, headers={"Retry-After": "3"})

    async def ok(request):
        return JSONResponse({"error": "not one"})

    async def bug(request):
        raise RuntimeError("a bug")

    async def chunked(request):
        async def parts():
            yield b'{"error": {"message": "in '
            yield b'parts", "type": "x", "param": null, "code": null}}'
        return StreamingResponse(parts(), status_code=413, media_type="text/plain")

    app = Starlette(routes=[Route("/v1/messages", fail, methods=["POST"]), Route("/v1/messages/ok", ok),
                            Route("/v1/messages/bug", bug), Route("/v1/messages/chunked", chunked),
                            Route("/v1/chat/completions", fail, methods=["POST"])])
    client = TestClient(AnthropicErrors(app), raise_server_exceptions=False)
    resp = client.get("/v1/messages/bug")  # a bug's 500, in Anthropic's body too
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "api_error" and resp.json()["type"] == "error"
    resp = client.get("/v1/messages/chunked")
    assert resp.json()["error"] == {"message": "in parts", "type": "request_too_large", "param": None, "code": None}
    assert resp.headers["content-type"] == "application/json"
    for status, kind in ((400, "invalid_request_error"), (401, "authentication_error"), (404, "not_found_error"),
                         (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"),
                         (503, "overloaded_error")):
        resp = client.post(f"/v1/messages?status={status}")
        assert resp.status_code == status and resp.headers["retry-after"] == "3"
        assert resp.json() == {"type": "error", "error": {"message": "bad", "type": kind, "param": "max_tokens",
                                                          "code": None}}
    resp = client.post("/v1/messages?status=502&plain=1")
    assert resp.json()["error"] == {"message": "went wrong", "type": "api_error", "param": None, "code": None}
    assert client.get("/v1/messages/ok").json() == {"error": "not one"}
    assert client.post("/v1/chat/completions?status=400").json()["error"]["type"] == "invalid_request_error"
    assert "type" not in client.post("/v1/chat/completions?status=400").json()


def test_the_stop_string_or_token_that_ended_a_request_is_vllms_stop_reason(tokenizer):
    """On completions and chat too: the stop string, or a stop token of the request's; null for EOS."""
    from gateway.jobs import completion_jobs
    from gateway.openai_types import CompletionRequest
    from gateway.responses import ChunkWriter, completion_body

    limits = limits_of(tokenizer)
    ids = tokenizer("a STOP b", add_special_tokens=False)["input_ids"]
    for fields, output, stop in (({"stop": ["STOP"]}, ids, "STOP"), ({"stop_token_ids": [ids[-1]]}, ids, ids[-1]),
                                 ({}, ids + [2], None), ({"stop_token_ids": [2]}, ids + [2], None)):  # EOS first
        [job] = completion_jobs(CompletionRequest(prompt="Hi", max_tokens=8, **fields), tokenizer, limits)
        out, totals = run(job, tokenizer, output)
        assert completion_body(job, totals, tokenizer)["choices"][0]["stop_reason"] == stop
        assert chat_body(job, totals, tokenizer)["choices"][0]["stop_reason"] == stop
        last = json.loads(ChunkWriter(job, tokenizer, chat=False).delta(out[-1])[len("data: "):])
        assert last["choices"][0]["stop_reason"] == stop and last["choices"][0]["finish_reason"] == "stop"
