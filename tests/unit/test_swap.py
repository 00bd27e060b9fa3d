"""Microbatch KV swapping (engine/swap.py), in process on the tiny model: decode steps over a small
device pool, the KV of record in the host pool, equal generate and a plain pool to the bit; the
device's room is taken and given back in step order; what the budget flags mean."""

import dataclasses
import time

import pytest
import torch

from common.settings import SettingsError, TokenSettings, kv_device_bytes_needed
from engine.attention import Segment, slots_of
from engine.runner import ModelRunner
from engine.swap import SWAPPED_IN, SWAPPED_OUT, SwapPool
from token_service.room import kv_room
from token_service.scheduler import Scheduler
from token_service.sequence import SeqStatus, Sequence

BLOCK = 4


@pytest.fixture(scope="module", params=["own, paged attention kernel", "own"])
def runner(request, tiny_oracle):
    runner = ModelRunner(tiny_oracle.model, block_size=BLOCK, kernels=request.param.endswith("kernel"))
    assert runner.name == request.param
    return runner


def prompts_of(tok) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in ["Hi", "The capital of France is", "one two three four five six seven",
                                          "a b c d e f", "Paris is a city in"]]


def counter(c) -> float:
    return c._value.get()


def test_microbatches_swapped_through_a_small_device_equal_generate_and_a_plain_pool(runner, tiny_oracle):
    """Five sequences in a host pool of 40 blocks, decoded as microbatches of two or three over a
    device of 12 blocks (two steps' worth): the tokens equal generate, and the host pool holds,
    to the bit, the KV a plain pool of the same block tables holds."""
    prompts, steps = prompts_of(tiny_oracle.tokenizer), 9
    want = [tiny_oracle.generate_ids(p, steps) for p in prompts]
    tables = [[3, 17, 8, 30, 1], [12, 0, 25, 6, 33, 2], [9, 38, 4, 21, 14, 7], [5, 19, 27, 36, 10], [11, 23, 35, 16, 28]]
    swap, plain = SwapPool(runner, 40, 12), runner.new_pool(40)
    for pool in (swap.host, plain):  # the prompts' KV, as a prompt service's stream lands it
        first = runner.forward([Segment(p, 0, t) for p, t in zip(prompts, tables)], pool).argmax(-1).tolist()
    out = [[t] for t in first]
    groups = [[0, 1], [2, 3, 4]]
    swapped_in, swapped_out = counter(SWAPPED_IN), counter(SWAPPED_OUT)
    for _ in range(steps - 1):
        segments = {g: [Segment([out[i][-1]], len(prompts[i]) + len(out[i]) - 1, tables[i]) for i in group]
                    for g, group in enumerate(groups)}
        staged = [swap.prefetch(segments[0]), swap.prefetch(segments[1])]  # the second moves in as the first computes
        for g, group in enumerate(groups):
            logits = swap.forward(runner, staged[g])
            torch.testing.assert_close(logits, runner.forward(segments[g], plain), rtol=0, atol=0)
            for i, row in zip(group, logits.argmax(-1).tolist()):
                out[i].append(row)
    assert out == want
    used = torch.cat([slots_of(t, BLOCK, 0, len(p) + steps - 1) for p, t in zip(prompts, tables)])
    assert torch.equal(swap.host[:, :, used], plain[:, :, used])
    assert swap.blocks_used == 0
    per_token = swap.token_bytes
    assert counter(SWAPPED_OUT) - swapped_out == (steps - 1) * len(prompts) * per_token  # the new token only
    kv_read = sum(len(p) + k for p in prompts for k in range(steps - 1))  # each step's KV so far, in again
    assert counter(SWAPPED_IN) - swapped_in == kv_read * per_token


def test_a_prefetch_waits_for_room_and_takes_its_turn(runner, tiny_oracle):
    """Three steps of four blocks on a device of eight: the third moves in only once the first has
    computed; a step that will not compute gives its room back; one bigger than the device fails."""
    ids = list(range(100, 113))
    swap = SwapPool(runner, 64, 8)
    tables = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    for t in tables:
        runner.forward([Segment(ids[:12], 0, t)], swap.host)
    steps = [[Segment([ids[12]], 12, t)] for t in tables]
    a, b, c = (swap.prefetch(s) for s in steps)
    a.result(5)
    b.result(5)
    time.sleep(0.2)
    assert not c.done() and swap.blocks_used == 8
    swap.forward(runner, a)
    c.result(5)
    swap.discard(b)
    swap.forward(runner, c)
    assert swap.blocks_used == 0
    too_big = swap.prefetch([Segment([ids[12]], 40, list(range(11)))])
    with pytest.raises(ValueError, match="does not fit"):
        swap.forward(runner, too_big)
    assert swap.blocks_used == 0
    swap.close()


def test_budget_flags(tiny_oracle):
    runner = ModelRunner(tiny_oracle.model, block_size=16)
    block = runner.kv.bytes_per_token * 16
    plain = TokenSettings(max_model_len=64, kv_device_bytes=10 * block)
    assert kv_room(plain, runner) == (10, 0)  # without --swap: the pool is the budget
    swapped = TokenSettings(max_model_len=64, max_seqs=8, kv_device_bytes=10 * block, swap=True)
    assert kv_room(swapped, runner) == (8 * 4, 10)  # the pool: --max-seqs of --max-model-len, in host memory
    staged = TokenSettings(max_model_len=64, stages=2, pipeline="p", kv_device_bytes=10 * block, swap=True)
    assert kv_room(staged, runner)[1] == 10 * 3 // 2  # blocks of the largest stage: 2 of the 3 layers
    with pytest.raises(SettingsError, match="--kv-device-bytes.*--max-model-len 64: give at least"):
        kv_room(TokenSettings(max_model_len=64, kv_device_bytes=7 * block, swap=True), runner)
    # what `dejavu up` asks for up front (dejavu/cli.py) is exactly enough, a byte less is not
    for stages, first in ((1, 3), (2, 2)):
        need = kv_device_bytes_needed(64, 16, block // 3 * first, swap=True)
        fits = TokenSettings(max_model_len=64, stages=stages, pipeline="p", kv_device_bytes=need, swap=True)
        assert kv_room(fits, runner)[1] == 2 * 4
        with pytest.raises(SettingsError, match=f"give at least {need}"):
            kv_room(dataclasses.replace(fits, kv_device_bytes=need - 1), runner)
    for bad, flag in [(dict(swap=True), "--swap"), (dict(kv_device_bytes=-1), "--kv-device-bytes"),
                      (dict(kv_device_bytes=1 << 20, kv_blocks=256), "--kv-device-bytes"),
                      (dict(kv_device_bytes=1 << 20, swap=True, colocated=True), "--swap")]:
        with pytest.raises(SettingsError, match=flag):
            TokenSettings(**bad)


def test_scheduler_keeps_a_step_within_the_device_and_lets_none_starve():
    """Six sequences of 20 tokens (2 blocks of 16 each next step), at most 5 blocks a step: two per
    step, those that waited longest first, so every one runs once in three steps."""
    sched = Scheduler(block_size=16)
    for i in range(6):
        seq = Sequence(f"r{i}", 20, 8, 3, status=SeqStatus.RUNNING)
        seq.output = [1]
        sched.add(seq)
    ran = [{s.request_id for s in sched.schedule(max_blocks=5).seqs} for _ in range(3)]
    assert all(len(r) == 2 for r in ran) and set.union(*ran) == {f"r{i}" for i in range(6)}
    assert sched.schedule(max_blocks=1) is None  # not even one fits: nothing runs (admission prevents it)
