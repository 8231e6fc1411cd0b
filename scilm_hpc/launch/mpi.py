"""Local MPI launch for the evaluate job: ``mpirun -n N python -m scilm_hpc.jobs.evaluate``."""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from scilm_hpc.errors import UserError
from scilm_hpc.runtime.console import SUMMARY_ENV, quiet
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
    errors, tail, code = stream_output(command, {**os.environ, SUMMARY_ENV: "0"})
    if errors:
        raise UserError(errors)
    if code != 0:
        raise RuntimeError(f"mpirun exited with {code}:\n" + "".join(tail)[-4000:])
    return json.loads((run_dir / "eval.json").read_text())


def stream_output(command: list[str], env: dict[str, str]) -> tuple[list[str], list[str], int]:
    """Run ``command``, copying its output (stdout and stderr) line by line to stderr as
    it comes, unless ``SCILM_QUIET`` is set.

    Returns:
        The distinct ``error: `` lines (not copied: the caller raises them), the last
        200 lines, and the exit status.
    """
    errors: set[str] = set()
    tail: collections.deque[str] = collections.deque(maxlen=200)
    env = {**env, "PYTHONUNBUFFERED": "1"}  # ranks' lines arrive as printed
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line)
            if line.startswith("error: "):
                errors.add(line[len("error: ") :].rstrip("\n"))
            elif not quiet():
                sys.stderr.write(line)
                sys.stderr.flush()
    return sorted(errors), list(tail), process.returncode
