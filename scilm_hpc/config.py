"""Load, merge and validate job configurations.

A job file is YAML with an optional ``defaults`` list of building blocks from
``configs/`` (``group/name``; later entries win), then its own keys, then the
command line's ``key=value`` overrides (OmegaConf dot-list syntax) and group
choices (``cluster=dev``, ``compress=int8-dynamic``). Everything is merged onto
the dataclass schema of ``schema.py``. Problems are collected, not raised one at
a time, so a user sees every mistake at once, each with its full dotted key.
"""

from __future__ import annotations

import difflib
import os
import sysconfig
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scilm_hpc import schema
from scilm_hpc.compress.recipe import recipe_problems
from scilm_hpc.data.ranges import corpus_files
from scilm_hpc.errors import ConfigError, UserError
from scilm_hpc.model_source import path_problem
from scilm_hpc.runtime.slurm import unsafe_values
from scilm_hpc.schema import JobConfig, check_at_least, check_choice
from scilm_hpc.tasks import TASKS

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The least time between a Slurm job's start and its time-limit USR2
#: (``time_min * 60 - signal_delay_s``): enough for Python to start and install the handler.
MIN_SIGNAL_LEAD_S = 10
#: What a required key is for, after "required value is missing".
MISSING_HINTS = {
    "run.dir": (
        "; the directory this run writes, e.g. run.dir=runs/ft-lr3e-5 (a new one for a new "
        "experiment, an earlier run's to continue it); the shipped job files set none, so "
        "that no run reuses another's directory and checkpoints by accident"
    ),
}


def shipped_root() -> Path:
    """Where the shipped ``configs/`` and ``jobs/`` are: the clone (editable install), or
    ``PREFIX/share/scilm`` of a ``pip install .`` (``setup.cfg`` data_files)."""
    if (REPO_ROOT / "configs").is_dir():
        return REPO_ROOT
    here = Path(__file__).resolve().parents  # PREFIX/lib/pythonX.Y/site-packages/scilm_hpc
    for prefix in (Path(sysconfig.get_path("data")), *here[4:5]):
        if (prefix / "share" / "scilm" / "configs").is_dir():
            return prefix / "share" / "scilm"
    return REPO_ROOT


def config_root() -> Path:
    """The directory holding the config groups (``configs/``).

    ``SCILM_CONFIG_DIR`` points elsewhere, e.g. at a site's own collection.
    """
    return Path(os.environ.get("SCILM_CONFIG_DIR") or shipped_root() / "configs")


def group_choices(group: str) -> list[str]:
    """Names of the building blocks available in ``configs/GROUP/``."""
    return sorted(p.stem for p in (config_root() / group).glob("*.yaml"))


def _read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{what}: file '{path}' does not exist")
    try:
        with path.open(encoding="utf-8") as fh:
            return yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 ({exc.reason})") from None


def _group_file(group: str, choice: str) -> Path:
    """Resolve a group choice: a name in ``configs/GROUP/`` or a path to a YAML file."""
    if choice.endswith((".yaml", ".yml")) or os.sep in choice:
        return Path(choice)
    path = config_root() / group / f"{choice}.yaml"
    if not path.is_file():
        allowed = ", ".join(group_choices(group)) or "(none)"
        raise ConfigError(
            f"{group}: no building block '{choice}' in configs/{group}/; "
            f"allowed: {allowed}, or a path to a .yaml file"
        )
    return path


def _type_name(node: Any) -> str:
    ref = getattr(node._metadata, "ref_type", Any)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    for typ, name in names.items():
        if ref is typ or ref == typ | None:
            return name + (" or null" if ref == typ | None else "")
    if isinstance(node, ListConfig):
        return "a list"
    return "a mapping" if isinstance(node, DictConfig) else str(ref)


def _merge(node: DictConfig, data: Any, path: str, source: str, problems: list[str]) -> None:
    """Merge plain ``data`` into the structured ``node``, recording every problem."""
    where = path or "<top level>"
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping, got {data!r} ({source})")
        return
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if not isinstance(key, str) or key not in node.keys():
            known = [str(k) for k in node.keys()]
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f" (did you mean '{path + '.' if path else ''}{close[0]}'?)" if close else ""
            problems.append(
                f"{full}: unknown key{hint}; allowed keys here: {', '.join(known)} ({source})"
            )
            continue
        child = node._get_node(key)
        assert child is not None  # key is in node.keys()
        object_type = getattr(child._metadata, "object_type", None)
        if isinstance(child, DictConfig) and is_dataclass(object_type) and value is not None:
            _merge(child, value, full, source, problems)
            continue
        if isinstance(child, ListConfig) and isinstance(value, dict):
            # ``compress.steps.0.sparsity=0.6``: change one item of a list of sections
            for index, item in value.items():
                position = int(index) if str(index).isdigit() else -1
                if not 0 <= position < len(child) or not isinstance(child[position], DictConfig):
                    problems.append(
                        f"{full}.{index}: no such item; {full} has {len(child)} item(s) "
                        f"(0 to {len(child) - 1}) ({source})"
                    )
                    continue
                _merge(child[position], item, f"{full}.{index}", source, problems)
            continue
        try:
            node.merge_with({key: value})
        except OmegaConfBaseException as exc:
            detail = str(exc).splitlines()[0]
            problems.append(
                f"{full}: expected {_type_name(child)}, got {value!r} ({source}; {detail})"
            )


def _parse_overrides(overrides: list[str], problems: list[str]) -> tuple[dict[str, str], dict]:
    """Split overrides into group choices (``cluster=dev``) and a nested dot-list mapping."""
    choices: dict[str, str] = {}
    dotted: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(
                f"'{item}': an override must look like key=value "
                f"(e.g. train.lr=3e-5 or cluster=dev)"
            )
            continue
        if any(ch in item for ch in "\n\r\x00"):
            # YAML would fold the break or drop the rest as a comment: never guess
            problems.append(f"{key}: the override holds a line break; give one line per value")
            continue
        if key in schema.GROUPS and raw and not raw.startswith(("{", "[")):
            choices[key] = raw
            continue
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except (OmegaConfBaseException, yaml.YAMLError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            problems.append(
                f"{key}: cannot parse override '{item}': {detail}; quote the value "
                f"(key='value') if it holds YAML syntax"
            )
            continue
        dotted = OmegaConf.to_container(OmegaConf.merge(dotted, parsed))  # type: ignore[assignment]
    return choices, dotted


def load_config(
    job_file: str | Path | None, overrides: list[str] | None = None, job: str | None = None
) -> DictConfig:
    """Build a job's config: schema defaults < building blocks < job file < overrides.

    Args:
        job_file: YAML job file, or None to start from the schema defaults.
        overrides: ``key=value`` items and group choices from the command line.
        job: the job kind the command runs (``prepare``, ...); overrides the file's ``job``.

    Returns:
        The merged structured config (unresolved; see ``resolve``).

    Raises:
        ConfigError: listing every unknown key, wrong type or bad override at once.
    """
    problems: list[str] = []
    choices, dotted = _parse_overrides(list(overrides or []), problems)
    body: dict = {}
    if job_file is not None:
        path = Path(job_file)
        if not path.is_file() and not path.is_absolute() and (shipped_root() / path).is_file():
            path = shipped_root() / path  # jobs/finetune.yaml of an installed scilm
        loaded = _read_yaml(path, "job file")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{job_file}: a job file must be a mapping of keys, got {loaded!r}")
        body = dict(loaded)
    defaults = body.pop("defaults", []) or []
    if not isinstance(defaults, list):
        problems.append(f"defaults: expected a list of 'group/name' entries, got {defaults!r}")
        defaults = []

    blocks: dict[str, str] = {}
    for entry in defaults:
        group, sep, name = str(entry).partition("/")
        if not sep or group not in schema.GROUPS:
            problems.append(
                f"defaults: entry '{entry}' must be 'group/name' with group one of "
                f"{', '.join(schema.GROUPS)} ({job_file})"
            )
            continue
        blocks[group] = name
    blocks.update(choices)

    cfg = OmegaConf.structured(JobConfig)
    for group, choice in blocks.items():
        try:
            path = _group_file(group, choice)
            _merge(cfg[group], _read_yaml(path, group), group, str(path), problems)
        except ConfigError as exc:
            problems.extend(exc.problems)
    _merge(cfg, body, "", str(job_file), problems)
    _merge(cfg, dotted, "", "command line", problems)
    if job is not None:
        cfg.job = job
    if problems:
        raise ConfigError(problems)
    return cfg


def _missing_keys(cfg: DictConfig) -> list[str]:
    literal = []
    for key in OmegaConf.missing_keys(cfg):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if OmegaConf.is_missing(node, leaf):  # skip interpolations of a missing key
            literal.append(key)
    return sorted(literal)


def resolve(cfg: DictConfig) -> JobConfig:
    """Turn a merged config into a typed ``JobConfig`` with interpolations resolved
    and ``zero.stage`` auto replaced by the stage in effect (``ZeroConfig.stage_for``).

    Raises:
        ConfigError: for required values still missing or broken interpolations.
    """
    missing = _missing_keys(cfg)
    if missing:
        raise ConfigError(
            [
                f"{key}: required value is missing; set it in the job file or "
                f"on the command line ({key}=...){MISSING_HINTS.get(key, '')}"
                for key in missing
            ]
        )
    try:
        OmegaConf.resolve(cfg)
        job: JobConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{getattr(exc, 'full_key', '')}: {exc}".strip(": ")) from None
    # the one place ``zero.stage`` auto is decided: the saved config, the dry run, the
    # DeepSpeed JSON and the checkpoints all see the stage in effect
    job.zero.stage = job.zero.stage_for(job.cluster.world_size())
    return job


def to_yaml(job: JobConfig) -> str:
    """The resolved config as YAML, exactly as a run used it."""
    return OmegaConf.to_yaml(OmegaConf.structured(job))


def validate(job: JobConfig, inputs: bool = True) -> list[str]:
    """Checks between fields. Side-effect free: it reads the filesystem, writes nothing.

    Args:
        job: the resolved config.
        inputs: also check that ``model.name_or_path`` is a model directory. The CLI
            passes False for finetune / compress / evaluate, whose pre-submission
            check (``jobs.presubmit``) reports it with the other input problems.

    Returns:
        One line per problem, each naming the dotted key and what is allowed.
    """
    p: list[str] = []
    check_choice(p, "job", job.job, schema.JOB_KINDS)
    check_choice(p, "task", job.task, schema.TASKS)
    d = job.data
    check_choice(p, "data.format", d.format, schema.DATA_FORMATS)
    check_choice(p, "data.compression", d.compression, schema.SHARD_COMPRESSIONS)
    check_choice(p, "data.unknown_residue", d.unknown_residue, schema.UNKNOWN_RESIDUE_POLICIES)
    if d.fasta_labels is not None and d.format != "fasta":
        p.append(f"data.fasta_labels: labels of FASTA records; data.format is {d.format}")
    if d.residue_separator not in (None, "", " "):
        p.append(
            f"data.residue_separator: got {d.residue_separator!r}; allowed: '' (residues "
            f"side by side), ' ' (one residue a word) or null (not a protein corpus)"
        )
    for key in ("max_length", "examples_per_shard", "tokenize_batch_size"):
        check_at_least(p, f"data.{key}", getattr(d, key), 1)
    if d.compression == "gzip" and not 0 <= d.compression_level <= 9:
        p.append(f"data.compression_level: got {d.compression_level}; allowed: 0 to 9 for gzip")
    if job.job == "prepare" and d.format in schema.DATA_FORMATS and job.task in TASKS:
        fits = [name for name, task in TASKS.items() if d.format in task.formats]
        if job.task not in fits:
            p.append(
                f"data.format: '{d.format}' cannot feed task '{job.task}'; "
                f"'{d.format}' fits: {', '.join(fits)}"
            )
    ratios = d.split.dev_ratio + d.split.test_ratio
    for key in ("dev_ratio", "test_ratio"):
        value = getattr(d.split, key)
        if not 0.0 <= value < 1.0:
            p.append(f"data.split.{key}: got {value}; allowed: 0 <= ratio < 1")
    if ratios >= 1.0:
        p.append(f"data.split: dev_ratio + test_ratio = {ratios}; must leave training data (< 1)")
    if job.job == "prepare":
        if d.train is None:
            p.append("data.train: required for prepare: the training corpus file")
        for split in schema.SPLITS:
            path = getattr(d, split)
            if path is not None:
                try:
                    corpus_files(path, f"data.{split}")
                except UserError as exc:
                    p += exc.problems
                if d.format != "parquet" and path.endswith(".parquet"):
                    p.append(
                        f"data.{split}: '{path}' is a Parquet file but data.format is "
                        f"{d.format}; set data.format=parquet"
                    )
        if d.dev is not None and d.split.dev_ratio > 0:
            p.append("data.split.dev_ratio: set, but data.dev is given too; use one of them")
        if d.test is not None and d.split.test_ratio > 0:
            p.append("data.split.test_ratio: set, but data.test is given too; use one of them")
    lora = job.model.lora
    check_at_least(p, "model.lora.r", lora.r, 0)
    if lora.r:
        if lora.alpha <= 0:
            p.append(f"model.lora.alpha: got {lora.alpha}; must be > 0")
        if not 0.0 <= lora.dropout < 1.0:
            p.append(f"model.lora.dropout: got {lora.dropout}; allowed: 0 <= dropout < 1")
        if lora.target_modules is not None and not lora.target_modules:
            p.append(
                "model.lora.target_modules: empty; name modules (e.g. [q_proj, v_proj]) or "
                "leave it null for peft's default for the model family"
            )
    model_problem = path_problem(job.model.name_or_path) if inputs else None
    if model_problem:
        p.append(model_problem)
    t = job.train
    check_choice(p, "train.precision", t.precision, schema.PRECISIONS)
    check_choice(p, "train.adamw", t.adamw, schema.ADAMW_KERNELS)
    check_choice(p, "train.schedule", t.schedule, schema.SCHEDULES)
    for key in ("epochs", "micro_batch_size", "gradient_accumulation", "keep_last", "log_every"):
        check_at_least(p, f"train.{key}", getattr(t, key), 1)
    for key in (
        "lr",
        "weight_decay",
        "warmup_ratio",
        "clip_grad",
        "eval_every",
        "checkpoint_every",
        "hang_timeout_s",
    ):
        check_at_least(p, f"train.{key}", getattr(t, key), 0)
    if t.straggler_factor != 0 and t.straggler_factor <= 1:
        p.append(
            f"train.straggler_factor: got {t.straggler_factor}; allowed: 0 (off) or a factor > 1"
        )
    if t.best_metric is not None and (not t.best_metric.startswith("dev_") or not t.eval_every):
        p.append(
            f"train.best_metric: got {t.best_metric!r}; needs a dev metric name such as "
            f"dev_loss or dev_macro_f1, and train.eval_every > 0"
        )
    if t.early_stopping_patience and t.best_metric is None:
        p.append("train.early_stopping_patience: needs train.best_metric (e.g. dev_loss)")
    check_choice(p, "train.loss", t.loss, schema.TRAIN_LOSSES)
    task = TASKS.get(job.task)  # None: an unknown task, which the `task` check reports
    if t.dev_generate and task is not None and not task.generated_dev_metrics:
        takers = " or ".join(name for name, other in TASKS.items() if other.generated_dev_metrics)
        p.append(f"train.dev_generate: dev generation is for task {takers}; task is {job.task}")
    if task is not None and t.loss in schema.TRAIN_LOSSES and t.loss not in task.losses:
        takers = " or ".join(name for name, other in TASKS.items() if t.loss in other.losses)
        p.append(f"train.loss: {t.loss} is a {takers} loss; task is {job.task} (use auto)")
    if t.huber_delta <= 0:
        p.append(f"train.huber_delta: got {t.huber_delta}; must be > 0")
    if t.peak_tflops is not None and not t.peak_tflops > 0:
        p.append(
            f"train.peak_tflops: got {t.peak_tflops}; must be > 0 (TFLOP/s of one rank), or null"
        )
    if t.class_weights and task is not None and not task.class_weighted:
        takers = " or ".join(name for name, other in TASKS.items() if other.class_weighted)
        p.append(f"train.class_weights: weights classes of {takers}; task is {job.task}")
    for name, weight in t.class_weights.items():
        if weight <= 0:
            p.append(f"train.class_weights.{name}: got {weight}; must be > 0")
    ranks = job.cluster.world_size()
    if (
        t.global_batch_size is not None
        and t.micro_batch_size * t.gradient_accumulation * ranks != t.global_batch_size
    ):
        p.append(
            f"train.global_batch_size: {t.global_batch_size} != train.micro_batch_size "
            f"({t.micro_batch_size}) x train.gradient_accumulation "
            f"({t.gradient_accumulation}) x ranks ({ranks}, cluster.nodes x "
            f"cluster.tasks_per_node); change one of them"
        )
    if t.precision == "fp16" and job.cluster.gpus_per_node == 0:
        p.append(
            "train.precision: fp16 needs GPUs (cluster.gpus_per_node > 0); on CPU use bf16 or fp32"
        )
    check_choice(p, "zero.stage", job.zero.stage, (0, 1, 2, 3))
    if job.zero.config_file is not None and not Path(job.zero.config_file).is_file():
        p.append(f"zero.config_file: '{job.zero.config_file}' does not exist")
    if job.zero.offload_params and job.zero.stage != 3:
        p.append(
            f"zero.offload_params: parameter offload needs zero.stage=3, got "
            f"zero.stage={job.zero.stage}"
        )
    c = job.cluster
    check_choice(p, "cluster.backend", c.backend, schema.CLUSTER_BACKENDS)
    for key in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
        check_at_least(p, f"cluster.{key}", getattr(c, key), 1)
    check_at_least(p, "cluster.gpus_per_node", c.gpus_per_node, 0)
    check_at_least(p, "cluster.signal_delay_s", c.signal_delay_s, 0)
    check_at_least(p, "cluster.max_requeues", c.max_requeues, 0)
    check_at_least(p, "cluster.collective_timeout_s", c.collective_timeout_s, 1)
    if c.backend == "slurm" and c.time_min * 60 - c.signal_delay_s < MIN_SIGNAL_LEAD_S:
        # Until Python has imported the job, USR2 still has its default action (terminate):
        # a signal that early would fail the job instead of checkpointing it.
        p.append(
            f"cluster.signal_delay_s: {c.signal_delay_s} s before a {c.time_min}-minute "
            f"limit (cluster.time_min) signals the job less than {MIN_SIGNAL_LEAD_S} s after "
            f"it starts, before it can checkpoint; lower it or raise cluster.time_min"
        )
    p += unsafe_values(job)
    check_choice(p, "eval.split", job.eval.split, schema.SPLITS)
    check_at_least(p, "eval.batch_size", job.eval.batch_size, 1)
    if job.task in TASKS:
        p += TASKS[job.task].config_problems(job)
    if job.job == "compress":
        p += recipe_problems(job, group_choices("compress"))
    return p


def load_and_validate(
    job_file: str | Path | None,
    overrides: list[str] | None = None,
    job: str | None = None,
    inputs: bool = True,
) -> JobConfig:
    """``load_config`` + ``resolve`` + ``validate``; raises one ConfigError with every problem."""
    job_cfg = resolve(load_config(job_file, overrides, job))
    problems = validate(job_cfg, inputs)
    if problems:
        raise ConfigError(problems)
    return job_cfg
