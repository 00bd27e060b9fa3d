"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens), served by the chat
machinery, as vLLM and SGLang serve it: for the anthropic SDK and the tools built on it.

A request is translated into a chat request (`MessagesRequest.chat_request`): `system` (a string
or text blocks) is a system message; each message's content (a string or blocks) becomes chat's
messages: a user's `text` blocks its text, its `tool_result` blocks tool messages (in their
order, before the text after them); an assistant's `text` blocks its content and its `tool_use`
blocks its tool calls; `thinking` blocks are dropped (chat templates drop earlier turns'
thinking). A conversation that ends with an assistant's text is continued from it (Anthropic's
prefill: chat's continue_final_message), the answer holding only what follows. `max_tokens`
(required), `stop_sequences`, `temperature`, `top_p`, `top_k`, `metadata.user_id`, custom
`tools` ({name, description, input_schema}) and `tool_choice` (auto, any, tool, none;
disable_parallel_tool_use) carry over, with vLLM's sampling extensions (`seed`, `min_p`,
penalties, `ignore_eos`, `min_tokens`, `chat_template_kwargs`). `thinking` ({"type": "enabled" |
"adaptive" | "disabled"}) sets the template's `enable_thinking` (Qwen3's switch; off where
`thinking` is not given, as Anthropic's default), unless chat_template_kwargs does;
`budget_tokens` is not enforced. `output_config.format` (a JSON
schema) is chat's response_format (structured output), `output_config.effort` the template's
`reasoning_effort`. The current anthropic SDK no longer names temperature, top_p or top_k: send
them in `extra_body` (older SDKs and plain HTTP send them as fields). Refused: images, documents
and other content a text model cannot read, server tools (web search, code execution, ...),
`mcp_servers` and `container`. Ignored: `cache_control` (the prefix cache needs no marks),
`anthropic-version` and `anthropic-beta`, a tool_result's `is_error` (no chat template has a
field for it).

The answer is chat's, as content blocks: `thinking` (with an empty signature: nothing here
verifies it), `text`, `tool_use` (its `input` the call's arguments parsed, {} where they are not a
JSON object, as a call cut by max_tokens), and a stop_reason: `max_tokens` where the output was
cut, `tool_use` where it called tools, `stop_sequence` (and which) where a stop string ended it,
`end_turn` otherwise. Usage counts prompt tokens served from the prefix cache as
`cache_read_input_tokens`, the others as `input_tokens`, as Anthropic's do.

Streamed, the events are Anthropic's: message_start, ping, for each block content_block_start,
its deltas (text_delta, thinking_delta, input_json_delta) and content_block_stop, then
message_delta (stop_reason, usage) and message_stop; a failure mid-stream is an `error` event.
Errors on these routes are Anthropic's body, which is also OpenAI's shape:
{"type": "error", "error": {"type", "message", "param", "code"}} (`AnthropicErrors`).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from common.errors import BadRequest, DejavuError
from gateway import tools
from gateway.jobs import LARGE_TEXT_CHARS, Delta, Job, Limits, chat_chars, chat_prompt_ids, check_model
from gateway.openai_types import ChatRequest, TranslatedBody
from gateway.responses import ChatSplit, Totals, cached_tokens, replayed

Number = StrictFloat | StrictInt
# chat's names in its errors, and what this API calls them
_RENAMED = {"max_completion_tokens": "max_tokens", "stop": "stop_sequences", "parallel_tool_calls": "tool_choice",
           "user": "metadata", "continue_final_message": "messages", "add_generation_prompt": "messages",
           "response_format": "output_config"}
_RENAMED_WORDS = ("max_completion_tokens", "stop", "response_format")  # in messages too: no other sense there
UNREADABLE = ("image", "document", "search_result", "container_upload")  # content a text model cannot read


class MessagesRequest(TranslatedBody):
    """The body of POST /v1/messages (and of count_tokens, which needs no max_tokens)."""

    RENAMED, RENAMED_WORDS = _RENAMED, _RENAMED_WORDS
    MAX_TOKENS = ("max_completion_tokens", "max_tokens")
    model: StrictStr | None = None
    messages: list[Any] | None = None
    max_tokens: StrictInt | None = None
    system: StrictStr | list[Any] | None = None
    stop_sequences: list[StrictStr] | None = None
    stream: StrictBool = False
    temperature: Number | None = None
    top_p: Number | None = None
    metadata: dict | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    thinking: Any = None
    output_config: Any = None  # {"format": {"type": "json_schema", "schema"}, "effort"}
    service_tier: StrictStr | None = None
    # refused unless unset (see the module's docstring)
    mcp_servers: Any = None
    container: Any = None
    def chat_request(self, counting: bool = False) -> ChatRequest:
        """The same request on chat; a 400 naming this API's field for anything it cannot be.
        `counting`: for count_tokens, where max_tokens is not asked."""
        for name, what in (("mcp_servers", "MCP servers"), ("container", "containers")):
            if getattr(self, name) is not None:
                raise BadRequest(f"'{name}': {what} are not supported on this server (it runs no server tools)", name)
        if not counting and self.max_tokens is None:
            raise BadRequest("'max_tokens' is required: the most tokens to generate", "max_tokens")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise BadRequest(f"'max_tokens' = {self.max_tokens}: must be at least 1", "max_tokens")
        messages = self._messages()
        prefill = messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": self.stream,
                                "max_completion_tokens": self.max_tokens, "stop": self.stop_sequences,
                                "temperature": self.temperature, "top_p": self.top_p, "user": self._user(),
                                "add_generation_prompt": not prefill, "continue_final_message": prefill,
                                **self.extensions()}
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.tools:
            body["tools"] = [_chat_tool(i, t) for i, t in enumerate(self.tools)]
        if self.tool_choice is not None:
            body |= _chat_tool_choice(self.tool_choice)
        kwargs = dict(self.chat_template_kwargs or {})
        kwargs.setdefault("enable_thinking", self._thinking())  # off unless asked, as Anthropic's
        schema, effort = self._output_config()
        if schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
        if effort is not None:
            kwargs.setdefault("reasoning_effort", effort)
        body["chat_template_kwargs"] = kwargs or None
        try:
            return ChatRequest(**body)
        except ValidationError as exc:  # blocks that made messages chat cannot take
            raise BadRequest(f"'messages' is not a conversation this server can read: {exc.errors()[0]['msg']}",
                             "messages") from None

    def _user(self) -> str | None:
        user = (self.metadata or {}).get("user_id")
        if user is not None and not isinstance(user, str):
            raise BadRequest("'metadata.user_id' must be a string", "metadata")
        return user

    def _thinking(self) -> bool:
        if self.thinking is None:
            return False
        kind = self.thinking.get("type") if isinstance(self.thinking, dict) else None
        if kind not in ("enabled", "adaptive", "disabled"):
            raise BadRequest("'thinking' must be {'type': 'enabled', 'budget_tokens': N}, {'type': 'adaptive'} or "
                             "{'type': 'disabled'}", "thinking")
        budget = self.thinking.get("budget_tokens")
        if budget is not None and (type(budget) is not int or budget < 1):
            raise BadRequest("'thinking.budget_tokens' must be a positive integer", "thinking")
        return kind != "disabled"

    def _output_config(self) -> tuple[dict | None, str | None]:
        """(the output's JSON schema, the effort: the template's reasoning_effort)."""
        config = self.output_config
        if config is None:
            return None, None
        fmt, effort = (config.get("format"), config.get("effort")) if isinstance(config, dict) else (None, None)
        if not isinstance(config, dict) or (fmt is not None and not (
                isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict))):
            raise BadRequest("'output_config' must be {'format': {'type': 'json_schema', 'schema': {...}}, 'effort': "
                             "...}", "output_config")
        if effort is not None and effort not in ("low", "medium", "high", "xhigh", "max"):
            raise BadRequest(f"'output_config.effort' = {str(effort)[:40]!r}: must be low, medium, high, xhigh or max",
                             "output_config")
        return (fmt or {}).get("schema"), effort

    def _messages(self) -> list[dict]:
        out = [{"role": "system", "content": _text(self.system, "system")}] if self.system else []
        if not self.messages:
            raise BadRequest("'messages' must hold at least one message", "messages")
        for i, m in enumerate(self.messages):
            role = m.get("role") if isinstance(m, dict) else None
            if role not in ("user", "assistant"):
                raise BadRequest(f"messages[{i}] must be {{'role': 'user' or 'assistant', 'content': ...}} (the system "
                                 "prompt is the top-level 'system' field)", "messages")
            content = m.get("content")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(blocks, list) or any(not isinstance(b, dict) for b in blocks):
                raise BadRequest(f"messages[{i}] ({role}) needs 'content': a string or a list of content blocks",
                                 "messages")
            out += _user_turn(i, blocks) if role == "user" else [_assistant_turn(i, blocks)]
        return out

    @property
    def large(self) -> bool:
        """count_tokens: tokenized off the event loop (app.Encoder), as a long chat is."""
        try:
            chat = self.chat_request(counting=True)
            return chat_chars(chat.messages, chat.tools) >= LARGE_TEXT_CHARS
        except BadRequest:  # refused by count_tokens, at once
            return False


def _block_kind(i: int, block: dict, allowed: tuple[str, ...], role: str) -> str:
    kind = block.get("type")
    if kind in allowed:
        return kind
    if kind in UNREADABLE:
        raise BadRequest(f"messages[{i}]: '{kind}' blocks are not supported (this server serves a text model)",
                         "messages")
    raise BadRequest(f"messages[{i}] ({role}): blocks of type {str(kind)[:40]!r} are not supported ("
                     f"{', '.join(allowed)} are)", "messages")


def _text(value, where: str) -> str:
    """A string, or text blocks ({"type": "text", "text": ...}) joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
            isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in value):
        return "\n".join(b["text"] for b in value)  # as chat's text parts (ChatMessage.text)
    raise BadRequest(f"'{where}' must be a string or a list of text blocks ({{'type': 'text', 'text': ...}})",
                     where.split("[")[0].split(".")[0])


def _user_turn(i: int, blocks: list[dict]) -> list[dict]:
    """A user's blocks as chat's messages: each tool_result a tool message, the text between them
    user messages."""
    out, text = [], []
    for block in blocks:
        if _block_kind(i, block, ("text", "tool_result"), "user") == "text":
            text.append(_text([block], "messages"))
            continue
        if text:
            out.append({"role": "user", "content": "\n".join(text)})
            text = []
        call = block.get("tool_use_id")
        if not isinstance(call, str) or not call:
            raise BadRequest(f"messages[{i}]: a tool_result block needs 'tool_use_id': the id of the tool_use it "
                             "answers", "messages")
        content = block.get("content")
        if isinstance(content, list) and any(isinstance(b, dict) and b.get("type") in UNREADABLE for b in content):
            raise BadRequest(f"messages[{i}]: a tool_result with images or documents is not supported (this server "
                             "serves a text model)", "messages")
        out.append({"role": "tool", "tool_call_id": call,
                    "content": "" if content is None else _text(content, f"messages[{i}].content.content")})
    if text or not out:
        out.append({"role": "user", "content": "\n".join(text)})
    return out


def _assistant_turn(i: int, blocks: list[dict]) -> dict:
    """An assistant's blocks as one chat message: its text, and its tool_use blocks as calls."""
    text, calls = [], []
    for block in blocks:
        kind = _block_kind(i, block, ("text", "tool_use", "thinking", "redacted_thinking"), "assistant")
        if kind == "text":
            text.append(_text([block], "messages"))
        elif kind == "tool_use":
            name, call, arguments = block.get("name"), block.get("id"), block.get("input", {})
            if not (isinstance(name, str) and name and isinstance(call, str) and call and isinstance(arguments, dict)):
                raise BadRequest(f"messages[{i}]: a tool_use block needs 'id' and 'name' (strings) and 'input' (an "
                                 "object)", "messages")
            try:
                written = json.dumps(arguments, ensure_ascii=False)
            except RecursionError:  # parsed, but past the writer's depth
                raise BadRequest(f"messages[{i}]: a tool_use block's 'input' is nested too deeply to be written into "
                                 "the prompt", "messages") from None
            calls.append({"id": call, "type": "function", "function": {"name": name, "arguments": written}})
        # thinking: an earlier turn's, which chat templates leave out of the prompt
    return {"role": "assistant", "content": "\n".join(text)} | ({"tool_calls": calls} if calls else {})


def _chat_tool(i: int, tool) -> dict:
    """A custom tool ({"name", "description", "input_schema"}) as chat's function tool."""
    if not isinstance(tool, dict):
        raise BadRequest(f"tools[{i}] must be an object: {{'name': ..., 'input_schema': {{...}}}}", "tools")
    kind = tool.get("type", "custom")
    if kind not in ("custom", None):
        raise BadRequest(f"tools[{i}] has type {str(kind)[:40]!r}: only custom tools ({{'name', 'description', "
                         "'input_schema'}) are supported (this server runs no server tools)", "tools")
    name, schema = tool.get("name"), tool.get("input_schema")
    if not isinstance(name, str) or not 0 < len(name) <= tools.MAX_NAME_CHARS or not isinstance(schema, dict):
        raise BadRequest(f"tools[{i}] must be {{'name': ..., 'input_schema': {{...}}}}, its name a string of 1 to "
                         f"{tools.MAX_NAME_CHARS} characters and its input_schema a JSON schema (an object)", "tools")
    function = {"name": name, "parameters": schema} | (
        {"description": tool["description"]} if tool.get("description") is not None else {})
    return {"type": "function", "function": function}


def _chat_tool_choice(choice) -> dict:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none") or (kind == "tool" and not isinstance(choice.get("name"), str)):
        raise BadRequest("'tool_choice' must be {'type': 'auto'}, {'type': 'any'}, {'type': 'tool', 'name': ...} or "
                         "{'type': 'none'}", "tool_choice")
    parallel = choice.get("disable_parallel_tool_use")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadRequest("'tool_choice.disable_parallel_tool_use' must be a boolean", "tool_choice")
    out = {"tool_choice": {"auto": "auto", "any": "required", "none": "none"}.get(kind) or
           {"type": "function", "function": {"name": choice["name"]}}}
    return out | ({"parallel_tool_calls": not parallel} if parallel is not None else {})


def count_tokens(body: MessagesRequest, tokenizer, limits: Limits) -> dict:
    """POST /v1/messages/count_tokens: the prompt tokens the request would have, tools included."""
    chat = body.chat_request(counting=True)  # its own errors, in its own names
    try:
        chat.check()
        check_model(chat, limits)
        chat_chars(chat.messages, chat.tools)  # tools nested past what the template can write: a 400
        ids = chat_prompt_ids(chat, [m.for_template() for m in chat.messages], tokenizer)
    except BadRequest as exc:
        raise body.renamed(exc) from None
    return {"input_tokens": len(ids)}


class MessagesForm:
    """How one /v1/messages request's answer is written: whole (`body`) or as events (`writer`)."""

    name = "messages"  # serve() has only ever one job of this API

    def __init__(self, request: MessagesRequest):
        self.request = request
        self.as_chat = request.chat_request()  # the same request on chat, which serves it

    def body(self, job: Job, totals: Totals, tokenizer) -> dict:
        """The whole message: what the stream of the same output ends with (its deltas replayed
        through an EventWriter that writes no events), so the two cannot differ."""
        writer = EventWriter(job, quiet=True)
        for delta in replayed(totals):
            writer.delta(delta)
        writer.end(totals)
        return writer.message

    def writer(self, job: Job, tokenizer) -> EventWriter:
        return EventWriter(job)


def _usage(job: Job, totals: Totals, output: int) -> dict:
    cached = cached_tokens(totals)
    return {"input_tokens": len(job.prompt_ids) - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": output}


class EventWriter:
    """The server-sent events of one streamed message, with the interface of
    responses.ChunkWriter (first, delta, end, failed, done). The text is split as chat's is
    (responses.ChatSplit); each kind of text is a content block, started when its first text
    comes and stopped when another kind's comes or the output ends; each tool call is a block.
    `quiet` writes no events, for MessagesForm.body; `message` is the whole message once `end`
    has run."""

    def __init__(self, job: Job, quiet: bool = False):
        self.job, self.quiet = job, quiet
        self.split = ChatSplit(job)
        self.blocks: list[dict] = []  # the content, the block being written last
        self.pieces: list[str] = []   # its text (of a tool_use: its arguments)
        self.open = False
        self.stop: str | int | None = None
        self.message: dict | None = None

    def _event(self, kind: str, **fields) -> str:
        return "" if self.quiet else f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n"

    def _head(self, totals: Totals) -> dict:
        return {"id": f"msg_{self.job.request_id}", "type": "message", "role": "assistant", "content": [],
                "model": self.job.model, "stop_reason": None, "stop_sequence": None,
                "usage": _usage(self.job, totals, 0)}

    def first(self, delta: Delta) -> list[str]:
        head = self._head(Totals(tokens=delta.tokens))  # the first token's event says what the cache served
        return [self._event("message_start", message=head), self._event("ping")]

    def delta(self, d: Delta) -> str | None:
        thought, text, calls = self.split.push(d.text, bool(d.finish_reason))
        self.stop = d.stop if d.stop is not None else self.stop
        out = self._more("thinking", thought) + self._more("text", text)
        for call in calls:  # a new call (with its id), or more of its arguments
            if "id" in call:
                out += self._start({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                                    "input": {}})
            out += self._more("tool_use", call["function"].get("arguments", ""))
        return out or None

    def _more(self, kind: str, text: str) -> str:
        if not text:
            return ""
        out = ""
        if not self.open or self.blocks[-1]["type"] != kind:
            assert kind != "tool_use", "a call's arguments before the call"  # tools.Reader: the id comes first
            out += self._start({"type": "text", "text": ""} if kind == "text" else
                               {"type": "thinking", "thinking": "", "signature": ""})
        self.pieces.append(text)
        delta = {"text": {"type": "text_delta", "text": text}, "thinking": {"type": "thinking_delta", "thinking": text},
                 "tool_use": {"type": "input_json_delta", "partial_json": text}}[kind]
        return out + self._event("content_block_delta", index=len(self.blocks) - 1, delta=delta)

    def _start(self, block: dict) -> str:
        out = self._stop()
        self.blocks.append(block)
        self.open, self.pieces = True, []
        return out + self._event("content_block_start", index=len(self.blocks) - 1, content_block=block)

    def _stop(self) -> str:
        """content_block_stop of the block being written; the block takes its whole text."""
        if not self.open:
            return ""
        block, text = self.blocks[-1], "".join(self.pieces)
        if block["type"] == "tool_use":
            block["input"] = _arguments(text)
        else:
            block[block["type"]] = text
        self.open = False
        return self._event("content_block_stop", index=len(self.blocks) - 1)

    def end(self, totals: Totals) -> str:
        out = self._stop()
        if not self.blocks:  # nothing at all (an EOS first): one empty text block, as chat's empty content
            out += self._start({"type": "text", "text": ""}) + self._stop()
        if totals.finish_reason == "length":
            reason = "max_tokens"
        elif any(b["type"] == "tool_use" for b in self.blocks):
            reason = "tool_use"
        else:
            reason = "stop_sequence" if isinstance(self.stop, str) else "end_turn"
        sequence = self.stop if reason == "stop_sequence" else None
        usage = _usage(self.job, totals, len(totals.tokens))
        self.message = {**self._head(totals), "content": self.blocks, "stop_reason": reason,
                        "stop_sequence": sequence, "usage": usage}
        return out + self._event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                                 usage=usage) + self._event("message_stop")

    def failed(self, exc: DejavuError) -> str:
        """An `error` event, as Anthropic's stream ends on a failure (the message says only what
        happened, with the request id the logs have)."""
        error = exc.client_body(self.job.request_id)["error"]
        return self._event("error", error={**error, "type": anthropic_type(exc.status)})

    def done(self) -> str:
        return ""  # no [DONE] on this API: message_stop (or error) is the last event


MAX_INPUT_DEPTH = 128  # a tool_use's input nested deeper is {}: what Python parses, it must write back too


def _arguments(text: str) -> dict:
    """A call's arguments as its tool_use's `input`: a JSON object, else {} (text cut by
    max_tokens, a model's text nested past what can be written back)."""
    value = tools.json_value(text)
    return value if isinstance(value, dict) and _depth(value) <= MAX_INPUT_DEPTH else {}


def _depth(value) -> int:
    """How deeply a parsed JSON value nests (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, depth + 1)
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def anthropic_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    return {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
            503: "overloaded_error", 504: "timeout_error"}.get(status, "invalid_request_error" if status < 500
                                                               else "api_error")


class AnthropicErrors:
    """Errors on /v1/messages* in Anthropic's body, from wherever they come (a handler, the body
    limit, the API key check, request validation): {"type": "error", "error": {"type": Anthropic's
    name for the status, "message", "param", "code"}}: the anthropic SDK reads its message, an
    OpenAI-style reader still finds error.message."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/messages"):
            return await self.app(scope, receive, send)
        start: dict | None = None
        body: list[bytes] = []
        started = False

        async def rewriting_send(message):
            nonlocal start, started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] < 400:
                    return await send(message)
                start = message
                return None
            if start is None:
                return await send(message)
            body.append(message.get("body", b""))
            if message.get("more_body"):
                return None
            await _send_error(send, start["status"], b"".join(body), start.get("headers", []))

        try:
            await self.app(scope, receive, rewriting_send)
        except Exception:  # a bug: the 500 is written outside every middleware, in OpenAI's body; ours first
            if not started:
                await _send_error(send, 500, b'{"error": {"message": "internal error"}}', [])
            raise  # and logged, by the handler outside


async def _send_error(send, status: int, raw: bytes, headers: list) -> None:
    """An error response in Anthropic's body (a JSON one, whatever the original said)."""
    content = _anthropic_error(status, raw)
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-length", b"content-type")]
    await send({"type": "http.response.start", "status": status,
                "headers": kept + [(b"content-type", b"application/json"),
                                   (b"content-length", str(len(content)).encode())]})
    await send({"type": "http.response.body", "body": content})


def _anthropic_error(status: int, raw: bytes) -> bytes:
    try:
        error = json.loads(raw)["error"]
        assert isinstance(error, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        error = {"message": raw.decode(errors="replace")[:500] or f"HTTP {status}", "param": None, "code": None}
    return json.dumps({"type": "error", "error": {**error, "type": anthropic_type(status)}}).encode()
