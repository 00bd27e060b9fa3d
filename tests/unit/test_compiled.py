"""--compile: decode steps through torch.compile (engine/compiled.py) on the tiny model. Greedy
output equals Hugging Face `generate` while the batch shrinks from five sequences to one and the KV
grows, with no recompilation after start-up."""

import torch
from torch._dynamo.utils import counters

from engine.attention import Segment
from engine.runner import ModelRunner
from tests.unit.test_runner import decode_greedy

BLOCK = 4


def test_compiled_decode_equals_generate_and_never_recompiles(tiny_oracle):
    runner = ModelRunner(tiny_oracle.model, block_size=BLOCK, compile=True)
    assert runner.compiled is not None and runner.compiled.compile_s > 0
    graphs = counters["stats"]["unique_graphs"]
    calls = []
    graph = runner.compiled.graph
    runner.compiled.graph = lambda *args: calls.append(len(args[0])) or graph(*args)

    texts = ["Hi", "The capital of France is", "one two three four five six seven", "a b", "Once upon a time"]
    prompts = [tiny_oracle.tokenizer(t)["input_ids"] for t in texts]
    steps = [4, 12, 7, 9, 15]  # sequences leave one by one: batches of 5, 4, 3, 2, 1
    want = [tiny_oracle.generate_ids(p, n) for p, n in zip(prompts, steps)]
    tables = [list(range(i, 64, 5)) for i in range(5)]  # interleaved blocks
    assert decode_greedy(runner, runner.new_pool(64), prompts, steps, tables) == want
    assert sorted(set(calls)) == [2, 3, 4, 5]  # float32: a batch of one runs eagerly (engine/runner.py)
    assert counters["stats"]["unique_graphs"] == graphs, "a new batch size or KV length recompiled the step"


def test_compiled_step_writes_the_same_kv_as_the_eager_one(tiny_oracle):
    eager, compiled = ModelRunner(tiny_oracle.model, block_size=BLOCK), ModelRunner(tiny_oracle.model, BLOCK, compile=True)
    pools = [eager.new_pool(8).normal_(generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    pools[1].copy_(pools[0])
    segments = [Segment([5], 6, [3, 1]), Segment([9], 11, [0, 2, 7])]
    logits = [r.forward(segments, p) for r, p in zip((eager, compiled), pools)]
    torch.testing.assert_close(logits[1], logits[0], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(pools[1], pools[0], atol=1e-5, rtol=1e-4)
