"""The generated DeepSpeed config, checkpoint retention, and best checkpoint + early
stopping in a real (one-rank, CPU) fine-tuning run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from scilm_hpc.config import load_and_validate
from scilm_hpc.errors import UserError
from scilm_hpc.rundir import latest_tag, read_checkpoint_state
from scilm_hpc.schema import JobConfig
from scilm_hpc.train.checkpoint import STATE, _prune
from scilm_hpc.train.ds_config import deepspeed_config

from .conftest import REPO

FINETUNE = REPO / "jobs" / "finetune.yaml"


def job(*overrides: str) -> JobConfig:
    return load_and_validate(FINETUNE, ["run.dir=runs/unused", *overrides], job="finetune")


def ds(*overrides: str, on_gpu: bool = False) -> dict:
    return deepspeed_config(job(*overrides), on_gpu)


# ---------------------------------------------------------------- ZeRO, precision, batch


@pytest.mark.parametrize(
    ("overrides", "on_gpu", "expected"),
    [
        (["zero=stage0"], False, {"stage": 0}),
        (["zero=stage2"], False, {"stage": 2}),
        ([], False, {"stage": 0}),
        (["cluster.tasks_per_node=2"], False, {"stage": 2}),
        (
            ["zero.offload_optimizer=true"],
            False,
            {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}},
        ),
        (
            ["zero.offload_optimizer=true"],
            True,
            {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
        ),
        (["zero=stage3"], False, {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}),
        (
            ["zero=stage3-offload"],
            False,
            {
                "stage": 3,
                "stage3_gather_16bit_weights_on_model_save": True,
                "offload_optimizer": {"device": "cpu", "pin_memory": False},
                "offload_param": {"device": "cpu", "pin_memory": False},
            },
        ),
    ],
    ids=[
        "stage0",
        "stage2",
        "auto-1rank",
        "auto-2ranks",
        "offload-cpu",
        "offload-gpu",
        "stage3",
        "stage3-offload",
    ],
)
def test_zero_stage_and_offload(overrides, on_gpu, expected):
    assert ds(*overrides, on_gpu=on_gpu)["zero_optimization"] == expected


@pytest.mark.parametrize(
    ("overrides", "bf16", "fp16"),
    [
        (["train.precision=fp32"], False, False),
        (["train.precision=bf16"], False, False),
        (["train.precision=fp16", "cluster.gpus_per_node=1"], False, True),
    ],
    ids=["fp32", "bf16", "fp16"],
)
def test_precision_flags(overrides, bf16, fp16):
    config = ds(*overrides)
    assert config["bf16"] == {"enabled": bf16}
    assert config["fp16"] == {"enabled": fp16}


# ---------------------------------------------------------------- auto defaults


@pytest.mark.parametrize(
    ("stage", "offload_optimizer", "offload_params", "world", "expected"),
    [
        (None, False, False, 1, 0),
        (None, False, False, 2, 2),
        (None, False, False, 8, 2),
        (None, True, False, 1, 2),
        (None, False, True, 1, 3),
        (1, False, False, 1, 1),
        (2, False, False, 1, 2),
        (3, False, False, 1, 3),
        (0, False, False, 4, 0),
    ],
)
def test_zero_stage_auto(stage, offload_optimizer, offload_params, world, expected):
    from scilm_hpc.schema import ZeroConfig

    zero = ZeroConfig(
        stage=stage, offload_optimizer=offload_optimizer, offload_params=offload_params
    )
    assert zero.stage_for(world) == expected


def test_shipped_finetune_job_resolves_to_stage_0_on_one_rank():
    from scilm_hpc.config import to_yaml

    one = job()
    assert (one.cluster.world_size(), one.zero.stage) == (1, 0)
    assert "stage: 0" in to_yaml(one)  # the saved config and the dry run show the stage in effect
    assert job("cluster=none").zero.stage == 0
    assert job("cluster.tasks_per_node=2").zero.stage == 2
    assert job("zero.stage=2").zero.stage == 2  # asked for: kept on one rank
    assert job("zero=stage3").zero.stage == 3


@pytest.mark.parametrize(
    ("backend", "cpus", "ranks", "cores", "omp", "expected"),
    [
        ("none", None, 1, 8, False, 8),  # auto: every usable physical core
        ("local", None, 1, 8, False, 8),
        ("local", None, 2, 8, False, 4),  # local ranks share the machine's cores
        ("local", None, 3, 2, False, 1),
        ("local", None, 1, 8, True, None),  # the user's OMP_NUM_THREADS wins over auto
        ("local", None, 1, None, False, None),  # cores unknown: torch's default
        ("local", 3, 1, 8, True, 3),  # asked for: always
        ("none", 2, 1, 8, False, 2),
        ("slurm", None, 1, 64, False, 1),  # what sbatch asked for
        ("slurm", 6, 1, 64, False, 6),
    ],
)
def test_cpu_threads_auto(backend, cpus, ranks, cores, omp, expected):
    from scilm_hpc.runtime.hardware import threads_for

    assert threads_for(backend, cpus, ranks, cores, omp) == expected


def test_shipped_finetune_job_uses_every_core(monkeypatch: pytest.MonkeyPatch):
    from scilm_hpc.runtime import hardware

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(hardware, "usable_cores", lambda: 6)
    shipped = job()
    assert shipped.cluster.cpus_per_task is None
    assert hardware.cpu_threads(shipped) == 6
    assert hardware.cpu_threads(job("cluster.tasks_per_node=2")) == 3
    assert hardware.cpu_threads(job("cluster.cpus_per_task=1")) == 1


@pytest.mark.parametrize(
    ("requested", "native", "expected"),
    [
        ("auto", True, "bf16"),
        ("auto", False, "fp32"),
        ("fp32", True, "fp32"),
        ("bf16", False, "bf16"),  # asked for: kept (the run warns it is emulated)
        ("fp16", True, "fp16"),
    ],
)
def test_precision_auto(requested, native, expected):
    from scilm_hpc.runtime.hardware import precision_for

    assert precision_for(requested, native) == expected


@pytest.mark.parametrize("native", [True, False])
def test_shipped_finetune_job_precision_follows_the_cpu(
    monkeypatch: pytest.MonkeyPatch, native: bool
):
    from scilm_hpc.runtime import hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    shipped = job()
    assert shipped.train.precision == "auto"
    ran = hardware.with_hardware_defaults(shipped, on_gpu=False)
    assert ran.train.precision == ("bf16" if native else "fp32")
    assert shipped.train.precision == "auto"  # the config itself is left as written
    line = hardware.start_line(ran, on_gpu=False)
    assert f"zero stage 0, precision {ran.train.precision}" in line
    assert "threads per rank" in line


def test_batch_sizes_and_optimizer():
    config = ds(
        "train.micro_batch_size=4",
        "train.gradient_accumulation=3",
        "train.lr=0.002",
        "train.weight_decay=0.1",
        "train.clip_grad=0.25",
    )
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.25
    assert "train_batch_size" not in config  # DeepSpeed derives it
    params = config["optimizer"]["params"]
    assert config["optimizer"]["type"] == "AdamW"
    assert (params["lr"], params["weight_decay"]) == (0.002, 0.1)


def test_train_batch_size_only_with_global_batch_size():
    config = ds(
        "train.micro_batch_size=4",
        "train.gradient_accumulation=3",
        "cluster.tasks_per_node=2",
        "train.global_batch_size=24",
    )
    assert config["train_batch_size"] == 24
    assert config["train_micro_batch_size_per_gpu"] == 4


# ---------------------------------------------------------------- schedule


def test_the_schedule_is_not_deepspeeds():
    """The engine gets scilm's own scheduler (tests/test_schedule.py), not a config one."""
    assert "scheduler" not in ds("train.warmup_ratio=0.1", "train.schedule=cosine")


# ---------------------------------------------------------------- optimizer implementation


@pytest.mark.parametrize(
    ("overrides", "on_gpu", "torch_adam"),
    [
        ([], False, True),
        (["zero.offload_optimizer=true"], False, False),
        (["zero=stage3-offload"], False, False),
        ([], True, False),
    ],
    ids=["cpu", "cpu-offload-stage2", "cpu-offload-stage3", "gpu"],
)
def test_torch_adam_only_on_cpu_without_offload(overrides, on_gpu, torch_adam):
    assert ds(*overrides, on_gpu=on_gpu)["optimizer"]["params"]["torch_adam"] is torch_adam


# ---------------------------------------------------------------- user JSON


def test_user_json_merged_recursively_and_wins(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "zero_optimization": {"reduce_bucket_size": 1000},
                "gradient_clipping": 0.5,
                "optimizer": {"params": {"eps": 1e-6}},
                "zero_allow_untested_optimizer": True,
            }
        )
    )
    base = ds("train.lr=0.003")
    config = ds("train.lr=0.003", f"zero.config_file={user}")
    assert config["zero_optimization"] == {"stage": 0, "reduce_bucket_size": 1000}
    assert config["gradient_clipping"] == 0.5
    assert config["optimizer"]["params"] == {**base["optimizer"]["params"], "eps": 1e-6}
    assert config["optimizer"]["params"]["lr"] == 0.003
    assert config["zero_allow_untested_optimizer"] is True
    untouched = set(base) - {"zero_optimization", "gradient_clipping", "optimizer"}
    assert {k: config[k] for k in untouched} == {k: base[k] for k in untouched}


def test_user_json_invalid_names_file_and_line(tmp_path):
    user = tmp_path / "broken.json"
    user.write_text('{\n  "gradient_clipping": 0.5,\n  oops\n}\n')
    resolved = job(f"zero.config_file={user}")  # validation only checks that it exists
    with pytest.raises(UserError) as info:
        deepspeed_config(resolved, False)
    message = str(info.value)
    assert message.startswith(f"zero.config_file: {user}:3: not valid JSON")
    user.write_text("[1, 2]\n")
    with pytest.raises(UserError, match="must hold a JSON object"):
        deepspeed_config(resolved, False)


# ---------------------------------------------------------------- checkpoint retention


def make_steps(root: Path, complete: Sequence[int], partial: Sequence[int] = ()) -> None:
    for step in [*complete, *partial]:
        d = root / f"step_{step}"
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        if step in complete:
            (d / STATE).write_text(json.dumps({"step": step}))


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_prune_keeps_last_k_in_numeric_order(tmp_path):
    make_steps(tmp_path, [8, 9, 10, 11])
    (tmp_path / "latest").write_text("step_11\n")
    _prune(tmp_path, 2, set())
    assert names(tmp_path) == ["latest", "step_10", "step_11"]  # not "step_8" < "step_9"
    _prune(tmp_path, 5, set())  # fewer than keep_last: nothing to do
    assert names(tmp_path) == ["latest", "step_10", "step_11"]


def test_prune_keeps_tags_in_keep(tmp_path):
    make_steps(tmp_path, [2, 4, 6, 8])
    _prune(tmp_path, 1, {"step_2", "step_8"})
    assert names(tmp_path) == ["step_2", "step_8"]
    _prune(tmp_path, 1, {"step_8"})  # the best among the last K costs no extra slot
    assert names(tmp_path) == ["step_8"]


def test_prune_ignores_partial_saves(tmp_path):
    make_steps(tmp_path, [2, 4, 6], partial=[3, 8])
    _prune(tmp_path, 2, set())
    # partial saves are neither counted among the last K nor deleted
    assert names(tmp_path) == ["step_3", "step_4", "step_6", "step_8"]
    assert not (tmp_path / "step_8" / STATE).exists()


def test_latest_tag(tmp_path):
    root = tmp_path / "checkpoints"
    assert latest_tag(tmp_path) is None  # no checkpoints at all
    make_steps(root, [4], partial=[8])
    assert latest_tag(tmp_path) is None  # no `latest` file
    (root / "latest").write_text("step_4\n")
    assert latest_tag(tmp_path) == "step_4"
    assert read_checkpoint_state(tmp_path, "step_4") == {"step": 4}
    (root / "latest").write_text("step_8\n")  # a directory without scilm_state.json
    assert latest_tag(tmp_path) is None
    (root / "latest").write_text("step_12\n")  # no such directory
    assert latest_tag(tmp_path) is None


# ---------------------------------------------------------------- real run


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "cluster", [["cluster=none"], ["cluster=local", "cluster.tasks_per_node=2"]]
)
def test_best_checkpoint_survives_and_early_stopping(tmp_path, shards, tiny_model_dir, cluster):
    run = tmp_path / "run"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SCILM_FAULT", None)
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("scilm")),
            "finetune",
            str(FINETUNE),
            *cluster,
            f"run.dir={run}",
            f"data.shards={shards}",
            f"model.name_or_path={tiny_model_dir}",
            "train.micro_batch_size=4",
            "train.max_steps=40",
            "train.eval_every=2",
            "train.checkpoint_every=4",
            "train.keep_last=1",
            "train.best_metric=dev_loss",
            "train.early_stopping_patience=2",
            "train.lr=0.05",  # high: the dev loss stops improving after the first evaluation
        ],
        capture_output=True,
        text=True,
        timeout=540,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    last_step = max(r["step"] for r in rows)
    assert last_step < 40
    state = json.loads((run / "state.json").read_text())
    assert state["state"] == "completed"
    assert "early stopping" in state["reason"]
    assert state["step"] == last_step
    logs = done.stdout + "".join(p.read_text() for p in run.glob("submitit/*_0_log.out"))
    assert f"early stopping at step {last_step}" in logs

    dev = [(r["step"], r["dev_loss"]) for r in rows if "dev_loss" in r]
    assert [s for s, _ in dev] == list(range(2, last_step + 1, 2))
    latest = latest_tag(run)
    assert latest == f"step_{last_step}"
    best = read_checkpoint_state(run, latest)["best"]
    best_step = int(best["tag"].split("_")[1])
    # the best is the minimum dev loss logged up to it (and none was lower after it)
    assert best["value"] == min(v for s, v in dev if s <= best_step) == dict(dev)[best_step]
    assert best["value"] == min(v for _, v in dev)
    # patience 2: exactly two evaluations without improvement after the best
    assert [s for s, _ in dev if s > best_step] == [best_step + 2, best_step + 4]
    # keep_last=1 deleted every other complete checkpoint, but not the best
    assert best["tag"] != latest
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert ckpts == sorted([best["tag"], latest])
    assert read_checkpoint_state(run, best["tag"])["best"] == best
