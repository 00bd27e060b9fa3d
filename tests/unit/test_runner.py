"""ModelRunner against HF generate, in process: a left-padded prefill batch, then pooled decode
steps where sequences of different lengths share the batch, join late and leave early."""


import torch

from common.kv.copy import gather_prefill, scatter
from common.runner import ModelRunner


def test_batched_prefill_and_pooled_decode_equal_generate(tiny_oracle):
    model, tok = tiny_oracle.model, tiny_oracle.tokenizer
    runner = ModelRunner(model)
    prompts = [tok(t)["input_ids"] for t in ["Hi", "The capital of France is", "one two three four five six seven"]]
    steps = [6, 10, 3]
    want = [tiny_oracle.generate_ids(p, n) for p, n in zip(prompts, steps)]
    pool = runner.new_pool(slots=4, max_len=64)
    slots = [2, 0, 1]  # not in prompt order; row 3 stays idle

    def on_layer(layer, k, v):
        for row, (p, slot) in enumerate(zip(prompts, slots)):
            scatter(pool, slot, slice(layer, layer + 1), slice(0, len(p)), gather_prefill(k, v, row, len(p)))

    first = runner.prefill(prompts, on_layer).argmax(-1).tolist()
    out = [[t] for t in first]
    while any(len(o) < n for o, n in zip(out, steps)):
        live = [len(o) < n for o, n in zip(out, steps)]
        rows = max(s for s, l in zip(slots, live) if l) + 1
        tokens, positions, running = [0] * rows, [0] * rows, [False] * rows
        for i, slot in enumerate(slots):
            if live[i] and slot < rows:
                tokens[slot], positions[slot], running[slot] = out[i][-1], len(prompts[i]) + len(out[i]) - 1, True
        logits = runner.decode(pool, tokens, positions, running)
        for i, slot in enumerate(slots):
            if live[i]:
                out[i].append(int(logits[slot].argmax()))
    assert out == want


def test_unpadded_and_padded_prefill_agree_with_generate(tiny_oracle):
    """Equal lengths take the unmasked path, mixed lengths the padded one: both give HF's first token."""
    runner = ModelRunner(tiny_oracle.model)
    tok = tiny_oracle.tokenizer
    same = [tok("one two three")["input_ids"], tok("four five six")["input_ids"]]
    assert len(same[0]) == len(same[1])
    mixed = same + [tok("x")["input_ids"]]
    for prompts in (same, mixed):
        first = runner.prefill(prompts, lambda *a: None).argmax(-1).tolist()
        assert first == [tiny_oracle.generate_ids(p, 1)[0] for p in prompts]


def test_extend_after_a_partial_prefill_equals_the_full_one(tiny_oracle):
    """Recovery's recompute: KV [0, n) from a prefill, then `extend` over tokens [n, L) gives the same
    KV and next-token logits as a prefill of all L tokens, and decoding on from there equals generate."""
    model, tok = tiny_oracle.model, tiny_oracle.tokenizer
    runner = ModelRunner(model)
    ids = tok("The quick brown fox jumps over the lazy dog and runs away")["input_ids"]
    want = tiny_oracle.generate_ids(ids, 8)
    full, part = runner.new_pool(slots=2, max_len=64), runner.new_pool(slots=2, max_len=64)

    def into(pool, slot, n):
        return lambda layer, k, v: scatter(pool, slot, slice(layer, layer + 1), slice(0, n), gather_prefill(k, v, 0, n))

    full_logits = runner.prefill([ids], into(full, 0, len(ids)))
    n = 4
    runner.prefill([ids[:n]], into(part, 1, n))
    logits = runner.extend(part, 1, ids[n:], n)
    torch.testing.assert_close(logits, full_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(part[:, :, 1, :, :len(ids)], full[:, :, 0, :, :len(ids)], atol=1e-5, rtol=1e-4)
    out = [int(logits.argmax())]
    while len(out) < 8:
        step = runner.decode(part, [0, out[-1]], [0, len(ids) + len(out) - 1], [False, True])
        out.append(int(step[1].argmax()))
    assert out == want
