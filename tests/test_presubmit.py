"""Checks before a job is queued (issue 18): a changed config on a used run directory,
a required run.dir, missing or unfit inputs; ``scilm validate RUN_DIR --checkpoints``;
the evaluate job's own run lock."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from scilm_hpc.config import load_and_validate, to_yaml
from scilm_hpc.errors import UserError
from scilm_hpc.jobs.presubmit import (
    changed_config_problems,
    config_changes,
    model_positions,
    submission_problems,
)
from scilm_hpc.rundir import RunLock, live_owner, read_owner

from .conftest import REPO, scilm_run

FINETUNE = REPO / "jobs" / "finetune.yaml"
EVALUATE = REPO / "jobs" / "evaluate.yaml"


def finetune_job(run: Path, *overrides: str):
    return load_and_validate(
        FINETUNE, [f"run.dir={run}", f"data.shards={run}/shards", *overrides], "finetune"
    )


def used_run_dir(tmp_path: Path, *overrides: str) -> Path:
    """A run directory whose saved config.yaml is the finetune job with ``overrides``,
    and one checkpoint (``scilm resume`` needs one)."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    (run / "checkpoints" / "step_2" / "scilm_state.json").write_text('{"step": 2}')
    (run / "config.yaml").write_text(to_yaml(finetune_job(run, *overrides)))
    return run


# --- 1. a changed config is refused --------------------------------------------------------


def test_config_changes_name_key_old_and_new_and_skip_resource_keys(tmp_path: Path) -> None:
    run = tmp_path / "run"
    saved = to_yaml(finetune_job(run, "train.lr=5e-5", "cluster.tasks_per_node=1"))
    same_science = finetune_job(
        run,
        "train.lr=5e-5",
        "cluster=dev",
        "cluster.nodes=2",
        "train.log_every=1",
        "train.compile=true",
        "eval.batch_size=8",
        "notes.why=faster",
    )
    assert config_changes(saved, same_science) == []
    changed = finetune_job(run, "train.lr=1e-3", "task=regression", "model.lora.r=4")
    assert config_changes(saved, changed) == [
        "task: classification -> regression",
        "model.lora.r: 0 -> 4",
        "train.lr: 5e-05 -> 0.001",
    ]


def test_paths_compare_by_where_they_point_and_new_schema_keys_by_default(tmp_path) -> None:
    run = tmp_path / "run"
    saved = to_yaml(finetune_job(run)).replace("  allow_config_change: false\n", "")
    job = load_and_validate(FINETUNE, [f"run.dir={run}", f"data.shards={run}/./shards"], "finetune")
    assert "allow_config_change" not in saved and config_changes(saved, job) == []
    saved = saved.replace("  keep_last: 2\n", "")
    assert config_changes(saved, job) == []  # absent from the saved config: the default
    job.train.keep_last = 3
    assert config_changes(saved, job) == ["train.keep_last: (not set) -> 3"]


def test_a_rerun_with_another_config_is_refused_before_anything_is_written(
    tmp_path: Path, scilm
) -> None:
    run = used_run_dir(tmp_path)
    before = (run / "config.yaml").read_text()
    code, out, err = scilm("finetune", FINETUNE, f"run.dir={run}", "train.lr=1e-3")
    assert code == 2
    assert f"error: run.dir: '{run}' already holds a finetune run with another config" in err
    assert "error:   train.lr: 5e-05 -> 0.001" in err
    assert "error:   data.shards: " in err  # the job file's default, not the saved one
    assert "run.allow_config_change=true" in err
    assert (run / "config.yaml").read_text() == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]


def test_resume_refuses_a_changed_key_unless_allowed(tmp_path: Path, scilm) -> None:
    run = used_run_dir(tmp_path)
    before = (run / "config.yaml").read_text()
    code, _, err = scilm("resume", str(run), "train.lr=1e-3", "train.max_steps=50")
    assert code == 2
    assert "error:   train.lr: 5e-05 -> 0.001" in err
    assert "error:   train.max_steps: -1 -> 50" in err
    # cluster keys may change; allowed: the refusal names only what is really wrong
    for extra in (["cluster.tasks_per_node=2"], ["train.lr=1e-3", "run.allow_config_change=true"]):
        code, _, err = scilm("resume", str(run), *extra)
        assert code == 2 and "another config" not in err
        assert "error: data.shards: no manifest.json" in err
    assert (run / "config.yaml").read_text() == before
    # a saved allow_config_change=true does not carry over into the next resume
    (run / "config.yaml").write_text(
        before.replace("allow_config_change: false", "allow_config_change: true")
    )
    job = load_and_validate(
        run / "config.yaml", ["run.allow_config_change=false", "train.lr=1e-3"], "finetune"
    )
    assert changed_config_problems(job)[1] == "  train.lr: 5e-05 -> 0.001"


# --- 2. run.dir is required --------------------------------------------------------------


def test_shipped_jobs_need_run_dir(scilm, tmp_path: Path) -> None:
    code, out, err = scilm("finetune", FINETUNE, f"data.shards={tmp_path}")
    assert code == 2 and out == ""
    assert err.startswith("error: run.dir: required value is missing")
    assert "e.g. run.dir=runs/" in err


# --- 4. inputs checked before submission ---------------------------------------------------


def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``sbatch`` / ``squeue`` / ``scontrol`` first on PATH, each leaving a mark if run."""
    bin_dir, marks = tmp_path / "bin", tmp_path / "called"
    bin_dir.mkdir()
    for name in ("sbatch", "squeue", "scontrol", "srun"):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\necho {name} >> {marks}\nexit 1\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return marks


def test_missing_shards_and_too_long_max_length_both_refused_nothing_queued(
    scilm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marks = fake_slurm(tmp_path, monkeypatch)
    run = tmp_path / "runs" / "ft"
    args = [
        "finetune",
        FINETUNE,
        f"run.dir={run}",
        f"data.shards={tmp_path / 'no-shards'}",
        "data.max_length=4096",
        "cluster=dev",
    ]
    code, out, err = scilm(*args)
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, err
    assert errors[0].startswith(f"error: data.shards: no manifest.json in '{tmp_path}/no-shards'")
    assert errors[1] == (
        "error: data.max_length: 4096 is more than the 512 positions model 'minilm' takes "
        "(max_position_embeddings); set data.max_length<=512"
    )
    assert not marks.exists()  # no Slurm command ran
    assert not (tmp_path / "runs").exists()  # no config.yaml, jobs.json, submitit/
    # the dry run shows the sbatch script and, on stderr, what a submission would meet
    code, out, err = scilm(*args, "--dry-run")
    assert code == 0 and "#SBATCH" in out
    assert "note: a submission would be refused: data.max_length: 4096" in err
    assert not marks.exists() and not (tmp_path / "runs").exists()


def test_a_bad_model_path_is_reported_with_the_other_problems_nothing_queued(
    scilm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marks = fake_slurm(tmp_path, monkeypatch)
    run = tmp_path / "runs" / "ft"
    code, out, err = scilm(
        "finetune",
        FINETUNE,
        f"run.dir={run}",
        f"data.shards={tmp_path / 'no-shards'}",
        f"model.name_or_path={tmp_path / 'no-model'}",
        "train.lr=-1",  # a config mistake is reported in the same list
        "cluster=dev",
    )
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert [e.split(":")[1].strip() for e in errors] == [
        "train.lr",
        "model.name_or_path",
        "data.shards",
    ], err
    assert errors[1] == (
        f"error: model.name_or_path: directory '{tmp_path / 'no-model'}' does not exist; give "
        "a HF model directory, a hub id, or 'minilm' for the packaged MiniLM"
    )
    assert not marks.exists() and not (tmp_path / "runs").exists()
    # scilm validate and prepare still report it as a config problem
    code, _, err = scilm("validate", FINETUNE, f"run.dir={run}", f"model.name_or_path={run}")
    assert code == 2 and "error: model.name_or_path: directory" in err


def test_shard_files_splits_models_and_run_dir_are_checked(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    (shards / "test").mkdir(parents=True)
    (shards / "test" / "shard-00000.h5").write_bytes(b"x" * 10)
    entry = {"file": "test/shard-00001.h5", "n_examples": 1, "n_tokens": 3, "bytes": 10}
    good = {**entry, "file": "test/shard-00000.h5", "bytes": 12}
    manifest = {
        "format_version": 1,
        "max_length": 4096,
        "splits": {"test": {"shards": [good, {**entry, "sha256": ""}]}},
    }
    (shards / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "file").write_text("")
    job = load_and_validate(
        EVALUATE,
        [
            f"run.dir={tmp_path / 'file' / 'eval'}",
            f"data.shards={shards}",
            f"eval.models=[{tmp_path / 'nowhere'}]",
        ],
        "evaluate",
    )
    problems = submission_problems(job)
    assert problems[0].startswith(
        f"data.shards: {shards}/test/shard-00000.h5: shard is 10 bytes, the manifest says 12"
    )
    assert (
        problems[1]
        == f"data.shards: {shards}/test/shard-00001.h5 is missing (listed in manifest.json)"
    )
    assert problems[2].startswith(  # the shards' own limit, not data.max_length
        f"data.shards: '{shards}' was prepared with data.max_length=4096, but model 'minilm' "
        "takes 512 positions"
    )
    assert problems[3].startswith(f"eval.models[0]: directory '{tmp_path / 'nowhere'}'")
    assert (
        problems[4]
        == f"run.dir: '{tmp_path / 'file' / 'eval'}': '{tmp_path / 'file'}' is not a directory"
    )
    assert len(problems) == 5
    job.eval.split = "dev"
    assert submission_problems(job)[0] == (
        f"data.shards: split 'dev' is not in {shards}/manifest.json; it has: test"
    )


def test_model_positions_read_from_config_json(tmp_path: Path) -> None:
    assert model_positions("minilm") == 512
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1})
    )
    assert model_positions(str(tmp_path)) == 512  # positions 0 and 1 are padding's
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 64}))
    assert model_positions(str(tmp_path)) == 64
    for rotary in ({"position_embedding_type": "rotary"}, {"rope_theta": 10000.0}):
        (tmp_path / "config.json").write_text(
            json.dumps({"model_type": "esm", "max_position_embeddings": 64, **rotary})
        )
        assert model_positions(str(tmp_path)) is None  # ESM-2, Llama: no table to overrun
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert model_positions(str(tmp_path)) is None
    assert model_positions("org/hub-model") is None


# --- 5. the evaluate job locks the run directory itself ---------------------------------------


def test_the_evaluate_job_refuses_a_live_directory_naming_its_owner(tmp_path: Path) -> None:
    from scilm_hpc.jobs.evaluate import EvaluateJob

    run = tmp_path / "eval"
    job = load_and_validate(
        EVALUATE, [f"run.dir={run}", f"data.shards={tmp_path / 'none'}", "cluster=none"]
    )
    holder = RunLock(run, "evaluate", job_id="777")
    holder.acquire()
    try:
        with pytest.raises(UserError) as refused:
            EvaluateJob(job)()  # the job itself, without the CLI's check before submission
    finally:
        holder.release()
    assert f"is in use by evaluate job 777 (pid {os.getpid()} on " in refused.value.problems[0]
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing else written
    with pytest.raises(UserError, match="data.shards: no manifest.json"):
        EvaluateJob(job)()  # free now: past the lock, stopped by the missing shards
    assert live_owner(run) is None  # released on the way out
    owner = read_owner(run)
    assert owner["command"] == "evaluate" and owner["released"] is True


# --- 3. scilm validate RUN_DIR --checkpoints, on a real tiny run ------------------------------


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_validate_checkpoints_names_a_flipped_byte(tmp_path, shards, tiny_model_dir, scilm):
    run = tmp_path / "run"
    done = scilm_run(
        "finetune",
        str(FINETUNE),
        f"run.dir={run}",
        f"data.shards={shards}",
        f"model.name_or_path={tiny_model_dir}",
        "cluster=none",
        "zero.stage=0",
        "train.micro_batch_size=8",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.eval_every=0",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    code, out, _ = scilm("validate", str(run), "--checkpoints")
    lines = out.splitlines()
    assert code == 0, out
    assert lines[0].startswith("checkpoints/step_4: ok: ") and lines[0].endswith("(latest)")
    assert lines[1].startswith("checkpoints/step_2: ok: ")
    weights = run / "checkpoints" / "step_4" / "mp_rank_00_model_states.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    code, out, _ = scilm("validate", str(run), "--checkpoints")
    assert code == 1
    assert out.splitlines()[0] == (
        f"checkpoints/step_4: bad: {weights}: checksum does not match the manifest (corrupt)"
    )
    assert out.splitlines()[1].startswith("checkpoints/step_2: ok: ")
    assert out.splitlines()[2] == f"{run}: 1 of 2 checkpoint(s) usable"
    # a rerun of the same job with another learning rate is refused, config.yaml kept
    saved = (run / "config.yaml").read_text()
    code, _, err = scilm(
        "finetune",
        FINETUNE,
        f"run.dir={run}",
        f"data.shards={shards}",
        f"model.name_or_path={tiny_model_dir}",
        "cluster=none",
        "zero.stage=0",
        "train.micro_batch_size=8",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "train.eval_every=0",
        "train.lr=1e-3",
    )
    assert code == 2 and err.count("error: ") == 3, err  # the refusal, one change, the advice
    assert (run / "config.yaml").read_text() == saved
    code, _, err = scilm("validate", str(tmp_path), "--checkpoints")
    assert code == 2 and "no checkpoints/step_N in it" in err
