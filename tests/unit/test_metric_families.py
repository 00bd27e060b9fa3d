"""Each service's /metrics carries its own families: a prompt service used to register every
dejavu_token_* and dejavu_swap_* series (at zero) because its pipeline stages imported the token
engine's and the swap pool's modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def families(module: str) -> set[str]:
    """The dejavu_* metric families registered by importing `module`, in a fresh interpreter."""
    code = (f"import json, {module}\nfrom prometheus_client import REGISTRY\n"
            "print(json.dumps(sorted({m.name for m in REGISTRY.collect() if m.name.startswith('dejavu_')})))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return set(json.loads(run.stdout.strip().splitlines()[-1]))


def test_a_prompt_service_registers_its_own_metric_families_and_not_another_kinds():
    names = families("prompt_service.app")  # ~9 s: torch and transformers, imported afresh
    assert any(n.startswith("dejavu_prompt_") for n in names), names
    assert not [n for n in names if n.startswith(("dejavu_token_", "dejavu_swap_", "dejavu_gateway_", "dejavu_cache_store_"))], names
