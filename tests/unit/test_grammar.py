"""Structured output (common/grammar.py) where picks are made (common/sampling.py), on the SmolLM2
tokenizer with random logits: the mask keeps exactly the tokens the grammar allows, the token that
completes a grammar ends the request, and a matcher rebuilt from the tokens out masks as the one
that followed them (a resumed request picks as it would have)."""

from __future__ import annotations

import re

import pytest
import torch

from common import grammar
from common.protocol import SamplingParams, TokenEvent
from common.sampling import History, first_event, process, sample

VOCAB = 49152


@pytest.fixture(scope="module")
def tokenizer(bundled_path):
    from common.model import load_tokenizer

    grammar.use_model(bundled_path)
    return load_tokenizer(bundled_path)


def guided(kind: str, value, **kw) -> SamplingParams:
    return SamplingParams(grammar=grammar.from_request(kind, value), max_tokens=64, **kw)


def test_the_mask_keeps_exactly_the_tokens_the_grammar_allows(tokenizer):
    p = guided("choice", ["yes", "no"])
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    out = process(logits, [p, SamplingParams()], [0, 0], [History(VOCAB, [1], matcher=grammar.start(p.grammar, VOCAB)), None])
    kept = torch.nonzero(torch.isfinite(out[0])).flatten().tolist()
    texts = {tokenizer.decode([t]) for t in kept}
    assert texts and all("yes".startswith(t) or "no".startswith(t) for t in texts), texts
    assert {"yes", "no", "y", "n"} <= texts
    assert torch.equal(out[0, kept], logits[0, kept]) and torch.equal(out[1], logits[1])  # untouched otherwise
    [event] = sample(logits[:1], [p], [0], ["r"], [History(VOCAB, [1], matcher=grammar.start(p.grammar, VOCAB))])
    assert event.token_id == kept[int(logits[0, kept].argmax())]  # greedy: the likeliest allowed


def test_the_token_that_completes_the_grammar_ends_the_request(tokenizer):
    """Sampled with random logits, each pick follows the regex; the last one says "stop" (no EOS
    after it), at prefill too (first_event keeps it), and nothing before it does."""
    p = guided("regex", "[0-9]{2}-[a-z]{3}", temperature=1.0, seed=3)
    history, out = History(VOCAB, [1, 2, 3], matcher=grammar.start(p.grammar, VOCAB)), []
    g = torch.Generator().manual_seed(1)
    while True:
        [event] = sample(torch.randn(1, VOCAB, generator=g) * 5, [p], [len(out)], ["r"], [history.update(out)])
        out.append(event.token_id)
        if event.finish_reason:
            break
        assert len(out) < 20
    assert event.finish_reason == "stop" and re.fullmatch("[0-9]{2}-[a-z]{3}", tokenizer.decode(out)), out
    choice = guided("choice", ["alpha"])
    [first] = sample(torch.randn(1, VOCAB, generator=g), [choice], [0], ["r"], [History(VOCAB, [1], matcher=grammar.start(choice.grammar, VOCAB))])
    assert tokenizer.decode([first.token_id]) == "alpha" and first_event(choice, first).finish_reason == "stop"
    assert first_event(choice, TokenEvent(request_id="r", index=0, token_id=5)).finish_reason is None


def test_a_history_rebuilt_from_the_tokens_out_masks_as_the_one_that_followed_them(tokenizer):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
              "required": ["name", "tags"]}
    p = guided("json", schema)
    doc = tokenizer('{"name": "Ada", "tags": ["x", "yz"]}')["input_ids"]
    followed = History(VOCAB, [1], matcher=grammar.start(p.grammar, VOCAB))
    for k in range(len(doc)):
        rebuilt = History(VOCAB, [1], doc[:k], matcher=grammar.start(p.grammar, VOCAB, doc[:k])).update([])
        assert (followed.update(doc[:k]).matcher.forbidden(VOCAB) == rebuilt.matcher.forbidden(VOCAB)).all(), k
        assert not followed.matcher.done
    assert followed.update(doc).matcher.done  # the closing brace completes it


def test_a_forbidden_token_leaves_the_matcher_done_and_bad_grammars_raise(tokenizer):
    p = guided("regex", "[0-9]+")
    history = History(VOCAB, [1], matcher=grammar.start(p.grammar, VOCAB))
    assert not history.matcher.done
    assert history.follow(tokenizer("abc")["input_ids"][0])  # not a digit: an error state, which ends it
    for kind, value in (("regex", "(("), ("grammar", "start: nowhere"), ("json", {"type": "objectx"}),
                        ("json", "{no"), ("choice", []), ("choice", ["a", 3])):
        with pytest.raises(grammar.GrammarError):
            grammar.from_request(kind, value)
    with pytest.raises(grammar.GrammarError):  # what a service is sent is compiled there again
        grammar.start("start: nowhere", VOCAB)
    deep = '{"type": "array", "items": ' * 3000 + "{}" + "}" * 3000
    for kind, value, options in (("json", deep, {}), ("json", _nested(400), {"closed": True})):
        with pytest.raises(grammar.GrammarError, match="nested too deeply"):
            grammar.from_request(kind, value, **options)


def test_a_grammar_that_fails_says_so_where_it_used_to_stop(tokenizer):
    """A schema that is only a reference to itself allows nothing at its first mask; a regex past
    llguidance's limits compiles, then fails on the token it allowed. Either pick ends the request
    and says why (the gateway's 400), where it used to read as a grammar completed ("stop", with
    text that breaks it)."""
    for p, words in ((guided("json", {"$ref": "#"}), ""), (guided("regex", "a{1000000}"), "too many")):
        history = History(VOCAB, [1], matcher=grammar.start(p.grammar, VOCAB))
        [event] = sample(torch.zeros(1, VOCAB), [p], [0], ["r"], [history])
        assert event.finish_reason == "stop" and event.grammar_error and words in event.grammar_error, event
    fine = guided("regex", "a{5}")
    [event] = sample(torch.zeros(1, VOCAB), [fine], [0], ["r"], [History(VOCAB, [1], matcher=grammar.start(fine.grammar, VOCAB))])
    assert event.grammar_error is None and tokenizer.decode([event.token_id]) in ("a", "aa", "aaa", "aaaa", "aaaaa")


def test_the_services_refuse_a_grammar_that_does_not_compile(tiny_model_path):
    """A grammar the gateway did not check (another client of the services' API) is a 400 there,
    before anything is reserved or queued; a valid one passes."""
    import asyncio

    from common.errors import BadRequest
    from common.model import load_model
    from common.protocol import PrefillRequest
    from common.settings import PromptSettings, TokenSettings
    from engine.runner import ModelRunner
    from prompt_service.engine import PrefillEngine
    from token_service.engine import TokenEngine

    grammar.use_model(tiny_model_path)
    runner = ModelRunner(load_model(tiny_model_path), block_size=4)
    token = TokenEngine(runner, TokenSettings(max_seqs=2, max_model_len=64, block_size=4, colocated=True), "t")
    prompt = PrefillEngine(runner, PromptSettings(), peers=None)
    bad = PrefillRequest(request_id="r", prompt_ids=[1, 2], sampling=SamplingParams(grammar="start: nowhere"),
                         target_service_id="t", target_kv_address="")
    for call in (token.prefill, prompt.submit):
        with pytest.raises(BadRequest, match="unknown name") as info:
            asyncio.run(call(bad))
        assert (info.value.param, info.value.code) == ("grammar", "invalid_grammar")
    assert not token.scheduler.seqs and not prompt.jobs and not prompt.queue
    good = bad.sampling.model_copy(update={"grammar": grammar.from_request("regex", "[a-z]+")})
    assert not asyncio.run(token.start_grammar(good)).done


def _nested(depth: int) -> dict:
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_closing_objects_visits_subschemas_only():
    """disable_additional_properties: every object schema gets additionalProperties false, and
    nothing else changes (an enum of objects, a property named "properties")."""
    schema = {"type": "object", "properties": {"properties": {"type": "string"}, "e": {"enum": [{"type": "object"}]},
                                               "list": {"type": "array", "items": {"type": "object"}}},
              "$defs": {"d": {"properties": {"x": {"const": {"properties": 1}}}}}, "anyOf": [{"type": "object"}]}
    closed = grammar._closed(schema)
    assert closed["additionalProperties"] is False and "additionalProperties" not in closed["properties"]
    assert closed["properties"]["e"] == {"enum": [{"type": "object"}]}
    assert closed["properties"]["list"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["properties"]["x"] == {"const": {"properties": 1}}
    assert closed["anyOf"][0]["additionalProperties"] is False


def test_a_grammar_that_allows_only_a_stop_token_ends_the_output_before_min_tokens(tokenizer):
    """Its only token left is EOS, which min_tokens holds back: the row would have nothing to pick
    (a fallback token the grammar forbids). The completed grammar wins, as it does for its last
    token: EOS is picked. Rows without a grammar beside it keep min_tokens."""
    p = guided("regex", "", min_tokens=3, eos_token_ids=[2])  # nothing: EOS at once
    plain = SamplingParams(min_tokens=3, eos_token_ids=[2])
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2))
    logits[:, 2] = 50.0  # EOS the likeliest
    events = sample(logits, [p, plain], [0, 0], ["g", "p"], [History(VOCAB, [1], matcher=grammar.start(p.grammar, VOCAB)), None])
    assert events[0].token_id == 2 and events[0].finish_reason == "stop"
    assert events[1].token_id != 2  # min_tokens still holds EOS back where no grammar says otherwise
    # EOS or one more token: EOS held, "a" picked (EOS named twice, as the request's stop token too)
    half = guided("regex", "a?", min_tokens=3, eos_token_ids=[2], stop_token_ids=[2])
    [event] = sample(logits[:1], [half], [0], ["h"], [History(VOCAB, [1], matcher=grammar.start(half.grammar, VOCAB))])
    assert tokenizer.decode([event.token_id]) == "a" and event.finish_reason == "stop"
