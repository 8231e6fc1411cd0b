"""Training throughput settings (issue 7): bf16 autocast on CPU ranks, optimizer choice,
threads per rank, and the data-loading share of step time in metrics.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scilm_hpc.config import load_and_validate
from scilm_hpc.runtime.hardware import cpu_threads
from scilm_hpc.train.checkpoint import consolidated_weights
from scilm_hpc.train.ds_config import cpu_autocast, deepspeed_config

from .conftest import REPO, prepare_demo_shards, scilm_run

FINETUNE = REPO / "jobs" / "finetune.yaml"


def ds(*overrides: str, on_gpu: bool = False) -> dict:
    return deepspeed_config(
        load_and_validate(FINETUNE, ["run.dir=runs/unused", *overrides], "finetune"), on_gpu
    )


# ---------------------------------------------------------------- config (no training)


def test_bf16_on_cpu_is_autocast_with_fp32_weights_and_fused_adamw():
    job = load_and_validate(FINETUNE, ["run.dir=runs/unused", "train.precision=bf16"], "finetune")
    assert cpu_autocast(job, on_gpu=False) and not cpu_autocast(job, on_gpu=True)
    config = ds("train.precision=bf16")
    assert config["bf16"] == {"enabled": False}  # DeepSpeed keeps fp32 weights
    params = config["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True and "foreach" not in params


def test_bf16_on_gpu_is_deepspeeds_own():
    config = ds("train.precision=bf16", "cluster.gpus_per_node=1", on_gpu=True)
    assert config["bf16"] == {"enabled": True}
    assert "fused" not in config["optimizer"]["params"]


def test_fp32_on_cpu_uses_the_fused_adamw_and_foreach_on_request():
    params = ds()["optimizer"]["params"]
    assert params["fused"] is True and "foreach" not in params
    assert not cpu_autocast(
        load_and_validate(FINETUNE, ["run.dir=runs/unused"], "finetune"), on_gpu=False
    )
    params = ds("train.adamw=foreach")["optimizer"]["params"]
    assert params["foreach"] is True and "fused" not in params


def test_offload_keeps_deepspeeds_cpu_adam():
    params = ds("train.precision=bf16", "zero.offload_optimizer=true")["optimizer"]["params"]
    assert params["torch_adam"] is False and "fused" not in params and "foreach" not in params


def test_user_json_can_still_choose_the_optimizer(tmp_path: Path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"optimizer": {"params": {"foreach": False, "fused": True}}}))
    params = ds(f"zero.config_file={user}")["optimizer"]["params"]
    assert params["fused"] is True and params["foreach"] is False


def test_threads_per_rank(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    local = load_and_validate(
        FINETUNE, ["run.dir=runs/unused", "cluster=local", "cluster.cpus_per_task=3"], "finetune"
    )
    assert cpu_threads(local) == 3
    alone = load_and_validate(FINETUNE, ["run.dir=runs/unused", "cluster=none"], "finetune")
    cores = cpu_threads(alone)
    assert cores is not None and 1 <= cores <= len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(alone) is None  # the user's setting wins
    assert cpu_threads(local) == 3  # a rank always gets its task's CPUs


@pytest.mark.parametrize(
    ("world", "stage", "allreduce"), [(2, 0, True), (1, 2, True), (1, 3, True)]
)
def test_the_gradient_allreduce_stays_where_it_reduces(world, stage, allreduce):
    from types import SimpleNamespace

    from scilm_hpc.train.loop import Trainer

    trainer = Trainer.__new__(Trainer)  # only what the helper reads
    trainer.world = world
    trainer.job = load_and_validate(
        FINETUNE, ["run.dir=runs/unused", f"zero.stage={stage}"], "finetune"
    )
    engine = SimpleNamespace(enable_backward_allreduce=True)
    trainer._skip_lone_allreduce(engine)
    assert engine.enable_backward_allreduce is allreduce


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_lone_rank_skips_the_gradient_allreduce(monkeypatch, tiny_model_dir):
    """On a real DeepSpeed engine at one rank (stage 0, the config the trainer builds),
    the trainer's switch stops DeepSpeed from all-reducing in ``backward`` and leaves
    the gradients exactly those of an engine that all-reduces; the optimizer DeepSpeed
    builds from that config is torch's fused AdamW."""
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForSequenceClassification

    from scilm_hpc.runtime.env import free_port
    from scilm_hpc.train.loop import Trainer

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    job = load_and_validate(
        FINETUNE, ["run.dir=runs/unused", "zero.stage=0", "train.micro_batch_size=4"], "finetune"
    )
    trainer = Trainer.__new__(Trainer)  # only what the switch reads
    trainer.world, trainer.job = 1, job
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 2000, (4, 10), generator=g),
        "attention_mask": torch.ones(4, 10, dtype=torch.long),
        "labels": torch.tensor([0, 1, 0, 1]),
    }
    try:
        grads, calls = [], []
        for skip in (True, False):
            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
            model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
            model.eval()  # no dropout: both engines compute the same loss
            engine, _, _, _ = deepspeed.initialize(
                model=model,
                config=deepspeed_config(job, False),
                model_parameters=list(model.parameters()),
            )
            assert engine.enable_backward_allreduce is True  # DeepSpeed's default
            # the optimizer DeepSpeed builds from our fp32 CPU config: torch's fused AdamW
            optimizer = engine.optimizer
            assert isinstance(optimizer, torch.optim.AdamW), type(optimizer)
            assert optimizer.defaults["fused"] is True and not optimizer.defaults["foreach"]
            if skip:
                trainer._skip_lone_allreduce(engine)
                assert engine.enable_backward_allreduce is False
            counted = [0]
            reduce = engine.allreduce_gradients

            def counting(*args, counted=counted, reduce=reduce, **kwargs):
                counted[0] += 1
                return reduce(*args, **kwargs)

            engine.allreduce_gradients = counting
            engine.backward(engine(**batch).loss)
            grads.append({n: p.grad.clone() for n, p in engine.module.named_parameters()})
            calls.append(counted[0])
        assert calls == [0, 1]
        assert grads[0].keys() == grads[1].keys()
        assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
        assert any(bool(v.abs().sum() > 0) for v in grads[0].values())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------- real runs


def finetune(
    run_dir: Path, shards: Path, model: Path, *overrides: str, fault: str | None = None
) -> subprocess.CompletedProcess:
    return scilm_run(
        "finetune",
        str(FINETUNE),
        f"run.dir={run_dir}",
        f"data.shards={shards}",
        f"model.name_or_path={model}",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "train.seed=3",
        "train.eval_every=0",
        *overrides,
        fault=fault,
    )


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def eight_examples(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """Shards of 8 training examples: one optimizer step sees all of them, so a model
    that trains memorises them within a few steps (the tiny model learns the full demo
    corpus too slowly for a short test)."""
    return prepare_demo_shards(tmp_path_factory.mktemp("eight"), tiny_model_dir, 8, 6, 3)


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "cluster",
    [
        ["cluster=none", "zero.stage=0", "train.micro_batch_size=8"],
        ["cluster=local", "cluster.tasks_per_node=2", "zero=stage3"],
    ],
    ids=["1rank-stage0", "2ranks-stage3"],
)
def test_bf16_on_cpu_trains_and_exports_fp32(tmp_path, eight_examples, tiny_model_dir, cluster):
    from transformers import AutoModelForSequenceClassification

    common = ("train.max_steps=20", "train.lr=1e-2", "train.warmup_ratio=0", *cluster)
    bf16 = finetune(
        tmp_path / "bf16", eight_examples, tiny_model_dir, "train.precision=bf16", *common
    )
    assert bf16.returncode == 0, bf16.stderr[-3000:]
    fp32 = finetune(tmp_path / "fp32", eight_examples, tiny_model_dir, *common)
    assert fp32.returncode == 0, fp32.stderr[-3000:]

    losses = [r["loss"] for r in rows(tmp_path / "bf16")]
    assert len(losses) == 20
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])  # it learns (memorises the 8 examples)
    reference = [r["loss"] for r in rows(tmp_path / "fp32")]
    # autocast really ran in bf16 (the losses differ from fp32) and stayed close to it
    assert losses != reference
    assert abs(losses[0] - reference[0]) < 0.05

    exported = load_file(tmp_path / "bf16" / "export" / "model.safetensors")
    stage = 3 if "zero=stage3" in cluster else 0
    engine = consolidated_weights(tmp_path / "bf16", "step_20", stage)
    for key, tensor in exported.items():
        assert tensor.dtype == torch.float32, key
        # the export is the fp32 weights themselves, not a bf16 copy of them
        torch.testing.assert_close(tensor, engine[key], rtol=0, atol=0, msg=key)
    assert any(
        not torch.equal(t, t.to(torch.bfloat16).float())
        for k, t in exported.items()
        if k.startswith("bert.encoder")
    )
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16" / "export")
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_data_loading_share_is_logged(tmp_path, shards, tiny_model_dir):
    from scilm_hpc.data.dataset import ShardDataset
    from scilm_hpc.data.sampler import ResumableBatches, SamplerPosition

    done = finetune(
        tmp_path / "run",
        shards,
        tiny_model_dir,
        "cluster=local",
        "cluster.tasks_per_node=2",
        "train.gradient_accumulation=2",
        "train.max_steps=4",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    logged = rows(tmp_path / "run")
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    # the real (unpadded) tokens of each step's examples, on both ranks
    lengths = ShardDataset(shards, "train").lengths()
    streams = [
        ResumableBatches(lengths, 4, 2, 2, rank, 3, True).step_batches(SamplerPosition())
        for rank in range(2)
    ]
    for row in logged:
        step_s = 16 / row["samples_per_s"]  # 4 examples x 2 micro-batches x 2 ranks
        assert 0 < row["data_fraction"] < 1
        assert row["data_fraction"] == pytest.approx(row["data_s_per_step"] / step_s)
        tokens = sum(int(lengths[m].sum()) for s in streams for m in next(s)[1])
        assert row["tokens_per_s"] * step_s == pytest.approx(tokens)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_fused_adamw_follows_the_foreach_loop(tmp_path, eight_examples, tiny_model_dir):
    """The fused AdamW kernel (the CPU default) and the multi-tensor loop it replaced
    compute the same update, rounded in another order: over 8 steps of real training
    (lr 1e-2, so the weights move a lot) the losses agree to 1e-4 relative and the
    exported weights to 1e-4 absolute, while they are not bit-identical (the kernel
    really changed)."""
    common = ("cluster=none", "train.max_steps=8", "train.lr=1e-2", "train.micro_batch_size=8")
    runs = {}
    for kernel in ("fused", "foreach"):
        done = finetune(
            tmp_path / kernel, eight_examples, tiny_model_dir, f"train.adamw={kernel}", *common
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[kernel] = (
            [r["loss"] for r in rows(tmp_path / kernel)],
            load_file(tmp_path / kernel / "export" / "model.safetensors"),
        )
    (fused_loss, fused_w), (loop_loss, loop_w) = runs["fused"], runs["foreach"]
    assert len(fused_loss) == 8 and fused_loss[-1] < fused_loss[0]
    torch.testing.assert_close(torch.tensor(fused_loss), torch.tensor(loop_loss), rtol=1e-4, atol=0)
    assert fused_w.keys() == loop_w.keys()
    for key in fused_w:
        torch.testing.assert_close(fused_w[key], loop_w[key], rtol=0, atol=1e-4, msg=key)
    assert any(not torch.equal(fused_w[k], loop_w[k]) for k in fused_w)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_compiled_forward_follows_eager(tmp_path, eight_examples, tiny_model_dir, monkeypatch):
    """``train.compile=true``: inductor really compiles (its cache fills), dropout stays on
    and draws the same masks as eager (``fallback_random``), so the losses agree to 1e-4
    relative and the exported weights (same names: the export is the eager model's) to
    1e-4 absolute."""
    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    common = ("cluster=none", "train.max_steps=4", "train.lr=1e-2", "train.micro_batch_size=8")
    runs = {}
    for name, flag in (("compiled", "true"), ("eager", "false")):
        done = finetune(
            tmp_path / name, eight_examples, tiny_model_dir, f"train.compile={flag}", *common
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = (
            [r["loss"] for r in rows(tmp_path / name)],
            load_file(tmp_path / name / "export" / "model.safetensors"),
        )
        if name == "compiled":
            assert any(p.is_file() for p in cache.rglob("*")), "inductor compiled nothing"
    (c_loss, c_w), (e_loss, e_w) = runs["compiled"], runs["eager"]
    assert len(c_loss) == 4
    torch.testing.assert_close(torch.tensor(c_loss), torch.tensor(e_loss), rtol=1e-4, atol=0)
    assert c_w.keys() == e_w.keys()
    for key in c_w:
        torch.testing.assert_close(c_w[key], e_w[key], rtol=0, atol=1e-4, msg=key)
