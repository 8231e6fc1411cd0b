"""Fine-tune the packaged MiniLM on SciCite for one epoch with ``scilm finetune``.

Prints training samples/s (median over logged steps, and end to end) and dev and test
(``scilm evaluate``) macro-F1, beside the plain HF Trainer's reference on this kind of
machine (2 cores; the issue tracker's figures, measured by train_throughput.py): about 17
samples/s with dynamic padding, 13 padded to 128, 83.4 test macro-F1 after one epoch.
``--compare-defaults STEPS`` instead trains ``jobs/finetune.yaml`` as shipped and with its
defaults before issue 14 (one thread, ZeRO-2, fp32), STEPS steps each on the same shards,
twice interleaved: median samples/s of each and their ratio.

    python benchmarks/finetune_scicite.py [--ranks 1] [--epochs 1] [--max-steps N]
    python benchmarks/finetune_scicite.py --compare-defaults 60
"""

from __future__ import annotations

from pathlib import Path

import _common as bench

HF_REFERENCE = {"dynamic_samples_per_s": 17.0, "padded_samples_per_s": 13.0, "test_macro_f1": 83.4}
OLD_DEFAULTS = ["cluster.cpus_per_task=1", "zero.stage=2", "train.precision=fp32"]


def compare_defaults(out: Path, shards: Path, steps: int) -> None:
    """Shipped defaults against the old ones (one thread, ZeRO-2, fp32), same shards."""
    rates: dict[str, list[float]] = {"shipped": [], "old_defaults": []}
    for round_ in range(2):
        for name, overrides in (("shipped", []), ("old_defaults", OLD_DEFAULTS)):
            run_dir, max_steps = out / f"{name}-{round_}", f"train.max_steps={steps}"
            bench.run(bench.finetune_command(run_dir, shards, max_steps, *overrides))
            rows = bench.step_rows(run_dir)[5:]  # the first steps warm up
            rates[name].append(bench.median(r["samples_per_s"] for r in rows))
    shipped, old = (bench.median(rates[n]) for n in ("shipped", "old_defaults"))
    bench.report(
        {
            "benchmark": "finetune_scicite_defaults",
            "steps": steps,
            "shipped_samples_per_s": shipped,
            "old_defaults_samples_per_s": old,
            "shipped_rounds": rates["shipped"],
            "old_defaults_rounds": rates["old_defaults"],
            "ratio_shipped_vs_old": shipped / old,
        }
    )


def main() -> None:
    parser = bench.command_line(
        __doc__, epochs=1, max_steps=-1, micro_batch_size=16, lr=5e-5, precision="fp32", out=None
    )
    parser.add_argument("--ranks", type=int, default=1, help="local ranks")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--compare-defaults", type=int, default=0, metavar="STEPS")
    args = parser.parse_args()
    out = bench.work_dir(args.out, "ft")
    shards = bench.prepare_shards(out, bench.scicite())
    if args.compare_defaults:
        compare_defaults(out, shards, args.compare_defaults)
        return
    run_dir = out / "ft"
    train = [f"train.{k}={getattr(args, k)}" for k in ("micro_batch_size", "lr", "precision")]
    epochs = [f"train.epochs={args.epochs}", f"train.max_steps={args.max_steps}"]
    cluster = [*bench.ranks_cluster(args.ranks), *epochs, f"zero.stage={args.zero_stage}"]
    cmd = bench.finetune_command(run_dir, shards, *cluster, *train, "train.warmup_ratio=0.1")
    wall = bench.run(cmd)
    steps = bench.step_rows(run_dir)
    dev = [r for r in bench.metrics_rows(run_dir) if "dev_macro_f1" in r][-1]
    test = bench.eval_metrics(run_dir / "export", shards, "test", out / "test")
    samples = len(steps) * args.micro_batch_size * args.ranks
    median_rate = bench.median(r["samples_per_s"] for r in steps)
    reference = HF_REFERENCE["dynamic_samples_per_s"]
    bench.report(
        {
            "benchmark": "finetune_scicite",
            "ranks": args.ranks,
            "zero_stage": args.zero_stage,
            "precision": args.precision,
            "steps": len(steps),
            "train_samples": samples,
            "samples_per_s_median": median_rate,
            "tokens_per_s_median": bench.median(r["tokens_per_s"] for r in steps),
            "samples_per_s_end_to_end": samples / wall,
            "wall_s": wall,
            "dev_macro_f1": 100 * dev["dev_macro_f1"],
            "test_macro_f1": 100 * test["macro_f1"],
            "hf_trainer_reference": HF_REFERENCE,
            "ratio_vs_hf_dynamic_reference": median_rate / reference,
        }
    )


if __name__ == "__main__":
    main()
