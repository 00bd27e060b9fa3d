"""OpenAI response bodies: /v1/completions and /v1/chat/completions, whole or as SSE chunks."""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from common.errors import DejavuError
from common.protocol import PromptLogprob, TokenEvent, TopLogprob
from gateway import reasoning, tools
from gateway.jobs import Delta, Job


@dataclass
class Totals:
    """What a request produced so far."""

    text: list[str] = field(default_factory=list)
    tokens: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None
    prompt: list[PromptLogprob] | None = None  # echo with logprobs: prompt tokens 1..
    stop: str | int | None = None  # the stop string or stop token that ended the output (Delta.stop)

    def add(self, delta: Delta) -> None:
        self.prompt = delta.prompt if delta.prompt is not None else self.prompt
        self.text.append(delta.text)
        self.tokens.extend(delta.tokens)
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.stop = delta.stop if delta.stop is not None else self.stop


def replayed(totals: Totals) -> Iterator[Delta]:
    """The deltas that made `totals` (a delta a token, as jobs.deltas yields them; the finish
    reason and the stop on the last; text after the last token, or no token at all, in a last delta
    of no token, as an abort's or a prompt-only answer's): a whole answer written by a stream's writer."""
    n = len(totals.tokens)
    rest = "".join(totals.text[n:])
    last = n - 1 if n and not rest else None  # the token delta that ends it, if one does
    for i, (text, token) in enumerate(zip(totals.text, totals.tokens)):
        yield Delta(text, [token], totals.finish_reason if i == last else None, None, totals.stop if i == last else None)
    if last is None:
        yield Delta(rest, [], totals.finish_reason, None, totals.stop)


def usage(job: Job, totals: Totals) -> dict:
    n = len(totals.tokens)
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n, "total_tokens": len(job.prompt_ids) + n,
            "prompt_tokens_details": {"cached_tokens": cached_tokens(totals)}}


def usage_of(jobs: list[Job], totals: list[Totals]) -> dict:
    """A request's usage over its choices: each prompt counted once (not once per choice of n)."""
    prompt = sum(len(job.prompt_ids) for job in jobs if job.choice == 0)
    completion = sum(len(t.tokens) for t in totals)
    cached = sum(cached_tokens(t) for job, t in zip(jobs, totals) if job.choice == 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def cached_tokens(totals: Totals) -> int:
    """Prompt tokens whose KV came from a prefix cache (OpenAI's usage.prompt_tokens_details), as
    the first token's event says (a failover's re-prefill does not change it)."""
    return (totals.tokens[0].cached_tokens or 0) if totals.tokens else 0


def merged_body(jobs: list[Job], totals: list[Totals], tokenizer, chat: bool) -> dict:
    """One answer for every choice of a request: the first job's head, each job's choice by index."""
    bodies = [(chat_body if chat else completion_body)(job, t, tokenizer) for job, t in zip(jobs, totals)]
    choices = [{**b["choices"][0], "index": i} for i, b in enumerate(bodies)]
    return {**bodies[0], "choices": choices, "usage": usage_of(jobs, totals)}


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE (GPT-2 style) spells each byte as one printable character: invert that."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The raw bytes a token stands for (a piece of a multi-byte character stays a piece)."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token in tokenizer.all_special_tokens:
        return b""
    decoder = _byte_decoder()
    if token and all(c in decoder for c in token):
        return bytes(decoder[c] for c in token)
    return tokenizer.convert_tokens_to_string([token]).encode()  # SentencePiece and others


@functools.lru_cache(maxsize=1 << 17)  # most vocabularies whole (a tokenizer hashes by identity)
def _piece(tokenizer, token_id: int) -> str:
    return token_bytes(tokenizer, token_id).decode(errors="replace")


def _name(tokenizer, token_id: int, as_ids: bool) -> str:
    """A token as logprobs name it: its text, or with vLLM's `return_tokens_as_token_ids`
    "token_id:N" (a token whose bytes are not whole characters is then still told apart)."""
    return f"token_id:{token_id}" if as_ids else _piece(tokenizer, token_id)


Scored = tuple[int, float | None, list[TopLogprob] | None]  # a token, its logprob and the likeliest there


def completion_logprobs(tokenizer, tokens: list[TokenEvent], offset: int,
                        prompt: tuple[list[int], list[PromptLogprob]] | None = None,
                        as_ids: bool = False) -> tuple[dict | None, int]:
    """(the logprobs of `tokens`, text offsets from `offset`, after, with echo, the prompt's:
    (ids, logprobs of ids[1:]), where the text after them starts). The first prompt token has no
    logprob (OpenAI's and vLLM's null). With the prompt's, the offsets run on over its tokens'
    texts, as vLLM's: `offset` is not used. `as_ids`: tokens named "token_id:N" (_name); the
    offsets still count their texts."""
    parts = []
    if prompt is not None:
        ids, scored = prompt
        part, offset = _entries(tokenizer, [(ids[0], None, None)] + [(p.token_id, p.logprob, p.top_logprobs)
                                                                      for p in scored], 0, as_ids)
        parts.append(part)
    if tokens and tokens[0].logprob is not None:
        part, offset = _entries(tokenizer, [(t.token_id, t.logprob, t.top_logprobs or []) for t in tokens], offset,
                                as_ids)
        parts.append(part)
    if not parts:
        return None, offset
    return {key: [x for part in parts for x in part[key]] for key in parts[0]}, offset


def _entries(tokenizer, rows: list[Scored], offset: int, as_ids: bool) -> tuple[dict, int]:
    """(OpenAI's completion logprobs of the rows, where the text after them starts). A row's
    top_logprobs hold its own token first, then the likeliest: up to `logprobs` + 1 entries, as
    OpenAI's and vLLM's ("the API will always return the logprob of the sampled token")."""
    pieces = [_piece(tokenizer, token_id) for token_id, _, _ in rows]
    offsets = list(itertools.accumulate((len(p) for p in pieces), initial=offset))
    return {"tokens": [_name(tokenizer, t, as_ids) for t, _, _ in rows] if as_ids else pieces,
            "token_logprobs": [logprob for _, logprob, _ in rows],
            "top_logprobs": [None if top is None else _top(tokenizer, t, logprob, top, as_ids) for t, logprob, top in rows],
            "text_offset": offsets[:-1]}, offsets[-1]


def _top(tokenizer, token_id: int, logprob: float, top: list[TopLogprob], as_ids: bool) -> dict[str, float]:
    """A row's top_logprobs: its own token first, then the likeliest others. By text, two tokens
    may read alike (pieces of one character, each U+FFFD): the row's own keeps its logprob."""
    out = {_name(tokenizer, token_id, as_ids): logprob}
    for x in top:
        out.setdefault(_name(tokenizer, x.token_id, as_ids), x.logprob)
    return out


def _prompt(job: Job, totals_or_delta) -> tuple[list[int], list[PromptLogprob]] | None:
    """Echo with logprobs: (the prompt's ids, its scores with the alternatives `logprobs` asks)."""
    scores, k = totals_or_delta.prompt, job.prompt_logprobs
    if scores is None or k is None:
        return None
    return job.prompt_ids, [p if len(p.top_logprobs) <= k else p.model_copy(update={"top_logprobs": p.top_logprobs[:k]})
                            for p in scores]  # prompt_logprobs may have asked for more


@functools.lru_cache(maxsize=1 << 17)
def _token_text(tokenizer, token_id: int) -> str:
    """A token's text as vLLM's prompt_logprobs show it: a special token's too (<|im_start|>)."""
    return tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token_id)])


def vllm_prompt_logprobs(tokenizer, job: Job, totals: Totals) -> list[dict | None] | None:
    """vLLM's prompt_logprobs: null for the first prompt token, then for each the prompt's token
    (its logprob and rank there) and the k likeliest there (ranks 1..k), by token id, each with its
    text (`decoded_token`)."""
    if job.prompt_scores is None or totals.prompt is None:
        return None

    def entry(token_id: int, logprob: float, rank: int | None) -> dict:
        name = f"token_id:{token_id}" if job.token_ids_as_names else _token_text(tokenizer, token_id)
        return {"logprob": logprob, "rank": rank, "decoded_token": name}

    out: list[dict | None] = [None]
    for p in totals.prompt:
        scores = {str(p.token_id): entry(p.token_id, p.logprob, p.rank)}
        for rank, top in enumerate(p.top_logprobs[:job.prompt_scores], 1):
            scores.setdefault(str(top.token_id), entry(top.token_id, top.logprob, rank))
        out.append(scores)
    return out


def chat_logprobs(tokenizer, tokens: list[TokenEvent], as_ids: bool = False) -> dict | None:
    """Chat's logprobs of `tokens`; `as_ids`: named "token_id:N" (_name), `bytes` still theirs."""
    if not tokens or tokens[0].logprob is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        raw = token_bytes(tokenizer, token_id)
        name = f"token_id:{token_id}" if as_ids else raw.decode(errors="replace")
        return {"token": name, "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**entry(t.token_id, t.logprob),
                         "top_logprobs": [entry(x.token_id, x.logprob) for x in (t.top_logprobs or [])]}
                        for t in tokens]}


def completion_body(job: Job, totals: Totals, tokenizer) -> dict:
    text = job.echo_text + "".join(totals.text)
    return {"id": f"cmpl-{job.request_id}", "object": "text_completion", "created": job.created, "model": job.model,
            "choices": [{"index": 0, "text": text, "finish_reason": totals.finish_reason, "stop_reason": totals.stop,
                         "logprobs": completion_logprobs(tokenizer, totals.tokens, len(job.echo_text),
                                                         _prompt(job, totals), job.token_ids_as_names)[0]}
                        | _prompt_scores(tokenizer, job, totals)],
            "usage": usage(job, totals)}


def _prompt_scores(tokenizer, job: Job, totals: Totals) -> dict:
    """{"prompt_logprobs": ...} where the request asked for them (vLLM's), else nothing."""
    return {} if job.prompt_scores is None else {"prompt_logprobs": vllm_prompt_logprobs(tokenizer, job, totals)}


def chat_body(job: Job, totals: Totals, tokenizer) -> dict:
    message, finish = {"role": "assistant", "content": "".join(totals.text)}, totals.finish_reason
    if job.thinking is not None:  # the thinking apart, under both of vLLM's names; the answer is the rest
        thought, message["content"] = reasoning.split_whole(job.thinking, message["content"])
        if job.include_reasoning:
            message["reasoning_content"] = message["reasoning"] = thought or None
    if job.tools:  # the calls in the text (content None where they stand alone, as OpenAI's)
        message["content"], calls, finish = tools.read_whole(job.tools, message["content"], finish)
        if calls:
            message["tool_calls"] = calls
    if job.thinking is not None and not message["content"]:  # all thinking: no answer, as vLLM's null
        message["content"] = None
    return {"id": f"chatcmpl-{job.request_id}", "object": "chat.completion", "created": job.created,
            "model": job.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "stop_reason": totals.stop,
                         "logprobs": chat_logprobs(tokenizer, totals.tokens, job.token_ids_as_names)}],
            "usage": usage(job, totals)} | _prompt_scores(tokenizer, job, totals)  # vLLM's place: the body's


@dataclass(frozen=True)
class Form:
    """How a completions or chat request's answer is written: whole (`body`) or as SSE chunks
    (`writer`); gateway/responses_api.py has the Responses API's."""

    name: str  # completion | chat

    @property
    def chat(self) -> bool:
        return self.name == "chat"

    def body(self, job: Job, totals: Totals, tokenizer) -> dict:
        return (chat_body if self.chat else completion_body)(job, totals, tokenizer)

    def writer(self, job: Job, tokenizer, index: int = 0, stream_id: str = "") -> ChunkWriter:
        return ChunkWriter(job, tokenizer, self.chat, index, stream_id)

    def merged(self, jobs: list[Job], totals: list[Totals], tokenizer) -> dict:
        """The whole answer of a request of several choices (a batch of prompts, n > 1)."""
        return merged_body(jobs, totals, tokenizer, self.chat)


COMPLETION, CHAT = Form("completion"), Form("chat")


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


class ChatSplit:
    """A chat output's text, piece by piece, as its parts: the thinking (reasoning.Thinking,
    where the job has a reasoning parser), then of the rest the answer's text and its tool-call
    deltas (tools.Reader, where it has tools). Both writers of chat's output use it: ChunkWriter
    here and responses_api.EventWriter."""

    def __init__(self, job: Job):
        self.thinking = reasoning.Thinking(job.thinking) if job.thinking is not None else None
        self.tools = tools.Reader(job.tools) if job.tools else None

    def push(self, text: str, end: bool) -> tuple[str, str, list[dict]]:
        """(thinking, answer text, tool-call deltas) to send now; `end`: the output ends here."""
        thought = ""
        if self.thinking is not None:
            thought, text = self.thinking.push(text)
            if end:
                more_thought, more_text = self.thinking.finish()
                thought, text = thought + more_thought, text + more_text
        if self.tools is None:
            return thought, text, []
        content, calls = self.tools.push(text)
        if end:
            more, last = self.tools.finish()
            content, calls = content + more, calls + last
        return thought, content, calls


class ChunkWriter:
    """SSE chunks for one streamed request (completions or chat)."""

    def __init__(self, job: Job, tokenizer, chat: bool, index: int = 0, stream_id: str = ""):
        """`index`: the job's choice in the request (a batch of prompts, or n > 1); `stream_id`: the
        request id its chunks are named by (the first choice's: one id for the whole stream, as
        its whole answer has), the job's own by default."""
        self.job, self.tokenizer, self.chat, self.index = job, tokenizer, chat, index
        self.offset = len(job.echo_text)
        self.sent = Totals()  # vLLM's continuous_usage_stats: the tokens so far, for each chunk's usage
        self.split = ChatSplit(job) if chat else None
        kind = "chat.completion.chunk" if chat else "text_completion"
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{stream_id or job.request_id}", "object": kind,
                     "created": job.created, "model": job.model}

    def first(self, delta: Delta) -> list[str]:
        """What goes before the first delta: chat's role; with echo, the prompt (and its logprobs)."""
        if self.chat:  # content null where the answer is a forced call, as the whole answer's
            content = None if self.job.tools and self.job.tools.mode in ("named", "required") else ""
            return [self._chunk({"index": self.index, "delta": {"role": "assistant", "content": content},
                                 "logprobs": None, "finish_reason": None})]
        prompt = _prompt(self.job, delta)
        if not (self.job.echo_text or prompt):
            return []
        logprobs, end = completion_logprobs(self.tokenizer, [], 0, prompt, self.job.token_ids_as_names)
        if logprobs is not None:  # the generated tokens' offsets run on from the prompt's
            self.offset = end
        return [self._chunk({"index": self.index, "text": self.job.echo_text, "logprobs": logprobs,
                             "finish_reason": None})]

    def delta(self, d: Delta) -> str | None:
        if self.job.continuous_usage:
            self.sent.tokens.extend(d.tokens)
        if not d.text and not d.finish_reason and (not d.tokens or d.tokens[0].logprob is None):
            return None  # nothing to say yet (a held-back partial character or stop-string prefix)
        if self.chat:
            delta, finish = self._chat_delta(d)
            logprobs = chat_logprobs(self.tokenizer, d.tokens, self.job.token_ids_as_names)
            if not delta and not finish and logprobs is None:
                return None  # text a tool call holds until it is whole
            choice = {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            # offsets count the tokens' texts, as the whole body's do (a character split over tokens:
            # U+FFFDs a piece)
            logprobs, self.offset = completion_logprobs(self.tokenizer, d.tokens, self.offset,
                                                        as_ids=self.job.token_ids_as_names)
            choice = {"index": self.index, "text": d.text, "logprobs": logprobs, "finish_reason": d.finish_reason}
        if d.finish_reason:  # vLLM's: the stop string or stop token that ended it (null: EOS, or the length)
            choice["stop_reason"] = d.stop
        return self._chunk(choice)

    def _chat_delta(self, d: Delta) -> tuple[dict, str | None]:
        """A chat chunk's delta (reasoning, content, tool calls) and finish reason."""
        thought, content, calls = self.split.push(d.text, bool(d.finish_reason))
        delta = {"reasoning_content": thought, "reasoning": thought} if thought and self.job.include_reasoning else {}
        delta |= ({"content": content} if content else {}) | ({"tool_calls": calls} if calls else {})
        if self.split.tools is None:
            return delta, d.finish_reason
        return delta, self.split.tools.finish_reason(d.finish_reason)

    def end(self, totals: Totals) -> str:
        """What goes after the last delta: the usage chunk, where asked for."""
        return self.usage(totals) if self.job.include_usage else ""

    def failed(self, exc: DejavuError) -> str:
        return sse(exc.client_body(self.job.request_id))

    def done(self) -> str:
        return sse("[DONE]")

    def usage(self, totals: Totals | list[Totals], jobs: list[Job] | None = None) -> str:
        """The usage chunk: of this job, or of every job of the request (`jobs`, with their totals)."""
        counted = usage(self.job, totals) if jobs is None else usage_of(jobs, totals)
        return sse({**self.head, "choices": [], "usage": counted})

    def _chunk(self, choice: dict) -> str:
        if self.job.continuous_usage:  # this choice's usage so far, on every chunk
            return sse({**self.head, "choices": [choice], "usage": usage(self.job, self.sent)})
        return sse({**self.head, "choices": [choice]})
