"""The simulator against bench.load: the requests a bench.load JSON records, replayed through the
layouts it measured, predicted beside measured.

    rows = compare(profile, json.load(open("docs/bench/load.json")))
    print_table(rows)           # or `dejavu simulate --profile P --against docs/bench/load.json`

bench.load's targets as layouts: "colocated" is one colocated token service, "disaggregated" one
prompt and one token service (1+1). bench.load starts every service on one host, so by default the
1+1 layout takes turns on that host's cores (`shared_host`, what `--cpu-placement turns`, the
default on small hosts, does; a run with the services pinned apart or unpinned shares the cores
otherwise, which the simulator does not model).

Compared, per open-loop rate: median normalized latency, TTFT and TPOT, and tokens/s over the run;
for the closed loop (16 concurrent, bench.load's headline): tokens/s (bench.load's median over its
repeats, each a burst of 16) and the TTFT and TPOT medians; for one request alone on an idle
server (bench.load's --single requests): the TTFT and TPOT medians, a check of the profile's
serving overhead at batch 1 against a measurement made apart from it. error = predicted / measured - 1 (the
issue's target: within 20 %).
"""

from __future__ import annotations

import math

from planner.layout import Layout
from planner.profile import Profile
from planner.simulate import simulate
from planner.workload import bench_load_traces

TARGETS = {"colocated": Layout(0, 1), "disaggregated": Layout(1, 1)}


def compare(profile: Profile, data: dict, shared_host: bool = True, max_seqs: int = 16) -> list[dict]:
    """Rows {target, phase, metric, measured, predicted, error}; ValueError for a JSON that is not bench.load's."""
    if not isinstance(data, dict) or "summary" not in data:
        raise ValueError("not a bench.load JSON (no \"summary\")")
    traces, rows = bench_load_traces(data), []
    placement = (data.get("config") or {}).get("cpu_placement", "not recorded")
    for target, layout in TARGETS.items():
        measured = data["summary"].get(target)
        if not measured or "skipped" in measured:
            continue
        layout = layout.with_settings(shared_host=shared_host and not layout.colocated, max_seqs=max_seqs)
        for result in data.get("results", []):
            if result["target"] == target:
                predicted = simulate(profile, layout, traces[f"rate {result['rate']:g}"])
                rows += _rows(target, placement, f"rate {result['rate']:g}", predicted, {
                    "norm_latency_s p50": result["norm_latency_s"]["p50"], "ttft_s p50": result["ttft_s"]["p50"],
                    "tpot_s p50": result["tpot_s"]["p50"], "tokens_per_s": result["tokens_per_s"]})
        if "concurrent" in traces:
            predicted = simulate(profile, layout, traces["concurrent"])
            keys = {"tokens_per_s": "tokens_per_s_16_concurrent", "ttft_s p50": "ttft_s_16_concurrent_p50",
                    "tpot_s p50": "tpot_s_16_concurrent_p50"}  # an older bench.load recorded tokens/s only
            rows += _rows(target, placement, "16 concurrent", predicted,
                          {k: measured[v] for k, v in keys.items() if v in measured})
        if "single" in traces and math.isfinite(measured.get("tpot_s_single_p50") or math.nan):  # nan: none succeeded
            predicted = simulate(profile, layout, traces["single"])
            rows += _rows(target, placement, "1 alone", predicted, {
                "ttft_s p50": measured["ttft_s_single_p50"], "tpot_s p50": measured["tpot_s_single_p50"]})
    return rows


def _rows(target: str, placement: str, phase: str, predicted: dict, measured: dict) -> list[dict]:
    out = []
    for metric, value in measured.items():
        name, _, q = metric.partition(" ")
        guess = predicted[name][q] if q else predicted[name]
        out.append({"target": target, "placement": placement, "phase": phase, "metric": metric, "measured": value,
                    "predicted": guess, "error": guess / value - 1 if value else float("nan")})
    return out


def print_table(rows: list[dict]) -> None:
    """One line a figure; the measured run's --cpu-placement beside it (the 1+1 layout is modelled
    taking turns: a split or unpinned run is not what it predicts)."""
    print(f"{'target':<15}{'placement':<14}{'phase':<15}{'metric':<20}{'measured':>10}{'predicted':>11}{'error':>9}")
    for r in rows:
        flag = "" if abs(r["error"]) <= 0.2 else "  > 20 %"
        print(f"{r['target']:<15}{r['placement']:<14}{r['phase']:<15}{r['metric']:<20}{r['measured']:>10.3f}"
              f"{r['predicted']:>11.3f}{r['error'] * 100:>8.0f}%{flag}")
