"""Tool calling on /v1/chat/completions: OpenAI's `tools` and `tool_choice`, as vLLM serves them.

- "none": the tools are shown to the chat template; the answer is text.
- a named function ({"type": "function", "function": {"name": ...}}): the output is held to that
  function's parameters schema (a grammar, common/grammar.py) and is its one call. The finish
  reason stays "stop", as OpenAI's for a forced call.
- "required": the output is held to a JSON array of {"name", "parameters"} objects, one of the
  tools each (vLLM's schema); each element is a call, and the finish reason "tool_calls".
- "auto" (the default when tools are given): free text, read in the model's own tool-call format
  by a parser (the gateway's --tool-call-parser), as vLLM's parsers of the same names read it:
  - hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, the format of Qwen2.5 and
    Qwen3, Hermes and SmolLM3 templates; calls anywhere in the text, each sent once whole.
  - llama3_json: an output that starts with `{` or `<|python_tag|>` is one or more
    `{"name": ..., "parameters": {...}}` objects (separated by `;`), as Llama 3.1-3.3 write them
    (and Llama 4's JSON form); any other output is text.
  - mistral: text until `[TOOL_CALLS]`, then the calls: a JSON array of `{"name", "arguments"}`
    (Mistral 7B v0.3, Mixtral, Nemo) or `name[ARGS]{...}`, repeated after each `[TOOL_CALLS]`
    (the tokenizers of Mistral Small 3.2, Magistral, Devstral).
  The text around the calls is the message's content. Where a llama3_json or mistral output's
  calls do not read as calls to the request's tools, the whole of it is content; its calls are
  sent once the output ends (a call is the output's last text in both formats).

Everything here reads the output text in the gateway, after the stop strings: the services see a
grammar or nothing, so a failover resumes a tool call as exactly as any text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from common.errors import BadRequest
from gateway.detokenizer import tag_start

MAX_TOOLS = 128               # OpenAI's limit
MAX_NAME_CHARS = 256


PYTHON_TAG, TOOL_CALLS, ARGS = "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]"


def parser_for(template: str) -> str:
    """--tool-call-parser auto, from what the chat template writes: hermes for <tool_call> with
    JSON in it (Qwen2.5, Qwen3, Hermes, SmolLM3; not an XML body: Qwen3-Coder, GLM-4.5 write
    <function=...>), mistral for [TOOL_CALLS], llama3_json for <|python_tag|> or Llama 3.1's
    instruction to answer {"name": ..., "parameters": ...}; none otherwise."""
    if Reader.START in template and "<function=" not in template:
        return "hermes"
    if TOOL_CALLS in template:
        return "mistral"
    if (PYTHON_TAG in template or '"parameters": dictionary of argument name' in template) and "<function=" not in template:
        return "llama3_json"  # (Functionary v3.1 has <|python_tag|> for code, but writes <function=...> calls)
    return "none"


@dataclass(frozen=True)
class Plan:
    """What a request's `tools` and `tool_choice` ask for."""

    mode: str                       # none | auto | required | named
    tools: tuple[dict, ...]         # as given (validated), for the chat template
    named: str = ""                 # the named function's name
    parallel: bool = True           # parallel_tool_calls
    parser: str = "hermes"          # auto: the format calls are read in (hermes, llama3_json, mistral: the gateway's --tool-call-parser)

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    def schema(self) -> dict | None:
        """The JSON schema the output must follow: the named function's parameters, or for
        "required" an array of calls (with every tool's $defs and definitions at its root, where its
        refs point); None otherwise."""
        params = {t["function"]["name"]: dict(t["function"].get("parameters") or {"type": "object", "properties": {}})
                  for t in self.tools}
        if self.mode == "named":
            return params[self.named]
        if self.mode != "required":
            return None
        defs: dict = {"$defs": {}, "definitions": {}}
        for name, p in params.items():
            for where, found in defs.items():  # "#/$defs/X" and "#/definitions/X" refer to the root
                own = p.pop(where, None)
                own = {} if own is None else own
                if not isinstance(own, dict):
                    raise BadRequest(f"'tools': the parameters of {name[:64]!r} have a '{where}' that is not an object "
                                     "of schemas", "tools")
                for key, value in own.items():
                    if found.setdefault(key, value) != value:
                        raise BadRequest(f"'tools': two functions define '{where}/{key}' differently", "tools")
        one = [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]}, "parameters": p},
                "required": ["name", "parameters"], "additionalProperties": False} for name, p in params.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": one}}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema | {where: found for where, found in defs.items() if found}


def plan(tools, tool_choice, parallel: bool | None) -> Plan | None:
    """The request's plan, or None without tools; a 400 naming the field for anything malformed."""
    if tools is not None and not isinstance(tools, list):
        raise BadRequest("'tools' must be a list of {'type': 'function', 'function': {...}}", "tools")
    tools = tools or []
    if len(tools) > MAX_TOOLS:
        raise BadRequest(f"'tools' has {len(tools)} functions: at most {MAX_TOOLS}", "tools")
    names = [_check_tool(i, t) for i, t in enumerate(tools)]
    if len(set(names)) < len(names):
        raise BadRequest("'tools' names a function twice", "tools")
    choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise BadRequest("'tool_choice' as an object must be {'type': 'function', 'function': {'name': ...}}",
                             "tool_choice")
        if name not in names:
            raise BadRequest(f"'tool_choice' names the function {name[:64]!r}, which 'tools' does not define",
                             "tool_choice")
        return Plan("named", tuple(tools), name, parallel is not False)
    if choice not in ("none", "auto", "required"):
        raise BadRequest(f"'tool_choice' = {str(choice)[:40]!r}: must be 'none', 'auto', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if not tools:
        if choice == "required":
            raise BadRequest("'tool_choice' is 'required' but 'tools' defines no function", "tool_choice")
        return None
    return Plan(choice, tuple(tools), "", parallel is not False)


def _check_tool(i: int, tool) -> str:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or tool.get("type", "function") != "function":
        raise BadRequest(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': "
                         "{...}}}", "tools")
    name = fn.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise BadRequest(f"tools[{i}].function.name must be a string of 1 to {MAX_NAME_CHARS} characters", "tools")
    if not isinstance(fn.get("description", ""), (str, type(None))):
        raise BadRequest(f"tools[{i}].function.description must be a string", "tools")
    if not isinstance(fn.get("parameters", {}), (dict, type(None))):
        raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema (an object)", "tools")
    return name


def template_messages(calls) -> list[dict]:
    """An assistant message's `tool_calls`, for the chat template: arguments as an object where
    they are JSON (templates write them with `tojson`, as vLLM hands them over)."""
    if not isinstance(calls, list):
        raise BadRequest("a message's 'tool_calls' must be a list", "messages")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments", ""), str):
            raise BadRequest("each of a message's 'tool_calls' must be {'id': ..., 'type': 'function', 'function': "
                             "{'name': ..., 'arguments': '<JSON text>'}}", "messages")
        arguments = json_value(fn.get("arguments") or "{}")
        if arguments is None:  # not JSON: the text as it is
            arguments = fn.get("arguments")
        out.append({**call, "type": "function", "function": {"name": fn["name"], "arguments": arguments}})
    return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class Reader:
    """Reads a request's output text, piece by piece as it streams, into content and tool calls:
    `push(text)` and, once, `finish()` each say (content, tool-call deltas) to send now, in
    OpenAI's streamed form ({"index", "id", "type", "function": {"name", "arguments"}} the first
    time a call shows, {"index", "function": {"arguments"}} after). A call is sent whole once its
    text is complete, except a named function's, whose arguments stream as they come."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self, plan: Plan):
        self.plan, self.buf, self.calls = plan, "", 0
        self.inside = self.opened = self.closed = self.after_call = False
        self.depth, self.in_string, self.escaped = 0, False, False  # required: where the scan is in an element
        self.element: list[str] = []  # required: the text of the element being read, before this piece
        self.searched = 0           # auto: the call's text before this has no </tool_call>
        self.said = False           # auto, llama3_json: text other than whitespace was sent (no call can start)
        self.lead: list[str] = []   # auto, llama3_json: the output's leading whitespace, while undecided
        self.held: list[str] = []   # auto, llama3_json or mistral: the text of the calls, held for finish()
        self.opening = ""           # auto, llama3_json or mistral: the text before them that started them
        self.pending = ""           # auto: whitespace held back (Reader._text)
        self.raw: list[str] = []    # required: the text, shown as content if no call could be read

    @property
    def called(self) -> bool:
        return self.calls > 0

    def finish_reason(self, reason: str | None) -> str | None:
        """A finished generation's reason: "tool_calls" where calls were read (a forced named
        call keeps "stop", as OpenAI's does); "length" stays."""
        if reason == "stop" and self.called and self.plan.mode != "named":
            return "tool_calls"
        return reason

    def push(self, text: str) -> tuple[str, list[dict]]:
        if self.plan.mode == "named":
            return "", self._named(text)
        if self.plan.mode == "required":
            self.raw.append(text)
            return "", self._required(text)
        return self._auto(text)

    def finish(self) -> tuple[str, list[dict]]:
        if self.plan.mode == "named":
            return "", self._named("") if not self.calls else []
        if self.plan.mode == "required":  # cut short ("length") before any whole call: the text as it is
            return ("" if self.calls else "".join(self.raw)), []
        content, calls = "", []
        if self.inside and self.plan.parser != "hermes":  # the held calls, read whole
            body = "".join(self.held)
            if not self._held_calls(body, calls):
                content = self._text(self.opening + body)
        elif self.inside:  # a call the model did not close (it ended, or ran out of tokens, maybe inside the tag)
            cut = tag_start(self.buf, self.END)
            if not self._hermes(self.buf[:len(self.buf) - cut], calls):
                content = self._text(self.START + self.buf)
        else:
            content = self._text(self.buf)
        self.buf = ""
        return content + ("" if self.called else self.pending), calls

    def _named(self, text: str) -> list[dict]:
        if self.calls:
            return [{"index": 0, "function": {"arguments": text}}] if text else []
        self.calls = 1
        return [{"index": 0, "id": new_call_id(), "type": "function",
                 "function": {"name": self.plan.named, "arguments": text}}]

    def _call(self, name: str, arguments) -> dict | None:
        if not self.plan.parallel and self.calls:
            return None
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        self.calls += 1
        return {"index": self.calls - 1, "id": new_call_id(), "type": "function",
                "function": {"name": name, "arguments": text}}

    def _required(self, text: str) -> list[dict]:
        """The array the grammar holds the text to: each element is sent once it is whole. The text
        is scanned once, character by character (depth, strings): an element is decoded only when
        its closing brace comes, never again on each piece of a long one."""
        calls, start = [], 0  # text[start:] belongs to the element being read (depth > 0)
        for i, c in enumerate(text):
            if self.closed:
                break
            if self.depth == 0:  # between elements
                if c == "[" and not self.opened:
                    self.opened = True
                elif c == "]" and self.opened:
                    self.closed = True
                elif c == "{" and self.opened:
                    self.depth, self.element, start = 1, [], i
                continue
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    element = json_value("".join(self.element) + text[start:i + 1])
                    if isinstance(element, dict) and isinstance(element.get("name"), str):
                        if (call := self._call(element["name"], element.get("parameters", {}))) is not None:
                            calls.append(call)
        if self.depth > 0:
            self.element.append(text[start:])
        return calls

    def _auto(self, text: str) -> tuple[str, list[dict]]:
        """hermes: content until <tool_call>, a call until </tool_call>; a partial tag is held back."""
        if self.plan.parser != "hermes":
            return self._held(text)
        self.buf += text
        content, calls = "", []
        while True:
            if not self.inside:
                at = self.buf.find(self.START)
                if at < 0:
                    keep = tag_start(self.buf, self.START)
                    content += self._text(self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
                content += self._text(self.buf[:at])
                self.buf, self.inside = self.buf[at + len(self.START):], True
            else:
                at = self.buf.find(self.END, self.searched)
                if at < 0:
                    self.searched = max(0, len(self.buf) - len(self.END) + 1)
                    break
                body, self.buf, self.inside, self.searched = self.buf[:at], self.buf[at + len(self.END):], False, 0
                if self._hermes(body, calls):
                    self.pending, self.after_call = "", True  # whitespace around a call is dropped
                else:
                    content += self._text(self.START + body + self.END)
        return content, calls

    def _held(self, text: str) -> tuple[str, list[dict]]:
        """llama3_json and mistral: content until the calls start, then everything is held (in
        pieces, joined once) for `finish` to read; `opening` is the text before them that started
        them, given back with them as content if they do not read as calls. What waits for a
        decision is bounded: a tag's length, and the output's leading whitespace (kept apart)."""
        if self.inside:
            self.held.append(text)
            return "", []
        if self.plan.parser == "mistral":
            self.buf += text  # content is sent at once: the buffer holds a partial tag at most
            at = self.buf.find(TOOL_CALLS)
            if at < 0:
                keep = tag_start(self.buf, TOOL_CALLS)
                content = self._text(self.buf[:len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep:]
                return content, []
            content = self._text(self.buf[:at])
            self.held, self.inside, self.opening = [self.buf[at + len(TOOL_CALLS):]], True, TOOL_CALLS
            self.buf = ""
            return content, []
        if not self.said:  # llama3_json: only an output that starts with a call is one
            if not self.buf:  # whitespace only so far
                head = text.lstrip()
                self.lead.append(text[:len(text) - len(head)])
                text = head
            self.buf += text
            if self.buf.startswith("{") or self.buf.startswith(PYTHON_TAG):
                self.held, self.inside, self.opening = [self.buf], True, "".join(self.lead)
                self.buf = ""
                return "", []
            if not self.buf or PYTHON_TAG.startswith(self.buf):
                return "", []  # whitespace, or what may be the start of the tag
            self.said, text, self.buf = True, "".join(self.lead) + self.buf, ""
        return self._text(text), []

    def _held_calls(self, body: str, calls: list[dict]) -> bool:
        """Whether the held text reads as calls to the request's tools (added to `calls`)."""
        if self.plan.parser == "mistral":
            objs = _mistral_calls(body)
        else:
            objs = _json_objects(body.strip().removeprefix(PYTHON_TAG))
        return objs is not None and self._add(objs, calls)

    def _text(self, text: str) -> str:
        """Text outside the calls, to send now: whitespace at its end waits for what follows it
        (more text: sent before it; a call: dropped; the end: sent only if no call was made), and
        whitespace right after a call is dropped."""
        if self.after_call:
            text = text.lstrip()
            self.after_call = not text
        text = self.pending + text
        sent = text.rstrip()
        self.pending = text[len(sent):]
        return sent

    def _hermes(self, body: str, calls: list[dict]) -> bool:
        """Whether `body` is a call's JSON ({"name", "arguments"}) to one of the tools, or a list of
        them (as SmolLM2 writes them); the calls are added to `calls` (past the first, dropped
        where parallel_tool_calls is false)."""
        obj = json_value(body)
        return self._add(obj if isinstance(obj, list) and obj else [obj], calls)

    def _add(self, objs: list, calls: list[dict]) -> bool:
        """Whether every one of `objs` is a call ({"name", "arguments" or "parameters"}) to one of
        the tools; if so they are added to `calls` (past the first, dropped where
        parallel_tool_calls is false)."""
        if not objs or not all(isinstance(o, dict) and isinstance(o.get("name"), str) and o["name"] in self.plan.names
                               for o in objs):
            return False
        made = []
        for o in objs:  # every call's arguments as text first: one that cannot be written makes none a call
            arguments = o.get("arguments", o.get("parameters", {}))
            try:
                made.append((o["name"], arguments if isinstance(arguments, str)
                             else json.dumps(arguments, ensure_ascii=False)))
            except RecursionError:  # decoded at a shallower stack than it is written again
                return False
        for name, arguments in made:
            if (call := self._call(name, arguments)) is not None:
                calls.append(call)
        return True


def _json_objects(text: str) -> list | None:
    """JSON values one after another, separated by whitespace or `;` (Llama 3's parallel calls);
    None where the text is not that."""
    decoder, out, at, text = json.JSONDecoder(), [], 0, text.strip()
    while at < len(text):
        try:
            value, at = decoder.raw_decode(text, at)
        except (ValueError, RecursionError):
            return None
        out.append(value)
        while at < len(text) and (text[at].isspace() or text[at] == ";"):
            at += 1
    return out


def _mistral_calls(body: str) -> list | None:
    """The calls after a [TOOL_CALLS]: a JSON array (v0.3 tokenizers) or object, or
    `name[ARGS]{...}` (v11 and later), after each [TOOL_CALLS] (empty ones skipped)."""
    out = []
    for part in (p.strip() for p in body.split(TOOL_CALLS)):
        if not part:
            continue
        if part.startswith(("[", "{")):
            value = json_value(part)
            if not isinstance(value, (list, dict)):
                return None
            out += value if isinstance(value, list) else [value]
            continue
        name, sep, arguments = part.partition(ARGS)
        value = json_value(arguments) if sep else None
        if value is None:
            return None
        out.append({"name": name.strip(), "arguments": value})
    return out


def json_value(text: str):
    """The JSON value of a model's text, or None where it is not one."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # a model's text may nest past Python's stack
        return None


def read_whole(plan: Plan, text: str, reason: str | None) -> tuple[str | None, list[dict], str | None]:
    """A whole answer's (content, tool calls, finish reason): content None where calls stand alone."""
    reader = Reader(plan)
    pieces = [reader.push(text), reader.finish()]
    content = "".join(c for c, _ in pieces)
    calls: dict[int, dict] = {}
    for _, deltas in pieces:
        for d in deltas:
            if "id" in d:
                calls[d["index"]] = {"id": d["id"], "type": "function", "function": dict(d["function"])}
            else:
                calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
    out = [calls[i] for i in sorted(calls)]
    return (content or None) if out else content, out, reader.finish_reason(reason)
