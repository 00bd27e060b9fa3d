"""A profile: what one machine measured for one model, the input of `plan` and `simulate`.

`dejavu profile` (bench/profile.py) measures it with the real engine and writes it as JSON; here
it is read back and answers two questions by interpolation:

    profile = Profile.load("profile.json")
    profile.prefill_s(batch=4, prompt_len=500)   # one prefill forward of 4 prompts of 500 tokens
    profile.step_s(batch=16, kv_len=600)         # one decode step of 16 sequences, 600 KV tokens each
    profile.served_step_s(batch=16, kv_len=600)  # the same step as a token service serves it

Both are piecewise linear over the measured grid (every batch size at every length), exact at
every sample:

- prefill: seconds *per prompt token*, bilinear over (batch, prompt length), times the tokens.
  Past the largest batch the per-token cost stays the largest batch's (the matrix products are as
  efficient as they get); past the longest prompt it grows along the last segment (attention
  grows with the length), never shrinking; below the smallest sample it stays the smallest's. A
  profile with a single sample therefore scales prefill time in proportion to prompt tokens.
- decode: *step* seconds, bilinear over (batch, KV length); past the largest batch or KV length
  it extends along the last segment (each further sequence or KV token costs what the last one
  did), never below the edge value; below the smallest it stays the smallest's. A profile with
  one KV length measured ignores the KV length.

m, the KV streaming overhead, is a factor >= 1: the prompt time with the KV streamed out layer by
layer over the prompt time without (the paper's m in D_t = D·N·t / (m·Y + N·t)).

The serving overhead: what a decode step costs a token service beyond its forward (scheduling,
sampling, the decode stream's events, the gateway's SSE and detokenization, replication to a
cache store, event loops and HTTP, the other processes on the host's cores), as a line in the
batch b: overhead_s(b) = max(0, a + c·b) seconds a step, a = `serving_step_s`, c =
`serving_token_s`. `dejavu profile` measures it through a real local cluster (the time per output
token a client sees, less the in-process step at the same batch and KV length) and fits the line
by least squares; a profile without it (older ones) has a = c = 0.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "dejavu-profile/1"


class ProfileError(ValueError):
    """A profile file that is missing, not JSON, or not a profile; the message names the file."""


@dataclass(frozen=True)
class Sample:
    batch: int      # sequences in the forward (prefill: prompts)
    tokens: int     # prefill: prompt length; decode: KV length of each sequence
    seconds: float  # median time of one forward


@dataclass(frozen=True)
class Profile:
    model: str                  # what `dejavu up --model` takes: "smollm2" or a folder
    dtype: str                  # "float32", "bfloat16", ...
    stages: int                 # pipeline stages of the token service measured (decode steps)
    cpu: str                    # the processor's model name (and the GPU's, if one was used)
    block_size: int             # tokens per block of the paged KV pool
    layers: int                 # decoder layers of the model
    kv_bytes_per_token: int     # K and V of every layer
    weights_bytes: int          # every parameter, once
    memory_bytes: int           # of the machine measured (device memory on a GPU, RAM on a CPU)
    m: float                    # KV streaming overhead factor, >= 1
    prefill: tuple[Sample, ...]  # grid over (batch, prompt length)
    decode: tuple[Sample, ...]   # grid over (batch, KV length)
    serving_step_s: float = 0.0  # a: a decode step's serving work outside its forward, s a step
    serving_token_s: float = 0.0  # c: and per sequence in the step (one token out each), s
    meta: dict = field(default_factory=dict, compare=False, hash=False)  # when, where, how, source

    def __post_init__(self) -> None:
        for name in ("stages", "block_size", "layers", "kv_bytes_per_token", "weights_bytes", "memory_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ProfileError(f"{name} must be a positive integer, not {getattr(self, name)!r}")
        if not self.m >= 1.0:
            raise ProfileError(f"m must be >= 1 (streaming cannot speed the prefill up), not {self.m!r}")
        for name in ("serving_step_s", "serving_token_s"):
            if not math.isfinite(getattr(self, name)):
                raise ProfileError(f"{name} must be a finite number of seconds, not {getattr(self, name)!r}")
        object.__setattr__(self, "_prefill", _Grid.of(self.prefill, "prefill", per_token=True))
        object.__setattr__(self, "_decode", _Grid.of(self.decode, "decode", per_token=False))

    def prefill_s(self, batch: int, prompt_len: float) -> float:
        """Seconds of one prefill forward of `batch` prompts of `prompt_len` tokens each (no streaming)."""
        if batch < 1 or prompt_len <= 0:
            return 0.0
        return batch * prompt_len * self._prefill.value(batch, prompt_len, beyond_batch="hold")

    def step_s(self, batch: int, kv_len: float) -> float:
        """Seconds of one decode step of `batch` sequences with `kv_len` tokens of KV each."""
        if batch < 1:
            return 0.0
        return self._decode.value(batch, kv_len, beyond_batch="extend")

    def overhead_s(self, batch: int) -> float:
        """Seconds a token service's step of `batch` decoding sequences spends outside its forward."""
        return max(0.0, self.serving_step_s + self.serving_token_s * batch)

    def served_step_s(self, batch: int, kv_len: float) -> float:
        """One decode step as a token service serves it: the forward and the serving overhead."""
        return self.step_s(batch, kv_len) + self.overhead_s(batch) if batch >= 1 else 0.0

    @property
    def weights_per_layer(self) -> float:  # bytes; the embeddings and LM head spread over the layers
        return self.weights_bytes / self.layers

    @property
    def kv_bytes_per_token_per_layer(self) -> float:
        return self.kv_bytes_per_token / self.layers

    # --- JSON -----------------------------------------------------------------------------------

    def to_json(self) -> dict:
        out = {"format": FORMAT, **{k: v for k, v in asdict(self).items() if k not in ("prefill", "decode", "meta")}}
        out["prefill"] = [{"batch": s.batch, "prompt_len": s.tokens, "seconds": s.seconds} for s in self.prefill]
        out["decode"] = [{"batch": s.batch, "kv_len": s.tokens, "seconds": s.seconds} for s in self.decode]
        return {**out, "meta": self.meta}

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, data: dict) -> Profile:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"not a profile: no \"format\": \"{FORMAT}\" at the top")
        try:
            scalars = {k: data[k] for k in ("model", "dtype", "cpu")}
            scalars.update({k: int(data[k]) for k in ("stages", "block_size", "layers", "kv_bytes_per_token",
                                                       "weights_bytes", "memory_bytes")})
            prefill = tuple(Sample(int(s["batch"]), int(s["prompt_len"]), float(s["seconds"])) for s in data["prefill"])
            decode = tuple(Sample(int(s["batch"]), int(s["kv_len"]), float(s["seconds"])) for s in data["decode"])
            m = float(data["m"])
            serving = {k: float(data.get(k, 0.0)) for k in ("serving_step_s", "serving_token_s")}  # older: none
        except KeyError as exc:
            raise ProfileError(f"missing key {exc}") from None
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"a value is malformed: {type(exc).__name__}: {exc}") from None
        return cls(**scalars, m=m, prefill=prefill, decode=decode, **serving, meta=data.get("meta") or {})

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Raises ProfileError naming `path` when it is missing, not JSON, or not a valid profile."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ProfileError(f"{path}: no such file (write one with `dejavu profile --out {path}`)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(f"{path}: cannot read it: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{path}: not JSON ({exc})") from None
        try:
            return cls.from_json(data)
        except ProfileError as exc:
            raise ProfileError(f"{path}: {exc}") from None


def fit_overhead(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(a, c) of the line a + c·b through (batch b, overhead s) points, by least squares; one
    batch (or one point) gives c = 0. The caller clips nothing: overhead_s clips at use."""
    if not points:
        raise ValueError("no serving points to fit")
    n = len(points)
    mean_b, mean_o = sum(b for b, _ in points) / n, sum(o for _, o in points) / n
    spread = sum((b - mean_b) ** 2 for b, _ in points)
    c = sum((b - mean_b) * (o - mean_o) for b, o in points) / spread if spread else 0.0
    return mean_o - c * mean_b, c


@dataclass(frozen=True)
class _Grid:
    """Values at every (batch, tokens) pair of two sorted axes; see the module docstring."""

    batches: list[int]
    tokens: list[int]
    rows: list[list[float]]  # rows[i][j]: at batches[i], tokens[j]

    @classmethod
    def of(cls, samples: tuple[Sample, ...], what: str, per_token: bool) -> _Grid:
        if not samples:
            raise ProfileError(f"{what}: no samples")
        cells = {}
        for s in samples:
            if s.batch < 1 or s.tokens < 1 or not s.seconds > 0:
                raise ProfileError(f"{what}: batch and tokens must be >= 1 and seconds > 0: {s}")
            if (s.batch, s.tokens) in cells:
                raise ProfileError(f"{what}: batch {s.batch} x {s.tokens} tokens appears twice")
            cells[s.batch, s.tokens] = s.seconds / (s.batch * s.tokens) if per_token else s.seconds
        batches, tokens = sorted({b for b, _ in cells}), sorted({t for _, t in cells})
        if missing := [(b, t) for b in batches for t in tokens if (b, t) not in cells]:
            raise ProfileError(f"{what}: the samples must form a grid (every batch at every length); "
                               f"missing (batch, tokens) {missing[:4]}")
        return cls(batches, tokens, [[cells[b, t] for t in tokens] for b in batches])

    def value(self, batch: float, tokens: float, beyond_batch: str) -> float:
        column = [_interp(self.tokens, row, tokens, "extend") for row in self.rows]
        return _interp(self.batches, column, batch, beyond_batch)


def _interp(xs: list[int], ys: list[float], x: float, beyond: str) -> float:
    """Piecewise linear through (xs, ys), xs ascending: below xs[0], ys[0]; past xs[-1], ys[-1]
    ("hold") or along the last segment and never below ys[-1] ("extend")."""
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        if beyond == "hold":
            return ys[-1]
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return max(ys[-1], ys[-1] + slope * (x - xs[-1]))
    i = bisect.bisect_right(xs, x) - 1
    w = (x - xs[i]) / (xs[i + 1] - xs[i])
    return ys[i] + w * (ys[i + 1] - ys[i])
