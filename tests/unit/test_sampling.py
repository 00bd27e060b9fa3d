import torch

from common.protocol import SamplingParams
from common.sampling import History, _race, position_seed, process, sample, sample_one


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "seed": 7, **kw})


def test_greedy_is_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(0))
    events = sample(logits, [SamplingParams()] * 5, [0] * 5, [str(i) for i in range(5)])
    assert [e.token_id for e in events] == logits.argmax(-1).tolist()


def test_position_rng_depends_only_on_seed_and_index():
    assert position_seed(1, 5) == position_seed(1, 5)
    assert position_seed(1, 5) != position_seed(1, 6)
    assert position_seed(1, 5) != position_seed(2, 5)
    assert len({position_seed(3, i) for i in range(1000)}) == 1000
    probs = torch.ones(3000)  # the same row at other positions or seeds: other picks
    assert _race(probs, 1, 5) == _race(probs, 1, 5)
    assert len({_race(probs, 1, i) for i in range(20)}) > 15
    assert len({_race(probs, s, 5) for s in range(20)}) > 15


def test_the_race_draws_in_proportion_to_the_probabilities():
    """Across blocks and inside them, a padded last block included (1,000 tokens: 3 blocks of 256
    and 232 more): 40,000 draws, one seed each, against the probabilities, each within 4.5 standard
    deviations; the tokens of probability 0 never."""
    probs = torch.zeros(1000)
    probs[[3, 4, 250, 256, 300, 511, 512, 999]] = torch.tensor([0.3, 0.05, 0.1, 0.2, 0.01, 0.04, 0.25, 0.05])
    probs[600:700] = 0.0001  # a tail of 100 tokens, 0.01 in all
    n = 40_000
    counts = torch.bincount(torch.tensor([_race(probs * 3.0, s, 2) for s in range(n)]), minlength=1000)
    assert int(counts[probs == 0].sum()) == 0
    for group in ([3], [4], [250], [256], [300], [511], [512], [999], list(range(600, 700))):
        p = float(probs[group].sum())
        seen, want, sd = int(counts[group].sum()), n * p, (n * p * (1 - p)) ** 0.5
        assert abs(seen - want) < 4.5 * sd, (group[0], seen, want)


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
        got = process(logits, [p] * 3, [len(output)] * 3, [History(300, prompt, output)] * 3)
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
    grown = History(50, [3, 3, 8], [8]).update([8, 9]).update([8, 9, 11])  # as a sequence's grows step by step
    got = process(logits, [p, p], [4, 0], [grown, History(50, [3, 3, 8])])
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


def sorted_reference(logits: torch.Tensor, p: SamplingParams, index: int) -> int:
    """The pick by a stable sort of the whole vocabulary by probability (what common/sampling.py did
    until it learnt to find the same sets without sorting): min-p, top-k, top-p on the sorted
    probabilities, then the race over what they keep, at their probabilities renormalized."""

    scaled = logits.float() / p.temperature
    order = torch.argsort(-scaled, stable=True)
    scaled = scaled[order]
    if p.min_p > 0:
        probs = torch.softmax(scaled, dim=-1)
        keep = int((probs >= p.min_p * probs[0]).sum())
        scaled, order = scaled[:keep], order[:keep]
    if 0 < p.top_k < scaled.numel():
        scaled, order = scaled[: p.top_k], order[: p.top_k]
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        keep = max(int(((torch.cumsum(probs, dim=-1) - probs) < p.top_p).sum()), 1)
        probs, order = probs[:keep] / probs[:keep].sum(), order[:keep]
    kept = torch.zeros(logits.numel())
    kept[order] = probs
    return _race(kept, p.seed, index)


def test_the_kept_sets_found_without_sorting_are_a_stable_sorts():
    """Ties included (logits rounded to a coarse grid: many equal values at every cut), over the
    filters and their combinations; the nucleus past the first look (a flat distribution)."""
    g = torch.Generator().manual_seed(8)
    rows = [torch.round(torch.randn(3000, generator=g) * 4) / 2, torch.randn(3000, generator=g) * 3,
            torch.zeros(3000), torch.randn(3000, generator=g) * 0.1]
    # top_p off the multiples of 1/20 and 1/3000: no mass sum lands on it in a flat row, where
    # float32's last bit would decide whether a token is in (no set is right then)
    filters = [{}, {"top_k": 7}, {"top_k": 300}, {"top_p": 0.9013}, {"top_p": 0.3021, "top_k": 50}, {"min_p": 0.2},
               {"min_p": 0.05, "top_k": 20, "top_p": 0.8047}, {"top_p": 0.9993}, {"temperature": 0.3, "top_p": 0.9517}]
    for row in rows:
        for f in filters:
            for s in range(40):
                p = params(seed=s, **f)
                assert sample_one(row, p, s) == sorted_reference(row, p, s), (f, s)


def test_a_mixed_batch_draws_each_row_as_alone():
    """Rows of every kind in one call (greedy among them, filters differing row to row, penalties on
    some): each pick is its row's alone, by the stable sort's reference where it is drawn."""
    g = torch.Generator().manual_seed(9)
    logits = torch.round(torch.randn(10, 2000, generator=g) * 6) / 3
    kinds = [{}, {"top_k": 5}, {"top_p": 0.7013}, {"min_p": 0.1}, {"top_k": 40, "top_p": 0.9017, "min_p": 0.02},
             {"temperature": 0.0}, {"temperature": 1.7, "top_k": 1999}, {"top_p": 0.5031, "frequency_penalty": 1.0},
             {"top_k": 3, "repetition_penalty": 1.4, "logit_bias": [(7, 5.0)]}, {"min_p": 0.5}]
    batch = [params(seed=100 + r, **kw) for r, kw in enumerate(kinds)]
    histories = [History(2000, [1, 2, 3], [7, 7, 9, 1])] * len(batch)
    indices = list(range(3, 13))
    events = sample(logits, batch, indices, [str(r) for r in range(10)], histories)
    processed = process(logits, batch, indices, histories)
    for r, (p, e) in enumerate(zip(batch, events)):
        alone = process(logits[r:r + 1], [p], [indices[r]], [histories[r]])[0]
        assert torch.equal(alone, processed[r]), r
        want = int(alone.argmax()) if p.greedy else sorted_reference(alone, p, indices[r])
        assert e.token_id == want, (r, kinds[r])


def test_extreme_and_broken_logits_never_raise():
    """A step's sampling fails every sequence in it: what a request can ask (the extreme penalties
    and biases, -100 on the likeliest: its logits stay finite) and logits without any
    probability (all -inf, NaN) still give a token a row, the likeliest that is a number."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(10))
    logits[2] = float("-inf")
    logits[3, :5] = float("nan")
    everything = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.1}
    for kw in ({"repetition_penalty": 0.01, "logit_bias": [(7, 100.0)]}, {"repetition_penalty": 100.0, "frequency_penalty": 2.0},
               {"logit_bias": [(int(logits[0].argmax()), -100.0)]}, {}):
        for extra in ({}, everything, {"temperature": 0.0}):
            p = SamplingParams(seed=3, **{**kw, **extra})
            events = sample(logits, [p] * 4, [0] * 4, list("abcd"), [History(300, [1, 2, 0], [0, 5])] * 4)
            assert all(0 <= e.token_id < 300 for e in events), (kw, extra)
            if not p.greedy:  # (greedy on a model's own NaN logits is argmax's pick: a token still)
                assert events[3].token_id >= 5  # never a NaN one


def test_a_rows_draws_do_not_depend_on_its_batch_at_a_models_vocabulary():
    """A resumed request is batched with others than before and must draw the same tokens: a row
    alone and beside rows with other filters (top-k, min-p, top-p: their sums over a batch would be
    added up otherwise than one row's), at 49k tokens, where the CPU splits a single long row's sum
    between threads. (A draw flips only where a bound moved by a last bit: a batched version of
    `_draw` flipped about 1 in 1,000 here, so this mostly checks that nothing before `_draw` mixes
    rows; `_draw` takes one row by its signature.)"""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 49152, generator=g) * 3
    neighbours = [params(seed=1, top_k=50), params(seed=2, min_p=0.01), params(seed=3, top_p=0.9)]
    for kw in ({}, {"top_p": 0.95}, {"top_k": 2000}, {"min_p": 0.001, "top_p": 0.99}):
        for s in range(20):
            p = params(seed=s, **kw)
            alone = sample(logits[:1], [p], [5], ["a"])[0].token_id
            batched = sample(logits, [p] + neighbours, [5, 1, 2, 3], list("abcd"))[0].token_id
            assert alone == batched, (kw, s)


def test_the_repetition_penalty_comes_before_frequency_and_presence():
    """vLLM's order: HF's repetition processor on the prompt and output, then OpenAI's formula."""
    logits = torch.randn(1, 60, generator=torch.Generator().manual_seed(12)) * 3
    prompt, output = [4, 5, 5], [5, 9, 9, 30]
    p = SamplingParams(repetition_penalty=1.7, frequency_penalty=0.8, presence_penalty=0.3)
    want = hf_processed(logits[0], prompt + output, len(prompt), repetition=1.7)
    for token in set(output):
        want[token] -= output.count(token) * 0.8 + 0.3
    got = process(logits, [p], [len(output)], [History(60, prompt, output)])[0]
    assert torch.allclose(got, want, atol=1e-6)
    other_way = logits[0].clone()  # the formula first, then the penalty: a different result
    for token in set(output):
        other_way[token] -= output.count(token) * 0.8 + 0.3
    assert not torch.allclose(hf_processed(other_way, prompt + output, len(prompt), repetition=1.7), want, atol=1e-3)


def test_a_last_bit_change_in_the_logits_seldom_moves_a_seeded_pick():
    """What a resume or another batch does to a row's logits (float32's last bits: 1e-4 at these
    magnitudes is more) may move a pick only where two clocks ring that close together: about one
    draw in 10,000. (The inverse CDF before it moved 44 of these 1,000: in the tail, where tokens'
    intervals are as narrow as the sum of the differences before them.)"""
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(49152, generator=g) * 2
    nudged = logits + torch.randn(49152, generator=g) * 1e-4
    moved = sum(sample_one(logits, params(seed=s), 3) != sample_one(nudged, params(seed=s), 3) for s in range(1000))
    assert moved <= 2, moved
