"""An event-driven replay of requests through a layout of prompt and token services, from a profile.

    summary = simulate(profile, Layout.parse("1+1"), poisson(16, 0.4, prompt_tokens=500))
    summary["norm_latency_s"]["p50"], summary["tokens_per_s"], summary["cost_per_million_tokens"]

What it models, each a mechanism of the real system (services.py has the services):
1. admission: the gateway reserves a slot on the token service with the most free slots
   (--max-seqs each) before any prefill; requests wait in arrival order while all are full.
2. prefill, disaggregated: the prompt service with the fewest prefills in flight runs whole prompts
   back to back up to --max-batch-tokens a forward (a longer prompt alone, in chunks); a forward
   takes m · prefill_s(prompts, mean length) while the KV streams out; the first token is out
   when it ends. Colocated: each token-service step also computes up to 512 prompt tokens (whole
   chunks, first come first served), the step taking step_s + prefill_s of the chunks.
3. decode: continuous batching: a step runs every sequence whose KV is in at its start,
   step_s(batch, mean KV length) plus the profile's serving overhead overhead_s(batch) (what a
   step costs in a cluster beyond the same step in process; 0 in profiles without it), one
   token each; a sequence leaves after its last token. A colocated step with prompt chunks only
   costs overhead_s(0) beside them.
4. a shared host (`shared_host`, as `--cpu-placement turns` on one machine): the engines take
   turns on its cores, one forward at a time, first come first served; a prompt forward then
   holds at most 512 prompt tokens (prompt_service/engine.py's TURN_TOKENS).
5. failures (optional): each service fails at a rate per hour (exponential gaps, seeded) or at
   given times, and is back `recovery_s` later; the forward it was computing is lost. A token
   service's requests, with replication, resume after `recovery_s` on a token service with room,
   their tokens kept (the replica fetch and the recompute of the tokens after the replicated
   index are folded into recovery_s); without, each prefills its prompt and every token it had
   again, then continues. A prompt service's prompts are prefilled again elsewhere.

Not modelled: the serving work around a prefill (the hops from the prompt service to the token
service and the gateway; the serving overhead is a decode step's), a later chunk's attention to
the earlier ones, network bandwidth (m is a factor on the prefill), KV swapping, the microbatches
of a pipeline, and KV room beyond --max-seqs sequences.

A request's figures are bench.load's: TTFT from arrival to its first token, TPOT = (latency -
TTFT) / (tokens - 1), normalized latency = latency / tokens; throughput over the span from the
first arrival to the last answer (the makespan); cost = machines x makespan x price per machine-
hour, per million output tokens.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import random
from dataclasses import dataclass

from bench.common import percentile  # torch-free: bench.load's own percentiles
from planner.layout import Layout
from planner.profile import Profile
from planner.services import Host, Job, PromptService, TokenService
from planner.workload import TraceRequest

PERCENTILES = (50, 90, 95, 99)


class SimulationError(RuntimeError):
    """A replay that cannot finish (e.g. services failing faster than requests can complete)."""


@dataclass(frozen=True)
class Failures:
    per_hour: float = 0.0                      # each service's failure rate (exponential gaps)
    recovery_s: float = 30.0                   # until a replica resumes and the service is back
    replication: bool = True                   # resume from a replica, or prefill everything again
    at: tuple[tuple[float, str], ...] = ()     # (time s, service "prompt0" / "token1"): fixed failures
    seed: int = 0


class Simulation:
    def __init__(self, profile: Profile, layout: Layout, failures: Failures | None = None,
                 max_time_s: float = 1e7):
        self.profile, self.layout, self.failures = profile, layout, failures or Failures()
        self.now, self.max_time_s = 0.0, max_time_s
        self._events: list = []  # (time, order, callback)
        self._order = itertools.count()
        shared = Host() if layout.shared_host else None
        self.prompts = [PromptService(self, f"prompt{i}", shared or Host()) for i in range(layout.prompt_services)]
        self.tokens = [TokenService(self, f"token{i}", shared or Host()) for i in range(layout.token_services)]
        self.waiting: collections.deque[Job] = collections.deque()   # for a slot, in arrival order
        self.retry: collections.deque[Job] = collections.deque()     # back from a failure: first in line
        self.unrouted: collections.deque[Job] = collections.deque()  # for a live prompt service
        self.jobs: list[Job] = []
        self.finished = self.failed = 0
        self.rng = random.Random(f"{self.failures.seed}/failures")

    def at(self, t: float, callback) -> None:
        heapq.heappush(self._events, (t, next(self._order), callback))

    def run(self, trace: list[TraceRequest]) -> list[Job]:
        """Every request to its end; returns them with their times."""
        self.jobs = [Job(i, r.arrival_s, r.prompt_tokens, r.output_tokens) for i, r in enumerate(trace)]
        for job in self.jobs:
            self.at(job.arrival_s, lambda job=job: self._arrive(job))
        self._schedule_failures()
        while self.finished < len(self.jobs):
            if not self._events:
                raise SimulationError(f"{len(self.jobs) - self.finished} requests never finished")
            self.now, _, callback = heapq.heappop(self._events)
            if self.now > self.max_time_s:
                raise SimulationError(f"still running after {self.max_time_s:g} simulated seconds "
                                      f"({self.finished}/{len(self.jobs)} done, {self.failed} failures)")
            callback()
        return self.jobs

    # --- the gateway: admission and routing --------------------------------------------------------

    def _arrive(self, job: Job) -> None:
        self.waiting.append(job)
        self.admit()

    def admit(self) -> None:
        """Waiting requests take free slots, on the token service with the most."""
        while self.retry or self.waiting:
            service = max(self.tokens, key=lambda s: s.free_slots)
            if service.free_slots <= 0:
                return
            job = (self.retry or self.waiting).popleft()
            service.slots += 1
            job.service = service
            if job.resume:
                job.resume = False
                service.join(job)
            elif self.layout.colocated:
                service.prefills.append(job)
                service.kick()
            else:
                self._route_prefill(job)

    def _route_prefill(self, job: Job) -> None:
        live = [p for p in self.prompts if p.alive]
        if not live:
            self.unrouted.append(job)
            return
        service = min(live, key=lambda p: p.load)
        service.queue.append(job)
        service.kick()

    def prefilled(self, job: Job) -> None:
        """The forward that ended its prefill gave its next token; it decodes from now on."""
        job.generated += 1
        if job.first_token_s is None:
            job.first_token_s = self.now
        job.service.join(job)

    def done(self, job: Job) -> None:
        job.done_s, job.service = self.now, None
        self.finished += 1
        self.admit()

    # --- failures ------------------------------------------------------------------------------------

    def _schedule_failures(self) -> None:
        services = {s.name: s for s in self.prompts + self.tokens}
        for t, name in self.failures.at:
            if name not in services:
                raise ValueError(f"a failure of {name!r}: this layout has {', '.join(services)}")
            self.at(t, lambda s=services[name]: self._fail(s, chain=False))
        if self.failures.per_hour > 0:
            for service in services.values():
                self._next_failure(service)

    def _next_failure(self, service) -> None:
        gap = self.rng.expovariate(self.failures.per_hour / 3600)
        self.at(self.now + gap, lambda: self._fail(service, chain=True))

    def _fail(self, service, chain: bool) -> None:
        if not service.alive:
            return
        self.failed += 1
        for job in service.fail():
            self._reroute(job, service)
        self.at(self.now + self.failures.recovery_s, lambda: self._recover(service, chain))

    def _reroute(self, job: Job, service) -> None:
        job.attempt += 1
        job.prefilled = 0
        if isinstance(service, PromptService):  # its prefill again, elsewhere; its slot stays
            self._route_prefill(job)
            return
        job.restarts += 1
        job.service = None
        for queue in [p.queue for p in self.prompts] + [self.unrouted]:
            if job in queue:
                queue.remove(job)
        if self.failures.replication and job.generated > 0:
            job.resume = True
            self.at(self.now + self.failures.recovery_s, lambda: self._readmit(job))
        else:
            self._readmit(job)

    def _readmit(self, job: Job) -> None:
        self.retry.append(job)
        self.admit()

    def _recover(self, service, chain: bool) -> None:
        service.alive = True
        if isinstance(service, PromptService):
            while self.unrouted:
                self._route_prefill(self.unrouted.popleft())
        self.admit()
        service.kick()
        if chain:
            self._next_failure(service)


def summarize(jobs: list[Job], layout: Layout, profile: Profile, price_per_hour: float = 1.0) -> dict:
    """bench.load's figures of one replay, plus machines and cost."""
    start, end = min(j.arrival_s for j in jobs), max(j.done_s for j in jobs)
    span, tokens = max(end - start, 1e-12), sum(j.output_tokens for j in jobs)
    values = {"ttft_s": [j.first_token_s - j.arrival_s for j in jobs],
              "tpot_s": [(j.done_s - j.first_token_s) / (j.output_tokens - 1) for j in jobs if j.output_tokens > 1],
              "norm_latency_s": [(j.done_s - j.arrival_s) / j.output_tokens for j in jobs]}
    machines = layout.machines(profile.stages)
    return {"layout": layout.name, "requests": len(jobs), "makespan_s": span, "requests_per_s": len(jobs) / span,
            "tokens_per_s": tokens / span,
            **{name: {f"p{q}": percentile(v, q) for q in PERCENTILES} for name, v in values.items()},
            "machines": machines, "cost_per_million_tokens": machines * span / 3600 * price_per_hour / tokens * 1e6,
            "restarts": sum(j.restarts for j in jobs)}


def simulate(profile: Profile, layout: Layout, trace: list[TraceRequest], failures: Failures | None = None,
             price_per_hour: float = 1.0) -> dict:
    """Replay `trace` through `layout`: summarize()'s figures."""
    if not trace:
        raise ValueError("an empty trace")
    return summarize(Simulation(profile, layout, failures).run(trace), layout, profile, price_per_hour)
