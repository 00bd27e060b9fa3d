import torch

from common.protocol import SamplingParams
from common.sampling import position_seed, sample, sample_one, uniform


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "seed": 7, **kw})


def test_greedy_is_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    events = sample(logits, [SamplingParams()] * 5, [0] * 5, [str(i) for i in range(5)])
    assert [e.token_id for e in events] == logits.argmax(-1).tolist()


def test_position_rng_depends_only_on_seed_and_index():
    assert uniform(1, 5) == uniform(1, 5)
    assert uniform(1, 5) != uniform(1, 6)
    assert uniform(1, 5) != uniform(2, 5)
    assert len({position_seed(3, i) for i in range(1000)}) == 1000


def test_sampled_token_independent_of_batch_composition():
    g = torch.Generator().manual_seed(1)
    row = torch.randn(1000, generator=g)
    others = torch.randn(3, 1000, generator=g)
    p = params(seed=99)
    alone = sample(row[None], [p], [4], ["a"])[0].token_id
    batch = torch.cat([others[:2], row[None], others[2:]])
    mixed = sample(batch, [params(seed=1), SamplingParams(), p, params(seed=5)], [0, 1, 4, 9], list("abcd"))
    assert mixed[2].token_id == alone


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    for i in range(20):
        assert sample_one(logits, params(top_k=1, seed=i), i) == int(logits.argmax())
        assert sample_one(logits, params(top_p=1e-6, seed=i), i) == int(logits.argmax())


def test_top_k_restricts_support():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(3))
    allowed = set(torch.topk(logits, 5).indices.tolist())
    assert {sample_one(logits, params(top_k=5, seed=s), 0) for s in range(300)} <= allowed


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    drawn = {sample_one(logits, params(top_p=0.8, seed=s), 0) for s in range(400)}
    assert drawn == {0, 1}


def test_frequencies_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    counts = torch.zeros(3)
    for s in range(3000):
        counts[sample_one(probs.log(), params(seed=s), 0)] += 1
    assert torch.allclose(counts / 3000, probs, atol=0.03), counts / 3000


def test_temperature_sharpens():
    logits = torch.tensor([1.0, 0.0, -1.0])
    cold = sum(sample_one(logits, params(temperature=0.1, seed=s), 0) == 0 for s in range(500))
    hot = sum(sample_one(logits, params(temperature=2.0, seed=s), 0) == 0 for s in range(500))
    assert cold > 490 and hot < 400


def test_logprobs_are_log_softmax_and_top_k_sorted():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(4))
    events = sample(logits, [SamplingParams(logprobs=3)] * 2, [0, 0], ["a", "b"])
    ref = torch.log_softmax(logits, -1)
    for row, e in enumerate(events):
        assert abs(e.logprob - ref[row, e.token_id].item()) < 1e-6
        assert [t.token_id for t in e.top_logprobs] == torch.topk(ref[row], 3).indices.tolist()
