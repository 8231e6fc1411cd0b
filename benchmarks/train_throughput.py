"""Training throughput of ``scilm finetune`` against the HF Trainer at its best, with MFU.

On SciCite (``data.max_length=128``) and on short texts (the same sentences cut to
``--short-length`` tokens), the same token ids (``scilm prepare``'s shards), each run in its
own process: hf_best (HF ``Trainer``: dynamic padding, ``group_by_length``, fused AdamW,
bf16 where the CPU multiplies it natively), hf_dynamic (without length grouping), hf_padded
(``--history``, SciCite: padded to max_length, fp32), scilm (``scilm finetune`` on one rank,
shipped defaults), scilm_compiled (``--compile``: ``train.compile=true``); ``--zero-steps``
adds ZeRO-2 against ZeRO-3 on 2 one-thread ranks (SciCite). Per run: samples/s and real
tokens/s of the training loop, peak RSS, model FLOP/s (``scilm_hpc.train.flops``, PaLM
appendix B: 6*N*n + 12*L*d*n^2 per example of n real tokens) and MFU against the
``torch.matmul`` peak (best of before and after), dev macro-F1 (``scilm evaluate``), and
the ratios scilm / hf.

    python benchmarks/train_throughput.py [--samples 2000] [--sets scicite,short] [--history]
    quick check: --samples 256 (about 4 minutes on 2 cores); on a shared machine quote ratios
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
DEFAULTS = dict(epochs=1, micro_batch_size=16, lr=5e-5, seed=42)
HIDDEN = {"worker": False, "hf": "", "shards": (Path, None), "max_length": MAX_LENGTH}
HF_OPTIONS = ("epochs", "micro_batch_size", "lr", "seed", "precision")
# warmup_steps < 1: a ratio of the training steps, as scilm's train.warmup_ratio
HF_ARGS = dict(warmup_steps=0.1, lr_scheduler_type="linear", optim="adamw_torch_fused")
HF_ARGS |= dict(use_cpu=True, dataloader_pin_memory=False)


def model_shape(model_dir: str) -> ModelFlops:
    """The classifier's FLOPs count (``scilm_hpc.train.flops``, what scilm logs)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    return ModelFlops.of(model)


def rates(samples: int, tokens: int, flops: float, train_s: float) -> dict[str, Any]:
    """Samples/s, real tokens/s and model GFLOP/s over ``train_s`` seconds of training."""
    per_s = {"samples_per_s": samples / train_s, "tokens_per_s": tokens / train_s}
    totals = {"train_samples": samples, "train_tokens": tokens, "train_s": train_s}
    return {**totals, **per_s, "model_gflops_per_s": flops / train_s / 1e9}


def hf_worker(args: argparse.Namespace) -> None:
    """One HF Trainer run (``--hf``: best, dynamic or padded) on the train shards."""
    import transformers as hf

    from scilm_hpc.model_source import resolve_model_path

    source = resolve_model_path("minilm")
    items, labels = bench.shard_examples(args.shards)
    examples = [
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": item["labels"]}
        for item in items
        for ids in [item["input_ids"].tolist()]
    ]
    tokenizer = hf.AutoTokenizer.from_pretrained(source)
    padded = {"padding": "max_length", "max_length": args.max_length} if args.hf == "padded" else {}
    best = {"train_sampling_strategy": "group_by_length", "bf16": args.precision == "bf16"}
    hf.set_seed(args.seed)
    model = hf.AutoModelForSequenceClassification.from_pretrained(
        source, **bench.label_kwargs(labels)
    )
    trainer, run = bench.hf_train(
        model,
        examples,
        hf.DataCollatorWithPadding(tokenizer, **padded),
        args.out / "trainer",
        per_device_train_batch_size=args.micro_batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        seed=args.seed,
        **HF_ARGS,
        **(best if args.hf == "best" else {}),
    )
    export = str(args.out / "export")
    trainer.save_model(export)
    tokenizer.save_pretrained(export)
    steps = run.pop("step_s")
    run.pop("lrs")  # the schedule HF ran: not a figure here
    precision = args.precision if args.hf == "best" else "fp32"
    run |= {"steps": len(steps), "train_s": float(np.sum(steps))}
    run |= {"step_s_median": bench.median(steps), "train_samples": len(examples) * args.epochs}
    run |= {"precision": precision, "export": export}
    bench.worker_result(args.out, run)


def hf_run(kind: str, args: Any, shards: Path, shape: ModelFlops, max_length: int) -> dict:
    """hf_best, hf_dynamic or hf_padded in a worker process."""
    from scilm_hpc.data.dataset import ShardDataset

    options = {k: getattr(args, k) for k in HF_OPTIONS}
    out = shards.parent / f"hf_{kind}"
    run = bench.run_worker(
        __file__, out, CPU_ENV, hf=kind, shards=shards, max_length=max_length, **options
    )
    lengths = np.tile(ShardDataset(shards, "train").lengths(), args.epochs)
    run["ranks"] = 1
    run["padded_tokens"] = len(lengths) * max_length if kind == "padded" else None
    n = lengths.astype(np.float64)
    flops = shape.step_flops(float(n.sum()), float((n**2).sum()), len(n))
    return {**run, **rates(len(lengths), int(lengths.sum()), flops, run["train_s"])}


def scilm_finetune(name: str, out: Path, shards: Path, overrides: list[str]) -> dict[str, Any]:
    """``scilm finetune`` with ``overrides``; figures from its metrics.jsonl (a row a step)."""
    import yaml

    run_dir = out / name
    cmd = bench.finetune_command(run_dir, shards, *overrides)
    proc = bench.run_measured(cmd, out / f"{name}.log", CPU_ENV)
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
        **rates(samples, tokens, flops, train_s),
        "samples_per_s_step_median": bench.median(r["samples_per_s"] for r in steps),
        "data_s_per_step_median": float(np.median(data_s)),
        "data_fraction": float(data_s.sum() / train_s),
        "final_loss": steps[-1]["loss"],
    }


def prepare(out: Path, samples: int | None, seed: int, max_length: int) -> Path:
    """SciCite shards cut at ``max_length`` (train: a seeded subset of ``samples``; dev)."""
    splits = bench.scicite("train", "dev")
    if samples:
        lines = splits["train"].read_text(encoding="utf-8").splitlines()
        keep = np.sort(np.random.default_rng(seed).permutation(len(lines))[:samples])
        splits["train"] = out / "train.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        splits["train"].write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
    return bench.prepare_shards(out, splits, f"data.max_length={max_length}")


def example_set(name: str, max_length: int, args: Any, shape: ModelFlops) -> dict[str, dict]:
    """Every trainer on one example set; results keyed ``SET/RUN``."""
    out = args.out / name
    shards = prepare(out, args.samples or None, args.seed, max_length)
    kinds = ["best", "dynamic"] + (["padded"] if args.history and name == "scicite" else [])
    runs = {f"{name}/hf_{kind}": hf_run(kind, args, shards, shape, max_length) for kind in kinds}
    train = [f"train.{k}={getattr(args, k)}" for k in ("precision", "micro_batch_size", "seed")]
    scilm = ["cluster=none", f"zero.stage={args.zero_stage}", *train, f"train.epochs={args.epochs}"]
    scilm += [f"train.lr={args.lr}", "train.warmup_ratio=0.1"]
    runs[f"{name}/scilm"] = scilm_finetune("scilm", out, shards, scilm)
    if args.compile:  # the compile lands in the first step's time, which counts
        compiled = [*scilm, "train.compile=true"]
        runs[f"{name}/scilm_compiled"] = scilm_finetune("scilm_compiled", out, shards, compiled)
    for key, run in runs.items():
        dev = bench.eval_metrics(run.pop("export"), shards, "dev", out / f"dev_{key.split('/')[1]}")
        run["dev_macro_f1"] = 100.0 * dev["macro_f1"]
    zero_steps = [f"train.max_steps={args.zero_steps}", *train]
    for stage in (2, 3) if args.zero_steps and name == "scicite" else ():
        zero = [*bench.ranks_cluster(2), f"zero.stage={stage}", *zero_steps]
        runs[f"{name}/zero{stage}_2ranks"] = scilm_finetune(f"zero{stage}", out, shards, zero)
    return runs


def main() -> None:
    parser = bench.command_line(__doc__, hidden=HIDDEN, out=None, **DEFAULTS)
    parser.add_argument("--samples", type=int, default=2000, help="training examples (0: all)")
    parser.add_argument("--sets", default="scicite,short", help="scicite, short or both")
    parser.add_argument("--short-length", type=int, default=20, help="tokens of a short text")
    precisions = ["auto", "fp32", "bf16"]  # auto: bf16 where the CPU multiplies it natively
    parser.add_argument("--precision", choices=precisions, default="auto", help="scilm, hf_best")
    parser.add_argument("--zero-stage", type=int, default=0, help="scilm's zero.stage")
    parser.add_argument("--zero-steps", type=int, default=0, help="steps of each ZeRO run")
    parser.add_argument("--history", action="store_true", help="add hf_padded (SciCite)")
    parser.add_argument("--compile", action="store_true", help="add scilm train.compile=true")
    args = parser.parse_args()
    os.environ.update(CPU_ENV)
    if args.worker:
        return hf_worker(args)
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
        scilm = runs[f"{name}/scilm"]
        for hf in ("hf_best", "hf_dynamic", "hf_padded"):
            if f"{name}/{hf}" in runs:
                ratio = scilm["samples_per_s"] / runs[f"{name}/{hf}"]["samples_per_s"]
                figures[f"{name}_ratio_vs_{hf}"] = ratio
        figures[f"{name}_mfu_scilm"] = scilm["mfu"]
        best_f1 = runs[f"{name}/hf_best"]["dev_macro_f1"]
        figures[f"{name}_dev_macro_f1_vs_hf_best"] = scilm["dev_macro_f1"] - best_f1
    if "scicite/zero2_2ranks" in runs:
        z2, z3 = runs["scicite/zero2_2ranks"], runs["scicite/zero3_2ranks"]
        figures["zero3_vs_zero2_samples_per_s"] = z3["samples_per_s"] / z2["samples_per_s"]
        figures["zero3_vs_zero2_peak_rss"] = z3["peak_rss_mb"] / z2["peak_rss_mb"]
    figures["runs"] = runs
    rows = {k: [run.get(k) for run in runs.values()] for k in TABLE.split()}
    bench.table(list(runs), rows, 18, 20)
    bench.report(figures, digits=3)


if __name__ == "__main__":
    main()
