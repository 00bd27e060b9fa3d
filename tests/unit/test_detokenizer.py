import random

import pytest

from gateway.detokenizer import IncrementalDetokenizer, StopStrings

TEXTS = ["Hello, world! This is a test.", "  leading spaces and\ttabs\n\nnewlines",
         "Unicode: naïve café, 日本語のテキスト, emoji 🚀✨👩‍👩‍👧, math ∑∫√", "mixed 12345 numbers and CamelCaseWords"]


@pytest.fixture(scope="module")
def tokenizer(bundled_path):
    from common.model import load_tokenizer

    return load_tokenizer(bundled_path)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids] + [detok.finish()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


def test_random_token_streams_equal_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(len(tokenizer)) for _ in range(40)]
        detok = IncrementalDetokenizer(tokenizer)
        text = "".join(detok.add(t) for t in ids) + detok.finish()
        assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_byte_fallback_pieces_never_emit_broken_characters(tokenizer):
    ids = tokenizer("🚀")["input_ids"]
    assert len(ids) > 1  # the emoji spans several byte tokens
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🚀"


def test_stop_strings_cut_across_pieces():
    s = StopStrings(["STOP", "\n\n"])
    out = "".join(s.push(p) for p in ["Hello ", "wor", "ld S", "TO", "P and more"])
    assert out == "Hello world " and s.stopped
    assert s.push("ignored") == "" and s.flush() == ""


def test_stop_strings_release_text_that_cannot_start_a_stop():
    s = StopStrings(["abc"])
    assert s.push("xyzab") == "xyz"      # "ab" could be the start of "abc"
    assert s.push("d") == "abd"
    assert s.flush() == "" and not s.stopped


def test_earliest_stop_wins():
    s = StopStrings(["world", "lo"])
    assert s.push("hello world") == "hel"


def test_before_min_tokens_nothing_is_matched_but_a_stop_ending_after_is():
    s = StopStrings(["STOP"])
    assert s.push("a STOP b ST", match=False) == "a STOP b "  # "ST" held: it may end after min_tokens
    assert s.push("OP c") == "" and s.stopped  # as vLLM's look-back finds it


def test_include_keeps_the_stop_string_and_drops_what_follows():
    s = StopStrings(["STOP", "ST"], include=True)
    assert s.push("a STOP b") == "a STOP" and s.stopped  # of two at one place, the longer
