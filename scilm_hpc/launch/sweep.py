"""Parameter sweeps: ``--sweep train.lr=1e-5,3e-5 --sweep train.seed=0,1`` becomes one job
per member of the cartesian product, each with its own run directory
``RUN_DIR/NNN`` (listed in ``RUN_DIR/sweep.json``), submitted to Slurm as one job array.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from scilm_hpc.errors import UserError
from scilm_hpc.rundir import write_json_atomic


def parse_sweep(items: list[str]) -> list[tuple[str, list[str]]]:
    """``KEY=V1,V2,...`` items as (key, values).

    Raises:
        UserError: for a malformed item, a repeated key, or a cluster/run key (one array
            job shares its resources and its parent run directory).
    """
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        values = [v for v in raw.split(",") if v != ""]
        if not sep or not key or not values:
            raise UserError(f"--sweep {item!r}: expected KEY=V1,V2,... (e.g. train.lr=1e-5,3e-5)")
        if key.split(".")[0] in ("cluster", "run"):
            raise UserError(
                f"--sweep {key}: cluster and run keys cannot vary inside one job "
                f"array; sweep training, data or model keys"
            )
        if key in (k for k, _ in axes):
            raise UserError(f"--sweep {key}: given twice; list all its values once")
        axes.append((key, values))
    return axes


def sweep_members(axes: list[tuple[str, list[str]]]) -> list[list[str]]:
    """The overrides of every member, in a fixed order (last axis varies fastest)."""
    keys = [k for k, _ in axes]
    return [
        [f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
        for combo in itertools.product(*(values for _, values in axes))
    ]


def member_dir(run_dir: str | Path, index: int) -> Path:
    """Run directory of sweep member ``index``."""
    return Path(run_dir) / f"{index:03d}"


def write_sweep_index(run_dir: Path, members: list[list[str]]) -> None:
    """``RUN_DIR/sweep.json``: member directory -> its overrides."""
    run_dir.mkdir(parents=True, exist_ok=True)
    index = {member_dir(run_dir, i).name: m for i, m in enumerate(members)}
    write_json_atomic(run_dir / "sweep.json", index)
