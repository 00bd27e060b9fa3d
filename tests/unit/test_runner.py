"""ModelRunner against HF, in process, on the tiny model: our forward (and the HF-modules fallback)
over a paged pool, with prompts prefilled in one batch, decode steps where sequences of different
lengths share the batch and join late, and chunked prefill."""

import copy

import pytest
import torch

from engine.attention import Segment, slots_of
from engine.runner import ModelRunner, stage_layers

BLOCK = 4


@pytest.fixture(scope="module", params=["own, paged attention kernel", "own", "hf"])
def runner(request, tiny_oracle):
    """Our forward with the CPU decode kernel, without it (gather + SDPA, the CUDA path), and the
    Hugging Face modules."""
    runner = ModelRunner(tiny_oracle.model, block_size=BLOCK, own_forward=request.param != "hf",
                         kernels=request.param.endswith("kernel"))
    assert runner.name == request.param
    return runner


def prompts_of(tok) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in ["Hi", "The capital of France is", "one two three four five six seven"]]


def decode_greedy(runner, pool, prompts: list[list[int]], steps: list[int], tables: list[list[int]]) -> list[list[int]]:
    """The prompts prefilled in one batch, then decoded together, greedy, each for its own number
    of tokens: the batch shrinks as they finish."""
    first = runner.forward([Segment(p, 0, t) for p, t in zip(prompts, tables)], pool).argmax(-1).tolist()
    out = [[t] for t in first]
    while any(len(o) < n for o, n in zip(out, steps)):
        live = [i for i, (o, n) in enumerate(zip(out, steps)) if len(o) < n]
        segments = [Segment([out[i][-1]], len(prompts[i]) + len(out[i]) - 1, tables[i]) for i in live]
        for i, row in zip(live, runner.forward(segments, pool).argmax(-1).tolist()):
            out[i].append(row)
    return out


def test_batched_prefill_and_paged_decode_equal_generate(runner, tiny_oracle):
    prompts, steps = prompts_of(tiny_oracle.tokenizer), [6, 10, 3]
    want = [tiny_oracle.generate_ids(p, n) for p, n in zip(prompts, steps)]
    tables = [[7, 3, 20, 11, 5], [0, 9, 30, 2, 14, 1], [31, 4, 8, 6, 10]]  # scattered, not in order
    assert decode_greedy(runner, runner.new_pool(32), prompts, steps, tables) == want


def test_prefill_without_a_pool_hands_each_layer_to_the_callback(runner, tiny_oracle):
    """A prompt service's prefill: prompts of mixed lengths back to back; the K/V it hands out is
    what a paged prefill writes to the pool."""
    prompts = prompts_of(tiny_oracle.tokenizer)
    seen = {}
    first = runner.prefill(prompts, lambda layer, k, v: seen.setdefault(layer, (k.clone(), v.clone())))
    assert first.argmax(-1).tolist() == [tiny_oracle.generate_ids(p, 1)[0] for p in prompts]
    pool, tables = runner.new_pool(16), [[0, 1], [2, 3, 4], [5, 6, 7]]
    runner.forward([Segment(p, 0, t) for p, t in zip(prompts, tables)], pool)
    slots = torch.cat([slots_of(t, BLOCK, 0, len(p)) for p, t in zip(prompts, tables)])
    for layer, (k, v) in seen.items():
        torch.testing.assert_close(pool[layer, 0, slots], k)
        torch.testing.assert_close(pool[layer, 1, slots], v)


def test_chunks_and_extend_equal_one_prefill(runner, tiny_oracle):
    """Chunked prefill: the prompt in pieces, each attending to the earlier ones in the pool, gives
    the same KV and next-token logits as one prefill (to rounding); decoding on from there equals
    generate, with a decode token in the same forward as a chunk."""
    ids = tiny_oracle.tokenizer("The quick brown fox jumps over the lazy dog and runs away")["input_ids"]
    want = tiny_oracle.generate_ids(ids, 8)
    pool = runner.new_pool(16)
    full, part = [0, 1, 2, 3, 4], [9, 8, 15, 6, 7]
    full_logits = runner.forward([Segment(ids, 0, full)], pool)
    runner.forward([Segment(ids[:5], 0, part)], pool)
    runner.forward([Segment(ids[5:9], 5, part)], pool)
    other = [Segment([want[0]], len(ids), full)]  # a decode token of another sequence rides along
    logits = runner.forward(other + [Segment(ids[9:], 9, part)], pool)
    torch.testing.assert_close(logits[1], full_logits[0], atol=1e-4, rtol=1e-4)
    a, b = slots_of(full, BLOCK, 0, len(ids)), slots_of(part, BLOCK, 0, len(ids))
    torch.testing.assert_close(pool[:, :, b], pool[:, :, a], atol=1e-5, rtol=1e-4)
    out = [int(logits[1].argmax())]
    while len(out) < 8:
        out.append(int(runner.forward([Segment([out[-1]], len(ids) + len(out) - 1, part)], pool).argmax()))
    assert out == want


def test_a_single_prompt_through_each_sdpa_backend_equals_generate(tiny_oracle):
    """Without our kernels (CUDA, no compiler) a prompt's attention is SDPA's, whose math backend
    returns heads outermost: a prefill of one prompt takes its output as it comes (no copy into a
    buffer of the batch's rows), whatever its strides."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    runner = ModelRunner(tiny_oracle.model, block_size=BLOCK, kernels=False)
    prompt = prompts_of(tiny_oracle.tokenizer)[2]
    want = tiny_oracle.generate_ids(prompt, 1)
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel(backend):
            assert runner.forward([Segment(prompt, 0, [0, 1])], runner.new_pool(4)).argmax(-1).tolist() == want
            assert runner.prefill([prompt], lambda layer, k, v: None).argmax(-1).tolist() == want


def test_the_gate_up_linear_fuses_its_activation_only_where_the_kernel_can(tiny_oracle):
    from engine.kernels import paged_attention
    from engine.model import Linear

    kernel = paged_attention()
    if kernel is None or "float32" not in kernel.LINEAR_DTYPES:
        pytest.skip("no float32 GEMM of ours on this CPU")
    x = torch.randn(3, 24)
    fused, plain = Linear(torch.randn(64, 24), None, kernel, gate_up=True), Linear(torch.randn(48, 24), None, kernel, gate_up=True)
    assert fused.fused and not plain.fused  # 2I = 48: I = 24 is no multiple of 16
    with pytest.raises(TypeError, match="silu_mul"):
        fused(x)
    with pytest.raises(TypeError, match="without its activation"):
        plain.silu_mul(x)
    assert fused.silu_mul(x[None]).shape == (1, 3, 32)  # leading dims kept
    assert plain(x).shape == (3, 48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_stack_equals_the_python_loop_to_the_bit(tiny_oracle, dtype):
    """A decode step's layers in one C++ call (engine/kernels/decode.cpp) run the loop's kernels in
    the loop's order: the same logits and the same K/V in the pool, to the bit; sequences of
    different lengths over scattered blocks."""
    runner = ModelRunner(copy.deepcopy(tiny_oracle.model).to(dtype), block_size=BLOCK)
    if runner.llama.stack is None:
        pytest.skip(f"our kernels do not run {dtype} linears on this CPU: no DecodeStack")
    torch.manual_seed(0)
    pool = runner.new_pool(64).normal_()
    order = torch.randperm(64).tolist()
    segments = [Segment([100 + b], start, order[b * 8:(b + 1) * 8]) for b, start in enumerate([1, 5, 17, 30, 31])]
    stacked, looped = pool.clone(), pool.clone()
    want = runner.forward(segments, stacked)
    stack, runner.llama.stack = runner.llama.stack, None
    got = runner.forward(segments, looped)
    runner.llama.stack = stack
    assert torch.equal(want, got) and torch.equal(stacked, looped)
    with pytest.raises(ValueError, match="blocks"):  # position 32 needs a ninth block
        runner.forward([Segment([100], 32, order[:8])], pool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_rows_logits_are_the_same_beside_a_prefill_chunk(dtype, two_threads):
    """Colocated, a step computes the running decodes next to a prompt's chunk when one is queued:
    whether it was depends on timing, and on a failure. A decode row's logits must not (a probe saw
    bf16 greedy text move under load). SmolLM2's widths, 2 layers, random weights; past the small
    ops' one-thread grain (engine/kernels/pointwise.cpp): 300 rows of 576."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1024)
    runner = ModelRunner(LlamaForCausalLM(config).eval().to(dtype), block_size=BLOCK)
    prompts = [torch.randint(3, 1000, (n,)).tolist() for n in (40, 13, 7, 22, 9)]  # 5: whole rows a work item
    tables = [list(range(b * 20, b * 20 + 20)) for b in range(5)]
    pool = runner.new_pool(100 + 80)
    first = runner.forward([Segment(p, 0, t) for p, t in zip(prompts, tables)], pool).argmax(-1).tolist()
    decodes = [Segment([f], len(p), t) for f, p, t in zip(first, prompts, tables)]
    chunk = Segment(torch.randint(3, 1000, (300,)).tolist(), 0, list(range(100, 100 + 80)))
    alone = runner.forward(decodes, pool.clone())
    assert torch.equal(runner.forward(decodes + [chunk], pool.clone())[:5], alone)
    assert torch.equal(runner.forward([chunk] + decodes, pool.clone())[1:], alone)
    assert torch.equal(runner.forward(decodes[:1], pool.clone()), alone[:1])  # a step of its own
    # a prompt alone and in a batch of prompts (a prompt service's prefill): its logits and its K/V
    own, batched = runner.new_pool(100 + 80), runner.new_pool(100 + 80)
    first = runner.forward([Segment(prompts[2], 0, tables[2])], own)
    assert torch.equal(runner.forward([Segment(p, 0, t) for p, t in zip(prompts, tables)] + [chunk], batched)[2], first[0])
    slots = slots_of(tables[2], BLOCK, 0, len(prompts[2]))
    assert torch.equal(own[:, :, slots], batched[:, :, slots])


def test_stage_layers_split_the_model_evenly():
    assert [stage_layers(30, 1, 0)] == [range(0, 30)]
    assert [stage_layers(30, 4, k) for k in range(4)] == [range(0, 8), range(8, 16), range(16, 23), range(23, 30)]
    assert [stage_layers(3, 3, k) for k in range(3)] == [range(0, 1), range(1, 2), range(2, 3)]
    for bad in [(30, 0, 0), (3, 4, 0), (30, 2, 2)]:
        with pytest.raises(ValueError):
            stage_layers(*bad)


@pytest.mark.parametrize("stages", [2, 3])
def test_pipeline_stages_chained_equal_generate(tiny_oracle, stages):
    """A model cut into stages, each with the pool of its own layers, the residual stream handed
    from one to the next: the same greedy tokens as generate, and the same K/V in the stages' pools
    as in one whole model's pool."""
    model = tiny_oracle.model
    whole = ModelRunner(model, block_size=BLOCK)
    parts = [ModelRunner(model, block_size=BLOCK, layers=stage_layers(whole.kv.layers, stages, k)) for k in range(stages)]
    assert [p.layers.start for p in parts] == sorted({p.layers.start for p in parts}) and parts[-1].layers.stop == whole.kv.layers
    pools = [p.new_pool(32) for p in parts]

    class Chain:  # decode_greedy's view of a runner: forward(segments, pool) -> logits
        def forward(self, segments, _pool):
            out = None
            for part, pool in zip(parts, pools):
                out = part.forward(segments, pool, hidden=out)
            return out

    prompts, steps = prompts_of(tiny_oracle.tokenizer), [6, 10, 3]
    tables = [[7, 3, 20, 11, 5], [0, 9, 30, 2, 14, 1], [31, 4, 8, 6, 10]]
    want = [tiny_oracle.generate_ids(p, n) for p, n in zip(prompts, steps)]
    assert decode_greedy(Chain(), None, prompts, steps, tables) == want
    pool = whole.new_pool(32)
    assert decode_greedy(whole, pool, prompts, steps, tables) == want
    torch.testing.assert_close(torch.cat(pools), pool, rtol=0, atol=0)
    with pytest.raises(ValueError, match="hidden states"):
        parts[1].forward([Segment([1, 2], 0, [0])], pools[1])  # a later stage takes no token ids


def test_stages_need_our_forward(tiny_oracle):
    with pytest.raises(ValueError, match="Llama family"):
        ModelRunner(tiny_oracle.model, block_size=BLOCK, own_forward=False, layers=range(0, 1))
