"""vLLM's /tokenize and /detokenize: the token ids a completion or chat request would be prefilled
with, counted against the context, and text back from token ids.

POST /tokenize    {"prompt": "..."}        -> {"count", "max_model_len", "tokens", "token_strs"}
                  {"messages": [...]}      the chat template's prompt (with "tools", as chat would)
POST /detokenize  {"tokens": [...]}        -> {"prompt": "..."}

A chat request's ids are the ones /v1/chat/completions would prefill for it: the same messages,
template and validation (ChatRequest's), so a client can count a conversation before sending it.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from pydantic import StrictBool, StrictInt, StrictStr

from common.errors import BadRequest
from gateway.jobs import LARGE_TEXT_CHARS, Limits, chat_chars, chat_prompt_ids, check_model
from gateway.openai_types import ChatMessage, ChatRequest, TextBody

LARGE_TOKEN_LISTS = 8192  # token ids past this are detokenized off the event loop


class TokenizeRequest(TextBody):
    """One of `prompt` (add_special_tokens defaults to true, as a completion's prompt is tokenized)
    or `messages` (defaults to false: the template writes the special tokens it wants)."""
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool | None = None
    return_token_strs: StrictBool | None = False
    # messages only, as on /v1/chat/completions
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    chat_template_kwargs: dict | None = None
    chat_template: StrictStr | None = None
    tools: Any = None

    def chat(self) -> ChatRequest:
        """The chat request these messages would be (its checks: roles, tools, template arguments)."""
        fields = {"messages", "add_generation_prompt", "continue_final_message", "chat_template_kwargs",
                  "chat_template", "tools"}
        chat = ChatRequest.model_validate(self.model_dump(include=fields, exclude_unset=True))
        chat.check()
        return chat

    @property
    def large(self) -> bool:
        """Tokenized off the event loop (app.Encoder), as a long prompt is."""
        if self.prompt is not None:
            return len(self.prompt) >= LARGE_TEXT_CHARS
        return self.messages is not None and chat_chars(self.messages, self.tools) >= LARGE_TEXT_CHARS


class DetokenizeRequest(TextBody):
    model: StrictStr | None = None
    tokens: list[StrictInt]

    @property
    def large(self) -> bool:
        return len(self.tokens) >= LARGE_TOKEN_LISTS


def tokenize(body: TokenizeRequest, tokenizer, limits: Limits) -> dict:
    """Text of any length is counted, as vLLM's (a client asks to learn how much to cut); the body
    limit (--max-body-bytes) bounds the work, done on the tokenizer thread when large."""
    check_model(body, limits)
    if (body.prompt is None) == (body.messages is None):
        raise BadRequest("give one of 'prompt' (text) or 'messages' (a chat)",
                         "prompt" if body.prompt is not None else "messages")
    if body.prompt is not None:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = tokenizer(body.prompt, add_special_tokens=special)["input_ids"]
    else:
        chat = body.chat()
        messages = [m.for_template() for m in chat.messages]
        if body.add_special_tokens:  # the template's text, tokenized with the tokenizer's own special tokens
            ids = tokenizer(chat_prompt_ids(chat, messages, tokenizer, tokenize=False),
                            add_special_tokens=True)["input_ids"]
        else:
            ids = chat_prompt_ids(chat, messages, tokenizer)
    ids = list(ids)
    return {"count": len(ids), "max_model_len": limits.max_model_len, "tokens": ids,
            "token_strs": tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None}


def detokenize(body: DetokenizeRequest, tokenizer, limits: Limits) -> dict:
    check_model(body, limits)
    bad = [t for t in body.tokens if not 0 <= t < limits.vocab_size]
    if bad:
        raise BadRequest(f"'tokens' token id {bad[0]} is outside the vocabulary [0, {limits.vocab_size})", "tokens")
    return {"prompt": tokenizer.decode(body.tokens)}


def version() -> str:
    """This package's version, for GET /version (vLLM's)."""
    try:
        return importlib.metadata.version("dejavu-serving")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown"
