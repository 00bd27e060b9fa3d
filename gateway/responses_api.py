"""OpenAI's Responses API (POST /v1/responses), served by the chat machinery.

A request is translated into a chat request (`ResponsesRequest.chat_request`): `instructions` is
a system message; `input` a user message (a string) or a list of items: messages (text parts),
`function_call` items (an assistant's tool calls) and `function_call_output` items (a tool's
answer); reasoning items are dropped (chat templates drop earlier turns' thinking).
`max_output_tokens`, `temperature`, `top_p`, function `tools` (flat, as the Responses API writes
them), `tool_choice`, `parallel_tool_calls`, `text.format` (structured output), `top_logprobs`
and `reasoning.effort` (the chat template's `reasoning_effort`) carry over, with vLLM's sampling
extensions (`seed`, `top_k`, `min_p`, penalties, `ignore_eos`, `min_tokens`,
`chat_template_kwargs`). The answer is the same text, thinking and tool calls as chat's, as output
items: a `reasoning` item, a `message` with one `output_text`, `function_call` items.

Responses are stored, as OpenAI's, in Redis for --responses-ttl-s (an hour by default;
`ResponseStore`), unless a request says `store: false`: `previous_response_id` goes on from one
(its conversation's items, input and output, before this turn's input; its instructions not
carried over, as OpenAI's), GET /v1/responses/{id} and /input_items read one, DELETE drops it. A
response is kept before the client has the end of it, so the next turn finds it. With the store
off (0), `previous_response_id` is refused and `store` answered false. `conversation` (OpenAI's
Conversations API) and `item_reference` inputs are refused: send the items. Hosted tools (web
search, files, code), images, background mode and automatic truncation are refused too. Accepted
with nothing more to do: `include` values other than message.output_text.logprobs (they are
about hosted tools, or encrypted reasoning), `reasoning.summary` (no summaries are written: the reasoning
item has the thinking itself), a tool's `strict` (calls are read from the model's text, as chat's).

Streamed, the events are OpenAI's (`event:` and `data:` lines, a `sequence_number` each):
response.created, response.in_progress, then for each output item its output_item.added,
content_part.added, ...delta events, ...done events, content_part.done, output_item.done, and at
the end response.completed (or response.incomplete where max_output_tokens cut it short, or
response.failed where serving failed). The final response equals the whole answer's.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from redis.exceptions import RedisError

from common.errors import BadRequest, DejavuError, NotFound, Unavailable
from common.metadata import PREFIX
from gateway import tools
from gateway.jobs import Delta, Job
from gateway.openai_types import MAX_LOGPROBS, ChatRequest, TranslatedBody
from gateway.responses import ChatSplit, Totals, cached_tokens, chat_logprobs, replayed

Number = StrictFloat | StrictInt
TEXT_PARTS = ("input_text", "output_text", "text")
# chat's names in its errors, and what this API calls them
_RENAMED = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
           "response_format": "text", "logprobs": "top_logprobs"}
log = logging.getLogger(__name__)
NOT_STORED = ("responses are not stored on this server (--responses-ttl-s 0): send the whole conversation in "
              "'input' (earlier turns' messages, function calls and their outputs)")


class ResponsesRequest(TranslatedBody):
    """The body of POST /v1/responses. Unknown fields are ignored, as elsewhere."""

    RENAMED = _RENAMED
    MAX_TOKENS = ("max_(?:completion_)?tokens", "max_output_tokens")  # "lower max_completion_tokens", and max_tokens
    model: StrictStr | None = None
    input: StrictStr | list[Any] | None = None
    instructions: StrictStr | None = None
    max_output_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_logprobs: StrictInt | None = None
    include: list[StrictStr] | None = None
    stream: StrictBool = False
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    text: dict | None = None
    reasoning: dict | None = None
    metadata: dict[StrictStr, StrictStr] | None = None
    user: StrictStr | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    truncation: StrictStr | None = None
    # refused unless unset (see the module's docstring)
    previous_response_id: StrictStr | None = None
    conversation: Any = None
    background: StrictBool | None = None
    prompt: Any = None
    max_tool_calls: StrictInt | None = None

    def chat_request(self, earlier: list | None = None) -> ChatRequest:
        """The same request on chat, after the `earlier` items of the response it continues (its
        previous_response_id's: ResponseStore); a 400 naming this API's field for anything it
        cannot be."""
        if self.previous_response_id is not None and earlier is None:
            raise BadRequest(f"'previous_response_id': {NOT_STORED}", "previous_response_id")
        for name, why in (("conversation", "conversations are not kept on this server (no Conversations API): send "
                                           "the earlier turns in 'input', or continue a stored response with "
                                           "'previous_response_id'"),
                          ("prompt", "reusable prompts are not stored on this server: send the text in 'input'"),
                          ("max_tool_calls", "not supported: limit the calls with 'parallel_tool_calls' false (one "
                                             "call at most)")):
            if getattr(self, name) is not None:
                raise BadRequest(f"'{name}': {why}", name)
        if self.background:
            raise BadRequest("'background': not supported; stream the response instead", "background")
        if self.truncation not in (None, "disabled"):
            raise BadRequest(f"'truncation' = {self.truncation[:40]!r}: only 'disabled' is supported (a conversation "
                             "longer than the context is a 400)", "truncation")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise BadRequest(f"'max_output_tokens' = {self.max_output_tokens}: must be at least 1", "max_output_tokens")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise BadRequest(f"'top_logprobs' = {self.top_logprobs}: must be between 0 and {MAX_LOGPROBS}", "top_logprobs")
        if self.metadata is not None and (len(self.metadata) > 16 or any(
                len(k) > 64 or len(v) > 512 for k, v in self.metadata.items())):
            raise BadRequest("'metadata' holds at most 16 keys of at most 64 characters, each value at most 512",
                             "metadata")
        body: dict[str, Any] = {"model": self.model, "messages": self._messages(earlier or []), "stream": self.stream,
                                "max_completion_tokens": self.max_output_tokens, "user": self.user,
                                "temperature": self.temperature, "top_p": self.top_p,
                                **self.extensions()}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.logprobs_wanted:
            body |= {"logprobs": True, "top_logprobs": self.top_logprobs or 0}
        if self.tools:
            body["tools"] = [_chat_tool(i, t) for i, t in enumerate(self.tools)]
        if self.tool_choice is not None:
            body["tool_choice"] = _chat_tool_choice(self.tool_choice)
        if self.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = self.parallel_tool_calls
        if (fmt := self._format()) is not None:
            body["response_format"] = fmt
        if (effort := self._effort()) is not None:
            body["chat_template_kwargs"] = {"reasoning_effort": effort, **(self.chat_template_kwargs or {})}
        try:
            return ChatRequest(**body)
        except ValidationError as exc:  # the items made messages chat cannot take
            raise BadRequest(f"'input' is not a conversation this server can read: {exc.errors()[0]['msg']}",
                             "input") from None

    @property
    def logprobs_wanted(self) -> bool:
        return self.top_logprobs is not None or "message.output_text.logprobs" in (self.include or [])

    def items(self) -> list:
        """This turn's input as items (a string: one user message)."""
        if self.input is None or self.input == "" or self.input == []:
            raise BadRequest("'input' is required: a string, or a list of messages and items", "input")
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return self.input

    def _messages(self, earlier: list[dict]) -> list[dict]:
        """Chat's messages: the instructions (not an earlier response's: OpenAI's), the earlier
        conversation's messages (ResponseStore's history), this turn's items'."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return _as_messages(self.items(), messages + earlier)

    def turn(self, earlier: list[dict], output: list) -> list[dict]:
        """The conversation's messages through this turn: `earlier`, this turn's input, its output
        items (chat's messages as the model saw them: no thinking, no field chat does not read)."""
        return _as_messages([_without_logprobs(item) for item in output], _as_messages(self.items(), list(earlier)),
                            join_before=False)  # the output is a new assistant turn

    def _format(self) -> dict | None:
        """text.format as chat's response_format."""
        text = self.text or {}
        fmt = text.get("format")
        if fmt is None:
            return None
        if not isinstance(fmt, dict):
            raise BadRequest("'text.format' must be {'type': 'text'}, {'type': 'json_object'} or {'type': "
                             "'json_schema', 'name': ..., 'schema': {...}}", "text")
        kind = fmt.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "json_object"}
        if kind == "json_schema":
            if not isinstance(fmt.get("name", ""), str):
                raise BadRequest("'text.format.name' must be a string", "text")
            if not isinstance(fmt.get("schema"), dict):
                raise BadRequest("'text.format' of type json_schema needs 'schema': a JSON schema (an object)", "text")
            return {"type": "json_schema", "json_schema": {"name": fmt.get("name") or "output", "schema": fmt["schema"]}}
        raise BadRequest(f"'text.format' type {str(kind)[:40]!r}: must be 'text', 'json_object' or 'json_schema'", "text")

    def _effort(self) -> str | None:
        if self.reasoning is None:
            return None
        effort = self.reasoning.get("effort")
        if effort is not None and effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
            raise BadRequest(f"'reasoning.effort' = {str(effort)[:40]!r}: must be none, minimal, low, medium, high or "
                             "xhigh", "reasoning")
        return effort


def _as_messages(items: list, messages: list[dict], join_before: bool = True) -> list[dict]:
    """`messages` with the items' after them (function calls joined to the assistant's message
    before them, one of `messages` too where `join_before`: a continued conversation reads as the
    same one sent whole, a copy joined, the stored one left as it is); a 400 naming input[i] for
    an item chat cannot take."""
    first = len(messages)
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest(f"input[{i}] must be an object: a message ({{'role': ..., 'content': ...}}) or an "
                             "item", "input")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(i, item))
        elif kind == "function_call":
            call = {"id": _string(i, item, "call_id"), "type": "function",
                    "function": {"name": _string(i, item, "name"), "arguments": _string(i, item, "arguments")}}
            last = messages[-1] if messages and (join_before or len(messages) > first) else None
            if last is not None and last["role"] == "assistant" and (last.get("tool_calls") or not last["content"]
                                                                     or last.get("calls_may_follow")
                                                                     or len(messages) == first):
                if len(messages) == first:  # the earlier conversation's: joined in a copy
                    messages[-1] = last = {**last, "tool_calls": list(last.get("tool_calls") or [])}
                last.setdefault("tool_calls", []).append(call)  # a turn's calls in one assistant message
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _parts_text(i, output) if isinstance(output, list) else None
            if text is None:
                raise BadRequest(f"input[{i}] (function_call_output) needs 'output': a string or text parts", "input")
            messages.append({"role": "tool", "tool_call_id": _string(i, item, "call_id"), "content": text})
        elif kind == "reasoning":  # an earlier turn's thinking: chat templates leave it out of the prompt
            continue
        elif kind == "item_reference":
            raise BadRequest(f"input[{i}]: item references are not supported: send the item itself, or go on "
                             "from a stored response with 'previous_response_id'", "input")
        else:
            raise BadRequest(f"input[{i}]: items of type {str(kind)[:40]!r} are not supported (message, "
                             "function_call, function_call_output and reasoning are)", "input")
    for m in messages[first:]:
        m.pop("calls_may_follow", None)
    return messages


def _message(i: int, item: dict) -> dict:
    role, content = item.get("role"), item.get("content")
    if role not in ("user", "system", "developer", "assistant"):
        raise BadRequest(f"input[{i}] has role {str(role)[:40]!r}: must be user, system, developer or assistant "
                         "(a tool's answer is a function_call_output item)", "input")
    text = content if isinstance(content, str) else _parts_text(i, content) if isinstance(content, list) else None
    if text is None:
        raise BadRequest(f"input[{i}] ({role}) needs 'content': a string or a list of text parts", "input")
    return {"role": role, "content": text} | ({"calls_may_follow": True} if role == "assistant" else {})


def _parts_text(i: int, parts: list) -> str:
    out = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal" and isinstance(part.get("refusal"), str):
            out.append(part["refusal"])
        elif kind in TEXT_PARTS and isinstance(part.get("text"), str):
            out.append(part["text"])
        else:
            raise BadRequest(f"input[{i}] has a content part of type {str(kind)[:40]!r}: this model reads text only "
                             "({'type': 'input_text', 'text': ...})", "input")
    return "\n".join(out)  # as chat's text parts (ChatMessage.text)


def _string(i: int, item: dict, key: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"input[{i}] ({item.get('type')}) needs '{key}': a string", "input")
    return value


def _chat_tool(i: int, tool) -> dict:
    """A Responses function tool ({"type": "function", "name", "description", "parameters",
    "strict"}: flat, not chat's {"function": {...}}) as chat's."""
    kind = tool.get("type") if isinstance(tool, dict) else None
    if kind != "function":
        raise BadRequest(f"tools[{i}] has type {str(kind)[:40]!r}: only 'function' tools are supported (this server "
                         "runs no hosted tools)", "tools")
    name = tool.get("name")
    if "function" in tool or not isinstance(name, str) or not 0 < len(name) <= tools.MAX_NAME_CHARS:
        raise BadRequest(f"tools[{i}] must be {{'type': 'function', 'name': ..., 'parameters': {{...}}}} (this API's "
                         f"flat form), its name a string of 1 to {tools.MAX_NAME_CHARS} characters", "tools")
    return {"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters") if k in tool}}


def _chat_tool_choice(choice):
    if choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise BadRequest("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}",
                     "tool_choice")


ITEM_IDS = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def _listed(item: dict) -> dict:
    """An input item as input_items lists it: with an id (its own, if it has one); a message's
    text as parts."""
    kind = item.get("type", "message")
    listed = {"id": _new_id(ITEM_IDS.get(kind, "item")), **item, "type": kind}
    if kind == "message" and isinstance(item.get("content"), str):
        part = "output_text" if item.get("role") == "assistant" else "input_text"
        listed |= {"status": "completed", "content": [{"type": part, "text": item["content"]}]}
    return listed


def _without_logprobs(item: dict) -> dict:
    """An output item as a later turn's input: its text parts without their logprobs."""
    if item.get("type") != "message":
        return item
    return {**item, "content": [{k: v for k, v in part.items() if k != "logprobs"} for part in item["content"]]}


class ResponseStore:
    """Responses kept in Redis for `ttl_s` (OpenAI's `store`, --responses-ttl-s): a request with
    previous_response_id goes on from one, GET /v1/responses/{id} reads it, DELETE drops it. One
    JSON value a response, under this cluster's name (`cluster`: gateways of other clusters on the
    same Redis see none of it): the response, this turn's input items (as input_items lists them),
    the conversation's messages through this turn's output (`history`: chat's messages as the
    model saw them, which a request going on from it is prefixed with), and its owner: a digest of
    the API key it was made with (none without keys), the only key that may read, go on from or
    delete it (another's gets a 404, as for one never stored)."""

    MAX_ID_CHARS = 128
    MAX_RECORD_BYTES = 16 << 20  # a record past this is not kept (a history is bounded by the context anyway)

    def __init__(self, redis, ttl_s: float, cluster: str = ""):
        self.redis, self.ttl_s, self.cluster = redis, ttl_s, cluster

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    def _key(self, response_id: str) -> str:
        return f"{PREFIX}response:{self.cluster}:{response_id}"

    async def put(self, response: dict, items: list, history: list, owner: str = "") -> None:
        record = json.dumps({"response": response, "input": items, "history": history, "owner": owner})
        if len(record) > self.MAX_RECORD_BYTES:
            log.warning("response %s not kept: %d bytes of record, past %d", response["id"], len(record),
                        self.MAX_RECORD_BYTES)
            return
        await self._call(self.redis.set, self._key(response["id"]), record, px=max(1, int(self.ttl_s * 1000)))

    async def get(self, response_id: str, param: str | None = None, owner: str = "") -> dict:
        """The record of a kept response of `owner`'s; a 404 (naming `param`) where there is none."""
        raw = None
        if len(response_id) <= self.MAX_ID_CHARS:
            raw = await self._call(self.redis.get, self._key(response_id))
        record = json.loads(raw) if raw is not None else None
        if record is None or record.get("owner", "") != owner:
            raise NotFound(f"no response with id {response_id[:self.MAX_ID_CHARS]!r} is stored here (responses are "
                           f"kept {self.ttl_s:g} s, unless asked with store: false)", param)
        return record

    async def delete(self, response_id: str, owner: str = "") -> None:
        await self.get(response_id, owner=owner)  # another's is not ours to drop
        await self._call(self.redis.delete, self._key(response_id))

    @staticmethod
    def listed(items: list, order: str, limit: int, after: str | None) -> dict:
        """input_items' page: `limit` items in `order` (asc, desc: OpenAI's default) after the one
        with id `after`."""
        if order not in ("asc", "desc") or not 1 <= limit <= 100:
            raise BadRequest("input_items takes order 'asc' or 'desc' and a limit of 1 to 100", "order"
                             if order not in ("asc", "desc") else "limit")
        ordered = items if order == "asc" else items[::-1]
        if after is not None:
            at = next((i for i, item in enumerate(ordered) if item.get("id") == after), None)
            if at is None:
                raise BadRequest(f"'after': no input item with id {after[:128]!r} in this response", "after")
            ordered = ordered[at + 1:]
        page = ordered[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(ordered) > limit}

    @staticmethod
    async def _call(method, *args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except RedisError as exc:
            raise Unavailable(f"the response store (Redis) is unreachable: {exc}") from exc


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesForm:
    """How one /v1/responses request's answer is written: whole (`body`) or as events (`writer`)."""

    name = "responses"  # serve() has only ever one job of this API

    def __init__(self, request: ResponsesRequest, store: ResponseStore | None = None, earlier: list | None = None,
                 owner: str = ""):
        """`earlier`: the messages of the conversation that previous_response_id continues; `store`
        keeps the answer (unless the request says store: false), for `owner` (ResponseStore)."""
        self.request, self.earlier, self.owner = request, earlier, owner
        self.store = store if store is not None and store.enabled and request.store is not False else None
        self.as_chat = request.chat_request(earlier)  # the same request on chat, which serves it

    async def keep(self, response: dict) -> None:
        """The whole answer kept (serving.serve calls it before the client has the end of it, so a
        request that goes on from it finds it): Redis trouble costs the keeping, not the answer."""
        if self.store is None:
            return
        history = self.request.turn(self.earlier or [], response["output"])
        try:
            await self.store.put(response, [_listed(item) for item in self.request.items()], history, self.owner)
        except DejavuError as exc:
            log.warning("response %s not kept: %s", response["id"], exc.message)

    def head(self, job: Job, status: str) -> dict:
        """The response object, as it stands before any output."""
        r = self.request
        fmt = (r.text or {}).get("format") or {"type": "text"}
        if fmt.get("type") == "json_schema":  # its name is optional here, required in the response
            fmt = {**fmt, "name": fmt.get("name") or "output"}
        return {"id": f"resp_{job.request_id}", "object": "response", "created_at": job.created, "status": status,
                "background": False, "error": None, "incomplete_details": None, "instructions": r.instructions,
                "max_output_tokens": r.max_output_tokens, "max_tool_calls": None, "model": job.model, "output": [],
                "parallel_tool_calls": r.parallel_tool_calls is not False,
                "previous_response_id": r.previous_response_id,
                "reasoning": {"effort": (r.reasoning or {}).get("effort"), "summary": None},
                "service_tier": "default", "store": self.store is not None,
                "temperature": 1.0 if r.temperature is None else r.temperature,
                "text": {"format": fmt}, "tool_choice": r.tool_choice if r.tool_choice is not None else "auto",
                "tools": r.tools or [], "top_logprobs": r.top_logprobs, "top_p": 1.0 if r.top_p is None else r.top_p,
                "truncation": "disabled", "usage": None, "user": r.user, "metadata": r.metadata or {}}

    def body(self, job: Job, totals: Totals, tokenizer) -> dict:
        """The whole response: what the stream of the same output ends with (its deltas replayed
        through an EventWriter that writes no events), so the two cannot differ."""
        writer = EventWriter(self, job, tokenizer, quiet=True)
        for delta in replayed(totals):
            writer.delta(delta)
        writer.end(totals)
        return writer.response

    def writer(self, job: Job, tokenizer) -> EventWriter:
        return EventWriter(self, job, tokenizer)


def _reasoning_item(item_id: str, text: str, status: str) -> dict:
    return {"id": item_id, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": status}


def _text_part(text: str, logprobs: list | None) -> dict:
    return {"type": "output_text", "text": text, "annotations": []} | ({} if logprobs is None else {"logprobs": logprobs})


def _message_item(item_id: str, text: str, status: str, logprobs: list | None) -> dict:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [_text_part(text, logprobs)]}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


class EventWriter:
    """The server-sent events of one streamed response, with the interface of
    responses.ChunkWriter (first, delta, end, failed, done): OpenAI's Responses events in place of
    chat chunks. The text is split as chat's is (responses.ChatSplit); each kind
    of text is an output item, opened when its first text comes and done when another kind's
    comes or the output ends. With logprobs asked for, a message has those of the tokens whose
    text it shows (a token whose text was held back, a partial tag, goes with the text it turns
    out to be); the thinking's and the calls' tokens have none here, nor an end-of-sequence token.
    `quiet` writes no events, for ResponsesForm.body."""

    def __init__(self, form: ResponsesForm, job: Job, tokenizer, quiet: bool = False):
        self.form, self.job, self.tokenizer, self.quiet = form, job, tokenizer, quiet
        self.split = ChatSplit(job)
        self.sequence = 0
        self.output: list[dict] = []   # the items done
        self.open: dict | None = None  # the item being written: kind, item, index, text (pieces), logprobs
        self.logprobs: list[dict] = []  # of tokens whose text is held back
        self.reasoning_tokens = self.undecided = 0  # tokens of thinking; tokens before the output's start is known
        self.response: dict | None = None  # the final response, once `end` has run

    def _event(self, kind: str, **fields) -> str:
        self.sequence += 1
        if self.quiet:
            return ""
        payload = json.dumps({"type": kind, "sequence_number": self.sequence - 1, **fields})
        return f"event: {kind}\ndata: {payload}\n\n"

    def first(self, delta: Delta) -> list[str]:
        head = self.form.head(self.job, "in_progress")
        return [self._event("response.created", response=head), self._event("response.in_progress", response=head)]

    def delta(self, d: Delta) -> str | None:
        if self.form.request.logprobs_wanted:
            self.logprobs += (chat_logprobs(self.tokenizer, d.tokens) or {"content": []})["content"]
        thinking = self.split.thinking
        before = thinking.state if thinking is not None else None
        thought, text, calls = self.split.push(d.text, bool(d.finish_reason))
        crossed = False
        if thinking is not None:
            self._count(before, len(d.tokens))
            # a <think> or </think> completed: the tokens held back were the tag's, the thinking's
            crossed = before != thinking.state and (before == "reasoning" or thinking.opened)
        out = [self._reasoning(thought)] if thought else []
        out.append(self._text(text))
        out += [self._call(c) for c in calls]
        if thought or calls or crossed or d.finish_reason:  # tokens of thinking or of calls (or the end)
            self.logprobs = []
        if d.finish_reason:
            out.append(self._close("incomplete" if d.finish_reason == "length" else "completed"))
        return "".join(out) or None

    def _count(self, before: str, tokens: int) -> None:
        """output_tokens_details.reasoning_tokens: a token is thinking if the thinking was open
        when it came (the one that closes it too); tokens that came while the start was undecided
        are counted once it is, if it opened."""
        if before == "reasoning":
            self.reasoning_tokens += tokens
        elif before == "start":
            if self.split.thinking.state == "start":
                self.undecided += tokens
                return
            if self.split.thinking.opened:
                self.reasoning_tokens += self.undecided + tokens
            self.undecided = 0

    def end(self, totals: Totals) -> str:
        cut = totals.finish_reason == "length"
        out = self._close("incomplete" if cut else "completed")  # where no delta said the output had ended
        if not self.output:  # nothing at all (an EOS first): an empty message, as chat's empty content
            out += self._start_message()
            out += self._close("incomplete" if cut else "completed")
        n, prompt = len(totals.tokens), len(self.job.prompt_ids)
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached_tokens(totals),
                                                                  "cache_write_tokens": 0},
                 "output_tokens": n, "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
                 "total_tokens": prompt + n}
        self.response = self.form.head(self.job, "incomplete" if cut else "completed") | {
            "output": self.output, "usage": usage, "incomplete_details": {"reason": "max_output_tokens"} if cut else None}
        return out + self._event("response.incomplete" if cut else "response.completed", response=self.response)

    def failed(self, exc: DejavuError) -> str:
        """response.failed: the items done so far (not the one being written), and the error as
        OpenAI's codes say it (server_error; rate_limit_exceeded where the cluster had no room)."""
        error = exc.client_body(self.job.request_id)["error"]
        code = "rate_limit_exceeded" if exc.status == 429 or exc.code == "kv_full" else "server_error"
        response = self.form.head(self.job, "failed") | {"output": self.output,
                                                          "error": {"code": code, "message": error["message"]}}
        return self._event("response.failed", response=response)

    def done(self) -> str:
        return ""  # no [DONE] on this API: response.completed (or .incomplete, .failed) is the last event

    def _start(self, kind: str, item: dict, part: dict | None) -> str:
        index = len(self.output)
        self.open = {"kind": kind, "item": item, "index": index, "text": [], "logprobs": []}
        out = self._event("response.output_item.added", output_index=index, item=item)
        if part is not None:
            out += self._event("response.content_part.added", item_id=item["id"], output_index=index,
                               content_index=0, part=part)
        return out

    def _start_message(self) -> str:
        return self._start("message", {"id": _new_id("msg"), "type": "message", "status": "in_progress",
                                       "role": "assistant", "content": []}, _text_part("", self._wanted([])))

    def _reasoning(self, text: str) -> str:
        out = ""
        if self.open is None or self.open["kind"] != "reasoning":
            out += self._close("completed")
            out += self._start("reasoning", {"id": _new_id("rs"), "type": "reasoning", "summary": [], "content": [],
                                             "status": "in_progress"}, {"type": "reasoning_text", "text": ""})
        self.open["text"].append(text)
        return out + self._event("response.reasoning_text.delta", item_id=self.open["item"]["id"],
                                 output_index=self.open["index"], content_index=0, delta=text)

    def _text(self, text: str) -> str:
        if not text:
            return ""
        out = ""
        if self.open is None or self.open["kind"] != "message":
            out += self._close("completed")
            out += self._start_message()
        logprobs, self.logprobs = self.logprobs, []
        self.open["text"].append(text)
        self.open["logprobs"] += logprobs
        return out + self._event("response.output_text.delta", item_id=self.open["item"]["id"],
                                 output_index=self.open["index"], content_index=0, delta=text, logprobs=logprobs)

    def _call(self, delta: dict) -> str:
        """A tool-call delta of tools.Reader: a new call (with its id), or more of its arguments."""
        out, arguments = "", delta["function"].get("arguments", "")
        if "id" in delta:
            out += self._close("completed")
            out += self._start("call", _call_item(_new_id("fc"), delta["id"], delta["function"]["name"], "",
                                                  "in_progress"), None)
        if arguments:
            self.open["text"].append(arguments)
            out += self._event("response.function_call_arguments.delta", item_id=self.open["item"]["id"],
                               output_index=self.open["index"], delta=arguments)
        return out

    def _close(self, status: str) -> str:
        """The ...done events of the item being written; the item joins the output."""
        if self.open is None:
            return ""
        kind, item, text = self.open["kind"], self.open["item"], "".join(self.open["text"])
        ids = {"item_id": item["id"], "output_index": self.open["index"]}
        if kind == "reasoning":
            done = _reasoning_item(item["id"], text, status)
            out = self._event("response.reasoning_text.done", **ids, content_index=0, text=text)
            out += self._event("response.content_part.done", **ids, content_index=0, part=done["content"][0])
        elif kind == "message":
            done = _message_item(item["id"], text, status, self._wanted(self.open["logprobs"]))
            out = self._event("response.output_text.done", **ids, content_index=0, text=text,
                              logprobs=self.open["logprobs"])
            out += self._event("response.content_part.done", **ids, content_index=0, part=done["content"][0])
        else:  # a call cut short by max_output_tokens is "incomplete", its arguments as far as they came
            done = _call_item(item["id"], item["call_id"], item["name"], text, status)
            out = self._event("response.function_call_arguments.done", **ids, name=item["name"], arguments=text)
        self.open = None
        self.output.append(done)
        return out + self._event("response.output_item.done", output_index=ids["output_index"], item=done)

    def _wanted(self, logprobs: list) -> list | None:
        return logprobs if self.form.request.logprobs_wanted else None
