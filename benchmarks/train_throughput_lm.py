"""Causal-LM training throughput and MFU: ``scilm finetune`` against the HF Trainer.

The GPU half of the throughput benchmark (issue 7): a Llama-shaped causal LM
initialised from its config (random weights, no download), trained for the same
steps on the same token ids by

  (a) HF ``transformers.Trainer`` (bf16 on a GPU: ``bf16=True``, its default AdamW;
      fp32 on CPU), batches collated exactly as scilm collates them;
  (c) ``scilm finetune task=causal_lm`` on one rank: ``train.precision=bf16``
      (DeepSpeed bf16 on a GPU, bf16 autocast on a CPU with native bf16) and
      ``--zero-stage`` (default 2).

Corpus: SciCite training sentences (``../shared/data/scicite``), consecutive sentences
joined into documents of about ``--seq-len`` tokens, so every sequence is nearly full.
Tokenizer: the packaged MiniLM's (vocabulary 30,522); the model dir is written once
under ``--out`` and reused.

Printed per trainer: median step time over the steps after ``--warmup`` (first steps
compile kernels and grow allocators), samples/s, tokens/s, peak RSS, peak GPU memory
(``nvidia-smi`` polled, whole device), model TFLOP/s and MFU against the bf16 (or
fp32) matrix-multiply peak this script measures on the same device, and against
``--nominal-tflops`` where given (989 for an H100 SXM's dense bf16). Model FLOPs:
the library's count (``scilm_hpc.train.flops``: 6 * N + 12 * L * d * s per token, N the
weights of matrix multiplies, lm_head included; PaLM appendix B); scilm's figures come
from its metrics.jsonl, the HF Trainer's from the same count at the mean length. One
JSON line at the end.

    python benchmarks/train_throughput_lm.py                       # 1B on the GPU
    python benchmarks/train_throughput_lm.py --size tiny --steps 20 # CPU check (~3 min)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    REPO,
    SCICITE,
    SCILM,
    hf_train,
    matmul_peak_gflops,
    median,
    prepare_shards,
    random_llama,
    run_measured,
    step_rows,
    worker_command,
)

SIZES: dict[str, dict[str, int]] = {
    # TinyLlama-1.1B's shape with MiniLM's vocabulary: 1.1B parameters
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
    # a CPU check of the whole path (about 3.9M parameters)
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def write_corpus(out: Path, model_dir: Path, seq_len: int) -> Path:
    """SciCite train sentences joined into documents of about ``seq_len`` tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    budget = seq_len - 2  # [CLS] ... [SEP] added by the tokenizer
    docs, current, used = [], [], 0
    for line in (SCICITE / "train.jsonl").read_text(encoding="utf-8").splitlines():
        text = " ".join(json.loads(line)["text"].split())
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if current and used + n > budget:
            docs.append(" ".join(current))
            current, used = [], 0
        current.append(text)
        used += n
    if current:
        docs.append(" ".join(current))
    corpus = out / "corpus.txt"
    corpus.write_text("".join(d + "\n" for d in docs), encoding="utf-8")
    return corpus


# ---------------------------------------------------------------- measuring a run


class GpuMemory:
    """Peak ``memory.used`` (MiB) of GPU 0 while the block runs, from ``nvidia-smi``."""

    def __init__(self) -> None:
        self.peak_mb: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._done.wait(0.5):
            try:
                used = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()
            except (OSError, subprocess.CalledProcessError):
                return
            if used:
                self.peak_mb = max(self.peak_mb or 0.0, float(used[0]))

    def __enter__(self) -> GpuMemory:
        if on_gpu():
            self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()


def model_flops_per_token(model_dir: Path, seq_len: int) -> tuple[float, int]:
    """(training FLOPs per token, weights in matrix multiplies) of the model in
    ``model_dir`` for sequences of ``seq_len`` tokens: the library's count
    (``scilm_hpc.train.flops``, what scilm logs in metrics.jsonl), shapes only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from scilm_hpc.train.flops import ModelFlops

    with torch.device("meta"):  # shapes, no memory
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    flops = ModelFlops.of(model)
    return flops.step_flops(seq_len, seq_len**2, 1) / seq_len, flops.matmul_weights


def hf_worker(args: argparse.Namespace) -> None:
    """(a) in this process; writes its step end times to a JSON file."""
    import torch
    from transformers import AutoModelForCausalLM

    from scilm_hpc.data.dataset import ShardDataset
    from scilm_hpc.tasks import get_task

    shards = ShardDataset(args.shards, "train")
    examples = [shards[i] for i in range(len(shards))]
    gpu = torch.cuda.is_available()
    _, run = hf_train(
        AutoModelForCausalLM.from_pretrained(args.model_dir),
        examples,
        lambda items: get_task("causal_lm").collate(items, 0),
        args.out / "hf" / "trainer",
        per_device_train_batch_size=args.micro_batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        seed=args.seed,
        bf16=gpu,
        use_cpu=not gpu,
        dataloader_pin_memory=gpu,
        remove_unused_columns=False,
    )
    result = {
        "threads": run["threads"],
        "optimizer": run["optimizer"],
        "precision": "bf16" if gpu else "fp32",
        "step_ends": run["ends"],
        "gpu_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
    }
    (args.out / "hf" / "result.json").write_text(json.dumps(result))


def summarize(step_s: list[float], warmup: int, samples_per_step: int, seq_len: int) -> dict:
    timed = step_s[warmup:] or step_s
    step = median(timed)
    return {
        "steps": len(step_s),
        "steps_timed": len(timed),
        "step_s_median": step,
        "samples_per_s": samples_per_step / step,
        "tokens_per_s": samples_per_step * seq_len / step,
    }


def run_hf(args: argparse.Namespace, shards: Path) -> dict[str, Any]:
    cmd = worker_command(
        __file__,
        hf_worker=True,
        shards=shards,
        model_dir=args.model_dir,
        out=args.out,
        steps=args.steps,
        micro_batch_size=args.micro_batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    (args.out / "hf").mkdir(parents=True, exist_ok=True)
    with GpuMemory() as gpu_mem:
        proc = run_measured(cmd, args.out / "hf.log", {**os.environ, **device_env()})
    result = json.loads((args.out / "hf" / "result.json").read_text())
    ends = result.pop("step_ends")
    return {
        **proc,
        **result,
        "gpu_peak_mb": gpu_mem.peak_mb,
        **summarize(list(np.diff(ends)), args.warmup, args.micro_batch_size, args.seq_len),
    }


def scilm_finetune(args: argparse.Namespace, shards: Path) -> dict[str, Any]:
    run_dir = args.out / "scilm"
    gpu = on_gpu()
    overrides = [
        "task=causal_lm",
        "cluster=none",
        f"cluster.gpus_per_node={1 if gpu else 0}",
        f"model.name_or_path={args.model_dir}",
        f"run.dir={run_dir}",
        f"data.shards={shards}",
        f"zero.stage={args.zero_stage}",
        "train.precision=bf16",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.lr={args.lr}",
        f"train.seed={args.seed}",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "train.eval_every=0",
    ]
    with GpuMemory() as gpu_mem:
        proc = run_measured(
            [*SCILM, "finetune", str(REPO / "jobs/finetune.yaml"), *overrides],
            args.out / "scilm.log",
            {**os.environ, **device_env()},
        )
    steps = step_rows(run_dir)
    samples = args.micro_batch_size
    step_s = [r["step_s"] for r in steps]
    return {
        **proc,
        "precision": "bf16",
        "zero_stage": args.zero_stage,
        "gpu_peak_mb": gpu_mem.peak_mb,
        "data_fraction_median": median(r["data_fraction"] for r in steps),
        # the model FLOP/s scilm logged, over the timed steps
        "model_tflops_per_s": median(r["model_tflops"] for r in steps[args.warmup :] or steps),
        **summarize(step_s, args.warmup, samples, args.seq_len),
    }


def device_env() -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not on_gpu():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="first steps not timed")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--nominal-tflops", type=float, default=None, help="the device's datasheet peak"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(device_env())
    if args.hf_worker:
        hf_worker(args)
        return
    args.out = args.out or Path(tempfile.mkdtemp(prefix="scilm-bench-lm-"))
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = on_gpu()
    from scilm_hpc.train.loop import cpu_has_native_bf16

    # (a) on a CPU is fp32 (HF's CPU bf16 is an autocast like scilm's: compare the
    # default a tutorial gets); its MFU is against the fp32 peak
    hf_precision = "bf16" if gpu else "fp32"
    device = "cuda" if gpu else "cpu"
    peak = {
        p: matmul_peak_gflops(d, device) / 1e3
        for p, d in (("bf16", "bfloat16"), ("fp32", "float32"))
    }
    model_dir = random_llama(
        args.out / f"llama-{args.size}", SIZES[args.size], max(args.seq_len, 128)
    )
    args.model_dir = model_dir
    corpus = write_corpus(args.out, model_dir, args.seq_len)
    shards = prepare_shards(
        args.out,
        {"train": corpus},
        "task=causal_lm",
        "data.format=text",
        f"model.name_or_path={model_dir}",
        f"data.max_length={args.seq_len}",
    )
    from scilm_hpc.data.dataset import ShardDataset

    lengths = ShardDataset(shards, "train").lengths()
    # documents are cut at about seq_len tokens; the FLOPs use the mean real length
    args.seq_len = int(round(float(np.mean(lengths))))
    flops_token, params = model_flops_per_token(args.model_dir, args.seq_len)
    runs = {"hf": run_hf(args, shards), "scilm": scilm_finetune(args, shards)}
    runs["hf"]["precision"] = hf_precision
    for run in runs.values():
        run.setdefault("model_tflops_per_s", run["tokens_per_s"] * flops_token / 1e12)
        run["mfu"] = run["model_tflops_per_s"] / peak[run["precision"]]
        if args.nominal_tflops:
            run["mfu_nominal"] = run["model_tflops_per_s"] / args.nominal_tflops
    figures: dict[str, Any] = {
        "benchmark": "train_throughput_lm",
        "device": ("cuda:" + __import__("torch").cuda.get_device_name(0)) if gpu else "cpu",
        "cpu_native_bf16": cpu_has_native_bf16(),
        "size": args.size,
        "params_counted": params,
        "mean_tokens_per_sequence": args.seq_len,
        "micro_batch_size": args.micro_batch_size,
        "matmul_peak_tflops_bf16": peak["bf16"],
        "matmul_peak_tflops_fp32": peak["fp32"],
        "flops_per_token": flops_token,
        "ratio_vs_hf": runs["scilm"]["samples_per_s"] / runs["hf"]["samples_per_s"],
        "runs": runs,
    }
    for name, run in runs.items():
        print(
            f"{name:>6}: {run['samples_per_s']:.2f} samples/s, {run['tokens_per_s']:.0f} "
            f"tokens/s, {run['model_tflops_per_s']:.3f} TFLOP/s, MFU {run['mfu']:.3f} "
            f"({run['precision']}), peak RSS {run['peak_rss_mb']:.0f} MB, "
            f"GPU peak {run['gpu_peak_mb'] or '-'} MB"
        )
    print(f"scilm / hf: {figures['ratio_vs_hf']:.2f}x; bf16 matmul peak {peak['bf16']:.2f} TFLOP/s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
