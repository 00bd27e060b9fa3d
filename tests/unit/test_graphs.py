"""Decode steps replayed from CUDA graphs (engine/graphs.py) against the eager step and HF
`generate`, in float32. On a CPU the graph path runs without capturing (its static buffers, buckets,
padding rows and scratch slot, each step recomputed); on a GPU the same tests capture and replay.

The model is built here from a config (no tokenizer, no fixture of conftest's), so that the file
runs on a bare GPU machine (scripts/gpu_device_run.sh)."""

import copy

import pytest
import torch

from engine.attention import Segment
from engine.graphs import batch_buckets, kv_buckets
from engine.runner import ModelRunner, stage_layers

BLOCK = 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=None, initializer_range=0.1)  # no EOS: generate runs n tokens
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    return request.param


def runners(model, device, **kwargs):
    model = copy.deepcopy(model).to(device)
    eager = ModelRunner(model, block_size=BLOCK, max_model_len=256, cuda_graphs=False, **kwargs)
    graphs = ModelRunner(model, block_size=BLOCK, max_model_len=256, cuda_graphs=True, max_batch=16, **kwargs)
    return eager, graphs


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(256)[-3:] == [240, 248, 256]
    assert kv_buckets(2048, 16) == [64, 128, 256, 512, 1024, 1536, 2048]
    assert kv_buckets(100, 16) == [64, 128]
    assert kv_buckets(64, 48) == [96]  # whole blocks
    assert kv_buckets(1000, 48) == [96, 144, 288, 528, 1056]
    assert kv_buckets(32768, 16)[-11:] == [3584, 4096, 5120, 6656, 8704, 11264, 14336, 17920, 22528, 28160, 35328]


def generate(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=n)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kernels", [True, False])
def test_greedy_decode_through_graphs_equals_generate(model, device, kernels):
    """Five sequences, lengths crossing the 64-token bucket, decoded together and retiring one by
    one (batch buckets 8, 4, 2, 1): each equals HF generate; the graphs serve every decode step."""
    if device == "cuda" and not kernels:
        pytest.skip("the CPU kernels have no CUDA variant: one CUDA case")
    _, runner = runners(model, device, kernels=kernels)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 40, 58, 61, 3)]
    steps = [12, 20, 9, 30, 4]
    blocks = (torch.randperm(120, generator=g) + 2).tolist()  # scattered; blocks 0 and 1 no sequence's
    tables = [blocks[i * 24:(i + 1) * 24] for i in range(5)]
    pool = runner.new_pool(122)
    assert pool.shape[2] == 122 * BLOCK + 1  # one scratch slot past the blocks
    first = runner.forward([Segment(p, 0, t) for p, t in zip(prompts, tables)], pool).argmax(-1).tolist()
    out = [[t] for t in first]
    before = pool[:, :, :2 * BLOCK].clone()  # blocks 0 and 1: no sequence's
    while any(len(o) < n for o, n in zip(out, steps)):
        live = [i for i, (o, n) in enumerate(zip(out, steps)) if len(o) < n]
        segments = [Segment([out[i][-1]], len(prompts[i]) + len(out[i]) - 1, tables[i]) for i in live]
        for i, row in zip(live, runner.forward(segments, pool).argmax(-1).tolist()):
            out[i].append(row)
    cpu = model.to("cpu")
    assert out == [generate(cpu, p, n) for p, n in zip(prompts, steps)]
    assert torch.equal(pool[:, :, :2 * BLOCK], before), "a padding row wrote a block"
    used = set(runner.graphs.buckets)
    assert {B for B, _ in used} == {8, 4, 2, 1} and {L for _, L in used} == {64, 128}
    if device == "cuda":
        assert runner.graphs.captures == len(used)


def test_replayed_step_matches_the_eager_one(model, device):
    """The same pool state and step through both runners: the logits agree (a padded batch is a
    GEMM of other shape: not to the bit), as do the K/V written; a replay of a bucket captured
    already gives the same logits as its first."""
    eager, runner = runners(model, device)
    pool = runner.new_pool(40)
    pool[:, :, :-1].normal_()
    reference = pool[:, :, :-1].clone()
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(5)]
    segments = [Segment([7 + i], start, t) for i, (start, t) in enumerate(zip((3, 17, 30, 31, 9), tables))]
    got = runner.forward(segments, pool)
    want = eager.forward(segments, reference)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pool[:, :, :-1], reference, rtol=1e-4, atol=1e-4)
    again = runner.forward(segments, pool)  # the same step again: the bucket's graph, replayed
    assert torch.equal(again, got)
    other = [Segment([50 + i], s.start + 1, s.blocks) for i, s in enumerate(segments[:3])]  # refilled: 3 rows as 4
    reference = pool[:, :, :-1].clone()
    torch.testing.assert_close(runner.forward(other, pool), eager.forward(other, reference), rtol=1e-4, atol=1e-4)
    assert sorted(runner.graphs.buckets) == [(4, 64), (8, 64)]


def test_steps_the_graphs_do_not_take_run_eagerly(model, device):
    """A prefill, a chunk, a pool the runner did not make, a step past the largest KV bucket, a
    batch past the largest: eager, and equal to the eager runner's."""
    eager, runner = runners(model, device)
    pool, other = runner.new_pool(100), eager.new_pool(100)
    table = list(range(80))
    prompt = list(range(3, 261))
    for p in (pool, other):
        runner.forward([Segment(prompt[:200], 0, table)], p)
        runner.forward([Segment(prompt[200:255], 200, table)], p)  # a chunk: several tokens after KV
    runner.forward([Segment([prompt[255]], 255, table)], other)    # not the graphs' pool
    assert not runner.graphs.buckets
    runner.forward([Segment([prompt[255]], 255, table)], pool)     # 256 tokens: the last bucket
    assert list(runner.graphs.buckets) == [(1, 256)]
    past = runner.forward([Segment([prompt[256]], 256, table)], pool)  # 257: past the last bucket
    torch.testing.assert_close(past, eager.forward([Segment([prompt[256]], 256, table)], other), rtol=1e-4, atol=1e-4)
    many = [Segment([7 + i], 3, [80 + i]) for i in range(17)]  # 17 rows: past the largest batch, 16
    torch.testing.assert_close(runner.forward(many, pool), eager.forward(many, other), rtol=1e-4, atol=1e-4)
    assert list(runner.graphs.buckets) == [(1, 256)]
    with pytest.raises(ValueError, match="blocks"):
        runner.forward([Segment([5], 255, table[:10])], pool)


@pytest.mark.parametrize("stages", [2, 3])
def test_pipeline_stages_replayed_equal_generate(model, device, stages):
    """The model cut into stages, each replaying its own graphs, the residual stream handed from
    one to the next (a later stage's padding rows zeros): greedy output equals HF generate, as
    four sequences retire, and the stages' pools hold what one eager runner's pool does."""
    on = copy.deepcopy(model).to(device)
    layers = on.config.num_hidden_layers  # 3: with 3 stages, a middle one (hidden in, hidden out)
    parts = [ModelRunner(on, block_size=BLOCK, max_model_len=256, cuda_graphs=True, max_batch=8,
                         layers=stage_layers(layers, stages, k)) for k in range(stages)]
    whole = ModelRunner(on, block_size=BLOCK, max_model_len=256, cuda_graphs=False)
    pools, reference = [p.new_pool(80) for p in parts], whole.new_pool(80)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (7, 30, 12, 50)]
    steps = [9, 14, 5, 20]
    tables = [list(range(i * 20, i * 20 + 20)) for i in range(4)]
    out = [[] for _ in prompts]
    for step in range(max(steps)):
        live = [i for i, n in enumerate(steps) if len(out[i]) < n]
        segments = [Segment(prompts[i], 0, tables[i]) if step == 0 else
                    Segment([out[i][-1]], len(prompts[i]) + len(out[i]) - 1, tables[i]) for i in live]
        x = None
        for part, pool in zip(parts, pools):
            x = part.forward(segments, pool, hidden=x)
        eager = whole.forward(segments, reference)
        torch.testing.assert_close(x, eager, rtol=1e-4, atol=1e-4)
        for i, row in zip(live, x.argmax(-1).tolist()):
            out[i].append(row)
    assert out == [generate(model, p, n) for p, n in zip(prompts, steps)]
    torch.testing.assert_close(torch.cat([p[:, :, :-1] for p in pools]), reference, rtol=1e-4, atol=1e-4)
    for part in parts:  # every stage replayed the decode steps: batches of 4, 3 (as 4), 2 and 1
        assert {B for B, _ in part.graphs.buckets} == {4, 2, 1}, part.layers


def test_graphs_are_for_our_forward(model):
    with pytest.raises(ValueError, match="our forward"):
        ModelRunner(model, block_size=BLOCK, cuda_graphs=True, own_forward=False)
    auto = ModelRunner(model, block_size=BLOCK)
    assert (auto.graphs is not None) == (auto.device.type == "cuda")
    assert auto.new_pool(4).shape[2] == 4 * BLOCK + (auto.graphs is not None)


def test_a_new_pool_takes_the_graphs_and_the_old_one_runs_eagerly(model, device):
    """Graphs replay at the pool's addresses: a runner's next pool starts over (on a GPU, in a new
    memory pool: capturing into the one its dropped graphs used fails an allocator assertion), and
    a step over the pool before, still alive, runs eagerly, over that pool's own contents."""
    eager, runner = runners(model, device)
    segments = [Segment([9], 10, [3, 4, 5]), Segment([11], 5, [7, 8])]
    first, second = runner.new_pool(20), None
    first[:, :, :-1].normal_()
    for blocks in (20, 30):
        pool = first if second is None else second
        reference = eager.new_pool(blocks)
        reference.copy_(pool[:, :, :-1])
        torch.testing.assert_close(runner.forward(segments, pool), eager.forward(segments, reference),
                                   rtol=1e-4, atol=1e-4)
        assert list(runner.graphs.buckets) == [(2, 64)]
        second = runner.new_pool(30)
    assert not runner.graphs.fits(segments, first)
    reference = eager.new_pool(20)
    reference.copy_(first[:, :, :-1])
    torch.testing.assert_close(runner.forward(segments, first), eager.forward(segments, reference), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernels", [False, True])
def test_masked_keys_read_only_the_scratch_slot(model, device, kernels):
    """Every slot no sequence holds is NaN (the scratch slot aside, which only padding rows write),
    slot 0 among them: replayed steps, padded and not, give finite logits equal to the eager step's
    over a clean pool. A masked key read anywhere but the scratch slot would turn its row NaN (with
    the CPU kernel, which reads no key past a row's length, this checks the writes)."""
    if device == "cuda" and kernels:
        pytest.skip("the CPU kernels have no CUDA variant")
    eager, runner = runners(model, device, kernels=kernels)
    pool, clean = runner.new_pool(40), eager.new_pool(40)
    tables = [[5, 9, 2], [30, 31], [17, 3, 22, 8], [11], [33, 1]]  # block 0 no sequence's
    lengths = [10, 7, 13, 3, 6]
    clean.normal_()
    pool[:, :, :-1].copy_(clean)
    owned = torch.zeros(40 * BLOCK, dtype=torch.bool)
    for t, n in zip(tables, lengths):
        for p in range(n):
            owned[t[p // BLOCK] * BLOCK + p % BLOCK] = True
    pool[:, :, :-1][:, :, ~owned.to(pool.device)] = float("nan")
    for rows in (5, 4):  # 5 run as 8 (three padding rows), 4 as 4
        segments = [Segment([20 + i], n - 1, t) for i, (t, n) in enumerate(zip(tables[:rows], lengths[:rows]))]
        got = runner.forward(segments, pool)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, eager.forward(segments, clean), rtol=1e-4, atol=1e-4)
