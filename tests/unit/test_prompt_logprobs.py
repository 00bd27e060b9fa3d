"""Prompt logprobs (echo with logprobs): ModelRunner.forward_scored against the Hugging Face
model's own log-softmax over the whole prompt, in float32, on the tiny model: whole prompts side by
side, a prompt in chunks over a pool, and the last rows' logits the same as forward's."""

import pytest
import torch

from common.sampling import prompt_logprobs
from engine.attention import Segment
from engine.runner import ModelRunner

BLOCK = 4


@pytest.fixture(scope="module", params=["own", "hf"])
def runner(request, tiny_oracle):
    return ModelRunner(tiny_oracle.model, block_size=BLOCK, own_forward=request.param == "own")


def hf_logprobs(oracle, ids: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits at every position: (len(ids), vocab)."""
    with torch.inference_mode():
        return torch.log_softmax(oracle.model(torch.tensor([ids])).logits[0].float(), dim=-1)


def check(scores, want: torch.Tensor, ids: list[int], k: int) -> None:
    """scores: the logprobs of ids[1:], want: HF's log_softmax rows of ids."""
    assert [s.token_id for s in scores] == ids[1:]
    expect = want[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor([s.logprob for s in scores]), expect, rtol=0, atol=1e-4)
    for s, row in zip(scores, want[:-1]):
        top = torch.topk(row, k)
        assert len(s.top_logprobs) == k
        torch.testing.assert_close(torch.tensor([t.logprob for t in s.top_logprobs]), top.values, rtol=0, atol=1e-4)
        assert s.top_logprobs[0].token_id == int(top.indices[0])  # the likeliest: no near-tie in these prompts


def test_whole_prompts_side_by_side_are_scored_as_hf(runner, tiny_oracle):
    tok = tiny_oracle.tokenizer
    prompts = [tok(t)["input_ids"] for t in ["The capital of France is Paris", "one two three four five", "Hi"]]
    segments = [Segment(p) for p in prompts]
    scored = {0: (prompts[0][1:], 3), 2: (prompts[2][1:], 2)}  # the second not scored, the third one token long
    logits, scores = runner.forward_scored(segments, None, None, scored)
    plain = runner.forward(segments)
    if runner.hf is None:  # our forward: the last rows' logits to the bit, so the first token does not change
        torch.testing.assert_close(logits, plain, rtol=0, atol=0)
    else:  # the HF modules: the last row out of the whole matrix (see engine/hf.py)
        torch.testing.assert_close(logits, plain, rtol=0, atol=1e-5)
        assert logits.argmax(-1).tolist() == plain.argmax(-1).tolist()
    assert set(scores) == {0, 2}
    check(scores[0], hf_logprobs(tiny_oracle, prompts[0]), prompts[0], 3)
    assert len(prompts[2]) == 1 and scores[2] == []  # a one-token prompt: nothing before its only token


def test_a_prompt_in_chunks_is_scored_as_one(runner, tiny_oracle):
    """Chunks over a pool: each chunk's last row scores the next chunk's first token."""
    ids = tiny_oracle.tokenizer("one two three four five six seven eight nine ten eleven twelve")["input_ids"]
    pool, table, got = runner.new_pool(16), list(range(8)), []
    for start in range(0, len(ids), 5):
        end = min(start + 5, len(ids))
        _, scores = runner.forward_scored([Segment(ids[start:end], start, table)], pool, None,
                                          {0: (ids[start + 1: end + 1], 0)})
        got += scores[0]
    want = hf_logprobs(tiny_oracle, ids)
    assert [s.token_id for s in got] == ids[1:]
    expect = want[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor([s.logprob for s in got]), expect, rtol=0, atol=1e-4)
    assert all(s.top_logprobs == [] for s in got)


def test_targets_must_match_the_segment(runner, tiny_oracle):
    ids = tiny_oracle.tokenizer("The capital of France is")["input_ids"]
    with pytest.raises(ValueError, match="targets"):
        runner.forward_scored([Segment(ids)], None, None, {0: (ids[2:], 1)})


def test_prompt_logprobs_of_logits():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    out = prompt_logprobs(logits, [2, 1], 2)
    ref = torch.log_softmax(logits, -1)
    assert [p.token_id for p in out] == [2, 1]
    assert [p.logprob for p in out] == pytest.approx([float(ref[0, 2]), float(ref[1, 1])])
    assert [t.token_id for t in out[0].top_logprobs] == [2, 1] and [t.token_id for t in out[1].top_logprobs][0] == 0
    assert [p.rank for p in out] == [1, 3]  # token 1 of [3, 0, 0]: its tie counts ahead of it, as vLLM's
    assert prompt_logprobs(torch.zeros(0, 3), [], 2) == []  # a one-token prompt scores nothing
