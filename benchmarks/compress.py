"""Compress MiniLM fine-tuned on SciCite with the shipped recipes; size, speed, accuracy.

Each recipe is one ``scilm compress`` run on the SciCite test split. The dense
model is measured in every run (same process, same batch, same threads), so every
speedup and size ratio is against a reference measured in the same run: latency
is the median of ``--repeats`` forward passes of one fixed batch of 32 test
sentences. Recipes: int8-dynamic, int4-weight, prune50-recover (Wanda, and the
same with magnitude scores), structured30.

Goals (issue 6): int8-dynamic >= 2x faster with <= 1 point macro-F1 lost;
prune50-recover <= 1 point lost and Wanda no worse than magnitude; structured30
>= 1.3x faster; int4-weight >= 3x smaller on disk.

    python benchmarks/compress.py [--export RUN/export --shards RUN/shards] [--recipes ...]

Without ``--export`` it first fine-tunes the packaged MiniLM for one epoch
(``benchmarks/finetune_scicite.py``'s settings).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, run, run_scilm

RUNS = {
    "int8-dynamic": ["compress=int8-dynamic"],
    "int4-weight": ["compress=int4-weight"],
    "prune50-recover": ["compress=prune50-recover"],
    "prune50-recover-magnitude": ["compress=prune50-recover", "compress.steps.0.method=magnitude"],
    "structured30": ["compress=structured30"],
}


def finetuned() -> tuple[Path, Path]:
    """Fine-tune MiniLM on SciCite with the fine-tuning benchmark; (export, shards)."""
    out = Path(tempfile.mkdtemp(prefix="scilm-bench-compress-"))
    run([sys.executable, str(REPO / "benchmarks/finetune_scicite.py"), "--out", str(out)])
    return out / "ft" / "export", out / "shards"


def compress(name: str, export: Path, shards: Path, out: Path, args: argparse.Namespace) -> dict:
    run_dir = out / name
    start = time.perf_counter()
    run_scilm(
        "compress",
        str(REPO / "jobs/compress.yaml"),
        f"run.dir={run_dir}",
        f"model.name_or_path={export}",
        f"data.shards={shards}",
        "cluster=none",
        "compress.eval_split=test",
        f"compress.latency_repeats={args.repeats}",
        f"compress.latency_threads={args.threads}",
        *RUNS[name],
    )
    report = json.loads((run_dir / "compress_report.json").read_text())
    report["wall_s"] = time.perf_counter() - start
    return report


def summary(name: str, report: dict) -> dict:
    base, last = report["baseline"], report["steps"][-1]
    f1_base = 100 * base["metrics"]["macro_f1"]
    row = {
        "dense_macro_f1": round(f1_base, 2),
        "macro_f1": round(100 * last["metrics"]["macro_f1"], 2),
        "f1_change_points": round(100 * last["metrics"]["macro_f1"] - f1_base, 2),
        "dense_latency_ms": round(base["latency_ms"], 1),
        "latency_ms": round(last["latency_ms"], 1),
        "speedup": round(last["speedup"], 2),
        "dense_size_mb": round(base["size_bytes"] / 1e6, 1),
        "size_mb": round(last["size_bytes"] / 1e6, 1),
        "size_ratio": round(last["size_ratio"], 2),
        "sparsity": round(last["sparsity"], 3),
        "wall_s": round(report["wall_s"], 1),
    }
    # before recovery (after the pruning step), where there is one
    pruned = [s for s in report["steps"] if s["kind"] == "prune"]
    if pruned:
        row["macro_f1_after_pruning"] = round(100 * pruned[0]["metrics"]["macro_f1"], 2)
    recovered = [s for s in report["steps"] if s["kind"] == "recover"]
    if recovered:
        row["macro_f1_after_recovery"] = round(100 * recovered[0]["metrics"]["macro_f1"], 2)
        row["speedup_after_recovery"] = round(recovered[0]["speedup"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, default=None)
    parser.add_argument("--shards", type=Path, default=None)
    parser.add_argument("--recipes", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--repeats", type=int, default=20, help="latency repeats (median)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for latency")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if (args.export is None) != (args.shards is None):
        sys.exit("give --export and --shards together (or neither)")
    export, shards = (args.export, args.shards) if args.export else finetuned()
    out = args.out or Path(tempfile.mkdtemp(prefix="scilm-bench-compress-runs-"))
    rows = {}
    for name in args.recipes:
        rows[name] = summary(name, compress(name, export, shards, out, args))
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
