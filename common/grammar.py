"""Structured output: a grammar (a JSON schema, a regex, a choice of strings, a Lark or GBNF
grammar) that every pick of a request follows, with llguidance (one of the engines vLLM and
SGLang offer).

The gateway turns a request's field (OpenAI's `response_format`, vLLM's `structured_outputs` or
`guided_*`) into one grammar text (`from_request`, checked there) that SamplingParams.grammar
carries. Where tokens are picked (the prompt service's first, a token service's next ones), a
`Matcher` follows the request's output tokens: its mask keeps the tokens that leave the output a
prefix of the grammar's language (the others go to -inf in common/sampling.process), and the
token that completes the grammar ends the request ("stop"), without an EOS after it.

A matcher's state depends on the output tokens only, so a request resumed on another service
rebuilds it from the tokens already out (DecodeRequest.history) and picks as it would have.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from common.protocol import MAX_GRAMMAR_CHARS

_model: Path | None = None
_lock = threading.Lock()


class GrammarError(ValueError):
    """A grammar that does not compile: the caller's mistake (a 400)."""


def from_request(kind: str, value: Any, whitespace: str | None = None, compact: bool = False,
                 closed: bool = False) -> str:
    """The grammar text of a request's structured-output field. kind: "json" (a JSON schema, as a
    dict or its text), "json_object" (any JSON object), "regex", "choice" (a list of strings: the
    output is one of them), "grammar" (Lark, or GBNF as llama.cpp writes it). For JSON, vLLM's
    options: the whitespace allowed between tokens (a regex; any by default), `compact` (none at
    all), `closed` (objects without additionalProperties get false). GrammarError says what is wrong."""
    from llguidance import LLMatcher, grammar_from

    options = {"whitespace_flexible": not compact} | ({"whitespace_pattern": whitespace} if whitespace else {})
    if kind in ("regex", "grammar") and not isinstance(value, str):
        raise GrammarError(f"a {kind} must be a string")
    if kind == "choice" and not isinstance(value, list):
        raise GrammarError("a choice must be a list of non-empty strings")
    try:
        if kind in ("json", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else json.loads(value) if isinstance(value, str) else value
            if not isinstance(schema, dict):
                raise GrammarError("a JSON schema must be a JSON object")
            text = LLMatcher.grammar_from_json_schema(_closed(schema) if closed else schema, overrides=options)
        elif kind == "regex":
            text = LLMatcher.grammar_from_regex(value)
        elif kind == "choice":
            if not value or not all(isinstance(c, str) and c for c in value):
                raise GrammarError("a choice must be a list of non-empty strings")
            text = grammar_from("choice", json.dumps(value))
        elif kind == "grammar":
            text = grammar_from("grammar", value)
        else:
            raise ValueError(f"unknown grammar kind {kind!r}")
    except GrammarError:
        raise
    except (ValueError, TypeError) as exc:  # llguidance: not JSON, a GBNF it cannot convert
        raise GrammarError(str(exc)) from None
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"the grammar is {len(text)} characters long: at most {MAX_GRAMMAR_CHARS}")
    error = LLMatcher.validate_grammar(text, None)
    if error:
        raise GrammarError(error.strip())
    return text


def _closed(schema):
    """The schema with `additionalProperties: false` on each object schema that does not say (vLLM's
    disable_additional_properties)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def use_model(path: Path) -> None:
    """Where this process's tokenizer is (a service's model folder): a matcher needs the
    vocabulary's bytes. Read on the first grammar, not before."""
    global _model
    _model = path


@functools.cache
def _tokenizer(vocab: int):
    """llguidance's view of the model's tokenizer, for logits of `vocab` columns (built once, about
    0.5 s for SmolLM2's 49k tokens)."""
    import llguidance.hf

    from common.model import eos_token_ids, load_tokenizer

    if _model is None:
        raise RuntimeError("grammar.use_model was not called: no tokenizer to follow a grammar with")
    return llguidance.hf.from_tokenizer(load_tokenizer(_model), n_vocab=vocab, eos_token=eos_token_ids(_model) or None)


@functools.lru_cache(maxsize=256)
def _compiled(text: str, vocab: int):
    """A matcher at the grammar's start, to copy (compiling costs 1-2 ms; a copy, microseconds)."""
    from llguidance import LLMatcher

    with _lock:  # the first call builds the tokenizer: once, whichever thread asks first
        try:
            tokenizer = _tokenizer(vocab)
        except (ValueError, OSError) as exc:  # e.g. a model with a slow (Python) tokenizer only
            raise GrammarError(f"this model's tokenizer cannot follow a grammar: {exc}") from None
    matcher = LLMatcher(tokenizer, text, log_level=0)
    if matcher.is_error():
        raise GrammarError(matcher.get_error().strip())
    return matcher


def check(text: str, vocab: int) -> None:
    """GrammarError if the grammar does not compile against this model's vocabulary."""
    if text:
        _compiled(text, vocab)


class Matcher:
    """One request's place in its grammar: the output tokens consumed so far."""

    def __init__(self, text: str, vocab: int):
        self.vocab = vocab
        self.matcher = _compiled(text, vocab).deep_copy()

    def consume(self, tokens) -> None:
        for token in tokens:
            if not self.matcher.consume_token(int(token)):
                break  # in error from here on: `done`

    @property
    def done(self) -> bool:
        """The grammar is complete (nothing but EOS may follow), or a token it forbids was consumed
        (a pick with every token masked: min_tokens holding back the only one it allowed)."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    def forbidden(self) -> np.ndarray:
        """(vocab,) bool: the tokens the next pick may not take (about 0.03 ms for 49k tokens)."""
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)  # little-endian 32-bit words
        return np.unpackbits(words, bitorder="little")[: self.vocab] == 0
