"""The learning-rate schedule of the trainer and of the world base: linear warm-up, constant, then an
optional cosine fall to ``floor`` x over the last ``decay`` fraction of the steps.

``decay = 0`` is ControlNet's schedule (warm-up, then constant: what the paper's recipe uses). The world
base ends on a fall (``synthetic/base.py``); for `train fit` on the world it measured no gain (README, "How
the numbers got here"), so the trainer's default stays constant.
"""
from __future__ import annotations

import math


class WarmupConstantCosine:
    """LR factor for ``torch.optim.lr_scheduler.LambdaLR`` (a class, not a closure, so schedulers pickle and
    their state dict holds these fields)."""

    def __init__(self, warmup: int, steps: int = 0, decay: float = 0.0, floor: float = 0.1):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay = {decay!r}: must be in [0, 1] (the fraction of the steps the rate falls over)")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor = {floor!r}: must be in [0, 1] (the last step's factor)")
        self.warmup = int(warmup)
        self.steps = int(steps)
        self.decay = float(decay)
        self.floor = float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        start = int(self.steps * (1.0 - self.decay))
        if self.decay <= 0.0 or step < start:
            return 1.0
        p = min(1.0, (step - start) / max(1, self.steps - start))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * p))
