"""Benchmark: peak memory of ``scilm prepare`` against corpus size (goal: flat).

A JSONL corpus (default: SciCite train, ``{text, label}`` per line) is written 1x and
``--times`` x (default 10) and prepared by the real CLI on one rank (``cluster=none``,
one tokenizer thread). Per size: the peak RSS of the prepare process (polled VmHWM and
the kernel's figure for the reaped process), the wall clock and records/s (documents
over wall seconds, process start included). With ``--pythonpath DIR`` the same runs
use another checkout of the suite (e.g. the in-memory path before streaming), to
compare both on the same machine:

    python benchmarks/prepare_memory.py [--times 10] [--corpus FILE] [--pythonpath DIR]

Ends with one JSON line holding every figure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import _common as bench

THREAD_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}


def main() -> None:
    p = bench.command_line(
        __doc__, corpus=(Path, bench.SCICITE / "train.jsonl"), examples_per_shard=4096, out=None
    )
    p.add_argument("--times", type=int, default=10, help="the larger corpus: this many copies")
    p.add_argument("--model", default="minilm", help="model.name_or_path of the tokenizer")
    p.add_argument("--pythonpath", type=Path, default=None, help="run this checkout's scilm_hpc")
    args = p.parse_args()
    work = bench.work_dir(args.out, "prepare-memory")
    lines = [x for x in args.corpus.read_text(encoding="utf-8").splitlines() if x.strip()]
    env = {**os.environ, **THREAD_ENV}
    if args.pythonpath is not None:
        env["PYTHONPATH"] = str(args.pythonpath.resolve())
    figures: dict[str, float | int | str] = {"code": str(args.pythonpath or bench.REPO)}
    for times in (1, args.times):
        corpus = work / f"corpus-x{times}.jsonl"
        corpus.write_text(("\n".join(lines) + "\n") * times, encoding="utf-8")
        run_dir = work / f"run-x{times}"
        cmd = bench.prepare_command(
            run_dir,
            {"train": corpus},
            f"data.examples_per_shard={args.examples_per_shard}",
            f"model.name_or_path={args.model}",
        )
        measured = bench.run_measured(cmd, work / f"prepare-x{times}.log", env)
        manifest = json.loads((run_dir / "shards/manifest.json").read_text(encoding="utf-8"))
        documents = manifest["splits"]["train"]["n_examples"]
        figures[f"x{times}_corpus_mb"] = round(corpus.stat().st_size / 2**20, 1)
        figures[f"x{times}_documents"] = documents
        figures[f"x{times}_peak_rss_mb"] = round(measured["peak_rss_mb"], 1)
        figures[f"x{times}_wall_s"] = round(measured["wall_s"], 1)
        figures[f"x{times}_records_per_s"] = round(documents / measured["wall_s"], 1)
        compute = max(manifest["prepare"]["rank_seconds"])
        figures[f"x{times}_records_per_compute_s"] = round(documents / compute, 1)
    growth = figures[f"x{args.times}_peak_rss_mb"] - figures["x1_peak_rss_mb"]  # type: ignore[operator]
    figures["peak_rss_growth_mb"] = round(growth, 1)
    bench.report(figures)


if __name__ == "__main__":
    main()
