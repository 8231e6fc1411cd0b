"""AntiBERTy fine-tuned on flip-gb1 (regression) and antiberta-paratope (per-residue
tags) with ``scilm finetune`` against the plain HF Trainer, same model, data and budget.

For each task: ``scilm import-model antiberty``, ``scilm prepare`` (residues separated
by spaces), then ``--max-steps`` optimizer steps of ``--batch`` examples with AdamW
(lr ``--lr``, linear decay, weight decay 0.01, fp32, one process on this machine's
cores) twice: ``scilm finetune`` (one rank, ZeRO stage 0) and ``transformers.Trainer``
(its defaults otherwise: no length grouping). The HF Trainer trains on the same
tokenisation and, for GB1, on the same standardised targets (from the manifest), so
only the training engine differs. Both models are scored by the same code on the
test split (``--test-examples``; 0 = all): GB1 test Spearman (FLIP's "three vs
rest": quadruple mutants, extrapolation), paratope PR-AUC and MCC. Throughput is the
median of per-step samples/s (scilm's metrics.jsonl; for HF the time from one
optimizer step's end to the next, data loading included as in scilm's figure).

Goal (issue 17): metric not below the HF Trainer's, >= 1.5x its samples/s.

``--precision bf16`` trains both in mixed precision (scilm ``train.precision=bf16``:
bf16 autocast on CPU, fp32 weights; HF ``bf16=True``, the same on CPU), ``auto`` what
scilm's auto resolves to on this machine (bf16 where it multiplies bf16 natively).
``--scilm-only`` skips the HF Trainer: run it once per precision to compare scilm's
seconds per step and loss (``s_per_step_median``, ``final_loss`` in the figures).

    python benchmarks/protein.py [--tasks gb1 paratope] [--max-steps 40] [--batch 16]
        [--precision fp32|bf16|auto] [--scilm-only]
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import _common as bench

TASKS = {
    "gb1": {
        "task": "regression",
        "data": "flip-gb1",
        "max_length": 280,
        "metrics": ("spearman", "pearson", "rmse"),
    },
    "paratope": {
        "task": "token_classification",
        "data": "antiberta-paratope",
        "max_length": 160,
        "metrics": ("pr_auc", "mcc", "roc_auc", "f1"),
    },
}


def test_metrics(model_dir: Path, shards: Path, task: str, examples: int) -> dict[str, Any]:
    """The task's metrics of ``model_dir`` on the first ``examples`` of the test split."""
    from scilm_hpc.data.dataset import ShardDataset
    from scilm_hpc.evaluate.inference import dataset_metrics
    from scilm_hpc.models import load_model

    model = load_model(str(model_dir), task).eval()
    test = ShardDataset(shards, "test")
    return dataset_metrics(model, test, task, 0, 64, examples)


def hf_trainer(model_dir: Path, shards: Path, task: str, out: Path, args: Any) -> dict[str, Any]:
    """Train with ``transformers.Trainer`` on the training shards' examples; its
    median per-step samples/s and the saved model's directory."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
    )

    items, labels = bench.shard_examples(shards)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # the very token ids and targets scilm trains on, as a plain list of features
    per_token = task == "token_classification"
    features = [
        {
            "input_ids": item["input_ids"].tolist(),
            "labels": item["labels"].tolist() if per_token else [float(item["labels"][0])],
        }
        for item in items
    ]
    torch.manual_seed(args.seed)
    if per_token:
        model = AutoModelForTokenClassification.from_pretrained(
            model_dir, **bench.label_kwargs(labels)
        )
        collator: Any = DataCollatorForTokenClassification(tokenizer)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, problem_type="regression"
        )
        collator = DataCollatorWithPadding(tokenizer)
    start = time.perf_counter()
    trainer, timed = bench.hf_train(
        model,
        features,
        collator,
        out,
        per_device_train_batch_size=args.batch,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        seed=args.seed,
        use_cpu=True,
        bf16=bench.cpu_precision(getattr(args, "precision", "fp32")) == "bf16",
    )
    wall = time.perf_counter() - start
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(out / "model")
    return {
        "samples_per_s_median": args.batch / bench.median(timed["step_s"]),
        "wall_s": wall,
        "model": out / "model",
    }


def import_antiberty(out: Path) -> Path:
    """AntiBERTy as an HF directory under ``out`` (``scilm import-model``, once)."""
    model_dir = out / "antiberty"
    if not (model_dir / "model.safetensors").is_file():
        bench.run([*bench.SCILM, "import-model", "antiberty", str(model_dir)])
    return model_dir


def scilm_finetune(name: str, model_dir: Path, out: Path, args: Any) -> tuple[Path, Path, float]:
    """``scilm prepare`` and ``scilm finetune`` of task ``name`` (``args``' budget) under
    ``out/NAME``: the run directory (its export in ``export/``), the shards, wall seconds."""
    spec = TASKS[name]
    task = f"task={spec['task']}"
    root = out / name
    shards = bench.prepare_shards(
        root,
        {s: bench.DATA / str(spec["data"]) / f"{s}.jsonl" for s in ("train", "dev", "test")},
        task,
        "data.text_field=sequence",
        "data.residue_separator=' '",
        f"data.max_length={spec['max_length']}",
        f"model.name_or_path={model_dir}",
    )
    run_dir = root / "scilm"
    wall = bench.run(
        bench.finetune_command(
            run_dir,
            shards,
            "cluster=none",
            task,
            f"model.name_or_path={model_dir}",
            f"train.max_steps={args.max_steps}",
            f"train.micro_batch_size={args.batch}",
            f"train.lr={args.lr}",
            f"train.seed={args.seed}",
            f"train.precision={getattr(args, 'precision', 'fp32')}",
            "zero.stage=0",
        )
    )
    return run_dir, shards, wall


def run_task(name: str, model_dir: Path, out: Path, args: Any) -> dict[str, Any]:
    spec = TASKS[name]
    root = out / name
    run_dir, shards, wall = scilm_finetune(name, model_dir, out, args)
    steps = bench.step_rows(run_dir)
    ours = {
        "samples_per_s_median": bench.median(r["samples_per_s"] for r in steps),
        "s_per_step_median": bench.median(r["step_s"] for r in steps),
        "final_loss": float(steps[-1]["loss"]),
        "wall_s": wall,
        **pick(test_metrics(run_dir / "export", shards, str(spec["task"]), args.test_examples)),
    }
    keys = ["samples_per_s_median", "wall_s", *(f"test_{k}" for k in spec["metrics"])]
    if args.scilm_only:
        return {
            "task": spec["task"],
            "scilm": {k: ours[k] for k in ["s_per_step_median", "final_loss", *keys]},
            "test_examples": int(ours["test_n_examples"]),
        }
    hf = hf_trainer(model_dir, shards, str(spec["task"]), root / "hf", args)
    hf.update(pick(test_metrics(hf.pop("model"), shards, str(spec["task"]), args.test_examples)))
    return {
        "task": spec["task"],
        "scilm": {k: ours[k] for k in keys},
        "hf_trainer": {k: hf[k] for k in keys},
        "speedup": ours["samples_per_s_median"] / hf["samples_per_s_median"],
        "test_examples": int(ours["test_n_examples"]),
    }


def pick(metrics: dict[str, Any]) -> dict[str, float]:
    return {f"test_{k}": float(v) for k, v in metrics.items()}


def main() -> None:
    parser = bench.command_line(__doc__, max_steps=40, batch=16, lr=5e-5, seed=42, out=None)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--test-examples", type=int, default=0, help="0: the whole test split")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "auto"],
        help="training precision of both runs (default: %(default)s)",
    )
    parser.add_argument("--scilm-only", action="store_true", help="skip the HF Trainer run")
    args = parser.parse_args()
    out = bench.work_dir(args.out, "protein")
    model_dir = import_antiberty(out)
    figures: dict[str, Any] = {"benchmark": "protein", "max_steps": args.max_steps}
    figures["batch"] = args.batch
    figures["precision"] = bench.cpu_precision(getattr(args, "precision", "fp32"))
    for name in args.tasks:
        figures[name] = run_task(name, model_dir, out, args)
        print(f"{name}: {json.dumps(figures[name])}", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
