"""Our CPU attention kernels (engine/kernels/paged_attention.cpp) against torch's SDPA in float64,
over the shapes serving meets: head dims we build, grouped queries, lengths that are no multiple of
a block, rows strided as views of a fused QKV output, K/V that start before the queries."""

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import paged_attention

kernel = paged_attention()
pytestmark = pytest.mark.skipif(kernel is None, reason="no C++ compiler: the engines take the SDPA path")


def reference(q, k, v, start):
    """SDPA in float64: query i at position start + i sees keys [0, start + i]."""
    M, L = q.shape[0], k.shape[0]
    allowed = torch.arange(L)[None, :] <= torch.arange(start, start + M)[:, None]
    q, k, v = (x.double().transpose(0, 1)[None] for x in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)[0].transpose(0, 1)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (4, 2, 16), (8, 8, 128), (2, 1, 80)])
@pytest.mark.parametrize("M, start", [(1, 0), (17, 0), (500, 0), (33, 100), (1, 7)])
def test_causal_attention_equals_sdpa(dtype, tol, heads, kv_heads, dim, M, start):
    torch.manual_seed(M + start + dim)
    qkv = torch.randn(M, (heads + 2 * kv_heads) * dim, dtype=dtype)  # strided views, as the model's
    q, k_new, v_new = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k_new, v_new = q.view(M, heads, dim), k_new.view(M, kv_heads, dim), v_new.view(M, kv_heads, dim)
    before = torch.randn(2, start, kv_heads, dim, dtype=dtype)
    k, v = torch.cat([before[0], k_new]), torch.cat([before[1], v_new])
    out = kernel.causal_attention(q, k, v, start, dim ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference(q, k, v, start), atol=tol, rtol=tol)


def test_causal_attention_refuses_what_it_cannot_read():
    q, k = torch.randn(4, 2, 16), torch.randn(5, 1, 16)
    with pytest.raises(RuntimeError, match="start \\+ M"):
        kernel.causal_attention(q, k, k, 0, 0.25)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel.causal_attention(torch.randn(2, 4, 16).transpose(0, 1), k[:4], k[:4], 0, 0.25)  # heads apart
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernel.causal_attention(q.half(), k[:4].half(), k[:4].half(), 0, 0.25)
