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


def test_the_device_model_keeps_the_carried_tokenizer_and_takes_the_like_architecture(tiny_model_path, tmp_path):
    """A device is sent the tokenizer alone (scripts/gpu_bundle.sh) and writes the weights itself
    (scripts/gpu_device_run.sh): the tokenizer files there must be kept, not looked up in a bundled
    model the device does not have, and --like must give that config's architecture."""
    folder = tmp_path / "device-model"
    folder.mkdir()
    tokenizer = (tiny_model_path / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_bytes(tokenizer)
    like = json.loads((tiny_model_path / "config.json").read_text())
    like.update(num_hidden_layers=5, hidden_size=96, max_position_embeddings=4096)
    (tmp_path / "like.json").write_text(json.dumps(like))
    (tmp_path / "a-file").write_text("")  # as the cache folder: a lookup of the bundled model would fail
    env = {**os.environ, "DEJAVU_CACHE_DIR": str(tmp_path / "a-file")}
    run = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--save-tiny-model", str(folder),
                          "--like", str(tmp_path / "like.json")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (folder / "tokenizer.json").read_bytes() == tokenizer
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["max_position_embeddings"]) == (5, 96, 2048)
    assert (folder / "model.safetensors").stat().st_size > 0
