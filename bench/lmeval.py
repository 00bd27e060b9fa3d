"""lm-evaluation-harness scoring through our cluster against the same harness on Hugging Face in float32.

What a user of lm-evaluation-harness meets: its `local-completions` model sends loglikelihood
requests to /v1/completions as batches of token-id prompts with `echo`, `logprobs` and
`max_tokens: 1`, and reads each continuation's summed logprob and whether every one of its tokens
was the likeliest (is_greedy; the generated token is dropped).

Step by step:
1. Write a small multiple-choice task (20 capitals, four choices each: 80 loglikelihood requests;
   no dataset download) into a temporary folder.
2. Run `lm_eval --model hf` on the same model in float32 (--lm-eval, offline, --batch-size): the
   oracle.
3. For each target of --targets (disaggregated, colocated), start a cluster in float32 as
   `dejavu bench load` starts its target (1 token service, 1 cache store, 16 sequences, a prompt
   service unless colocated, CPU placement auto), run `lm_eval --model local-completions` against
   it (`--batch-size` prompts a request, `--concurrency` requests at once), and stop it.
4. Compare request by request: the loglikelihoods' absolute difference, is_greedy agreement,
   accuracy, and the wall time of each run; print the table (stdout; progress to stderr) and, with
   --out, write JSON (no plot).

Needs the harness, which bench/peers.sh installs (without it the run stops before starting
anything). A default run took ~3 min on the 2-vCPU VM of docs/BENCHMARKS.md:

    bench/peers.sh lmeval        # once: lm-eval 0.4.13 in .peers/lmeval
    dejavu bench lmeval --out docs/bench/lmeval.json
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

from bench import targets
from bench.common import bench_parser, log, write_json
from common.model import resolve_model_path

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Russia", "Moscow"), ("China", "Beijing"),
            ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Kenya", "Nairobi"),
            ("Peru", "Lima"), ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Poland", "Warsaw"),
            ("Sweden", "Stockholm"), ("Cuba", "Havana"), ("Chile", "Santiago")]

TASK = """task: capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: What is the capital of {{{{country}}}}?\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def write_task(folder: Path) -> None:
    rng = random.Random(0)
    cities = [city for _, city in CAPITALS]
    with open(folder / "capitals.jsonl", "w") as fh:
        for country, city in CAPITALS:
            choices = rng.sample([c for c in cities if c != city], 3) + [city]
            rng.shuffle(choices)
            fh.write(json.dumps({"country": country, "choices": choices,  # the harness puts " " before each
                                 "answer": choices.index(city)}) + "\n")
    (folder / "capitals.yaml").write_text(TASK.format(data=json.dumps(str(folder / "capitals.jsonl"))))


def lm_eval(exe: str, task_dir: Path, out: Path, model: str, model_args: str, batch_size: int) -> tuple[dict, float]:
    """Run the harness; its samples by doc id ({"resps": [(loglikelihood, is_greedy), ...], "acc"}) and its wall time."""
    cmd = [exe, "--model", model, "--model_args", model_args, "--batch_size", str(batch_size), "--tasks", "capitals",
           "--include_path", str(task_dir), "--output_path", str(out), "--log_samples", "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        errors = [line for line in run.stderr.splitlines() if "Error" in line or "error" in line][:5]
        raise RuntimeError(f"lm_eval --model {model} failed ({run.returncode}); its first errors:\n"
                           + "\n".join(errors) + f"\nthe last of its log:\n{run.stderr[-2000:]}")
    [path] = out.glob("**/samples_capitals_*.jsonl")
    samples = {}
    for s in map(json.loads, path.read_text().splitlines()):
        samples[s["doc_id"]] = {"resps": [(float(ll), str(is_greedy) == "True") for ll, is_greedy in s["filtered_resps"]],
                                "acc": s["acc"]}
    return samples, wall


def compare(ours: dict, oracle: dict) -> dict:
    pairs = [(a, b) for doc in oracle for a, b in zip(ours[doc]["resps"], oracle[doc]["resps"], strict=True)]
    diffs = [abs(a[0] - b[0]) for a, b in pairs]
    return {"requests": len(pairs), "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
            "is_greedy_agree": sum(a[1] == b[1] for a, b in pairs), "greedy": sum(a[1] for a, _ in pairs),
            "acc": sum(ours[d]["acc"] for d in ours) / len(ours),
            "acc_agree": sum(ours[d]["acc"] == oracle[d]["acc"] for d in oracle)}


def served_model(url: str) -> str:
    import httpx

    return httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]


def run(args) -> tuple[dict, list[dict]]:
    path = resolve_model_path(args.model, progress=log)
    with tempfile.TemporaryDirectory(prefix="dejavu-lmeval-") as tmp:
        tmp = Path(tmp)
        write_task(tmp)
        log(f"lm_eval --model hf, float32 (the oracle): {len(CAPITALS)} questions, {4 * len(CAPITALS)} requests")
        oracle, oracle_s = lm_eval(args.lm_eval, tmp, tmp / "hf", "hf", f"pretrained={path},dtype=float32",
                                   args.batch_size)
        rows = [{"target": "hf", "wall_s": oracle_s, "acc": sum(s["acc"] for s in oracle.values()) / len(oracle)}]
        for target in args.targets:
            log(f"starting a {target} cluster")
            with targets.started(target, args, path) as url:  # placed as `dejavu up` places them
                model_args = (f"model={served_model(url)},base_url={url}/v1/completions,"
                              f"num_concurrent={args.concurrency},max_retries=1,tokenizer_backend=huggingface,"
                              f"tokenizer={path}")
                log(f"lm_eval --model local-completions against {target} at {url}")
                ours, wall = lm_eval(args.lm_eval, tmp, tmp / target, "local-completions", model_args, args.batch_size)
            rows.append({"target": target, "wall_s": wall, **compare(ours, oracle)})
            log(f"{target}: {rows[-1]}")
    summary = {r["target"]: {k: r[k] for k in ("max_abs_diff", "is_greedy_agree", "greedy", "acc_agree", "wall_s") if k in r}
               for r in rows}
    return summary, rows


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("lmeval", __doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2' or a Hugging Face model folder")
    p.add_argument("--targets", default="disaggregated,colocated", help="comma-separated: disaggregated, colocated")
    p.add_argument("--lm-eval", default=str(targets.PEER_DIR / "lmeval/bin/lm_eval"),
                   help="the harness's lm_eval (bench/peers.sh lmeval puts it there)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts a request (and the oracle's batch size)")
    p.add_argument("--concurrency", type=int, default=2, help="requests at once (the harness's num_concurrent)")
    p.add_argument("--out", default="", metavar="FILE.json", help="write the figures to this JSON file")
    args = p.parse_args(argv)
    args.dtype = "float32"  # our clusters', as the oracle's
    args.targets = [t for t in args.targets.split(",") if t]
    if not args.targets or set(args.targets) - {"disaggregated", "colocated"}:
        p.error(f"--targets {','.join(args.targets)!r}: give disaggregated, colocated or both")
    if not Path(args.lm_eval).is_file():
        p.error(f"--lm-eval {args.lm_eval}: not found; `bench/peers.sh lmeval` installs it there")
    if min(args.batch_size, args.concurrency) < 1:
        p.error("--batch-size and --concurrency must be >= 1")
    summary, rows = run(args)
    print(f"{'target':<14} {'wall s':>7} {'acc':>5} {'max |dLL|':>10} {'mean |dLL|':>11} {'is_greedy':>10} {'greedy':>7} {'acc agree':>10}")
    for r in rows:
        if r["target"] == "hf":
            print(f"{'hf (oracle)':<14} {r['wall_s']:>7.1f} {r['acc']:>5.2f}")
        else:
            print(f"{r['target']:<14} {r['wall_s']:>7.1f} {r['acc']:>5.2f} {r['max_abs_diff']:>10.2e} "
                  f"{r['mean_abs_diff']:>11.2e} {r['is_greedy_agree']:>5}/{r['requests']:<4} {r['greedy']:>7} "
                  f"{r['acc_agree']:>5}/{len(CAPITALS)}")
    write_json(args.out, summary, config={k: v for k, v in vars(args).items() if k != "out"}, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
