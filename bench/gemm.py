"""The linears of a decode step alone: our GEMM (engine/kernels/linear.cpp) against oneDNN's (or
F.linear where oneDNN does not run the dtype).

Step by step:
1. Take the shapes of one decoder layer of the model (--model's config; no weights are read):
   fused QKV, O, fused gate/up and down projections; random weights for --layers layers, so that
   a pass reads them from memory as a decode step does (SmolLM2: 30 layers, 424 MB in float32,
   212 MB in bf16).
2. Pack every weight both ways: our panels, and the baseline's: oneDNN's prepacked layout (what
   engine/model.py's Linear takes without our GEMM), or the plain weight for F.linear where oneDNN
   cannot run the dtype (bf16 on a CPU with neither AVX-512 BW/VL/DQ nor AVX-NE-CONVERT: Zen 2/3).
3. For each dtype and each row count (--rows: decode batches, and a 500-token prefill), run all
   layers' linears through each GEMM, alternating, --repeats times; each time is the median of
   --passes passes. Report median [min-max] ms per pass, the weights' GB/s, and baseline/ours.

A dtype that our GEMM is not built for on this CPU is skipped; with no GEMM built at all (neither
AVX-512 nor AVX2 with FMA) the run stops. Progress goes to stderr, the table to stdout; --out
FILE.json writes the figures (no plot).
Nothing is asserted; figures depend on the machine (recorded in the JSON).
"""

from __future__ import annotations

import statistics
import time

from bench.common import bench_parser, fmt, log, spread, write_json


def layer_shapes(config) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of one Llama layer's fused linears."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    H, inter = config.hidden_size, config.intermediate_size
    return {"qkv": ((heads + 2 * kv_heads) * dim, H), "o": (H, heads * dim), "gate_up": (2 * inter, H), "down": (H, inter)}


def run(args) -> dict:
    import torch
    from transformers import AutoConfig

    from common.model import resolve_model_path
    from engine.kernels import paged_attention

    kernel = paged_attention()
    if kernel is None or not kernel.LINEAR_DTYPES:
        raise SystemExit("our GEMM is not built for this CPU (it needs AVX-512, or AVX2 with FMA): nothing to compare")
    shapes = layer_shapes(AutoConfig.from_pretrained(resolve_model_path(args.model, progress=log)))
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for dtype_name in args.dtypes:
        if dtype_name not in kernel.LINEAR_DTYPES:
            log(f"{dtype_name}: not in this build's LINEAR_DTYPES {kernel.LINEAR_DTYPES}: skipped")
            continue
        dtype = getattr(torch, dtype_name)
        weights = [{n: torch.randn(s, dtype=torch.float32).to(dtype) * 0.02 for n, s in shapes.items()}
                   for _ in range(args.layers)]
        ours = [{n: kernel.pack_linear(w) for n, w in layer.items()} for layer in weights]
        nbytes = sum(o * i for o, i in shapes.values()) * args.layers * dtype.itemsize
        # the baseline: what engine/model.py's Linear takes without our GEMM. oneDNN's prepacked
        # weight where oneDNN runs the dtype; else F.linear (bf16 where torch's oneDNN wants AVX-512
        # BW/VL/DQ or AVX-NE-CONVERT and the CPU has neither: Zen 2/3, Haswell to Comet Lake)
        onednn = None
        if dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported():
            baseline_name = "oneDNN"
            onednn = [{n: torch.ops.mkldnn._reorder_linear_weight(w, 16) for n, w in layer.items()} for layer in weights]
            baseline = lambda x, n, layer: torch.ops.mkldnn._linear_pointwise(x, onednn[layer][n], None, "none", [], "")  # noqa: E731
        else:
            baseline_name = "F.linear"
            baseline = lambda x, n, layer: torch.nn.functional.linear(x, weights[layer][n])  # noqa: E731
        log(f"{dtype_name}: ours against {baseline_name}")
        gemms = {"baseline": baseline,
                 "ours": lambda x, n, layer: kernel.linear(x, ours[layer][n], None, shapes[n][0])}
        for rows in args.rows:
            xs = {n: torch.randn(rows, i).to(dtype) for n, (o, i) in shapes.items()}

            def one_pass(gemm) -> float:
                start = time.perf_counter()
                for layer in range(args.layers):
                    for n in shapes:
                        gemm(xs[n], n, layer)
                return time.perf_counter() - start

            ms = {name: [] for name in gemms}
            for name in gemms:
                one_pass(gemms[name])  # warm: oneDNN builds its kernels on first use
            for r in range(args.repeats):
                for name in list(gemms) if r % 2 == 0 else list(gemms)[::-1]:
                    ms[name].append(statistics.median(one_pass(gemms[name]) for _ in range(args.passes)) * 1e3)
            log(f"{dtype_name} {rows} rows: " + ", ".join(f"{n} {fmt(spread(v), 2)} ms" for n, v in ms.items()))
            results.append({"dtype": dtype_name, "rows": rows, "weight_bytes": nbytes, "baseline": baseline_name,
                            "baseline_ms": spread(ms["baseline"]), "ours_ms": spread(ms["ours"]),
                            "speedup": spread([d / o for o, d in zip(ms["ours"], ms["baseline"])])})
        del weights, ours, gemms, baseline, onednn
    return {"shapes": shapes, "results": results}


def report(out: dict, args) -> None:
    print(f"\nthe linears of {args.layers} layers {out['shapes']}, ms a pass (median [min-max] of {args.repeats} "
          f"repeats, each the median of {args.passes} passes)\n")
    print(f"{'dtype':9} {'rows':>5}  {'baseline':>8}  {'baseline ms':>22}  {'ours ms':>22}  {'ours GB/s':>9}  "
          f"{'baseline/ours':>18}")
    for r in out["results"]:
        gbs = r["weight_bytes"] / r["ours_ms"]["median"] / 1e6
        print(f"{r['dtype']:9} {r['rows']:>5}  {r['baseline']:>8}  {fmt(r['baseline_ms'], 2):>22}  "
              f"{fmt(r['ours_ms'], 2):>22}  {gbs:>9.1f}  {fmt(r['speedup'], 2):>18}")


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("gemm", __doc__)
    p.add_argument("--model", default="smollm2", help="whose layer shapes (its config only)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16"),
                   help="weight and activation dtypes, one after another")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8, 16, 32, 500],
                   help="rows of x: sequences of a decode step, or a prompt's tokens")
    p.add_argument("--layers", type=int, default=30, help="layers of weights, read in turn (SmolLM2 has 30)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=5,
                   help="rounds per dtype and row count, the two GEMMs alternating, after one untimed pass each")
    p.add_argument("--passes", type=int, default=3, help="passes over all layers a round; the round's median counts")
    p.add_argument("--out", metavar="FILE.json", help="write the figures as JSON")
    args = p.parse_args(argv)
    if min(args.rows) < 1 or args.layers < 1 or args.repeats < 1 or args.passes < 1:
        p.error("--rows, --layers, --repeats and --passes must be positive")
    out = run(args)
    report(out, args)
    summary = {f"{r['dtype']}_{r['rows']}_rows_speedup": round(r["speedup"]["median"], 3) for r in out["results"]}
    write_json(args.out, summary, **out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
