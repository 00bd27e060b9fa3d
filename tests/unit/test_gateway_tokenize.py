"""Issue #10 item 7: prompt tokenization stays off the gateway's event loop when large, and text
that cannot fit however it tokenizes is refused before it is tokenized."""

from __future__ import annotations

import asyncio
import sys
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


async def test_tokenize_endpoint_counts_what_chat_and_completions_prefill(app):
    """/tokenize (vLLM's): a chat's ids, tools included, are chat_jobs' prompt; add_special_tokens
    follows vLLM's defaults (true for a prompt, false for messages); large ones go to the encoder
    thread, as a large completion does; /detokenize gives the text back."""
    from gateway.app import _tokenizing
    from gateway.tokenize_api import LARGE_TOKEN_LISTS, DetokenizeRequest, TokenizeRequest, detokenize, tokenize

    import copy

    tokenizer, limits = app.state.tokenizer, app.state.limits
    with_tools = copy.deepcopy(tokenizer)  # SmolLM2's template does not write tools; this one does
    with_tools.chat_template = ("{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
                                "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    chat = ChatRequest(messages=messages, tools=tools, tool_choice="required", max_tokens=4)
    [job] = chat_jobs(chat, with_tools, limits)
    got = tokenize(TokenizeRequest(messages=messages, tools=tools), with_tools, limits)
    assert got["tokens"] == job.prompt_ids and got["count"] == len(job.prompt_ids)
    assert tokenizer.decode(got["tokens"]) == "[get_weather]<user>Weather in Paris?"
    with_special = tokenize(TokenizeRequest(messages=messages, add_special_tokens=True), tokenizer, limits)["tokens"]
    template_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert with_special == tokenizer(template_text, add_special_tokens=True)["input_ids"]
    continued = tokenize(TokenizeRequest(messages=messages + [{"role": "assistant", "content": "It is"}],
                                         add_generation_prompt=False, continue_final_message=True), tokenizer, limits)
    assert tokenizer.decode(continued["tokens"]).rstrip().endswith("It is")

    text = "Bonjour à tous 🚀"
    assert tokenize(TokenizeRequest(prompt=text), tokenizer, limits)["tokens"] == tokenizer(text)["input_ids"]
    assert tokenize(TokenizeRequest(prompt=text, add_special_tokens=False), tokenizer, limits)["tokens"] == \
        tokenizer(text, add_special_tokens=False)["input_ids"]

    threads = []

    def recording(work):
        def run(body, tokenizer, limits):
            threads.append(threading.current_thread().name)
            return work(body, tokenizer, limits)
        return run

    big = "word " * (LARGE_TEXT_CHARS // 5 + 1)
    assert (await _tokenizing(app, recording(tokenize), TokenizeRequest(prompt=big)))["count"] > 3000
    assert (await _tokenizing(app, recording(tokenize), TokenizeRequest(messages=[
        {"role": "user", "content": big}])))["count"] > 3000
    ids = tokenizer(big)["input_ids"] * (LARGE_TOKEN_LISTS // 1000)
    assert len(ids) >= LARGE_TOKEN_LISTS
    back = await _tokenizing(app, recording(detokenize), DetokenizeRequest(tokens=ids))
    assert back["prompt"] == tokenizer.decode(ids)
    small = await _tokenizing(app, recording(tokenize), TokenizeRequest(prompt="hi"))
    assert small["count"] >= 1
    assert [name.startswith("tokenize") for name in threads] == [True, True, True, False]


async def test_tools_nested_past_what_json_writes_back_are_a_400(app):
    """A tools schema that parses but is nested deeper than json.dumps writes (a band below the
    parser's limit) is a 400 naming it, from chat and /tokenize alike, not a RecursionError."""
    from common.errors import BadRequest
    from gateway.jobs import text_chars
    from gateway.tokenize_api import TokenizeRequest

    deep = 1
    for _ in range(1500):
        deep = {"a": deep}
    tools = [{"type": "function", "function": {"name": "f", "parameters": deep}}]
    messages = [{"role": "user", "content": "hi"}]
    limit = sys.getrecursionlimit()  # Python's default: a library loaded earlier in the run may have raised it
    sys.setrecursionlimit(1000)
    try:
        with pytest.raises(BadRequest) as info:
            text_chars(ChatRequest(messages=messages, tools=tools))
        assert info.value.param == "tools"
        with pytest.raises(BadRequest):
            TokenizeRequest(messages=messages, tools=tools).large
    finally:
        sys.setrecursionlimit(limit)


async def test_tokenize_counts_text_longer_than_the_context(app):
    """/tokenize answers however long the text (vLLM's): the count is what a client asks for."""
    from gateway.tokenize_api import TokenizeRequest, tokenize

    limits = app.state.limits
    text = "a " * (limits.max_model_len * limits.max_token_chars)
    got = tokenize(TokenizeRequest(prompt=text), app.state.tokenizer, limits)
    assert got["count"] > limits.max_model_len and got["max_model_len"] == limits.max_model_len
