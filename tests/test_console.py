"""Count progress lines (prepare, evaluate) and the live copy of mpirun's output."""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace

import pytest

from scilm_hpc.launch.mpi import stream_output
from scilm_hpc.runtime import console
from scilm_hpc.runtime.console import CountProgress, count_line


def test_count_line_with_and_without_a_total():
    assert count_line("prepare rank 1", 300, 1200, "records", 10.0) == (
        "prepare rank 1: 300/1200 records | 30.0 records/s | elapsed 0:00:10 | ETA 0:00:30"
    )
    assert count_line("prepare rank 0", 50, None, "records", 5.0) == (
        "prepare rank 0: 50 records | 10.0 records/s | elapsed 0:00:05"
    )
    assert count_line("x", 0, 10, "items", 0.0).endswith("ETA ?")


def test_lines_at_the_interval_then_a_final_one(capsys, monkeypatch):
    monkeypatch.delenv("SCILM_QUIET", raising=False)
    times = iter([0.0, 1.0, 12.0, 13.0, 20.0])  # start, then one reading per call
    # a clock of this module's own (pytest reads time.perf_counter too)
    monkeypatch.setattr(console, "time", SimpleNamespace(perf_counter=lambda: next(times)))
    progress = CountProgress("evaluate rank 0", "examples", 40, every_s=10.0)
    progress.update(10)  # at 1 s: too early
    progress.update(10)  # at 12 s: a line
    progress.update(10)  # at 13 s: too early again
    progress.close()  # at 20 s: the final line
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "evaluate rank 0: 20/40 examples | 1.7 examples/s | elapsed 0:00:12 | ETA 0:00:12",
        "evaluate rank 0: 30/40 examples | 1.5 examples/s | elapsed 0:00:20 | ETA 0:00:07",
    ]


@pytest.mark.parametrize("enabled, env", [(False, None), (True, "1")])
def test_disabled_or_quiet_prints_nothing(capsys, monkeypatch, enabled, env):
    if env:
        monkeypatch.setenv("SCILM_QUIET", env)
    else:
        monkeypatch.delenv("SCILM_QUIET", raising=False)
    progress = CountProgress("prepare rank 1", "records", None, enabled=enabled, every_s=0.0)
    progress.update(5)
    progress.close()
    assert capsys.readouterr() == ("", "")


CHILD = """
import os, sys, time
print("first line", flush=True)
print("error: data.shards: no such folder", file=sys.stderr, flush=True)
for _ in range(200):  # waits for the parent to have seen the first line
    if os.path.exists(sys.argv[1]):
        sys.exit(3)
    time.sleep(0.05)
sys.exit(4)
"""


class Watcher(io.StringIO):
    """A stderr that creates ``flag`` as soon as the child's first line reaches it."""

    def __init__(self, flag):
        super().__init__()
        self.flag = flag

    def write(self, text):
        if "first line" in text:
            self.flag.touch()
        return super().write(text)


def test_mpirun_output_is_copied_as_it_comes(tmp_path, monkeypatch):
    """The child exits 3 only if its first line was copied while it still ran (a copy
    made at its end would leave it waiting: exit 4); error lines are kept, not copied."""
    monkeypatch.delenv("SCILM_QUIET", raising=False)
    flag = tmp_path / "seen"
    watcher = Watcher(flag)
    monkeypatch.setattr(sys, "stderr", watcher)
    errors, tail, code = stream_output([sys.executable, "-c", CHILD, str(flag)], {})
    assert code == 3
    assert errors == ["data.shards: no such folder"]
    assert "first line" in watcher.getvalue() and "error:" not in watcher.getvalue()
    assert tail[0] == "first line\n"


def test_quiet_copies_nothing_but_keeps_the_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SCILM_QUIET", "1")
    flag = tmp_path / "seen"
    flag.touch()  # the child need not wait
    watcher = Watcher(tmp_path / "other")
    monkeypatch.setattr(sys, "stderr", watcher)
    errors, _, code = stream_output([sys.executable, "-c", CHILD, str(flag)], {})
    assert code == 3 and errors == ["data.shards: no such folder"]
    assert watcher.getvalue() == ""


def test_loading_a_model_logs_no_torchao_noise():
    """transformers imports torchao when it loads a model; on a CPU build that import logs
    CUDA libraries it could not load and pytree enum warnings. Not in scilm's processes."""
    import subprocess

    load = "import transformers.quantizers.auto"
    plain = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True)
    ours = subprocess.run(
        [sys.executable, "-c", f"import scilm_hpc; {load}"], capture_output=True, text=True
    )
    assert ours.returncode == 0, ours.stderr[-2000:]
    noise = ("Failed to load", "_pytree")
    if not any(word in plain.stderr for word in noise):
        pytest.skip("this torch/torchao build logs nothing on import (nothing to silence)")
    assert not any(word in ours.stderr for word in noise), ours.stderr[-2000:]
