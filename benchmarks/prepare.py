"""Benchmark of the prepare job and of reading its shards.

(a) prepare throughput (documents/s, tokens/s) of the real CLI, 1 rank
    (``scilm prepare ... cluster=none``) against 2 MPI ranks
    (``mpirun -n 2 scilm prepare ... cluster=none``), each rank on one core
    (``TOKENIZERS_PARALLELISM=false``, ``RAYON_NUM_THREADS=1``). Two figures per
    run: end to end (wall clock of the whole command, process start included) and
    compute (examples / the slowest rank's tokenize+write seconds, which the CLI
    prints as ``rank_seconds``). Goal: 2 ranks >= 1.7x 1 rank (compute).
(b) read throughput: every example of the prepared train split through
    ``ShardDataset`` (fresh dataset each repeat, so HDF5 reading is included),
    against reading the JSONL with ``json.loads`` and tokenizing on the fly with
    the same tokenizer in batches of 512. Goal: shards >= 20x on the fly.

The corpus is replicated K times (``--replicate``, default: ~60k documents) so
that tokenization, not process start-up, dominates a prepare run. 1-rank and
2-rank runs alternate within each repeat so that both see the same machine.
Because a shared machine's other tenants can steal a core, every run also
records how much CPU the rest of the machine used during it (``/proc/stat``
busy time minus this benchmark's own children), reported as "other load".

    python benchmarks/prepare.py [--repeats 3] [--corpus FILE] [--model minilm] [--out DIR]

Prints a table of medians (and of the fastest run of each kind, the figure least
disturbed by other tenants) and ends with one JSON line holding every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS_DIR = REPO.parent / "shared/data/scicite"
THREAD_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
TARGET_DOCS = 60_000
SCALING_GOAL = 1.7
READ_GOAL = 20.0
READ_BATCH = 512
MPI_TAG = re.compile(r"\[\d+,(\d+)\]<stdout>:")

# This process tokenizes on the fly in (b): one thread, like each prepare rank.
os.environ.update(THREAD_ENV)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--corpus",
        type=Path,
        default=DEFAULT_CORPUS_DIR / "train.jsonl",
        help="JSONL corpus ({text, label} per line), or a directory holding "
        "train.jsonl (default: %(default)s)",
    )
    p.add_argument(
        "--model",
        default="minilm",
        help="model.name_or_path whose tokenizer is used (default: %(default)s)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (default: 3)")
    p.add_argument(
        "--replicate",
        type=int,
        default=None,
        help=f"concatenate the corpus K times (default: ~{TARGET_DOCS} documents)",
    )
    p.add_argument(
        "--examples-per-shard",
        type=int,
        default=2048,
        help="data.examples_per_shard (default: %(default)s)",
    )
    p.add_argument("--ranks", type=int, default=2, help="MPI ranks of the parallel run")
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the untimed warm-up prepare (fills the page cache)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="working directory (kept); default: a temporary one, removed",
    )
    args = p.parse_args(argv)
    if args.corpus.is_dir():
        args.corpus = args.corpus / "train.jsonl"
    if not args.corpus.is_file():
        p.error(f"--corpus: '{args.corpus}' is not a file")
    if args.repeats < 1:
        p.error("--repeats: must be >= 1")
    return args


def scilm_command() -> list[str]:
    """The ``scilm`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("scilm")
    if script.is_file():
        return [str(script)]
    found = shutil.which("scilm")
    return [found] if found else [sys.executable, "-m", "scilm_hpc.cli"]


def replicate_corpus(src: Path, dst: Path, times: int | None) -> tuple[int, int]:
    """Write ``src`` concatenated ``times`` times to ``dst``; (times, documents)."""
    lines = [ln for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if times is None:
        times = max(1, round(TARGET_DOCS / max(1, len(lines))))
    body = "\n".join(lines) + "\n"
    with dst.open("w", encoding="utf-8") as fh:
        for _ in range(times):
            fh.write(body)
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


def find_summary(text: str) -> dict[str, Any]:
    """The prepare summary (the JSON object holding ``rank_seconds``) in ``text``."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "rank_seconds" in obj:
            return obj
    raise ValueError("no JSON summary with 'rank_seconds' in the output")


def rank0_stdout(mpi_out: Path, captured: str) -> str:
    """Rank 0's stdout of an mpirun run (other ranks print ``{}``).

    Read from rank 0's file of ``--output-filename`` when there is one, else from
    mpirun's own stdout; either may carry ``--tag-output`` tags, and in the
    forwarded copy the ranks' fragments may interleave, so only text that follows
    a rank-0 tag is kept.
    """
    files = sorted(mpi_out.glob("*/rank.0/stdout"))
    text = files[-1].read_text(encoding="utf-8", errors="replace") if files else captured
    parts = MPI_TAG.split(text)  # [before, rank, text, rank, text, ...]
    if len(parts) == 1:
        return text
    return "".join(
        chunk for rank, chunk in zip(parts[1::2], parts[2::2], strict=True) if rank == "0"
    )


def run_prepare(corpus: Path, work: Path, ranks: int, per_shard: int, model: str) -> dict[str, Any]:
    """One ``scilm prepare`` run; wall seconds, the CLI's summary and other load."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cmd = scilm_command() + [
        "prepare",
        "jobs/prepare.yaml",
        "cluster=none",
        f"data.train={corpus}",
        f"run.dir={work}",
        f"data.shards={work / 'shards'}",
        f"data.examples_per_shard={per_shard}",
        f"model.name_or_path={model}",
    ]
    if ranks > 1:
        exports = [a for k in THREAD_ENV for a in ("-x", k)]
        cmd = [
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "--tag-output",
            "--output-filename",
            str(work / "mpi-out"),
            "-n",
            str(ranks),
            *exports,
            *cmd,
        ]
    env = {**os.environ, **THREAD_ENV}
    busy0, own0 = cpu_busy_seconds(), children_cpu_seconds()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    busy1, own1 = cpu_busy_seconds(), children_cpu_seconds()
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(
            f"prepare ({ranks} rank(s)) failed with status {proc.returncode}: {' '.join(cmd)}"
        )
    stdout = rank0_stdout(work / "mpi-out", proc.stdout) if ranks > 1 else proc.stdout
    try:
        summary = find_summary(stdout)
    except ValueError as exc:
        sys.stderr.write(proc.stdout[-4000:])
        raise SystemExit(f"prepare ({ranks} rank(s)): {exc}: {' '.join(cmd)}") from None
    train = summary["splits"]["train"]
    if len(summary["rank_seconds"]) != ranks:
        raise SystemExit(f"expected {ranks} rank_seconds, got {summary['rank_seconds']}")
    own = own1 - own0
    return {
        "wall_s": wall,
        "compute_s": max(summary["rank_seconds"]),
        "rank_seconds": summary["rank_seconds"],
        "n_examples": int(train["n_examples"]),
        "n_tokens": int(train["n_tokens"]),
        "cpu_s": own,
        "other_load_cores": max(0.0, (busy1 - busy0 - own) / wall),
        "shards": work / "shards",
    }


def shard_checksums(shards: Path) -> list[str]:
    manifest = json.loads((shards / "manifest.json").read_text(encoding="utf-8"))
    return [s["sha256"] for split in manifest["splits"].values() for s in split["shards"]]


def read_shards(shards: Path) -> tuple[float, int, int]:
    """Seconds, examples and tokens of iterating the train split via ShardDataset."""
    from scilm_hpc.data.dataset import ShardDataset

    t0 = time.perf_counter()
    ds = ShardDataset(shards, "train")
    n_tokens = 0
    for i in range(len(ds)):
        n_tokens += len(ds[i]["input_ids"])
    return time.perf_counter() - t0, len(ds), n_tokens


def read_on_the_fly(corpus: Path, tokenizer: Any, max_length: int) -> tuple[float, int, int]:
    """Seconds, examples and tokens of json.loads + batched tokenization of the JSONL."""
    t0 = time.perf_counter()
    n_examples = n_tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_examples, n_tokens
        enc = tokenizer(batch, truncation=True, max_length=max_length)
        for ids in enc["input_ids"]:
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


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def rnd(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    own_out = args.out is None
    out = Path(tempfile.mkdtemp(prefix="scilm-bench-prepare-")) if own_out else args.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, out, nproc or 1)
    finally:
        if own_out:
            shutil.rmtree(out, ignore_errors=True)


def run(args: argparse.Namespace, out: Path, nproc: int) -> int:
    corpus = out / "corpus.jsonl"
    times, n_docs = replicate_corpus(args.corpus, corpus, args.replicate)
    mpirun = shutil.which("mpirun")
    env_note = " ".join(f"{k}={v}" for k, v in THREAD_ENV.items())
    print(
        f"corpus: {args.corpus} x{times} = {n_docs} documents "
        f"({corpus.stat().st_size / 2**20:.1f} MiB), examples_per_shard="
        f"{args.examples_per_shard}, model={args.model}, repeats={args.repeats}, "
        f"machine: {nproc} CPU(s)"
    )
    print(
        f"each rank on one core: {env_note} (set for 1 rank, {args.ranks} ranks and the "
        f"on-the-fly reference)"
    )
    if mpirun is None:
        print("mpirun not found on PATH: skipping the multi-rank prepare runs")
    if nproc < args.ranks:
        print(f"note: {args.ranks} ranks on {nproc} CPU(s): scaling cannot reach the goal")

    if not args.no_warmup:
        run_prepare(corpus, out / "warmup", 1, args.examples_per_shard, args.model)
        shutil.rmtree(out / "warmup", ignore_errors=True)

    runs: dict[int, list[dict[str, Any]]] = {1: []}
    if mpirun is not None:
        runs[args.ranks] = []
    identical: bool | None = None
    for rep in range(args.repeats):
        for ranks in runs:
            r = run_prepare(
                corpus, out / f"prep-{ranks}r", ranks, args.examples_per_shard, args.model
            )
            runs[ranks].append(r)
            print(
                f"  repeat {rep + 1}: {ranks} rank(s): wall {r['wall_s']:6.2f} s, "
                f"tokenize+write {', '.join(f'{s:.2f}' for s in r['rank_seconds'])} s, "
                f"other load {r['other_load_cores']:.2f} core(s)",
                flush=True,
            )
        if mpirun is not None and identical is None:
            identical = shard_checksums(out / "prep-1r/shards") == shard_checksums(
                out / f"prep-{args.ranks}r/shards"
            )
    if mpirun is not None:
        shutil.rmtree(out / f"prep-{args.ranks}r", ignore_errors=True)

    def figures(ranks: int) -> dict[str, float | None]:
        rs = runs.get(ranks)
        if not rs:
            return {
                k: None
                for k in (
                    "docs",
                    "tokens",
                    "wall_docs",
                    "wall_tokens",
                    "compute_s",
                    "wall_s",
                    "other_load",
                    "best_docs",
                    "best_wall_docs",
                )
            }
        return {
            "docs": median([r["n_examples"] / r["compute_s"] for r in rs]),
            "tokens": median([r["n_tokens"] / r["compute_s"] for r in rs]),
            "wall_docs": median([r["n_examples"] / r["wall_s"] for r in rs]),
            "wall_tokens": median([r["n_tokens"] / r["wall_s"] for r in rs]),
            "compute_s": median([r["compute_s"] for r in rs]),
            "wall_s": median([r["wall_s"] for r in rs]),
            "other_load": median([r["other_load_cores"] for r in rs]),
            "best_docs": max(r["n_examples"] / r["compute_s"] for r in rs),
            "best_wall_docs": max(r["n_examples"] / r["wall_s"] for r in rs),
        }

    one, many = figures(1), figures(args.ranks)
    scaling = many["docs"] / one["docs"] if many["docs"] else None
    wall_scaling = many["wall_docs"] / one["wall_docs"] if many["wall_docs"] else None
    best = many["best_docs"] / one["best_docs"] if many["best_docs"] else None
    best_wall = many["best_wall_docs"] / one["best_wall_docs"] if many["best_wall_docs"] else None
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
        print(
            f"warning: shards hold {s_ex} examples / {s_tok} tokens, on the fly gives "
            f"{f_ex} / {f_tok}"
        )
    shard_ex_s, fly_ex_s = s_ex / median(shard_t), f_ex / median(fly_t)
    read_ratio = shard_ex_s / fly_ex_s

    r = args.ranks
    print()
    print(
        f"prepare, {n_examples} documents / {n_tokens} tokens, median of {args.repeats} "
        f"(best: fastest run of each):"
    )
    print(f"  {'':24}{'1 rank':>14}{f'{r} ranks':>14}{f'{r}/1':>8}")
    rows = [
        ("compute docs/s", "docs", scaling),
        ("compute tokens/s", "tokens", scaling),
        ("end-to-end docs/s", "wall_docs", wall_scaling),
        ("end-to-end tokens/s", "wall_tokens", wall_scaling),
        ("tokenize+write s (max)", "compute_s", None),
        ("wall s", "wall_s", None),
        ("other load (cores)", "other_load", None),
        ("best compute docs/s", "best_docs", best),
        ("best end-to-end docs/s", "best_wall_docs", best_wall),
    ]
    for label, key, ratio in rows:
        cells = [
            f"{v:14,.2f}"
            if v is not None and v < 100
            else (f"{v:14,.0f}" if v is not None else f"{'-':>14}")
            for v in (one[key], many[key])
        ]
        print(f"  {label:24}{cells[0]}{cells[1]}{f'{ratio:7.2f}x' if ratio else ''}")
    if scaling is not None:
        verdict = "met" if scaling >= SCALING_GOAL else "MISSED"
        print(
            f"  goal: {r} ranks >= {SCALING_GOAL}x 1 rank (compute): {scaling:.2f}x, {verdict}"
            f" (fastest runs: {best:.2f}x); shards identical 1 vs {r} ranks: {identical}"
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
        "prepare_1rank_docs_per_s": rnd(one["docs"]),
        "prepare_1rank_tokens_per_s": rnd(one["tokens"]),
        "prepare_1rank_wall_docs_per_s": rnd(one["wall_docs"]),
        "prepare_1rank_wall_tokens_per_s": rnd(one["wall_tokens"]),
        "prepare_1rank_compute_s": rnd(one["compute_s"], 3),
        "prepare_1rank_wall_s": rnd(one["wall_s"], 3),
        "prepare_1rank_other_load_cores": rnd(one["other_load"], 2),
        "prepare_2rank_docs_per_s": rnd(many["docs"]),
        "prepare_2rank_tokens_per_s": rnd(many["tokens"]),
        "prepare_2rank_wall_docs_per_s": rnd(many["wall_docs"]),
        "prepare_2rank_wall_tokens_per_s": rnd(many["wall_tokens"]),
        "prepare_2rank_compute_s": rnd(many["compute_s"], 3),
        "prepare_2rank_wall_s": rnd(many["wall_s"], 3),
        "prepare_2rank_other_load_cores": rnd(many["other_load"], 2),
        "prepare_scaling_2v1": rnd(scaling, 3),
        "prepare_wall_scaling_2v1": rnd(wall_scaling, 3),
        "prepare_1rank_best_docs_per_s": rnd(one["best_docs"]),
        "prepare_2rank_best_docs_per_s": rnd(many["best_docs"]),
        "prepare_scaling_2v1_best": rnd(best, 3),
        "prepare_wall_scaling_2v1_best": rnd(best_wall, 3),
        "prepare_scaling_goal": SCALING_GOAL,
        "prepare_scaling_goal_met": None if scaling is None else scaling >= SCALING_GOAL,
        "prepare_shards_identical_1v2": identical,
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
