"""What every benchmark shares: progress lines, medians with min-max, the machine it ran on, the
JSON file (a top-level "summary" with the headline figures) and PNG plots.

Every script is `python -m bench.NAME [--out FILE.json]`, also `dejavu bench NAME`, with a
`main(argv=None)`. Progress goes to stderr, the table to stdout. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

OUT_DIR = Path("bench/out")  # plots land here when no --out is given (git-ignored)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every benchmark's --help: the description as written (its step-by-step list), and each
    option's default after its help, unless the help says it already or there is none to say (an
    unset value, an off flag, an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "(default" in text or default is argparse.SUPPRESS or default is None
                or default is False or default == "" or default == []):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".strip()


def bench_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The argument parser of `dejavu bench NAME`: `doc` (the module's docstring: what a run does,
    step by step) as its description, the defaults shown."""
    return argparse.ArgumentParser(prog=f"dejavu bench {name}", description=doc, formatter_class=HelpFormatter)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def spread(values: list[float]) -> dict:
    """{"median", "min", "max"} of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(s: dict, digits: int = 1) -> str:
    """A spread as `median [min-max]`."""
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the two nearest ranks; nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def sse_chunks(resp) -> AsyncIterator[dict]:
    """The JSON chunks of an OpenAI streaming answer (an httpx response), up to `data: [DONE]`.
    Raises RuntimeError on an HTTP error status or an error event."""
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:500]}")
    async for line in resp.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(f"stream error: {chunk['error']}")
        yield chunk


def metrics(url: str) -> dict[str, float]:
    """Every sample of a service's Prometheus /metrics, by name with its labels ({} if it does not answer)."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    return {name: float(value) for line in text.splitlines() if line and not line.startswith("#")
            for name, _, value in [line.rpartition(" ")]}


# the vector extensions our kernels and oneDNN choose between (engine/kernels): what a CPU had
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_ne_convert", "amx_bf16",
             "amx_tile")


def machine() -> dict:
    """Where a figure was measured: CPU (its name, and on x86 its family and model, which a VM's
    name alone may not tell apart: "AMD EPYC" is Zen 1 as well as Zen 3, and the ISA flags that
    pick our kernels' paths), cores, memory, versions, commit, date."""
    info = _cpuinfo()
    cpu = info.get("model name", platform.processor() or platform.machine())
    if "cpu family" in info:
        cpu += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    isa = [flag for flag in ISA_FLAGS if flag in info.get("flags", "").split()]
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import torch

    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
            "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "commit": commit,
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (none where there is no such file)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def write_json(path: str, summary: dict, **sections) -> None:
    """{"summary": ..., "machine": ..., **sections} to `path` (nothing when path is empty)."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump({"summary": summary, "machine": machine(), **sections}, fh, indent=2, default=str)
    log(f"wrote {path}")


def plot_path(out: str, bench: str, name: str) -> Path:
    """Where a plot goes: beside --out (kv.json -> kv-NAME.png), else bench/out/BENCH-NAME.png."""
    if out:
        p = Path(out)
        return p.with_name(f"{p.stem}-{name}.png")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    return OUT_DIR / f"{bench}-{name}.png"


def pyplot():
    """matplotlib.pyplot on a file-only backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install matplotlib): no plots")
        return None
    return plt


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    log(f"plot: {path}")


def alternated(clusters: dict, warm_up: Callable, measure: Callable, repeats: int,
               describe: Callable[[dict], str]) -> list[dict]:
    """Every layout's cluster warmed up once, then measured repeat after repeat, the layouts taking
    turns (a noisy minute then spreads over all of them): a run dict each, {"layout", "repeat", ...}."""
    for cluster in clusters.values():
        warm_up(cluster)
    runs = []
    for r in range(1, repeats + 1):
        for name, cluster in clusters.items():
            run = {"layout": name, "repeat": r, **measure(cluster)}
            runs.append(run)
            log(f"repeat {r}/{repeats} {name:<18}: {describe(run)}")
    return runs
