"""Fine-tune the packaged MiniLM on SciCite for one epoch with ``scilm finetune``.

Prints training samples/s (median over logged steps, and end to end), and dev and
test macro-F1 of the exported model (test: ``scilm evaluate``). The reference figures
of the plain HF Trainer on the same data and a machine like this one (2 cores) are
printed beside them:
about 17 samples/s with dynamic padding, 13 padded to 128, and 83.4 test macro-F1
after one epoch (from the project's issue tracker; benchmarks/train_throughput.py
measures them in the same run).

    python benchmarks/finetune_scicite.py [--ranks 1] [--epochs 1] [--max-steps N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import (
    REPO,
    eval_metrics,
    median,
    metrics_rows,
    prepare_shards,
    ranks_cluster,
    run_scilm,
    scicite,
    show,
    step_rows,
)

HF_TRAINER_REFERENCE = {
    "dynamic_samples_per_s": 17.0,
    "padded_samples_per_s": 13.0,
    "test_macro_f1": 83.4,
}


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
    out = args.out or Path(tempfile.mkdtemp(prefix="scilm-bench-ft-"))
    shards = prepare_shards(out, scicite())
    run_dir = out / "ft"
    wall = run_scilm(
        "finetune",
        str(REPO / "jobs/finetune.yaml"),
        f"run.dir={run_dir}",
        f"data.shards={shards}",
        *ranks_cluster(args.ranks),
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
    steps = step_rows(run_dir)
    dev = [r for r in metrics_rows(run_dir) if "dev_macro_f1" in r][-1]
    samples = len(steps) * args.micro_batch_size * args.ranks
    figures = {
        "benchmark": "finetune_scicite",
        "ranks": args.ranks,
        "zero_stage": args.zero_stage,
        "precision": args.precision,
        "steps": len(steps),
        "train_samples": samples,
        "samples_per_s_median": median(r["samples_per_s"] for r in steps),
        "tokens_per_s_median": median(r["tokens_per_s"] for r in steps),
        "samples_per_s_end_to_end": samples / wall,
        "wall_s": wall,
        "dev_macro_f1": 100 * dev["dev_macro_f1"],
        "test_macro_f1": 100
        * eval_metrics(run_dir / "export", shards, "test", out / "test")["macro_f1"],
        "hf_trainer_reference": HF_TRAINER_REFERENCE,
    }
    figures["ratio_vs_hf_dynamic_reference"] = (
        figures["samples_per_s_median"] / HF_TRAINER_REFERENCE["dynamic_samples_per_s"]
    )
    show(figures)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
