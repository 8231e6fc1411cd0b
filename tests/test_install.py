"""A non-editable install (``pip install .``) finds the shipped configs and jobs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_wheel_install_finds_cluster_profiles_recipes_and_jobs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("scilm_hpc", "configs", "jobs"):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = (sys.executable, "-m", "pip")
    run(
        *pip,
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        tmp_path / "dist",
        src,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("scilm_hpc-*.whl")
    # a fresh venv with the wheel installed; its dependencies (torch, ...) come from this
    # interpreter's site-packages through a .pth line (nothing can be downloaded here)
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = run(
        python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path
    ).strip()
    Path(purelib, "scilm-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp_path)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SCILM_CONFIG_DIR")}
    work = tmp_path / "elsewhere"  # no configs/ or jobs/ here: only the install's
    work.mkdir()
    where = run(python, "-c", "import scilm_hpc; print(scilm_hpc.__file__)", cwd=work, env=env)
    assert where.startswith(str(venv)), where
    scilm = venv / "bin" / "scilm"
    listed = run(scilm, "list", cwd=work, env=env)
    assert str(venv / "share" / "scilm" / "configs" / "cluster") in listed
    for name in ("dev", "local", "int8-dynamic", "prune50-recover", "finetune.yaml"):
        assert f"  {name} " in listed, name
    out = run(
        scilm,
        "finetune",
        "jobs/finetune.yaml",
        "cluster=dev",
        "data.shards=x",
        "run.dir=runs/ft",
        "--dry-run",
        cwd=work,
        env=env,
    )
    assert "#SBATCH --partition=dev" in out
