"""What the benchmarks share, so that each benchmark file holds only its measurement.

Paths (the repository, the shared data sets, the ``scilm`` script), running ``scilm``
(exiting with the tail of its stderr when it fails), preparing a corpus into shards,
the tiny and packaged models the benchmarks train, ``metrics.jsonl`` rows, medians,
and the run measurements both throughput benchmarks take (peak RSS of a process tree,
the plain HF Trainer timed step by step, the matrix-multiply peak).

Benchmarks run as scripts (``python benchmarks/NAME.py``): Python puts this folder on
``sys.path``, so ``import _common`` finds this module. Heavy imports (torch,
transformers, scilm_hpc) happen inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"  # the real data sets (../shared/data, as in CI)
SCICITE = DATA / "scicite"


def _scilm_command() -> list[str]:
    """The ``scilm`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("scilm")
    if script.is_file():
        return [str(script)]
    found = shutil.which("scilm")
    return [found] if found else [sys.executable, "-m", "scilm_hpc.cli"]


SCILM = _scilm_command()

# one tokenizer thread per process: the benchmarks give each process its cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------- running commands


def run(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> float:
    """Run ``cmd`` (``env`` added to this environment; output kept in ``log`` if given).

    Returns:
        Wall seconds.

    Raises:
        SystemExit: when it fails, with the tail of its stderr.
    """
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        name = " ".join(Path(c).name for c in cmd[:2])
        sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return wall


def run_scilm(*args: str, env: dict[str, str] | None = None, log: Path | None = None) -> float:
    """Run ``scilm ARGS``; wall seconds (exits with its stderr tail when it fails)."""
    return run([*SCILM, *args], env, log)


def ranks_cluster(ranks: int) -> list[str]:
    """Cluster overrides: one process (``cluster=none``) or ``ranks`` local one-core ranks."""
    if ranks == 1:
        return ["cluster=none"]
    return ["cluster=local", f"cluster.tasks_per_node={ranks}", "cluster.cpus_per_task=1"]


def prepare_shards(out: Path, splits: dict[str, Path], *overrides: str) -> Path:
    """``scilm prepare`` of the corpus files ``splits`` (split name -> file) in one
    process, run directory ``out`` (its log in ``out/prepare.log``); the shards directory."""
    out.mkdir(parents=True, exist_ok=True)
    run_scilm(
        "prepare",
        str(REPO / "jobs/prepare.yaml"),
        "cluster=none",
        f"run.dir={out}",
        *(f"data.{split}={path}" for split, path in splits.items()),
        "data.overwrite=true",
        *overrides,
        log=out / "prepare.log",
    )
    return out / "shards"


def eval_metrics(
    model: Path | str, shards: Path, split: str, run_dir: Path, *overrides: str
) -> dict[str, Any]:
    """Metrics of an exported model on a split of ``shards`` (``scilm evaluate``, one
    process, run directory ``run_dir``, ``overrides`` added)."""
    run_scilm(
        "evaluate",
        str(REPO / "jobs/evaluate.yaml"),
        "cluster=none",
        f"run.dir={run_dir}",
        f"model.name_or_path={model}",
        f"data.shards={shards}",
        f"eval.split={split}",
        *overrides,
    )
    return json.loads((run_dir / "eval.json").read_text())["metrics"]


def scicite(*splits: str) -> dict[str, Path]:
    """SciCite's JSONL files of ``splits`` (default train, dev, test), for prepare_shards."""
    return {s: SCICITE / f"{s}.jsonl" for s in splits or ("train", "dev", "test")}


# ---------------------------------------------------------------- reading results


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (none while it does not exist yet)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def step_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The training-step rows of a run's ``metrics.jsonl`` (those with ``samples_per_s``)."""
    return [r for r in metrics_rows(run_dir) if "samples_per_s" in r]


def median(values: Iterable[float]) -> float:
    return float(statistics.median(values))


def show(figures: dict[str, Any], width: int = 32, digits: int = 2) -> None:
    """Print ``key: value`` lines (floats to ``digits``; the ``runs`` table left out)."""
    for key, value in figures.items():
        if key != "runs":
            shown = f"{value:.{digits}f}" if isinstance(value, float) else value
            print(f"{key:>{width}}: {shown}")


# ---------------------------------------------------------------- models


def _minilm_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from scilm_hpc.model_source import packaged_minilm_path

    return AutoTokenizer.from_pretrained(packaged_minilm_path())


def tiny_bert(out: Path) -> Path:
    """A tiny randomly initialised BERT classifier with MiniLM's tokenizer (the same
    fingerprint, so MiniLM shards fit it), saved in ``out``; the tests' ``tiny_model_dir``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = _minilm_tokenizer()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def minilm_classifier(out: Path, labels: list[str]) -> Path:
    """The packaged MiniLM with a new (seeded) head for ``labels``, saved in ``out``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from scilm_hpc.model_source import packaged_minilm_path

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        packaged_minilm_path(),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)},
    )
    model.save_pretrained(out)
    _minilm_tokenizer().save_pretrained(out)
    return out


#: The tests' tiny Llama (fields of LlamaConfig).
TINY_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}


def random_llama(out: Path, shape: dict[str, int], max_positions: int) -> Path:
    """A randomly initialised Llama of ``shape`` (LlamaConfig fields) with MiniLM's
    tokenizer, untied lm_head, saved in fp32 in ``out`` (kept if already there)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _minilm_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **shape,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------- measuring runs


def _tree_hwm_kb(root: int) -> dict[int, int]:
    """VmHWM (kB) of ``root`` and every live descendant."""
    import psutil

    out: dict[int, int] = {}
    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.Error:
        return out
    for proc in procs:
        try:
            with open(f"/proc/{proc.pid}/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        out[proc.pid] = int(line.split()[1])
        except OSError:
            pass
    return out


def run_measured(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` (output to ``log``); returns wall seconds and the peak RSS (MiB) of
    the largest process of its tree (polled VmHWM, and the kernel's figure for the
    reaped tree from wait4). Exits with the log's tail when it fails."""
    peaks: dict[int, int] = {}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def poll() -> None:
            while not done.wait(0.2):
                for pid, kb in _tree_hwm_kb(proc.pid).items():
                    peaks[pid] = max(peaks.get(pid, 0), kb)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
    peak_kb = max([usage.ru_maxrss, *peaks.values()])  # ru_maxrss is in kB on Linux
    return {"wall_s": wall, "peak_rss_mb": peak_kb / 1024}


def matmul_peak_gflops(dtype_name: str, device: str = "cpu") -> float:
    """Best GFLOP/s of a square ``torch.matmul`` in this process (all threads): n = 2048,
    best of 7 on a CPU; n = 8192, best of 10 on ``cuda`` (its cached memory freed after)."""
    import torch

    gpu = device == "cuda"
    n, repeats = (8192, 10) if gpu else (2048, 7)
    a = torch.randn(n, n, device=device).to(getattr(torch, dtype_name))
    b = torch.randn(n, n, device=device).to(a.dtype)
    for _ in range(3 if gpu else 1):  # warm-up: thread pool, packing buffers, kernels
        torch.matmul(a, b)
    if gpu:
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        if gpu:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del a, b
    if gpu:
        torch.cuda.empty_cache()
    return 2 * n**3 / best / 1e9


def hf_train(
    model: Any,
    examples: list[Any],
    collator: Any,
    output_dir: Path,
    seq2seq: bool = False,
    lr_factors: list[float] | None = None,
    **training: Any,
) -> tuple[Any, dict[str, Any]]:
    """Train ``model`` on ``examples`` (a list is a map-style dataset) with the plain HF
    ``Trainer`` (``seq2seq``: ``Seq2SeqTrainer``): weight decay 0.01, gradient clipping at
    1.0, no saving, logging or progress bar; ``training``: the other ``TrainingArguments``.
    ``lr_factors``: the learning rate of optimizer step ``k`` is ``learning_rate *
    lr_factors[k]`` (a ``LambdaLR`` in place of ``lr_scheduler_type``), to follow another
    run's schedule step for step.

    Returns:
        The trainer, and its threads, optimizer, the time training began (``begin``),
        when each optimizer step ended (``ends``, after a CUDA synchronize on a GPU) and
        the learning rate each optimizer step used (``lrs``).
    """
    import torch
    from transformers import (
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.begin = 0.0
            self.ends: list[float] = []

            self.lrs: list[float] = []

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.begin = time.perf_counter()

        def on_step_begin(self, *_: Any, **kwargs: Any) -> None:
            self.lrs.append(float(kwargs["optimizer"].param_groups[0]["lr"]))

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    args = (Seq2SeqTrainingArguments if seq2seq else TrainingArguments)(
        output_dir=str(output_dir),
        weight_decay=0.01,
        max_grad_norm=1.0,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **training,
    )
    base = Seq2SeqTrainer if seq2seq else Trainer

    class FollowingTrainer(base):  # type: ignore[misc,valid-type]
        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if lr_factors is None:
                return super().create_scheduler(num_training_steps, optimizer)
            factors = list(lr_factors)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda k: factors[min(k, len(factors) - 1)]
            )
            return self.lr_scheduler

    clock = StepClock()
    trainer = FollowingTrainer(
        model=model, args=args, train_dataset=examples, data_collator=collator, callbacks=[clock]
    )
    trainer.train()
    return trainer, {
        "threads": torch.get_num_threads(),
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "begin": clock.begin,
        "ends": clock.ends,
        "lrs": clock.lrs,
    }


def worker_command(script: str, **options: Any) -> list[str]:
    """``python SCRIPT --opt value ...`` (underscores in option names become dashes;
    ``True``: the flag alone): a benchmark re-running itself as a worker process."""
    cmd = [sys.executable, str(Path(script).resolve())]
    for name, value in options.items():
        cmd += [f"--{name.replace('_', '-')}", *([] if value is True else [str(value)])]
    return cmd
