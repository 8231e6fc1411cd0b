"""Slurm latencies on the development cluster: submission to first training step, and
the checkpoint-and-requeue turnaround after ``scancel --signal=USR2``.

Needs ``slurm/dev-cluster up``. Runs a 2-node x 1-task fine-tune of a tiny BERT on a
generated corpus, ``--repeats`` times, and prints medians and one JSON line.

    python benchmarks/slurm_turnaround.py [--repeats 3]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import _common as bench


def wait(predicate: Callable[[], bool], timeout: float = 300.0) -> float:
    """Poll ``predicate`` until it holds; the monotonic time it did."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            sys.exit("timed out")
        time.sleep(0.2)
    return time.monotonic()


def one_run(run_dir: Path, shards: Path, model: Path) -> dict[str, float]:
    """Submit a 2-node fine-tune, signal it after 30 steps; its latencies (seconds)."""
    t0 = time.monotonic()
    dev = ["cluster=dev", "cluster.nodes=2", "train.max_steps=400", "train.micro_batch_size=8"]
    bench.run(bench.finetune_command(run_dir, shards, f"model.name_or_path={model}", *dev))
    submitted = time.monotonic()

    def losses(after: int = 0) -> int:
        return sum("loss" in r and r.get("step", 0) > after for r in bench.metrics_rows(run_dir))

    first = wait(lambda: losses() > 0)
    wait(lambda: losses() >= 30)
    job = json.loads((run_dir / "jobs.json").read_text())[-1]["job_id"]
    signalled = time.monotonic()
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    state = run_dir / "state.json"
    saved = wait(lambda: state.is_file() and json.loads(state.read_text())["state"] == "requeued")
    stop_step = json.loads(state.read_text())["step"]
    resumed = wait(lambda: losses(after=stop_step) > 0)
    wait(lambda: json.loads(state.read_text())["state"] == "completed")
    return {
        "submit_s": submitted - t0,
        "to_first_step_s": first - t0,
        "signal_to_checkpointed_s": saved - signalled,
        "requeue_turnaround_s": resumed - signalled,
    }


def main() -> None:
    args = bench.command_line(__doc__, repeats=3).parse_args()
    cluster = str(bench.REPO / "slurm/dev-cluster")
    subprocess.run([cluster, "up"], check=True, capture_output=True)
    conf = subprocess.run([cluster, "env"], check=True, capture_output=True, text=True).stdout
    os.environ["SLURM_CONF"] = conf.split("=", 1)[1].strip()
    root = bench.work_dir(None, "slurm")
    model = bench.tiny_bert(root / "tiny")
    from scilm_hpc.data.demo_corpus import write_demo_corpus

    corpus = write_demo_corpus(root / "corpus", train=400, dev=20, test=20)
    shards = bench.prepare_shards(root, {"train": corpus["train"]}, f"model.name_or_path={model}")
    runs = [one_run(root / f"run{i}", shards, model) for i in range(args.repeats)]
    for i, r in enumerate(runs):
        print(f"run {i}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()))
    medians = {f"median_{k}": round(bench.median(r[k] for r in runs), 2) for k in runs[0]}
    bench.report({"benchmark": "slurm_turnaround", "repeats": args.repeats, "nodes": 2, **medians})


if __name__ == "__main__":
    main()
