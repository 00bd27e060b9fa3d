"""The requests a simulation replays: when each arrives, its prompt length and its output length.

Three sources:
- `poisson`: bench.load's own draws, by calling bench.load's functions (torch-free): exponential
  gaps of mean 1/rate, the first at 0, and chat-like output lengths (a log-normal with LMSYS-Chat-1M's
  mean response length, clipped, then scaled). Same seed, same requests as bench.load sends;
- `load_trace`: a JSON file, a list of {"arrival_s", "prompt_tokens", "output_tokens"} (or an object
  holding that list under "requests");
- `bench_load_traces`: the exact requests of a bench.load JSON (its config records every arrival
  and output length), per open-loop rate, for the closed loop and for a request alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from bench.load import arrivals, output_lengths  # bench.load imports no torch: its draws, not a copy
from bench.targets import CONCURRENT  # bench.load's closed loop: this many requests at once


class TraceError(ValueError):
    """A trace file that is missing or malformed; the message names the file."""


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float     # since the trace's start
    prompt_tokens: int
    output_tokens: int   # tokens the request gets, the prefill's first one included (>= 1)


def chat_lengths(n: int, seed: int = 0, max_output_tokens: int = 1024, scale: float = 0.25) -> list[int]:
    """n output lengths drawn exactly as bench.load draws them (--output-scale, --max-output-tokens)."""
    return output_lengths(SimpleNamespace(seed=seed, requests=n, max_output_tokens=max_output_tokens,
                                          output_scale=scale))


def poisson(n: int, rate: float, prompt_tokens: int, seed: int = 0, max_output_tokens: int = 1024,
            scale: float = 0.25, output_tokens: int | None = None) -> list[TraceRequest]:
    """bench.load's open loop at `rate` req/s: its arrivals and lengths for this seed (every
    request `output_tokens` long instead, when given)."""
    times = arrivals(SimpleNamespace(seed=seed, requests=n), rate)
    lengths = [output_tokens] * n if output_tokens else chat_lengths(n, seed, max_output_tokens, scale)
    return [TraceRequest(t, prompt_tokens, n_out) for t, n_out in zip(times, lengths)]


def burst(n: int, prompt_tokens: int, output_tokens: int) -> list[TraceRequest]:
    """n requests at once (bench.load's closed loop: 16 concurrent)."""
    return [TraceRequest(0.0, prompt_tokens, output_tokens) for _ in range(n)]


def load_trace(path: str | Path) -> list[TraceRequest]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceError(f"{path}: cannot read it as JSON: {exc}") from None
    rows = data.get("requests") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows:
        raise TraceError(f"{path}: expected a non-empty list of {{\"arrival_s\", \"prompt_tokens\", "
                         f"\"output_tokens\"}} (or an object with it under \"requests\")")
    try:
        trace = [TraceRequest(float(r["arrival_s"]), int(r["prompt_tokens"]), int(r["output_tokens"])) for r in rows]
    except (KeyError, TypeError, ValueError) as exc:
        raise TraceError(f"{path}: a request is malformed ({type(exc).__name__}: {exc})") from None
    if any(r.arrival_s < 0 or r.prompt_tokens < 1 or r.output_tokens < 1 for r in trace):
        raise TraceError(f"{path}: arrival_s must be >= 0, prompt_tokens and output_tokens >= 1")
    return sorted(trace, key=lambda r: r.arrival_s)


def bench_load_traces(data: dict) -> dict[str, list[TraceRequest]]:
    """The requests of a bench.load JSON: {"rate R": ..., "concurrent": ..., "single": ...} (the
    closed loop, once: it ran --repeats times, each a burst of 16 fresh prompts; single: one request
    alone on an idle server, as bench.load sends --single of them one after another)."""
    config = data.get("config") or {}
    try:
        prompt, lengths = int(config["prompt_tokens"]), [int(n) for n in config["output_lengths"]["sampled"]]
        traces = {f"rate {rate}": [TraceRequest(float(t), prompt, n) for t, n in zip(times, lengths)]
                  for rate, times in config.get("arrivals_s", {}).items()}
        if config.get("repeats", 0) > 0:
            traces["concurrent"] = burst(int(config.get("concurrent", CONCURRENT)), prompt,
                                         int(config["concurrent_output_tokens"]))
        if config.get("single", 0) > 0:
            traces["single"] = burst(1, prompt, int(config["concurrent_output_tokens"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise TraceError(f"not a bench.load JSON: its config lacks {exc}") from None
    return traces
