"""finetune: real DeepSpeed on CPU ranks (gloo), exact resume, atomic checkpoints, export."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scilm_hpc.rundir import latest_tag, read_checkpoint_state
from scilm_hpc.train.checkpoint import consolidated_weights

from .conftest import REPO, scilm_run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
FINETUNE = str(REPO / "jobs" / "finetune.yaml")


def finetune(
    run_dir: Path,
    shards: Path,
    model: Path,
    *overrides: str,
    ranks: int = 2,
    fault: str | None = None,
) -> subprocess.CompletedProcess:
    return scilm_run(
        "finetune",
        FINETUNE,
        f"run.dir={run_dir}",
        f"data.shards={shards}",
        f"model.name_or_path={model}",
        "cluster=local",
        f"cluster.tasks_per_node={ranks}",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "train.seed=7",
        *overrides,
        fault=fault,
    )


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def rates(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["lr"] for r in rows if "loss" in r]


def export_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "settings",
    [("zero.stage=2",), ("zero.stage=3",), ("zero.stage=2", "train.precision=bf16")],
    ids=["2", "3", "2-bf16"],  # bf16: CPU autocast with torch's fused AdamW
)
def test_resume_after_kill_is_exact(tmp_path, shards, tiny_model_dir, settings):
    common = (
        *settings,
        "train.gradient_accumulation=2",
        "train.max_steps=6",
        "train.checkpoint_every=2",
        "train.eval_every=0",
        "train.lr=0.001",
        "train.warmup_ratio=0.34",  # 2 warm-up steps
    )
    straight = finetune(tmp_path / "straight", shards, tiny_model_dir, *common)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = finetune(
        tmp_path / "killed", shards, tiny_model_dir, *common, fault="kill_after_checkpoint:4"
    )
    assert killed.returncode != 0
    assert latest_tag(tmp_path / "killed") == "step_4"
    assert not (tmp_path / "killed" / "export").exists()
    resumed = scilm_run("resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout

    reference = losses(tmp_path / "straight")
    assert [s for s, _ in reference] == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path / "killed") == reference  # same loss sequence, bit for bit
    # each step ran at HF's linear schedule's rate, the resumed steps included
    hf = [0.001 * f for f in (0, 1 / 2, 4 / 4, 3 / 4, 2 / 4, 1 / 4)]
    assert rates(tmp_path / "straight") == pytest.approx(hf, rel=1e-9, abs=0)
    assert rates(tmp_path / "killed") == rates(tmp_path / "straight")
    assert_same_weights(export_weights(tmp_path / "killed"), export_weights(tmp_path / "straight"))
    # the data position was restored, not restarted: the step-6 checkpoint is 6 steps in
    state = read_checkpoint_state(tmp_path / "killed", "step_6")
    assert state["position"] == {"epoch": 0, "samples_in_epoch": 6 * 4 * 2 * 2}


def test_kill_mid_checkpoint_resumes_from_previous(tmp_path, shards, tiny_model_dir):
    common = ("zero.stage=2", "train.max_steps=5", "train.checkpoint_every=2")
    straight = finetune(tmp_path / "straight", shards, tiny_model_dir, *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = finetune(
        tmp_path / "killed", shards, tiny_model_dir, *common, fault="kill_in_checkpoint:4"
    )
    assert killed.returncode != 0
    # DeepSpeed wrote step_4, but the job died before it was complete: latest stays step_2
    assert (tmp_path / "killed" / "checkpoints" / "step_4").is_dir()
    assert latest_tag(tmp_path / "killed") == "step_2"
    resumed = scilm_run("resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step_2" in resumed.stdout
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert_same_weights(export_weights(tmp_path / "killed"), export_weights(tmp_path / "straight"))


def test_signal_during_start_up_stops_at_the_first_step(tmp_path, shards, tiny_model_dir):
    run = tmp_path / "run"
    args = [
        "finetune",
        FINETUNE,
        f"run.dir={run}",
        f"data.shards={shards}",
        f"model.name_or_path={tiny_model_dir}",
        "cluster=none",
        "zero.stage=0",
        "train.max_steps=3",
        "train.checkpoint_every=0",
        "train.log_every=1",
    ]
    started = scilm_run(*args, signal_in_start_up=True)
    assert started.returncode == 0, started.stderr[-3000:]
    assert "stopping at step 1 (SIGUSR2)" in started.stdout
    state = json.loads((run / "state.json").read_text())
    assert state["state"] == "stopped" and "SIGUSR2 at step 1" in state["reason"]
    assert latest_tag(run) == "step_1" and not (run / "export").exists()
    resumed = scilm_run("resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [s for s, _ in losses(run)] == [1, 2, 3]
    assert (run / "export" / "model.safetensors").is_file()


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_export_equals_engine_weights(tmp_path, shards, tiny_model_dir, stage):
    from transformers import AutoModelForSequenceClassification, pipeline

    run = tmp_path / "run"
    done = finetune(
        run, shards, tiny_model_dir, f"zero.stage={stage}", "train.max_steps=3", "train.lr=1e-3"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    exported = export_weights(run)
    engine = consolidated_weights(run, "step_3", stage)
    initial = load_file(tiny_model_dir / "model.safetensors")
    for key, tensor in exported.items():
        assert tensor.numel() > 0 and tensor.dtype == torch.float32, key
        torch.testing.assert_close(tensor, engine[key].float(), rtol=0, atol=0, msg=key)
    trained = [k for k in initial if k in exported and k.startswith("bert.encoder")]
    assert trained and all(not torch.equal(initial[k], exported[k]) for k in trained)
    model = AutoModelForSequenceClassification.from_pretrained(run / "export")
    assert model.config.id2label == {0: "background", 1: "method", 2: "result"}
    classify = pipeline("text-classification", model=str(run / "export"), device="cpu")
    assert classify("We followed the protocol of Smith et al.")[0]["label"] in {
        "background",
        "method",
        "result",
    }
    assert (run / "plots" / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)])
def test_resume_on_another_world_size(tmp_path, shards, tiny_model_dir, first, second):
    run = tmp_path / "run"
    common = (
        "zero.stage=2",
        "train.max_steps=6",
        "train.checkpoint_every=3",
        "train.lr=0.001",
        "train.warmup_ratio=0.34",  # 2 warm-up steps
    )
    killed = finetune(
        run, shards, tiny_model_dir, *common, ranks=first, fault="kill_after_checkpoint:3"
    )
    assert killed.returncode != 0 and latest_tag(run) == "step_3"
    resumed = scilm_run("resume", str(run), f"cluster.tasks_per_node={second}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logs = "".join(p.read_text() for p in (run / "submitit").glob("*_log.err"))
    assert f"saved on {first} rank(s) on {second}" in logs
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]
    # the scheduler restored from the checkpoint state (optimizer state starts fresh)
    hf = [0.001 * f for f in (0, 1 / 2, 4 / 4, 3 / 4, 2 / 4, 1 / 4)]
    assert rates(run) == pytest.approx(hf, rel=1e-9, abs=0)
    state = read_checkpoint_state(run, "step_6")
    assert state["world_size"] == second
    # 3 steps on `first` ranks, then 3 on `second`: no example replayed or skipped
    assert state["position"]["samples_in_epoch"] == 3 * 4 * first + 3 * 4 * second
    consolidated = consolidated_weights(run, "step_3", 2)
    assert not torch.equal(
        consolidated["classifier.weight"], export_weights(run)["classifier.weight"]
    )


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_lines_in_a_non_interactive_log(tmp_path, shards, tiny_model_dir, quiet):
    done = scilm_run(
        "finetune",
        FINETUNE,
        f"run.dir={tmp_path / 'run'}",
        f"data.shards={shards}",
        f"model.name_or_path={tiny_model_dir}",
        "cluster=none",
        "train.micro_batch_size=4",
        "train.max_steps=6",
        "train.log_every=2",
        *(["--quiet"] if quiet else []),
    )
    assert done.returncode == 0, done.stderr
    assert "threads per rank, zero stage 0, precision " in done.stdout  # the auto defaults
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    if quiet:
        assert lines == []
        return
    assert [line.split(" | ")[0] for line in lines] == ["step 2/6", "step 4/6", "step 6/6"]
    for line in lines:
        fields = dict(part.split(" ", 1) for part in line.split(" | ")[1:])
        assert float(fields["loss"]) > 0
        assert fields["ETA"].count(":") == 2 and fields["elapsed"].count(":") == 2
    assert len(losses(tmp_path / "run")) == 3  # metrics.jsonl as before


def flip_byte(path: Path, offset: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def rank0_log(run_dir: Path) -> str:
    """What rank 0 printed, over every local job of the run directory."""
    return "".join(p.read_text() for p in sorted((run_dir / "submitit").glob("*_0_log.out")))


def test_missing_latest_and_a_corrupt_checkpoint_never_start_over(tmp_path, shards, tiny_model_dir):
    common = ("zero.stage=2", "train.max_steps=8", "train.checkpoint_every=2", "train.eval_every=0")
    straight = finetune(tmp_path / "straight", shards, tiny_model_dir, *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "checkpoint step_2: " in rank0_log(tmp_path / "straight")  # with the manifest's cost
    run = tmp_path / "run"
    killed = finetune(run, shards, tiny_model_dir, *common, fault="kill_after_checkpoint:4")
    assert killed.returncode != 0
    # latest deleted: resumes from the newest complete checkpoint, keeps the earlier rows
    (run / "checkpoints" / "latest").unlink()
    again = scilm_run("resume", str(run), fault="kill_after_checkpoint:6")
    assert again.returncode != 0
    assert "checkpoints/latest is missing or unreadable; resuming from step_4" in rank0_log(run)
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4, 5, 6]
    # a flipped bit in the newest checkpoint's weights: named, skipped, kept on disk
    weights = run / "checkpoints" / "step_6" / "mp_rank_00_model_states.pt"
    flip_byte(weights)
    corrupt = weights.read_bytes()
    resumed = scilm_run("resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = rank0_log(run)
    assert f"checkpoint step_6 skipped (kept on disk): {weights}: checksum" in log
    assert "checkpoints/latest names step_6; resuming from step_4" in log
    assert losses(run) == losses(tmp_path / "straight")  # rows 5-6 redone, bit for bit
    assert_same_weights(export_weights(run), export_weights(tmp_path / "straight"))
    kept = list((run / "checkpoints").glob("step_6.rejected-*"))
    assert len(kept) == 1 and (kept[0] / weights.name).read_bytes() == corrupt


@pytest.fixture
def small_disk() -> Iterator[Callable[[Path, int], None]]:
    """``small_disk(path, kib)``: mount a tmpfs of that size at ``path`` (a really full
    disk: writes fail with ENOSPC where they would on a cluster's scratch)."""
    mounts: list[Path] = []

    def mount(path: Path, kib: int) -> None:
        path.mkdir(parents=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounts.append(path)

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_a_full_disk_ends_every_rank_at_once_and_leaves_latest(
    tmp_path, shards, tiny_model_dir, small_disk
):
    # checkpoints/ on its own small filesystem: submitit's logs and result files (in
    # RUN_DIR/submitit) need room to report the error
    common = ("zero.stage=2", "train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=0")
    straight = finetune(tmp_path / "straight", shards, tiny_model_dir, *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    checkpoint = tree_bytes(tmp_path / "straight" / "checkpoints" / "step_4")
    run = tmp_path / "run"
    small_disk(run / "checkpoints", checkpoint // 4096)  # a quarter of one checkpoint
    start = time.monotonic()
    failed = finetune(run, shards, tiny_model_dir, *common)
    seconds = time.monotonic() - start
    assert failed.returncode == 3, failed.stderr[-3000:]
    (line,) = [x for x in failed.stderr.splitlines() if x.startswith("error: ")]
    assert f"{run / 'checkpoints' / 'step_2'}" in line and "MiB free there" in line
    assert not (run / "checkpoints" / "latest").exists()
    assert seconds < 180, seconds  # both ranks ended, not one waiting for a timeout
    # the same run on a roomy disk: starts again from the beginning, ends equal
    roomy = tmp_path / "roomy"
    shutil.copytree(run, roomy, symlinks=True)
    again = finetune(roomy, shards, tiny_model_dir, *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "no checkpoint was ever completed; starting from the beginning" in rank0_log(roomy)
    assert losses(roomy) == losses(tmp_path / "straight")
    assert_same_weights(export_weights(roomy), export_weights(tmp_path / "straight"))
    # a later save that cannot fit is refused before it starts, on every rank
    kept = tree_bytes(roomy / "checkpoints")
    small = tmp_path / "small"
    shutil.copytree(roomy, small, symlinks=True, ignore=shutil.ignore_patterns("checkpoints"))
    small_disk(small / "checkpoints", (kept + checkpoint // 2) // 1024)
    shutil.copytree(roomy / "checkpoints", small / "checkpoints", dirs_exist_ok=True)
    more = scilm_run("resume", str(small), "train.max_steps=6", "run.allow_config_change=true")
    assert more.returncode == 3, more.stderr[-3000:]
    assert "error: no space for checkpoint step_6 in " in more.stderr
    assert "latest stays step_4" in more.stderr
    assert latest_tag(small) == "step_4"


def test_a_second_run_is_refused_and_a_killed_owner_is_taken_over(tmp_path, shards, tiny_model_dir):
    import os
    import signal

    from .conftest import SCILM

    run = tmp_path / "run"
    args = (
        "finetune",
        FINETUNE,
        f"run.dir={run}",
        f"data.shards={shards}",
        f"model.name_or_path={tiny_model_dir}",
        "cluster=none",
        "train.micro_batch_size=4",
        "train.max_steps=100000",
        "train.checkpoint_every=2",
        "train.eval_every=0",
    )
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SCILM_FAULT", None)
    first = subprocess.Popen(
        [SCILM, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 240
        while latest_tag(run) is None:  # running and holding the lock
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        config = (run / "config.yaml").read_text()
        second = scilm_run(*args[:-1], "train.eval_every=1")
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by finetune (pid {first.pid} on " in second.stderr
        assert (run / "config.yaml").read_text() == config  # the live run's config kept
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    resumed = scilm_run("resume", str(run), "train.max_steps=4", "run.allow_config_change=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"taking over the lock of finetune (pid {first.pid} on " in resumed.stdout
    assert "resuming from step_" in resumed.stdout
