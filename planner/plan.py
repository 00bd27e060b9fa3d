"""The split of machines between prompt and token services, from a profile and a workload.

Two modes:

- **formula** (DéjàVu, Strati et al. ICML 2024, §4.2 and appendix D): with D machines, a batch of
  b requests of P prompt tokens and N new tokens, Y the prompt time of that batch, t the time of
  one decode step of it and m the KV streaming overhead factor, a prompt machine finishes a batch
  every m·Y and a token machine needs N·t for one, so the two sides keep pace when
  D_p / (m·Y) = D_t / (N·t), that is

      D_t = ceil(D·N·t / (m·Y + N·t)),   D_p = D - D_t,

  clamped to [S, D - 1] (a token pipeline needs S machines, a prompt service one). S, the stages
  of a token service, is the memory minimum: the fewest stages whose largest (ceil(L / S) of the
  L layers) holds its share of the weights and of the KV of b sequences of P + N tokens. A prompt
  service holds the whole model and the KV of b prompts of P tokens (`dejavu up` has no prompt
  stages), or the plan is refused. Y = prefill_s(b, P); t = step_s(b, P + N / 2) + overhead_s(b):
  the decode step of the batch at the mean KV length over a request's decode, and what a step
  costs in a serving cluster beyond that (the profile's serving overhead; 0 in profiles without
  one).
- **SLA** (as NVIDIA Dynamo's planner): the fewest services that meet a TTFT and a TPOT target at
  an arrival rate. A first guess from the profile's capacities (a prompt service's prompts a
  second at the largest batch whose m·Y meets the TTFT; a token service's tokens a second at the
  largest batch whose step meets the TPOT), then the simulator replays Poisson arrivals at that
  rate and adds a prompt service while TTFT misses and a token service while TPOT misses.

Either way one sentence says what bounds the split, and the plan reads as `dejavu up` flags or a
compose override.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from planner.layout import Layout
from planner.profile import Profile
from planner.simulate import simulate
from planner.workload import poisson

GIB = 2**30


class PlanError(ValueError):
    """No layout satisfies the request; the message says what to change."""


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int          # P
    output_tokens: int          # N, new tokens per request
    batch: int = 16             # b: prompts per prefill batch, sequences per decode step (--max-seqs)
    rate: float | None = None   # requests/s, for predictions and SLA mode


@dataclass(frozen=True)
class Sla:
    ttft_s: float
    tpot_s: float
    percentile: int = 90        # of the simulated requests that must meet both
    requests: int = 200         # simulated Poisson arrivals per check


@dataclass(frozen=True)
class Plan:
    prompt_services: int
    token_services: int
    stages: int                 # per token service
    colocated: bool
    mode: str                   # "formula" | "sla" | "one machine"
    machines: int               # D given (formula), or used (SLA)
    P: int
    N: int
    batch: int
    Y_s: float                  # prompt time of one batch of b prompts
    t_s: float                  # one decode step of b sequences as served: step_s + overhead_s
    step_s: float               # its forward (the profile's in-process decode step)
    overhead_s: float           # what a step costs served beyond in process (the profile's serving overhead)
    m: float
    D_t_exact: float            # D·N·t / (m·Y + N·t), before ceil and clamp
    D_t: int                    # machines decoding
    D_p: int                    # machines prefilling
    min_prompt_stages: int      # memory minimum of a prompt service (must be 1)
    min_token_stages: int       # memory minimum of a token pipeline
    memory_bytes: int           # per machine
    bottleneck: str             # one sentence
    predicted: dict = field(default_factory=dict)  # the simulator's figures at --rate, if given

    def up_flags(self, profile: Profile) -> list[str]:
        """`dejavu up` flags for this plan (every one exists there: dejavu/cli.py)."""
        flags = ["--model", profile.model, "--dtype", profile.dtype]
        flags += ["--colocated"] if self.colocated else ["--prompt-services", str(self.prompt_services)]
        flags += ["--token-services", str(self.token_services), "--max-seqs", str(self.batch)]
        return flags + (["--stages", str(self.stages)] if self.stages > 1 else [])

    def compose_override(self) -> str:
        """A compose override (`docker compose -f compose.yaml -f FILE up`) with this many replicas."""
        lines = ["# dejavu plan: " + self.bottleneck, "services:",
                 "  prompt_service:", f"    scale: {0 if self.colocated else self.prompt_services}",
                 "  token_service:", f"    scale: {self.token_services}", "    environment:",
                 f"      DEJAVU_MAX_SEQS: \"{self.batch}\""]
        if self.colocated:
            lines.append("      DEJAVU_COLOCATED: \"true\"")
        if self.stages > 1:
            lines.append(f"      DEJAVU_STAGES: \"{self.stages}\"  # run with --profile pipeline, one token_stage per stage after the first")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {"formula": "D_t = ceil(D·N·t / (m·Y + N·t))", "t": "t_s = step_s (the forward) + overhead_s "
                "(the serving work a token service does a step outside it)", "D": self.machines, **asdict(self)}


def token_machines(D: int, N: float, t: float, m: float, Y: float) -> float:
    """The paper's D_t before rounding: D·N·t / (m·Y + N·t)."""
    return D * N * t / (m * Y + N * t)


def stages_needed(layers: int, bytes_per_layer: float, memory_bytes: float) -> int | None:
    """Fewest stages S of an even split (the largest ceil(layers / S) layers) that fit in memory;
    None when one layer alone does not."""
    for stages in range(1, layers + 1):
        if math.ceil(layers / stages) * bytes_per_layer <= memory_bytes:
            return stages
    return None


def memory_minimums(profile: Profile, work: Workload, memory_bytes: int) -> tuple[int, int]:
    """(prompt stages, token stages) that memory requires; PlanError when either side cannot fit."""
    kv = profile.kv_bytes_per_token_per_layer
    prompt = profile.weights_per_layer + work.batch * work.prompt_tokens * kv
    token = profile.weights_per_layer + work.batch * (work.prompt_tokens + work.output_tokens) * kv
    s_p = stages_needed(profile.layers, prompt, memory_bytes)
    s_t = stages_needed(profile.layers, token, memory_bytes)
    if s_p != 1:
        raise PlanError(f"a prompt service holds the whole model and the KV of {work.batch} prompts of "
                        f"{work.prompt_tokens} tokens: {profile.layers * prompt / GIB:.2f} GiB against "
                        f"{memory_bytes / GIB:.2f} GiB a machine (prompt services have no stages): "
                        "lower --batch or give --memory-gib")
    if s_t is None:
        raise PlanError(f"one layer with the KV of {work.batch} sequences of {work.prompt_tokens + work.output_tokens} "
                        f"tokens needs {token / GIB:.2f} GiB, more than {memory_bytes / GIB:.2f} GiB a machine: "
                        "lower --batch")
    return s_p, s_t


def terms(profile: Profile, work: Workload) -> tuple[float, float]:
    """(Y, t): a batch's prompt time and one decode step of it at the mean KV length, as served
    (the forward and the serving overhead)."""
    return (profile.prefill_s(work.batch, work.prompt_tokens),
            profile.served_step_s(work.batch, work.prompt_tokens + work.output_tokens / 2))


def plan(profile: Profile, work: Workload, machines: int, memory_bytes: int | None = None) -> Plan:
    """The formula's split of `machines`, within the memory minimums; predicted figures at work.rate."""
    terms_used = _terms(profile, work, machines, memory_bytes)
    s_t, exact = terms_used["min_token_stages"], terms_used["D_t_exact"]
    if machines == 1:
        if s_t > 1:
            raise PlanError(f"one machine: the model and the KV of {work.batch} sequences need {s_t} machines")
        result = Plan(0, 1, 1, True, "one machine", D_t=1, D_p=0, bottleneck=(
            "One machine: prefill and decode share it (colocated), the formula needs two at least."), **terms_used)
        return _predicted(result, profile, work)
    if machines < s_t + 1:
        raise PlanError(f"--machines {machines}: a token service needs {s_t} machines (memory) and a prompt "
                        f"service one: {s_t + 1} at least")
    wanted = math.ceil(exact - 1e-9)  # the epsilon: a float just over an integer is that integer
    token_services = min(max(wanted, s_t), machines - 1) // s_t  # whole token pipelines of s_t machines
    d_t = token_services * s_t
    why = _why(work, terms_used["Y_s"], terms_used["t_s"], profile.m, machines, wanted, d_t, s_t)
    result = Plan(machines - d_t, token_services, s_t, False, "formula", D_t=d_t, D_p=machines - d_t,
                  bottleneck=why, **terms_used)
    return _predicted(result, profile, work)


def _terms(profile: Profile, work: Workload, machines: int, memory_bytes: int | None) -> dict:
    """The fields every plan reports: the formula's terms and the memory minimums."""
    memory = memory_bytes or profile.memory_bytes
    s_p, s_t = memory_minimums(profile, work, memory)
    Y, t = terms(profile, work)
    overhead = profile.overhead_s(work.batch)
    return dict(machines=machines, P=work.prompt_tokens, N=work.output_tokens, batch=work.batch, Y_s=Y, t_s=t,
                step_s=t - overhead, overhead_s=overhead, m=profile.m,
                D_t_exact=token_machines(machines, work.output_tokens, t, profile.m, Y),
                min_prompt_stages=s_p, min_token_stages=s_t, memory_bytes=memory)


def _why(work: Workload, Y: float, t: float, m: float, D: int, wanted: int, d_t: int, stages: int) -> str:
    decode, prompt = work.output_tokens * t, m * Y
    side = "decode-bound" if decode >= prompt else "prefill-bound"
    why = (f"The workload is {side}: a batch of {work.batch} spends N·t = {decode:.3g} s decoding against "
           f"m·Y = {prompt:.3g} s prefilling, so {d_t} of {D} machines decode")
    if stages > 1:
        why += f", as {d_t // stages} token service(s) of {stages} stages (memory)"
    if d_t != wanted:
        why += f" (the formula asks {wanted}; a token service takes {stages} and a prompt service 1 machine at least)"
    return why + "."


def _predicted(result: Plan, profile: Profile, work: Workload) -> Plan:
    """The plan with the simulator's figures at work.rate (200 Poisson arrivals of N tokens each)."""
    if work.rate is None:
        return result
    trace = poisson(200, work.rate, work.prompt_tokens, output_tokens=work.output_tokens)
    layout = Layout(result.prompt_services, result.token_services, max_seqs=work.batch)
    return replace(result, predicted=_kept(work.rate, simulate(profile, layout, trace)))


def _kept(rate: float, figures: dict) -> dict:
    return {"rate": rate, **{k: figures[k] for k in ("tokens_per_s", "requests_per_s", "ttft_s", "tpot_s",
                                                     "norm_latency_s")}}


def plan_sla(profile: Profile, work: Workload, sla: Sla, max_machines: int | None = None,
             memory_bytes: int | None = None) -> Plan:
    """The fewest services meeting both targets at work.rate, checked by replaying `sla.requests`
    Poisson arrivals of N tokens each; PlanError if none fits within max_machines (256)."""
    if not work.rate:
        raise PlanError("SLA mode needs --rate (requests/s)")
    _, stages = memory_minimums(profile, work, memory_bytes or profile.memory_bytes)
    prompts, tokens = _first_guess(profile, work, sla)
    cap = max_machines or 256
    trace = poisson(sla.requests, work.rate, work.prompt_tokens, output_tokens=work.output_tokens)
    key = f"p{sla.percentile}"
    while prompts + tokens * stages <= cap:
        figures = simulate(profile, Layout(prompts, tokens, max_seqs=work.batch), trace)
        ttft_ok, tpot_ok = figures["ttft_s"][key] <= sla.ttft_s, figures["tpot_s"][key] <= sla.tpot_s
        if ttft_ok and tpot_ok:
            used = prompts + tokens * stages
            why = (f"At {work.rate:g} req/s, {prompts} prompt service(s) keep TTFT p{sla.percentile} at "
                   f"{figures['ttft_s'][key]:.3g} s (target {sla.ttft_s:g}) and {tokens} token service(s) keep TPOT "
                   f"at {figures['tpot_s'][key]:.3g} s (target {sla.tpot_s:g}): the fewest services that meet both.")
            return Plan(prompts, tokens, stages, False, "sla", D_t=tokens * stages, D_p=prompts, bottleneck=why,
                        predicted=_kept(work.rate, figures), **_terms(profile, work, used, memory_bytes))
        prompts, tokens = prompts + (not ttft_ok), tokens + (not tpot_ok)
    raise PlanError(f"no layout of up to {cap} machines meets TTFT {sla.ttft_s:g} s and TPOT {sla.tpot_s:g} s "
                    f"(p{sla.percentile}) at {work.rate:g} req/s: relax a target or allow more --machines")


def _first_guess(profile: Profile, work: Workload, sla: Sla) -> tuple[int, int]:
    """Services by capacity alone (no queueing): refuses targets that one request alone misses."""
    P, N, kv = work.prompt_tokens, work.output_tokens, work.prompt_tokens + work.output_tokens / 2
    if profile.m * profile.prefill_s(1, P) > sla.ttft_s:
        raise PlanError(f"one prompt alone takes m·Y = {profile.m * profile.prefill_s(1, P):.3g} s: "
                        f"no layout meets TTFT {sla.ttft_s:g} s")
    if profile.served_step_s(1, kv) > sla.tpot_s:
        raise PlanError(f"one sequence alone decodes at {profile.served_step_s(1, kv):.3g} s a token: "
                        f"no layout meets TPOT {sla.tpot_s:g} s")
    b_p = max(b for b in range(1, work.batch + 1) if profile.m * profile.prefill_s(b, P) <= sla.ttft_s)
    b_t = max(b for b in range(1, work.batch + 1) if profile.served_step_s(b, kv) <= sla.tpot_s)
    per_prompt = b_p / (profile.m * profile.prefill_s(b_p, P))      # requests/s one prompt service prefills
    per_token = b_t / profile.served_step_s(b_t, kv) / max(N - 1, 1)  # requests/s one token service decodes
    return max(1, math.ceil(work.rate / per_prompt)), max(1, math.ceil(work.rate / per_token))
