"""planner/profile.py and planner/plan.py, and `dejavu plan` run in process: the profile's JSON and
interpolation, the paper's formula, the memory minimums, SLA mode, the flags and compose override
it writes, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dejavu.cli import main
from planner.plan import PlanError, Sla, Workload, plan, plan_sla, stages_needed, token_machines
from planner.layout import Layout
from planner.profile import Profile, ProfileError, Sample, fit_overhead
from planner.simulate import simulate
from planner.workload import poisson

GB = 10**9


def make_profile(**changes) -> Profile:
    """Round numbers: a prefill costs 10 ms a prompt token at any batch, a decode step 100 ms."""
    fields = dict(model="smollm2", dtype="float32", stages=1, cpu="test cpu", block_size=16, layers=10,
                  kv_bytes_per_token=1_000_000, weights_bytes=10 * GB, memory_bytes=16 * GB, m=1.25,
                  prefill=(Sample(1, 100, 1.0),), decode=(Sample(1, 100, 0.1),), meta={"how": "by hand"})
    return Profile(**{**fields, **changes})


def write(tmp_path, profile: Profile) -> str:
    path = tmp_path / "profile.json"
    profile.save(path)
    return str(path)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


# --- the profile ------------------------------------------------------------------------------------

def test_profile_json_round_trip(tmp_path):
    profile = make_profile(prefill=(Sample(1, 128, 0.2), Sample(1, 512, 0.9), Sample(4, 128, 0.7), Sample(4, 512, 3.1)),
                           decode=(Sample(1, 128, 0.03), Sample(8, 128, 0.05)))
    loaded = Profile.load(write(tmp_path, profile))
    assert loaded == profile
    assert loaded.meta == {"how": "by hand"}
    assert json.loads((tmp_path / "profile.json").read_text())["prefill"][1] == {"batch": 1, "prompt_len": 512,
                                                                               "seconds": 0.9}


def test_interpolation_is_exact_at_samples_and_linear_between():
    profile = make_profile(prefill=(Sample(1, 100, 1.0), Sample(1, 300, 4.5), Sample(2, 100, 1.6), Sample(2, 300, 7.2)),
                           decode=(Sample(1, 100, 0.03), Sample(1, 300, 0.05), Sample(9, 100, 0.07), Sample(9, 300, 0.13)))
    assert profile.prefill_s(1, 300) == pytest.approx(4.5)
    assert profile.prefill_s(2, 100) == pytest.approx(1.6)
    # per token: 0.01 at 100, 0.015 at 300 -> 0.0125 at 200, times 200 tokens
    assert profile.prefill_s(1, 200) == pytest.approx(2.5)
    assert profile.prefill_s(8, 100) == pytest.approx(8 * 100 * 0.008)     # past the largest batch: its per-token cost
    assert profile.prefill_s(1, 500) == pytest.approx(500 * 0.02)          # past the longest: along the last segment
    assert profile.step_s(5, 200) == pytest.approx((0.04 + 0.10) / 2)      # bilinear
    assert profile.step_s(17, 100) == pytest.approx(0.07 + 8 * 0.005)      # extended along the batch
    assert profile.step_s(1, 50) == pytest.approx(0.03)                    # below the smallest: held
    assert profile.step_s(0, 100) == 0.0


def test_one_sample_scales_prefill_with_tokens_and_holds_decode():
    profile = make_profile()
    assert profile.prefill_s(3, 250) == pytest.approx(7.5)
    assert profile.step_s(16, 4000) == pytest.approx(0.1)


@pytest.mark.parametrize("text, message", [
    ("{", "not JSON"),
    ('{"format": "other"}', "not a profile"),
    ('{"format": "dejavu-profile/1", "model": "x"}', "missing key"),
])
def test_a_malformed_profile_names_the_file(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ProfileError, match=message) as err:
        Profile.load(path)
    assert str(path) in str(err.value)


def test_profile_checks_its_grid_and_m():
    with pytest.raises(ProfileError, match="grid"):
        make_profile(decode=(Sample(1, 100, 0.1), Sample(2, 200, 0.2)))
    with pytest.raises(ProfileError, match="m must be >= 1"):
        make_profile(m=0.9)
    with pytest.raises(ProfileError, match="twice"):
        make_profile(prefill=(Sample(1, 100, 1.0), Sample(1, 100, 1.1)))


def test_the_serving_overhead_is_a_line_in_the_batch_clipped_at_0():
    profile = make_profile(serving_step_s=0.02, serving_token_s=0.005)
    assert profile.overhead_s(1) == pytest.approx(0.025) and profile.overhead_s(16) == pytest.approx(0.1)
    assert profile.served_step_s(16, 100) == pytest.approx(0.1 + 0.1)
    assert profile.served_step_s(0, 100) == 0.0 and profile.overhead_s(0) == pytest.approx(0.02)
    falling = make_profile(serving_step_s=0.03, serving_token_s=-0.01)  # a fit that falls with the batch
    assert falling.overhead_s(2) == pytest.approx(0.01) and falling.overhead_s(5) == 0.0
    with pytest.raises(ProfileError, match="serving_token_s must be a finite"):
        make_profile(serving_token_s=float("nan"))


def test_an_older_profile_loads_with_no_serving_overhead(tmp_path):
    """Profiles written before the serving overhead have no serving_* keys: a = c = 0, the step as measured."""
    data = make_profile(serving_step_s=0.02, serving_token_s=0.005).to_json()
    assert (data["serving_step_s"], data["serving_token_s"]) == (0.02, 0.005)
    del data["serving_step_s"], data["serving_token_s"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = Profile.load(tmp_path / "old.json")
    assert (old.serving_step_s, old.serving_token_s, old.overhead_s(16)) == (0.0, 0.0, 0.0)
    assert old.served_step_s(16, 100) == old.step_s(16, 100) == pytest.approx(0.1)
    measured = make_profile(serving_step_s=0.02, serving_token_s=0.005)
    assert Profile.load(write(tmp_path, measured)) == measured


def test_fit_overhead():
    assert fit_overhead([(1, 0.015), (8, 0.050)]) == (pytest.approx(0.010), pytest.approx(0.005))  # through both
    assert fit_overhead([(4, 0.02)]) == (pytest.approx(0.02), 0.0)  # one batch: no slope
    # least squares: b - mean = (-10, -1, 11) / 3, o - mean = (-0.05, 0.01, 0.04) / 3: c = 0.93 / 222
    a, c = fit_overhead([(1, 0.01), (4, 0.03), (8, 0.04)])
    assert (a, c) == (pytest.approx(0.08 / 3 - 0.93 / 222 * 13 / 3), pytest.approx(0.93 / 222))
    with pytest.raises(ValueError):
        fit_overhead([])


# --- the formula and the memory minimums ----------------------------------------------------------------

def test_formula_against_a_hand_computed_case():
    """The paper's own worked example is not available here (no copy of the paper's text could be
    read in this environment), so this case is computed by hand: D = 8, N = 100, t = 0.05 s,
    Y = 2 s, m = 1.25 -> D·N·t = 40, m·Y + N·t = 2.5 + 5 = 7.5, D_t = ceil(5.333) = 6, D_p = 2.
    The formula is the one the authors' planner computes (msr-fiddle/dejavu scripts/planner.py:
    dt = ceil(A / B), A = D·N·t, B = m·Y + N·t)."""
    assert token_machines(8, 100, 0.05, 1.25, 2.0) == pytest.approx(16 / 3)
    profile = make_profile(prefill=(Sample(1, 100, 2.0),), decode=(Sample(1, 100, 0.05),), memory_bytes=100 * GB)
    result = plan(profile, Workload(prompt_tokens=100, output_tokens=100, batch=1), machines=8)
    assert (result.Y_s, result.t_s, result.m) == (pytest.approx(2.0), pytest.approx(0.05), 1.25)
    assert (result.D_t_exact, result.D_t, result.D_p) == (pytest.approx(16 / 3), 6, 2)
    assert (result.prompt_services, result.token_services, result.stages) == (2, 6, 1)
    assert "decode-bound" in result.bottleneck and "6 of 8 machines decode" in result.bottleneck


def test_formula_t_includes_the_serving_overhead():
    """Y = 2 s; t = the step's forward 0.04 s + the serving overhead 0.002 + 0.001·b at b = 8 (0.01 s)
    = 0.05 s: the hand-computed case above again, D_t = ceil(5.333) = 6."""
    profile = make_profile(prefill=(Sample(8, 100, 2.0),), decode=(Sample(8, 150, 0.04),), memory_bytes=100 * GB,
                           serving_step_s=0.002, serving_token_s=0.001)
    result = plan(profile, Workload(prompt_tokens=100, output_tokens=100, batch=8), machines=8)
    assert (result.step_s, result.overhead_s, result.t_s) == (pytest.approx(0.04), pytest.approx(0.01), pytest.approx(0.05))
    assert (result.D_t_exact, result.D_t, result.D_p) == (pytest.approx(16 / 3), 6, 2)
    assert "step_s (the forward) + overhead_s" in result.to_json()["t"]


def test_formula_is_clamped_to_one_machine_a_side():
    profile = make_profile(prefill=(Sample(1, 100, 100.0),), decode=(Sample(1, 100, 0.001),), memory_bytes=100 * GB)
    result = plan(profile, Workload(100, 10, batch=1), machines=4)  # D_t = 4·0.01/(125+0.01): ceil -> 1
    assert (result.prompt_services, result.token_services) == (3, 1)
    assert "prefill-bound" in result.bottleneck
    heavy = make_profile(prefill=(Sample(1, 100, 0.001),), decode=(Sample(1, 100, 1.0),), memory_bytes=100 * GB)
    result = plan(heavy, Workload(100, 1000, batch=1), machines=4)  # D_t -> 4: clamped to D - 1
    assert (result.prompt_services, result.token_services, result.D_t) == (1, 3, 3)
    assert "the formula asks 4" in result.bottleneck


def test_stages_needed():
    assert stages_needed(10, 1 * GB, 16 * GB) == 1
    assert stages_needed(10, 2.76 * GB, 16 * GB) == 2   # 5 layers x 2.76 = 13.8 GB fit, 10 x do not
    assert stages_needed(10, 1.02 * GB, 4 * GB) == 4    # ceil(10 / 4) = 3 layers x 1.02
    assert stages_needed(10, 5 * GB, 4 * GB) is None


def test_memory_sets_the_token_stages():
    """Layers of 1 GB of weights and 0.1 MB of KV a token: a prompt service needs 10 x (1 + 16·100·0.0001)
    = 11.6 GB (fits 16 GB), a token service 10 x (1 + 16·1100·0.0001) = 27.6 GB: 2 stages of 13.8."""
    profile = make_profile(decode=(Sample(1, 100, 0.02),))
    result = plan(profile, Workload(prompt_tokens=100, output_tokens=1000, batch=16), machines=9)
    assert (result.min_prompt_stages, result.min_token_stages, result.stages) == (1, 2, 2)
    assert result.D_t % 2 == 0 and result.token_services == result.D_t // 2
    assert result.prompt_services + result.token_services * 2 == 9
    assert "--stages 2" in " ".join(result.up_flags(profile))


def test_memory_refusals():
    with pytest.raises(PlanError, match="prompt service holds the whole model"):
        plan(make_profile(memory_bytes=8 * GB), Workload(100, 100, batch=2), machines=4)
    with pytest.raises(PlanError, match="lower --batch"):
        plan(make_profile(memory_bytes=12 * GB), Workload(100, 100_000, batch=16), machines=4)
    with pytest.raises(PlanError, match="3 at least"):
        plan(make_profile(decode=(Sample(1, 100, 0.02),)), Workload(100, 1000, batch=16), machines=2)


def test_one_machine_is_colocated():
    result = plan(make_profile(), Workload(100, 100, batch=1), machines=1)
    assert result.colocated and (result.prompt_services, result.token_services) == (0, 1)
    assert "--colocated" in result.up_flags(make_profile())


def test_sla_mode_finds_the_fewest_services():
    """Prefill 1 s a prompt (x m = 1.25), decode 0.1 s a step at any batch. The first guess: a
    prompt service meets TTFT 3 s with batches of 2 (2.5 s), 0.8 prompts/s: 2 for 1 req/s; a token
    service decodes 16 sequences 10 steps/s, 17.8 requests of 10 tokens/s: 1. The simulator then
    adds prompt services while queueing keeps TTFT p90 over 3 s."""
    profile = make_profile(memory_bytes=100 * GB)
    work = Workload(100, 10, batch=16, rate=1.0)
    result = plan_sla(profile, work, Sla(ttft_s=3.0, tpot_s=0.15))
    assert (result.mode, result.prompt_services, result.token_services) == ("sla", 3, 1)
    assert result.predicted["ttft_s"]["p90"] <= 3.0 and result.predicted["tpot_s"]["p90"] <= 0.15
    one_fewer = simulate(profile, Layout(2, 1), poisson(200, 1.0, 100, output_tokens=10))
    assert one_fewer["ttft_s"]["p90"] > 3.0  # the fewest: 2 prompt services miss it
    assert plan_sla(profile, work, Sla(ttft_s=30.0, tpot_s=0.15)).prompt_services == 2
    with pytest.raises(PlanError, match="one sequence alone"):
        plan_sla(profile, Workload(100, 10, rate=1.0), Sla(ttft_s=3.0, tpot_s=0.05))
    with pytest.raises(PlanError, match="up to 2 machines"):
        plan_sla(profile, Workload(100, 10, rate=5.0), Sla(ttft_s=1.3, tpot_s=0.15), max_machines=2)


# --- the CLI ------------------------------------------------------------------------------------------

def test_plan_json_has_the_terms(tmp_path, capsys):
    path = write(tmp_path, make_profile(prefill=(Sample(1, 100, 2.0),), decode=(Sample(1, 100, 0.05),),
                                        memory_bytes=100 * GB))
    code, out, _ = run_cli(capsys, "plan", "--profile", path, "--machines", "8", "--prompt-tokens", "100",
                           "--output-tokens", "100", "--batch", "1", "--json")
    assert code == 0
    got = json.loads(out)
    assert (got["prompt_services"], got["token_services"]) == (2, 6)
    assert (got["Y_s"], got["t_s"], got["m"], got["D"], got["N"]) == (pytest.approx(2.0), pytest.approx(0.05), 1.25, 8, 100)
    assert (got["step_s"], got["overhead_s"]) == (pytest.approx(0.05), 0.0) and "overhead_s" in got["t"]
    assert got["up_flags"] == "--model smollm2 --dtype float32 --prompt-services 2 --token-services 6 --max-seqs 1"


def test_plan_prints_flags_and_writes_a_compose_override(tmp_path, capsys):
    path, override = write(tmp_path, make_profile(memory_bytes=100 * GB)), tmp_path / "plan.yaml"
    code, out, _ = run_cli(capsys, "plan", "--profile", path, "--machines", "6", "--prompt-tokens", "100",
                           "--output-tokens", "50", "--rate", "0.5", "--write-compose", str(override))
    assert code == 0 and "why: The workload is" in out and "predicted at 0.5 req/s" in out
    assert "dejavu up --model smollm2 --dtype float32 --prompt-services" in out
    code, flags, _ = run_cli(capsys, "plan", "--profile", path, "--machines", "6", "--prompt-tokens", "100",
                             "--output-tokens", "50", "--write-up-flags")
    assert flags.startswith("--model smollm2") and len(flags.splitlines()) == 1
    up = _up_parser_accepts(flags.split())
    assert up.prompt_services + up.token_services == 6
    text = override.read_text()
    assert f"scale: {up.prompt_services}" in text and f"scale: {up.token_services}" in text
    _compose_validates(override)


def _up_parser_accepts(flags: list[str]):
    """`dejavu up`'s own parser takes every flag the plan writes (parsed only, nothing started)."""
    import argparse
    from unittest import mock

    seen = {}
    with mock.patch("dejavu.cli.cmd_up", side_effect=lambda args, parser: seen.setdefault("args", args) and 0):
        with pytest.raises(SystemExit):
            main(["up", *flags])
    assert isinstance(seen["args"], argparse.Namespace)
    return seen["args"]


def _compose_validates(override) -> None:
    """The real Compose binary takes compose.yaml with the override (tests/unit/test_compose.py's helper)."""
    from tests.unit.test_compose import compose

    result = compose("-f", str(override), "config", "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--machines", "0"], "--machines: must be an integer >= 1, not '0'"),
    (["--machines", "4", "--rate", "-1"], "--rate: must be a number > 0"),
    (["--machines", "4", "--ttft-s", "1"], "needs both --ttft-s and --tpot-s"),
    (["--ttft-s", "1", "--tpot-s", "0.1"], "needs --rate"),
    ([], "--machines is required"),
])
def test_plan_bad_values_are_argparse_errors(tmp_path, capsys, argv, message):
    path = write(tmp_path, make_profile())
    code, _, err = run_cli(capsys, "plan", "--profile", path, "--prompt-tokens", "100", "--output-tokens", "10", *argv)
    assert code == 2 and message in err


def test_plan_names_a_missing_or_malformed_profile(tmp_path, capsys):
    code, _, err = run_cli(capsys, "plan", "--profile", str(tmp_path / "none.json"), "--machines", "2",
                           "--prompt-tokens", "100", "--output-tokens", "10")
    assert code == 2 and "none.json: no such file" in err
    (tmp_path / "bad.json").write_text("[1, 2")
    code, _, err = run_cli(capsys, "plan", "--profile", str(tmp_path / "bad.json"), "--machines", "2",
                           "--prompt-tokens", "100", "--output-tokens", "10")
    assert code == 2 and "bad.json: not JSON" in err


def test_plan_refusal_exits_1_with_the_reason(tmp_path, capsys):
    path = write(tmp_path, make_profile(memory_bytes=8 * GB))
    code, _, err = run_cli(capsys, "plan", "--profile", path, "--machines", "4", "--prompt-tokens", "100",
                           "--output-tokens", "10", "--batch", "2")
    assert code == 1 and "prompt services have no stages" in err


def test_help_answers(capsys):
    for command in ("plan", "simulate", "profile"):
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0 and ("--profile" in out if command != "profile" else "--quick" in out)


def test_the_planner_imports_no_torch():
    code = ("import sys, planner.plan, planner.simulate, planner.validate, planner.plot, dejavu.cli; "
            "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
