"""Slurm latencies on the development cluster: submission to first training step, and
the checkpoint-and-requeue turnaround after ``scancel --signal=USR2``.

Needs ``slurm/dev-cluster up``. Runs a 2-node x 1-task fine-tune of a tiny BERT on a
generated corpus, ``--repeats`` times, and prints medians and one JSON line.

    python benchmarks/slurm_turnaround.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, median, metrics_rows, prepare_shards, run_scilm, tiny_bert


def wait(predicate, timeout: float = 300.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            sys.exit("timed out")
        time.sleep(0.2)
    return time.monotonic()


def one_run(root: Path, shards: Path, model: Path, index: int) -> dict[str, float]:
    run = root / f"run{index}"
    t0 = time.monotonic()
    run_scilm(
        "finetune",
        str(REPO / "jobs/finetune.yaml"),
        f"run.dir={run}",
        f"data.shards={shards}",
        f"model.name_or_path={model}",
        "cluster=dev",
        "cluster.nodes=2",
        "train.max_steps=400",
        "train.micro_batch_size=8",
        "train.log_every=1",
        "train.checkpoint_every=0",
    )
    submitted = time.monotonic()
    first = wait(lambda: any("loss" in r for r in metrics_rows(run)))
    wait(lambda: sum("loss" in r for r in metrics_rows(run)) >= 30)
    job = json.loads((run / "jobs.json").read_text())[-1]["job_id"]
    signalled = time.monotonic()
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    state = run / "state.json"
    saved = wait(lambda: state.is_file() and json.loads(state.read_text())["state"] == "requeued")
    stop_step = json.loads(state.read_text())["step"]
    resumed = wait(
        lambda: any(r.get("step", 0) > stop_step and "loss" in r for r in metrics_rows(run))
    )
    wait(lambda: json.loads(state.read_text())["state"] == "completed")
    return {
        "submit_s": submitted - t0,
        "to_first_step_s": first - t0,
        "signal_to_checkpointed_s": saved - signalled,
        "requeue_turnaround_s": resumed - signalled,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    subprocess.run([str(REPO / "slurm/dev-cluster"), "up"], check=True, capture_output=True)
    conf = (
        subprocess.run(
            [str(REPO / "slurm/dev-cluster"), "env"], check=True, capture_output=True, text=True
        )
        .stdout.split("=", 1)[1]
        .strip()
    )
    os.environ["SLURM_CONF"] = conf
    root = Path(tempfile.mkdtemp(prefix="scilm-bench-slurm-"))
    model = tiny_bert(root / "tiny")
    from scilm_hpc.data.demo_corpus import write_demo_corpus

    corpus = write_demo_corpus(root / "corpus", train=400, dev=20, test=20)
    shards = prepare_shards(root, {"train": corpus["train"]}, f"model.name_or_path={model}")
    runs = [one_run(root, shards, model, i) for i in range(args.repeats)]
    for i, r in enumerate(runs):
        print(f"run {i}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()))
    medians = {k: median(r[k] for r in runs) for k in runs[0]}
    print("medians: " + ", ".join(f"{k} {v:.1f}" for k, v in medians.items()))
    print(
        json.dumps(
            {
                "benchmark": "slurm_turnaround",
                "repeats": args.repeats,
                "nodes": 2,
                **{f"median_{k}": round(v, 2) for k, v in medians.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
