"""Turning tokens into text as they arrive, and cutting at stop strings.

Incremental detokenization never emits a broken UTF-8 character: a token that ends mid-character
decodes to U+FFFD and is held back until the character completes. `finish()` returns whatever
makes the concatenation equal `tokenizer.decode(all_ids, skip_special_tokens=skip_special)` exactly.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special: bool = True):
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.ids: list[int] = []
        self.prefix_offset = 0  # decoding starts here, so leading-space rules match the full decode
        self.read_offset = 0    # text of ids[:read_offset] has been emitted
        self.emitted: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix) or text.endswith("\ufffd") or not text.startswith(prefix):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._emit(text[len(prefix):])

    def finish(self) -> str:
        full, done = self._decode(self.ids), "".join(self.emitted)
        return self._emit(full[len(done):]) if full.startswith(done) else ""

    def _emit(self, text: str) -> str:
        self.emitted.append(text)
        return text


def tag_start(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag` (held back until the
    next piece says whether the tag came)."""
    return next((k for k in range(len(tag) - 1, 0, -1) if text.endswith(tag[:k])), 0)


class StopStrings:
    """Holds back the longest tail of the text that could still grow into a stop string."""

    def __init__(self, stops: list[str], include: bool = False):
        self.stops = stops
        self.include = include  # the stop string stays at the end of the text (include_stop_str_in_output)
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def push(self, text: str, match: bool = True) -> str:
        """Text safe to release now. After a stop string is seen, `stopped` is set and the
        stop string and anything after it are dropped. With `match` off (before min_tokens, as
        vLLM) nothing is matched, but a tail that could start a stop string is still held back: a
        stop string that ends in later text is matched there, as vLLM's look-back does."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [] if not match else [(i, -len(s)) for i, s in ((self.pending.find(s), s) for s in self.stops) if i >= 0]
        if hits:  # the earliest, and of two there the longest
            i, minus_len = min(hits)
            self.stopped, self.matched = True, self.pending[i: i - minus_len]
            out, self.pending = self.pending[: i - minus_len if self.include else i], ""
            return out
        cut = len(self.pending) - self._held()
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def _held(self) -> int:
        for n in range(min(self.hold, len(self.pending)), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
