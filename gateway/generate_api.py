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
prompt too, its tokens from k on (the first of them null, as SGLang's: the logits before it are not
computed there), -1 (the default) does not. The logprobs are the model's own, before temperature,
penalties and logit_bias (vLLM's default; SGLang's are after temperature and the bias).

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
adapters, hidden states, custom logit processors, sessions, `token_ids_logprob`, `stop_regex`,
`structural_tag`, `beam_width`, `watermark`.

`POST /abort_request` {"rid", "abort_all"} ends the request whose meta_info.id is `rid` (or all
of them), as SGLang's: each answers with what it has, finish_reason {"type": "abort"},
queued ones too; `GET /v1/loads` counts the requests running and waiting, which RL frameworks
poll after aborting. A quiet stream (a failover's replay) sends its last
event again every 15 s, where other APIs send an SSE comment: SGLang's client reads every line as
JSON, and skips an event that adds no token.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from pydantic import StrictBool, StrictInt, StrictStr, ValidationError

from common.errors import BadRequest
from gateway.jobs import LARGE_TEXT_CHARS, Delta, Job, Limits, completion_jobs
from gateway.openai_types import MAX_CHOICES, CompletionRequest, TextBody, renamed_error
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
GRAMMARS = ("json_schema", "regex", "ebnf", "choice")  # "" is unset for these, as SGLang's


def _unset(value) -> bool:
    """Not given: null, false, empty, or a list of such (one a prompt)."""
    return value in (None, False, "", [], {}) or (isinstance(value, list) and all(_unset(v) for v in value))


class Item(NamedTuple):
    """One prompt of a request: its completion request, and what else it asked."""

    request: CompletionRequest
    rid: str | None         # the client's, for meta_info.id
    logprobs: bool          # return_logprob
    top: int                # top_logprobs_num
    start: int              # logprob_start_len (-1: the prompt not scored)
    listed: bool            # the answer is a list (a batch was given)


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
            if not _unset(getattr(self, name)):
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

    def items(self) -> list[Item]:
        """Each prompt as the completion request it is, and what else it asked."""
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
            if logprobs[i] and starts[i] < -1:  # (past the prompt's end: checked on its ids, GenerateForm.jobs)
                raise BadRequest(f"'logprob_start_len' = {starts[i]}: must be -1 (the prompt not scored) or a "
                                 "position in the prompt", "logprob_start_len")
            request = _completion(prompt, params[i], logprobs[i], starts[i], tops[i], self.stream)
            choices += request.n
            if choices > MAX_CHOICES and i > 0:  # (one prompt's n past it: completions' 400 names n)
                raise BadRequest(f"the request asks for {choices}+ answers (prompts x n): at most {MAX_CHOICES}; send "
                                 "the rest in another", "text" if self.input_ids is None else "input_ids")
            out.append(Item(request, rids[i], logprobs[i], tops[i], starts[i] if logprobs[i] else -1, batch))
        return out

    @property
    def large(self) -> bool:
        """Text past LARGE_TEXT_CHARS, or a grammar to compile: its jobs are made off the event loop."""
        texts = [] if self.input_ids is not None else [self.text] if isinstance(self.text, str) else self.text or []
        params = self.sampling_params if isinstance(self.sampling_params, list) else [self.sampling_params or {}]
        grammar = any(isinstance(p, dict) and any(p.get(k) for k in GRAMMARS) for p in params)
        return grammar or sum(len(t) for t in texts) >= LARGE_TEXT_CHARS


class AbortRequest(TextBody):
    """The body of POST /abort_request (SGLang's): end the request whose id is `rid`, or all of
    them. An empty (or null) rid without abort_all ends none, as SGLang's."""

    rid: StrictStr | None = None
    abort_all: StrictBool = False


def _completion(prompt, params: dict, logprob: bool, start: int, top: int, stream: bool) -> CompletionRequest:
    """One prompt's completion request."""
    body: dict[str, Any] = {"prompt": prompt, "stream": stream, "max_tokens": DEFAULT_MAX_NEW_TOKENS}
    for key, value in params.items():
        if key in REFUSED:
            if not _unset(value):
                raise BadRequest(f"'sampling_params.{key}': {REFUSED[key]} are not supported on this server",
                                 "sampling_params")
        elif key not in SAMPLING and key not in IGNORED:
            hint = " (the seed is 'sampling_seed')" if key == "seed" else ""
            raise BadRequest(f"'sampling_params' has an unknown field {key[:64]!r}{hint}; known: "
                             f"{', '.join(SAMPLING)}", "sampling_params")
        elif key in SAMPLING:
            if (value is not None or key == "max_new_tokens") and not (value == "" and key in GRAMMARS):
                body[SAMPLING[key]] = value  # null: the default (max_new_tokens': what the context leaves)
    max_new = body["max_tokens"]
    if type(max_new) is int and max_new < 0:
        raise BadRequest(f"'sampling_params.max_new_tokens' = {max_new}: must be at least 0", "sampling_params")
    if logprob and (start >= 0 or max_new != 0):
        body["logprobs"] = top
        body["echo"] = start >= 0  # completions' echo with logprobs: the prompt scored
    if max_new == 0:
        body["echo"] = True  # completions' max_tokens 0: the prompt alone, nothing generated
    try:
        return CompletionRequest(**body)
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
        self.arrived = time.perf_counter()  # meta_info.e2e_latency counts from here

    @property
    def large(self) -> bool:  # (app._tokenizing: its jobs made on the tokenizer thread)
        return self.request.large

    def jobs(self, tokenizer, limits: Limits) -> list[Job]:
        """Every prompt's jobs (its n), prompt after prompt; a 400 in SGLang's names."""
        out = []
        items = self.request.items()  # its own 400s say SGLang's names already
        try:
            for item in items:  # max_new_tokens null: what the context leaves
                made = completion_jobs(item.request, tokenizer, limits, default_max=limits.max_model_len)
                for job in made:
                    if item.start > len(job.prompt_ids):
                        raise BadRequest(f"'logprob_start_len' = {item.start} is past the end of the prompt's "
                                         f"{len(job.prompt_ids)} tokens", "logprob_start_len")
                    job.abort = asyncio.Event()  # /abort_request's (SGLang's), by the id shown
                    self.shown[job.request_id] = Shown(
                        item.rid if len(made) == 1 and item.rid else job.request_id,  # n > 1: ids of their own
                        0 if job.echo_only else job.sampling.max_tokens, item.logprobs, item.top, item.start,
                        len(out) if item.listed or len(made) > 1 else None, self.request.return_text_in_logprobs,
                        self.request.return_prompt_token_ids)
                    job.rid = self.shown[job.request_id].rid
                    out.append(job)
        except BadRequest as exc:
            raise self.renamed(exc) from None
        return out

    def renamed(self, exc: BadRequest) -> BadRequest:
        """Completions' 400 about this request, in SGLang's names."""
        prompt = "text" if self.request.input_ids is None else "input_ids"
        return renamed_error(exc, RENAMED | {"prompt": prompt}, None, ("max_tokens", "max_new_tokens"))

    def body(self, job: Job, totals: Totals, tokenizer) -> dict | list:
        """The whole answer of one job: its stream's last event (its deltas replayed through a
        writer that writes nothing), so the two cannot differ; a list where the request was a batch."""
        writer = self.writer(job, tokenizer)
        writer.scored(totals.prompt)  # (the replayed deltas do not carry the prompt's scores)
        for delta in replayed(totals):
            writer.delta(delta, quiet=True)
        answer = json.loads(writer.event(latency=True))
        if answer.pop("index", None) is None:
            return answer
        return [answer]

    def merged(self, jobs: list[Job], totals: list[Totals], tokenizer) -> list:
        """The answers of a request of several jobs (a batch, n > 1: each a list of one), in order."""
        answers = [self.body(job, t, tokenizer) for job, t in zip(jobs, totals)]
        assert all(isinstance(a, list) for a in answers), "several jobs: each shown with its index"
        return [one for answer in answers for one in answer]

    def writer(self, job: Job, tokenizer, index: int = 0, stream_id: str = "") -> GenerateWriter:
        """(`index`, the job's place in the request, is its `shown.index` already; SGLang names each
        answer by its own rid, not by a `stream_id`.)"""
        return GenerateWriter(job, tokenizer, self.shown[job.request_id], self.arrived)


class GenerateWriter:
    """The SSE events of one streamed job, with the interface of responses.ChunkWriter (first,
    delta, end, failed, done): each event holds the whole answer so far (SGLang's cumulative
    stream). Logprob entries are written as JSON once, as they come: an event joins their texts."""

    def __init__(self, job: Job, tokenizer, shown: Shown, arrived: float):
        self.job, self.tokenizer, self.shown, self.arrived = job, tokenizer, shown, arrived
        self.totals = Totals()             # the text and tokens so far
        self.output: list[str] = []        # output_token_logprobs' entries, as JSON
        self.tops: list[str] = []          # output_top_logprobs' rows, as JSON
        self.prompt: list[str] = []        # input_token_logprobs' entries, as JSON
        self.prompt_tops: list[str] = []   # input_top_logprobs' rows, as JSON
        self.last = ""                     # the last event sent

    def first(self, delta: Delta) -> list[str]:
        return []

    def delta(self, d: Delta, quiet: bool = False) -> str | None:
        self.totals.add(d)
        self.scored(d.prompt)
        if self.shown.logprobs:
            for t in d.tokens:
                self.output.append(self._entry(t.logprob, t.token_id))
                if self.shown.top:
                    self.tops.append(self._row(t.top_logprobs or []))
        if quiet:
            return None
        self.last = sse(self.event(latency=d.finish_reason is not None))
        return self.last

    def scored(self, scores) -> None:
        """The prompt's scores (tokens 1..), once they come: its entries from logprob_start_len
        k on, the first null (as SGLang's: the logits before token k are not computed there)."""
        start = self.shown.start
        if scores is None or start < 0 or self.prompt or start >= len(self.job.prompt_ids):
            return
        self.prompt = [self._entry(None, self.job.prompt_ids[start])] + [self._entry(p.logprob, p.token_id)
                                                                        for p in scores[start:]]
        if self.shown.top:
            self.prompt_tops = ["null"] + [self._row(p.top_logprobs) for p in scores[start:]]

    def event(self, latency: bool = False) -> str:
        """SGLang's answer so far, as JSON: text, output_ids, meta_info (e2e_latency once it ends)."""
        job, totals, shown = self.job, self.totals, self.shown
        meta: dict[str, Any] = {"id": shown.rid, "finish_reason": self._finish_reason(),
                                "prompt_tokens": len(job.prompt_ids), "completion_tokens": len(totals.tokens),
                                "cached_tokens": cached_tokens(totals), "reasoning_tokens": 0, "num_retractions": 0,
                                "weight_version": "default"}
        if latency:
            meta["e2e_latency"] = time.perf_counter() - self.arrived
        lists = []
        if shown.logprobs:
            meta["output_token_logprobs_length"] = len(self.output)
            named = {"output_token_logprobs": self.output, "input_token_logprobs": self.prompt}
            if shown.top:
                named |= {"output_top_logprobs": self.tops, "input_top_logprobs": self.prompt_tops}
            lists = [f', "{name}": [{", ".join(pieces)}]' for name, pieces in named.items()]
        parts = [f'{{"text": {json.dumps("".join(totals.text))}, "output_ids": '
                 f'{json.dumps([t.token_id for t in totals.tokens])}, "meta_info": {json.dumps(meta)[:-1]}',
                 *lists, "}"]
        if shown.prompt_ids:
            parts.append(f', "prompt_token_ids": {json.dumps(job.prompt_ids)}')
        if shown.index is not None:
            parts.append(f', "index": {shown.index}')
        return "".join(parts) + "}"

    def _finish_reason(self) -> dict | None:
        reason, totals = self.totals.finish_reason, self.totals
        if reason is None:
            return None
        if reason == "length":
            return {"type": "length", "length": self.shown.max_new_tokens}
        if reason == "abort":  # /abort_request
            return {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
        if totals.stop is not None:  # a stop string, or a stop token of the request's
            return {"type": "stop", "matched": totals.stop}
        return {"type": "stop", "matched": totals.tokens[-1].token_id if totals.tokens else None}  # EOS

    def _entry(self, logprob: float | None, token_id: int) -> str:
        text = _token_text(self.tokenizer, token_id) if self.shown.texts else None
        return json.dumps([logprob, token_id, text])

    def _row(self, top) -> str:
        return "[" + ", ".join(self._entry(x.logprob, x.token_id) for x in top[:self.shown.top]) + "]"

    def keepalive(self) -> str:
        """A quiet stream's (app.keepalive): the last event again, which adds no token."""
        return self.last or ": keep-alive\n\n"

    def end(self, totals: Totals) -> str:
        return ""

    def failed(self, exc) -> str:
        return sse(exc.client_body(self.job.request_id))

    def done(self) -> str:
        return sse("[DONE]")
