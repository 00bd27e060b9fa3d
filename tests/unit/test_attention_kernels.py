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
@pytest.mark.parametrize("M, start", [(1, 0), (17, 0), (500, 0), (33, 100), (1, 7), (16, 16)])  # 16, 32: whole key tiles
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


@pytest.mark.parametrize("dim", [32, 96, 256])  # the other head dims built (kernels.HEAD_DIMS)
def test_causal_attention_other_head_dims(dim):
    test_causal_attention_equals_sdpa(torch.float32, 1e-5, 4, 2, dim, 37, 11)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (8, 8, 128), (2, 1, 80)])
@pytest.mark.parametrize("B", [1, 3, 2 * torch.get_num_threads() + 1])  # one KV head a work item; whole rows
def test_paged_decode_attention_equals_sdpa(dtype, tol, heads, kv_heads, dim, B):
    """Each sequence's one query against its keys, read through its own scattered slots; the
    sequences differ in length, and the slots past a sequence's length (other keys) are not read."""
    torch.manual_seed(B + dim)
    block, L = 16, 70
    pool = torch.randn(2, (B * 5 + 3) * block, kv_heads, dim, dtype=dtype)
    order = torch.randperm(B * 5 + 3)[: B * 5].view(B, 5)
    slots = (order[:, :, None] * block + torch.arange(block)).view(B, -1)[:, :L].contiguous()
    lengths = torch.tensor([(L, 5, 44, 31)[b % 4] for b in range(B)])  # 5: shorter than the prefetch distance
    q = torch.randn(B, heads, dim, dtype=dtype)
    out = kernel.paged_decode_attention(q, pool[0], pool[1], slots, lengths, dim ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    for b in range(B):
        n = int(lengths[b])
        k, v = pool[0, slots[b, :n]], pool[1, slots[b, :n]]
        torch.testing.assert_close(out[b:b + 1].double(), reference(q[b:b + 1], k, v, n - 1), atol=tol, rtol=tol)


def test_causal_attention_refuses_what_it_cannot_read():
    q, k = torch.randn(4, 2, 16), torch.randn(5, 1, 16)
    with pytest.raises(RuntimeError, match="start \\+ M"):
        kernel.causal_attention(q, k, k, 0, 0.25)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel.causal_attention(torch.randn(2, 4, 16).transpose(0, 1), k[:4], k[:4], 0, 0.25)  # heads apart
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernel.causal_attention(q.half(), k[:4].half(), k[:4].half(), 0, 0.25)


# The fused small ops (engine/kernels/pointwise.cpp) against the PyTorch ops they replace, as HF
# runs them: equal to the bit in bf16 (every op rounds where HF's does), to a sum's order in float32.

def _tol(dtype):
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0, "rtol": 0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 200])
def test_fused_small_ops_equal_pytorchs(dtype, rows):
    from engine.model import _rms_norm, _rotate_half

    torch.manual_seed(rows)
    x, delta, w = torch.randn(rows, 576, dtype=dtype), torch.randn(rows, 576, dtype=dtype), torch.randn(576, dtype=dtype)
    torch.testing.assert_close(kernel.rms_norm(x, w, 1e-5), _rms_norm(x, w, 1e-5), **_tol(dtype))
    h = x.clone()
    out = kernel.add_rms_norm(h, delta, w, 1e-5)
    torch.testing.assert_close(h, x + delta, **_tol(dtype))
    torch.testing.assert_close(out, _rms_norm(x + delta, w, 1e-5), **_tol(dtype))

    qkv = torch.randn(rows, 15 * 64, dtype=dtype)  # RoPE in place on a strided view, as the model does
    q = qkv[:, :9 * 64].view(rows, 9, 64)
    angles = torch.arange(rows).float()[:, None] * torch.rand(32)
    cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype) for f in (torch.cos, torch.sin))
    want, rest = q * cos[:, None] + _rotate_half(q) * sin[:, None], qkv[:, 9 * 64:].clone()
    kernel.rope_(q, cos, sin)
    torch.testing.assert_close(q, want, **_tol(dtype))
    assert torch.equal(qkv[:, 9 * 64:], rest)  # the K and V columns untouched

    gate_up = torch.randn(rows, 2 * 1536, dtype=dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernel.silu_and_mul(gate_up), F.silu(gate) * up, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("I", [1, 7, 17, 40])
def test_silu_and_mul_computes_a_rows_last_partial_span_as_a_whole_one(dtype, I):
    """SiLU(gate) * up runs in spans of 16 (silu.h, the one copy the GEMM's epilogue calls too): a
    row's last span short of 16 goes through the same code, padded, so its values are what the same
    inputs give inside a whole span; and they are PyTorch's, to bf16's rounding."""
    torch.manual_seed(I)
    gate, up = (torch.randn(3, I) * 4).to(dtype), torch.randn(3, I).to(dtype)
    got = kernel.silu_and_mul(torch.cat([gate, up], -1))
    more = -(-I // 16) * 16 - I  # to whole spans: the same values at the same places, and others after
    whole = kernel.silu_and_mul(torch.cat([gate, torch.randn(3, more).to(dtype), up, torch.randn(3, more).to(dtype)], -1))
    assert torch.equal(got, whole[:, :I])
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(got, F.silu(gate) * up, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_small_ops_are_the_same_alone_and_in_a_batch_the_team_runs(dtype, two_threads):
    """A decode row's norm came out other bits beside a prefill chunk's 200 rows (the batch runs on
    the OpenMP team, a few rows on the calling thread: two inlined copies of the row's loop, each
    summed its own way under -ffast-math) than in a decode-only step: greedy picks moved in bf16
    under load. Each row's arithmetic now has one copy (pointwise.cpp, rms_row)."""
    torch.manual_seed(0)
    rows, grain = 300, (1 << 15) // 576  # past pointwise.cpp's one-thread grain
    assert rows > 2 * grain
    x, delta, w = (torch.randn(rows, 576) * 4).to(dtype), torch.randn(rows, 576).to(dtype), torch.randn(576).to(dtype)
    batch = kernel.rms_norm(x, w, 1e-5)
    h = x.clone()
    added = kernel.add_rms_norm(h, delta, w, 1e-5)
    qkv = torch.randn(rows, 15 * 64, dtype=dtype)
    angles = torch.arange(rows).float()[:, None] * torch.rand(32)
    cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype) for f in (torch.cos, torch.sin))
    roped = qkv.clone()
    kernel.rope_(roped[:, :9 * 64].view(rows, 9, 64), cos, sin)
    gate_up = torch.randn(rows, 2 * 1536, dtype=dtype)
    act = kernel.silu_and_mul(gate_up)
    for i in range(rows):
        one = slice(i, i + 1)
        assert torch.equal(kernel.rms_norm(x[one].clone(), w, 1e-5), batch[one]), i
        assert torch.equal(kernel.add_rms_norm(x[one].clone(), delta[one], w, 1e-5), added[one]), i
        alone = qkv[one].clone()
        kernel.rope_(alone[:, :9 * 64].view(1, 9, 64), cos[one], sin[one])
        assert torch.equal(alone, roped[one]), i
        assert torch.equal(kernel.silu_and_mul(gate_up[one]), act[one]), i


linear_dtypes = [d for d in (torch.float32, torch.bfloat16)
                 if kernel is not None and str(d).removeprefix("torch.") in kernel.LINEAR_DTYPES]


@pytest.mark.skipif(not linear_dtypes, reason="this CPU has neither AVX-512 nor AVX2 with FMA: the engines keep oneDNN's GEMM")
@pytest.mark.parametrize("N, K", [(960, 576), (7, 6), (33, 18), (49, 1536), (24, 18), (13, 6), (80, 18), (65, 18)])  # panels cut short, odd N; on AVX2 a half panel exactly, a half cut short; float32's groups of 3 panels cut short (1, 2 left; bf16's: 33, 49, 7, 13, 24)
@pytest.mark.parametrize("M", [1, 5, 12, 13, 32, 33, 64, 65, 500])  # tiles of 12, 8 (6 on AVX2) rows, cut short; row chunks
def test_linear_equals_a_float64_matmul(N, K, M):
    """engine/kernels/linear.cpp: x W^T + b against float64, with and without a bias, every column
    written (none of the zero padding of the last panels leaks into the output)."""
    for dtype in linear_dtypes:
        torch.manual_seed(M * N + K)
        w, b, x = torch.randn(N, K).to(dtype), torch.randn(N), torch.randn(M, K).to(dtype)
        packed = kernel.pack_linear(w)
        want = x.double() @ w.double().T
        # bf16: exact products, float32 sums, one rounding of the result to bf16 (8 bits of mantissa)
        tol = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 8e-3}
        got = kernel.linear(x, packed, None, N)
        assert got.dtype == dtype and got.shape == (M, N)
        torch.testing.assert_close(got.double(), want, **tol)
        torch.testing.assert_close(kernel.linear(x, packed, b, N).double(), want + b.double(), **tol)


@pytest.mark.skipif(not linear_dtypes, reason="this CPU has neither AVX-512 nor AVX2 with FMA: the engines keep oneDNN's GEMM")
@pytest.mark.parametrize("N, K", [(960, 576), (49, 1536), (24, 18), (13, 6), (80, 18), (65, 18)])  # whole groups of panels; groups cut short
def test_a_rows_output_is_the_same_bits_in_a_prefill_and_alone(N, K):
    """A prefill's rows (more than 32) take other tiles than a decode step's (linear_tiles.h), but
    every output element is the same sum in the same order: a row comes out the same bits whether
    it is computed alone, in a few rows or in a long prompt."""
    for dtype in linear_dtypes:
        torch.manual_seed(N + K)
        w, b, x = torch.randn(N, K).to(dtype), torch.randn(N), torch.randn(70, K).to(dtype)
        packed = kernel.pack_linear(w)
        for bias in (None, b):
            whole = kernel.linear(x, packed, bias, N)
            alone = torch.cat([kernel.linear(x[i:i + 1], packed, bias, N) for i in range(len(x))])
            assert torch.equal(whole, alone)
            assert torch.equal(kernel.linear(x[:16], packed, bias, N), whole[:16])


@pytest.mark.skipif(torch.bfloat16 not in linear_dtypes or not kernel.LINEAR_BF16_WIDENED,
                    reason="the widening bf16 tiles are built only for AVX2 + FMA without AVX-512, and for "
                           "AVX-512 with AVX512-FP16")
@pytest.mark.parametrize("N, K", [(960, 576), (13, 6), (24, 18), (49, 1536)])
@pytest.mark.parametrize("M", [1, 7, 65])
def test_a_widening_bf16_tile_is_the_float32_gemm_rounded_to_nearest_even_to_the_bit(N, K, M):
    """A widening bf16 tile (AVX2's; AVX512-FP16's) widens the weights and sums in float32 in the
    float32 tile's order, and y is rounded to bf16 once: so its output is exactly the float32 GEMM
    of the same (bf16) values, rounded by PyTorch (to nearest even), every column of a cut-short
    panel included, a decode step's rows and a prefill's alike."""
    torch.manual_seed(M * N + K)
    w, b, x = torch.randn(N, K).bfloat16(), torch.randn(N), torch.randn(M, K).bfloat16()
    w[0, 0], x[0, 0] = 3e38, 3e38  # an overflow to inf in row 0 (the rounding of large values)
    for bias in (None, b):
        want = kernel.linear(x.float(), kernel.pack_linear(w.float()), bias, N).bfloat16()
        got = kernel.linear(x, kernel.pack_linear(w), bias, N)
        assert torch.equal(got, want)


@pytest.mark.skipif(not linear_dtypes, reason="this CPU has neither AVX-512 nor AVX2 with FMA: the engines keep oneDNN's GEMM")
@pytest.mark.parametrize("I, K", [(1536, 576), (16, 6), (48, 18), (32, 18), (80, 18), (64, 18)])  # one gate/up pair; pairs over several groups; groups of 3 pairs cut short (2, 2, 1 pairs)
@pytest.mark.parametrize("M", [1, 5, 12, 13, 33, 65, 500])
def test_the_gate_up_gemm_with_its_activation_equals_the_two_calls_to_the_bit(I, K, M):
    """linear_silu_mul (the activation in the GEMM's epilogue, engine/model.py Linear.silu_mul) is
    silu_and_mul of linear's output, to the bit, with and without a bias: a model computes the
    same tokens whichever path a layer takes."""
    for dtype in linear_dtypes:
        torch.manual_seed(M * I + K)
        w, b, x = (torch.randn(2 * I, K) / 8).to(dtype), torch.randn(2 * I), torch.randn(M, K).to(dtype)
        fused = kernel.pack_gate_up(w)
        for bias in (b, None):
            want = kernel.silu_and_mul(kernel.linear(x, kernel.pack_linear(w), bias, 2 * I))
            got = kernel.linear_silu_mul(x, fused, None if bias is None else kernel.gate_up_order(bias), I)
            assert got.dtype == dtype and got.shape == (M, I)
            assert torch.equal(got, want)
        gate, up = (x.double() @ w.double().T).chunk(2, dim=-1)  # and both are the MLP's activation (no bias)
        tol = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
        torch.testing.assert_close(got.double(), F.silu(gate) * up, **tol)
    with pytest.raises(RuntimeError, match="packed by pack_gate_up"):
        kernel.linear_silu_mul(x, fused, None, I + 16)  # another I
    with pytest.raises(RuntimeError, match="multiple of 16"):
        kernel.pack_gate_up(torch.randn(2 * I + 2, K))


@pytest.mark.skipif(not linear_dtypes, reason="this CPU has neither AVX-512 nor AVX2 with FMA")
def test_linear_refuses_a_weight_packed_for_another_shape():
    packed = kernel.pack_linear(torch.randn(64, 32))
    with pytest.raises(RuntimeError, match="packed by pack_linear"):
        kernel.linear(torch.randn(2, 16), packed, None, 64)  # another K
    with pytest.raises(RuntimeError, match="packed by pack_linear"):
        kernel.linear(torch.randn(2, 32), packed, None, 16)  # N of fewer panels
    with pytest.raises(RuntimeError, match="one dtype"):
        kernel.linear(torch.randn(2, 32).double(), packed, None, 64)
    with pytest.raises(RuntimeError, match="packed by pack_linear"):  # panels of 8 columns: half the bytes it reads
        kernel.linear(torch.randn(2, 32), torch.randn(8, 32, 8), None, 64)
    if torch.bfloat16 in linear_dtypes:
        with pytest.raises(RuntimeError, match="packed by pack_linear"):  # K pairs in the wrong place
            kernel.linear(torch.randn(2, 32).bfloat16(), torch.randn(4, 16, 2, 16).bfloat16(), None, 64)
        with pytest.raises(RuntimeError, match="even K"):
            kernel.pack_linear(torch.randn(64, 33).bfloat16())


@pytest.mark.skipif(not linear_dtypes, reason="this CPU has neither AVX-512 nor AVX2 with FMA")
@pytest.mark.parametrize("bias", [False, True])
def test_model_linear_takes_our_gemm_where_the_kernel_runs_the_dtype(bias):
    """engine/model.py's Linear: our panels for a dtype the kernel lists, any leading dims and a
    non-contiguous x; oneDNN's prepacked weight for a dtype it does not list (another build, CPU)."""
    from engine.model import Linear

    torch.manual_seed(1)
    w, b = torch.randn(40, 24), torch.randn(40) if bias else None
    ours = Linear(w, b, kernel)
    assert ours.panels is not None and ours.packed is None
    x = torch.randn(3, 24, 5).transpose(1, 2)  # (3, 5, 24), not contiguous
    torch.testing.assert_close(ours(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)

    class Without:  # a build whose LINEAR_DTYPES lacks float32
        LINEAR_DTYPES = ()

    onednn = Linear(w, b, Without())
    assert onednn.panels is None and (onednn.packed is not None or not torch.backends.mkldnn.is_available())
    torch.testing.assert_close(onednn(x.reshape(-1, 24)), F.linear(x.reshape(-1, 24), w, b), atol=1e-5, rtol=1e-5)
