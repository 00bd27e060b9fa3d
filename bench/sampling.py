"""What penalties, logit biases, min-p and a grammar add to a decode step's sampling (common/sampling.py).

Step by step:
1. Run --model (Hugging Face's modules, float32) over a text once: the logits at its positions are
   the rows, real distributions (a random batch would have a nucleus of thousands of tokens where
   a model's holds a few). Make token services' sequences whose prompt has --prompt-tokens tokens
   and which have put out --output-tokens (random ids).
2. For each row count, time the token service's sampling call as a decode step makes it (each
   sequence's penalty history taken from it, `Sequence.penalties`, then `sample`) for each kind of
   request, the kinds alternated, one round unrecorded and then --repeats rounds; each time is the
   median of --passes calls:
   - greedy: temperature 0, nothing else (the baseline of the greedy kinds);
   - default: temperature 1 and nothing else (what an OpenAI request without sampling fields asks);
   - seeded: temperature 0.8, top-p 0.95, a seed (the baseline of the sampled kinds);
   - bias: greedy with a logit bias on 8 tokens;
   - penalties: greedy with repetition 1.1, frequency 0.5 and presence 0.3;
   - everything: seeded with the penalties, the bias, min-p 0.05 and min_tokens;
   - json: greedy with a JSON schema (structured output, common/grammar.py), each sequence's output
     so far the start of a document that matches it, the next token inside a string (where the
     most tokens are allowed); the matcher steps back after each call, out of the timing.
   With --against REV, common/sampling.py of that git revision is timed too, in the same
   alternation, on the kinds it has (greedy, default, seeded): "KIND@REV".
3. Report median [min-max] ms a call and each kind's time over its baseline's (the same kind's at
   REV, for those).

Progress goes to stderr, the tables to stdout; --out FILE.json writes the figures (no plot).
Nothing is asserted; figures depend on the machine (recorded in the JSON). A decode step of
SmolLM2 at 16 sequences takes tens of milliseconds on a 2-core VM (`dejavu bench step`).
"""

from __future__ import annotations

import statistics
import time

from bench.common import bench_parser, fmt, log, spread, write_json

KINDS = ("greedy", "default", "seeded", "bias", "penalties", "everything", "json")
BASELINE = {"greedy": "greedy", "default": "default", "seeded": "seeded", "bias": "greedy", "penalties": "greedy",
            "everything": "seeded", "json": "greedy"}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "hobbies": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "hobbies"]}
DOCUMENT_START = '{"name": "Ada Lovelace", "age": 36, "hobbies": ["mathematics", "poetry", "'  # inside a string
OLD_KINDS = ("greedy", "default", "seeded")  # what a revision before penalties can sample


def sampling_at(rev: str):
    """common/sampling.py as it was at git revision `rev`, as a module of its own."""
    import subprocess
    import types

    source = subprocess.run(["git", "show", f"{rev}:common/sampling.py"], capture_output=True, text=True, check=True).stdout
    module = types.ModuleType(f"sampling_at_{rev}")
    exec(compile(source, f"{rev}:common/sampling.py", "exec"), module.__dict__)
    return module


def params_of(kind: str, vocab: int):
    from common.protocol import SamplingParams

    seeded = {"temperature": 0.8, "top_p": 0.95, "seed": 7}
    bias = {"logit_bias": [(t, 2.0) for t in range(100, vocab, vocab // 8)][:8]}
    penalties = {"repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": 0.3}
    if kind == "json":
        from common.grammar import from_request

        return SamplingParams(max_tokens=1 << 20, eos_token_ids=[0], grammar=from_request("json", SCHEMA))
    fields = {"greedy": {}, "default": {"temperature": 1.0, "seed": 7}, "seeded": seeded, "bias": bias, "penalties": penalties,
              "everything": {**seeded, **bias, **penalties, "min_p": 0.05, "min_tokens": 1 << 20}}[kind]
    return SamplingParams(max_tokens=1 << 20, eos_token_ids=[0], **fields)


TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
        "salt, grain and cloth. Over the centuries it grew into a market town, then a port, and finally the "
        "capital of a province whose roads, canals and railways all lead back to its old stone bridge. ")


def model_logits(model: str, rows: int):
    """(rows, vocab) float32 logits of the model at the positions of TEXT (repeated as needed)."""
    import torch

    from common.model import load_model, load_tokenizer, resolve_model_path

    from common import grammar

    path = resolve_model_path(model, progress=log)
    grammar.use_model(path)  # the json kind's tokenizer
    tokenizer, hf = load_tokenizer(path), load_model(path)
    ids = tokenizer(TEXT * (1 + rows // 40))["input_ids"][: rows + 1]
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, 1:].float().contiguous(), tokenizer(DOCUMENT_START)["input_ids"]


def run(args) -> dict:
    import torch

    from common import grammar
    from common.sampling import sample
    from token_service.sequence import Sequence

    if args.threads:
        torch.set_num_threads(args.threads)
    old = sampling_at(args.against) if args.against else None
    kinds = list(KINDS) + ([f"{k}@{args.against}" for k in OLD_KINDS] if args.against else [])
    everything, document = model_logits(args.model, max(args.rows))
    vocab = everything.shape[1]
    g = torch.Generator().manual_seed(0)
    results = []
    for rows in args.rows:
        logits = everything[:rows]
        seqs, documents = [], []
        params = {kind: params_of(kind, vocab) for kind in KINDS}
        for i in range(rows):
            ids = torch.randint(0, vocab, (args.prompt_tokens + args.output_tokens,), generator=g).tolist()
            for out, output in ((seqs, ids[args.prompt_tokens:]), (documents, list(document))):
                seq = Sequence(f"r{i}", prompt_len=args.prompt_tokens, max_tokens=1 << 20, num_layers=1)
                seq.history, seq.output = ids[: args.prompt_tokens], output
                out.append(seq)
            documents[-1].matcher = grammar.start(params["json"].grammar, vocab)  # follows the output from its start
        rids = [s.request_id for s in seqs]

        def call(kind: str) -> float:
            name, _, rev = kind.partition("@")
            p = [params[name]] * rows
            start = time.perf_counter()
            if rev:
                old.sample(logits, p, [s.next_index for s in seqs], rids)
            elif name == "json":
                histories = [s.penalties(vocab) for s in documents]
                sample(logits, p, [s.next_index for s in documents], rids, histories)
            else:
                histories = [s.penalties(vocab) if q.penalized else None for s, q in zip(seqs, p)]
                sample(logits, p, [s.next_index for s in seqs], rids, histories)
            took = (time.perf_counter() - start) * 1000
            if name == "json":  # the pick was followed: back to where the document stands
                for h in histories:
                    h.matcher.matcher.rollback(1)
                    h.matched -= 1
            return took

        times = {kind: [] for kind in kinds}
        for repeat in range(args.repeats + 1):  # the first round warms up, not kept
            for kind in kinds:
                t = statistics.median(call(kind) for _ in range(args.passes))
                if repeat:
                    times[kind].append(t)
        row = {"rows": rows}
        for kind in kinds:
            base = times[f"{kind.partition('@')[0]}@{args.against}" if args.against and kind in OLD_KINDS
                         else BASELINE[kind.partition("@")[0]]]
            row[kind] = {"ms": spread(times[kind]), "over_baseline": spread([t / b for t, b in zip(times[kind], base)])}
        results.append(row)
        log(f"{rows} rows: " + ", ".join(f"{k} {statistics.median(times[k]):.2f} ms" for k in kinds))
    return {"results": results, "vocab": vocab, "kinds": kinds, "args": vars(args)}


def report(out: dict, args) -> None:
    print(f"sampling a decode step's rows, vocabulary {out['vocab']}, {args.prompt_tokens} prompt + "
          f"{args.output_tokens} output tokens a sequence; ms a call, median [min-max] of {args.repeats}")
    kinds = out["kinds"]
    print(f"{'rows':>5}  " + "  ".join(f"{k:>22}" for k in kinds))
    for r in out["results"]:
        print(f"{r['rows']:>5}  " + "  ".join(f"{fmt(r[k]['ms'], 2):>22}" for k in kinds))
    print("over the baseline (greedy for bias and penalties, seeded for everything; with --against, the kinds "
          "it has over theirs there):")
    for r in out["results"]:
        print(f"{r['rows']:>5}  " + "  ".join(f"{fmt(r[k]['over_baseline'], 2):>22}" for k in kinds))


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("sampling", __doc__)
    p.add_argument("--model", default="smollm2",
                   help="whose logits: 'smollm2' (bundled) or a Hugging Face model folder")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 8, 16, 32],
                   help="sequences in the step, one count after another")
    p.add_argument("--prompt-tokens", type=int, default=500,
                   help="prompt length of every sequence, tokens (random ids)")
    p.add_argument("--output-tokens", type=int, default=128,
                   help="tokens every sequence has put out (random ids: the penalties' history)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=5, help="recorded rounds per row count, after one unrecorded")
    p.add_argument("--passes", type=int, default=5, help="calls of each kind a round; the round's median counts")
    p.add_argument("--against", help="a git revision whose common/sampling.py to time too (before penalties: 55d15f4)")
    p.add_argument("--out", metavar="FILE.json", help="write the figures as JSON")
    args = p.parse_args(argv)
    if min(args.rows) < 1 or args.prompt_tokens < 1 or args.output_tokens < 1 or args.repeats < 1 or args.passes < 1:
        p.error("--rows, --prompt-tokens, --output-tokens, --repeats and --passes must be positive")
    out = run(args)
    report(out, args)
    summary = {f"{k}_{r['rows']}_rows_over_baseline": round(r[k]["over_baseline"]["median"], 3)
               for r in out["results"] for k in ("bias", "penalties", "everything", "json") + (OLD_KINDS if args.against else ())}
    write_json(args.out, summary, **out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
