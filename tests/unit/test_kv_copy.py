import torch

from common.kv.copy import gather, gather_prefill, scatter


def test_gather_scatter_roundtrip_one_copy_layout():
    pool = torch.zeros(4, 2, 3, 2, 17, 8)  # (layers, 2, slots, kv_heads, max_len+1, head_dim)
    data = torch.randn(2, 2, 2, 5, 8)      # layers 1..2, tokens 3..7
    scatter(pool, 1, slice(1, 3), slice(3, 8), data)
    out = gather(pool, 1, slice(1, 3), slice(3, 8))
    assert out.is_contiguous() and torch.equal(out, data)
    assert pool[:, :, 0].abs().sum() == 0 and pool[:, :, 2].abs().sum() == 0  # other slots untouched
    assert pool[0].abs().sum() == 0 and pool[3].abs().sum() == 0                # other layers untouched
    assert pool[1:3, :, 1, :, :3].abs().sum() == 0                               # other tokens untouched


def test_gather_prefill_takes_the_real_tokens_of_a_left_padded_row():
    k = torch.randn(2, 3, 10, 4)  # (batch, kv_heads, T, head_dim)
    v = torch.randn(2, 3, 10, 4)
    out = gather_prefill(k, v, row=1, length=6)
    assert out.shape == (1, 2, 3, 6, 4) and out.is_contiguous()
    assert torch.equal(out[0, 0], k[1, :, 4:]) and torch.equal(out[0, 1], v[1, :, 4:])


def test_gather_prefill_into_its_place_in_a_message_of_several_layers():
    k, v = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4)
    message = torch.full((3, 2, 3, 6, 4), float("nan"))  # layers 4..6 of one prompt
    gather_prefill(k, v, row=1, length=6, out=message[1:2])
    assert torch.equal(message[1], gather_prefill(k, v, row=1, length=6)[0])
    assert message[0].isnan().all() and message[2].isnan().all()
