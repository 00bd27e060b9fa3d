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
Services make a request's matcher (`start`: compile, copy, consume the tokens out) in a thread as
the request arrives, never inside a step: a large grammar compiles for up to a second, a resume
consumes the whole output, and the first grammar reads the tokenizer.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import BadRequest
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
    if kind == "choice" and not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
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
            text = grammar_from("choice", json.dumps(value))
        elif kind == "grammar":
            text = grammar_from("grammar", value)
        else:
            raise ValueError(f"unknown grammar kind {kind!r}")
    except GrammarError:
        raise
    except (ValueError, TypeError) as exc:  # llguidance: not JSON, a GBNF it cannot convert
        raise GrammarError(str(exc)) from None
    except RecursionError:  # a JSON text nested thousands deep
        raise GrammarError("the schema is nested too deeply") from None
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"the grammar is {len(text)} characters long: at most {MAX_GRAMMAR_CHARS}")
    error = LLMatcher.validate_grammar(text, None)
    if error:
        raise GrammarError(error.strip())
    return text


_SUBSCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "additionalProperties",
              "propertyNames", "unevaluatedItems", "unevaluatedProperties")   # keyword: a schema
_SUBSCHEMAS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")                # keyword: a list of them
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name: schema


def _closed(schema, depth: int = 0):
    """The schema with `additionalProperties: false` on each object schema that does not say (vLLM's
    disable_additional_properties); only subschemas are visited, never `enum` or `const` values."""
    if depth > 100:
        raise GrammarError("the schema is nested too deeply")
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _closed(s, depth + 1) for name, s in value.items()}
        elif key in _SUBSCHEMAS and isinstance(value, list):
            out[key] = [_closed(s, depth + 1) for s in value]
        elif key in _SUBSCHEMA and isinstance(value, dict):
            out[key] = _closed(value, depth + 1)
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
    """llguidance's view of the model's tokenizer, for a vocabulary of `vocab` ids (built once:
    0.6 s and 40 MB for SmolLM2's 49k tokens from its tokenizer.json; through transformers' tokenizer,
    where a model has no tokenizer.json, seconds and hundreds of MB more)."""
    from llguidance import LLTokenizer

    from common.model import eos_token_ids, load_tokenizer

    if _model is None:
        raise RuntimeError("grammar.use_model was not called: no tokenizer to follow a grammar with")
    eos = eos_token_ids(_model) or None
    if (_model / "tokenizer.json").is_file():
        return LLTokenizer(str(_model / "tokenizer.json"), n_vocab=vocab, eos_token=eos)
    import llguidance.hf

    return llguidance.hf.from_tokenizer(load_tokenizer(_model), n_vocab=vocab, eos_token=eos)


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
        raise GrammarError(_error(matcher))
    return matcher


def _error(matcher) -> str:
    """llguidance's error, without the parser state it appends."""
    return matcher.get_error().strip().split("\n")[0].strip()


def start(text: str, vocab: int, before=()) -> Matcher:
    """A request's matcher, its grammar compiled against this model's vocabulary of `vocab` ids
    and the output tokens `before` consumed (a resumed request's). GrammarError if it does not
    compile. Slow at times (see the module's docstring): call it in a thread."""
    matcher = Matcher(_compiled(text, vocab).deep_copy(), vocab)
    matcher.consume(before)
    return matcher


def request_matcher(text: str, vocab: int, before=()) -> Matcher:
    """`start` for a service's request: a grammar that does not compile is a 400 naming it."""
    try:
        return start(text, vocab, before)
    except GrammarError as exc:
        raise BadRequest(f"grammar (structured output): {exc}", param="grammar", code="invalid_grammar") from None


class Matcher:
    """One request's place in its grammar: the output tokens consumed so far."""

    def __init__(self, matcher, vocab: int):
        self.vocab, self.matcher = vocab, matcher
        self.failed = False  # consumed a token it forbids (or one past the vocabulary)

    def consume(self, tokens) -> None:
        for token in tokens:
            if not 0 <= token < self.vocab or not self.matcher.consume_token(int(token)):
                self.failed = True  # `done` from here on
                break

    @property
    def error(self) -> str | None:
        """Where the grammar itself failed, what llguidance says: the output can no longer be held
        to it. On a token it allowed, past llguidance's limits (a regex whose automaton grows past
        them, `a{1000000}`), or at its first mask (a schema that is only a reference to itself
        allows nothing). (After a token it forbids, this says so too: `sample` only feeds it tokens
        it allowed, or anything where it allowed none.)"""
        return _error(self.matcher) or "error" if self.matcher.is_error() else None

    @property
    def done(self) -> bool:
        """The grammar is complete (nothing but EOS may follow), or a token it forbids was consumed
        (a history sent with the request that does not follow it)."""
        return self.failed or self.matcher.is_stopped() or self.matcher.is_error()

    def forbidden(self, width: int) -> np.ndarray:
        """(width,) bool over a row of logits: the tokens the next pick may not take, and any column
        past the vocabulary (about 0.03 ms for 49k tokens)."""
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)  # little-endian 32-bit words
        allowed = np.unpackbits(words, bitorder="little", count=min(width, self.vocab))
        return np.concatenate([allowed == 0, np.ones(width - len(allowed), dtype=bool)])
