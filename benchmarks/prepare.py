"""Benchmark of the prepare job and of reading its shards.

(a) prepare throughput (documents/s, tokens/s) of ``scilm prepare ... cluster=none`` on 1
    rank against ``mpirun -n R`` (``--ranks``), each rank on one core: end to end (wall
    clock, process start included) and compute (the slowest rank's tokenize+write seconds,
    the manifest's ``prepare.rank_seconds``). Goal: 2 ranks >= 1.7x 1 rank (compute).
(b) read throughput: the prepared train split through ``ShardDataset`` (fresh each repeat)
    against ``json.loads`` of the JSONL and the same tokenizer in batches of 512 on the
    fly. Goal: shards >= 20x on the fly.

The corpus is replicated (``--replicate``; default ~60k documents) so that tokenization
dominates; 1-rank and R-rank runs alternate within a repeat. Each run records the CPU the
rest of the machine used meanwhile ("other load": ``/proc/stat`` minus our children).
Prints tables of medians and of the fastest runs, then one JSON line (multi-rank keys name
the rank count: ``prepare_2rank_...``, ``prepare_scaling_2v1``).

    python benchmarks/prepare.py [--repeats 3] [--corpus FILE] [--model minilm] [--out DIR]
    quick check: --repeats 1 --replicate 1 --no-warmup
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from itertools import islice
from pathlib import Path
from typing import Any

import _common as bench

THREAD_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
TARGET_DOCS = 60_000
SCALING_GOAL = 1.7
READ_GOAL = 20.0
READ_BATCH = 512
CORPUS_HELP = "JSONL corpus ({text, label} per line), or a directory holding train.jsonl"

# This process tokenizes on the fly in (b): one thread, like each prepare rank.
os.environ.update(THREAD_ENV)

# ratios of rank counts: name -> the figure divided
RATIOS = {"scaling": "docs_per_s", "wall_scaling": "wall_docs_per_s"}
RATIOS |= {f"{k}_best": f"best_{v}" for k, v in RATIOS.items()}
# per rank count: key (JSON: prepare_NRANKrank_KEY), table label, JSON digits (None: table
# only), the ratio shown beside it
FIGURES = [
    ("docs_per_s", "compute docs/s", 1, "scaling"),
    ("tokens_per_s", "compute tokens/s", 1, "scaling"),
    ("wall_docs_per_s", "end-to-end docs/s", 1, "wall_scaling"),
    ("wall_tokens_per_s", "end-to-end tokens/s", 1, "wall_scaling"),
    ("compute_s", "tokenize+write s (max)", 3, None),
    ("wall_s", "wall s", 3, None),
    ("other_load_cores", "other load (cores)", 2, None),
    ("best_docs_per_s", "best compute docs/s", 1, "scaling_best"),
    ("best_wall_docs_per_s", "best end-to-end docs/s", None, "wall_scaling_best"),
]


def cpu_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores, /proc/stat)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return float("nan")
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    busy = sum(values[:8]) - idle  # user..steal; guest is already counted in user
    return busy / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_prepare(corpus: Path, work: Path, ranks: int, args: Any) -> dict[str, Any]:
    """One ``scilm prepare`` run; wall seconds, its manifest's figures and other load."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shard_size = f"data.examples_per_shard={args.examples_per_shard}"
    model = f"model.name_or_path={args.model}"
    cmd = bench.prepare_command(work, {"train": corpus}, shard_size, model)
    if ranks > 1:
        exports = [a for k in THREAD_ENV for a in ("-x", k)]
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks), *exports, *cmd]
    busy0, own0 = cpu_busy_seconds(), children_cpu_seconds()
    wall = bench.run(cmd, THREAD_ENV)
    own = children_cpu_seconds() - own0
    manifest = json.loads((work / "shards/manifest.json").read_text(encoding="utf-8"))
    seconds = manifest["prepare"]["rank_seconds"]  # the job's own summary
    if len(seconds) != ranks:
        raise SystemExit(f"expected {ranks} rank_seconds, got {seconds}")
    train = manifest["splits"]["train"]
    return {
        "wall_s": wall,
        "compute_s": max(seconds),
        "rank_seconds": seconds,
        "n_examples": int(train["n_examples"]),
        "n_tokens": int(train["n_tokens"]),
        "other_load_cores": max(0.0, (cpu_busy_seconds() - busy0 - own) / wall),
        "checksums": [s["sha256"] for sp in manifest["splits"].values() for s in sp["shards"]],
    }


def figures(rs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Medians (and the fastest run) of one rank count's runs; None where none ran."""
    if not rs:
        return {key: None for key, *_ in FIGURES}
    docs = [r["n_examples"] / r["compute_s"] for r in rs]
    wall_docs = [r["n_examples"] / r["wall_s"] for r in rs]
    medians = {k: bench.median(r[k] for r in rs) for k in ("compute_s", "wall_s")}
    return {
        "docs_per_s": bench.median(docs),
        "tokens_per_s": bench.median(r["n_tokens"] / r["compute_s"] for r in rs),
        "wall_docs_per_s": bench.median(wall_docs),
        "wall_tokens_per_s": bench.median(r["n_tokens"] / r["wall_s"] for r in rs),
        **medians,
        "other_load_cores": bench.median(r["other_load_cores"] for r in rs),
        "best_docs_per_s": max(docs),
        "best_wall_docs_per_s": max(wall_docs),
    }


def read_shards(shards: Path) -> tuple[float, int, int]:
    """Seconds, examples and tokens of iterating the train split via ShardDataset."""
    from scilm_hpc.data.dataset import ShardDataset

    t0 = time.perf_counter()
    ds = ShardDataset(shards, "train")
    n_tokens = sum(len(ds[i]["input_ids"]) for i in range(len(ds)))
    return time.perf_counter() - t0, len(ds), n_tokens


def read_on_the_fly(corpus: Path, tokenizer: Any, max_length: int) -> tuple[float, int, int]:
    """Seconds, examples and tokens of json.loads + batched tokenization of the JSONL."""
    t0 = time.perf_counter()
    n_examples = n_tokens = 0
    with corpus.open(encoding="utf-8") as fh:
        texts = (json.loads(line)["text"] for line in fh if line.strip())
        while batch := list(islice(texts, READ_BATCH)):
            for ids in tokenizer(batch, truncation=True, max_length=max_length)["input_ids"]:
                n_examples += 1
                n_tokens += len(ids)
    return time.perf_counter() - t0, n_examples, n_tokens


def rnd(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def measure_read(corpus: Path, shards: Path, args: Any) -> dict[str, list[float]]:
    """(b): examples/s and tokens/s (medians) of reading the shards and on the fly."""
    from scilm_hpc.data.shards import read_manifest
    from scilm_hpc.model_source import load_tokenizer

    max_length = int(read_manifest(shards)["max_length"])
    tokenizer = load_tokenizer(args.model)
    timed: dict[str, list[tuple[float, int, int]]] = {"shard_read": [], "onthefly": []}
    for _ in range(args.repeats):
        timed["shard_read"].append(read_shards(shards))
        timed["onthefly"].append(read_on_the_fly(corpus, tokenizer, max_length))
    (_, s_ex, s_tok), (_, f_ex, f_tok) = timed["shard_read"][-1], timed["onthefly"][-1]
    if (s_ex, s_tok) != (f_ex, f_tok):
        print(f"warning: shards hold {s_ex} examples / {s_tok} tokens, on the fly {f_ex} / {f_tok}")
    print(f"read, {s_ex} examples / {s_tok} tokens, median of {args.repeats}:")
    return {  # examples/s and tokens/s, medians
        name: [count / bench.median(t[0] for t in runs) for count in runs[-1][1:]]
        for name, runs in timed.items()
    }


def measure(args: Any, out: Path, nproc: int) -> None:
    lines = [ln for ln in args.corpus.read_text(encoding="utf-8").splitlines() if ln.strip()]
    times = args.replicate or max(1, round(TARGET_DOCS / max(1, len(lines))))
    corpus = out / "corpus.jsonl"
    corpus.write_text(("\n".join(lines) + "\n") * times, encoding="utf-8")
    mpirun, r = shutil.which("mpirun"), args.ranks
    size = f"{times * len(lines)} documents ({corpus.stat().st_size / 2**20:.1f} MiB)"
    setup = f"examples_per_shard={args.examples_per_shard}, model={args.model}"
    setup += f", repeats={args.repeats}, machine: {nproc} CPU(s)"
    print(f"corpus: {args.corpus} x{times} = {size}, {setup}")
    env_note = " ".join(f"{k}={v}" for k, v in THREAD_ENV.items())
    print(f"each rank on one core: {env_note} (1 rank, {r} ranks and the on-the-fly reference)")
    if mpirun is None:
        print("mpirun not found on PATH: skipping the multi-rank prepare runs")
    if nproc < r:
        print(f"note: {r} ranks on {nproc} CPU(s): scaling cannot reach the goal")
    if not args.no_warmup:
        run_prepare(corpus, out / "warmup", 1, args)
        shutil.rmtree(out / "warmup", ignore_errors=True)

    runs: dict[int, list[dict[str, Any]]] = {1: [], r: []} if mpirun else {1: []}
    for rep in range(args.repeats):
        for ranks in runs:
            x = run_prepare(corpus, out / f"prep-{ranks}r", ranks, args)
            runs[ranks].append(x)
            print(
                f"  repeat {rep + 1}: {ranks} rank(s): wall {x['wall_s']:6.2f} s, "
                f"tokenize+write {', '.join(f'{s:.2f}' for s in x['rank_seconds'])} s, "
                f"other load {x['other_load_cores']:.2f} core(s)",
                flush=True,
            )
    identical = runs[1][0]["checksums"] == runs[r][0]["checksums"] if mpirun else None
    one, many = figures(runs[1]), figures(runs.get(r, []))
    ratios = {q: many[k] / one[k] if many[k] else None for q, k in RATIOS.items()}  # type: ignore
    scaling = ratios["scaling"]
    n_examples, n_tokens = runs[1][0]["n_examples"], runs[1][0]["n_tokens"]
    print(f"\nprepare, {n_examples} documents / {n_tokens} tokens, median of {args.repeats}:")
    rows = {label: [one[k], many[k], ratios.get(q or "")] for k, label, _, q in FIGURES}
    bench.table(["1 rank", f"{r} ranks", f"{r}/1"], rows, label=26)
    if scaling is not None:
        verdict = "met" if scaling >= SCALING_GOAL else "MISSED"
        print(
            f"  goal: {r} ranks >= {SCALING_GOAL}x 1 rank (compute): {scaling:.2f}x, {verdict}"
            f" (fastest runs: {ratios['scaling_best']:.2f}x); shards identical 1 vs {r} "
            f"ranks: {identical}"
        )
        if verdict == "MISSED" and many["other_load_cores"] and many["other_load_cores"] > 0.2:
            print(
                f"  note: other processes used {many['other_load_cores']:.2f} core(s) during "
                f"the {r}-rank runs; on {nproc} CPU(s) that alone caps the scaling"
            )

    # (b) reading: the shards of the last 1-rank run against tokenizing on the fly.
    read = measure_read(corpus, out / "prep-1r/shards", args)
    read_ratio = read["shard_read"][0] / read["onthefly"][0]
    labels = {"shard_read": "ShardDataset ds[i]", "onthefly": f"JSONL + tokenize (b={READ_BATCH})"}
    bench.table(["examples/s", "tokens/s"], {labels[k]: v for k, v in read.items()}, label=30)
    print(
        f"  goal: shards >= {READ_GOAL:.0f}x on the fly: {read_ratio:.1f}x, "
        f"{'met' if read_ratio >= READ_GOAL else 'MISSED'}"
    )
    result = {
        "benchmark": "prepare",
        "corpus": str(args.corpus),
        "replicate": times,
        **{k: getattr(args, k) for k in ("model", "repeats", "examples_per_shard")},
        "thread_env": THREAD_ENV,
        "ranks": r,
        "prepare_n_examples": n_examples,
        "prepare_n_tokens": n_tokens,
    }
    for tag, values in (("1", one), (str(r), many)):
        for key, _, digits, _ in FIGURES:
            if digits is not None:
                result[f"prepare_{tag}rank_{key}"] = rnd(values[key], digits)
    for name, ratio in ratios.items():  # prepare_scaling_2v1, prepare_scaling_2v1_best, ...
        best = "_best" if name.endswith("_best") else ""
        result[f"prepare_{name.removesuffix('_best')}_{r}v1{best}"] = rnd(ratio, 3)
    goal_met = None if scaling is None else scaling >= SCALING_GOAL
    result |= {"prepare_scaling_goal": SCALING_GOAL, "prepare_scaling_goal_met": goal_met}
    result |= {f"prepare_shards_identical_1v{r}": identical, "prepare_mpirun": mpirun is not None}
    for name, (examples, tokens) in read.items():
        result |= {f"{name}_examples_per_s": rnd(examples), f"{name}_tokens_per_s": rnd(tokens)}
    result |= {"read_ratio_vs_onthefly": rnd(read_ratio, 2), "read_goal": READ_GOAL}
    result |= {"read_goal_met": read_ratio >= READ_GOAL, "machine": nproc}
    print(json.dumps(result))


def main() -> None:
    p = bench.command_line(__doc__, examples_per_shard=2048, no_warmup=False, out=None)
    p.add_argument("--corpus", type=Path, default=bench.SCICITE / "train.jsonl", help=CORPUS_HELP)
    p.add_argument("--model", default="minilm", help="model.name_or_path of the tokenizer")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats")
    p.add_argument("--replicate", type=int, help=f"corpus K times (default ~{TARGET_DOCS} docs)")
    p.add_argument("--ranks", type=int, default=2, help="MPI ranks of the parallel run")
    args = p.parse_args()
    if args.corpus.is_dir():
        args.corpus = args.corpus / "train.jsonl"
    if not args.corpus.is_file():
        p.error(f"--corpus: '{args.corpus}' is not a file")
    if args.repeats < 1:
        p.error("--repeats: must be >= 1")
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = bench.work_dir(args.out, "prepare")
    try:
        measure(args, out, nproc or 1)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
