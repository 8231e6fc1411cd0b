"""Training throughput of ``scilm finetune`` against the HF Trainer at its best, with MFU.

In one run, for each example set -- SciCite (``data.max_length=128``) and short texts
(the same SciCite sentences cut to their first ``--short-length`` tokens) -- on the same
training examples (the shards ``scilm prepare`` makes, so every trainer sees identical
token ids), for ``--epochs`` epochs of ``--samples`` examples:

  hf_best     HF ``transformers.Trainer`` at its best on this hardware: dynamic padding
              (``DataCollatorWithPadding``), ``train_sampling_strategy="group_by_length"``,
              torch's fused AdamW (``adamw_torch_fused``), bf16 only where the CPU
              multiplies it natively (else fp32, like scilm's ``train.precision=auto``);
  hf_dynamic  the same without length grouping (what most scripts run);
  hf_padded   (``--history``, SciCite only) every example padded to max_length, fp32;
  scilm       ``scilm finetune`` on one rank (``cluster=none``, every core, ZeRO stage 0,
              the shipped defaults: length-bucketed batches, fused AdamW, precision auto);
  scilm_compiled (``--compile``) the same with ``train.compile=true``.

Each trainer runs in its own process with the same threads. Printed per run: samples/s
and real (non-pad) tokens/s over the training loop (model loading, evaluation and
saving excluded), peak RSS, model FLOP/s and MFU against the matrix-multiply peak this
script measures for the run's precision (``torch.matmul``, best of before and after),
dev macro-F1 (``scilm evaluate`` on the SciCite dev split for every exported model), and
the ratios scilm / hf_best and scilm / hf_dynamic. ``--zero-steps N`` adds ZeRO-2 against
ZeRO-3 on 2 local ranks (1 thread each) on SciCite.

Model FLOPs per trained example of n real tokens: 6 * N * n + 12 * L * d * n^2, where N
counts the weights of matrix multiplies (the pooler and classifier once per example), L
the layers and d the hidden size (attention scores and values, forward + backward; PaLM
appendix B): the library's count (``scilm_hpc.train.flops``), which scilm's runs log in
metrics.jsonl and the HF runs get from the same function. Only real tokens count:
padding is work, not model FLOPs.

    python benchmarks/train_throughput.py [--samples 2000] [--epochs 1] [--sets scicite,short]
        [--short-length 20] [--history] [--compile] [--zero-steps 0] [--out DIR]
    quick check: --samples 256 (about 4 minutes on 2 cores)
Machines are shared: run it on a quiet one (or under ``chrt -r 10``) and quote ratios.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import _common as bench
import numpy as np

from scilm_hpc.train.flops import ModelFlops

MAX_LENGTH = 128
CPU_ENV = {"TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
TABLE = "samples_per_s tokens_per_s peak_rss_mb model_gflops_per_s mfu dev_macro_f1 data_fraction"


# ---------------------------------------------------------------- model FLOPs


def model_shape(model_dir: str) -> ModelFlops:
    """The classifier's FLOPs count (``scilm_hpc.train.flops``, what scilm logs)."""
    from transformers import AutoModelForSequenceClassification

    return ModelFlops.of(
        AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    )


def train_flops(lengths: np.ndarray, shape: ModelFlops) -> float:
    """Model FLOPs of one training pass (forward + backward) over examples of ``lengths``."""
    n = lengths.astype(np.float64)
    return shape.step_flops(float(n.sum()), float((n**2).sum()), len(n))


def measured(run: dict[str, Any], lengths: np.ndarray, train_s: float, shape: ModelFlops) -> dict:
    """``run`` with samples/s, real tokens/s and model GFLOP/s over ``train_s`` seconds."""
    return {
        **run,
        "train_samples": len(lengths),
        "train_tokens": int(lengths.sum()),
        "train_s": train_s,
        "samples_per_s": len(lengths) / train_s,
        "tokens_per_s": float(lengths.sum()) / train_s,
        "model_gflops_per_s": train_flops(lengths, shape) / train_s / 1e9,
    }


# ---------------------------------------------------------------- HF Trainer


def hf_worker(args: argparse.Namespace) -> None:
    """One HF Trainer run (``--hf``: best, dynamic or padded) in this process, on the
    train shards; leaves its result for ``run_worker``."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        set_seed,
    )

    from scilm_hpc.model_source import resolve_model_path

    source = resolve_model_path("minilm")
    items, labels = bench.shard_examples(args.shards)
    examples = []
    for item in items:
        ids = item["input_ids"].tolist()
        examples.append(
            {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": item["labels"]}
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    collator = (
        DataCollatorWithPadding(tokenizer, padding="max_length", max_length=args.max_length)
        if args.hf == "padded"
        else DataCollatorWithPadding(tokenizer)
    )
    best = {"train_sampling_strategy": "group_by_length"} if args.hf == "best" else {}
    if args.hf == "best" and args.precision == "bf16":
        best["bf16"] = True
    set_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(source, **bench.label_kwargs(labels))
    trainer, run = bench.hf_train(
        model,
        examples,
        collator,
        args.out / "trainer",
        per_device_train_batch_size=args.micro_batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        warmup_steps=0.1,  # a ratio of the training steps, as scilm's train.warmup_ratio
        lr_scheduler_type="linear",
        seed=args.seed,
        use_cpu=True,
        dataloader_pin_memory=False,
        optim="adamw_torch_fused",
        **best,
    )
    trainer.save_model(str(args.out / "export"))
    tokenizer.save_pretrained(str(args.out / "export"))
    steps = run.pop("step_s")
    run.pop("lrs")  # the schedule HF ran: not a figure here
    bench.worker_result(
        args.out,
        {
            **run,
            "steps": len(steps),
            "train_s": float(np.sum(steps)),
            "step_s_median": bench.median(steps),
            "train_samples": len(examples) * args.epochs,
            "precision": args.precision if args.hf == "best" else "fp32",
            "export": str(args.out / "export"),
        },
    )


def hf_run(
    kind: str, args: argparse.Namespace, shards: Path, shape: ModelFlops, max_length: int
) -> dict:
    """hf_best, hf_dynamic or hf_padded in a worker process."""
    from scilm_hpc.data.dataset import ShardDataset

    run = bench.run_worker(
        __file__,
        shards.parent / f"hf_{kind}",
        CPU_ENV,
        hf=kind,
        shards=shards,
        max_length=max_length,
        **{k: getattr(args, k) for k in ("epochs", "micro_batch_size", "lr", "seed", "precision")},
    )
    lengths = np.tile(ShardDataset(shards, "train").lengths(), args.epochs)
    run["ranks"] = 1
    run["padded_tokens"] = len(lengths) * max_length if kind == "padded" else None
    return measured(run, lengths, run["train_s"], shape)


# ---------------------------------------------------------------- scilm runs


def scilm_finetune(name: str, out: Path, shards: Path, overrides: list[str]) -> dict[str, Any]:
    """Run ``scilm finetune`` with ``overrides``; figures from its metrics.jsonl (one row
    per step: that step's samples, tokens, seconds, model FLOPs per token and
    data-loading seconds)."""
    import yaml

    run_dir = out / name
    cmd = bench.finetune_command(run_dir, shards, *overrides)
    proc = bench.run_measured(cmd, out / f"{name}.log", {**os.environ, **CPU_ENV})
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    steps = bench.step_rows(run_dir)
    train_s = float(sum(r["step_s"] for r in steps))
    samples, tokens = sum(r["samples"] for r in steps), sum(r["tokens"] for r in steps)
    flops = sum(r["model_flops_per_token"] * r["tokens"] for r in steps)
    data_s = np.array([r["data_s_per_step"] for r in steps])
    return {
        **proc,
        "export": str(run_dir / "export"),
        "ranks": config["cluster"]["nodes"] * config["cluster"]["tasks_per_node"],
        "zero_stage": config["zero"]["stage"],
        "precision": config["train"]["precision"],
        "steps": len(steps),
        "train_samples": samples,
        "train_tokens": tokens,
        "train_s": train_s,
        "samples_per_s": samples / train_s,
        "samples_per_s_step_median": bench.median(r["samples_per_s"] for r in steps),
        "tokens_per_s": tokens / train_s,
        "model_gflops_per_s": flops / train_s / 1e9,
        "data_s_per_step_median": float(np.median(data_s)),
        "data_fraction": float(data_s.sum() / train_s),
        "final_loss": steps[-1]["loss"],
    }


# ---------------------------------------------------------------- main


def prepare(out: Path, samples: int | None, seed: int, max_length: int) -> Path:
    """SciCite shards cut at ``max_length`` tokens (train: ``samples`` examples, a
    seeded random subset; dev whole)."""
    splits = bench.scicite("train", "dev")
    if samples:
        lines = splits["train"].read_text(encoding="utf-8").splitlines()
        keep = np.sort(np.random.default_rng(seed).permutation(len(lines))[:samples])
        splits["train"] = out / "train.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        splits["train"].write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
    return bench.prepare_shards(out, splits, f"data.max_length={max_length}")


def example_set(
    name: str, max_length: int, args: argparse.Namespace, shape: ModelFlops
) -> dict[str, dict[str, Any]]:
    """Every trainer on one example set; results keyed ``SET/RUN``."""
    out = args.out / name
    shards = prepare(out, args.samples or None, args.seed, max_length)
    kinds = ["best", "dynamic"] + (["padded"] if args.history and name == "scicite" else [])
    runs = {f"{name}/hf_{kind}": hf_run(kind, args, shards, shape, max_length) for kind in kinds}
    train = [
        f"train.precision={args.precision}",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.seed={args.seed}",
    ]
    scilm = [
        "cluster=none",
        f"zero.stage={args.zero_stage}",
        *train,
        f"train.epochs={args.epochs}",
        f"train.lr={args.lr}",
        "train.warmup_ratio=0.1",
    ]
    runs[f"{name}/scilm"] = scilm_finetune("scilm", out, shards, scilm)
    if args.compile:  # the compile lands in the first step's time, which counts
        runs[f"{name}/scilm_compiled"] = scilm_finetune(
            "scilm_compiled", out, shards, [*scilm, "train.compile=true"]
        )
    for key, run in runs.items():
        dev = bench.eval_metrics(run.pop("export"), shards, "dev", out / f"dev_{key.split('/')[1]}")
        run["dev_macro_f1"] = 100.0 * dev["macro_f1"]
    for stage in (2, 3) if args.zero_steps and name == "scicite" else ():
        zero = [
            *bench.ranks_cluster(2),
            f"zero.stage={stage}",
            f"train.max_steps={args.zero_steps}",
        ]
        runs[f"{name}/zero{stage}_2ranks"] = scilm_finetune(
            f"zero{stage}", out, shards, [*zero, *train]
        )
    return runs


def main() -> None:
    parser = bench.command_line(
        __doc__,
        hidden={"worker": False, "hf": "", "shards": (Path, None), "max_length": MAX_LENGTH},
        epochs=1,
        micro_batch_size=16,
        lr=5e-5,
        seed=42,
        out=None,
    )
    parser.add_argument("--samples", type=int, default=2000, help="training examples (0: all)")
    parser.add_argument("--sets", default="scicite,short", help="scicite, short or both")
    parser.add_argument("--short-length", type=int, default=20, help="tokens of a short text")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="precision of scilm and hf_best; auto: bf16 where the CPU multiplies bf16 natively",
    )
    parser.add_argument("--zero-stage", type=int, default=0, help="scilm's zero.stage")
    parser.add_argument("--zero-steps", type=int, default=0, help="steps of each ZeRO run")
    parser.add_argument("--history", action="store_true", help="add hf_padded (SciCite)")
    parser.add_argument("--compile", action="store_true", help="add scilm train.compile=true")
    args = parser.parse_args()
    os.environ.update(CPU_ENV)
    if args.worker:
        hf_worker(args)
        return
    args.out = bench.work_dir(args.out, "tput")

    from scilm_hpc.model_source import resolve_model_path
    from scilm_hpc.runtime.hardware import cpu_has_native_bf16

    native_bf16 = cpu_has_native_bf16()
    if args.precision == "auto":
        args.precision = "bf16" if native_bf16 else "fp32"
    peak = bench.matmul_peaks()  # the machine's peak: the best of before and after the runs
    shape = model_shape(resolve_model_path("minilm"))
    lengths = {"scicite": MAX_LENGTH, "short": args.short_length}
    runs: dict[str, dict[str, Any]] = {}
    for name in args.sets.split(","):
        runs.update(example_set(name, lengths[name], args, shape))
    peak = bench.matmul_peaks(before=peak)
    for run in runs.values():
        run["mfu"] = run["model_gflops_per_s"] / peak[run["precision"]]

    figures: dict[str, Any] = {
        "benchmark": "train_throughput",
        "train_examples": args.samples,
        "epochs": args.epochs,
        "micro_batch_size": args.micro_batch_size,
        "precision": args.precision,
        "cpu_native_bf16": native_bf16,
        "matmul_peak_gflops_fp32": peak["fp32"],
        "matmul_peak_gflops_bf16": peak["bf16"],
        "matmul_weights": shape.matmul_weights,
        "flops_formula": "scilm_hpc.train.flops: 6*N*tokens + 12*layers*hidden*sum(len^2)",
    }
    for name in args.sets.split(","):
        best, dynamic, scilm = (runs[f"{name}/{k}"] for k in ("hf_best", "hf_dynamic", "scilm"))
        figures[f"{name}_ratio_vs_hf_best"] = scilm["samples_per_s"] / best["samples_per_s"]
        figures[f"{name}_ratio_vs_hf_dynamic"] = scilm["samples_per_s"] / dynamic["samples_per_s"]
        figures[f"{name}_mfu_scilm"] = scilm["mfu"]
        figures[f"{name}_dev_macro_f1_vs_hf_best"] = scilm["dev_macro_f1"] - best["dev_macro_f1"]
        if f"{name}/hf_padded" in runs:
            padded = runs[f"{name}/hf_padded"]
            figures[f"{name}_ratio_vs_hf_padded"] = scilm["samples_per_s"] / padded["samples_per_s"]
    if "scicite/zero2_2ranks" in runs:
        z2, z3 = runs["scicite/zero2_2ranks"], runs["scicite/zero3_2ranks"]
        figures["zero3_vs_zero2_samples_per_s"] = z3["samples_per_s"] / z2["samples_per_s"]
        figures["zero3_vs_zero2_peak_rss"] = z3["peak_rss_mb"] / z2["peak_rss_mb"]
    figures["runs"] = runs
    bench.table(
        list(runs), {key: [run.get(key) for run in runs.values()] for key in TABLE.split()}, 18, 20
    )
    bench.report(figures, digits=3)


if __name__ == "__main__":
    main()
