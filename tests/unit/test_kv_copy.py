import pytest
import torch

from common.kv.copy import gather, gather_prefill, scatter
from engine.attention import slots_of


def test_scatter_then_gather_round_trips_a_token_range_of_a_block_table():
    pool = torch.zeros(4, 2, 6 * 4, 2, 8)  # (layers, 2, blocks * block_size, kv_heads, head_dim), blocks of 4
    table = [5, 0, 3]  # positions 0-3 in block 5, 4-7 in block 0, 8-11 in block 3
    data = torch.randn(2, 2, 7, 2, 8)  # layers 1-2, tokens 3-9
    slots = slots_of(table, 4, 3, 10)
    assert slots.tolist() == [23, 0, 1, 2, 3, 12, 13]
    scatter(pool, slots, slice(1, 3), data)
    assert torch.equal(gather(pool, slots, slice(1, 3)), data)
    assert gather(pool, slots).shape == (4, 2, 7, 2, 8)
    untouched = torch.ones(24, dtype=torch.bool)
    untouched[slots] = False
    assert pool[:, :, untouched].abs().sum() == 0 and pool[0].abs().sum() == 0 and pool[3].abs().sum() == 0


def test_gather_prefill_copies_one_prompts_rows_into_a_message():
    k, v = torch.randn(20, 2, 8), torch.randn(20, 2, 8)  # three prompts back to back: 5, 9, 6 tokens
    message = torch.empty(3, 2, 9, 2, 8)  # three layers of the second prompt's message
    gather_prefill(k, v, slice(5, 14), out=message[1:2])
    assert torch.equal(message[1, 0], k[5:14]) and torch.equal(message[1, 1], v[5:14])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_copies_the_slots_of_a_layer_range_in_any_dtype(dtype):
    """A gather (the replicator's copy of a token range) takes the right slots of the right layers
    in every dtype and owns its memory: the pool's blocks are reused once the request ends."""
    pool = torch.randn(4, 2, 64, 3, 8).to(dtype)
    slots = torch.tensor([5, 1, 63, 7, 7])
    out = gather(pool, slots, slice(1, 3))
    assert out.dtype == dtype and out.is_contiguous() and out.shape == (2, 2, 5, 3, 8)
    assert torch.equal(out[1, 0, 0], pool[2, 0, 5]) and torch.equal(out[0, 1, 3], pool[1, 1, 7])
    pool.zero_()
    assert out.abs().sum() > 0  # a copy, not a view of the pool
