"""The sbatch script scilm submits: golden file for --dry-run, and hostile values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .conftest import REPO

GOLDEN = Path(__file__).parent / "golden"
FINETUNE = REPO / "jobs" / "finetune.yaml"


def normalise(text: str, run_dir: Path) -> str:
    """Replace the parts that depend on where the test runs."""
    return text.replace(str(run_dir.absolute()), "RUN_DIR").replace(sys.executable, "PYTHON")


def sbatch_part(out: str) -> str:
    marker = "# ---- sbatch script (not submitted) ----\n"
    assert marker in out
    return out.split(marker, 1)[1]


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("sbatch_dev_2node.sh", ["cluster=dev", "cluster.nodes=2", "zero.stage=3"]),
        ("sbatch_site_example.sh", ["cluster=site-example", "run.name=scicite-ft"]),
    ],
)
def test_dry_run_matches_golden_file(scilm, tmp_path, name, overrides):
    run_dir = tmp_path / "run"
    code, out, err = scilm("finetune", FINETUNE, f"run.dir={run_dir}", *overrides, "--dry-run")
    assert code == 0, err
    assert not run_dir.exists()  # nothing written, nothing submitted
    golden = GOLDEN / name
    assert golden.is_file(), f"golden file {golden} is missing: create it from a reviewed run"
    assert normalise(sbatch_part(out), run_dir) == golden.read_text()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("run.name=x; rm -rf ~", "run.name"),
        ("run.name=$(reboot)", "run.name"),
        ("cluster.partition=dev\n#SBATCH --uid=0", "cluster.partition"),
        ("cluster.account=a b", "cluster.account"),
        ("cluster.qos=`id`", "cluster.qos"),
        ("cluster.constraint=a100;ls", "cluster.constraint"),
        ("cluster.extra_sbatch=['--mail-user=a b']", "cluster.extra_sbatch[0]"),
        ("cluster.extra_sbatch=['--x=1\n--uid=0']", "cluster.extra_sbatch"),
        ("cluster.setup=['module load x\nrm -rf ~']", "cluster.setup"),
    ],
)
def test_hostile_values_are_refused(scilm, tmp_path, override, key):
    code, out, err = scilm(
        "finetune", FINETUNE, f"run.dir={tmp_path / 'r'}", "cluster=dev", override, "--dry-run"
    )
    assert code == 2
    assert out == ""
    assert f"error: {key}:" in err
    assert not (tmp_path / "r").exists()


def test_setup_lines_and_flags_reach_the_script_verbatim(scilm, tmp_path):
    code, out, err = scilm(
        "finetune",
        FINETUNE,
        f"run.dir={tmp_path / 'r'}",
        "cluster=dev",
        "cluster.setup=['module load cuda/12.4', 'source $HOME/venv/bin/activate']",
        "cluster.extra_sbatch=['--exclusive', '--mail-type=END']",
        "--dry-run",
    )
    assert code == 0, err
    script = sbatch_part(out)
    assert "\nmodule load cuda/12.4\nsource $HOME/venv/bin/activate\n" in script
    assert "#SBATCH --exclusive\n" in script and "#SBATCH --mail-type=END\n" in script
    assert "#SBATCH --signal=USR2@30\n" in script  # the dev profile's lead time


def test_line_break_in_a_job_file_setup_line_is_refused(scilm, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        "job: finetune\ndefaults: [cluster/dev]\nrun:\n  dir: "
        + str(tmp_path / "r")
        + "\ncluster:\n  setup:\n    - |\n      module load x\n      rm -rf ~\n"
    )
    code, out, err = scilm("finetune", job, "--dry-run")
    assert code == 2
    assert "error: cluster.setup[0]:" in err and "line break" in err
