"""Local MPI launch for the evaluate job: ``mpirun -n N python -m scilm_hpc.jobs.evaluate``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from scilm_hpc.errors import UserError
from scilm_hpc.schema import JobConfig


def mpirun_command(config_file: Path, ranks: int) -> list[str]:
    """The mpirun command line for ``ranks`` local evaluation ranks.

    Raises:
        UserError: if mpirun is not installed.
    """
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise UserError(
            "cluster.tasks_per_node: evaluation on several local ranks needs "
            "mpirun (apt-get install openmpi-bin), or use cluster.tasks_per_node=1"
        )
    command = [mpirun, "-n", str(ranks), "--oversubscribe"]
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")
    return [*command, sys.executable, "-m", "scilm_hpc.jobs.evaluate", str(config_file)]


def run_with_mpirun(job: JobConfig, ranks: int) -> dict[str, Any]:
    """Run the saved evaluate config on ``ranks`` MPI ranks and return ``eval.json``.

    Raises:
        UserError: with the ranks' error lines if they reported a user mistake.
    """
    run_dir = Path(job.run.dir)
    config = run_dir / "evaluate.config.yaml"
    command = mpirun_command(config, ranks)
    print(f"mpirun: {ranks} rank(s)", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    errors = sorted(
        {line[len("error: ") :] for line in done.stderr.splitlines() if line.startswith("error: ")}
    )
    if errors:
        raise UserError(errors)
    if done.returncode != 0:
        raise RuntimeError(f"mpirun exited with {done.returncode}:\n{done.stderr[-4000:]}")
    return json.loads((run_dir / "eval.json").read_text())
