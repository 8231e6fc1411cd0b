"""The straggler detector (``train.stragglers``)."""

from __future__ import annotations

from scilm_hpc.train.stragglers import StragglerDetector, straggler_message

from .conftest import REPO


def test_a_persistently_slow_rank_is_reported_once_a_passing_hiccup_never() -> None:
    detector = StragglerDetector(factor=1.5, window=5)
    fast = [0.10, 0.11, 0.10, 0.09]
    # one slow step of rank 2 (a hiccup) and a short window: nothing
    found = [detector.update([0.1, 0.1, 0.9, 0.1])]
    found += [detector.update(fast) for _ in range(8)]
    assert not any(found)
    # rank 3 slow for 2 steps: the window's median still says normal
    assert not any(detector.update([0.1, 0.1, 0.1, 0.3]) for _ in range(2))
    # ... for a third step: the median over 5 steps turns, reported once
    assert detector.update([0.1, 0.1, 0.1, 0.3]) == [(3, 0.3, 0.1)]
    assert not any(detector.update([0.1, 0.1, 0.1, 0.3]) for _ in range(5))
    # it recovers, then slows down again: reported again
    assert not any(detector.update(fast) for _ in range(5))
    assert detector.flagged == set()
    assert [detector.update([0.1, 0.1, 0.1, 0.2]) for _ in range(3)][-1] == [(3, 0.2, 0.1)]


def test_below_the_factor_or_the_gap_is_no_straggler() -> None:
    factor = StragglerDetector(factor=1.5, window=3)
    assert not any(factor.update([0.10, 0.14, 0.10]) for _ in range(6))  # 1.4x
    tiny = StragglerDetector(factor=1.5, window=3)
    assert not any(tiny.update([0.001, 0.004, 0.001]) for _ in range(6))  # 4x but 3 ms
    off = StragglerDetector(factor=0, window=3)
    assert not any(off.update([0.1, 1.0, 0.1]) for _ in range(6))


def test_the_message_names_rank_times_and_key() -> None:
    line = straggler_message(3, 0.3, 0.1, 1.5, 20)
    assert line.startswith("straggler: rank 3 took 300.0 ms per step before its first collective")
    assert "3.0x the ranks' median of 100.0 ms (train.straggler_factor=1.5)" in line


def test_the_factor_is_checked(scilm, tmp_path) -> None:
    job = str(REPO / "jobs" / "finetune.yaml")
    code, _, err = scilm("validate", job, f"run.dir={tmp_path}", "train.straggler_factor=1")
    assert code == 2
    assert "error: train.straggler_factor: got 1.0; allowed: 0 (off) or a factor > 1" in err
    code, _, _ = scilm("validate", job, f"run.dir={tmp_path}", "train.straggler_factor=0")
    assert code == 0
