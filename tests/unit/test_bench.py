"""The benchmarks keep working: each runs end to end on a small size and writes its headline
figures. (What they measure is not checked here: they are benchmarks, not tests.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.common import percentile, spread


def test_percentile_and_spread():
    assert percentile([3, 1, 2, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    assert percentile(list(range(101)), 95) == 95
    assert spread([3, 1, 2]) == {"median": 2, "min": 1, "max": 3}


def test_dejavu_bench_kv_writes_its_summary_and_plot(tmp_path):
    out = tmp_path / "kv.json"
    run = subprocess.run([sys.executable, "-m", "dejavu", "bench", "kv", "--transports", "tcp+ring,ucx-shm", "--sizes-mib", "1",
                          "--repeats", "1", "--tokens", "16", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["default_transport"] == "ucx+ring"
    assert summary["fraction_of_memcpy_tcp_ring_1mib"] > 0 and summary["buffered_speedup"] > 0
    assert summary["small_frame_rtt_ms_tcp_ring"] > 0 and summary["small_frame_rtt_ms_ucx_shm"] > 0
    assert "ms a round trip" in run.stdout
    assert (tmp_path / "kv-throughput.png").stat().st_size > 0
    assert "naive/buffered" in run.stdout


def test_dejavu_bench_lists_the_benchmarks():
    run = subprocess.run([sys.executable, "-m", "dejavu", "bench", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    for name in ("kv", "stream", "load", "failure"):
        assert f"{name}:" in run.stdout


@pytest.mark.full  # ~25 s: the scripts end to end; tests/cluster/test_pipeline.py covers what they drive
def test_dejavu_bench_pipeline_runs_its_layouts(tmp_path, tiny_model_path):
    out = tmp_path / "pipeline.json"
    run = subprocess.run([sys.executable, "-m", "dejavu", "bench", "pipeline", "--model", str(tiny_model_path),
                          "--layouts", "1-stage,2-stage", "--repeats", "1", "--concurrency", "4",
                          "--prompt-tokens", "8", "--new-tokens", "8", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["ratio_1_stage"] == 1 and summary["tokens_per_s_2_stage"] > 0
    assert len(summary["stage_busy_2_stage"]) == 2  # the head and stage 1


@pytest.mark.full  # ~25 s: the scripts end to end; tests/cluster/test_pipeline.py covers what they drive
def test_dejavu_bench_swap_runs_both_layouts(tmp_path, tiny_model_path):
    """With swapping, more sequences run at once than the device budget holds without it."""
    out = tmp_path / "swap.json"
    run = subprocess.run([sys.executable, "-m", "dejavu", "bench", "swap", "--model", str(tiny_model_path),
                          "--repeats", "1", "--device-seqs", "2", "--microbatches", "3", "--prompt-tokens", "8",
                          "--new-tokens", "24", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["tokens_per_s_swap"] > 0 and summary["ratio_no_swap"] == 1
    assert summary["largest_batch_no_swap"] <= 2 < summary["largest_batch_swap"] <= 3
    assert summary["swapped_bytes_per_token_no_swap"] == 0 < summary["swapped_bytes_per_token_swap"]
