"""SGLang's native API: POST /generate (and the routes its clients call beside it), served by the
completions machinery, for SGLang's own load client (`python -m sglang.bench_serving --backend
sglang`) and the RL rollout frameworks that post token ids to it (verl, slime).

A request holds one prompt or a batch: `text` (a string or a list of them) or `input_ids` (token
ids, or a list of such lists; where both are given the ids are the prompt, as SGLang's), and
`sampling_params` (one dict for every prompt, or a list, one a prompt). Each prompt becomes the
completion request its sampling parameters say (`GenerateRequest.items`): `max_new_tokens`
(default 128; null: what the context leaves; 0: the prompt only, scored where logprobs are asked),
`min_new_tokens`, `stop`, `stop_token_ids`, `temperature` (0: greedy), `top_p`, `top_k` (-1: off),
`min_p`, the three penalties, `n`, `ignore_eos`, `skip_special_tokens`, `no_stop_trim` (the stop
string or token kept in the text), `logit_bias`, `sampling_seed`, and structured output by
`json_schema`, `regex`, `ebnf` (GBNF) or `choice`. `spaces_between_special_tokens`,
`stream_interval` and `custom_params` are accepted and have no effect; any other key is a 400, as
SGLang's (its seed is `sampling_seed`, not `seed`). With `return_logprob`, each output token comes
with its logprob and `top_logprobs_num` alternatives (0-20); `logprob_start_len` k >= 0 scores the
prompt too, from its token k (the first token's logprob null), -1 (the default) does not.

The answer is SGLang's: `{"text", "output_ids", "meta_info": {"id", "finish_reason",
"prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency", ...}}`, where `output_ids`
keeps the token that stopped the output (EOS or a stop token) and `text` does not, and
finish_reason is {"type": "length", "length": max_new_tokens} or {"type": "stop", "matched": the
stop string, or the token id that ended it}. Logprobs are [logprob, token id, text or null]
entries in meta_info (`output_token_logprobs`, `output_top_logprobs`, `input_token_logprobs`,
`input_top_logprobs`). A batch, or n > 1, is answered with a list, prompt by prompt and each
prompt's n in turn. `meta_info.id` is the request's `rid` (`rid_i` for a batch given one string,
our request id for n > 1, as SGLang's), our request id where none is given; every log line
carries ours, with the client's rid logged beside it once.

Streamed, every token is an SSE event `data: {...}` holding everything so far (text, output_ids
and logprobs are cumulative, as SGLang streams by default and bench_serving reads them), with
`"index"` where the answer is a list, and `data: [DONE]` at the end. A failure mid-stream is a
`data: {"error": {...}}` event, then [DONE].

Errors are 400s (404s, 429s, ...) with our body, {"error": {"message", "type", "param", "code"}},
which holds SGLang's own {"error": {"message"}}. Refused: multimodal input, `input_embeds`, LoRA
adapters, hidden states, custom logit processors, `token_ids_logprob`, `stop_regex`,
`structural_tag`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pydantic import StrictBool, StrictInt, StrictStr, ValidationError

from common.errors import BadRequest
from gateway.jobs import LARGE_TEXT_CHARS, Delta, Job, Limits, completion_jobs
from gateway.openai_types import MAX_CHOICES, MAX_PROMPT_LOGPROBS, CompletionRequest, TextBody, renamed_error
from gateway.responses import Totals, _token_text, cached_tokens, replayed, sse

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's
# SGLang's sampling parameters: what completions call each
SAMPLING = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "stop": "stop",
            "stop_token_ids": "stop_token_ids", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
            "min_p": "min_p", "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
            "repetition_penalty": "repetition_penalty", "n": "n", "ignore_eos": "ignore_eos",
            "skip_special_tokens": "skip_special_tokens", "no_stop_trim": "include_stop_str_in_output",
            "logit_bias": "logit_bias", "sampling_seed": "seed", "json_schema": "guided_json",
            "regex": "guided_regex", "ebnf": "guided_grammar", "choice": "guided_choice"}
IGNORED = ("spaces_between_special_tokens", "stream_interval", "custom_params")  # no effect here
REFUSED = {"stop_regex": "stop regexes", "structural_tag": "structural tags", "beam_width": "beam search",
           "watermark": "watermarks"}
# completions' names in its errors: SGLang's (a sampling parameter's under sampling_params)
RENAMED = {ours: f"sampling_params.{theirs}" for theirs, ours in SAMPLING.items()} | {
    "logprobs": "top_logprobs_num", "echo": "logprob_start_len", "prompt_logprobs": "logprob_start_len"}
# fields SGLang serves and this server does not: refused unless unset (null, false, empty)
UNSERVED = {"input_embeds": "input embeddings", "image_data": "images", "video_data": "video",
            "audio_data": "audio", "lora_path": "LoRA adapters", "return_hidden_states": "hidden states",
            "custom_logit_processor": "custom logit processors", "token_ids_logprob": "logprobs of chosen tokens",
            "session_params": "sessions"}


@dataclass
class Shown:
    """How one job's answer is shown: what its request asked beside the completion."""

    rid: str                # meta_info.id
    max_new_tokens: int     # a length finish's `length`
    logprobs: bool          # return_logprob
    top: int                # top_logprobs_num
    start: int              # logprob_start_len (-1: the prompt not scored)
    index: int | None       # its place in a list answer (None: the answer is one object)
    texts: bool = False     # return_text_in_logprobs
    prompt_ids: bool = False  # return_prompt_token_ids


class GenerateRequest(TextBody):
    """The body of POST /generate. Unknown top-level fields are ignored, as SGLang's; an unknown
    sampling parameter is a 400."""

    text: StrictStr | list[StrictStr] | None = None
    input_ids: list[StrictInt] | list[list[StrictInt]] | None = None
    sampling_params: dict | list[dict] | None = None
    rid: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    return_logprob: StrictBool | list[StrictBool] | None = None
    logprob_start_len: StrictInt | list[StrictInt] | None = None
    top_logprobs_num: StrictInt | list[StrictInt] | None = None
    return_text_in_logprobs: StrictBool = False
    return_prompt_token_ids: StrictBool = False
    input_embeds: Any = None
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    lora_path: Any = None
    return_hidden_states: Any = None
    custom_logit_processor: Any = None
    token_ids_logprob: Any = None
    session_params: Any = None

    def prompts(self) -> tuple[list[str | list[int]], bool]:
        """(the prompts, whether the answer is a list: a batch was given)."""
        for name, what in UNSERVED.items():
            if getattr(self, name) not in (None, False, [], {}, ""):
                raise BadRequest(f"'{name}': {what} are not supported on this server", name)
        if self.input_ids is not None:
            batch = bool(self.input_ids) and isinstance(self.input_ids[0], list)
            prompts, name = (self.input_ids if batch else [self.input_ids]), "input_ids"
        elif self.text is not None:
            batch = isinstance(self.text, list)
            prompts, name = (self.text if batch else [self.text]), "text"
        else:
            raise BadRequest("give the prompt as 'text' or 'input_ids'", "text")
        if not prompts:
            raise BadRequest(f"'{name}' holds no prompts", name)
        if any(len(p) == 0 for p in prompts):
            raise BadRequest(f"'{name}' holds an empty prompt" if batch else f"'{name}' must not be empty", name)
        return prompts, batch

    def per_prompt(self, name: str, count: int, default):
        """A field given once for every prompt or as a list, one a prompt: the list."""
        value = getattr(self, name)
        if isinstance(value, list):
            if len(value) != count:
                raise BadRequest(f"'{name}' has {len(value)} entries for {count} prompts: give one a prompt, or "
                                 "one value for all", name)
            return [default if v is None else v for v in value]
        return [default if value is None else value] * count

    def items(self) -> list[tuple[CompletionRequest, Shown]]:
        """Each prompt as the completion request it is, and how its answers are shown."""
        prompts, batch = self.prompts()
        count = len(prompts)
        params = self.per_prompt("sampling_params", count, {})
        logprobs = self.per_prompt("return_logprob", count, False)
        starts = self.per_prompt("logprob_start_len", count, -1)
        tops = self.per_prompt("top_logprobs_num", count, 0)
        rids = self.per_prompt("rid", count, None) if isinstance(self.rid, list) else (
            [self.rid if not batch or self.rid is None else f"{self.rid}_{i}" for i in range(count)])
        out, choices = [], 0
        for i, prompt in enumerate(prompts):
            request, max_new = _completion(prompt, params[i], logprobs[i], starts[i], tops[i], self.stream)
            if logprobs[i] and starts[i] < -1:  # (past the prompt's end: checked on its ids, GenerateForm.jobs)
                raise BadRequest(f"'logprob_start_len' = {starts[i]}: must be -1 (the prompt not scored) or a "
                                 "position in the prompt", "logprob_start_len")
            choices += request.n
            if choices > MAX_CHOICES and i > 0:  # (one prompt's n past it: completions' 400 names n)
                raise BadRequest(f"the request asks for {choices}+ answers (prompts x n): at most {MAX_CHOICES}; send "
                                 "the rest in another", "text" if self.input_ids is None else "input_ids")
            listed = batch or request.n > 1
            out.append((request, Shown(rids[i] or "", max_new, logprobs[i], tops[i], starts[i] if logprobs[i] else -1,
                                       0 if listed else None, self.return_text_in_logprobs,
                                       self.return_prompt_token_ids)))
        return out

    @property
    def large(self) -> bool:
        """Text past LARGE_TEXT_CHARS, or a grammar to compile: its jobs are made off the event loop."""
        texts = [] if self.input_ids is not None else [self.text] if isinstance(self.text, str) else self.text or []
        params = self.sampling_params if isinstance(self.sampling_params, list) else [self.sampling_params or {}]
        grammar = any(isinstance(p, dict) and any(p.get(k) for k in ("json_schema", "regex", "ebnf", "choice"))
                      for p in params)
        return grammar or sum(len(t) for t in texts) >= LARGE_TEXT_CHARS


class _Item(CompletionRequest):
    """One prompt of a /generate request on completions: logprobs up to vLLM's 20 (SGLang's
    top_logprobs_num), not OpenAI's 5."""

    def check(self) -> None:
        self.check_common()
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_PROMPT_LOGPROBS:
            raise BadRequest(f"'logprobs' = {self.logprobs}: must be between 0 and {MAX_PROMPT_LOGPROBS}", "logprobs")


def _completion(prompt, params, logprob: bool, start: int, top: int, stream: bool) -> tuple[_Item, int | None]:
    """(one prompt's completion request, its max_new_tokens: None where the context decides)."""
    body: dict[str, Any] = {"prompt": prompt, "stream": stream}
    for key, value in params.items():
        if key in REFUSED:
            if value not in (None, "", [], False):
                raise BadRequest(f"'sampling_params.{key}': {REFUSED[key]} are not supported on this server",
                                 "sampling_params")
        elif key not in SAMPLING and key not in IGNORED:
            hint = " (the seed is 'sampling_seed')" if key == "seed" else ""
            raise BadRequest(f"'sampling_params' has an unknown field {key[:64]!r}{hint}; known: "
                             f"{', '.join(SAMPLING)}", "sampling_params")
        elif key in SAMPLING and value is not None and value != "":
            body[SAMPLING[key]] = value
    max_new = params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if "max_new_tokens" not in params:
        body["max_tokens"] = DEFAULT_MAX_NEW_TOKENS
    if isinstance(max_new, int) and not isinstance(max_new, bool) and max_new < 0:
        raise BadRequest(f"'sampling_params.max_new_tokens' = {max_new}: must be at least 0", "sampling_params")
    if body.get("top_k") == -1:
        body["top_k"] = 0  # off, in either's words
    if logprob and (start >= 0 or max_new != 0):
        body["logprobs"] = top
        body["echo"] = start >= 0  # completions' echo with logprobs: the prompt scored
    if max_new == 0:
        body["echo"] = True  # completions' max_tokens 0: the prompt alone, nothing generated
    try:
        return _Item(**body), max_new
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        theirs = next((k for k, v in SAMPLING.items() if v == where.split(".")[0]), where)
        raise BadRequest(f"'sampling_params.{theirs}': {first.get('msg')}", "sampling_params") from None


class GenerateForm:
    """How a /generate request's answer is written (the interface serve() calls: body, merged,
    writer): its jobs, each with how it is shown (`shown`, by request id)."""

    name = "generate"

    def __init__(self, request: GenerateRequest):
        self.request = request
        self.shown: dict[str, Shown] = {}

    def jobs(self, tokenizer, limits: Limits) -> list[Job]:
        """Every prompt's jobs (its n), prompt after prompt; a 400 in SGLang's names."""
        out = []
        items = self.request.items()  # its own 400s say SGLang's names already
        try:
            for request, shown in items:
                default = limits.max_model_len  # max_new_tokens null: what the context leaves
                made = completion_jobs(request, tokenizer, limits, default_max=default)
                for job in made:
                    if shown.start >= len(job.prompt_ids):
                        raise BadRequest(f"'logprob_start_len' = {shown.start} is not a position of the prompt's "
                                         f"{len(job.prompt_ids)} tokens", "logprob_start_len")
                    listed = shown.index is not None or len(made) > 1
                    self.shown[job.request_id] = Shown(
                        job.request_id if len(made) > 1 or not shown.rid else shown.rid,
                        job.sampling.max_tokens if not job.echo_only else 0, shown.logprobs, shown.top, shown.start,
                        len(out) if listed else None, shown.texts, shown.prompt_ids)
                    out.append(job)
        except BadRequest as exc:
            prompt = "text" if self.request.input_ids is None else "input_ids"
            raise renamed_error(exc, RENAMED | {"prompt": prompt}, None, ("max_tokens", "max_new_tokens")) from None
        return out

    def body(self, job: Job, totals: Totals, tokenizer) -> dict | list:
        """The whole answer of one job: what its stream's last event holds (its deltas replayed
        through a writer that writes nothing), so the two cannot differ; a list where the request
        was a batch."""
        writer = self.writer(job, tokenizer)
        writer.prompt_scores = totals.prompt  # (the replayed deltas do not carry them)
        for delta in replayed(totals) if totals.tokens else [Delta("", [], totals.finish_reason)]:  # [] : max 0
            writer.delta(delta, quiet=True)
        answer = writer.answer(latency=True)
        answer.pop("index", None)
        return [answer] if writer.shown.index is not None else answer

    def merged(self, jobs: list[Job], totals: list[Totals], tokenizer) -> list:
        return [one for job, t in zip(jobs, totals) for one in self.body(job, t, tokenizer)]

    def writer(self, job: Job, tokenizer, index: int = 0) -> GenerateWriter:
        return GenerateWriter(job, tokenizer, self.shown[job.request_id])


class GenerateWriter:
    """The SSE events of one streamed job, with the interface of responses.ChunkWriter (first,
    delta, end, failed, done): each event holds the whole answer so far (SGLang's cumulative
    stream)."""

    def __init__(self, job: Job, tokenizer, shown: Shown):
        self.job, self.tokenizer, self.shown = job, tokenizer, shown
        self.text: list[str] = []
        self.totals = Totals()
        self.prompt_scores: list | None = None

    def first(self, delta: Delta) -> list[str]:
        return []

    def delta(self, d: Delta, quiet: bool = False) -> str | None:
        self.text.append(d.text)
        self.totals.add(d)
        if d.prompt is not None and self.prompt_scores is None:
            self.prompt_scores = d.prompt
        return None if quiet else sse(self.answer(latency=d.finish_reason is not None))

    def answer(self, latency: bool = False) -> dict:
        """SGLang's answer so far: text, output_ids, meta_info (e2e_latency once it ends)."""
        job, totals, shown = self.job, self.totals, self.shown
        meta: dict[str, Any] = {"id": shown.rid, "finish_reason": self._finish_reason(),
                                "prompt_tokens": len(job.prompt_ids), "completion_tokens": len(totals.tokens),
                                "cached_tokens": cached_tokens(totals), "weight_version": "default"}
        if shown.logprobs:
            meta |= self._logprobs()
        if latency:
            meta["e2e_latency"] = time.perf_counter() - job.arrived
        out = {"text": "".join(self.text), "output_ids": [t.token_id for t in totals.tokens], "meta_info": meta}
        if shown.prompt_ids:
            out["prompt_token_ids"] = job.prompt_ids
        if shown.index is not None:
            out["index"] = shown.index
        return out

    def _finish_reason(self) -> dict | None:
        reason, totals = self.totals.finish_reason, self.totals
        if reason is None:
            return None
        if reason == "length":
            return {"type": "length", "length": self.shown.max_new_tokens}
        if totals.stop is not None:  # a stop string, or a stop token of the request's
            return {"type": "stop", "matched": totals.stop}
        return {"type": "stop", "matched": totals.tokens[-1].token_id if totals.tokens else None}  # EOS

    def _entry(self, logprob: float | None, token_id: int) -> list:
        return [logprob, token_id, _token_text(self.tokenizer, token_id) if self.shown.texts else None]

    def _logprobs(self) -> dict:
        """meta_info's logprob lists: the output's, and the prompt's from logprob_start_len."""
        tokens, top = self.totals.tokens, self.shown.top
        out: dict[str, Any] = {"output_token_logprobs": [self._entry(t.logprob, t.token_id) for t in tokens],
                               "input_token_logprobs": []}
        if top:
            out["output_top_logprobs"] = [[self._entry(x.logprob, x.token_id) for x in (t.top_logprobs or [])[:top]]
                                          for t in tokens]
            out["input_top_logprobs"] = []
        if self.shown.start >= 0 and self.prompt_scores is not None:
            ids, start = self.job.prompt_ids, self.shown.start
            out["input_token_logprobs"] = ([self._entry(None, ids[0])] + [self._entry(p.logprob, p.token_id)
                                                                           for p in self.prompt_scores])[start:]
            if top:
                out["input_top_logprobs"] = ([None] + [[self._entry(x.logprob, x.token_id) for x in p.top_logprobs[:top]]
                                                       for p in self.prompt_scores])[start:]
        return out

    def end(self, totals: Totals) -> str:
        return ""

    def failed(self, exc) -> str:
        return sse(exc.client_body(self.job.request_id))

    def done(self) -> str:
        return sse("[DONE]")
