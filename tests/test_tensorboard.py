"""TensorBoard event files mirror metrics.jsonl (read back with tensorboard's own reader)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scilm_hpc.config import load_and_validate
from scilm_hpc.train.report import MetricsLog
from scilm_hpc.train.tensorboard import scalar_name, wanted

from .conftest import REPO

pytest.importorskip("tensorboard")


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_event_files_hold_every_logged_scalar(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True, tensorboard_dir=tmp_path / "tb")
    log.write({"step": 1, "loss": 1.5, "lr": 1e-4, "samples_per_s": 20.0})
    log.write({"step": 2, "loss": 1.25, "lr": 5e-5, "samples_per_s": 22.0})
    log.write({"step": 2, "dev_loss": 0.75, "dev_macro_f1": 0.5, "note": "text is skipped"})
    log.tensorboard.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3  # metrics.jsonl is still written in full
    got = scalars(tmp_path / "tb")
    assert got["train/loss"] == [(1, 1.5), (2, 1.25)]
    assert got["train/samples_per_s"] == [(1, 20.0), (2, 22.0)]
    assert [s for s, _ in got["train/lr"]] == [1, 2]
    assert got["train/lr"][0][1] == pytest.approx(1e-4)
    assert got["dev/loss"] == [(2, 0.75)] and got["dev/macro_f1"] == [(2, 0.5)]
    assert not any("note" in tag for tag in got)


def test_only_rank_0_and_only_when_asked(tmp_path):
    MetricsLog(tmp_path / "m.jsonl", enabled=False, tensorboard_dir=tmp_path / "a").write(
        {"step": 1, "loss": 1.0}
    )
    MetricsLog(tmp_path / "n.jsonl", enabled=True).write({"step": 1, "loss": 1.0})
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob("**/events.*"))


def test_the_setting_defaults_to_on_where_tensorboard_is_installed():
    job = load_and_validate(REPO / "jobs" / "finetune.yaml", ["run.dir=r"], "finetune")
    assert job.train.tensorboard is None and wanted(None) is True
    assert wanted(False) is False
    off = load_and_validate(
        REPO / "jobs" / "finetune.yaml", ["run.dir=r", "train.tensorboard=false"], "finetune"
    )
    assert off.train.tensorboard is False
    assert scalar_name("dev_f1") == "dev/f1" and scalar_name("loss") == "train/loss"
