"""Streaming benchmark: what moving the prompt's KV to the token service adds to the time to first
token (DéjàVu, Strati et al. ICML 2024, "prompt processing with KV streaming": <= 2 % there).

What it does, step by step:

1. build, for each prompt length, --repeats + 1 prompts of exactly that many token ids (the model's
   tokenizer; distinct openings, so no two share a prefix);
2. start three clusters side by side, each 1 token service, no cache store (replication is not part
   of the prefill) and nothing else running:
   - "colocated":     the token service prefills itself (`dejavu up --colocated`): no KV transfer;
   - "layerwise":     a prompt service streams the K/V to the token service while the next layers
                      compute, one message per --stream-layers layers (default: a fifth of the
                      model's layers; 1: each layer as soon as it is computed);
   - "after_prefill": a prompt service sends all layers in one message once the last layer is
                      computed (DEJAVU_KV_STREAMING=after_prefill);
   and warm each up with one request per length;
3. each repeat sends, for each length and each cluster in turn (alternating), one streaming greedy
   completion of max_tokens 1: TTFT is the time from sending it to its first text chunk. The
   services' metrics give the forward pass alone (prefill histogram) and, disaggregated, the
   stream tail (last layer computed -> last layer acknowledged);
4. overhead = TTFT / colocated TTFT - 1, per repeat (the two ran back to back), median [min-max]
   over repeats; print the table and the target (layer-by-layer <= 1 %), write JSON and a plot.
   Nothing is asserted: this measures, it does not test.

Progress goes to stderr, the table to stdout. --out FILE.json writes the figures there and the plot
beside it (FILE-ttft.png); without --out, only the plot, as bench/out/stream-ttft.png.
A default run took ~4 min on the 2-vCPU VM of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import json
import time

import httpx

from bench.common import bench_parser, fmt, log, plot_path, pyplot, save, spread, write_json
from bench.failure import metric
from bench.serve import build_prompts
from common.model import load_tokenizer, resolve_model_path
from dejavu.cluster import Cluster

CONFIGS = {  # name -> (prompt services, extra environment)
    "colocated": (0, {"DEJAVU_COLOCATED": "true"}),
    "layerwise": (1, {"DEJAVU_KV_STREAMING": "layerwise"}),
    "after_prefill": (1, {"DEJAVU_KV_STREAMING": "after_prefill"}),
}
TARGET_PCT, PAPER_PCT = 1.0, 2.0


def prefill_metrics(client: httpx.Client, cluster: Cluster) -> dict[str, float]:
    """Cumulative seconds of forward passes and of stream tails on the cluster's model services."""
    if not cluster.of("prompt"):
        return {"forward": metric(client, cluster.of("token")[0].url, "dejavu_token_prefill_seconds_sum"), "tail": 0.0}
    url = cluster.of("prompt")[0].url
    return {"forward": metric(client, url, "dejavu_prompt_prefill_seconds_sum"),
            "tail": metric(client, url, "dejavu_prompt_stream_tail_seconds_sum")}


def ttft(client: httpx.Client, cluster: Cluster, ids: list[int]) -> dict:
    """One streaming completion of one token: TTFT, and the forward and tail the services counted (ms)."""
    before = prefill_metrics(client, cluster)
    body = {"prompt": ids, "max_tokens": 1, "temperature": 0, "ignore_eos": True, "stream": True}
    start, first = time.perf_counter(), None
    with client.stream("POST", cluster.url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {") and first is None:
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(f"stream error: {chunk['error']}")
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    first = time.perf_counter()
    after = prefill_metrics(client, cluster)
    return {"ttft_ms": ((first or time.perf_counter()) - start) * 1e3,
            "forward_ms": (after["forward"] - before["forward"]) * 1e3, "tail_ms": (after["tail"] - before["tail"]) * 1e3}


def run(args, clusters: dict[str, Cluster], prompts: dict[int, list[list[int]]]) -> list[dict]:
    raw = []
    with httpx.Client(timeout=httpx.Timeout(300.0)) as client:
        log("warming up")
        for n, ps in prompts.items():
            for cluster in clusters.values():
                ttft(client, cluster, ps[-1])
        for r in range(args.repeats):
            for n, ps in prompts.items():
                for name, cluster in clusters.items():
                    m = {"repeat": r + 1, "tokens": n, "config": name, **ttft(client, cluster, ps[r])}
                    raw.append(m)
                    log(f"repeat {r + 1}/{args.repeats} {n:>5} tokens {name:<14} TTFT {m['ttft_ms']:7.1f} ms "
                        f"(forward {m['forward_ms']:6.1f}, tail {m['tail_ms']:4.1f})")
    return raw


def summarize(raw: list[dict], lengths: list[int]) -> tuple[dict, list[dict]]:
    rows, summary = [], {}
    for n in lengths:
        base = {m["repeat"]: m["ttft_ms"] for m in raw if m["tokens"] == n and m["config"] == "colocated"}
        for name in CONFIGS:
            ms = [m for m in raw if m["tokens"] == n and m["config"] == name]
            over = [(m["ttft_ms"] / base[m["repeat"]] - 1) * 100 for m in ms]
            row = {"tokens": n, "config": name, "ttft_ms": spread([m["ttft_ms"] for m in ms]),
                   "forward_ms": spread([m["forward_ms"] for m in ms]), "tail_ms": spread([m["tail_ms"] for m in ms]),
                   "overhead_pct": spread(over)}
            rows.append(row)
            summary[f"ttft_ms_{name}_{n}"] = row["ttft_ms"]["median"]
            if name != "colocated":  # the median of paired ratios, and the ratio of the medians
                summary[f"overhead_{name}_pct_{n}"] = row["overhead_pct"]["median"]
                summary[f"overhead_{name}_pct_{n}_of_medians"] = (
                    row["ttft_ms"]["median"] / summary[f"ttft_ms_colocated_{n}"] - 1) * 100
    layerwise = [summary[f"overhead_layerwise_pct_{n}"] for n in lengths]
    summary["target_met"] = max(layerwise) <= TARGET_PCT
    return summary, rows


def print_table(rows: list[dict], summary: dict, args) -> None:
    print(f"\nTTFT of one request alone (max_tokens 1), {args.repeats} alternating repeats; median [min-max]; "
          "overhead: TTFT / colocated TTFT of the same repeat - 1")
    print(f"{'tokens':>6}  {'config':<14}{'TTFT ms':>24}{'forward ms':>24}{'tail ms':>18}{'overhead %':>22}")
    for r in rows:
        print(f"{r['tokens']:>6}  {r['config']:<14}{fmt(r['ttft_ms']):>24}{fmt(r['forward_ms']):>24}"
              f"{fmt(r['tail_ms'], 2):>18}{fmt(r['overhead_pct'], 2):>22}")
    worst = max(summary[f"overhead_layerwise_pct_{r['tokens']}"] for r in rows)
    print(f"target: layer-by-layer streaming adds <= {TARGET_PCT:g} % to TTFT (paper: <= {PAPER_PCT:g} %): "
          f"{'MET' if summary['target_met'] else 'NOT MET'} (worst {worst:+.2f} %; ratio of the medians: " +
          ", ".join(f"{summary[f'overhead_layerwise_pct_{n}_of_medians']:+.2f} %" for n in args.prompt_tokens) + ")")


def plot(rows: list[dict], lengths: list[int], out: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(CONFIGS)
    for i, name in enumerate(CONFIGS):
        rs = [next(r for r in rows if r["tokens"] == n and r["config"] == name) for n in lengths]
        med = [r["ttft_ms"]["median"] for r in rs]
        err = [[m - r["ttft_ms"]["min"] for m, r in zip(med, rs)], [r["ttft_ms"]["max"] - m for m, r in zip(med, rs)]]
        ax.bar([j + (i - 1) * width for j in range(len(lengths))], med, width, yerr=err, capsize=3, label=name)
    ax.set_xticks(range(len(lengths)), [f"{n} tokens" for n in lengths])
    ax.set_ylabel("TTFT (ms), median, min-max")
    ax.set_title("Time to first token: colocated vs disaggregated")
    ax.legend()
    save(fig, plot_path(out, "stream", "ttft"))


def parse_args(argv: list[str] | None = None):
    p = bench_parser("stream", __doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a Hugging Face model folder")
    p.add_argument("--prompt-tokens", default="500,1000", help="comma-separated prompt lengths, tokens")
    p.add_argument("--repeats", type=int, default=7,
                   help="alternating rounds: one request per prompt length on each cluster")
    p.add_argument("--kv-transport", choices=("ucx", "tcp"), default="ucx",
                   help="how the prompt service sends the KV to the token service (DEJAVU_KV_TRANSPORT)")
    p.add_argument("--stream-layers", type=int, default=0,
                   help="layers per KV message of the layerwise cluster (DEJAVU_KV_STREAM_LAYERS; 0: the service's "
                   "default, a fifth of the layers)")
    p.add_argument("--out", default="", metavar="FILE.json",
                   help="write the figures to this JSON file (the plot beside it)")
    args = p.parse_args(argv)
    try:
        args.prompt_tokens = [int(n) for n in args.prompt_tokens.split(",")]
    except ValueError:
        p.error(f"--prompt-tokens {args.prompt_tokens!r}: give comma-separated integers, e.g. 500,1000")
    if min(args.prompt_tokens) < 1 or args.repeats < 1:
        p.error("--prompt-tokens and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    path = resolve_model_path(args.model, progress=log)
    tokenizer = load_tokenizer(path)
    prompts = {n: build_prompts(tokenizer, n, args.repeats + 1) for n in args.prompt_tokens}
    env = {"DEJAVU_MAX_SEQS": "2", "DEJAVU_KV_TRANSPORT": args.kv_transport,
           "DEJAVU_MAX_MODEL_LEN": str(max(2048, max(args.prompt_tokens) + 16))}
    with contextlib.ExitStack() as stack:
        clusters = {}
        for name, (prompt_services, extra) in CONFIGS.items():
            log(f"starting cluster '{name}'")
            if name == "layerwise":
                extra = {**extra, "DEJAVU_KV_STREAM_LAYERS": str(args.stream_layers)}
            clusters[name] = stack.enter_context(Cluster(args.model, port=0, prompt_services=prompt_services,
                                                         token_services=1, cache_stores=0, env={**env, **extra},
                                                         echo_logs=False))
        raw = run(args, clusters, prompts)
    summary, rows = summarize(raw, args.prompt_tokens)
    print_table(rows, summary, args)
    write_json(args.out, summary, config={k: v for k, v in vars(args).items() if k != "out"}, rows=rows, raw=raw)
    plot(rows, args.prompt_tokens, args.out)


if __name__ == "__main__":
    main()
