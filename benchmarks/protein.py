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
median of per-step samples/s (scilm's metrics.jsonl; a step-timing callback for HF).

Goal (issue 17): metric not below the HF Trainer's, >= 1.5x its samples/s.

    python benchmarks/protein.py [--tasks gb1 paratope] [--max-steps 40] [--batch 16]
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SCILM = str(Path(sys.executable).with_name("scilm"))
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


def scilm(*args: str) -> float:
    """Run ``scilm ARGS``; returns wall seconds."""
    start = time.perf_counter()
    done = subprocess.run([SCILM, *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"scilm {' '.join(args[:2])} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


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
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from scilm_hpc.data.dataset import ShardDataset

    train = ShardDataset(shards, "train")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # the very token ids and targets scilm trains on, as a plain list of features
    features = []
    for i in range(len(train)):
        item = train[i]
        row: dict[str, Any] = {"input_ids": item["input_ids"].tolist()}
        labels = item["labels"]
        row["labels"] = labels.tolist() if task == "token_classification" else [float(labels[0])]
        features.append(row)
    torch.manual_seed(args.seed)
    if task == "regression":
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, problem_type="regression"
        )
        collator: Any = DataCollatorWithPadding(tokenizer)
    else:
        labels = train.label_names
        model = AutoModelForTokenClassification.from_pretrained(
            model_dir,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
        )
        collator = DataCollatorForTokenClassification(tokenizer)

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._start = 0.0

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self._start = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.times.append(time.perf_counter() - self._start)

    timer = StepTimes()
    training = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        dataloader_num_workers=0,
        use_cpu=True,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=features,
        data_collator=collator,
        callbacks=[timer],
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(out / "model")
    return {
        "samples_per_s_median": args.batch / statistics.median(timer.times),
        "wall_s": wall,
        "model": out / "model",
    }


def run_task(name: str, model_dir: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    spec = TASKS[name]
    data = DATA / str(spec["data"])
    task = str(spec["task"])
    root = out / name
    scilm(
        "prepare",
        str(REPO / "jobs/prepare.yaml"),
        "cluster=none",
        f"task={task}",
        f"run.dir={root}",
        f"data.train={data / 'train.jsonl'}",
        f"data.dev={data / 'dev.jsonl'}",
        f"data.test={data / 'test.jsonl'}",
        "data.text_field=sequence",
        "data.residue_separator=' '",
        f"data.max_length={spec['max_length']}",
        f"model.name_or_path={model_dir}",
        "data.overwrite=true",
    )
    shards = root / "shards"
    run_dir = root / "scilm"
    wall = scilm(
        "finetune",
        str(REPO / "jobs/finetune.yaml"),
        "cluster=none",
        f"task={task}",
        f"run.dir={run_dir}",
        f"data.shards={shards}",
        f"model.name_or_path={model_dir}",
        f"train.max_steps={args.max_steps}",
        f"train.micro_batch_size={args.batch}",
        f"train.lr={args.lr}",
        f"train.seed={args.seed}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "zero.stage=0",
    )
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "samples_per_s" in r]
    ours = {
        "samples_per_s_median": statistics.median(r["samples_per_s"] for r in steps),
        "wall_s": wall,
        "test": test_metrics(run_dir / "export", shards, task, args.test_examples),
    }
    hf = hf_trainer(model_dir, shards, task, root / "hf", args)
    hf["test"] = test_metrics(hf.pop("model"), shards, task, args.test_examples)
    keys = spec["metrics"]
    return {
        "task": task,
        "scilm": {**{k: v for k, v in ours.items() if k != "test"}, **pick(ours["test"], keys)},
        "hf_trainer": {**{k: v for k, v in hf.items() if k != "test"}, **pick(hf["test"], keys)},
        "speedup": ours["samples_per_s_median"] / hf["samples_per_s_median"],
        "test_examples": ours["test"]["n_examples"],
    }


def pick(metrics: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float]:
    return {f"test_{k}": float(metrics[k]) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--test-examples", type=int, default=0, help="0: the whole test split")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = args.out or Path(tempfile.mkdtemp(prefix="scilm-bench-protein-"))
    model_dir = out / "antiberty"
    if not (model_dir / "model.safetensors").is_file():
        scilm("import-model", "antiberty", str(model_dir))
    figures: dict[str, Any] = {"benchmark": "protein", "max_steps": args.max_steps}
    figures["batch"] = args.batch
    for name in args.tasks:
        figures[name] = run_task(name, model_dir, out, args)
        print(f"{name}: {json.dumps(figures[name])}", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
