"""CPU placement: which cores, and how many torch threads, each engine process gets on a CPU host.

Without it, every engine (prompt and token services) runs torch with its default thread count, one
OpenMP team per process over all the cores: on a 2-core host a prefill and a decode then fight for
the same two cores, each team's threads spinning at barriers while the other team holds a core.
Two ways out, for E engines and C usable cores:

  split:  each engine is pinned to a contiguous, disjoint slice of the cores, sizes differing by at
          most one; the spare cores go to token services first (decode is latency-bound), then to
          prompt services. A single engine (e.g. --colocated with one token service) gets them all.
          E > C: nothing is pinned (a slice would be less than a core); each engine runs one
          thread: E threads share C cores, instead of E teams of C threads each.
  turns:  every engine runs C threads, and they take turns on the cores, one forward at a time
          (engine/turns.py): a prefill gets every core while no decode step runs, and the other
          way round, as in one colocated process. Decode steps wait behind prefills (worse time
          per token under load), but no core idles while the other engine has work.
  auto:   turns when a split would leave an engine fewer than TURNS_BELOW cores, else split; one
          engine alone is simply given every core. Measured on a 2-core VM (docs/BENCHMARKS.md §5),
          1 prompt + 1 token service, 16 concurrent 500-token prompts, same run: turns 1.27x
          split's tokens/s in float32 and 1.18x in bf16, a lone prompt's TTFT 0.65x; the time per
          token at 16 is worse (138 against 91 ms p50, float32). The threshold of 4 is a
          judgment, not a measurement: bigger hosts were not available.

`plan` is pure (cores, engine counts, mode -> placements); `host_cores` says whether this host gets
a plan at all. The cluster applies a placement when it spawns (or respawns) the engine of that name.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    cores: tuple[int, ...]  # CPU ids the process is pinned to; () = not pinned
    threads: int            # torch intra-op threads (DEJAVU_THREADS)
    turns: bool = False     # takes turns on the cores with the host's other engines (DEJAVU_CPU_TURNS)

    def __post_init__(self) -> None:
        if self.threads < 1 or (self.cores and self.threads != len(self.cores)):
            raise ValueError(f"bad placement: {self}")


MODES = ("auto", "split", "turns")  # and "off", which makes no plan at all
TURNS_BELOW = 4  # auto takes turns when a split would give some engine fewer cores than this


def plan(cores: Sequence[int], prompt_services: int, token_services: int, mode: str = "auto",
         stages: int = 1, prompt_stages: int = 1) -> dict[str, Placement]:
    """Placement per engine name ("prompt-0", ..., "token-0", ...; with stages, each token
    service's stage workers too: "token-0-stage-1", ...); split: prompt services on the lowest cores."""
    if mode not in MODES:
        raise ValueError(f"placement mode {mode!r} is not one of {MODES}")
    names = [name for i in range(prompt_services)
             for name in [f"prompt-{i}"] + [f"prompt-{i}-stage-{k}" for k in range(1, prompt_stages)]] + [
        name for i in range(token_services) for name in [f"token-{i}"] + [f"token-{i}-stage-{k}" for k in range(1, stages)]]
    cores = sorted(cores)
    if not names:
        return {}
    if mode == "auto":
        mode = "turns" if len(names) > 1 and len(cores) < TURNS_BELOW * len(names) else "split"
    if mode == "turns" and len(names) > 1:
        return {name: Placement((), len(cores), turns=True) for name in names}
    if len(names) > len(cores):
        threads = max(1, len(cores) // len(names))
        return {name: Placement((), threads) for name in names}
    base, spare = divmod(len(cores), len(names))
    prompts = prompt_services * prompt_stages
    extra_first = names[prompts:] + names[:prompts]  # token services (stages) take the spare cores first
    sizes = {name: base + (name in extra_first[:spare]) for name in names}
    placements, start = {}, 0
    for name in names:
        placements[name] = Placement(tuple(cores[start:start + sizes[name]]), sizes[name])
        start += sizes[name]
    return placements


def host_cores() -> tuple[list[int], str]:
    """The cores engines may be placed on, or ([], why not). Only Linux can pin (sched_setaffinity).
    A GPU host is left alone: there the engines' work is on the GPU, and pinning the CPU side would
    only slow its launches. We look for the NVIDIA driver's device node or tool instead of asking
    torch, which the launcher does not import (it takes seconds and is the children's business)."""
    if not sys.platform.startswith("linux"):
        return [], f"not on {sys.platform} (needs Linux)"
    if os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi"):
        return [], "a GPU is present"
    return sorted(os.sched_getaffinity(0)), ""


def describe(placements: dict[str, Placement], cores: Sequence[int]) -> str:
    """One line for the start-up message, e.g. "prompt-0 cores 0, token-0 cores 1 (1 thread each)"."""
    if not placements:
        return "no engines"
    threads = {p.threads for p in placements.values()}
    if any(p.turns for p in placements.values()):
        return f"{', '.join(placements)} take turns on cores {_ranges(sorted(cores))} ({_threads(min(threads))} each)"
    if not any(p.cores for p in placements.values()):
        return f"{len(placements)} engines > {len(cores)} cores: none pinned, {_threads(min(threads))} each"
    if len(threads) == 1:
        pinned = ", ".join(f"{name} cores {_ranges(p.cores)}" for name, p in placements.items())
        return f"{pinned} ({_threads(threads.pop())} each)"
    return ", ".join(f"{name} cores {_ranges(p.cores)} ({_threads(p.threads)})" for name, p in placements.items())


def _threads(n: int) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")


def _ranges(cores: Sequence[int]) -> str:
    """(0, 1, 2, 5) -> "0-2,5"."""
    runs: list[list[int]] = []
    for core in cores:
        if runs and core == runs[-1][-1] + 1:
            runs[-1].append(core)
        else:
            runs.append([core])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)
