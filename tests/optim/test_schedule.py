"""LR schedule: linear warmup to the peak, cosine to min_lr_ratio exactly on the last optimizer step (or constant),
and the scheduler: the lr each optimizer step uses follows that curve, one scheduler step per optimizer step."""

from __future__ import annotations

import pytest
import torch

from kimi_lab.optim import build_optimizer, build_scheduler, lr_multiplier
from tests.helpers import compose_config


@pytest.mark.parametrize(("warmup", "max_steps", "min_ratio"), [(5, 30, 0.1), (0, 10, 0.0), (1, 3, 0.5), (10, 12, 0.2)])
def test_lr_multiplier_shape(warmup, max_steps, min_ratio):
    kw = dict(warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=min_ratio)
    cosine = [lr_multiplier(s, schedule="cosine", **kw) for s in range(max_steps + 3)]
    constant = [lr_multiplier(s, schedule="constant", **kw) for s in range(max_steps + 3)]
    if warmup:
        assert cosine[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
        assert cosine[warmup - 1] == 1.0  # peak reached on the last warmup step
        assert cosine[:warmup] == constant[:warmup]
    assert cosine[warmup] == 1.0  # decay starts from the peak
    assert cosine[max_steps - 1] == min_ratio  # exactly, on the last optimizer step
    decay = cosine[warmup:max_steps]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    if len(decay) > 2:
        assert all(a > b for a, b in zip(decay, decay[1:]))
        mid = warmup + (max_steps - 1 - warmup) / 2
        if mid.is_integer():
            assert cosine[int(mid)] == pytest.approx(min_ratio + (1 - min_ratio) / 2)
    assert cosine[max_steps:] == [min_ratio] * 3  # clamped after the end
    assert constant[warmup:] == [1.0] * (max_steps + 3 - warmup)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_scheduler_counts_optimizer_steps(schedule):
    cfg = compose_config([f"optimizer.schedule={schedule}", "optimizer.warmup_steps=4", "optimizer.min_lr_ratio=0.25",
                          "optimizer.lr=0.01"])
    model = torch.nn.Linear(3, 3)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.optimizer, max_steps=12)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])  # lr used by this optimizer step
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    want = [0.01 * lr_multiplier(s, warmup_steps=4, max_steps=12, min_lr_ratio=0.25, schedule=schedule)
            for s in range(12)]
    assert seen == pytest.approx(want, rel=1e-12)
    assert seen[0] == pytest.approx(0.01 / 4) and seen[3] == pytest.approx(0.01)
    assert seen[-1] == pytest.approx(0.0025 if schedule == "cosine" else 0.01)
    assert all(group["lr"] == optimizer.param_groups[0]["lr"] for group in optimizer.param_groups)
