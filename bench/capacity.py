"""How many chat-length requests fit in a fixed KV budget: whole rows (before paging) against
blocks (the paged pool), float32 and bf16.

Step by step:
1. The budget: --budget-gib of KV (default 1 GiB) for the model's KV shape (bytes per token from
   its config; no weights are loaded).
2. Before paging, the token service held one row of --max-model-len + 1 tokens per request
   (a scratch column included) whatever its length: budget // row bytes requests, in float32.
3. After, in float32 and in bf16: the token service's BlockManager over budget // block bytes
   blocks of --block-size tokens; requests of --prompt-tokens + --output-tokens (500 + 200: a
   700-token chat turn) are admitted as TokenEngine.reserve admits them (blocks promised for
   prompt + max_tokens, the prompt's taken) until the next would not fit; the count admitted.
Nothing is started and nothing is timed. Nothing is asserted; the figures go to stdout and, with
--out, to JSON (no plot).
"""

from __future__ import annotations

from types import SimpleNamespace

from bench.common import bench_parser, log, write_json


def admitted(kv, args, dtype: str) -> int:
    import torch

    from common.protocol import ReserveRequest
    from engine.block_manager import BlockManager

    bytes_per_token = kv.bytes_per_token // kv.dtype.itemsize * getattr(torch, dtype).itemsize
    blocks = int(args.budget_gib * 2**30) // (bytes_per_token * args.block_size)
    manager, n = BlockManager(blocks, args.block_size), 0
    req = ReserveRequest(request_id="r", prompt_tokens=args.prompt_tokens, max_tokens=args.output_tokens)
    while manager.can_commit(req.prompt_tokens + req.max_tokens):  # what TokenEngine.reserve checks
        manager.grow([], req.prompt_tokens, manager.commit(req.prompt_tokens + req.max_tokens))
        n += 1
    return n


def run(args) -> dict:
    import torch
    from transformers import AutoConfig

    from common.model import resolve_model_path
    from engine.runner import KVShape

    config = AutoConfig.from_pretrained(resolve_model_path(args.model, progress=log))
    kv = KVShape.of(SimpleNamespace(config=config, dtype=torch.float32))
    budget = int(args.budget_gib * 2**30)
    rows = budget // (kv.bytes_per_token * (args.max_model_len + 1))
    out = {"bytes_per_token_fp32": kv.bytes_per_token, "rows_fp32": rows}
    for dtype in ("float32", "bfloat16"):
        out[f"paged_{dtype}"] = admitted(kv, args, dtype)
        out[f"paged_{dtype}_vs_rows_fp32"] = out[f"paged_{dtype}"] / rows
    return out


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("capacity", __doc__)
    p.add_argument("--model", default="smollm2", help="whose KV shape (its config only)")
    p.add_argument("--budget-gib", type=float, default=1.0, help="the KV budget, GiB")
    p.add_argument("--max-model-len", type=int, default=2048, help="the row length before paging, tokens")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block of the paged pool")
    p.add_argument("--prompt-tokens", type=int, default=500, help="prompt length of every request, tokens")
    p.add_argument("--output-tokens", type=int, default=200, help="max_tokens of every request")
    p.add_argument("--out", metavar="FILE.json", help="write the figures as JSON")
    args = p.parse_args(argv)
    out = run(args)
    print(f"\n{args.prompt_tokens + args.output_tokens}-token requests in {args.budget_gib:g} GiB of KV ({args.model}):")
    print(f"  rows of {args.max_model_len} tokens, float32 (before paging): {out['rows_fp32']}")
    for dtype in ("float32", "bfloat16"):
        print(f"  paged, blocks of {args.block_size}, {dtype}: {out[f'paged_{dtype}']} "
              f"({out[f'paged_{dtype}_vs_rows_fp32']:.1f}x)")
    write_json(args.out or "", out, config=vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
