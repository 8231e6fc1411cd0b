"""The rule for tests whose prerequisites lie outside the clone: skip with the reason
on a fresh clone, fail in CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import prerequisites


@pytest.fixture
def no_shared_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A shared-data root that does not exist (what a fresh clone has)."""
    missing = tmp_path / "no-shared" / "data"
    monkeypatch.setattr(prerequisites, "SHARED_DATA", missing)
    return missing


@pytest.mark.parametrize("ci", ["", "false", "0"])
def test_missing_shared_data_skips_naming_the_folder(
    no_shared_data: Path, monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception) as skipped:
        prerequisites.shared_data("scicite")
    assert str(no_shared_data / "scicite") in str(skipped.value)


@pytest.mark.parametrize("ci", ["true", "1", "YES"])
def test_missing_shared_data_fails_in_ci(
    no_shared_data: Path, monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception) as failed:
        prerequisites.shared_data("ncbi-disease")
    assert str(no_shared_data / "ncbi-disease") in str(failed.value)
    assert "CI=true" in str(failed.value)


def test_present_shared_data_is_returned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "scicite").mkdir()
    monkeypatch.setattr(prerequisites, "SHARED_DATA", tmp_path)
    monkeypatch.setenv("CI", "true")
    assert prerequisites.shared_data("scicite") == tmp_path / "scicite"
