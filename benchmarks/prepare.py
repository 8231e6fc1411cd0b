"""Benchmark of the prepare job and of reading its shards.

(a) prepare throughput (documents/s, tokens/s) of the real CLI, 1 rank
    (``scilm prepare ... cluster=none``) against ``--ranks`` MPI ranks
    (``mpirun -n R scilm prepare ... cluster=none``), each rank on one core
    (``TOKENIZERS_PARALLELISM=false``, ``RAYON_NUM_THREADS=1``). Two figures per
    run: end to end (wall clock of the whole command, process start included) and
    compute (examples / the slowest rank's tokenize+write seconds, which the job
    keeps in the manifest's ``prepare.rank_seconds``). Goal: 2 ranks >= 1.7x 1 rank
    (compute).
(b) read throughput: every example of the prepared train split through
    ``ShardDataset`` (fresh dataset each repeat, so HDF5 reading is included),
    against reading the JSONL with ``json.loads`` and tokenizing on the fly with
    the same tokenizer in batches of 512. Goal: shards >= 20x on the fly.

The corpus is replicated K times (``--replicate``, default: ~60k documents) so
that tokenization, not process start-up, dominates a prepare run. 1-rank and
R-rank runs alternate within each repeat so that both see the same machine.
Because a shared machine's other tenants can steal a core, every run also
records how much CPU the rest of the machine used during it (``/proc/stat``
busy time minus this benchmark's own children), reported as "other load".

    python benchmarks/prepare.py [--repeats 3] [--corpus FILE] [--model minilm] [--out DIR]
    quick check: --repeats 1 --replicate 1 --no-warmup

Prints a table of medians (and of the fastest run of each kind, the figure least
disturbed by other tenants) and ends with one JSON line holding every figure; its
multi-rank keys name the rank count (``prepare_2rank_...``, ``prepare_scaling_2v1``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, SCICITE, SCILM, median, run

THREAD_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
TARGET_DOCS = 60_000
SCALING_GOAL = 1.7
READ_GOAL = 20.0
READ_BATCH = 512

# This process tokenizes on the fly in (b): one thread, like each prepare rank.
os.environ.update(THREAD_ENV)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--corpus",
        type=Path,
        default=SCICITE / "train.jsonl",
        help="JSONL corpus ({text, label} per line), or a directory holding train.jsonl",
    )
    p.add_argument("--model", default="minilm", help="model.name_or_path of the tokenizer")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (default: 3)")
    p.add_argument(
        "--replicate", type=int, default=None, help=f"corpus K times (default ~{TARGET_DOCS} docs)"
    )
    p.add_argument("--examples-per-shard", type=int, default=2048)
    p.add_argument("--ranks", type=int, default=2, help="MPI ranks of the parallel run")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up prepare")
    p.add_argument("--out", type=Path, default=None, help="working directory (kept)")
    args = p.parse_args(argv)
    if args.corpus.is_dir():
        args.corpus = args.corpus / "train.jsonl"
    if not args.corpus.is_file():
        p.error(f"--corpus: '{args.corpus}' is not a file")
    if args.repeats < 1:
        p.error("--repeats: must be >= 1")
    return args


def replicate_corpus(src: Path, dst: Path, times: int | None) -> tuple[int, int]:
    """Write ``src`` concatenated ``times`` times to ``dst``; (times, documents)."""
    lines = [ln for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if times is None:
        times = max(1, round(TARGET_DOCS / max(1, len(lines))))
    dst.write_text(("\n".join(lines) + "\n") * times, encoding="utf-8")
    return times, times * len(lines)


def cpu_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores, /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return float("nan")
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    busy = sum(values[:8]) - idle  # user..steal; guest is already counted in user
    return busy / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_prepare(corpus: Path, work: Path, ranks: int, args: argparse.Namespace) -> dict[str, Any]:
    """One ``scilm prepare`` run; wall seconds, its manifest's figures and other load."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cmd = [
        *SCILM,
        "prepare",
        str(REPO / "jobs/prepare.yaml"),
        "cluster=none",
        f"data.train={corpus}",
        f"run.dir={work}",
        f"data.shards={work / 'shards'}",
        f"data.examples_per_shard={args.examples_per_shard}",
        f"model.name_or_path={args.model}",
    ]
    if ranks > 1:
        exports = [a for k in THREAD_ENV for a in ("-x", k)]
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", str(ranks), *exports, *cmd]
    busy0, own0 = cpu_busy_seconds(), children_cpu_seconds()
    wall = run(cmd, THREAD_ENV)
    own = children_cpu_seconds() - own0
    other = max(0.0, (cpu_busy_seconds() - busy0 - own) / wall)
    manifest = json.loads((work / "shards/manifest.json").read_text(encoding="utf-8"))
    seconds = manifest["prepare"]["rank_seconds"]
    if len(seconds) != ranks:
        raise SystemExit(f"expected {ranks} rank_seconds, got {seconds}")
    train = manifest["splits"]["train"]
    return {
        "wall_s": wall,
        "compute_s": max(seconds),
        "rank_seconds": seconds,
        "n_examples": int(train["n_examples"]),
        "n_tokens": int(train["n_tokens"]),
        "other_load_cores": other,
        "checksums": [s["sha256"] for sp in manifest["splits"].values() for s in sp["shards"]],
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
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_examples, n_tokens
        for ids in tokenizer(batch, truncation=True, max_length=max_length)["input_ids"]:
            n_examples += 1
            n_tokens += len(ids)
        batch.clear()

    with corpus.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                batch.append(json.loads(line)["text"])
                if len(batch) == READ_BATCH:
                    flush()
    if batch:
        flush()
    return time.perf_counter() - t0, n_examples, n_tokens


def rnd(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


# (figure name, its label in the table, the ratio it is compared by)
FIGURES = [
    ("docs", "compute docs/s", "scaling"),
    ("tokens", "compute tokens/s", "scaling"),
    ("wall_docs", "end-to-end docs/s", "wall_scaling"),
    ("wall_tokens", "end-to-end tokens/s", "wall_scaling"),
    ("compute_s", "tokenize+write s (max)", None),
    ("wall_s", "wall s", None),
    ("other_load", "other load (cores)", None),
    ("best_docs", "best compute docs/s", "best"),
    ("best_wall_docs", "best end-to-end docs/s", "best_wall"),
]


def figures(rs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Medians (and the fastest run) of one rank count's runs; None where none ran."""
    if not rs:
        return {name: None for name, _, _ in FIGURES}
    return {
        "docs": median(r["n_examples"] / r["compute_s"] for r in rs),
        "tokens": median(r["n_tokens"] / r["compute_s"] for r in rs),
        "wall_docs": median(r["n_examples"] / r["wall_s"] for r in rs),
        "wall_tokens": median(r["n_tokens"] / r["wall_s"] for r in rs),
        "compute_s": median(r["compute_s"] for r in rs),
        "wall_s": median(r["wall_s"] for r in rs),
        "other_load": median(r["other_load_cores"] for r in rs),
        "best_docs": max(r["n_examples"] / r["compute_s"] for r in rs),
        "best_wall_docs": max(r["n_examples"] / r["wall_s"] for r in rs),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    own_out = args.out is None
    out = Path(tempfile.mkdtemp(prefix="scilm-bench-prepare-")) if own_out else args.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        return measure(args, out, nproc or 1)
    finally:
        if own_out:
            shutil.rmtree(out, ignore_errors=True)


def measure(args: argparse.Namespace, out: Path, nproc: int) -> int:
    corpus = out / "corpus.jsonl"
    times, n_docs = replicate_corpus(args.corpus, corpus, args.replicate)
    mpirun = shutil.which("mpirun")
    r = args.ranks
    print(
        f"corpus: {args.corpus} x{times} = {n_docs} documents "
        f"({corpus.stat().st_size / 2**20:.1f} MiB), examples_per_shard="
        f"{args.examples_per_shard}, model={args.model}, repeats={args.repeats}, "
        f"machine: {nproc} CPU(s)"
    )
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
    ratios = {
        ratio: many[key] / one[key] if many[key] else None
        for key, ratio in (
            ("docs", "scaling"),
            ("wall_docs", "wall_scaling"),
            ("best_docs", "best"),
            ("best_wall_docs", "best_wall"),
        )
    }
    scaling = ratios["scaling"]
    n_examples, n_tokens = runs[1][0]["n_examples"], runs[1][0]["n_tokens"]

    # (b) reading: the shards of the last 1-rank run against tokenizing on the fly.
    from scilm_hpc.data.shards import read_manifest
    from scilm_hpc.model_source import load_tokenizer

    shards = out / "prep-1r/shards"
    max_length = int(read_manifest(shards)["max_length"])
    tokenizer = load_tokenizer(args.model)
    shard_t, fly_t = [], []
    for _ in range(args.repeats):
        s, s_ex, s_tok = read_shards(shards)
        f, f_ex, f_tok = read_on_the_fly(corpus, tokenizer, max_length)
        shard_t.append(s)
        fly_t.append(f)
    if (s_ex, s_tok) != (f_ex, f_tok):
        print(f"warning: shards hold {s_ex} examples / {s_tok} tokens, on the fly {f_ex} / {f_tok}")
    shard_ex_s, fly_ex_s = s_ex / median(shard_t), f_ex / median(fly_t)
    read_ratio = shard_ex_s / fly_ex_s

    print(
        f"\nprepare, {n_examples} documents / {n_tokens} tokens, median of {args.repeats} "
        f"(best: fastest run of each):"
    )
    print(f"  {'':24}{'1 rank':>14}{f'{r} ranks':>14}{f'{r}/1':>8}")
    for key, label, ratio_name in FIGURES:
        cells = [
            f"{'-':>14}" if v is None else f"{v:14,.2f}" if v < 100 else f"{v:14,.0f}"
            for v in (one[key], many[key])
        ]
        ratio = ratios.get(ratio_name or "")
        print(f"  {label:24}{cells[0]}{cells[1]}{f'{ratio:7.2f}x' if ratio else ''}")
    if scaling is not None:
        verdict = "met" if scaling >= SCALING_GOAL else "MISSED"
        print(
            f"  goal: {r} ranks >= {SCALING_GOAL}x 1 rank (compute): {scaling:.2f}x, {verdict}"
            f" (fastest runs: {ratios['best']:.2f}x); shards identical 1 vs {r} ranks: {identical}"
        )
        if verdict == "MISSED" and many["other_load"] and many["other_load"] > 0.2:
            print(
                f"  note: other processes used {many['other_load']:.2f} core(s) during the "
                f"{r}-rank runs; on {nproc} CPU(s) that alone caps the scaling"
            )
    print(f"read, {s_ex} examples / {s_tok} tokens, median of {args.repeats}:")
    print(
        f"  ShardDataset ds[i]          {shard_ex_s:12,.0f} examples/s "
        f"{s_tok / median(shard_t):14,.0f} tokens/s"
    )
    print(
        f"  JSONL + tokenize (b={READ_BATCH})  {fly_ex_s:12,.0f} examples/s "
        f"{f_tok / median(fly_t):14,.0f} tokens/s"
    )
    print(
        f"  goal: shards >= {READ_GOAL:.0f}x on the fly: {read_ratio:.1f}x, "
        f"{'met' if read_ratio >= READ_GOAL else 'MISSED'}"
    )

    per_rank = {
        "docs_per_s": ("docs", 1),
        "tokens_per_s": ("tokens", 1),
        "wall_docs_per_s": ("wall_docs", 1),
        "wall_tokens_per_s": ("wall_tokens", 1),
        "compute_s": ("compute_s", 3),
        "wall_s": ("wall_s", 3),
        "other_load_cores": ("other_load", 2),
    }
    result = {
        "benchmark": "prepare",
        "corpus": str(args.corpus),
        "replicate": times,
        "model": args.model,
        "repeats": args.repeats,
        "examples_per_shard": args.examples_per_shard,
        "thread_env": THREAD_ENV,
        "ranks": r,
        "prepare_n_examples": n_examples,
        "prepare_n_tokens": n_tokens,
        **{f"prepare_1rank_{k}": rnd(one[f], d) for k, (f, d) in per_rank.items()},
        **{f"prepare_{r}rank_{k}": rnd(many[f], d) for k, (f, d) in per_rank.items()},
        f"prepare_scaling_{r}v1": rnd(scaling, 3),
        f"prepare_wall_scaling_{r}v1": rnd(ratios["wall_scaling"], 3),
        "prepare_1rank_best_docs_per_s": rnd(one["best_docs"]),
        f"prepare_{r}rank_best_docs_per_s": rnd(many["best_docs"]),
        f"prepare_scaling_{r}v1_best": rnd(ratios["best"], 3),
        f"prepare_wall_scaling_{r}v1_best": rnd(ratios["best_wall"], 3),
        "prepare_scaling_goal": SCALING_GOAL,
        "prepare_scaling_goal_met": None if scaling is None else scaling >= SCALING_GOAL,
        f"prepare_shards_identical_1v{r}": identical,
        "prepare_mpirun": mpirun is not None,
        "shard_read_examples_per_s": rnd(shard_ex_s),
        "shard_read_tokens_per_s": rnd(s_tok / median(shard_t)),
        "onthefly_examples_per_s": rnd(fly_ex_s),
        "onthefly_tokens_per_s": rnd(f_tok / median(fly_t)),
        "read_ratio_vs_onthefly": rnd(read_ratio, 2),
        "read_goal": READ_GOAL,
        "read_goal_met": read_ratio >= READ_GOAL,
        "machine": nproc,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
