"""`dejavu profile --quick` with the real engine on the tiny test model: a profile the planner reads
back, with sane positive numbers; the serving measurement's switches and its per-step time (the
measurement itself starts a cluster: not a unit test)."""

from __future__ import annotations

import argparse

import pytest

from bench import profile as measure
from bench import serving_overhead as serving
from dejavu.cli import main
from planner.profile import Profile


@pytest.mark.parametrize("stages", [1, 3])
def test_profile_quick_on_the_tiny_model(tiny_model_path, tmp_path, capsys, stages):
    out = tmp_path / "profile.json"
    with pytest.raises(SystemExit) as stop:
        main(["profile", "--model", str(tiny_model_path), "--quick", "--threads", "1", "--stages", str(stages),
              "--out", str(out)])
    assert stop.value.code == 0
    captured = capsys.readouterr()
    progress = captured.err
    assert "prefill: round 1/1 of 4 points" in progress and "decode: round 2/2 of 4 points" in progress
    assert "wrote" in progress
    profile = Profile.load(out)
    assert (profile.layers, profile.dtype, profile.stages) == (3, "float32", stages)
    assert profile.kv_bytes_per_token == 2 * 3 * 2 * 16 * 4  # K and V x 3 layers x 2 KV heads x head dim 16 x fp32
    assert profile.weights_bytes > 49152 * 64 * 4 and profile.memory_bytes > 2**30
    assert profile.m >= 1.0 and profile.meta["m_ratio"] > 0
    assert {(s.batch, s.tokens) for s in profile.prefill} == {(1, 16), (1, 32), (2, 16), (2, 32)}
    assert {(s.batch, s.tokens) for s in profile.decode} == {(1, 16), (1, 32), (2, 16), (2, 32)}
    assert all(0 < s.seconds < 10 for s in profile.prefill + profile.decode)
    assert profile.prefill_s(2, 32) > 0 and profile.step_s(2, 32) > 0
    assert (profile.serving_step_s, profile.serving_token_s) == (0.0, 0.0)  # --quick: no cluster started
    assert profile.meta["serving"] == {"skipped": "--quick"} and "not measured: --quick" in captured.out


def test_profile_refuses_a_bad_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["profile", "--model", str(tmp_path / "nothing"), "--quick", "--out", str(tmp_path / "p.json")])
    assert stop.value.code == 2 and "not 'smollm2' and not a folder with a config.json" in capsys.readouterr().err


@pytest.mark.parametrize("argv, serving, batches", [
    ([], True, [1, 8]), (["--no-serving"], False, [1, 8]), (["--quick"], False, [1, 2]),
    (["--quick", "--serving"], True, [1, 2]), (["--serving-batches", "4,1,4"], True, [1, 4]),
])
def test_serving_is_on_for_a_full_profile(argv, serving, batches):
    parser = argparse.ArgumentParser()
    measure.add_arguments(parser)
    args = parser.parse_args(argv)
    measure.check(args, parser)
    assert (args.serving, args.serving_batches) == (serving, batches)


def test_steady_step_skips_the_prefills_of_a_burst():
    """Two streams, 10 ms a step when alone, 25 ms a step once both decode: the second's first token
    comes at 0.05 s (its prefill delayed the first's steps); only the window [0.05, 0.15] counts,
    where both decode: 4 gaps each of 25 ms, the first at KV 100 + 2..5, the second at 50 + 0..3."""
    first = serving.Stream([0.0, 0.01, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175], prompt_tokens=100)
    second = serving.Stream([0.05, 0.075, 0.1, 0.125, 0.15], prompt_tokens=50)
    step, kv = serving.steady_step([first, second])
    assert step == pytest.approx(0.025)
    assert kv == pytest.approx((sum(100 + k for k in range(2, 6)) + sum(50 + k for k in range(4))) / 8)
    assert serving.steady_step([first]) == (pytest.approx(0.175 / 7), pytest.approx(100 + 3))
    with pytest.raises(serving.ServingError, match="too short"):
        serving.steady_step([serving.Stream([0.0, 0.01], 10), serving.Stream([0.02, 0.03], 10)])
