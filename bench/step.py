"""The engine's decode step, in process: step time against batch size, ours against Hugging Face.

Step by step:
1. Load the model once per dtype (--dtypes, default float32 and bfloat16).
2. For each batch size B (--batches, default 1 8 16 32): B sequences with --kv-len tokens of KV
   each (~600: a 500-token prompt 100 tokens into its answer), random KV values.
   - ours: one `ModelRunner.forward` of B decode segments over the paged pool, each sequence's
     blocks scattered over the pool as on a busy service;
   - hf: the Hugging Face modules' own forward (`LlamaForCausalLM`) over a contiguous
     (B, kv_heads, L, head_dim) cache per layer, written in place (no concatenation): what our
     token service ran before its own engine.
   - with --compile, also ours through torch.compile (engine/compiled.py), its compile time too;
   - with --cuda-graphs (on a GPU), also ours replayed from CUDA graphs (engine/graphs.py), the
     way a token service runs it there, and how far its logits are from the eager step's;
   - with --onednn, also ours with oneDNN's prepacked GEMM for the linears instead of our own
     (engine/kernels/linear.cpp): the step before that kernel (for bf16 on AVX2 without AVX-512,
     where oneDNN cannot prepack bf16, that is F.linear).
3. Alternate ours and hf, --repeats times, each a median of --steps steps; report median [min-max]
   step time, tokens/s (B / step time), and ours/hf.
4. A profiler table of our step at the largest batch: where the time goes.

Progress goes to stderr, the tables to stdout; --out FILE.json writes the figures (no plot).
Nothing is asserted; figures depend on the machine (recorded in the JSON).
"""

from __future__ import annotations

import time

from bench.common import bench_parser, fmt, log, spread, write_json


def hf_cache(model, B: int, L: int, dtype):
    """A cache over preallocated (B, kv_heads, L + 1, D) tensors: each step writes column L and
    attends to [0, L + 1), as the old pooled runner did."""
    import torch
    from transformers.cache_utils import Cache

    c = model.config
    heads, dim = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    pool = torch.randn(c.num_hidden_layers, 2, B, heads, L + 1, dim, dtype=dtype, device=model.device)

    class Rows(Cache):
        def __init__(self):
            super().__init__(layers=[])

        def update(self, k, v, layer, *args, **kwargs):
            pool[layer, 0, :, :, L:] = k
            pool[layer, 1, :, :, L:] = v
            return pool[layer, 0], pool[layer, 1]

    return Rows


def timed(fn, steps: int) -> float:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)  # a GPU step is async
    fn(), fn()  # warm (oneDNN builds its kernels on first use; a CUDA graph is captured)
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3  # ms


def setups(model, runner, B: int, L: int):
    """-> (ours, hf): one decode step of each. The pool's values and the block tables are seeded by
    B, so two runners' steps at one B compute the same thing."""
    import torch

    from engine.attention import Segment

    per_seq = -(-(L + 1) // runner.block_size)
    seeded = torch.Generator().manual_seed(B)
    pool = runner.new_pool(per_seq * B + 8)
    values = torch.randn(pool[:, :, :(per_seq * B + 8) * runner.block_size].shape, generator=seeded)
    pool[:, :, :values.shape[2]].copy_(values)
    order = torch.randperm(per_seq * B + 8, generator=seeded)[: per_seq * B].view(B, per_seq).tolist()
    segments = [Segment([100 + b], L, order[b]) for b in range(B)]
    rows = hf_cache(model, B, L, model.dtype)
    ids, pos = torch.full((B, 1), 100, device=model.device), torch.full((B, 1), L, device=model.device)

    def ours():
        return runner.forward(segments, pool)

    def hf():
        with torch.inference_mode():
            model(input_ids=ids, position_ids=pos, past_key_values=rows(), use_cache=True, logits_to_keep=1)

    return ours, hf


def profile_table(fn, rows: int = 12) -> str:
    from torch.profiler import profile

    fn()
    with profile() as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def run(args) -> dict:
    import torch

    from common.model import load_model, resolve_model_path
    from engine.runner import ModelRunner

    path = resolve_model_path(args.model, progress=log)
    results, tables = [], {}
    for dtype in args.dtypes:
        model = load_model(path, args.threads, dtype)
        runner = ModelRunner(model, block_size=args.block_size, cuda_graphs=False)
        compiled = onednn = graphs = None
        if args.cuda_graphs:
            graphs = ModelRunner(model, block_size=args.block_size, cuda_graphs=True, max_batch=max(args.batches))
        if args.onednn:
            onednn = ModelRunner(model, block_size=args.block_size, gemm=False, cuda_graphs=False)
        if args.compile:
            log(f"{dtype}: compiling the decode step ...")
            compiled = ModelRunner(model, block_size=args.block_size, compile=True)
            log(f"{dtype}: compiled in {compiled.compiled.compile_s:.1f} s")
        for B in args.batches:
            ours, hf = setups(model, runner, B, args.kv_len)
            fns = {"ours": ours, "hf": hf}
            if compiled is not None:
                fns["compiled"] = setups(model, compiled, B, args.kv_len)[0]
            if onednn is not None:
                fns["onednn"] = setups(model, onednn, B, args.kv_len)[0]
            if graphs is not None:
                fns["graphs"] = setups(model, graphs, B, args.kv_len)[0]
                eager_logits, graph_logits = setups(model, runner, B, args.kv_len)[0](), fns["graphs"]()
                agreement = {"max_abs_diff": float((eager_logits - graph_logits).abs().max()),
                             "argmax_equal": float((eager_logits.argmax(-1) == graph_logits.argmax(-1)).float().mean())}
            ms = {name: [] for name in fns}
            for r in range(args.repeats):
                for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
                    ms[name].append(timed(fns[name], args.steps))
                log(f"{dtype} B={B} repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {v[-1]:.1f} ms" for n, v in ms.items()))
            results.append({"dtype": dtype, "batch": B, "ours_ms": spread(ms["ours"]), "hf_ms": spread(ms["hf"]),
                            "ratio": spread([h / o for o, h in zip(ms["ours"], ms["hf"])])})
            if compiled is not None:
                results[-1].update(compiled_ms=spread(ms["compiled"]), compile_s=compiled.compiled.compile_s,
                                   compiled_speedup=spread([o / c for o, c in zip(ms["ours"], ms["compiled"])]))
            if graphs is not None:
                results[-1].update(graphs_ms=spread(ms["graphs"]), graphs_vs_eager=agreement,
                                   graphs_speedup=spread([o / g for o, g in zip(ms["ours"], ms["graphs"])]))
            if onednn is not None:
                results[-1].update(onednn_ms=spread(ms["onednn"]),
                                   gemm_speedup=spread([d / o for o, d in zip(ms["ours"], ms["onednn"])]))
        tables[dtype] = profile_table(setups(model, runner, max(args.batches), args.kv_len)[0])
        if onednn is not None:
            tables[f"{dtype}, oneDNN GEMM"] = profile_table(setups(model, onednn, max(args.batches), args.kv_len)[0])
        if graphs is not None:
            tables[f"{dtype}, CUDA graphs"] = profile_table(setups(model, graphs, max(args.batches), args.kv_len)[0])
        del model, runner, onednn, graphs
        torch.set_num_threads(torch.get_num_threads())
    return {"results": results, "profiles": tables}


def report(out: dict, args) -> None:
    print(f"\ndecode step, {args.kv_len} tokens of KV per sequence (median [min-max] of {args.repeats} repeats, "
          f"each the median of {args.steps} steps)\n")
    print(f"{'dtype':9} {'batch':>5}  {'ours ms':>22}  {'hf ms':>22}  {'ours tok/s':>10}  {'speed-up':>18}")
    for r in out["results"]:
        tps = r["batch"] / r["ours_ms"]["median"] * 1e3
        print(f"{r['dtype']:9} {r['batch']:>5}  {fmt(r['ours_ms']):>22}  {fmt(r['hf_ms']):>22}  {tps:>10.0f}  "
              f"{fmt(r['ratio'], 2):>18}")
    if any("compiled_ms" in r for r in out["results"]):
        print("\nours through torch.compile (--compile on): step ms, eager/compiled (float32 at 1 sequence: "
              "the runner runs that eagerly, so the ratio there is noise)\n")
        for r in out["results"]:
            print(f"{r['dtype']:9} {r['batch']:>5}  {fmt(r['compiled_ms']):>22}  {fmt(r['compiled_speedup'], 2):>18}"
                  f"  (compiled in {r['compile_s']:.0f} s)")
    if any("graphs_ms" in r for r in out["results"]):
        print("\nours replayed from CUDA graphs (--cuda-graphs): step ms, eager/graphs, logits against the eager step's\n")
        for r in out["results"]:
            a = r["graphs_vs_eager"]
            print(f"{r['dtype']:9} {r['batch']:>5}  {fmt(r['graphs_ms']):>22}  {fmt(r['graphs_speedup'], 2):>18}  "
                  f"max |diff| {a['max_abs_diff']:.2e}, argmax equal {a['argmax_equal']:.0%}")
    if any("onednn_ms" in r for r in out["results"]):
        print("\nours with oneDNN's GEMM for the linears (--onednn; the step before our GEMM): step ms, "
              "oneDNN/ours\n")
        for r in out["results"]:
            print(f"{r['dtype']:9} {r['batch']:>5}  {fmt(r['onednn_ms']):>22}  {fmt(r['gemm_speedup'], 2):>18}")
    for dtype, table in out["profiles"].items():
        print(f"\nwhere our step's time goes, {dtype}, batch {max(args.batches)}:\n{table}")


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("step", __doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a Hugging Face model folder")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16", "float16"),
                   help="dtypes to load the model in, one after another")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16, 32],
                   help="batch sizes B: sequences in one decode step")
    p.add_argument("--kv-len", type=int, default=600, help="tokens of KV per sequence")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block of our paged pool")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds per dtype and batch; each times every variant (ours, hf, ...), alternating")
    p.add_argument("--steps", type=int, default=5,
                   help="steps timed a round, after 2 untimed; the round's median counts")
    p.add_argument("--compile", action="store_true", help="also time the decode step through torch.compile")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time our step replayed from CUDA graphs, as a token service runs it on a GPU (needs one)")
    p.add_argument("--onednn", action="store_true",
                   help="also time our step with oneDNN's GEMM for the linears (before engine/kernels/linear.cpp; "
                   "F.linear for bf16 on a CPU where oneDNN cannot prepack it: AVX2 without AVX-512)")
    p.add_argument("--out", metavar="FILE.json", help="write the figures as JSON")
    args = p.parse_args(argv)
    if min(args.batches) < 1 or args.kv_len < 1 or args.repeats < 1 or args.steps < 1:
        p.error("--batches, --kv-len, --repeats and --steps must be >= 1")
    if args.cuda_graphs:
        import torch

        if not torch.cuda.is_available():
            p.error("--cuda-graphs needs a GPU (torch sees none)")
    out = run(args)
    report(out, args)
    if args.out:
        summary = {f"{r['dtype']}_b{r['batch']}_ours_ms": r["ours_ms"]["median"] for r in out["results"]}
        summary.update({f"{r['dtype']}_b{r['batch']}_speedup": r["ratio"]["median"] for r in out["results"]})
        summary.update({f"{r['dtype']}_b{r['batch']}_compiled_speedup": r["compiled_speedup"]["median"]
                        for r in out["results"] if "compiled_speedup" in r})
        summary.update({f"{r['dtype']}_b{r['batch']}_graphs_speedup": r["graphs_speedup"]["median"]
                        for r in out["results"] if "graphs_speedup" in r})
        write_json(args.out, summary, config=vars(args), **out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
