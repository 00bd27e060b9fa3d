"""scripts/gpu_check.sh, the check a lent GPU machine runs (issue #9 item 7), end to end on the CPU
(`--allow-cpu`) with the tiny model and TCP: its cluster, a token service killed mid-stream
(greedy and seeded), replication and bench.serve all pass, and its summary says so. No CUDA is
exercised here; what this keeps true is the script itself, so a device's few minutes are not
spent on a script that broke since it last ran."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_passes_on_the_cpu(tiny_model_path, tmp_path):
    out = tmp_path / "out"
    # a session of its own: on a timeout the whole group goes (its cluster too), not the script alone
    proc = subprocess.Popen([str(ROOT / "scripts" / "gpu_check.sh"), "--allow-cpu", "--model", str(tiny_model_path),
                             "--kv-transport", "tcp", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    checks = summary["checks"]
    assert len(checks) >= 8 and all(c["ok"] for c in checks), checks
    names = " | ".join(c["name"] for c in checks)
    for what in ("killed", "seeded", "replication", "bench.serve"):
        assert what in names, names
