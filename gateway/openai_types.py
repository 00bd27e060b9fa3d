"""OpenAI request bodies (/v1/completions, /v1/chat/completions) and their validation.

Types are strict (a string where a number belongs is a 400, not a coercion); unknown fields are
ignored, as OpenAI does. Each check names the parameter and says what to change.
"""

from __future__ import annotations

import re
import typing
from typing import Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictFloat, StrictInt, StrictStr,
                      model_validator)

from common import grammar
from common.errors import BadRequest
from common.protocol import MAX_LOGIT_BIAS, MAX_REPETITION_PENALTY, MAX_STOP_TOKENS, MIN_REPETITION_PENALTY
from gateway import tools

Number = StrictFloat | StrictInt
MAX_STOP_CHARS = 512  # per stop string: each is matched against the tail of the text at every token
# choices in one request (prompts x n): each is a request of its own downstream, admitted, routed
# and resumed alone; more wait in the admission queue like any other requests
MAX_CHOICES = 128
MAX_LOGPROBS = 20  # alternatives a token's logprobs may show: vLLM's default --max-logprobs (OpenAI's chat: 20)
MAX_PROMPT_LOGPROBS = MAX_LOGPROBS


def unwritable(value, token_ids: bool = True, numbers: bool = False) -> str:
    """What in a parsed JSON value cannot be written as text again: "surrogate" (a string with a
    lone UTF-16 surrogate, "\\ud800": JSON allows the escape, Unicode text does not; the tokenizer
    and every encoder choke on it), with `numbers` "number" (NaN or an infinity, which Python's
    JSON reads), or "". `token_ids`: a list with ints at both ends is token ids, not walked."""
    import math

    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return "surrogate"
        elif numbers and isinstance(v, float) and not math.isfinite(v):
            return "number"
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list) and v and not (token_ids and type(v[0]) is int and type(v[-1]) is int):
            stack.extend(v)
    return ""


def nulls_as_defaults(cls: type[BaseModel], data):
    """A JSON null for a field that does not take one is its default, as if it were not sent:
    OpenAI's spec marks its optional fields nullable and vLLM reads null as unset, so clients
    send `"stream": null` or `"n": null`. A field that takes null keeps it."""
    if not isinstance(data, dict):
        return data
    return {k: v for k, v in data.items()
            if v is not None or k not in cls.model_fields or _nullable(cls.model_fields[k].annotation)}


def _nullable(annotation) -> bool:
    return annotation is Any or annotation is None or type(None) in typing.get_args(annotation)


def _nulls_in_schema(schema: dict, cls: type[BaseModel]) -> None:
    """The OpenAPI schema says so too: each field with a default takes null (nulls_as_defaults)."""
    for name, prop in schema.get("properties", {}).items():
        field = cls.model_fields.get(name)
        if field is not None and not field.is_required() and not _nullable(field.annotation):
            outer = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
            schema["properties"][name] = {"anyOf": [prop, {"type": "null"}], **outer}


class Body(BaseModel):
    """A JSON object of a request: unknown fields ignored (as OpenAI does), null as a default."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_nulls_in_schema)

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data):
        return nulls_as_defaults(cls, data)


class StreamOptions(Body):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM's: with include_usage, usage on every chunk too


class TextBody(Body):
    """A request body whose strings must be text: a lone UTF-16 surrogate anywhere is a 400 naming
    the field. Unknown fields are ignored, as OpenAI does. `WHOLE`: every value is looked at (a body
    with no field of token ids to skip, whose tools and the like come back in its answer), and NaN
    and infinities are refused too (Python's JSON reads them; no JSON writer writes them back)."""

    WHOLE: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        if isinstance(data, dict):
            for key, value in data.items():
                bad = unwritable(key) or unwritable(value, token_ids=not cls.WHOLE, numbers=cls.WHOLE)
                name = key if key in cls.model_fields else None
                if bad == "surrogate":
                    raise BadRequest(f"'{name or 'a field'}' holds a lone UTF-16 surrogate (an unpaired "
                                     "\\ud800-\\udfff escape): not valid Unicode text", name)
                if bad:
                    raise BadRequest(f"'{name or 'a field'}' holds NaN or Infinity: not a JSON number", name)
        return data


class TranslatedBody(TextBody):
    """A body of another API that is served as the chat request it translates to (OpenAI's
    Responses, Anthropic's Messages): vLLM's sampling extensions, which pass to chat as they are,
    and chat's 400s about the translation said in this API's names (`renamed`)."""

    WHOLE = True  # no field of token ids to skip; what the request gives may come back in the answer
    EXTENSIONS: ClassVar[tuple[str, ...]] = ("seed", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                                             "frequency_penalty", "ignore_eos", "min_tokens", "chat_template_kwargs")
    RENAMED: ClassVar[dict[str, str]] = {}  # chat's field: this API's
    RENAMED_WORDS: ClassVar[tuple[str, ...] | None] = None  # those renamed in messages too (None: all)
    MAX_TOKENS: ClassVar[tuple[str, str]] = ("", "")  # chat's word in messages ("lower max_tokens"; a regex), this API's
    seed: StrictInt | None = None
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt | None = None
    chat_template_kwargs: dict | None = None

    def extensions(self) -> dict:
        return {name: getattr(self, name) for name in self.EXTENSIONS}

    def renamed(self, exc: BadRequest) -> BadRequest:
        """Chat's 400 about the translated request, in this API's names."""
        return renamed_error(exc, self.RENAMED, self.RENAMED_WORDS, self.MAX_TOKENS)


def renamed_error(exc: BadRequest, renamed: dict[str, str], words: tuple[str, ...] | None,
                  max_tokens: tuple[str, str]) -> BadRequest:
    """A 400 about a request translated into another API's (chat's, completions'), said in the
    names of the API the client spoke: each quoted field of `renamed` (of `words` only, where they
    are given, in the message) and the param; the word(s) `max_tokens[0]` (a regex) as `max_tokens[1]`."""
    theirs, ours = max_tokens
    message = re.sub(rf"\b{theirs}\b", ours, exc.message) if theirs else exc.message
    for name, mine in renamed.items():
        if words is None or name in words:
            message = message.replace(f"'{name}'", f"'{mine}'")
    out = type(exc)(message, renamed.get(exc.param, exc.param))
    out.code = exc.code
    return out


class SamplingFields(TextBody):
    """What completions and chat share."""

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None            # extension (as vLLM): 0 or -1 = off
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    user: StrictStr | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    ignore_eos: StrictBool = False            # extension (as vLLM)
    repetition_penalty: Number | None = None  # extension (as vLLM): 1 = off
    min_p: Number | None = None               # extension (as vLLM): 0 = off
    return_tokens_as_token_ids: StrictBool | None = None  # extension (as vLLM): logprobs' tokens as "token_id:N"
    min_tokens: StrictInt | None = None       # extension (as vLLM): 0 = off
    prompt_logprobs: StrictInt | None = None  # extension (as vLLM): each prompt token's logprob, rank and the k likeliest
    stop_token_ids: list[StrictInt] | None = None  # extension (as vLLM): token ids that end the output
    include_stop_str_in_output: StrictBool = False  # extension (as vLLM): the stop string or token kept in the text
    skip_special_tokens: StrictBool = True    # extension (as vLLM): special tokens left out of the text
    truncate_prompt_tokens: StrictInt | None = None  # extension (as vLLM): keep the prompt's last k tokens (-1: the context's)
    # structured output (common/grammar.py): OpenAI's response_format, or vLLM's structured_outputs
    # or its older guided_* fields; one of them at most
    response_format: dict | None = None
    structured_outputs: dict | None = None
    guided_json: dict | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    guided_whitespace_pattern: StrictStr | None = None  # JSON: the whitespace allowed (a regex)
    guided_decoding_backend: StrictStr | None = None   # accepted, unused: one backend here (llguidance)
    _grammar: str = PrivateAttr("")

    @property
    def echoes(self) -> bool:
        return False

    @property
    def max_tokens_field(self) -> str:
        """The field the client named the output's length by (what an error about it names)."""
        return "max_tokens"

    def check_common(self) -> None:
        if not 1 <= self.n <= MAX_CHOICES:
            raise BadRequest(f"'n' = {self.n}: must be between 1 and {MAX_CHOICES}", "n")
        if self.max_tokens is not None and self.max_tokens < 1 and not (self.max_tokens == 0 and self.echoes):
            raise BadRequest(f"'max_tokens' = {self.max_tokens}: must be at least 1 (0 only with 'echo' on "
                             "/v1/completions: the prompt back, with its logprobs if asked, nothing generated)",
                             "max_tokens")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise BadRequest(f"'temperature' = {self.temperature}: must be between 0 and 2 (0 = greedy)", "temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise BadRequest(f"'top_p' = {self.top_p}: must be in (0, 1]", "top_p")
        if self.top_k is not None and self.top_k < -1:
            raise BadRequest(f"'top_k' = {self.top_k}: must be -1 or 0 (off) or a positive number", "top_k")
        if self.seed is not None and not -(1 << 63) <= self.seed < 1 << 64:
            raise BadRequest(f"'seed' = {self.seed}: must fit in 64 bits", "seed")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not -2 <= value <= 2:
                raise BadRequest(f"'{name}' = {value}: must be between -2 and 2", name)
        if (self.repetition_penalty is not None
                and not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise BadRequest(f"'repetition_penalty' = {self.repetition_penalty}: must be between {MIN_REPETITION_PENALTY:g} "
                             f"and {MAX_REPETITION_PENALTY:g} (1 = off)", "repetition_penalty")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise BadRequest(f"'min_p' = {self.min_p}: must be between 0 and 1", "min_p")
        if self.truncate_prompt_tokens is not None and not (self.truncate_prompt_tokens == -1
                                                            or self.truncate_prompt_tokens >= 1):
            raise BadRequest(f"'truncate_prompt_tokens' = {self.truncate_prompt_tokens}: must be at least 1 (or -1: as "
                             "many as the context holds)", "truncate_prompt_tokens")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_PROMPT_LOGPROBS:
            raise BadRequest(f"'prompt_logprobs' = {self.prompt_logprobs}: must be between 0 and {MAX_PROMPT_LOGPROBS} "
                             "(the likeliest tokens shown at each prompt position, beside the prompt's own)",
                             "prompt_logprobs")
        if self.prompt_logprobs is not None and self.stream:
            raise BadRequest("'prompt_logprobs' is not available when streaming (as vLLM's): ask without 'stream'",
                             "prompt_logprobs")
        if self.min_tokens is not None and self.min_tokens < 0:
            raise BadRequest(f"'min_tokens' = {self.min_tokens}: must be at least 0", "min_tokens")
        self.logit_bias_pairs()
        if self.stop_token_ids and len(self.stop_token_ids) > MAX_STOP_TOKENS:
            raise BadRequest(f"'stop_token_ids' has {len(self.stop_token_ids)} ids: at most {MAX_STOP_TOKENS}",
                             "stop_token_ids")
        if self.stream_options is not None and not self.stream:
            raise BadRequest("'stream_options' is only allowed with 'stream': true", "stream_options")
        if any(s == "" for s in self.stop_list):
            raise BadRequest("'stop' strings must not be empty", "stop")
        if len(self.stop_list) > 16:
            raise BadRequest(f"'stop' has {len(self.stop_list)} strings: at most 16", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop_list):
            raise BadRequest(f"'stop' strings must be at most {MAX_STOP_CHARS} characters", "stop")
        self._grammar = self._compile_grammar()

    @property
    def constrained(self) -> bool:
        """It asks for structured output (a grammar to compile)."""
        return any(value is not None for _, _, value in self._structured())

    @property
    def grammar(self) -> str:
        """The grammar text of its structured output ("" for free text), once `check` has run."""
        return self._grammar

    def _compile_grammar(self) -> str:
        asked = [(param, kind, value) for param, kind, value in self._structured() if value is not None]
        if len(asked) > 1:
            raise BadRequest(f"{' and '.join(repr(a[0]) for a in asked)} each constrain the output: give one",
                             asked[1][0])
        if not asked:
            return ""
        param, kind, value = asked[0]
        so = self.structured_outputs or {}
        whitespace = self.guided_whitespace_pattern or so.get("whitespace_pattern")
        if whitespace is not None and not isinstance(whitespace, str):
            raise BadRequest("'structured_outputs.whitespace_pattern' must be a string (a regex)", "structured_outputs")
        try:
            return grammar.from_request(kind, value, whitespace, compact=so.get("disable_any_whitespace") is True,
                                        closed=so.get("disable_additional_properties") is True)
        except grammar.GrammarError as exc:
            raise BadRequest(f"'{param}': {exc}", param.split(".")[0]) from None

    def _structured(self) -> list[tuple[str, str, object]]:
        """(param, grammar kind, value) of each structured-output field; value None where unset."""
        out = [("guided_json", "json", self.guided_json), ("guided_regex", "regex", self.guided_regex),
               ("guided_choice", "choice", self.guided_choice), ("guided_grammar", "grammar", self.guided_grammar)]
        so = self.structured_outputs or {}
        for key, value in so.items():
            if key in ("json", "regex", "choice", "grammar", "json_object"):  # the grammar kinds of common/grammar.py
                if key == "json_object":
                    value = True if value is True else None
                out.append((f"structured_outputs.{key}", key, value))
            elif value not in (None, False) and key not in ("disable_fallback", "disable_any_whitespace",
                                                             "disable_additional_properties", "whitespace_pattern"):
                raise BadRequest(f"'structured_outputs.{key}' is not supported (json, regex, choice, grammar or "
                                 "json_object are)", "structured_outputs")
        out.append(("response_format", *self._response_format()))
        return out

    def _response_format(self) -> tuple[str, object]:
        rf = self.response_format
        kind = rf.get("type") if rf is not None else "text"
        if kind == "text":
            return "json", None
        if kind == "json_object":
            return "json_object", True
        if kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise BadRequest("'response_format' of type json_schema needs 'json_schema': {'name': ..., "
                                 "'schema': {...}}", "response_format")
            return "json", spec["schema"]
        raise BadRequest(f"'response_format' type {str(kind)[:40]!r}: must be 'text', 'json_object' or 'json_schema'",
                         "response_format")

    def logit_bias_pairs(self) -> list[tuple[int, float]]:
        """'logit_bias' as (token id, bias) pairs; a 400 for a key that is not a token id, a bias
        outside [-100, 100], or too many of them. (The vocabulary's bound is checked with the prompt.)"""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()) or len(key) > 10 or key != str(int(key)):  # "05" would be 5 twice
                raise BadRequest(f"'logit_bias' key {key[:40]!r}: must be a token id (a non-negative integer, as a "
                                 "string, without leading zeros)", "logit_bias")
            if not -100 <= bias <= 100:
                raise BadRequest(f"'logit_bias' of token {key}: {bias} is outside [-100, 100]", "logit_bias")
            pairs.append((int(key), float(bias)))
        if len(pairs) > MAX_LOGIT_BIAS:
            raise BadRequest(f"'logit_bias' has {len(pairs)} tokens: at most {MAX_LOGIT_BIAS}", "logit_bias")
        return pairs

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats


class CompletionRequest(SamplingFields):
    MAX_LOGPROBS: ClassVar[int] = MAX_LOGPROBS  # vLLM's (OpenAI's legacy completions: 5)
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]] | None = None
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def check(self) -> None:
        self.check_common()
        if self.logprobs is not None and not 0 <= self.logprobs <= self.MAX_LOGPROBS:
            raise BadRequest(f"'logprobs' = {self.logprobs}: must be between 0 and {self.MAX_LOGPROBS}", "logprobs")
        if self.best_of not in (None, 1):
            raise BadRequest(f"'best_of' = {self.best_of}: only 1 is supported", "best_of")
        if self.suffix:
            raise BadRequest("'suffix' is not supported", "suffix")

    @property
    def echoes(self) -> bool:
        return self.echo

    def prompts(self) -> list[str | list[int]]:
        """The prompts, as text or token ids: one, or a batch of them (a list of strings or of
        token-id lists), each answered by `n` choices."""
        p = self.prompt
        if p is None:
            raise BadRequest("'prompt' is required", "prompt")
        batch = p if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]
        if len(batch) * self.n > MAX_CHOICES:
            raise BadRequest(f"'prompt' holds {len(batch)} prompts and 'n' is {self.n}: at most {MAX_CHOICES} "
                             "choices a request; send the rest in another", "prompt")
        if any(len(one) == 0 for one in batch):
            raise BadRequest("'prompt' must not be empty" if len(batch) == 1 else "'prompt' holds an empty prompt",
                             "prompt")
        return batch


class ChatMessage(Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[dict] | None = None
    tool_calls: list | None = None       # an assistant's calls (gateway/tools.py)
    tool_call_id: StrictStr | None = None  # a tool's answer: to which call
    name: StrictStr | None = None

    def for_template(self) -> dict:
        """The message as chat templates read it (with its tool fields, where it has them)."""
        out = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = tools.template_messages(self.tool_calls)
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise BadRequest("message content parts must be {'type': 'text', 'text': ...}", "messages")
                parts.append(part["text"])
            return "\n".join(parts)  # as vLLM joins them: words at the parts' edges stay apart
        return self.content or ""


# Chat fields whose meaning we do not implement (OpenAI's deprecated form of tools): ignoring them
# would answer something else than was asked, so they are refused unless empty
UNSUPPORTED_CHAT = ("functions", "function_call")


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")  # OpenAI's

# apply_chat_template's own arguments: chat_template_kwargs may not set them
TEMPLATE_ARGUMENTS = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
                                "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                                "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(default_factory=list)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: Any = None                 # gateway/tools.py
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None
    # vLLM's: how the messages become the prompt (passed to the chat template)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict | None = None
    chat_template: StrictStr | None = None  # refused: a request's own template is code the server would run
    reasoning_effort: StrictStr | None = None  # OpenAI's: the template's `reasoning_effort` (unless kwargs set it)
    include_reasoning: StrictBool = True  # vLLM's: false leaves the thinking out of the answer
    functions: Any = None             # refused unless empty (UNSUPPORTED_CHAT)
    function_call: Any = None
    echo: StrictBool = False          # vLLM's (the last message's content put before the answer's): refused
    _plan: tuple | None = PrivateAttr(None)

    @property
    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def check(self) -> None:
        if self.max_completion_tokens is not None:  # OpenAI's current name wins over the deprecated one, as there
            if self.max_completion_tokens < 1:
                raise BadRequest(f"'max_completion_tokens' = {self.max_completion_tokens}: must be at least 1",
                                 "max_completion_tokens")
            self.max_tokens = self.max_completion_tokens
        self.check_common()
        if not self.messages:
            raise BadRequest("'messages' must hold at least one message", "messages")
        for i, m in enumerate(self.messages):  # as OpenAI: only an assistant's turn may have no content
            if m.content is None and m.role != "assistant":
                raise BadRequest(f"messages[{i}] ({m.role}) has no 'content': give a string or text parts", "messages")
            if m.tool_calls and m.role != "assistant":
                raise BadRequest(f"messages[{i}] ({m.role}) has 'tool_calls': only an assistant's message may",
                                 "messages")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise BadRequest(f"'top_logprobs' = {self.top_logprobs}: must be between 0 and {MAX_LOGPROBS}", "top_logprobs")
        if self.top_logprobs and not self.logprobs:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if self.continue_final_message and self.add_generation_prompt:
            raise BadRequest("'continue_final_message' continues the last message: set 'add_generation_prompt' to false "
                             "(both cannot be true)", "continue_final_message")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise BadRequest("'continue_final_message' continues the last message, which must be the assistant's",
                             "continue_final_message")
        if self.reasoning_effort is not None:
            if self.reasoning_effort not in REASONING_EFFORTS:
                raise BadRequest(f"'reasoning_effort' = {self.reasoning_effort[:40]!r}: must be one of "
                                 f"{', '.join(REASONING_EFFORTS)}", "reasoning_effort")
            self.chat_template_kwargs = {"reasoning_effort": self.reasoning_effort, **(self.chat_template_kwargs or {})}
        reserved = set(self.chat_template_kwargs or {}) & TEMPLATE_ARGUMENTS
        if reserved:
            raise BadRequest(f"'chat_template_kwargs' may not set {sorted(reserved)[0]!r}: give it as a field of its "
                             "own, or leave it to the server", "chat_template_kwargs")
        if self.chat_template is not None:
            raise BadRequest("'chat_template' is not accepted: a request's own template is code this server would "
                             "run; the model's template is used (its variables: 'chat_template_kwargs')",
                             "chat_template")
        if self.echo:
            raise BadRequest("'echo' is not supported on chat (on completions it is): with 'continue_final_message', "
                             "put the last message's text before the answer's yourself", "echo")
        for name in UNSUPPORTED_CHAT:
            value = getattr(self, name)
            if value not in (None, [], {}, "none", "auto"):
                raise BadRequest(f"'{name}' is not supported (OpenAI's deprecated form): give 'tools' and "
                                 "'tool_choice' instead", name)

    @property
    def tool_plan(self) -> tools.Plan | None:
        """What its tools ask for (None: no tools); a 400 for malformed ones."""
        if self._plan is None:
            self._plan = (tools.plan(self.tools, self.tool_choice, self.parallel_tool_calls),)
        return self._plan[0]

    def _structured(self) -> list[tuple[str, str, object]]:
        plan = self.tool_plan  # a named function or "required": a JSON schema the output follows
        return super()._structured() + [("tools", "json", plan.schema() if plan else None)]

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
