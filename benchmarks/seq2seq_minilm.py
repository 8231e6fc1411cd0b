"""Fine-tuning MiniLM -> MiniLM (a warm-started encoder-decoder) on SciTLDR: ``scilm
finetune`` against HF ``Seq2SeqTrainer`` at its best, the same number of steps, in one run.

Both start from the same weights (the task's warm start, seed 42), read the same token
ids (the prepared shards), and train with the same batch size, weight decay, clipping
and precision (bf16 autocast on a CPU with native bf16). HF gets dynamic padding
(``DataCollatorForSeq2Seq``), length grouping (``train_sampling_strategy=
"group_by_length"``) and ``adamw_torch_fused``. Figures: median samples/s over steps and
its ratio, mean training loss, the learning rate of every step of both runs, and ROUGE
of both exports on the first ``--test-samples`` test abstracts through the same ``scilm
evaluate`` (a warm-started pair needs far more steps than a CPU budget gives, so judge the
pair on speed and loss; ROUGE is reported for completeness).

The learning-rate schedule is the same, step for step: scilm runs its ``linear``
schedule with ``--lr`` and ``train.warmup_ratio=--warmup-ratio`` (0.1, the shipped
``configs/train/default.yaml``), which is HF's ``get_linear_schedule_with_warmup`` (step 0
at 0, step k of the warm-up at ``lr * k / warmup``, a linear decay to 0 at the last
step; ``scilm_hpc.train.schedule``). HF's optimizer is handed the per-step rates of
scilm's own scheduler (built from the job as the trainer builds it) as a ``LambdaLR``, so
both runs apply the same rates even if either schedule changed. The benchmark checks the
rates both runs applied (HF's recorded at each optimizer step, scilm's from
``metrics.jsonl``, whose ``lr`` is the one the logged step ran at) and stops if they
differ.

    python benchmarks/seq2seq_minilm.py [--steps 150] [--micro-batch-size 16]
    quick check: --steps 6 --micro-batch-size 4 --train-samples 64 --test-samples 8
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import _common as bench
import numpy as np

PAIR = ["model.name_or_path=minilm", "model.decoder_name_or_path=minilm"]


def hf_run(args: argparse.Namespace, shards: Path, out: Path, lrs: list[float]) -> dict[str, Any]:
    """Seq2SeqTrainer on the shards' token ids; its model saved to ``out``."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from scilm_hpc.data.dataset import ShardDataset
    from scilm_hpc.model_source import load_tokenizer, packaged_minilm_path
    from scilm_hpc.schema import DataConfig
    from scilm_hpc.tasks.seq2seq import Seq2Seq

    minilm = packaged_minilm_path()
    tokenizer = load_tokenizer(minilm)
    torch.manual_seed(42)  # scilm's train.seed before it builds the model
    model = Seq2Seq(DataConfig(max_target_length=32)).load_pretrained(minilm, None, [], minilm)
    train = ShardDataset(shards, "train")
    examples = []
    for i in range(len(train)):
        item = train[i]
        ids, cut = item["input_ids"].astype(np.int64), int(item["source_length"])
        examples.append({"input_ids": ids[:cut].tolist(), "labels": ids[cut:].tolist()})
    trainer, timed = bench.hf_train(
        model,
        examples,
        DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        out / "trainer",
        seq2seq=True,
        **bench.hf_best_on_scilm_lrs(args, lrs),
    )
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(out / "model")
    step_s = timed["step_s"]
    return {
        "samples_per_s": args.micro_batch_size / bench.median(step_s[args.skip :]),
        "mean_loss": float(trainer.state.log_history[-1]["train_loss"]),
        "precision": bench.cpu_precision(args.precision),
        "threads": timed["threads"],
        "lrs": timed["lrs"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--skip", type=int, default=1, help="first steps left out of medians")
    parser.add_argument("--train-samples", type=int, default=0, help="0: all 1992")
    parser.add_argument("--test-samples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="scilm-bench-s2s-"))
    files = {}
    for split, n in (("train", args.train_samples), ("test", args.test_samples)):
        lines = (bench.SCITLDR / f"{split}.jsonl").read_text().splitlines()[: n or None]
        files[split] = root / f"{split}.jsonl"
        files[split].write_text("".join(x + "\n" for x in lines))
    shards = bench.prepare_shards(root, files, *bench.SCITLDR_SEQ2SEQ, *PAIR)
    run_dir = root / "scilm"
    overrides = bench.seq2seq_finetune_overrides(run_dir, shards, PAIR, args)
    lrs = bench.scilm_lrs(overrides, args.steps)
    wall = bench.run(bench.job_command("finetune", *overrides))
    steps = bench.step_rows(run_dir)
    logged = [r["lr"] for r in steps]  # the lr each step ran at
    if not np.allclose(logged, lrs, rtol=1e-6, atol=0):
        raise SystemExit(f"scilm's schedule is not the one computed: {logged} vs {lrs}")
    ours = {
        "samples_per_s": bench.median(r["samples_per_s"] for r in steps[args.skip :]),
        "mean_loss": float(np.mean([r["loss"] for r in steps])),
        "wall_s": wall,
    }
    hf = hf_run(args, shards, root / "hf", lrs)
    hf_lrs = hf.pop("lrs")
    if not np.allclose(hf_lrs, lrs, rtol=1e-6, atol=0):
        raise SystemExit(f"HF did not follow scilm's schedule: {hf_lrs} vs {lrs}")
    ours["rouge"] = bench.seq2seq_rouge(
        run_dir / "export", shards, root / "eval-scilm", args.max_new_tokens
    )
    hf["rouge"] = bench.seq2seq_rouge(
        root / "hf" / "model", shards, root / "eval-hf", args.max_new_tokens
    )
    figures = {
        "benchmark": "seq2seq_minilm",
        "steps": args.steps,
        "micro_batch_size": args.micro_batch_size,
        "scilm": ours,
        "hf_seq2seq_trainer": hf,
        "ratio_samples_per_s": ours["samples_per_s"] / hf["samples_per_s"],
        "warmup_ratio": args.warmup_ratio,
        "lr_per_step": [float(f"{lr:.6g}") for lr in lrs],  # both runs (checked)
        "loss_curve_scilm": [round(r["loss"], 4) for r in steps],
    }
    bench.report(figures)


if __name__ == "__main__":
    main()
