"""Live progress of the training loop: the plain line, its ETA, the quiet switch."""

from __future__ import annotations

import pytest

from scilm_hpc.train.progress import Progress, clock, eta_seconds, progress_line


def test_clock():
    assert [clock(s) for s in (0, 59.4, 61, 3600 * 2 + 62)] == [
        "0:00:00",
        "0:00:59",
        "0:01:01",
        "2:01:02",
    ]


def test_eta_from_the_steps_this_process_ran():
    assert eta_seconds(10, 0, 100, 20.0) == pytest.approx(180.0)
    assert eta_seconds(60, 50, 100, 20.0) == pytest.approx(80.0)  # resumed at step 50
    assert eta_seconds(50, 50, 100, 1.0) is None  # nothing run yet
    assert eta_seconds(100, 0, 100, 30.0) == 0.0


def test_progress_line():
    line = progress_line(40, 200, 0.61204, 4.2e-5, 31.52, 76.0, 304.0)
    assert line == (
        "step 40/200 | loss 0.6120 | lr 4.20e-05 | 31.5 samples/s | elapsed 0:01:16 | ETA 0:05:04"
    )
    assert progress_line(1, 2, 1.0, 1e-3, 1.0, 0.0, None).endswith("ETA ?")


def row(step: int) -> dict:
    return {"step": step, "loss": 0.5, "lr": 1e-4}


def test_plain_lines_only_at_logged_steps(capsys, monkeypatch):
    monkeypatch.delenv("SCILM_QUIET", raising=False)
    progress = Progress(total=6, first_step=0, enabled=True, interactive=False)
    for step in range(1, 7):
        progress.update(step, 8, row(step) if step % 2 == 0 else None)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 2/6", "step 4/6", "step 6/6"]
    assert all("loss 0.5000" in line and "ETA " in line for line in lines)
    assert lines[-1].endswith("ETA 0:00:00")


@pytest.mark.parametrize(("enabled", "quiet"), [(False, ""), (True, "1"), (True, "true")])
def test_other_ranks_and_quiet_print_nothing(capsys, monkeypatch, enabled, quiet):
    monkeypatch.setenv("SCILM_QUIET", quiet)
    progress = Progress(total=2, first_step=0, enabled=enabled, interactive=False)
    progress.update(1, 8, row(1))
    progress.update(2, 8, row(2))
    assert capsys.readouterr().out == ""


def test_terminal_gets_a_bar(capsys, monkeypatch):
    monkeypatch.delenv("SCILM_QUIET", raising=False)
    progress = Progress(total=4, first_step=0, enabled=True, interactive=True)
    for step in range(1, 5):
        progress.update(step, 8, row(step))
    progress.close()
    out, err = capsys.readouterr()
    assert "step 4/4" not in out  # no plain lines
    assert "4/4" in err and "loss=0.5000" in err  # tqdm draws on stderr
