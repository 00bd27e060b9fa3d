"""`dejavu profile`, `dejavu plan`, `dejavu simulate`: their parsers and what each runs.

    dejavu profile [--model smollm2] [--quick] [--no-serving] [--out profile.json]   measures (bench/profile.py, torch)
    dejavu plan --profile FILE --machines D --prompt-tokens P --output-tokens N [--json] [--rate R]
                [--ttft-s X --tpot-s Y] [--write-up-flags] [--write-compose FILE]
    dejavu simulate --profile FILE [--layout 1+1 --layout colocated] [--rates 0.2,0.4] [--plot FILE.png]

plan and simulate read the profile's JSON and import no torch (planner/).
"""

from __future__ import annotations

import argparse
import json
import sys

class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.required:
            return action.help
        return super()._get_help_string(action)


class RawFormatter(argparse.RawDescriptionHelpFormatter, Formatter):
    """The description as written (a docstring), defaults as Formatter shows them."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, not {text!r}")
    return value


def rates(text: str) -> list[float]:
    try:
        return [positive_float(r) for r in text.split(",") if r.strip()] or [positive_float("")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated request rates > 0, e.g. 0.2,0.4") from None


def add_parsers(sub) -> dict[str, argparse.ArgumentParser]:
    from bench import profile as measure

    profile = sub.add_parser("profile", help="measure this machine and model for plan and simulate (JSON)",
                             description=measure.__doc__, formatter_class=RawFormatter)
    measure.add_arguments(profile)
    return {"profile": profile, "plan": _plan_parser(sub), "simulate": _simulate_parser(sub)}


def _plan_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="split machines into prompt and token services (the paper's formula, or an SLA)",
                       formatter_class=Formatter, description=(
                           "Split D machines between prompt and token services by DéjàVu's formula "
                           "D_t = ceil(D·N·t / (m·Y + N·t)) within memory minimums, from a profile (`dejavu "
                           "profile`); or, with --ttft-s and --tpot-s, the fewest services that meet both at "
                           "--rate (simulated). Prints the split, the terms it used, one sentence on what bounds "
                           "it and the `dejavu up` flags."))
    p.add_argument("--profile", required=True, metavar="FILE", help="a profile JSON from `dejavu profile`")
    p.add_argument("--machines", type=positive_int, metavar="D",
                   help="machines to split (SLA mode: the most it may use; default 256)")
    p.add_argument("--prompt-tokens", type=positive_int, required=True, metavar="P", help="prompt length")
    p.add_argument("--output-tokens", type=positive_int, required=True, metavar="N", help="new tokens per request")
    p.add_argument("--batch", type=positive_int, default=16,
                   help="prompts per prefill batch and sequences per decode step (the plan's --max-seqs)")
    p.add_argument("--memory-gib", type=positive_float, help="memory per machine (default: the profiled machine's)")
    p.add_argument("--rate", type=positive_float, metavar="R",
                   help="arrival rate, requests/s: predicted latency at it (simulated); needed by SLA mode")
    p.add_argument("--ttft-s", type=positive_float, metavar="X", help="SLA mode: target time to first token (s)")
    p.add_argument("--tpot-s", type=positive_float, metavar="Y", help="SLA mode: target time per output token (s)")
    p.add_argument("--sla-percentile", type=int, choices=(50, 90, 95, 99), default=90,
                   help="SLA mode: the percentile of requests that must meet both targets")
    p.add_argument("--json", action="store_true", help="print one JSON object: the split and every term used")
    p.add_argument("--write-up-flags", action="store_true",
                   help="print only the `dejavu up` flags (dejavu up $(dejavu plan ... --write-up-flags))")
    p.add_argument("--write-compose", metavar="FILE",
                   help="also write a compose override: docker compose -f compose.yaml -f FILE up")
    return p


def _simulate_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("simulate", help="replay a trace through layouts of services (latency, throughput, cost)",
                       formatter_class=Formatter, description=(
                           "Replay requests (bench.load's Poisson arrivals and chat-like output lengths, or a "
                           "JSON trace) through layouts of prompt and token services, event by event, from a "
                           "profile: makespan, throughput, TTFT/TPOT/normalized-latency percentiles, cost per "
                           "million tokens; optionally with failures, and against a bench.load JSON."))
    p.add_argument("--profile", required=True, metavar="FILE", help="a profile JSON from `dejavu profile`")
    p.add_argument("--layout", action="append", metavar="SPEC",
                   help="P+T (prompt + token services, e.g. 1+1) or colocated[:T]; repeat to compare "
                   "(default: 1+1 and colocated)")
    p.add_argument("--rates", type=rates, default="0.2,0.4,0.8", help="comma list of request rates (req/s)")
    p.add_argument("--requests", type=positive_int, default=16, help="requests per rate")
    p.add_argument("--prompt-tokens", type=positive_int, default=500)
    p.add_argument("--output-tokens", type=positive_int, metavar="N",
                   help="every request this long (default: chat-like lengths as bench.load draws them)")
    p.add_argument("--output-scale", type=positive_float, default=0.25, help="multiplies the chat-like lengths")
    p.add_argument("--max-output-tokens", type=positive_int, default=1024, help="clip of the chat-like lengths")
    p.add_argument("--seed", type=int, default=0, help="of arrivals, lengths and failures (bench.load's --seed)")
    p.add_argument("--trace", metavar="FILE",
                   help="replay this JSON list of {arrival_s, prompt_tokens, output_tokens} instead (--rates ignored)")
    p.add_argument("--max-seqs", type=positive_int, default=16, help="sequences per token service")
    p.add_argument("--prompt-batch-tokens", type=positive_int, default=4096, help="prompt tokens per prefill forward")
    p.add_argument("--chunk-tokens", type=positive_int, default=512, help="colocated: prompt tokens per step")
    p.add_argument("--shared-host", action="store_true",
                   help="every service of a layout takes turns on one machine's cores (--cpu-placement turns)")
    p.add_argument("--failures-per-hour", type=float, default=0.0, help="each service's failure rate")
    p.add_argument("--recovery-s", type=positive_float, default=30.0,
                   help="after a failure: until a request resumes from its replica, and the service is back")
    p.add_argument("--replication", choices=("on", "off"), default="on",
                   help="off: a failed token service's requests prefill prompt + tokens so far again")
    p.add_argument("--machine-cost", type=float, default=1.0, help="price of a machine-hour (cost per million tokens)")
    p.add_argument("--against", metavar="LOAD.json",
                   help="instead: replay the requests a bench.load JSON records through the layouts it measured "
                   "(colocated, 1+1 taking turns on one host) and print predicted against measured")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="TTFT, TPOT and normalized latency against rate, per layout")
    return p


def run(args, parser: argparse.ArgumentParser) -> int:
    """Runs the subcommand `args.command` (one of add_parsers'), errors through its parser."""
    if args.command == "profile":
        return _profile(args, parser)
    from planner.profile import Profile, ProfileError

    try:
        profile = Profile.load(args.profile)
    except ProfileError as exc:
        parser.error(f"--profile: {exc}")
    return (_plan if args.command == "plan" else _simulate)(args, parser, profile)


def _profile(args, parser) -> int:
    from bench import profile as measure
    from bench.serving_overhead import ServingError
    from common.model import ModelNotFound

    measure.check(args, parser)
    try:
        return measure.write(args)
    except (ModelNotFound, ValueError) as exc:
        parser.error(str(exc))
    except ServingError as exc:
        print(f"dejavu profile: {exc} (--no-serving skips the serving overhead)", file=sys.stderr)
        return 1


def _plan(args, parser, profile) -> int:
    from planner.plan import GIB, PlanError, Sla, Workload, plan, plan_sla

    if (args.ttft_s is None) != (args.tpot_s is None):
        parser.error("SLA mode needs both --ttft-s and --tpot-s")
    sla = args.ttft_s is not None
    if not sla and args.machines is None:
        parser.error("--machines is required (or give --ttft-s, --tpot-s and --rate for SLA mode)")
    if sla and args.rate is None:
        parser.error("SLA mode (--ttft-s, --tpot-s) needs --rate")
    work = Workload(args.prompt_tokens, args.output_tokens, args.batch, args.rate)
    memory = int(args.memory_gib * GIB) if args.memory_gib else None
    try:
        result = (plan_sla(profile, work, Sla(args.ttft_s, args.tpot_s, args.sla_percentile), args.machines, memory)
                  if sla else plan(profile, work, args.machines, memory))
    except PlanError as exc:
        print(f"dejavu plan: {exc}", file=sys.stderr)
        return 1
    if args.write_compose:
        with open(args.write_compose, "w") as fh:
            fh.write(result.compose_override())
    flags = " ".join(result.up_flags(profile))
    if args.write_up_flags:
        print(flags)
    elif args.json:
        print(json.dumps({**result.to_json(), "up_flags": flags}, indent=2))
    else:
        _print_plan(result, flags, args.write_compose)
    return 0


def _print_plan(r, flags: str, compose: str | None) -> None:
    side = "colocated token service" if r.colocated else f"{r.prompt_services} prompt service(s)"
    stages = f" of {r.stages} stages" if r.stages > 1 else ""
    print(f"plan ({r.mode}): {side} + {r.token_services} token service(s){stages}, {r.machines} machine(s)")
    print(f"  D_t = ceil(D·N·t / (m·Y + N·t)) = ceil({r.machines}·{r.N}·{r.t_s:.4g} / ({r.m:.3g}·{r.Y_s:.4g} + "
          f"{r.N}·{r.t_s:.4g})) = ceil({r.D_t_exact:.3f}); used: {r.D_t} decoding, {r.D_p} prefilling")
    print(f"  Y = {r.Y_s:.4g} s: a prefill of {r.batch} prompts x {r.P} tokens; t = {r.t_s:.4g} s: a decode step of "
          f"{r.batch} sequences at {r.P + r.N / 2:g} tokens of KV as served (forward {r.step_s:.4g} s + serving "
          f"overhead {r.overhead_s:.4g} s); m = {r.m:.3g}")
    print(f"  memory: {r.memory_bytes / 2**30:.1f} GiB a machine -> prompt service {r.min_prompt_stages} machine, "
          f"token service {r.min_token_stages} machine(s)")
    if r.predicted:
        p = r.predicted
        print(f"  predicted at {p['rate']:g} req/s: TTFT p50/p90 {p['ttft_s']['p50']:.3g}/{p['ttft_s']['p90']:.3g} s, "
              f"TPOT p50/p90 {p['tpot_s']['p50'] * 1e3:.0f}/{p['tpot_s']['p90'] * 1e3:.0f} ms, "
              f"{p['tokens_per_s']:.1f} tok/s")
    print(f"  why: {r.bottleneck}")
    print(f"\n  dejavu up {flags}")
    if compose:
        print(f"  docker compose -f compose.yaml -f {compose} up")


def _simulate(args, parser, profile) -> int:
    from planner import simulate as sim
    from planner.layout import Layout
    from planner.workload import TraceError, load_trace, poisson

    settings = dict(max_seqs=args.max_seqs, prompt_batch_tokens=args.prompt_batch_tokens,
                    chunk_tokens=args.chunk_tokens, shared_host=args.shared_host)
    if args.failures_per_hour < 0 or args.machine_cost < 0:
        parser.error("--failures-per-hour and --machine-cost must be >= 0")
    if args.against:
        return _against(args, parser, profile)
    try:
        layouts = [Layout.parse(spec, **settings) for spec in args.layout or ["1+1", "colocated"]]
        traces = ({"trace": load_trace(args.trace)} if args.trace else
                  {rate: poisson(args.requests, rate, args.prompt_tokens, args.seed, args.max_output_tokens,
                                 args.output_scale, args.output_tokens) for rate in args.rates})
    except (ValueError, TraceError) as exc:
        parser.error(str(exc))
    failures = sim.Failures(args.failures_per_hour, args.recovery_s, args.replication == "on", seed=args.seed)
    rows = []
    for layout in layouts:
        for rate, trace in traces.items():
            try:
                rows.append({"rate": rate, **sim.simulate(profile, layout, trace, failures, args.machine_cost)})
            except sim.SimulationError as exc:
                print(f"dejavu simulate: {layout.name} at {rate}: {exc}", file=sys.stderr)
                return 1
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_rows(rows, failures)
    if args.plot:
        _plot(rows, args.plot)
    return 0


def _print_rows(rows: list[dict], failures) -> None:
    print(f"{'layout':<13}{'rate':>6}{'req/s':>7}{'tok/s':>8}  {'TTFT p50/p90 s':>15}  {'TPOT p50/p90 ms':>15}  "
          f"{'norm. lat. p50/p90 s':>20}{'makespan s':>11}{'machines':>9}{'$/M tok':>9}" +
          ("  restarts" if failures.per_hour else ""))
    for r in rows:
        rate = r["rate"] if isinstance(r["rate"], str) else f"{r['rate']:g}"
        print(f"{r['layout']:<13}{rate:>6}{r['requests_per_s']:>7.2f}{r['tokens_per_s']:>8.1f}  "
              f"{r['ttft_s']['p50']:>7.2f}/{r['ttft_s']['p90']:<7.2f}  {r['tpot_s']['p50'] * 1e3:>7.0f}/"
              f"{r['tpot_s']['p90'] * 1e3:<7.0f}  {r['norm_latency_s']['p50']:>10.3f}/{r['norm_latency_s']['p90']:<9.3f}"
              f"{r['makespan_s']:>11.1f}{r['machines']:>9}{r['cost_per_million_tokens']:>9.2f}" +
              (f"  {r['restarts']:>8}" if failures.per_hour else ""))


def _plot(rows: list[dict], path: str) -> None:
    from planner.plot import plot_rates

    if any(isinstance(r["rate"], str) for r in rows):
        print("dejavu simulate: --plot needs --rates (a trace has no rate axis): no plot", file=sys.stderr)
    elif plot_rates(rows, path):
        print(f"plot: {path}", file=sys.stderr)
    else:
        print("dejavu simulate: matplotlib is not installed (pip install matplotlib): no plot", file=sys.stderr)


def _against(args, parser, profile) -> int:
    from planner.validate import compare, print_table

    try:
        with open(args.against) as fh:
            data = json.load(fh)
        rows = compare(profile, data, shared_host=True, max_seqs=args.max_seqs)
    except (OSError, ValueError) as exc:
        parser.error(f"--against {args.against}: {exc}")
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        none = "" if profile.serving_step_s or profile.serving_token_s else " (none measured)"
        print(f"profile: serving overhead {profile.serving_step_s * 1e3:.1f} ms + {profile.serving_token_s * 1e3:.2f} "
              f"ms x batch a decode step, clipped at 0{none}")
        print_table(rows)
    return 0
