"""Top-1 agreement of our forward's logits with Hugging Face's, teacher-forced, per dtype.

Step by step:
1. Text: the project's own files (README.md, ../shared/ARCHITECTURE.md when beside the checkout,
   docs/BENCHMARKS.md, and the sources of engine/ and token_service/), tokenized and cut into
   sequences of --seq-len tokens, up to --positions positions in all (nothing is downloaded).
2. For each sequence, logits at every position from: HF float32 (the reference), HF bf16, ours
   float32, ours bf16 (`ModelRunner.logits_all`, our own forward over the whole sequence).
3. Top-1 agreement: the fraction of positions whose argmax token matches, for ours-bf16 vs HF-bf16
   (the issue's figure), ours-bf16 vs HF-fp32, HF-bf16 vs HF-fp32 (what bf16 costs HF itself), and
   ours-fp32 vs HF-fp32; plus the largest absolute logit difference of ours-fp32 vs HF-fp32.
4. Seeded draws: at every --draw-every-th position, --draws seeds at temperature 1 (nothing else:
   the whole vocabulary drawn from), each drawn from our logits and from HF's in the same dtype;
   the fraction of draws that pick the same token, by the token services' draw (common/sampling.py,
   an exponential race) and by the inverse CDF in token-id order that it replaced (kept here as
   the baseline). Two forwards that differ in their last bits stand for what a resumed request's
   logits are to the ones it would have had (another batch, a re-prefill, another service).

The model is loaded once per dtype (float32, then bf16). Progress goes to stderr. Nothing is
asserted; the figures go to stdout and, with --out, to JSON (no plot).
"""

from __future__ import annotations

from pathlib import Path

from bench.common import bench_parser, log, write_json

ROOT = Path(__file__).resolve().parent.parent


def corpus() -> str:
    parts = [ROOT / "README.md", ROOT.parent / "shared" / "ARCHITECTURE.md", ROOT / "docs" / "BENCHMARKS.md"]
    parts += sorted((ROOT / "engine").glob("*.py")) + sorted((ROOT / "token_service").glob("*.py"))
    return "\n\n".join(p.read_text(errors="replace") for p in parts if p.is_file())


def run(args) -> dict:
    import torch

    from common.model import load_model, load_tokenizer, resolve_model_path
    from engine.runner import ModelRunner

    path = resolve_model_path(args.model, progress=log)
    ids = load_tokenizer(path)(corpus())["input_ids"][: args.positions + 1]
    seqs = [ids[i: i + args.seq_len] for i in range(0, len(ids) - 1, args.seq_len)]
    seqs = [s for s in seqs if len(s) > 1]
    log(f"{sum(len(s) for s in seqs)} positions in {len(seqs)} sequences of up to {args.seq_len} tokens")
    top1, max_diff, draws = {}, 0.0, {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(path, args.threads, dtype)
        runner = ModelRunner(model, block_size=16)
        with torch.inference_mode():
            for i, s in enumerate(seqs):
                hf = model(input_ids=torch.tensor([s])).logits[0].float()
                ours = runner.logits_all(s)
                top1.setdefault(f"hf_{dtype}", []).append(hf.argmax(-1))
                top1.setdefault(f"ours_{dtype}", []).append(ours.argmax(-1))
                if dtype == "float32":
                    max_diff = max(max_diff, float((hf - ours).abs().max()))
                first = i * args.seq_len  # output indices of their own for each sequence's positions: other numbers
                for way, same in seeded_draws(hf[::args.draw_every], ours[::args.draw_every], args.draws, first).items():
                    draws.setdefault(f"{way}_{dtype}", []).append(same)
                log(f"{dtype}: sequence {i + 1}/{len(seqs)}")
        del model, runner
    tops = {k: torch.cat(v) for k, v in top1.items()}

    def agree(a: str, b: str) -> float:
        return float((tops[a] == tops[b]).float().mean())

    return {"positions": int(tops["hf_float32"].numel()),
            "ours_bf16_vs_hf_bf16": agree("ours_bfloat16", "hf_bfloat16"),
            "ours_bf16_vs_hf_fp32": agree("ours_bfloat16", "hf_float32"),
            "hf_bf16_vs_hf_fp32": agree("hf_bfloat16", "hf_float32"),
            "ours_fp32_vs_hf_fp32": agree("ours_float32", "hf_float32"),
            "ours_fp32_vs_hf_fp32_max_abs_logit_diff": max_diff,
            "seeded_draws": sum(len(v) for v in draws["race_float32"]),
            **{f"seeded_same_{k}": float(torch.cat(v).float().mean()) for k, v in draws.items()}}


def seeded_draws(a, b, seeds: int, first: int) -> dict:
    """a, b: (positions, vocab) logits of two forwards -> for each way of drawing, whether the pick
    from a equals the pick from b, for each (position, seed): position r drawn as output index
    first + r."""
    import torch

    from common.protocol import SamplingParams
    from common.sampling import position_seed, sample_one

    same = {"race": [], "inverse_cdf": []}
    for row in range(a.shape[0]):
        pa, pb = torch.softmax(a[row].float(), 0), torch.softmax(b[row].float(), 0)
        ca, cb = torch.cumsum(pa, 0), torch.cumsum(pb, 0)
        for seed in range(seeds):
            p = SamplingParams(temperature=1.0, seed=seed)
            same["race"].append(sample_one(a[row], p, first + row) == sample_one(b[row], p, first + row))
            g = torch.Generator().manual_seed(position_seed(seed, first + row))  # the replaced draw: one number
            u = torch.rand(1, generator=g, dtype=torch.float64).item()
            picks = [int(torch.searchsorted(c, torch.tensor([u * float(c[-1])]), right=True)) for c in (ca, cb)]
            same["inverse_cdf"].append(picks[0] == picks[1])
    return {k: torch.tensor(v) for k, v in same.items()}


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("agreement", __doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a Hugging Face model folder")
    p.add_argument("--positions", type=int, default=4096, help="teacher-forced positions in all")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--draws", type=int, default=16, help="seeds drawn at each drawn position")
    p.add_argument("--draw-every", type=int, default=4, help="draw at every n-th position")
    p.add_argument("--out", metavar="FILE.json", help="write the figures as JSON")
    args = p.parse_args(argv)
    if args.positions < 1 or args.seq_len < 2 or args.draws < 1 or args.draw_every < 1:
        p.error("--positions and --draws must be >= 1, --seq-len >= 2, --draw-every >= 1")
    out = run(args)
    print(f"\ntop-1 agreement over {out['positions']} teacher-forced positions ({args.model}):")
    for key in ("ours_bf16_vs_hf_bf16", "ours_bf16_vs_hf_fp32", "hf_bf16_vs_hf_fp32", "ours_fp32_vs_hf_fp32"):
        print(f"  {key:24} {out[key] * 100:6.2f} %")
    print(f"  ours fp32 vs HF fp32: largest |logit difference| {out['ours_fp32_vs_hf_fp32_max_abs_logit_diff']:.2e}")
    print(f"\nseeded draws (temperature 1) picking the same token from ours and HF, {out['seeded_draws']} a dtype:")
    for dtype in ("float32", "bfloat16"):
        for way in ("race", "inverse_cdf"):
            print(f"  {dtype:9} {way:12} {out[f'seeded_same_{way}_{dtype}'] * 100:8.3f} %")
    write_json(args.out or "", out, config=vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
