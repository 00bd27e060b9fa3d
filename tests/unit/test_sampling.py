import torch

from common.protocol import SamplingParams
from common.sampling import position_seed, process, sample, sample_one, uniform


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


# Logit bias, min_tokens and penalties (`process`): Hugging Face's logits processors are the
# reference where it has them (bit for bit: the same float32 operations), OpenAI's formula where not.

def hf_processed(logits: torch.Tensor, ids: list[int], prompt_len: int, **kw) -> torch.Tensor:
    from transformers.generation.logits_process import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor)
    procs = LogitsProcessorList()
    if "bias" in kw:
        procs.append(SequenceBiasLogitsProcessor({(t,): b for t, b in kw["bias"]}))
    if "min_tokens" in kw:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, kw["min_tokens"], eos_token_id=kw["eos"]))
    if "repetition" in kw:
        procs.append(RepetitionPenaltyLogitsProcessor(kw["repetition"]))
    return procs(torch.tensor([ids]), logits[None].clone())[0]


def test_bias_min_tokens_and_repetition_penalty_equal_hugging_faces_processors():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 300, generator=g) * 4
    prompt, output = [5, 17, 17, 250, 2], [17, 40, 41, 40]
    bias = [(40, 3.5), (7, -100.0), (299, 100.0)]
    cases = [(SamplingParams(logit_bias=bias), {"bias": bias}),
             (SamplingParams(repetition_penalty=1.3), {"repetition": 1.3}),
             (SamplingParams(repetition_penalty=0.7, logit_bias=bias), {"repetition": 0.7, "bias": bias}),
             (SamplingParams(min_tokens=5, eos_token_ids=[2], stop_token_ids=[9]), {"min_tokens": 5, "eos": [9, 2]})]
    for p, kw in cases:
        got = process(logits, [p] * 3, [len(output)] * 3, [(prompt, output)] * 3)
        for row in range(3):
            want = hf_processed(logits[row], prompt + output, len(prompt), **kw)
            assert torch.equal(got[row], want), (p, row)
    # min_tokens masks the stop tokens before output index min_tokens only: the request's always, the
    # model's EOS unless ignore_eos (which makes it no stop)
    p = SamplingParams(min_tokens=4, eos_token_ids=[2], stop_token_ids=[9])
    masked = process(logits, [p, p, p.model_copy(update={"ignore_eos": True})], [3, 4, 0], [None] * 3)
    assert masked[0, 2] == masked[0, 9] == float("-inf") and masked[1, 2] == logits[1, 2] and masked[1, 9] == logits[1, 9]
    assert masked[2, 2] == logits[2, 2] and masked[2, 9] == float("-inf")


def test_the_requests_stop_tokens_end_it_even_with_ignore_eos():
    from common.protocol import TokenEvent
    from common.sampling import first_event

    p = SamplingParams(max_tokens=5, eos_token_ids=[2], stop_token_ids=[9], ignore_eos=True)
    assert p.stops == [9]
    assert first_event(p, TokenEvent(request_id="r", index=0, token_id=9)).finish_reason == "stop"
    assert first_event(p, TokenEvent(request_id="r", index=0, token_id=2)).finish_reason is None
    assert SamplingParams(eos_token_ids=[2], stop_token_ids=[9]).stops == [9, 2]


def test_frequency_and_presence_penalties_count_the_output_not_the_prompt():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(6))
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=-0.25)
    got = process(logits, [p, p], [4, 0], [([3, 3, 8], [8, 8, 9, 11]), ([3, 3, 8], [])])
    want = logits[0].clone()
    for token, count in ((8, 2), (9, 1), (11, 1)):  # OpenAI: logit - count * frequency - (count > 0) * presence
        want[token] -= count * 0.5 - 0.25
    assert torch.allclose(got[0], want, atol=1e-6) and got[0, 3] == logits[0, 3]
    assert torch.equal(got[1], logits[1])  # nothing out yet: nothing counted


def test_rows_without_processing_are_untouched_and_logprobs_stay_the_models():
    logits = torch.randn(2, 40, generator=torch.Generator().manual_seed(7))
    plain = [SamplingParams(), SamplingParams(temperature=0.8, seed=3, top_k=5)]
    assert process(logits, plain, [0, 0]) is logits  # no copy when no row asks for anything
    top = int(logits[0].argmax())
    p = SamplingParams(logit_bias=[(top, -100.0)], logprobs=1)
    event = sample(logits[:1], [p], [0], ["a"])[0]
    assert event.token_id != top  # the bias moved the greedy pick...
    assert event.top_logprobs[0].token_id == top  # ...and the logprobs reported are the model's
    assert abs(event.logprob - torch.log_softmax(logits[0], -1)[event.token_id].item()) < 1e-6


def test_min_p_keeps_tokens_within_a_fraction_of_the_likeliest():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]))
    drawn = {sample_one(logits, params(min_p=0.3, seed=s), 0) for s in range(400)}
    assert drawn == {0, 1, 2}  # 0.15 >= 0.3 * 0.4 = 0.12 > 0.1
    assert {sample_one(logits, params(min_p=1.0, seed=s), 0) for s in range(50)} == {0}
