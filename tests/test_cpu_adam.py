"""Resume with DeepSpeed's CPU Adam (``zero.offload_optimizer=true``) is bit-exact.

Uses the real op (JIT-built by DeepSpeed on first use, cached in
``~/.cache/torch_extensions``; about 3 min to build on this 2-core machine).
"""

from __future__ import annotations

import pytest
import torch

from scilm_hpc.train.cpu_adam import replay_steps, restored_step


def cpu_adam(weights: torch.Tensor):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    param = torch.nn.Parameter(weights.clone())
    return param, DeepSpeedCPUAdam([param], lr=1e-2, weight_decay=0.01)


def train(param: torch.nn.Parameter, optimizer, steps: range) -> None:
    for step in steps:
        param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(step))
        optimizer.step()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_cpu_adam_resumed_from_its_state_dict_continues_bit_exactly():
    start = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    param, optimizer = cpu_adam(start)
    train(param, optimizer, range(5))
    straight = param.detach().clone()

    param, optimizer = cpu_adam(start)
    train(param, optimizer, range(2))  # step 3 is the first whose beta2**3 differs in fp32
    saved, weights = optimizer.state_dict(), param.detach().clone()

    def resumed(realign: bool) -> torch.Tensor:
        param, optimizer = cpu_adam(weights)
        optimizer.load_state_dict(saved)
        assert restored_step(optimizer) == 2
        if realign:
            assert replay_steps(optimizer) == 2
        train(param, optimizer, range(2, 5))
        return param.detach()

    assert torch.equal(resumed(realign=True), straight)
    # what the realignment fixes: without it the first resumed step is a few ulps off
    assert not torch.equal(resumed(realign=False), straight)
