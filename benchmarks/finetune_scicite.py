"""Fine-tune the packaged MiniLM on SciCite for one epoch with ``scilm finetune``.

Prints training samples/s (median over logged steps, and end to end), and dev and
test macro-F1 of the exported model. The reference figures of the plain HF Trainer
on the same data and a machine like this one (2 cores) are printed beside them:
about 17 samples/s with dynamic padding, 13 padded to 128, and 83.4 test macro-F1
after one epoch (from the project's issue tracker; benchmarks/train_throughput.py
measures them in the same run).

    python benchmarks/finetune_scicite.py [--ranks 1] [--epochs 1] [--max-steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "scicite"
SCILM = str(Path(sys.executable).with_name("scilm"))
HF_TRAINER_REFERENCE = {
    "dynamic_samples_per_s": 17.0,
    "padded_samples_per_s": 13.0,
    "test_macro_f1": 83.4,
}


def run(*args: str) -> float:
    """Run ``scilm ARGS``; returns wall seconds."""
    start = time.perf_counter()
    done = subprocess.run([SCILM, *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"scilm {' '.join(args[:2])} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def test_macro_f1(export: Path, shards: Path) -> float:
    """Macro-F1 of the exported model on the test shards (one process)."""
    from transformers import AutoModelForSequenceClassification

    from scilm_hpc.data.dataset import ShardDataset
    from scilm_hpc.train.evaluation import evaluate_split

    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    test = ShardDataset(shards, "test")
    metrics = evaluate_split(model, test, "classification", test.label_names, 0, 64, 0, 1)
    assert metrics is not None
    return 100 * metrics["macro_f1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=1, help="local ranks (default 1)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = args.out or Path(tempfile.mkdtemp(prefix="scilm-bench-ft-"))
    run(
        "prepare",
        str(REPO / "jobs/prepare.yaml"),
        "cluster=none",
        f"run.dir={out}",
        f"data.train={DATA / 'train.jsonl'}",
        f"data.dev={DATA / 'dev.jsonl'}",
        f"data.test={DATA / 'test.jsonl'}",
        "data.overwrite=true",
    )
    cluster = (
        ["cluster=none"]
        if args.ranks == 1
        else ["cluster=local", f"cluster.tasks_per_node={args.ranks}", "cluster.cpus_per_task=1"]
    )
    run_dir = out / "ft"
    wall = run(
        "finetune",
        str(REPO / "jobs/finetune.yaml"),
        f"run.dir={run_dir}",
        f"data.shards={out / 'shards'}",
        *cluster,
        f"train.epochs={args.epochs}",
        f"train.max_steps={args.max_steps}",
        f"zero.stage={args.zero_stage}",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.lr={args.lr}",
        f"train.precision={args.precision}",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "train.warmup_ratio=0.1",
    )
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "samples_per_s" in r]
    dev = [r for r in rows if "dev_macro_f1" in r][-1]
    samples = len(steps) * args.micro_batch_size * args.ranks
    figures = {
        "benchmark": "finetune_scicite",
        "ranks": args.ranks,
        "zero_stage": args.zero_stage,
        "precision": args.precision,
        "steps": len(steps),
        "train_samples": samples,
        "samples_per_s_median": statistics.median(r["samples_per_s"] for r in steps),
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steps),
        "samples_per_s_end_to_end": samples / wall,
        "wall_s": wall,
        "dev_macro_f1": 100 * dev["dev_macro_f1"],
        "test_macro_f1": test_macro_f1(run_dir / "export", out / "shards"),
        "hf_trainer_reference": HF_TRAINER_REFERENCE,
    }
    figures["ratio_vs_hf_dynamic_reference"] = (
        figures["samples_per_s_median"] / HF_TRAINER_REFERENCE["dynamic_samples_per_s"]
    )
    for key, value in figures.items():
        print(f"{key:>32}: {value:.2f}" if isinstance(value, float) else f"{key:>32}: {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
