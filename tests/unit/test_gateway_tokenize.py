"""Issue #10 item 7: prompt tokenization stays off the gateway's event loop when large, and text
that cannot fit however it tokenizes is refused before it is tokenized."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest

from common.errors import ContextLengthExceeded
from common.model import load_tokenizer
from gateway.app import LARGE_TEXT_CHARS, Encoder, _jobs
from gateway.jobs import Limits, chat_jobs, completion_jobs
from gateway.openai_types import ChatRequest, CompletionRequest

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def app(bundled_path):
    tokenizer = load_tokenizer(bundled_path)
    limits = Limits("m", 8192, len(tokenizer), [2], 256, max(map(len, tokenizer.get_vocab())))
    return SimpleNamespace(state=SimpleNamespace(tokenizer=tokenizer, limits=limits, encoder=Encoder(bundled_path)))


async def test_large_prompts_are_tokenized_on_the_encoder_thread(app):
    threads = []

    def recording(make_job):
        def job(body, tokenizer, limits):
            threads.append((threading.current_thread().name, tokenizer is app.state.tokenizer))
            return make_job(body, tokenizer, limits)
        return job

    small = CompletionRequest(prompt="hello " * 10, max_tokens=4)
    large = CompletionRequest(prompt="word " * (LARGE_TEXT_CHARS // 5 + 1), max_tokens=4)
    chat = ChatRequest(messages=[{"role": "user", "content": "x" * (LARGE_TEXT_CHARS + 1)}], max_tokens=4)
    assert (await _jobs(app, recording(completion_jobs), small))[0].prompt_ids
    assert len((await _jobs(app, recording(completion_jobs), large))[0].prompt_ids) > 3000
    assert (await _jobs(app, recording(chat_jobs), chat))[0].prompt_ids
    assert threads[0] == (threading.current_thread().name, True)      # small: inline, the loop's tokenizer
    assert [t[0].startswith("tokenize") and not t[1] for t in threads[1:]] == [True, True]  # large: its own


async def test_text_that_cannot_fit_is_refused_before_tokenizing(app, monkeypatch):
    limits = app.state.limits
    chars = limits.max_model_len * limits.max_token_chars + 1
    tokenized = []
    monkeypatch.setattr(app.state.encoder, "tokenizer", lambda *a, **k: tokenized.append(1))
    for body in (CompletionRequest(prompt="a" * chars), ChatRequest(messages=[{"role": "user", "content": "a" * chars}])):
        with pytest.raises(ContextLengthExceeded, match="however they tokenize"):
            await _jobs(app, completion_jobs if isinstance(body, CompletionRequest) else chat_jobs, body)
    assert not tokenized
    await asyncio.sleep(0)


def test_the_bound_holds_for_real_text(app):
    """chars / max_token_chars never exceeds the real token count: the refusal is never wrong."""
    tokenizer, limits = app.state.tokenizer, app.state.limits
    texts = ["\n" + " " * 200, "a" * 5000, "héllo wörld 😀 " * 300, open(__file__).read(), "0123456789" * 500]
    for text in texts:
        assert len(tokenizer(text)["input_ids"]) >= len(text) / limits.max_token_chars
