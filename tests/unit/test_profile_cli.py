"""`dejavu profile --quick` with the real engine on the tiny test model: a profile the planner reads
back, with sane positive numbers."""

from __future__ import annotations

import pytest

from dejavu.cli import main
from planner.profile import Profile


@pytest.mark.parametrize("stages", [1, 3])
def test_profile_quick_on_the_tiny_model(tiny_model_path, tmp_path, capsys, stages):
    out = tmp_path / "profile.json"
    with pytest.raises(SystemExit) as stop:
        main(["profile", "--model", str(tiny_model_path), "--quick", "--threads", "1", "--stages", str(stages),
              "--out", str(out)])
    assert stop.value.code == 0
    progress = capsys.readouterr().err
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


def test_profile_refuses_a_bad_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["profile", "--model", str(tmp_path / "nothing"), "--quick", "--out", str(tmp_path / "p.json")])
    assert stop.value.code == 2 and "not 'smollm2' and not a folder with a config.json" in capsys.readouterr().err
