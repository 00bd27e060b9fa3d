"""The naive Hugging Face baseline server: `model.generate`, one request at a time, no batching.

    python -m bench.hf_server [--model smollm2] [--host 127.0.0.1] [--port 8001]

A POST /v1/completions (prompt as text or token ids, max_tokens, temperature: 0 greedy, else sampling
with top_p, ignore_eos, stream, stream_options.include_usage) waits for the one lock, then
`model.generate` runs in a worker thread and a streamer hands each new token id to the event loop.
It streams one SSE chunk per token, a usage chunk when asked for, then `data: [DONE]` (or answers one
JSON body). A client that goes away stops the generate. bench.load starts it as its "hf" target.
Prints `HF_SERVER_READY http://HOST:PORT` on stdout once started. Also GET /v1/models and /health.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from contextlib import aclosing, asynccontextmanager

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from transformers import StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from common.model import load_model, load_tokenizer, resolve_model_path


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields: accepted, ignored
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict | None = None


class QueueStreamer(BaseStreamer):
    """Called from the generate thread: new token ids go to an asyncio queue; None ends it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value) -> None:  # the first call carries the prompt, (1, prompt_len): skipped
        if self.prompt_seen:
            for token in value.flatten().tolist():
                self.loop.call_soon_threadsafe(self.queue.put_nowait, token)
        self.prompt_seen = True

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class Generator:
    def __init__(self, model_arg: str):
        path = resolve_model_path(model_arg)
        self.name, self.lock = model_arg, asyncio.Lock()
        self.tokenizer, self.model = load_tokenizer(path), load_model(path)
        eos = self.model.generation_config.eos_token_id
        self.pad_id = eos[0] if isinstance(eos, (list, tuple)) else eos

    def generate(self, ids: list[int], req: CompletionRequest, streamer, stop: threading.Event) -> None:
        inputs = torch.tensor([ids])
        sampling = {"do_sample": True, "temperature": req.temperature, "top_p": req.top_p} if req.temperature > 0 \
            else {"do_sample": False}
        try:
            with torch.inference_mode():
                self.model.generate(inputs, attention_mask=torch.ones_like(inputs), streamer=streamer,
                                    max_new_tokens=req.max_tokens, pad_token_id=self.pad_id,
                                    min_new_tokens=req.max_tokens if req.ignore_eos else 0,
                                    stopping_criteria=StoppingCriteriaList([lambda *_, **__: stop.is_set()]),
                                    **sampling)
        finally:
            streamer.end()  # also after an error, so the reader never waits forever


def chunk(cid: str, name: str, text: str, finish: str | None, usage: dict | None = None) -> dict:
    choices = [] if usage else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    body = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": name, "choices": choices}
    return {**body, "usage": usage} if usage else body


async def complete(gen: Generator, req: CompletionRequest):
    """OpenAI chunks: one per token (its text), one with the finish reason, one with the usage."""
    ids = req.prompt if isinstance(req.prompt, list) else gen.tokenizer(req.prompt)["input_ids"]
    cid, out, sent = f"cmpl-{uuid.uuid4().hex}", [], ""
    async with gen.lock:  # held until generate has returned: one request at a time
        queue, stop = asyncio.Queue(), threading.Event()
        streamer = QueueStreamer(asyncio.get_running_loop(), queue)
        work = asyncio.create_task(asyncio.to_thread(gen.generate, ids, req, streamer, stop))
        try:
            while (token := await queue.get()) is not None:
                out.append(token)
                text = gen.tokenizer.decode(out, skip_special_tokens=True)
                delta = "" if text.endswith("\ufffd") else text[len(sent):]  # wait for a whole character
                sent += delta
                yield chunk(cid, gen.name, delta, None)
            await work  # raises what generate raised
        finally:
            stop.set()  # a client that went away ends the generate at its next step
            if not work.done():
                await asyncio.shield(work)
    yield chunk(cid, gen.name, "", "length" if len(out) >= req.max_tokens else "stop")
    usage = {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)}
    yield chunk(cid, gen.name, "", None, usage)


async def sse(gen: Generator, req: CompletionRequest):
    include_usage = bool((req.stream_options or {}).get("include_usage"))
    async with aclosing(complete(gen, req)) as chunks:
        async for c in chunks:
            if c["choices"] or include_usage:
                yield f"data: {json.dumps(c)}\n\n"
    yield "data: [DONE]\n\n"


def make_app(gen: Generator, ready_line: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        print(ready_line, flush=True)
        yield

    app = FastAPI(lifespan=lifespan)
    app.get("/health")(lambda: {"status": "ok"})
    app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": gen.name, "object": "model"}]})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.stream:
            return StreamingResponse(sse(gen, req), media_type="text/event-stream")
        chunks = [c async for c in complete(gen, req)]
        text = "".join(c["choices"][0]["text"] for c in chunks[:-2])
        return {**chunks[-1], "choices": [{**chunks[-2]["choices"][0], "text": text}]}

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hf_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' or a Hugging Face model folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args(argv)
    app = make_app(Generator(args.model), f"HF_SERVER_READY http://{args.host}:{args.port}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
