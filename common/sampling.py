"""Sampling: greedy, temperature, top-k, top-p, with a per-position RNG.

The random number for output index i is drawn from a generator seeded with mix(seed, i) only, so
a request resumed on another service (or batched differently) draws the same numbers. The draw
is an inverse CDF over the kept tokens in token-id order, not in probability order: logits that
differ in the last bits (another batch shape, e.g. under --compile) reorder near-equal
probabilities, which would move the pick; in id order the pick changes only if the number falls
within that tiny difference of a boundary.
"""

from __future__ import annotations

import torch

from common.protocol import PromptLogprob, SamplingParams, TokenEvent, TopLogprob

MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def position_seed(seed: int, index: int) -> int:
    """A 63-bit seed that depends only on the request seed and the output index."""
    return _splitmix64(_splitmix64(seed & MASK64) ^ index) >> 1


def uniform(seed: int, index: int) -> float:
    g = torch.Generator().manual_seed(position_seed(seed, index))
    return torch.rand(1, generator=g, dtype=torch.float64).item()


def _filtered_probs(logits: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: (vocab,) -> (probs sorted desc, their token ids), after temperature, top-k, top-p."""
    scaled = logits.double() / p.temperature
    order = torch.argsort(-scaled, stable=True)  # ties: lower token id first
    scaled = scaled[order]
    if 0 < p.top_k < scaled.numel():
        scaled, order = scaled[: p.top_k], order[: p.top_k]
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
        keep = int((before < p.top_p).sum().item())  # smallest prefix whose mass reaches top_p
        probs, order = probs[: max(keep, 1)], order[: max(keep, 1)]
        probs = probs / probs.sum()
    return probs, order


def sample_one(logits: torch.Tensor, p: SamplingParams, index: int) -> int:
    if p.greedy:
        return int(torch.argmax(logits).item())
    probs, order = _filtered_probs(logits, p)
    by_id = torch.argsort(order)
    probs, order = probs[by_id], order[by_id]
    u = uniform(p.seed, index)
    pick = int(torch.searchsorted(torch.cumsum(probs, dim=-1), torch.tensor([u], dtype=probs.dtype, device=probs.device)).item())
    return int(order[min(pick, order.numel() - 1)].item())


def sample(logits: torch.Tensor, params: list[SamplingParams], indices: list[int],
           request_ids: list[str]) -> list[TokenEvent]:
    """logits: (n, vocab) float32 for n sequences; indices: each row's output index.
    Returns one TokenEvent per row (finish_reason left unset: that is the scheduler's call)."""
    greedy = torch.argmax(logits, dim=-1).tolist()
    want_logprobs = any(p.logprobs is not None for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    events = []
    for row, (p, index, rid) in enumerate(zip(params, indices, request_ids)):
        token = greedy[row] if p.greedy else sample_one(logits[row], p, index)
        events.append(_event(rid, index, token, p, logprobs[row] if logprobs is not None else None))
    return events


def first_event(p: SamplingParams, event: TokenEvent) -> TokenEvent:
    """The first output token (sampled at prefill) with its finish reason: EOS or max_tokens 1."""
    reason = "stop" if (not p.ignore_eos and event.token_id in p.stop_token_ids) else (
        "length" if p.max_tokens <= 1 else None)
    return event.model_copy(update={"finish_reason": reason}) if reason else event


def _event(rid: str, index: int, token: int, p: SamplingParams, logprobs: torch.Tensor | None) -> TokenEvent:
    if p.logprobs is None or logprobs is None:
        return TokenEvent(request_id=rid, index=index, token_id=token)
    top = []
    if p.logprobs > 0:
        values, ids = torch.topk(logprobs, p.logprobs)
        top = [TopLogprob(token_id=int(i), logprob=float(v)) for v, i in zip(values.tolist(), ids.tolist())]
    return TokenEvent(request_id=rid, index=index, token_id=token, logprob=float(logprobs[token]), top_logprobs=top)


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[PromptLogprob]:
    """logits: (n, vocab) float32, row i the model's prediction for targets[i] (the prompt token
    after it): each target's logprob there and the k likeliest tokens (OpenAI's echo with logprobs)."""
    if not targets:
        return []
    logprobs = torch.log_softmax(logits, dim=-1)
    rows = torch.arange(len(targets), device=logits.device)
    ids = torch.tensor(targets, dtype=torch.long, device=logits.device)
    chosen = logprobs[rows, ids].tolist()
    if k:
        values, ids = torch.topk(logprobs, k)
        tops = [[TopLogprob(token_id=i, logprob=v) for v, i in zip(vs, is_)]
                for vs, is_ in zip(values.tolist(), ids.tolist())]
    else:
        tops = [[] for _ in targets]
    return [PromptLogprob(token_id=t, logprob=lp, top_logprobs=top) for t, lp, top in zip(targets, chosen, tops)]
