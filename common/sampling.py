"""Sampling: greedy, temperature, min-p, top-k, top-p, with a per-position RNG; before them the
logit bias, min_tokens and the penalties (`process`).

The random numbers for output index i come from a generator seeded with mix(seed, i) only, so a
request resumed on another service (or batched differently) draws the same numbers. The pick is an
exponential race (`_race`): each kept token gets an exponential clock of rate its probability, and
the first to ring wins, a draw in proportion to the probabilities (vLLM's q ~ Exp(1), argmax p/q).
Logits that differ in their last bits (another batch shape, a re-prefill after a failure, another
service's threads) move each token's clock by that relative amount only, so a pick changes only
where the two fastest clocks are that close: about as often as the relative difference itself. An
inverse CDF (the draw until December 7) moves every bound by the sum of the differences before it,
and in a distribution's tail, where tokens' intervals are as narrow as that sum, the pick moved in
0.35% of draws between our float32 logits and Hugging Face's (the race: none of 16,384;
docs/BENCHMARKS.md §17).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from common.grammar import Matcher
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


RACE_BLOCK = 256  # tokens a block in `_race`: 192 blocks of SmolLM2's 49,152, 501 of Llama 3's 128,256


def _race(probs: torch.Tensor, seed: int, index: int) -> int:
    """probs: (vocab,), not all 0, unnormalized -> a token drawn in proportion to them, by an
    exponential race at the position's numbers.

    In two rounds, so that a row takes a few hundred numbers instead of one a token (49k numbers
    took 0.5 ms on a 2-core EPYC, three times the rest of a draw): the tokens in blocks of
    RACE_BLOCK by id; the blocks race at the rates of their probability sums, then the winning
    block's tokens at theirs (block b with chance mass_b / total, then token t with p_t / mass_b:
    p_t / total, as one race over the vocabulary). A clock rings at its number over its rate, so
    the first is the largest rate / number; a last-bit change in the logits moves a clock by as
    much, relatively, in either round. A token of probability 0 never wins."""
    vocab = probs.numel()
    blocks = -(-vocab // RACE_BLOCK)
    rates = probs if vocab % RACE_BLOCK == 0 else torch.nn.functional.pad(probs, (0, blocks * RACE_BLOCK - vocab))
    rates = rates.view(blocks, RACE_BLOCK)
    g = torch.Generator().manual_seed(position_seed(seed, index))  # on the CPU: the same numbers on any device
    numbers = -torch.log1p(-torch.rand(blocks + RACE_BLOCK, generator=g, dtype=torch.float64))  # Exp(1)
    numbers.clamp_min_(torch.finfo(torch.float64).tiny)  # u = 0 rings at once, but 0 / 0 would be NaN
    block = int(torch.argmax(rates.sum(dim=1).cpu().double() / numbers[:blocks]).item())
    return block * RACE_BLOCK + int(torch.argmax(rates[block].cpu().double() / numbers[blocks:]).item())


def _largest(values: torch.Tensor, count: int, kth: torch.Tensor | None = None) -> torch.Tensor:
    """values: (vocab,) -> a mask of its `count` largest; of equal values the lower token ids (a
    stable sort's pick), found without sorting: the count-th largest value (`kth`, if known), what
    lies above it, and the first of what equals it."""
    if kth is None:
        kth = torch.topk(values, count).values[-1]
    above = values > kth
    ties = values == kth
    return above | (ties & (torch.cumsum(ties, dim=0) <= count - int(above.sum().item())))


def _draw(logits: torch.Tensor, p: SamplingParams, index: int) -> int:
    """logits: (vocab,) of a row to sample -> its pick: temperature, then min-p, top-k and top-p in
    vLLM's order, then an exponential race at the row's numbers (`_race`).

    Over the vocabulary in id order with the dropped tokens at probability 0, in float32. A kept
    set is a stable sort's (top-k and top-p keep the likeliest, of equal ones the lower ids), found
    with thresholds instead of sorting the row twice (by probability, then back by id), which took
    8-11 ms a row of 49k tokens in float64 on a 2-core EPYC (`dejavu bench sampling`). Row by row,
    on 1-D tensors: a sum over a batch's rows is not always added up in the order it is for one row
    alone (the CPU splits a long single row between threads), and a request's draws must not depend
    on what it is batched with (another batch after a resume). Softmax runs a row alike either
    way, and nothing drawn depends on a sum over a whole row (a cumsum adds up in one order)."""
    vocab = logits.numel()
    probs = torch.softmax(logits.float() / p.temperature, dim=0)
    if p.min_p > 0:  # against the likeliest token's probability
        probs = torch.where(probs >= p.min_p * probs.max(), probs, 0.0)
    if 0 < p.top_k < vocab:  # the dropped (0) are below every kept one; ties with them are dropped again
        ranked = probs if p.min_p <= 0 else torch.where(probs > 0, probs, -1.0)
        probs = torch.where(_largest(ranked, p.top_k), probs, 0.0)
    if p.top_p < 1.0:  # the smallest set of the likeliest whose mass reaches top_p of what is kept
        total = torch.cumsum(probs, dim=0)[-1]
        # a token less likely than (1 - top_p) x total / vocab is never in it (the mass up to it is
        # below (1 - top_p) x total: more than top_p of it lies above), so only those above are
        # sorted: a model's few hundred or thousand where the vocabulary has 49k
        values = torch.sort(probs[probs >= (1 - p.top_p) * total / vocab], descending=True).values
        if values.numel():
            reached = max(int(((torch.cumsum(values, dim=0) - values) < p.top_p * total).sum().item()), 1)
            probs = torch.where(_largest(probs, reached, values[reached - 1]), probs, 0.0)
    total = float(probs.sum().item())
    if not 0 < total < float("inf"):  # no probability left (logits all -inf or NaN): the likeliest that is a number
        return int(torch.nan_to_num(logits.float(), nan=float("-inf")).argmax().item())
    return _race(probs, p.seed, index)


def sample_one(logits: torch.Tensor, p: SamplingParams, index: int) -> int:
    """One row's pick (logits: (vocab,))."""
    if p.greedy:
        return int(torch.argmax(logits).item())
    return _draw(logits, p, index)


def named_tokens(p: SamplingParams) -> list[int]:
    """The token ids the params name (biased, stop): an engine checks them against its vocabulary
    before a step would index its logits with them."""
    return [t for t, _ in p.logit_bias] + p.stop_token_ids + p.eos_token_ids


class History:
    """What a request's pick depends on before it, kept as it grows: the distinct tokens of its
    prompt and output (the repetition penalty's), those of its output with how often each is there
    (the frequency and presence penalties'), and its place in its grammar (`matcher`, structured
    output). Built once from the prompt and the tokens out `before` the output list it then
    follows; each pick adds only the tokens out since (`update`), so a step's cost grows with the
    distinct tokens, never with a whole context copied again."""

    def __init__(self, vocab: int, prompt: Sequence[int], before: Sequence[int] = (), matcher: Matcher | None = None):
        self.seen = np.zeros(vocab, dtype=bool)      # in prompt or output
        self.counts = np.zeros(vocab, dtype=np.float32)  # in the output
        self.out_ids, counts = np.unique(np.asarray(before, dtype=np.int64), return_counts=True)
        self.counts[self.out_ids] = counts
        self.seen_ids = np.union1d(np.asarray(prompt, dtype=np.int64), self.out_ids)
        self.seen[self.seen_ids] = True
        self.counted = 0  # tokens of the followed output list counted
        self.matcher = matcher  # a grammar's (grammar.start), `before` consumed already
        self.matched = 0  # ... and consumed by the matcher (a pick is, as soon as it is made: `follow`)

    def update(self, output: Sequence[int]) -> History:
        """Count output[counted:], the tokens out since the last update."""
        for token in output[self.counted:]:
            if not self.seen[token]:
                self.seen[token] = True
                self.seen_ids = np.append(self.seen_ids, token)
            if not self.counts[token]:
                self.out_ids = np.append(self.out_ids, token)
            self.counts[token] += 1
        self.counted = max(self.counted, len(output))
        if self.matcher and len(output) > self.matched:
            self.matcher.consume(output[self.matched:])
            self.matched = len(output)
        return self

    def follow(self, token: int) -> bool:
        """The grammar consumes the token just picked (the next output token): whether it is complete."""
        self.matcher.consume([token])
        self.matched += 1
        return self.matcher.done


def process(logits: torch.Tensor, params: list[SamplingParams], indices: list[int],
            histories: Sequence[History | None] | None = None) -> torch.Tensor:
    """logits: (n, vocab) float32. The logits each row picks from: the tokens its grammar forbids
    masked (structured output), its logit bias added, its stop tokens masked before output index
    min_tokens, then the repetition penalty (every token of prompt and output: a positive logit
    divided by it, a negative one multiplied) and OpenAI's
    frequency and presence penalties (logit - count x frequency - presence, for each token out):
    vLLM's order, and Hugging Face's for what it has (sequence_bias, repetition_penalty,
    min_new_tokens). `histories[r]` is needed where params[r].needs_history. Rows with none of these
    are left as they are, and so is the tensor when no row has any.

    Each kind is one indexed operation over the batch's rows that have it (a grammar's mask, one
    in-place fill a row)."""
    rows = [r for r, p in enumerate(params) if p.processed]
    if not rows:
        return logits
    out, dev = logits.clone(), logits.device
    guided = [r for r in rows if params[r].grammar]
    if guided:  # first, as vLLM applies its bitmask; -inf stays -inf through what follows
        forbidden = torch.from_numpy(np.stack([histories[r].matcher.forbidden(out.shape[1]) for r in guided])).to(dev)
        for i, r in enumerate(guided):  # row by row in place: an indexed fill over several rows copies them twice
            out[r].masked_fill_(forbidden[i], float("-inf"))
    biased = [(r, t, b) for r in rows for t, b in params[r].logit_bias]
    if biased:
        r, t, b = zip(*biased)
        out.index_put_((torch.tensor(r, device=dev), torch.tensor(t, device=dev)),
                       torch.tensor(b, dtype=out.dtype, device=dev), accumulate=True)
    # a grammar that allows nothing but stop tokens is complete: it ends the output, min_tokens or not
    held = [(r, t) for r in rows if indices[r] < params[r].min_tokens and not _only_stops(out[r], params[r])
            for t in params[r].stops]
    if held:
        r, t = zip(*held)
        out[torch.tensor(r, device=dev), torch.tensor(t, device=dev)] = float("-inf")
    repeated = [r for r in rows if params[r].repetition_penalty != 1.0]
    if repeated:  # on (row, token) pairs: each row's distinct tokens
        rr, tt = _pairs([(r, histories[r].seen_ids) for r in repeated], dev)
        penalty = torch.tensor([params[r].repetition_penalty for r in range(len(params))], dtype=out.dtype, device=dev)[rr]
        v = out[rr, tt]
        out[rr, tt] = torch.where(v < 0, v * penalty, v / penalty)
    counted = [r for r in rows if (params[r].frequency_penalty or params[r].presence_penalty) and len(histories[r].out_ids)]
    if counted:
        rr, tt = _pairs([(r, histories[r].out_ids) for r in counted], dev)
        counts = torch.from_numpy(np.concatenate([histories[r].counts[histories[r].out_ids] for r in counted])).to(dev)
        frequency, presence = (torch.tensor([getattr(p, name) for p in params], dtype=out.dtype, device=dev)[rr]
                               for name in ("frequency_penalty", "presence_penalty"))
        out[rr, tt] -= counts * frequency + presence
    return out


def _only_stops(row: torch.Tensor, p: SamplingParams) -> bool:
    """A grammar's row whose only tokens left (not -inf) are stop tokens."""
    if not p.grammar:
        return False
    if not p.stops:
        return False
    left = torch.isfinite(row)
    left[p.stops] = False  # (a stop id may be listed twice: the request's and the model's EOS)
    return not bool(left.any())


def _pairs(tokens: list[tuple[int, np.ndarray]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, tokens) of rows' token arrays, for indexing a batch's logits."""
    rows = np.concatenate([np.full(len(ids), r, dtype=np.int64) for r, ids in tokens])
    return torch.from_numpy(rows).to(device), torch.from_numpy(np.concatenate([ids for _, ids in tokens])).to(device)


def sample(logits: torch.Tensor, params: list[SamplingParams], indices: list[int],
           request_ids: list[str], histories: Sequence[History | None] | None = None) -> list[TokenEvent]:
    """logits: (n, vocab) float32 for n sequences; indices: each row's output index; histories: see
    `process`. Returns one TokenEvent per row (finish_reason left unset: that is the scheduler's
    call, but for a request whose grammar the pick completes: "stop"), whose logprobs are the
    model's, before `process`."""
    picked = process(logits, params, indices, histories)
    tokens = torch.argmax(picked, dim=-1).tolist()
    for r, p in enumerate(params):
        if not p.greedy:
            tokens[r] = _draw(picked[r], p, indices[r])
    want_logprobs = any(p.logprobs is not None for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    events = [_event(rid, index, token, p, logprobs[row] if logprobs is not None else None)
              for row, (p, index, rid, token) in enumerate(zip(params, indices, request_ids, tokens))]
    for r, p in enumerate(params):
        if p.grammar and histories[r].follow(tokens[r]):  # complete, or the grammar failed (Matcher.error)
            failed = {"grammar_error": error} if (error := histories[r].matcher.error) else {}
            events[r] = events[r].model_copy(update={"finish_reason": "stop", **failed})
    return events


def sample_first(logits: torch.Tensor, reqs: list, matchers: Sequence[Matcher | None] | None = None) -> list[TokenEvent]:
    """The first token of each prefill request (PrefillRequest) whose prompt just ended: logits
    (n, vocab), output index 0, the penalties counting its prompt, its grammar's matcher at the
    start (matchers[i], grammar.start's, where reqs[i] has a grammar)."""
    matchers = matchers or [None] * len(reqs)
    return sample(logits, [r.sampling for r in reqs], [0] * len(reqs), [r.request_id for r in reqs],
                  [History(logits.shape[-1], r.prompt_ids, matcher=m) if r.sampling.needs_history else None
                   for r, m in zip(reqs, matchers)])


def first_event(p: SamplingParams, event: TokenEvent) -> TokenEvent:
    """The first output token (sampled at prefill) with its finish reason: EOS or max_tokens 1 (or
    a grammar it completed: `sample` said so)."""
    if event.finish_reason:
        return event
    reason = "stop" if event.token_id in p.stops else (
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
    after it): each target's logprob and rank there and the k likeliest tokens (OpenAI's echo with
    logprobs, vLLM's prompt_logprobs)."""
    if not targets:
        return []
    ids = torch.tensor(targets, dtype=torch.long, device=logits.device)
    chosen, ranks, tops = [], [], []
    for at in range(0, len(targets), SCORED_ROWS):  # rows a few at a time: their log-softmax stays in cache
        logprobs = torch.log_softmax(logits[at:at + SCORED_ROWS], dim=-1)
        picked = logprobs[torch.arange(logprobs.shape[0], device=logits.device), ids[at:at + SCORED_ROWS]]
        chosen += picked.tolist()
        ranks += (logprobs >= picked[:, None]).sum(-1, dtype=torch.int32).tolist()  # vLLM's: ties rank ahead
        if k:
            values, best = torch.topk(logprobs, k)
            tops += [[TopLogprob(token_id=i, logprob=v) for v, i in zip(vs, is_)]
                     for vs, is_ in zip(values.tolist(), best.tolist())]
        else:
            tops += [[] for _ in range(logprobs.shape[0])]
    return [PromptLogprob(token_id=t, logprob=lp, top_logprobs=top, rank=r)
            for t, lp, top, r in zip(targets, chosen, tops, ranks)]


# prompt_logprobs' rows at a time: 500 rows of SmolLM2's 49152 logits scored whole took 172 ms on a
# Zen 3 (the rank's comparison over a 96 MB log-softmax), 32 at a time 53-73 ms, less than the
# whole without ranks (71-92 ms), the same bits
SCORED_ROWS = 32
