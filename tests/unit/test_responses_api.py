"""OpenAI's Responses API on the gateway (gateway/responses_api.py): what a request becomes on
chat, what it refuses, and its answer, whole and streamed, read back by the official openai SDK
(over an httpx transport that answers with our events: the SDK's own parsing and its stream
helper's checks of the event order)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from common.errors import BadRequest, ContextLengthExceeded, UpstreamError
from common.model import load_tokenizer
from common.protocol import TopLogprob
from gateway.jobs import Limits, chat_jobs, deltas
from gateway.openai_types import ChatRequest
from gateway.responses import Totals
from gateway.responses_api import ResponsesForm, ResponsesRequest
from tests.unit.test_gateway_requests import Replay

FN = {"type": "function", "name": "add", "description": "Adds", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}


@pytest.fixture(scope="module")
def tokenizer(bundled_path):
    return load_tokenizer(bundled_path)


def limits_of(tokenizer, **fields) -> Limits:
    return Limits(**{"model_name": "m", "max_model_len": 512, "vocab_size": len(tokenizer), "eos_ids": [2],
                     "chat_max_tokens": 64, "max_token_chars": max(map(len, tokenizer.get_vocab())), **fields})


def jobs_of(body: dict, tokenizer, limits: Limits):
    request = ResponsesRequest(**body)
    form = ResponsesForm(request)
    try:
        return form, chat_jobs(form.as_chat, tokenizer, limits)
    except BadRequest as exc:
        raise request.renamed(exc) from None


def test_a_conversation_of_items_is_the_chat_it_stands_for(tokenizer):
    """instructions, messages with text parts, a turn's function calls (one assistant message) and
    their outputs (tool messages); a reasoning item is left out, as chat templates leave it."""
    limits = limits_of(tokenizer, tool_parser="hermes")
    items = [{"role": "user", "content": [{"type": "input_text", "text": "Add 1 and 2,"},
                                          {"type": "input_text", "text": "then 3 and 4."}]},
             {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "On it."}]},
             {"type": "function_call", "call_id": "c1", "name": "add", "arguments": '{"a": 1, "b": 2}'},
             {"type": "function_call", "call_id": "c2", "name": "add", "arguments": '{"a": 3, "b": 4}'},
             {"type": "function_call_output", "call_id": "c1", "output": "3"},
             {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "7"}]}]
    form, [job] = jobs_of({"model": "m", "instructions": "Be brief.", "input": items, "tools": [FN],
                           "max_output_tokens": 9, "temperature": 0.5, "top_p": 0.9, "seed": 7, "top_logprobs": 2},
                          tokenizer, limits)
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "add", "arguments": json.dumps(args)}}
             for i, args in ((1, {"a": 1, "b": 2}), (2, {"a": 3, "b": 4}))]
    chat = ChatRequest(model="m", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 2,\nthen 3 and 4."},
        {"role": "assistant", "content": "On it.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}, {"role": "tool", "tool_call_id": "c2", "content": "7"}],
        tools=[{"type": "function", "function": {k: FN[k] for k in ("name", "description", "parameters")}}],
        max_completion_tokens=9, temperature=0.5, top_p=0.9, seed=7, logprobs=True, top_logprobs=2)
    [expected] = chat_jobs(chat, tokenizer, limits)
    assert job.prompt_ids == expected.prompt_ids
    # the same messages reach the template (SmolLM2's writes no tool calls: compared before it)
    assert [m.for_template() for m in form.as_chat.messages] == [m.for_template() for m in chat.messages]
    s = job.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.logprobs) == (9, 0.5, 0.9, 7, 2)
    assert job.tools.mode == "auto" and job.tools.names == {"add"}
    assert form.head(job, "completed")["tools"] == [FN]  # echoed as given


def test_a_string_input_a_named_tool_and_a_json_format_ask_what_chats_fields_do(tokenizer):
    limits = limits_of(tokenizer)
    _, [named] = jobs_of({"input": "1+2?", "tools": [FN], "tool_choice": {"type": "function", "name": "add"}},
                         tokenizer, limits)
    [chat_named] = chat_jobs(ChatRequest(messages=[{"role": "user", "content": "1+2?"}], tools=[
        {"type": "function", "function": {k: FN[k] for k in ("name", "description", "parameters")}}],
        tool_choice={"type": "function", "function": {"name": "add"}}), tokenizer, limits)
    assert named.tools.mode == "named" and named.sampling.grammar == chat_named.sampling.grammar != ""
    assert named.prompt_ids == chat_named.prompt_ids
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    _, [fmt] = jobs_of({"input": "A city?", "text": {"format": {"type": "json_schema", "name": "c", "schema": schema,
                                                                 "strict": True}}}, tokenizer, limits)
    [chat_fmt] = chat_jobs(ChatRequest(messages=[{"role": "user", "content": "A city?"}], response_format={
        "type": "json_schema", "json_schema": {"name": "c", "schema": schema}}), tokenizer, limits)
    assert fmt.sampling.grammar == chat_fmt.sampling.grammar != ""
    _, [plain] = jobs_of({"input": "A city?", "text": {"format": {"type": "text"}}}, tokenizer, limits)
    assert plain.sampling.grammar == "" and plain.sampling.max_tokens == 64  # the chat default


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
    ({"input": "x", "max_tool_calls": 2}, "max_tool_calls"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "tools": [FN], "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
    ({"input": [{"role": "tool", "content": "3"}]}, "input"),
    ({"input": [{"type": "function_call", "name": "add", "arguments": "{}"}]}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input"),
    ({"input": [7]}, "input"),
    ({"input": [{"type": "computer_call"}]}, "input"),
    ({"input": ""}, "input"),
    ({}, "input"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "c"}}}, "text"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text"),
    ({"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "top_logprobs": 21}, "top_logprobs"),
    ({"input": "x", "temperature": 2.5}, "temperature"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "tools": [{"type": "function", "name": ""}]}, "tools"),
    ({"input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "x": float("nan")}}]},
     "tools"),
    # a lone surrogate anywhere, in a list that looks like token ids too: these come back in the response
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"enum": [1, "\ud800", 1]}}]}, "tools"),
    ({"input": "x", "tools": [FN], "tool_choice": {"type": "function", "name": "add", "x": [1, "\udfff", 2]}},
     "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "\ud800", "schema": {}}}}, "text"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": 5, "schema": {}}}}, "text"),
    ({"input": "x", "tools": [{"type": "function", "function": {"name": "add"}}]}, "tools"),  # chat's nested form
    ({"input": "x", "metadata": {"k": "v" * 513}}, "metadata"),
])
def test_what_it_cannot_serve_is_a_400_naming_its_field(tokenizer, body, param):
    with pytest.raises(BadRequest) as info:
        jobs_of(body, tokenizer, limits_of(tokenizer, tool_parser="hermes"))
    assert info.value.param == param, info.value.message


def test_chats_errors_come_back_in_this_apis_names(tokenizer):
    limits = limits_of(tokenizer)
    with pytest.raises(ContextLengthExceeded) as info:
        jobs_of({"input": "Hi", "max_output_tokens": 600}, tokenizer, limits)
    assert info.value.param == "max_output_tokens" and "lower max_output_tokens" in info.value.message
    assert "max_tokens" not in info.value.message
    with pytest.raises(ContextLengthExceeded) as info:
        jobs_of({"input": "word " * 600}, tokenizer, limits)
    assert info.value.param == "input"


SAID = ('<think>\nThe user wants a sum.\n</think>\n\nLet me add.\n<tool_call>\n{"name": "add", "arguments": '
        '{"a": 1, "b": 2}}\n</tool_call>')


class Scored(Replay):
    """A router that answers with given tokens, each with a logprob (-0.5) and itself as the top one."""

    async def generate(self, request_id, prompt_ids, sampling, prompt_logprobs=None):
        async for event in super().generate(request_id, prompt_ids, sampling, prompt_logprobs):
            yield event.model_copy(update={"logprob": -0.5,
                                           "top_logprobs": [TopLogprob(token_id=event.token_id, logprob=-0.5)]})


def run(form: ResponsesForm, job, tokenizer, ids: list[int]):
    """The deltas of a job whose output is `ids`, and their totals."""
    async def go():
        return [d async for d in deltas(Scored(ids), tokenizer, job)]

    out, totals = asyncio.run(go()), Totals()
    for d in out:
        totals.add(d)
    return out, totals


def stream_of(form: ResponsesForm, job, tokenizer, out, totals) -> str:
    writer = form.writer(job, tokenizer)
    text = "".join(writer.first(out[0])) + "".join(writer.delta(d) or "" for d in out)
    return text + writer.end(totals) + writer.done()


def sdk(sse: str) -> openai.OpenAI:
    """An openai client whose every call is answered with `sse`."""
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=sse.encode())

    return openai.OpenAI(base_url="http://test/v1", api_key="x", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(answer)))


def test_thinking_an_answer_and_a_call_stream_as_the_whole_response_says(tokenizer):
    """A reasoning item, a message and a function call: streamed, the events' deltas add up to the
    items, the SDK's stream helper accepts their order and ends with the response the whole answer
    is (ids aside), and the thinking's tokens are counted as reasoning tokens."""
    limits = limits_of(tokenizer, tool_parser="hermes", reasoning_parser="qwen3")
    ids = tokenizer(SAID, add_special_tokens=False)["input_ids"]
    form, [job] = jobs_of({"input": "1+2", "tools": [FN], "max_output_tokens": len(ids) + 1}, tokenizer, limits)
    out, totals = run(form, job, tokenizer, ids + [2])
    whole = form.body(job, totals, tokenizer)
    assert whole["status"] == "completed" and whole["incomplete_details"] is None
    kinds = [item["type"] for item in whole["output"]]
    assert kinds == ["reasoning", "message", "function_call"]
    reasoning_item, message, call = whole["output"]
    assert reasoning_item["content"] == [{"type": "reasoning_text", "text": "The user wants a sum."}]
    assert message["content"][0]["text"] == "Let me add." and message["status"] == "completed"
    assert (call["name"], json.loads(call["arguments"])) == ("add", {"a": 1, "b": 2})
    assert call["call_id"].startswith("call_") and call["id"].startswith("fc_")
    think_end = next(i for i in range(len(ids)) if "</think>" in tokenizer.decode(ids[:i + 1]))
    usage = whole["usage"]
    assert usage["output_tokens_details"]["reasoning_tokens"] == think_end + 1
    assert (usage["input_tokens"], usage["output_tokens"]) == (len(job.prompt_ids), len(ids) + 1)

    sse = stream_of(form, job, tokenizer, out, totals)
    events = [json.loads(block.split("\ndata: ", 1)[1]) for block in sse.strip().split("\n\n")]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert all(block.startswith(f"event: {e['type']}\n") for block, e in zip(sse.strip().split("\n\n"), events))
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    said = {kind: "".join(e["delta"] for e in events if e["type"] == kind) for kind in (
        "response.reasoning_text.delta", "response.output_text.delta", "response.function_call_arguments.delta")}
    assert said == {"response.reasoning_text.delta": "The user wants a sum.",
                    "response.output_text.delta": "Let me add.",
                    "response.function_call_arguments.delta": call["arguments"]}
    final = events[-1]["response"]

    def without_ids(r):
        return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in r["output"]]

    assert without_ids(final) == without_ids(whole) and final["usage"] == whole["usage"]

    # strictly as the SDK's own models have them (its client reads leniently)
    from pydantic import TypeAdapter
    from openai.types.responses import Response, ResponseStreamEvent

    Response.model_validate(whole)
    for e in events:
        TypeAdapter(ResponseStreamEvent).validate_python(e)
    with sdk(sse).responses.stream(model="m", input="1+2") as stream:
        seen = [e.type for e in stream]
        response = stream.get_final_response()
    assert seen[0] == "response.created" and seen[-1] == "response.completed"
    assert response.output_text == "Let me add." and response.usage.output_tokens_details.reasoning_tokens == think_end + 1
    assert [o.type for o in response.output] == kinds and response.output[2].arguments == call["arguments"]


def test_an_answer_cut_by_max_output_tokens_is_incomplete_whole_and_streamed(tokenizer):
    limits = limits_of(tokenizer)
    ids = tokenizer("Paris is the capital of France.", add_special_tokens=False)["input_ids"]
    form, [job] = jobs_of({"input": "Capital?", "max_output_tokens": 3, "top_logprobs": 1}, tokenizer, limits)
    out, totals = run(form, job, tokenizer, ids[:3])
    whole = form.body(job, totals, tokenizer)
    assert whole["status"] == "incomplete" and whole["incomplete_details"] == {"reason": "max_output_tokens"}
    [message] = whole["output"]
    assert message["status"] == "incomplete" and message["content"][0]["text"] == tokenizer.decode(ids[:3])
    assert [p["token"] for p in message["content"][0]["logprobs"]] == [tokenizer.decode([t]) for t in ids[:3]]
    sse = stream_of(form, job, tokenizer, out, totals)
    assert sse.rstrip().rsplit("\n\n", 1)[-1].startswith("event: response.incomplete\n")
    events = list(sdk(sse).responses.create(model="m", input="Capital?", stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == tokenizer.decode(ids[:3])
    assert sum(len(e.logprobs) for e in events if e.type == "response.output_text.delta") == 3


def test_an_output_with_no_text_is_one_empty_message_and_a_failure_a_failed_response(tokenizer):
    limits = limits_of(tokenizer)
    form, [job] = jobs_of({"input": "Hi", "stream": True}, tokenizer, limits)
    out, totals = run(form, job, tokenizer, [2])  # EOS first
    whole = form.body(job, totals, tokenizer)
    assert [(o["type"], o["content"][0]["text"]) for o in whole["output"]] == [("message", "")]
    sse = stream_of(form, job, tokenizer, out, totals)
    with sdk(sse).responses.stream(model="m", input="Hi") as stream:
        assert stream.get_final_response().output_text == ""
    writer = form.writer(job, tokenizer)
    failed = writer.failed(UpstreamError("token service 10.0.0.7:9000 failed"))
    event = json.loads(failed.split("\ndata: ", 1)[1])
    assert event["type"] == "response.failed" and event["response"]["status"] == "failed"
    assert "10.0.0.7" not in failed and job.request_id in event["response"]["error"]["message"]


def test_the_response_says_what_chat_says_of_the_same_output(tokenizer):
    """Thinking, answer and calls: the Responses items hold what chat's message does for the same
    tokens (reasoning_content, content, tool_calls)."""
    from gateway.responses import chat_body

    limits = limits_of(tokenizer, tool_parser="hermes", reasoning_parser="qwen3")
    ids = tokenizer(SAID + "\nThat is all.", add_special_tokens=False)["input_ids"]
    form, [job] = jobs_of({"input": "1+2", "tools": [FN]}, tokenizer, limits)
    _, totals = run(form, job, tokenizer, ids + [2])
    message = chat_body(job, totals, tokenizer)["choices"][0]["message"]
    items = form.body(job, totals, tokenizer)["output"]
    assert [i["type"] for i in items] == ["reasoning", "message", "function_call", "message"]
    assert items[0]["content"][0]["text"] == message["reasoning_content"]
    assert items[1]["content"][0]["text"] + items[3]["content"][0]["text"] == message["content"].replace("\n", "")
    assert [(items[2]["name"], items[2]["arguments"])] == [(c["function"]["name"], c["function"]["arguments"])
                                                           for c in message["tool_calls"]]


def test_a_messages_logprobs_are_its_own_tokens_and_a_cut_call_is_incomplete(tokenizer):
    """With thinking and a call around it, a message's logprobs are those of the tokens whose text
    it shows; a named call cut by max_output_tokens is an incomplete item in an incomplete
    response; a failure mid-stream reads back through the SDK as response.failed."""
    limits = limits_of(tokenizer, tool_parser="hermes", reasoning_parser="qwen3")
    ids = tokenizer(SAID, add_special_tokens=False)["input_ids"]
    form, [job] = jobs_of({"input": "1+2", "tools": [FN], "top_logprobs": 1}, tokenizer, limits)
    _, totals = run(form, job, tokenizer, ids + [2])
    [message] = [i for i in form.body(job, totals, tokenizer)["output"] if i["type"] == "message"]
    part = message["content"][0]
    assert "".join(p["token"] for p in part["logprobs"]).strip() == part["text"] == "Let me add."

    form, [job] = jobs_of({"input": "1+2", "tools": [FN], "tool_choice": {"type": "function", "name": "add"},
                           "max_output_tokens": 4}, tokenizer, limits)
    cut = tokenizer('{"a": 1, "b": 2}', add_special_tokens=False)["input_ids"][:4]
    out, totals = run(form, job, tokenizer, cut)
    whole = form.body(job, totals, tokenizer)
    [call] = whole["output"]
    assert whole["status"] == "incomplete" and call["status"] == "incomplete"
    assert call["arguments"] == tokenizer.decode(cut)

    writer = form.writer(job, tokenizer)
    sse = "".join(writer.first(out[0])) + (writer.delta(out[0]) or "") + writer.failed(UpstreamError("gone"))
    events = list(sdk(sse).responses.create(model="m", input="1+2", stream=True))
    assert events[-1].type == "response.failed" and events[-1].response.error.code == "server_error"


def test_a_response_that_goes_on_from_a_stored_one_is_the_chat_of_the_whole_conversation(tokenizer):
    """previous_response_id: the earlier items (its input and output: a reasoning item left out,
    a message's logprobs dropped, a function call) come before this turn's input; the earlier
    instructions do not carry over (OpenAI's), this request's do."""
    limits = limits_of(tokenizer, tool_parser="hermes")
    first = ResponsesRequest(input="Add 1 and 2.", instructions="Think first.")
    output = [{"id": "rs_1", "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}],
               "status": "completed"},
              {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": "On it.", "annotations": [], "logprobs": []}]},
              {"id": "fc_1", "type": "function_call", "call_id": "c1", "name": "add", "arguments": '{"a": 1, "b": 2}',
               "status": "completed"}]
    earlier = first.turn([], output)  # what the store keeps of the first response
    request = ResponsesRequest(input=[{"type": "function_call_output", "call_id": "c1", "output": "3"}],
                               instructions="Be brief.", previous_response_id="resp_x", tools=[FN])
    form = ResponsesForm(request, earlier=earlier)
    chat = ChatRequest(messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 2."},
        {"role": "assistant", "content": "On it.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}],
        tools=[{"type": "function", "function": {k: FN[k] for k in ("name", "description", "parameters")}}])
    assert [m.for_template() for m in form.as_chat.messages] == [m.for_template() for m in chat.messages]
    [job], [expected] = chat_jobs(form.as_chat, tokenizer, limits), chat_jobs(chat, tokenizer, limits)
    assert job.prompt_ids == expected.prompt_ids
    assert form.head(job, "completed")["previous_response_id"] == "resp_x"
    assert form.head(job, "completed")["store"] is False  # no store given: nothing kept
    with pytest.raises(BadRequest) as info:  # without a store: what it goes on from cannot be known
        ResponsesForm(request)
    assert info.value.param == "previous_response_id"


def test_the_store_keeps_a_response_for_its_ttl_and_its_owner_and_says_404_and_503_plainly(redis_server):
    """Real Redis: put, get, delete; a record past its TTL is gone; an id never stored, or too
    long to be one, or another key's, or another cluster's, is a 404 naming the field; Redis down
    is a 503, not a 500."""
    from common import metadata
    from common.errors import NotFound, Unavailable
    from gateway.responses_api import ResponseStore

    async def go():
        redis = metadata.connect(redis_server.url)
        store = ResponseStore(redis, ttl_s=0.3, cluster="c1")
        await store.put({"id": "resp_a", "output": []}, [{"type": "message"}], [{"role": "user"}], owner="k1")
        record = await store.get("resp_a", owner="k1")
        assert record == {"response": {"id": "resp_a", "output": []}, "input": [{"type": "message"}],
                          "history": [{"role": "user"}], "owner": "k1"}
        for other in (ResponseStore(redis, 60, cluster="c2").get("resp_a", owner="k1"), store.get("resp_a"),
                      store.get("resp_a", owner="k2"), store.delete("resp_a", owner="k2")):
            with pytest.raises(NotFound):
                await other
        await asyncio.sleep(0.5)
        with pytest.raises(NotFound) as info:
            await store.get("resp_a", "previous_response_id", owner="k1")
        assert info.value.param == "previous_response_id" and info.value.status == 404
        await ResponseStore(redis, 60, cluster="c1").put({"id": "resp_b", "output": []}, [], [])
        await store.delete("resp_b")
        for missing in ("resp_b", "x" * 10_000):
            with pytest.raises(NotFound):
                await store.get(missing)
            with pytest.raises(NotFound):
                await store.delete(missing)
        assert not ResponseStore(redis, 0).enabled
        assert not await redis.keys("dejavu:response:*")  # nothing left behind
        await redis.aclose()
        down = metadata.connect("redis://127.0.0.1:1/0")
        with pytest.raises(Unavailable):
            await ResponseStore(down, 60).get("resp_a")
        # keeping a response with Redis down costs the keeping, not the answer
        form = ResponsesForm(ResponsesRequest(input="Hi"), ResponseStore(down, 60))
        await form.keep({"id": "resp_c", "output": []})
        await down.aclose()

    asyncio.run(go())


def test_a_kept_history_is_what_the_model_saw_and_input_items_page_as_openais():
    """The history kept is chat's messages of the conversation (thinking, logprobs and fields
    chat does not read left out), so a conversation of junk cannot grow the record past what its
    prompts held; input_items: newest first by default, a limit, after an id, has_more."""
    from gateway.responses_api import ResponseStore, _listed

    request = ResponsesRequest(input=[{"type": "message", "role": "user", "content": "Hi", "junk": "x" * 100_000},
                                      {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "y" * 100_000}]}])
    output = [{"id": "rs_1", "type": "reasoning", "content": [{"type": "reasoning_text", "text": "hm"}]},
              {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": "Hello.", "annotations": [], "logprobs": [{"x": 1}]}]},
              {"id": "fc_1", "type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]
    earlier = [{"role": "user", "content": "Before."}, {"role": "assistant", "content": "Yes."}]
    history = request.turn(earlier, output)
    assert history == earlier + [{"role": "user", "content": "Hi"}, {
        "role": "assistant", "content": "Hello.",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    assert len(json.dumps(history)) < 1000

    # a turn whose input starts with a call: joined to the stored conversation's last answer, in a
    # copy, as the same conversation sent whole in `input` reads
    stored = ResponsesRequest(input="Go.").turn([], [{"type": "message", "role": "assistant",
                                                     "content": [{"type": "output_text", "text": "a"}]}])
    calls = [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "ok"}]
    continued = ResponsesRequest(input=calls)._messages(stored)
    whole = ResponsesRequest(input=[{"role": "user", "content": "Go."}, {"type": "message", "role": "assistant",
                                                                       "content": "a"}] + calls)._messages([])
    assert continued == whole and continued[1]["tool_calls"][0]["id"] == "c1"
    assert "tool_calls" not in stored[1]  # the stored conversation as it was

    items = [_listed({"type": "message", "role": "user", "content": str(i)}) for i in range(5)]
    page = ResponseStore.listed(items, "desc", 2, None)
    assert [i["content"][0]["text"] for i in page["data"]] == ["4", "3"] and page["has_more"]
    page = ResponseStore.listed(items, "desc", 2, page["last_id"])
    assert [i["content"][0]["text"] for i in page["data"]] == ["2", "1"] and page["has_more"]
    page = ResponseStore.listed(items, "asc", 20, items[2]["id"])
    assert [i["content"][0]["text"] for i in page["data"]] == ["3", "4"] and not page["has_more"]
    assert page["first_id"] == items[3]["id"] and page["last_id"] == items[4]["id"]
    assert _listed({"type": "function_call", "id": "mine"})["id"] == "mine"
    for bad in (("up", 2, None), ("asc", 0, None), ("asc", 2, "no-such-id")):
        with pytest.raises(BadRequest):
            ResponseStore.listed(items, *bad)


def test_a_streamed_response_is_kept_before_the_event_that_ends_it(tokenizer, redis_server):
    """serving._stream awaits the form's keep before it yields the last event: a client that sends its
    next turn on response.completed finds the response stored."""
    from types import SimpleNamespace

    from common import metadata
    from gateway.serving import _stream

    limits = limits_of(tokenizer)
    form, [job] = jobs_of({"input": "Capital?", "max_output_tokens": 3, "stream": True}, tokenizer, limits)
    ids = tokenizer("Paris is the capital.", add_special_tokens=False)["input_ids"][:3]

    async def go():
        redis = metadata.connect(redis_server.url)
        app = SimpleNamespace(state=SimpleNamespace(active={job.request_id: job},
                                                    store=metadata.RequestStore(redis)))
        gen = deltas(Scored(ids), tokenizer, job)
        first = await anext(gen)
        sent, kept_at = [], []

        async def keep(response):
            kept_at.append((len(sent), response["status"]))

        async for event in _stream(app, job, gen, first, form.writer(job, tokenizer), keep):
            sent.append(event)
        await redis.aclose()
        return sent, kept_at

    sent, kept_at = asyncio.run(go())
    [(before, status)] = kept_at
    assert status == "incomplete" and sent[-1].startswith("event: response.incomplete")
    assert before < len(sent) and all(not e.startswith("event: response.incomplete") for e in sent[:before])
