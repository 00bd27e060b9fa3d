"""OpenAI response bodies: /v1/completions and /v1/chat/completions, whole or as SSE chunks."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

from common.protocol import TokenEvent
from gateway.jobs import Delta, Job


@dataclass
class Totals:
    """What a request produced so far."""

    text: list[str] = field(default_factory=list)
    tokens: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: Delta) -> None:
        self.text.append(delta.text)
        self.tokens.extend(delta.tokens)
        self.finish_reason = delta.finish_reason or self.finish_reason


def usage(job: Job, totals: Totals) -> dict:
    n = len(totals.tokens)
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n, "total_tokens": len(job.prompt_ids) + n}


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


def _piece(tokenizer, token_id: int) -> str:
    return token_bytes(tokenizer, token_id).decode(errors="replace")


def completion_logprobs(tokenizer, tokens: list[TokenEvent], offset: int) -> dict | None:
    if not tokens or tokens[0].logprob is None:
        return None
    pieces = [_piece(tokenizer, t.token_id) for t in tokens]
    offsets, at = [], offset
    for p in pieces:
        offsets.append(at)
        at += len(p)
    return {"tokens": pieces, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{_piece(tokenizer, x.token_id): x.logprob for x in (t.top_logprobs or [])} for t in tokens],
            "text_offset": offsets}


def chat_logprobs(tokenizer, tokens: list[TokenEvent]) -> dict | None:
    if not tokens or tokens[0].logprob is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        raw = token_bytes(tokenizer, token_id)
        return {"token": raw.decode(errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return {"content": [{**entry(t.token_id, t.logprob),
                         "top_logprobs": [entry(x.token_id, x.logprob) for x in (t.top_logprobs or [])]}
                        for t in tokens]}


def completion_body(job: Job, totals: Totals, tokenizer) -> dict:
    text = job.echo_text + "".join(totals.text)
    return {"id": f"cmpl-{job.request_id}", "object": "text_completion", "created": job.created, "model": job.model,
            "choices": [{"index": 0, "text": text, "finish_reason": totals.finish_reason,
                         "logprobs": completion_logprobs(tokenizer, totals.tokens, len(job.echo_text))}],
            "usage": usage(job, totals)}


def chat_body(job: Job, totals: Totals, tokenizer) -> dict:
    return {"id": f"chatcmpl-{job.request_id}", "object": "chat.completion", "created": job.created,
            "model": job.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(totals.text)},
                         "finish_reason": totals.finish_reason, "logprobs": chat_logprobs(tokenizer, totals.tokens)}],
            "usage": usage(job, totals)}


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


class ChunkWriter:
    """SSE chunks for one streamed request (completions or chat)."""

    def __init__(self, job: Job, tokenizer, chat: bool):
        self.job, self.tokenizer, self.chat = job, tokenizer, chat
        self.offset = len(job.echo_text)
        kind = "chat.completion.chunk" if chat else "text_completion"
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job.request_id}", "object": kind,
                     "created": job.created, "model": job.model}

    def first(self) -> list[str]:
        if self.chat:
            return [self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None})]
        return [self._chunk({"index": 0, "text": self.job.echo_text, "logprobs": None, "finish_reason": None})] \
            if self.job.echo_text else []

    def delta(self, d: Delta) -> str | None:
        if not d.text and not d.finish_reason and (not d.tokens or d.tokens[0].logprob is None):
            return None  # nothing to say yet (a held-back partial character or stop-string prefix)
        if self.chat:
            choice = {"index": 0, "delta": {"content": d.text} if d.text else {},
                      "logprobs": chat_logprobs(self.tokenizer, d.tokens), "finish_reason": d.finish_reason}
        else:
            choice = {"index": 0, "text": d.text, "logprobs": completion_logprobs(self.tokenizer, d.tokens, self.offset),
                      "finish_reason": d.finish_reason}
            self.offset += len(d.text)
        return self._chunk(choice)

    def usage(self, totals: Totals) -> str:
        return sse({**self.head, "choices": [], "usage": usage(self.job, totals)})

    def _chunk(self, choice: dict) -> str:
        return sse({**self.head, "choices": [choice]})
