"""The learning-rate schedule (train/schedule.py): values by hand, and a resume that raises `steps`."""
from __future__ import annotations

import math

import pytest
import torch

from instantfamily_nodes.train.config import ConfigError, TrainConfig
from instantfamily_nodes.train.fit import build_scheduler, load_scheduler_state
from instantfamily_nodes.train.schedule import WarmupConstantCosine


def test_factors_by_hand():
    f = WarmupConstantCosine(warmup=10, steps=100, decay=0.3, floor=0.1)
    # warm-up: (step + 1) / 10; constant to step 70 = 100 * (1 - 0.3); cosine to 0.1 at step 100
    assert [f(s) for s in (0, 4, 9, 10, 69, 70)] == [0.1, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert f(85) == pytest.approx(0.1 + 0.9 * 0.5)                      # half-way: cos(pi / 2) = 0
    assert f(80) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3)))
    assert f(100) == pytest.approx(0.1) and f(150) == pytest.approx(0.1)  # held at the floor past the end
    constant = WarmupConstantCosine(warmup=3)                             # ControlNet's: no decay
    assert [constant(s) for s in (0, 2, 3, 10_000)] == [1 / 3, 1.0, 1.0, 1.0]


def test_bad_fractions_are_refused_naming_the_value():
    with pytest.raises(ValueError, match="decay = 1.5"):
        WarmupConstantCosine(0, 10, decay=1.5)
    with pytest.raises(ValueError, match="floor = -0.1"):
        WarmupConstantCosine(0, 10, decay=0.5, floor=-0.1)
    with pytest.raises(ConfigError, match="'lr_decay' = 2"):
        TrainConfig(lr_decay=2).validate()


def _stepped(cfg: TrainConfig, n: int) -> torch.optim.lr_scheduler.LambdaLR:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(cfg, opt)
    for _ in range(n):
        opt.step()
        sched.step()
    return sched


def test_a_resume_with_more_steps_ends_the_decay_at_the_new_last_step():
    saved = _stepped(TrainConfig(steps=10, lr_decay=0.5), 4).state_dict()
    longer = _stepped(TrainConfig(steps=20, lr_decay=0.5), 0)
    load_scheduler_state(longer, saved)
    assert longer.last_epoch == 4
    # the 20-step schedule is still constant at step 5; the saved 10-step one would already be falling
    assert longer.lr_lambdas[0].steps == 20 and longer.lr_lambdas[0](5) == 1.0
    opt = longer.optimizer
    for _ in range(11):
        opt.step()
        longer.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.55)     # step 15 of 20: half-way down to 0.1
