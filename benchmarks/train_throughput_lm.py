"""Causal-LM training throughput and MFU: ``scilm finetune`` against the HF Trainer.

The GPU half of the throughput benchmark (issue 7): a Llama-shaped causal LM built from
its config (random weights, MiniLM's tokenizer, made once under ``--out``) trained for the
same steps on the same token ids (SciCite sentences joined into documents of about
``--seq-len`` tokens) by (a) the HF ``Trainer`` (bf16 on a GPU, fp32 on a CPU; scilm's
collation) and (c) ``scilm finetune task=causal_lm`` on one rank (bf16, ``--zero-stage``).
Per trainer: median step time after ``--warmup`` steps, samples/s, tokens/s, peak RSS,
peak GPU memory (``nvidia-smi``, whole device), model TFLOP/s (``scilm_hpc.train.flops``)
and MFU against the matmul peak measured here and against ``--nominal-tflops`` (989 for
an H100 SXM's dense bf16).

    python benchmarks/train_throughput_lm.py                       # 1B on the GPU
    python benchmarks/train_throughput_lm.py --size tiny --steps 20 # CPU check (~3 min)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import _common as bench
import numpy as np

SIZES = {
    "1b": bench.llama_shape(2048, 5632, 22, 32, 4),  # TinyLlama-1.1B's shape
    "tiny": bench.llama_shape(64, 176, 2, 4, 2),  # a CPU check (about 3.9M parameters)
}
DEFAULTS = dict(steps=60, micro_batch_size=8, seq_len=512, zero_stage=2, lr=1e-4, seed=42)
HIDDEN = {"worker": False, "shards": (Path, None), "model_dir": (Path, None)}
HF_OPTIONS = ("model_dir", "steps", "micro_batch_size", "lr", "seed")
TABLE = "samples_per_s tokens_per_s model_tflops_per_s mfu peak_rss_mb gpu_peak_mb"


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def device_env() -> dict[str, str]:
    return {"TOKENIZERS_PARALLELISM": "false", **({} if on_gpu() else {"DS_ACCELERATOR": "cpu"})}


def write_corpus(out: Path, model_dir: Path, seq_len: int) -> Path:
    """SciCite train sentences joined into documents of about ``seq_len`` tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    budget = seq_len - 2  # [CLS] ... [SEP] added by the tokenizer
    docs, current, used = [], [], 0
    for line in (bench.SCICITE / "train.jsonl").read_text(encoding="utf-8").splitlines():
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


def model_flops_per_token(model_dir: Path, seq_len: int) -> tuple[float, int]:
    """Training FLOPs per token at ``seq_len`` tokens (the library's count, what scilm
    logs) and the weights in matrix multiplies, of the model in ``model_dir``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from scilm_hpc.train.flops import ModelFlops

    with torch.device("meta"):  # shapes, no memory
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    flops = ModelFlops.of(model)
    return flops.step_flops(seq_len, seq_len**2, 1) / seq_len, flops.matmul_weights


def hf_worker(args: Any) -> None:
    """(a) in this process; leaves its step times for ``run_worker``."""
    import torch
    from transformers import AutoModelForCausalLM

    from scilm_hpc.tasks import get_task

    gpu = torch.cuda.is_available()
    _, run = bench.hf_train(
        AutoModelForCausalLM.from_pretrained(args.model_dir),
        bench.shard_examples(args.shards)[0],
        lambda items: get_task("causal_lm").collate(items, 0),
        args.out / "trainer",
        per_device_train_batch_size=args.micro_batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        seed=args.seed,
        bf16=gpu,
        use_cpu=not gpu,
        dataloader_pin_memory=gpu,
        remove_unused_columns=False,
    )
    run.pop("lrs")  # the schedule HF ran: not a figure here
    run["precision"] = "bf16" if gpu else "fp32"
    run["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20 if gpu else None
    bench.worker_result(args.out, run)


def summarize(step_s: list[float], args: Any) -> dict[str, Any]:
    """Median step time over the steps after ``--warmup``; samples/s and tokens/s."""
    timed = step_s[args.warmup :] or step_s
    step = bench.median(timed)
    return {
        "steps": len(step_s),
        "steps_timed": len(timed),
        "step_s_median": step,
        "samples_per_s": args.micro_batch_size / step,
        "tokens_per_s": args.micro_batch_size * args.seq_len / step,
    }


def scilm_finetune(args: Any, shards: Path) -> dict[str, Any]:
    """(c): ``scilm finetune task=causal_lm`` on one rank."""
    run_dir = args.out / "scilm"
    train = [f"train.{k}={getattr(args, k)}" for k in ("micro_batch_size", "lr", "seed")]
    cmd = bench.finetune_command(
        run_dir,
        shards,
        "task=causal_lm",
        "cluster=none",
        f"cluster.gpus_per_node={1 if on_gpu() else 0}",
        f"model.name_or_path={args.model_dir}",
        f"zero.stage={args.zero_stage}",
        "train.precision=bf16",
        f"train.max_steps={args.steps}",
        *train,
    )
    proc = bench.run_measured(cmd, args.out / "scilm.log", device_env(), gpu=True)
    steps = bench.step_rows(run_dir)
    timed = steps[args.warmup :] or steps
    return {
        **proc,
        "precision": "bf16",
        "zero_stage": args.zero_stage,
        "data_fraction_median": bench.median(r["data_fraction"] for r in steps),
        "model_tflops_per_s": bench.median(r["model_tflops"] for r in timed),  # as scilm logged
        **summarize([r["step_s"] for r in steps], args),
    }


def main() -> None:
    parser = bench.command_line(__doc__, hidden=HIDDEN, out=None, **DEFAULTS)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--warmup", type=int, default=10, help="first steps not timed")
    parser.add_argument("--nominal-tflops", type=float, help="the device's datasheet peak")
    args = parser.parse_args()
    os.environ.update(device_env())
    if args.worker:
        return hf_worker(args)
    args.out = bench.work_dir(args.out, "lm")
    gpu = on_gpu()
    from scilm_hpc.data.dataset import ShardDataset
    from scilm_hpc.train.loop import cpu_has_native_bf16

    peak = {k: v / 1e3 for k, v in bench.matmul_peaks("cuda" if gpu else "cpu").items()}  # TFLOP/s
    shape, positions = SIZES[args.size], max(args.seq_len, 128)
    args.model_dir = bench.random_llama(args.out / f"llama-{args.size}", shape, positions)
    corpus = {"train": write_corpus(args.out, args.model_dir, args.seq_len)}
    lm = ["task=causal_lm", "data.format=text", f"model.name_or_path={args.model_dir}"]
    shards = bench.prepare_shards(args.out, corpus, *lm, f"data.max_length={args.seq_len}")
    # documents are cut at about seq_len tokens; the FLOPs use the mean real length
    args.seq_len = int(round(float(np.mean(ShardDataset(shards, "train").lengths()))))
    flops_token, params = model_flops_per_token(args.model_dir, args.seq_len)
    options = {k: getattr(args, k) for k in HF_OPTIONS}
    hf = bench.run_worker(__file__, args.out / "hf", device_env(), True, shards=shards, **options)
    # (a) on a CPU is fp32 (HF's CPU bf16 is an autocast like scilm's: compare the
    # default a tutorial gets); its MFU is against the fp32 peak. Its first step is
    # not timed either (steps from the end of the first).
    hf.update(summarize(hf.pop("step_s")[1:], args))
    runs = {"hf": hf, "scilm": scilm_finetune(args, shards)}
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
    bench.table(list(runs), {k: [run[k] for run in runs.values()] for k in TABLE.split()})
    print(f"scilm / hf: {figures['ratio_vs_hf']:.2f}x; bf16 matmul peak {peak['bf16']:.2f} TFLOP/s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
