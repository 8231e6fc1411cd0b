"""Compress MiniLM fine-tuned on SciCite with the shipped recipes; size, speed, accuracy.

One ``scilm compress`` run per recipe on the SciCite test split, the dense model measured
in the same run (process, batch, threads): latency is the median of ``--repeats`` forward
passes of one batch of 32 test sentences. Recipes: int8-dynamic and int4-weight (each on
torch's kernels and on torchao: ``-torchao``), int8-static (torchao PT2E + inductor;
its latency is of the compiled graph, compiled before the timed passes), prune50-recover
(Wanda, and magnitude), structured30. Goals (issue 6): int8-dynamic (and int8-static)
>= 2x faster, <= 1 point macro-F1 lost; prune50-recover <= 1 point lost, Wanda no worse
than magnitude; structured30 >= 1.3x faster; int4-weight >= 3x smaller on disk.

    python benchmarks/compress.py [--export RUN/export --shards RUN/shards] [--recipes ...]
    (without --export: first benchmarks/finetune_scicite.py, one epoch of MiniLM)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import _common as bench

RUNS = {
    "int8-dynamic": ["compress=int8-dynamic"],
    "int8-dynamic-torchao": ["compress=int8-dynamic-torchao"],
    "int8-static": ["compress=int8-static"],
    "int4-weight": ["compress=int4-weight"],
    "int4-weight-torchao": ["compress=int4-weight", "compress.steps.0.backend=torchao"],
    "prune50-recover": ["compress=prune50-recover"],
    "prune50-recover-magnitude": ["compress=prune50-recover", "compress.steps.0.method=magnitude"],
    "structured30": ["compress=structured30"],
}


def compress(name: str, export: Path, shards: Path, run_dir: Path, args: Any) -> dict:
    """One ``scilm compress`` run of recipe ``name``; its report and wall seconds."""
    paths = [f"run.dir={run_dir}", f"model.name_or_path={export}", f"data.shards={shards}"]
    latency = [f"compress.latency_{k}={getattr(args, k)}" for k in ("repeats", "threads")]
    test = ["cluster=none", "compress.eval_split=test"]
    wall = bench.run(bench.job_command("compress", *paths, *test, *latency, *RUNS[name]))
    return {**json.loads((run_dir / "compress_report.json").read_text()), "wall_s": wall}


def summary(report: dict) -> dict[str, Any]:
    """The figures of one recipe against the dense model measured in the same run."""
    base, last = report["baseline"], report["steps"][-1]

    def f1(step: dict) -> float:
        return round(100 * step["metrics"]["macro_f1"], 2)

    change = 100 * (last["metrics"]["macro_f1"] - base["metrics"]["macro_f1"])
    row = {
        "dense_macro_f1": f1(base),
        "macro_f1": f1(last),
        "f1_change_points": round(change, 2),
        "dense_latency_ms": round(base["latency_ms"], 1),
        "latency_ms": round(last["latency_ms"], 1),
        "speedup": round(last["speedup"], 2),
        "dense_size_mb": round(base["size_bytes"] / 1e6, 1),
        "size_mb": round(last["size_bytes"] / 1e6, 1),
        "size_ratio": round(last["size_ratio"], 2),
        "sparsity": round(last["sparsity"], 3),
        "wall_s": round(report["wall_s"], 1),
    }
    kinds = {s["kind"]: s for s in reversed(report["steps"])}  # the first step of each kind
    if "prune" in kinds:  # before recovery
        row["macro_f1_after_pruning"] = f1(kinds["prune"])
    if "recover" in kinds:
        row["macro_f1_after_recovery"] = f1(kinds["recover"])
        row["speedup_after_recovery"] = round(kinds["recover"]["speedup"], 2)
    return row


def goals(rows: dict[str, dict]) -> dict[str, bool]:
    """Issue 6's goals of the recipes that ran."""
    goals = {}
    if r := rows.get("int8-dynamic"):
        goals["int8_dynamic_2x_faster_within_1pt"] = (
            r["speedup"] >= 2 and r["f1_change_points"] >= -1
        )
    if r := rows.get("int8-static"):
        fast = r["speedup"] >= 2
        goals["int8_static_2x_faster_within_1pt"] = fast and r["f1_change_points"] >= -1
    if r := rows.get("prune50-recover"):
        goals["prune50_recover_within_1pt"] = (
            r["macro_f1_after_recovery"] - r["dense_macro_f1"] >= -1
        )
        if m := rows.get("prune50-recover-magnitude"):
            wanda, magnitude = r["macro_f1_after_recovery"], m["macro_f1_after_recovery"]
            goals["wanda_no_worse_than_magnitude"] = wanda >= magnitude
    if "structured30" in rows:
        goals["structured30_1_3x_faster"] = rows["structured30"]["speedup"] >= 1.3
    if "int4-weight" in rows:
        goals["int4_3x_smaller"] = rows["int4-weight"]["size_ratio"] >= 3.0
    return goals


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
        script = str(bench.REPO / "benchmarks/finetune_scicite.py")
        bench.run([sys.executable, script, "--out", str(out)])
        export, shards = out / "ft" / "export", out / "shards"
    rows = {}
    for name in args.recipes:
        rows[name] = summary(compress(name, export, shards, out / name, args))
        print(f"{name:>26}: {json.dumps(rows[name])}", flush=True)
    met = goals(rows)
    for goal, ok in met.items():
        print(f"{goal:>40}: {'met' if ok else 'NOT met'}")
    print(
        json.dumps({"benchmark": "compress", "export": str(export), "recipes": rows, "goals": met})
    )


if __name__ == "__main__":
    main()
