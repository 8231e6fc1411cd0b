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
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    REPO,
    SCILM,
    eval_metrics,
    hf_train,
    matmul_peak_gflops,
    median,
    prepare_shards,
    ranks_cluster,
    run_measured,
    scicite,
    show,
    step_rows,
    worker_command,
)

from scilm_hpc.train.flops import ModelFlops

MAX_LENGTH = 128
CPU_ENV = {"TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}


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


# ---------------------------------------------------------------- HF Trainer worker


def hf_worker(args: argparse.Namespace) -> None:
    """One HF Trainer run in this process, on the train shards; writes a JSON result."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        set_seed,
    )

    from scilm_hpc.data.dataset import ShardDataset
    from scilm_hpc.model_source import resolve_model_path

    source = resolve_model_path("minilm")
    shards = ShardDataset(args.shards, "train")
    labels = shards.label_names
    examples = []
    for i in range(len(shards)):
        item = shards[i]
        ids = item["input_ids"].tolist()
        examples.append(
            {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": item["labels"]}
        )

    tokenizer = AutoTokenizer.from_pretrained(source)
    padded = args.hf == "padded"
    collator = (
        DataCollatorWithPadding(tokenizer, padding="max_length", max_length=args.max_length)
        if padded
        else DataCollatorWithPadding(tokenizer)
    )
    best = {"train_sampling_strategy": "group_by_length"} if args.hf == "best" else {}
    if args.hf == "best" and args.precision == "bf16":
        best["bf16"] = True
    set_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    trainer, run = hf_train(
        model,
        examples,
        collator,
        args.out / f"hf_{args.hf}" / "trainer",
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
    export = args.out / f"hf_{args.hf}" / "export"
    trainer.save_model(str(export))
    tokenizer.save_pretrained(str(export))
    steps = np.diff([run["begin"], *run["ends"]])
    result = {
        "threads": run["threads"],
        "optimizer": run["optimizer"],
        "steps": len(steps),
        "train_s": float(steps.sum()),
        "step_s_median": float(np.median(steps)),
        "train_samples": len(examples) * args.epochs,
        "precision": args.precision if args.hf == "best" else "fp32",
        "export": str(export),
    }
    (args.out / f"hf_{args.hf}" / "result.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- scilm runs


def scilm_finetune(
    name: str, out: Path, shards: Path, overrides: list[str], shape: ModelFlops
) -> dict[str, Any]:
    """Run ``scilm finetune`` with ``overrides``; figures from its metrics.jsonl (one row
    per step: that step's samples/s, tokens/s and data-loading seconds)."""
    import yaml

    run_dir = out / name
    proc = run_measured(
        [
            *SCILM,
            "finetune",
            str(REPO / "jobs/finetune.yaml"),
            f"run.dir={run_dir}",
            f"data.shards={shards}",
            "train.log_every=1",
            "train.checkpoint_every=0",
            "train.eval_every=0",
            *overrides,
        ],
        out / f"{name}.log",
        {**os.environ, **CPU_ENV},
    )
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    steps = step_rows(run_dir)  # per step: samples, tokens, seconds, model FLOPs per token
    step_s = np.array([r["step_s"] for r in steps])
    train_s = float(step_s.sum())
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
        "samples_per_s_step_median": median(r["samples_per_s"] for r in steps),
        "tokens_per_s": tokens / train_s,
        "model_gflops_per_s": flops / train_s / 1e9,
        "data_s_per_step_median": float(np.median(data_s)),
        "data_fraction": float(data_s.sum() / train_s),
        "final_loss": steps[-1]["loss"],
    }


def hf_run(
    kind: str, args: argparse.Namespace, shards: Path, shape: ModelFlops, max_length: int
) -> dict[str, Any]:
    """hf_best, hf_dynamic or hf_padded in a child process."""
    from scilm_hpc.data.dataset import ShardDataset

    out = shards.parent
    cmd = worker_command(
        __file__,
        hf_worker=kind,
        shards=shards,
        out=out,
        epochs=args.epochs,
        micro_batch_size=args.micro_batch_size,
        lr=args.lr,
        seed=args.seed,
        max_length=max_length,
        precision=args.precision,
    )
    proc = run_measured(cmd, out / f"hf_{kind}.log", {**os.environ, **CPU_ENV})
    result = json.loads((out / f"hf_{kind}" / "result.json").read_text())
    lengths = np.tile(ShardDataset(shards, "train").lengths(), args.epochs)
    train_s = result["train_s"]
    return {
        **proc,
        **result,
        "ranks": 1,
        "train_tokens": int(lengths.sum()),
        "padded_tokens": (len(lengths) * max_length if kind == "padded" else None),
        "samples_per_s": result["train_samples"] / train_s,
        "tokens_per_s": float(lengths.sum()) / train_s,
        "model_gflops_per_s": train_flops(lengths, shape) / train_s / 1e9,
    }


# ---------------------------------------------------------------- main


def prepare(out: Path, samples: int | None, seed: int, max_length: int) -> Path:
    """SciCite shards cut at ``max_length`` tokens (train: ``samples`` examples, a
    seeded random subset; dev whole)."""
    splits = scicite("train", "dev")
    if samples:
        lines = splits["train"].read_text(encoding="utf-8").splitlines()
        keep = np.sort(np.random.default_rng(seed).permutation(len(lines))[:samples])
        splits["train"] = out / "train.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        splits["train"].write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
    return prepare_shards(out, splits, f"data.max_length={max_length}")


def example_set(
    name: str, max_length: int, args: argparse.Namespace, shape: ModelFlops
) -> dict[str, dict[str, Any]]:
    """Every trainer on one example set; results keyed ``SET/RUN``."""
    out = args.out / name
    shards = prepare(out, args.samples or None, args.seed, max_length)
    kinds = ["best", "dynamic"] + (["padded"] if args.history and name == "scicite" else [])
    runs = {f"{name}/hf_{kind}": hf_run(kind, args, shards, shape, max_length) for kind in kinds}
    scilm = [
        "cluster=none",
        f"zero.stage={args.zero_stage}",
        f"train.precision={args.precision}",
        f"train.epochs={args.epochs}",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.lr={args.lr}",
        f"train.seed={args.seed}",
        "train.warmup_ratio=0.1",
    ]
    runs[f"{name}/scilm"] = scilm_finetune("scilm", out, shards, scilm, shape)
    if args.compile:  # the compile lands in the first step's time, which counts
        runs[f"{name}/scilm_compiled"] = scilm_finetune(
            "scilm_compiled", out, shards, [*scilm, "train.compile=true"], shape
        )
    for key, run in runs.items():
        dev = eval_metrics(run["export"], shards, "dev", out / f"dev_{key.split('/')[1]}")
        run["dev_macro_f1"] = 100.0 * dev["macro_f1"]
    if args.zero_steps and name == "scicite":
        for stage in (2, 3):
            runs[f"{name}/zero{stage}_2ranks"] = scilm_finetune(
                f"zero{stage}",
                out,
                shards,
                [
                    *ranks_cluster(2),
                    f"zero.stage={stage}",
                    f"train.precision={args.precision}",
                    f"train.max_steps={args.zero_steps}",
                    f"train.micro_batch_size={args.micro_batch_size}",
                    f"train.seed={args.seed}",
                ],
                shape,
            )
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000, help="training examples (0: all)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=42)
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
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--hf-worker", choices=["padded", "dynamic", "best"], help=argparse.SUPPRESS
    )
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.hf_worker:
        args.hf = args.hf_worker
        hf_worker(args)
        return
    args.out = args.out or Path(tempfile.mkdtemp(prefix="scilm-bench-tput-"))
    args.out.mkdir(parents=True, exist_ok=True)

    from scilm_hpc.launch.hardware import cpu_has_native_bf16
    from scilm_hpc.model_source import resolve_model_path

    native_bf16 = cpu_has_native_bf16()
    if args.precision == "auto":
        args.precision = "bf16" if native_bf16 else "fp32"
    # the machine's peak: the best of a measurement before and one after the runs
    peak = {"fp32": matmul_peak_gflops("float32"), "bf16": matmul_peak_gflops("bfloat16")}
    shape = model_shape(resolve_model_path("minilm"))
    lengths = {"scicite": MAX_LENGTH, "short": args.short_length}
    runs: dict[str, dict[str, Any]] = {}
    for name in args.sets.split(","):
        runs.update(example_set(name, lengths[name], args, shape))
    peak = {
        "fp32": max(peak["fp32"], matmul_peak_gflops("float32")),
        "bf16": max(peak["bf16"], matmul_peak_gflops("bfloat16")),
    }
    for run in runs.values():
        run["mfu"] = run["model_gflops_per_s"] / peak[run["precision"]]
        run.pop("export", None)

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
    print(f"{'':>12} " + " ".join(f"{name:>18.18}" for name in runs))
    for key in (
        "samples_per_s",
        "tokens_per_s",
        "peak_rss_mb",
        "model_gflops_per_s",
        "mfu",
        "dev_macro_f1",
        "data_fraction",
    ):
        values = [run.get(key) for run in runs.values()]
        cells = [f"{v:>18.3f}" if isinstance(v, float) else f"{'-':>18}" for v in values]
        print(f"{key:>12.12} " + " ".join(cells))
    show(figures, digits=3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
