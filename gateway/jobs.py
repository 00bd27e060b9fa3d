"""From an OpenAI request to a Job: the validated, tokenized request, and its run as text deltas.

A request's life in the gateway:
1. validate the body (openai_types) and tokenize the prompt (or chat messages);
2. check the context length, pick the seed, record the request in Redis;
3. run it through the cluster (Router.generate) and turn token events into text deltas
   (incremental detokenization, stop strings: a stop string ends the request downstream);
4. the handler formats deltas as SSE chunks or one JSON body, and records the outcome.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge, Histogram

from common.errors import BadRequest, ContextLengthExceeded, NotFound
from common.protocol import PromptLogprob, SamplingParams, TokenEvent
from gateway import reasoning
from gateway.detokenizer import IncrementalDetokenizer, StopStrings
from gateway.openai_types import ChatRequest, CompletionRequest, SamplingFields
from gateway.router import Router
from gateway.tools import Plan

TTFT = Histogram("dejavu_gateway_ttft_seconds", "time to first token",
                 buckets=(.05, .1, .25, .5, 1, 2, 4, 8, 16, 32))
TPOT = Histogram("dejavu_gateway_time_per_output_token_seconds", "mean time between output tokens of a request",
                 buckets=(.01, .025, .05, .1, .2, .4, .8, 1.6))
IN_FLIGHT = Gauge("dejavu_gateway_in_flight_requests", "requests being served")
REQUESTS = Counter("dejavu_gateway_requests_total", "finished requests", ["outcome"])
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
LARGE_TEXT_CHARS = 16_384  # text past this is tokenized off the event loop (app.Encoder)


@dataclass
class Job:
    request_id: str
    model: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stops: list[str]
    stream: bool
    include_usage: bool
    echo_text: str = ""
    # echo with logprobs: the prompt scored, with this many alternatives; n > 1: only its choice 0
    # asks (`scored`), the others show that one's scores (app.share_prompt_scores)
    prompt_logprobs: int | None = None
    echo_only: bool = False       # max_tokens 0 with echo: the prompt back, the token drawn at prefill dropped
    choice: int = 0               # which of its prompt's n choices
    include_stop: bool = False    # include_stop_str_in_output: the stop string or stop token kept in the text
    created: int = field(default_factory=lambda: int(time.time()))
    recorded: bool = False        # its outcome has been counted and written to Redis
    tools: Plan | None = None     # chat with tools to call: its output is read for calls (gateway/tools.py)
    skip_special: bool = True     # skip_special_tokens: special tokens left out of the text
    thinking: bool | None = None  # chat, with a reasoning parser: whether the output starts inside <think>
    token_ids_as_names: bool = False  # vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:N"
    continuous_usage: bool = False    # vLLM's stream_options.continuous_usage_stats: usage on every chunk
    prompt_scores: int | None = None  # vLLM's prompt_logprobs: the prompt scored, shown with this many
    include_reasoning: bool = True    # vLLM's: chat's thinking in the answer (reasoning_content)
    # SGLang's /abort_request: set, the output ends where it is, finish reason "abort" (None: not abortable)
    abort: asyncio.Event | None = None
    rid: str = ""                     # the id the client knows it by (SGLang's meta_info.id), which that names

    @property
    def scored(self) -> int | None:
        """How many of the likeliest tokens its prefill reports at each prompt position: what echo
        with logprobs and prompt_logprobs ask, the more of the two; None: the prompt is not scored
        (or is, by its choice 0)."""
        asked = [k for k in (self.prompt_logprobs, self.prompt_scores) if k is not None]
        return max(asked) if asked and self.choice == 0 else None


@dataclass
class Delta:
    text: str
    tokens: list[TokenEvent]
    finish_reason: str | None
    prompt: list[PromptLogprob] | None = None  # the first delta, with echo and logprobs: prompt tokens 1..
    stop: str | int | None = None  # the last delta: the stop string, or stop token (not EOS), that ended it


@dataclass
class Limits:
    model_name: str
    max_model_len: int
    vocab_size: int
    eos_ids: list[int]
    chat_max_tokens: int
    max_token_chars: int = 0      # characters of the vocabulary's longest token (0: unknown)
    tool_parser: str = "none"     # how tool_choice 'auto' reads calls in the output (gateway/tools.py)
    reasoning_parser: str = "none"  # how chat's output is split into reasoning and content (gateway/reasoning.py)
    think_special: bool = False   # <think> and </think> are special tokens: kept in the text when reading them


def text_chars(body: CompletionRequest | ChatRequest) -> int:
    """Characters of text the request would have tokenized (0 for token ids)."""
    if isinstance(body, ChatRequest):
        return chat_chars(body.messages, body.tools)
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt or []
    return sum(len(t) for t in texts if isinstance(t, str))


def chat_chars(messages: list, tools) -> int:
    """Characters of text a chat's messages and tools make (the template writes the tools and the
    assistants' calls into the prompt as JSON). JSON nested deeper than Python writes it back is a
    400: no template could write it either."""
    parts = [p for m in messages if m.content for p in ([m.content] if isinstance(m.content, str) else m.content)]
    calls = [m.tool_calls for m in messages if m.tool_calls]
    try:
        written = sum(len(json.dumps(x)) for x in (tools, *calls) if x)
    except RecursionError:  # parsed, but past the writer's depth (a band just below the reader's limit)
        raise BadRequest("'tools' or an assistant message's 'tool_calls' is nested too deeply to be written into "
                         "the prompt", "tools" if tools else "messages") from None
    return sum(len(p) if isinstance(p, str) else len(str(p.get("text", ""))) for p in parts) + written


def rule_out_by_length(chars: int, limits: Limits, param: str) -> None:
    """Text that cannot fit however it tokenizes is refused before tokenizing it: each token stands
    for at most `max_token_chars` characters, so `chars` of text are at least chars / max_token_chars
    tokens (a 4 MiB prompt is refused at once instead of holding a core for seconds)."""
    if limits.max_token_chars and chars > limits.max_model_len * limits.max_token_chars:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {limits.max_model_len} tokens, and {chars} characters of text "
            f"are more than that however they tokenize (at least {chars // limits.max_token_chars} tokens); "
            "shorten the prompt", param)


def new_request_id() -> str:
    return uuid.uuid4().hex


def completion_jobs(body: CompletionRequest, tokenizer, limits: Limits,
                    default_max: int = COMPLETION_DEFAULT_MAX_TOKENS) -> list[Job]:
    """A job a choice: each prompt's `n`, prompt after prompt (the order of OpenAI's choices).
    `default_max`: the most tokens generated where max_tokens is not given (at most what the
    context leaves)."""
    body.check()
    check_model(body, limits)
    jobs = []
    for prompt in body.prompts():
        given = _prompt_ids(prompt, tokenizer, limits, whole=body.truncate_prompt_tokens is None)
        ids = _truncated(body, given, limits)
        echo = "" if not body.echo else prompt if isinstance(prompt, str) and ids is given else tokenizer.decode(
            ids, skip_special_tokens=body.skip_special_tokens)
        jobs += [_job(body, ids, limits, default_max, body.logprobs, echo, choice=i,
                      prompt_logprobs=body.logprobs if body.echo else None) for i in range(body.n)]
    return jobs


def _prompt_ids(prompt: str | list[int], tokenizer, limits: Limits, whole: bool = True) -> list[int]:
    """The prompt's token ids; `whole`: text too long for the context however it tokenizes is
    refused before tokenizing (not where the request truncates its prompt)."""
    if isinstance(prompt, str):
        if whole:
            rule_out_by_length(len(prompt), limits, "prompt")
        ids = tokenizer(prompt)["input_ids"]
        if not ids:
            raise BadRequest("'prompt' tokenizes to no tokens", "prompt")
        return ids
    bad = [t for t in prompt if not 0 <= t < limits.vocab_size]
    if bad:
        raise BadRequest(f"'prompt' token id {bad[0]} is outside the vocabulary [0, {limits.vocab_size})", "prompt")
    return list(prompt)


def _truncated(body: SamplingFields, ids: list[int], limits: Limits) -> list[int]:
    """The prompt's last `truncate_prompt_tokens` tokens (vLLM's; -1: as many as the context holds);
    `ids` itself where it asks for none or the prompt is shorter."""
    keep = body.truncate_prompt_tokens
    if keep is None:
        return ids
    if keep > limits.max_model_len:
        raise BadRequest(f"'truncate_prompt_tokens' = {keep} is more than this model's context of "
                         f"{limits.max_model_len} tokens", "truncate_prompt_tokens")
    keep = limits.max_model_len if keep == -1 else keep
    if len(ids) > keep >= limits.max_model_len:  # as vLLM: the whole context, so no room for any output
        raise ContextLengthExceeded(
            f"'truncate_prompt_tokens' = {body.truncate_prompt_tokens} keeps {keep} of the prompt's {len(ids)} tokens, "
            f"this model's whole context, which leaves no room for output: ask for at most the context "
            f"({limits.max_model_len}) minus max_tokens", "truncate_prompt_tokens")
    return ids if len(ids) <= keep else ids[-keep:]


def chat_jobs(body: ChatRequest, tokenizer, limits: Limits) -> list[Job]:
    """A job a choice (`n`)."""
    body.check()
    check_model(body, limits)
    messages = [m.for_template() for m in body.messages]
    if body.truncate_prompt_tokens is None:
        rule_out_by_length(sum(len(m["content"]) for m in messages), limits, "messages")
    plan = body.tool_plan
    if plan and plan.mode == "auto" and limits.tool_parser == "none":
        raise BadRequest("'tool_choice' 'auto' (the default with 'tools') needs a tool-call parser, and this model's "
                         "chat template has no tool-call format the gateway knows: start it with --tool-call-parser "
                         "hermes, llama3_json or mistral if the model writes calls in one of those formats, or ask "
                         "for 'required' or a named "
                         "function (the output is then held to the tools' schemas)", "tool_choice")
    ids = _truncated(body, chat_prompt_ids(body, messages, tokenizer), limits)
    jobs = [_job(body, ids, limits, limits.chat_max_tokens, body.logprobs_k, "", "messages", choice=i)
            for i in range(body.n)]
    thinking = None
    if limits.reasoning_parser != "none":  # a grammar holds the output from its first token: not inside a <think>
        continued = messages[-1]["content"] if body.continue_final_message else None
        thinking = not jobs[0].sampling.grammar and reasoning.opens_thinking(
            tokenizer, ids, continued if isinstance(continued, str) else None)
    for job in jobs:
        job.tools = dataclasses.replace(plan, parser=limits.tool_parser) if plan and plan.mode != "none" else None
        job.thinking, job.include_reasoning = thinking, body.include_reasoning
        if plan and plan.mode == "auto":  # a model's tool-call tags may be special tokens: kept, as vLLM's hermes
            job.skip_special = False
        if thinking is not None and limits.think_special:
            job.skip_special = False
    return jobs


def chat_prompt_ids(body: ChatRequest, messages: list[dict], tokenizer, tokenize: bool = True) -> list[int] | str:
    """The prompt the model's chat template makes of the messages (`for_template()`'s): its token
    ids, or with `tokenize` False its text. A template that rejects them is a 400."""
    plan = body.tool_plan
    try:
        out = tokenizer.apply_chat_template(messages, tools=list(plan.tools) if plan else None,
                                            add_generation_prompt=body.add_generation_prompt,
                                            continue_final_message=body.continue_final_message, tokenize=tokenize,
                                            **(body.chat_template_kwargs or {}))
    except Exception as exc:  # a template that rejects this conversation is the caller's problem
        raise BadRequest(f"'messages' cannot be formatted by the model's chat template: {exc}", "messages") from exc
    if not tokenize:
        return out
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def check_model(body: SamplingFields, limits: Limits) -> None:
    if body.model is not None and body.model != limits.model_name:
        raise NotFound(f"model '{body.model}' does not exist; this server serves '{limits.model_name}'",
                       "model", code="model_not_found")


def _job(body: SamplingFields, ids: list[int], limits: Limits, default_max: int, logprobs: int | None,
         echo: str, prompt_param: str = "prompt", choice: int = 0, prompt_logprobs: int | None = None) -> Job:
    """The job of one choice; with a seed, choice i draws from seed + i (n choices differ, and the
    same request gives the same n texts every time)."""
    room = limits.max_model_len - len(ids)
    if room < 1:  # no max_tokens could help
        raise ContextLengthExceeded(
            f"this model's maximum context length is {limits.max_model_len} tokens, and the prompt alone has "
            f"{len(ids)}: shorten it", prompt_param)
    max_tokens = body.max_tokens if body.max_tokens is not None else min(default_max, room)
    echo_only, max_tokens = max_tokens == 0, max(max_tokens, 1)  # 0 (with echo): the prefill's token, dropped
    if len(ids) + max_tokens > limits.max_model_len:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {limits.max_model_len} tokens, but you requested "
            f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the completion); "
            f"shorten the prompt or lower {body.max_tokens_field}", body.max_tokens_field if body.max_tokens else prompt_param)
    if body.min_tokens and body.min_tokens > max_tokens:
        raise BadRequest(f"'min_tokens' = {body.min_tokens} is more than the {max_tokens} tokens this request may "
                         "generate", "min_tokens")
    bias, stop_ids = body.logit_bias_pairs(), list(dict.fromkeys(body.stop_token_ids or []))
    for name, named in (("logit_bias", [t for t, _ in bias]), ("stop_token_ids", stop_ids)):
        bad = [t for t in named if not 0 <= t < limits.vocab_size]
        if bad:
            raise BadRequest(f"'{name}' token id {bad[0]} is outside the vocabulary [0, {limits.vocab_size})", name)
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    sampling = SamplingParams(
        temperature=temperature, top_p=1.0 if body.top_p is None else float(body.top_p),
        top_k=max(body.top_k or 0, 0),
        seed=(body.seed + choice if body.seed is not None else random.getrandbits(63)) & ((1 << 64) - 1),
        max_tokens=max_tokens, eos_token_ids=limits.eos_ids, ignore_eos=body.ignore_eos, logprobs=logprobs,
        stop_token_ids=stop_ids,
        presence_penalty=float(body.presence_penalty or 0), frequency_penalty=float(body.frequency_penalty or 0),
        repetition_penalty=1.0 if body.repetition_penalty is None else float(body.repetition_penalty),
        logit_bias=bias, min_tokens=body.min_tokens or 0, min_p=float(body.min_p or 0), grammar=body.grammar)
    return Job(new_request_id(), limits.model_name, ids, sampling, body.stop_list, body.stream,
               body.include_usage, echo, prompt_logprobs, echo_only, choice,
               include_stop=body.include_stop_str_in_output, skip_special=body.skip_special_tokens,
               token_ids_as_names=bool(body.return_tokens_as_token_ids), continuous_usage=body.continuous_usage,
               prompt_scores=body.prompt_logprobs)


async def deltas(router: Router, tokenizer, job: Job) -> AsyncIterator[Delta]:
    """The request's text, piece by piece; the last delta has the finish reason."""
    detok, stops = IncrementalDetokenizer(tokenizer, job.skip_special), StopStrings(job.stops, job.include_stop)
    ends = {*job.sampling.stop_token_ids, *([] if job.sampling.ignore_eos else job.sampling.eos_token_ids)}
    start, first_at, count = time.perf_counter(), None, 0
    gen = router.generate(job.request_id, job.prompt_ids, job.sampling, job.scored)
    events = gen if job.abort is None else until(gen, job.abort)
    try:
        async for event in events:
            if event is ABORTED:  # what is held back goes out, as the text so far
                text = "" if stops.stopped else stops.push(detok.finish(), count > job.sampling.min_tokens)
                yield Delta(text + stops.flush(), [], "abort")
                return
            count += 1
            if first_at is None:
                first_at = time.perf_counter()
                TTFT.observe(first_at - start)
            if job.echo_only:
                yield Delta("", [], "length", event.prompt_logprobs)
                return
            armed = count > job.sampling.min_tokens  # stop strings count only after min_tokens, as vLLM's
            finish = event.finish_reason
            # a stop token (the request's, or EOS) ends the text before it, as vLLM's (EOS is special: with
            # skip_special_tokens, the default, it has no text anyway)
            cut = finish == "stop" and event.token_id in ends and not job.include_stop
            text = "" if cut else stops.push(detok.add(event.token_id), armed)
            if finish and not stops.stopped:
                text += stops.push(detok.finish(), armed)
                text += stops.flush()
            stop = None  # what ended it, as vLLM's stop_reason: a stop string, a stop token of the request's
            if stops.stopped:
                finish, stop = "stop", stops.matched
            elif finish == "stop" and event.token_id in job.sampling.stop_token_ids and not (
                    event.token_id in job.sampling.eos_token_ids and not job.sampling.ignore_eos):
                stop = event.token_id  # (an EOS is an EOS first, as vLLM's: null)
            yield Delta(text, [event], finish, event.prompt_logprobs, stop)
            if finish:
                if count > 1:
                    TPOT.observe((time.perf_counter() - first_at) / (count - 1))
                return
    except BadRequest as exc:  # the router names 'echo' for a prompt it cannot score: name what was asked
        if exc.param == "echo" and job.prompt_logprobs is None and job.prompt_scores is not None:
            exc.param = "prompt_logprobs"
        raise
    finally:
        await events.aclose()
        await gen.aclose()


ABORTED = object()


async def until(gen: AsyncIterator, stop: asyncio.Event) -> AsyncIterator:
    """gen's items until `stop` is set, then ABORTED (gen left where it waits, cancelled: its own
    cleanup runs, as for a client that left)."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            item = asyncio.ensure_future(anext(gen, ABORTED))  # ABORTED here: gen has ended
            try:
                await asyncio.wait({item, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not item.done():
                    item.cancel()
                    await asyncio.gather(item, return_exceptions=True)
            if stop.is_set() and (item.cancelled() or item.exception() is not None):
                break  # ended by the stop, however gen took its cancellation
            if item.result() is ABORTED:
                return
            yield item.result()
        yield ABORTED
    finally:
        stopped.cancel()
