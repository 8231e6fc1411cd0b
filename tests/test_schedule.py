"""The learning-rate schedule equals HF transformers' step for step (issue 19): built from
a job config as the trainer builds it, stepped as DeepSpeed steps it, and resumed."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import optimization

from scilm_hpc.config import load_and_validate
from scilm_hpc.train.ds_config import deepspeed_config
from scilm_hpc.train.schedule import StepSchedule, scheduler_factory, warmup_steps

from .conftest import REPO

FINETUNE = REPO / "jobs" / "finetune.yaml"
HF = {
    "linear": optimization.get_linear_schedule_with_warmup,
    "cosine": optimization.get_cosine_schedule_with_warmup,
    "constant": lambda opt, warmup, _total: optimization.get_constant_schedule_with_warmup(
        opt, warmup
    ),
}


def optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def rates(opt: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    """The lr each of ``steps`` optimizer steps runs at (the scheduler stepped after each)."""
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: changes nothing
        scheduler.step()
    return out


def scilm_schedule(total: int, *overrides: str, lr: float = 0.01):
    job = load_and_validate(
        FINETUNE, ["run.dir=runs/unused", f"train.lr={lr}", *overrides], "finetune"
    )
    opt = optimizer(job.train.lr)  # DeepSpeed builds AdamW at train.lr from its config
    factory = scheduler_factory(job, total, deepspeed_config(job, on_gpu=False))
    assert factory is not None
    return opt, factory(opt)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
@pytest.mark.parametrize(("ratio", "total"), [(0.1, 37), (0.25, 8), (0.1, 6), (0.0, 10), (0.1, 1)])
def test_each_step_runs_at_hfs_rate(schedule, ratio, total):
    opt, ours = scilm_schedule(
        total, f"train.schedule={schedule}", f"train.warmup_ratio={ratio}", lr=0.01
    )
    hf_opt = optimizer(0.01)
    hf = HF[schedule](hf_opt, warmup_steps(ratio, total), total)
    expected = rates(hf_opt, hf, total + 2)  # two past the end: both stay at the last rate
    assert rates(opt, ours, total + 2) == pytest.approx(expected, rel=1e-12, abs=0)


def test_a_warm_up_starts_at_0_then_lr_over_warmup():
    """HF's linear warm-up: step 0 at 0, step 1 at lr / warmup (DeepSpeed's WarmupDecayLR
    ran steps 0 and 1 both at 0)."""
    opt, ours = scilm_schedule(40, "train.warmup_ratio=0.1", lr=0.01)  # 4 warm-up steps
    got = rates(opt, ours, 6)
    assert got == pytest.approx([0.0, 0.0025, 0.005, 0.0075, 0.01, 0.01 * 35 / 36])


@pytest.mark.parametrize("after", [1, 3, 7])
def test_resume_continues_at_the_saved_step(after):
    opt, ours = scilm_schedule(10, "train.warmup_ratio=0.3")
    straight = rates(opt, ours, 10)
    opt, first = scilm_schedule(10, "train.warmup_ratio=0.3")
    rates(opt, first, after)
    saved = json.loads(json.dumps(first.state_dict()))  # as the checkpoint state stores it
    opt, resumed = scilm_schedule(10, "train.warmup_ratio=0.3")
    resumed.load_state_dict(saved)
    assert rates(opt, resumed, 10 - after) == straight[after:]
    # a checkpoint of DeepSpeed's own scheduler: after n steps its iteration was n - 1
    opt, old = scilm_schedule(10, "train.warmup_ratio=0.3")
    old.load_state_dict({"last_batch_iteration": after - 1})
    assert rates(opt, old, 10 - after) == straight[after:]


def test_a_users_deepspeed_scheduler_replaces_it(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"scheduler": {"type": "WarmupLR", "params": {}}}))
    job = load_and_validate(
        FINETUNE, ["run.dir=runs/unused", f"zero.config_file={user}"], "finetune"
    )
    config = deepspeed_config(job, on_gpu=False)
    assert config["scheduler"]["type"] == "WarmupLR"
    assert scheduler_factory(job, 10, config) is None


def test_parameter_groups_keep_their_own_base_rate():
    opt = torch.optim.SGD(
        [
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1},
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.2},
        ],
    )
    schedule = StepSchedule(opt, "linear", warmup=2, total=4)
    schedule.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.1])
    assert schedule.get_lr() == pytest.approx([0.05, 0.1])
