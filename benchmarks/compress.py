"""Compress MiniLM fine-tuned on SciCite with the shipped recipes; size, speed, accuracy.

Each recipe is one ``scilm compress`` run on the SciCite test split. The dense
model is measured in every run (same process, same batch, same threads), so every
speedup and size ratio is against a reference measured in the same run: latency
is the median of ``--repeats`` forward passes of one fixed batch of 32 test
sentences. Recipes: int8-dynamic and int4-weight (each on torch's kernels and on
torchao, the `-torchao` rows), prune50-recover (Wanda, and the
same with magnitude scores), structured30.

Goals (issue 6): int8-dynamic >= 2x faster with <= 1 point macro-F1 lost;
prune50-recover <= 1 point lost and Wanda no worse than magnitude; structured30
>= 1.3x faster; int4-weight >= 3x smaller on disk.

    python benchmarks/compress.py [--export RUN/export --shards RUN/shards] [--recipes ...]

Without ``--export`` it first fine-tunes the packaged MiniLM for one epoch
(``benchmarks/finetune_scicite.py``'s settings).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import _common as bench

RUNS = {
    "int8-dynamic": ["compress=int8-dynamic"],
    "int8-dynamic-torchao": ["compress=int8-dynamic-torchao"],
    "int4-weight": ["compress=int4-weight"],
    "int4-weight-torchao": ["compress=int4-weight", "compress.steps.0.backend=torchao"],
    "prune50-recover": ["compress=prune50-recover"],
    "prune50-recover-magnitude": ["compress=prune50-recover", "compress.steps.0.method=magnitude"],
    "structured30": ["compress=structured30"],
}


def compress(name: str, export: Path, shards: Path, run_dir: Path, args: Any) -> dict:
    """One ``scilm compress`` run of recipe ``name``; its report and wall seconds."""
    start = time.perf_counter()
    overrides = [
        f"run.dir={run_dir}",
        f"model.name_or_path={export}",
        f"data.shards={shards}",
        "cluster=none",
        "compress.eval_split=test",
        f"compress.latency_repeats={args.repeats}",
        f"compress.latency_threads={args.threads}",
    ]
    bench.run(bench.job_command("compress", *overrides, *RUNS[name]))
    report = json.loads((run_dir / "compress_report.json").read_text())
    return {**report, "wall_s": time.perf_counter() - start}


def summary(report: dict) -> dict[str, Any]:
    """The figures of one recipe against the dense model measured in the same run."""
    base, last = report["baseline"], report["steps"][-1]

    def f1(step: dict) -> float:
        return round(100 * step["metrics"]["macro_f1"], 2)

    row = {
        "dense_macro_f1": f1(base),
        "macro_f1": f1(last),
        "f1_change_points": round(
            100 * (last["metrics"]["macro_f1"] - base["metrics"]["macro_f1"]), 2
        ),
        "dense_latency_ms": round(base["latency_ms"], 1),
        "latency_ms": round(last["latency_ms"], 1),
        "speedup": round(last["speedup"], 2),
        "dense_size_mb": round(base["size_bytes"] / 1e6, 1),
        "size_mb": round(last["size_bytes"] / 1e6, 1),
        "size_ratio": round(last["size_ratio"], 2),
        "sparsity": round(last["sparsity"], 3),
        "wall_s": round(report["wall_s"], 1),
    }
    # before recovery (after the pruning step) and after it, where there are such steps
    pruned = [s for s in report["steps"] if s["kind"] == "prune"]
    if pruned:
        row["macro_f1_after_pruning"] = f1(pruned[0])
    recovered = [s for s in report["steps"] if s["kind"] == "recover"]
    if recovered:
        row["macro_f1_after_recovery"] = f1(recovered[0])
        row["speedup_after_recovery"] = round(recovered[0]["speedup"], 2)
    return row


def main() -> None:
    parser = bench.command_line(__doc__, export=(Path, None), shards=(Path, None), out=None)
    parser.add_argument("--recipes", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--repeats", type=int, default=20, help="latency repeats (median)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for latency")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if (args.export is None) != (args.shards is None):
        sys.exit("give --export and --shards together (or neither)")
    out = bench.work_dir(args.out, "compress")
    export, shards = args.export, args.shards
    if export is None:  # fine-tune MiniLM on SciCite with the fine-tuning benchmark
        bench.run(
            [sys.executable, str(bench.REPO / "benchmarks/finetune_scicite.py"), "--out", str(out)]
        )
        export, shards = out / "ft" / "export", out / "shards"
    rows = {}
    for name in args.recipes:
        rows[name] = summary(compress(name, export, shards, out / name, args))
        print(f"{name:>26}: {json.dumps(rows[name])}", flush=True)
    goals = {}
    if "int8-dynamic" in rows:
        r = rows["int8-dynamic"]
        goals["int8_dynamic_2x_faster_within_1pt"] = (
            r["speedup"] >= 2.0 and r["f1_change_points"] >= -1.0
        )
    if "prune50-recover" in rows:
        r = rows["prune50-recover"]
        goals["prune50_recover_within_1pt"] = (
            r["macro_f1_after_recovery"] - r["dense_macro_f1"] >= -1
        )
        if "prune50-recover-magnitude" in rows:
            m = rows["prune50-recover-magnitude"]
            goals["wanda_no_worse_than_magnitude"] = (
                r["macro_f1_after_recovery"] >= m["macro_f1_after_recovery"]
            )
    if "structured30" in rows:
        goals["structured30_1_3x_faster"] = rows["structured30"]["speedup"] >= 1.3
    if "int4-weight" in rows:
        goals["int4_3x_smaller"] = rows["int4-weight"]["size_ratio"] >= 3.0
    for goal, met in goals.items():
        print(f"{goal:>40}: {'met' if met else 'NOT met'}")
    print(
        json.dumps(
            {"benchmark": "compress", "export": str(export), "recipes": rows, "goals": goals}
        )
    )


if __name__ == "__main__":
    main()
