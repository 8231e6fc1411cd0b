"""Checks before a finetune, compress or evaluate is queued: the inputs it will read, and
a run directory that an earlier run with another config already used.

``submission_problems`` runs in the submitting process (the CLI), after the config
validated and before anything is written or queued, so that a mistake costs seconds
instead of a place in the Slurm queue. Every problem is collected and reported at
once; the caller refuses with exit status 2.

A rerun on a used directory continues that run (finetune resumes its checkpoint,
compress its finished steps): its new config must equal the saved one
(``config.yaml``, ``compress.config.yaml``, ``evaluate.config.yaml``) except in
``RESOURCE_KEYS`` (where and how fast it runs), unless ``run.allow_config_change``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from scilm_hpc.data.shards import MANIFEST, read_manifest
from scilm_hpc.errors import UserError
from scilm_hpc.model_source import MINILM_ALIASES, packaged_minilm_path, path_problem
from scilm_hpc.rundir import config_file
from scilm_hpc.schema import JobConfig

CHECKED_JOBS = ("finetune", "compress", "evaluate")
#: Keys that may change between runs on one directory: where and how fast the run goes,
#: what it logs, never what it computes (docs/decisions.md, "Run-directory safety").
#: An entry ending in "." covers the whole section.
RESOURCE_KEYS = (
    "cluster.",
    "run.dir",
    "run.name",
    "run.allow_config_change",
    "train.log_every",
    "train.tensorboard",
    "train.gradient_checkpointing",
    "train.compile",
    "train.adamw",
    "train.hang_timeout_s",
    "train.straggler_factor",
    "eval.batch_size",
    "compress.latency_threads",
    "notes.",
)
#: String keys holding paths: equal when they name the same absolute path.
PATH_KEYS = (
    "run.dir",
    "data.train",
    "data.dev",
    "data.test",
    "data.shards",
    "model.name_or_path",
    "model.decoder_name_or_path",
    "zero.config_file",
)
#: Config keys of rotary position embeddings (Llama-type); such models have no position
#: table, so a longer input does not fail (ESM-2 says ``position_embedding_type: rotary``).
ROTARY_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "rotary_dim", "rotary_pct")
#: Model types whose learned positions are offset by ``pad_token_id + 1``.
OFFSET_POSITION_TYPES = ("roberta", "xlm-roberta", "camembert", "longformer")


def is_resource_key(key: str) -> bool:
    """True for a key that may differ from the saved config without refusal."""
    return any(key.startswith(k) if k.endswith(".") else key == k for k in RESOURCE_KEYS)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict) or (not node and prefix):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _same(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key in PATH_KEYS and isinstance(old, str) and isinstance(new, str):
        return os.path.abspath(os.path.expanduser(old)) == os.path.abspath(os.path.expanduser(new))
    return False


def _world(flat: dict[str, Any]) -> int:
    if flat.get("cluster.backend") == "none":
        return 1
    return int(flat.get("cluster.nodes") or 1) * int(flat.get("cluster.tasks_per_node") or 1)


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def config_changes(saved_text: str, job: JobConfig) -> list[str]:
    """``key: old -> new`` for every key but ``RESOURCE_KEYS`` where ``job`` differs from
    the saved config text. A key the saved config lacks (added to the schema since)
    counts as changed only if the new value is not the schema default.

    Raises:
        UserError: if the saved text is not a YAML mapping.
    """
    try:
        saved = yaml.safe_load(saved_text)
    except yaml.YAMLError as exc:
        raise UserError(f"the saved config is not valid YAML ({exc})") from None
    if not isinstance(saved, dict):
        raise UserError("the saved config is not a mapping of keys")
    old = _flat(saved)
    new = _flat(yaml.safe_load(OmegaConf.to_yaml(OmegaConf.structured(job))))
    defaults = _flat(yaml.safe_load(OmegaConf.to_yaml(OmegaConf.structured(JobConfig))))
    # on another number of ranks the run resumes from consolidated weights, which any
    # ZeRO stage loads: there the stage (auto: 0 on one rank, else 2) follows the ranks
    stage_follows_ranks = _world(old) != _world(new)
    changes = []
    for key, value in new.items():
        if is_resource_key(key) or (key == "zero.stage" and stage_follows_ranks):
            continue
        if key not in old:
            if value != defaults.get(key):
                changes.append(f"{key}: (not set) -> {_show(value)}")
        elif not _same(key, old[key], value):
            changes.append(f"{key}: {_show(old[key])} -> {_show(value)}")
    return changes


def changed_config_problems(job: JobConfig) -> list[str]:
    """The refusal of a rerun on ``run.dir`` whose saved config differs (none if equal,
    if there is no saved config, or with ``run.allow_config_change``)."""
    saved = config_file(job.run.dir, job.job)
    if job.run.allow_config_change or not saved.is_file():
        return []
    try:
        changes = config_changes(saved.read_text(encoding="utf-8"), job)
    except UserError as exc:
        changes = [f"(cannot compare: {exc.problems[0]})"]
    except (OSError, UnicodeDecodeError) as exc:
        changes = [f"(cannot compare: {exc})"]
    if not changes:
        return []
    return [
        f"run.dir: '{job.run.dir}' already holds a {job.job} run with another config "
        f"({saved}); a rerun there continues that run. Changed (saved -> now):",
        *(f"  {line}" for line in changes),
        "  use a new run.dir for a new experiment, or set run.allow_config_change=true to "
        "continue this run with the new settings",
    ]


def model_positions(name: str) -> int | None:
    """How many token positions the model ``name`` (a directory or a packaged alias)
    takes, from its ``config.json``: the size of its learned absolute position table.
    None where there is none (rotary or relative positions), it does not say, or
    ``name`` is a hub id."""
    path = Path(packaged_minilm_path() if name in MINILM_ALIASES else name).expanduser()
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if config.get("position_embedding_type", "absolute") != "absolute" or any(
        key in config for key in ROTARY_KEYS
    ):
        return None  # rotary / relative positions: no table to index past its end
    positions = config.get("max_position_embeddings", config.get("n_positions"))
    if not isinstance(positions, int) or positions <= 0:
        return None
    if config.get("model_type") in OFFSET_POSITION_TYPES:
        positions -= int(config.get("pad_token_id") or 0) + 1
    return positions


def _splits_needed(job: JobConfig) -> list[str]:
    if job.job == "evaluate":
        return [job.eval.split]
    if job.job == "compress":
        return sorted({"train", job.compress.eval_split})
    return ["train"]


def shard_problems(job: JobConfig) -> tuple[list[str], dict[str, Any] | None]:
    """Problems with ``data.shards`` (manifest, the splits the job reads, their files),
    and the manifest where it could be read."""
    root = Path(job.data.shards)
    try:
        manifest = read_manifest(root)
    except UserError as exc:
        return list(exc.problems), None
    problems = []
    splits = manifest.get("splits") or {}
    for split in _splits_needed(job):
        if split not in splits:
            have = ", ".join(splits) or "none"
            problems.append(
                f"data.shards: split '{split}' is not in {root / MANIFEST}; it has: {have}"
            )
            continue
        for entry in splits[split].get("shards", []):
            file = root / entry["file"]
            if not file.is_file():
                problems.append(f"data.shards: {file} is missing (listed in {MANIFEST})")
            elif file.stat().st_size != entry.get("bytes", file.stat().st_size):
                problems.append(
                    f"data.shards: {file}: shard is {file.stat().st_size} bytes, the manifest "
                    f"says {entry['bytes']}; it is truncated or was replaced"
                )
    return problems, manifest


def length_problem(job: JobConfig, manifest: dict[str, Any] | None) -> str | None:
    """The rows the job feeds must fit the model's positions: the shards' own limit
    (``max_length`` they were prepared with), else ``data.max_length``."""
    name = job.model.name_or_path
    if path_problem(name):
        return None  # reported as such by submission_problems
    positions = model_positions(name)
    if positions is None:
        return None
    if manifest is not None and isinstance(manifest.get("max_length"), int):
        length = manifest["max_length"]
        if length > positions:
            return (
                f"data.shards: '{job.data.shards}' was prepared with data.max_length={length}, "
                f"but model '{name}' takes {positions} positions (max_position_embeddings); "
                f"prepare the shards again with data.max_length<={positions}"
            )
        return None
    if job.data.max_length > positions:
        return (
            f"data.max_length: {job.data.max_length} is more than the {positions} positions "
            f"model '{name}' takes (max_position_embeddings); set data.max_length<={positions}"
        )
    return None


def writable_problem(run_dir: str | Path) -> str | None:
    """Whether the run directory (or, before it exists, its nearest existing parent)
    can be written, without writing anything."""
    path = Path(run_dir).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        return f"run.dir: '{run_dir}': '{path}' is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"run.dir: '{run_dir}': '{path}' is not writable by this user"
    return None


def submission_problems(job: JobConfig) -> list[str]:
    """Every reason not to queue ``job`` (finetune, compress, evaluate), at once: a
    changed config, the models (a directory with ``config.json``, a packaged name or a
    hub id), the shards, the sequence length, the run directory."""
    if job.job not in CHECKED_JOBS:
        return []
    problems = changed_config_problems(job)
    for key, name in (
        ("model.name_or_path", job.model.name_or_path),
        ("model.decoder_name_or_path", job.model.decoder_name_or_path),
    ):
        problem = path_problem(name) if name else None
        if problem:
            problems.append(problem.replace("model.name_or_path", key, 1))
    shards, manifest = shard_problems(job)
    problems += shards
    length = length_problem(job, manifest)
    if length:
        problems.append(length)
    if job.job == "evaluate":
        for index, name in enumerate(job.eval.models):
            problem = path_problem(name)
            if problem:
                problems.append(problem.replace("model.name_or_path", f"eval.models[{index}]", 1))
    writable = writable_problem(job.run.dir)
    if writable:
        problems.append(writable)
    return problems
