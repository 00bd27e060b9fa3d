"""planner/simulate.py against closed-form cases (fixed times, one server), the workload against
bench.load's own draws, the comparison with a bench.load JSON, and `dejavu simulate` in process.

The profile of most tests: a prefill costs Y = 1 s per 100 prompt tokens at any batch (10 ms a
token), a decode step t = 0.1 s at any batch and KV length, m = 1.25: every time is exact."""

from __future__ import annotations

import json

import pytest

from bench import load as bench_load
from dejavu.cli import main
from planner import workload
from planner.layout import Layout
from planner.profile import Profile, Sample
from planner.simulate import Failures, Simulation, SimulationError, simulate
from planner.validate import compare
from planner.workload import TraceRequest, bench_load_traces

Y, T, M = 1.0, 0.1, 1.25


def make_profile(**changes) -> Profile:
    fields = dict(model="smollm2", dtype="float32", stages=1, cpu="test cpu", block_size=16, layers=2,
                  kv_bytes_per_token=1000, weights_bytes=10**6, memory_bytes=10**9, m=M,
                  prefill=(Sample(1, 100, Y),), decode=(Sample(1, 100, T),))
    return Profile(**{**fields, **changes})


def replay(layout: Layout, trace, **kw):
    return Simulation(make_profile(), layout, **kw).run(trace)


def test_one_request_disaggregated():
    """TTFT = m·Y (the prefill, KV streamed meanwhile); latency = TTFT + (N - 1)·t: the prefill
    gives the first token, each decode step one more."""
    [job] = replay(Layout(1, 1), [TraceRequest(2.0, 100, 10)])
    assert job.first_token_s - job.arrival_s == pytest.approx(M * Y)
    assert job.done_s - job.arrival_s == pytest.approx(M * Y + 9 * T)


def test_one_request_colocated_has_no_transfer():
    [job] = replay(Layout(0, 1), [TraceRequest(0.0, 100, 10)])
    assert (job.first_token_s, job.done_s) == (pytest.approx(Y), pytest.approx(Y + 9 * T))


A, C = 0.02, 0.005  # a serving overhead: 20 ms a step + 5 ms a decoding sequence


def test_one_request_pays_the_serving_overhead_each_step():
    """latency = TTFT + (N - 1)·(t + a + c·1): each decode step gives one token and costs its
    forward and its serving work; the prefill on a prompt service pays none."""
    profile = make_profile(serving_step_s=A, serving_token_s=C)
    [job] = Simulation(profile, Layout(1, 1)).run([TraceRequest(0.0, 100, 10)])
    assert job.first_token_s == pytest.approx(M * Y)
    assert job.done_s == pytest.approx(M * Y + 9 * (T + A + C))


def test_colocated_steps_pay_the_overhead_too():
    """Colocated, the prefill is a step of the token service (no decoding sequence: overhead a)."""
    profile = make_profile(serving_step_s=A, serving_token_s=C)
    [job] = Simulation(profile, Layout(0, 1)).run([TraceRequest(0.0, 100, 10)])
    assert (job.first_token_s, job.done_s) == (pytest.approx(Y + A), pytest.approx(Y + A + 9 * (T + A + C)))


def test_the_per_sequence_overhead_grows_with_the_batch():
    profile = make_profile(serving_step_s=A, serving_token_s=C)
    jobs = Simulation(profile, Layout(1, 1)).run([TraceRequest(0.0, 100, 6), TraceRequest(0.0, 100, 6)])
    assert [j.done_s for j in jobs] == pytest.approx([2 * M * Y + 5 * (T + A + 2 * C)] * 2)
    clipped = make_profile(serving_step_s=-0.01, serving_token_s=C)  # a + c·1 < 0: no overhead, not a gain
    [job] = Simulation(clipped, Layout(1, 1)).run([TraceRequest(0.0, 100, 10)])
    assert job.done_s == pytest.approx(M * Y + 9 * T)


def test_a_one_token_request_ends_at_its_prefill():
    summary = simulate(make_profile(), Layout(1, 1), [TraceRequest(0.0, 100, 1)])
    assert summary["norm_latency_s"]["p50"] == pytest.approx(M * Y) and summary["tpot_s"]["p50"] != summary["tpot_s"]["p50"]


def test_deterministic_arrivals_queue_at_the_prompt_service():
    """D/D/1: one prompt per forward (batch budget = one prompt), arrivals every g = 1 s < m·Y =
    1.25 s: request i waits i·(m·Y - g) for its prefill, so its TTFT is m·Y + 0.25·i exactly."""
    layout = Layout(1, 4, prompt_batch_tokens=100)
    jobs = replay(layout, [TraceRequest(float(i), 100, 1) for i in range(6)])
    assert [j.first_token_s - j.arrival_s for j in jobs] == pytest.approx([M * Y + 0.25 * i for i in range(6)])


def test_spaced_arrivals_do_not_interact():
    jobs = replay(Layout(1, 1), [TraceRequest(10.0 * i, 100, 5) for i in range(4)])
    assert [j.done_s - j.arrival_s for j in jobs] == pytest.approx([M * Y + 4 * T] * 4)


def test_prompts_batch_and_decodes_share_steps():
    """Two prompts at once prefill in one forward (2·Y·m: the profile's time is per token) and
    decode in the same steps: both end at 2·m·Y + (N - 1)·t."""
    jobs = replay(Layout(1, 1), [TraceRequest(0.0, 100, 6), TraceRequest(0.0, 100, 6)])
    assert [j.first_token_s for j in jobs] == pytest.approx([2 * M * Y] * 2)
    assert [j.done_s for j in jobs] == pytest.approx([2 * M * Y + 5 * T] * 2)


def test_step_time_follows_the_batch():
    """Decode steps 0.1 s for one sequence, 0.3 s for two (piecewise linear between): a second
    request joining at a step boundary slows the first one's remaining steps."""
    profile = make_profile(decode=(Sample(1, 100, 0.1), Sample(2, 100, 0.3)))
    jobs = Simulation(profile, Layout(1, 1)).run([TraceRequest(0.0, 100, 4), TraceRequest(0.0, 200, 2)])
    # one forward of both prompts: 2 prompts x 150 tokens mean x 10 ms x m = 3.75 s; then steps of 2
    assert jobs[0].first_token_s == pytest.approx(3.75)
    assert jobs[1].done_s == pytest.approx(3.75 + 0.3)
    assert jobs[0].done_s == pytest.approx(3.75 + 0.3 + 2 * 0.1)


def test_max_seqs_queues_requests_for_a_slot():
    """One slot: the second request is admitted (and prefilled) only when the first ends."""
    jobs = replay(Layout(1, 1, max_seqs=1), [TraceRequest(0.0, 100, 3), TraceRequest(0.0, 100, 3)])
    first_done = M * Y + 2 * T
    assert jobs[0].done_s == pytest.approx(first_done)
    assert jobs[1].first_token_s == pytest.approx(first_done + M * Y)


def test_colocated_chunks_a_long_prompt_between_decode_steps():
    """Chunks of 100 tokens (1 s each): a 300-token prompt arriving while a request decodes takes
    3 steps of (t + 1 s); the decoding request's tokens wait for them."""
    layout = Layout(0, 1, chunk_tokens=100)
    jobs = replay(layout, [TraceRequest(0.0, 100, 5), TraceRequest(1.0, 300, 2)])
    # request 0: prefill 0-1 s; its steps start at 1.0; request 1 queued at 1.0 joins that step
    assert jobs[0].first_token_s == pytest.approx(1.0)
    assert jobs[1].first_token_s == pytest.approx(1.0 + 3 * (T + Y))
    assert jobs[0].done_s == pytest.approx(1.0 + 3 * (T + Y) + T)


def test_a_shared_host_serializes_prefill_and_decode():
    """Taking turns on one host: B's prefill (arriving while A decodes) waits for A's step, and
    A's next step waits for B's prefill."""
    trace = [TraceRequest(0.0, 100, 3), TraceRequest(M * Y + 0.5 * T, 100, 2)]
    jobs = replay(Layout(1, 1, shared_host=True), trace)
    assert jobs[1].first_token_s == pytest.approx(M * Y + T + M * Y)       # after A's first step
    assert jobs[0].done_s == pytest.approx(2 * M * Y + 2 * T)               # A's 2nd step after B's prefill
    alone = replay(Layout(1, 1), trace)
    assert alone[1].first_token_s == pytest.approx(trace[1].arrival_s + M * Y)


def test_throughput_and_cost():
    trace = [TraceRequest(0.0, 100, 10)]
    summary = simulate(make_profile(), Layout(1, 1), trace, price_per_hour=3.6)
    span = M * Y + 9 * T
    assert summary["makespan_s"] == pytest.approx(span)
    assert summary["tokens_per_s"] == pytest.approx(10 / span)
    assert summary["machines"] == 2
    assert summary["cost_per_million_tokens"] == pytest.approx(2 * span / 3600 * 3.6 / 10 * 1e6)
    assert simulate(make_profile(), Layout(1, 1, shared_host=True), trace)["machines"] == 1


def test_a_failure_with_replication_resumes_after_recovery():
    """Token service down at 1.3 s: steps ended at 1.35 s would have been the 2nd token's; the
    request has 1 token, resumes at 1.3 + 5 s and needs 9 more steps."""
    failures = Failures(recovery_s=5.0, replication=True, at=((1.3, "token0"),))
    [job] = replay(Layout(1, 1), [TraceRequest(0.0, 100, 10)], failures=failures)
    assert job.restarts == 1
    assert job.done_s == pytest.approx(1.3 + 5.0 + 9 * T)


def test_a_failure_without_replication_prefills_again():
    """Down at 1.5 s (tokens 1-3 out, the step to 1.55 lost): no replica, so once a token service
    is back (6.5 s) it prefills prompt + 3 tokens (103 x 12.5 ms), which gives token 4, then 6 steps."""
    failures = Failures(recovery_s=5.0, replication=False, at=((1.5, "token0"),))
    [job] = replay(Layout(1, 1), [TraceRequest(0.0, 100, 10)], failures=failures)
    assert job.done_s == pytest.approx(6.5 + M * 1.03 * Y + 6 * T)
    with_other = replay(Layout(1, 2), [TraceRequest(0.0, 100, 10)], failures=failures)[0]
    assert with_other.done_s == pytest.approx(1.5 + M * 1.03 * Y + 6 * T)  # another token service at once


def test_a_prompt_service_failure_prefills_elsewhere():
    failures = Failures(recovery_s=5.0, at=((0.5, "prompt0"),))
    [job] = replay(Layout(2, 1), [TraceRequest(0.0, 100, 2)], failures=failures)
    assert job.first_token_s == pytest.approx(0.5 + M * Y)


def test_random_failures_are_seeded_and_cost_latency():
    trace = workload.poisson(40, 0.5, 100, output_tokens=20)
    calm = simulate(make_profile(), Layout(1, 2), trace)
    stormy = [simulate(make_profile(), Layout(1, 2), trace, Failures(per_hour=600, recovery_s=2.0, seed=1))
              for _ in range(2)]
    assert stormy[0] == stormy[1] and stormy[0]["restarts"] > 0
    assert stormy[0]["norm_latency_s"]["p99"] > calm["norm_latency_s"]["p99"]
    with pytest.raises(SimulationError):
        Simulation(make_profile(), Layout(1, 1), Failures(per_hour=3600 * 50, recovery_s=1.0),
                   max_time_s=500).run(trace)


@pytest.mark.parametrize("spec, shared, replication", [("1+2", False, True), ("2+1", True, False),
                                                       ("colocated:2", False, False), ("3+2", False, True)])
def test_every_request_ends_exactly_once_under_failures(spec, shared, replication):
    """Invariants under random failures of every service: each request ends with exactly its
    tokens, its first token before its end, and every slot is given back."""
    profile = make_profile(decode=(Sample(1, 100, 0.05), Sample(16, 100, 0.2)))
    trace = workload.poisson(60, 2.0, 100, seed=4, scale=0.2)
    sim = Simulation(profile, Layout.parse(spec, shared_host=shared, prompt_batch_tokens=150),
                     Failures(per_hour=120, recovery_s=3.0, replication=replication, seed=2))
    jobs = sim.run(trace)
    assert sim.failed > 0 and sim.finished == len(trace)
    assert all(j.generated == j.output_tokens and j.arrival_s < j.first_token_s <= j.done_s for j in jobs)
    assert all(s.slots == 0 and not s.running for s in sim.tokens)


def test_workload_is_bench_loads_own():
    args = bench_load.parse_args(["--requests", "12", "--rates", "0.2,0.4", "--seed", "3"])
    lengths = bench_load.output_lengths(args)
    for rate in args.rates:
        trace = workload.poisson(12, rate, 500, seed=3)
        assert [r.arrival_s for r in trace] == bench_load.arrivals(args, rate)
        assert [r.output_tokens for r in trace] == lengths


def test_traces_from_a_bench_load_json():
    data = {"summary": {}, "config": {"prompt_tokens": 500, "output_lengths": {"sampled": [3, 5]},
                                      "arrivals_s": {"0.2": [0.0, 4.0]}, "repeats": 2, "concurrent": 16,
                                      "concurrent_output_tokens": 128, "single": 3}}
    traces = bench_load_traces(data)
    assert traces["rate 0.2"] == [TraceRequest(0.0, 500, 3), TraceRequest(4.0, 500, 5)]
    assert traces["concurrent"] == [TraceRequest(0.0, 500, 128)] * 16
    assert traces["single"] == [TraceRequest(0.0, 500, 128)]
    del data["config"]["single"]  # an older bench.load sent no request alone
    assert "single" not in bench_load_traces(data)


def test_compare_sets_predicted_beside_measured():
    """A measured run that is the simulator's own prediction compares at 0 % error."""
    profile = make_profile()
    data = {"config": {"prompt_tokens": 100, "output_lengths": {"sampled": [4, 6]}, "arrivals_s": {"0.5": [0.0, 2.0]},
                       "repeats": 0},
            "summary": {"colocated": {"tokens_per_s_16_concurrent": 1.0}}, "results": []}
    predicted = simulate(profile, Layout(0, 1), bench_load_traces(data)["rate 0.5"])
    data["results"] = [{"target": "colocated", "rate": 0.5, "tokens_per_s": predicted["tokens_per_s"],
                        **{k: {"p50": predicted[k]["p50"]} for k in ("norm_latency_s", "ttft_s", "tpot_s")}}]
    rows = compare(profile, data)
    assert {r["metric"] for r in rows} == {"norm_latency_s p50", "ttft_s p50", "tpot_s p50", "tokens_per_s"}
    assert all(r["error"] == pytest.approx(0.0) for r in rows)


def test_compare_checks_a_request_alone():
    """bench.load's --single requests (one at a time on an idle server) against one simulated request:
    the serving overhead at batch 1 checked against a measurement made apart from the profile's."""
    profile = make_profile(serving_step_s=A, serving_token_s=C)
    data = {"config": {"prompt_tokens": 100, "output_lengths": {"sampled": [4]}, "arrivals_s": {},
                       "repeats": 0, "single": 3, "concurrent_output_tokens": 11},
            "summary": {"colocated": {"ttft_s_single_p50": Y + A, "tpot_s_single_p50": 2 * (T + A + C)}}}
    rows = compare(profile, data)
    assert [(r["phase"], r["metric"]) for r in rows] == [("1 alone", "ttft_s p50"), ("1 alone", "tpot_s p50")]
    assert [r["error"] for r in rows] == [pytest.approx(0.0), pytest.approx(-0.5)]
    data["summary"]["colocated"]["tpot_s_single_p50"] = float("nan")  # none of them succeeded
    assert compare(profile, data) == []


def test_simulate_against_names_the_serving_overhead(tmp_path, capsys):
    profile, load = tmp_path / "profile.json", tmp_path / "load.json"
    make_profile(serving_step_s=A, serving_token_s=C).save(profile)
    load.write_text(json.dumps({"config": {"prompt_tokens": 100, "output_lengths": {"sampled": [4]}, "arrivals_s": {},
                                           "repeats": 0, "single": 1, "concurrent_output_tokens": 11},
                                "summary": {"colocated": {"ttft_s_single_p50": 1.0, "tpot_s_single_p50": 0.1}}}))
    code, out, _ = run_cli(capsys, "simulate", "--profile", str(profile), "--against", str(load))
    assert code == 0 and "serving overhead 20.0 ms + 5.00 ms x batch a decode step" in out and "1 alone" in out


def test_layout_parse():
    assert Layout.parse("2+3") == Layout(2, 3)
    assert Layout.parse("colocated") == Layout(0, 1) and Layout.parse("colocated:2").name == "colocated:2"
    for bad in ("2", "0+1", "a+b", "colocated:x", "1+0"):
        with pytest.raises(ValueError, match="P\\+T"):
            Layout.parse(bad)


# --- the CLI ------------------------------------------------------------------------------------------

def run_cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


def test_simulate_cli_rows_and_plot(tmp_path, capsys):
    path = tmp_path / "profile.json"
    make_profile().save(path)
    code, out, _ = run_cli(capsys, "simulate", "--profile", str(path), "--layout", "1+1", "--layout", "colocated",
                           "--rates", "0.1,0.3", "--requests", "8", "--prompt-tokens", "100", "--json",
                           "--plot", str(tmp_path / "lat.png"))
    assert code == 0
    rows = json.loads(out)
    assert [(r["layout"], r["rate"]) for r in rows] == [("1+1", 0.1), ("1+1", 0.3), ("colocated", 0.1), ("colocated", 0.3)]
    assert all(r["requests"] == 8 and r["tokens_per_s"] > 0 for r in rows)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "lat.png").stat().st_size > 1000


def test_simulate_cli_trace_and_failures(tmp_path, capsys):
    path, trace = tmp_path / "profile.json", tmp_path / "trace.json"
    make_profile().save(path)
    trace.write_text(json.dumps([{"arrival_s": 0, "prompt_tokens": 100, "output_tokens": 10}]))
    code, out, _ = run_cli(capsys, "simulate", "--profile", str(path), "--layout", "1+1", "--trace", str(trace),
                           "--failures-per-hour", "1", "--json")
    assert code == 0 and json.loads(out)[0]["norm_latency_s"]["p50"] == pytest.approx((M * Y + 9 * T) / 10)


@pytest.mark.parametrize("argv, message", [
    (["--rates", "0.2,x"], "give comma-separated request rates"),
    (["--layout", "3"], "give P+T"),
    (["--requests", "0"], "--requests: must be an integer >= 1"),
    (["--trace", "/nonexistent/trace.json"], "no such file"),
    (["--failures-per-hour", "-1"], "must be >= 0"),
])
def test_simulate_cli_errors(tmp_path, capsys, argv, message):
    path = tmp_path / "profile.json"
    make_profile().save(path)
    code, _, err = run_cli(capsys, "simulate", "--profile", str(path), *argv)
    assert code == 2 and message in err


def test_simulate_cli_names_a_missing_profile(tmp_path, capsys):
    code, _, err = run_cli(capsys, "simulate", "--profile", str(tmp_path / "gone.json"))
    assert code == 2 and "gone.json: no such file" in err
