"""A planner profile assembled from figures the benchmarks already recorded, for replaying runs
measured before `dejavu profile` existed (`dejavu simulate --against`). Nothing is measured here:
every number comes from the command line or a `bench step` JSON, and the profile says so.

    python scripts/profile_from_bench.py --step docs/bench/step.json --dtype float32 \\
        --prefill 1:500:0.692 --source "..." --out /tmp/profile.json

--step takes the decode samples of a `bench step` JSON (ours, every batch at its one --kv-len, so
the profile's step time ignores the KV length); --decode B:KV:SECONDS and --prefill B:LEN:SECONDS
add samples by hand (one prefill sample: the time scales with the prompt tokens); --serving-step-s
and --serving-token-s give the serving overhead a + c·batch a decode step (default 0: none), e.g.
from a recorded time per token of one request alone less the step's. The model's
constants default to the bundled SmolLM2-135M in float32 (30 layers, K and V 46,080 bytes a
token, 538,090,408 bytes of safetensors) on a 23.5 GiB machine; they matter to `dejavu plan`'s
memory minimums, not to the simulator.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.profile import Profile, Sample  # noqa: E402 - after the path


def sample(text: str) -> Sample:
    try:
        batch, tokens, seconds = text.split(":")
        return Sample(int(batch), int(tokens), float(seconds))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give BATCH:TOKENS:SECONDS, e.g. 1:500:0.692") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", help="a `bench step` JSON: its decode samples (ours) in --dtype")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--decode", type=sample, action="append", default=[], metavar="B:KV:S")
    p.add_argument("--prefill", type=sample, action="append", default=[], metavar="B:LEN:S", required=True)
    p.add_argument("--m", type=float, default=1.0, help="KV streaming overhead factor")
    p.add_argument("--serving-step-s", type=float, default=0.0, help="serving overhead a decode step (a), s")
    p.add_argument("--serving-token-s", type=float, default=0.0, help="and per sequence in the step (c), s")
    p.add_argument("--cpu", default="AMD EPYC (2 vCPUs)")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--kv-bytes-per-token", type=int, default=46080)
    p.add_argument("--weights-bytes", type=int, default=538090408)
    p.add_argument("--memory-gib", type=float, default=23.5)
    p.add_argument("--source", required=True, help="where every number comes from (kept in the profile)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    decode = list(args.decode)
    if args.step:
        data = json.loads(Path(args.step).read_text())
        kv = data["config"]["kv_len"]
        decode += [Sample(r["batch"], kv, r["ours_ms"]["median"] / 1e3) for r in data["results"] if r["dtype"] == args.dtype]
    profile = Profile(model="smollm2", dtype=args.dtype, stages=1, cpu=args.cpu, block_size=16, layers=args.layers,
                      kv_bytes_per_token=args.kv_bytes_per_token, weights_bytes=args.weights_bytes,
                      memory_bytes=int(args.memory_gib * 2**30), m=args.m, prefill=tuple(args.prefill),
                      decode=tuple(decode), serving_step_s=args.serving_step_s, serving_token_s=args.serving_token_s,
                      meta={"how": "scripts/profile_from_bench.py: assembled, not measured", "source": args.source})
    profile.save(args.out)
    print(f"wrote {args.out}: {len(profile.prefill)} prefill and {len(profile.decode)} decode samples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
