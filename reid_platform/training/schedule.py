"""Learning-rate schedules as multiplicative factors of the base lr, per fractional epoch.

    warm-up:   factor rises linearly from `warmup_factor` at epoch 0 to 1 at `warmup_epochs`
    cosine:    then 1 -> `min_factor` along half a cosine, ending at `decay_epochs`
    multistep: or x`gamma` at every milestone passed
    SWA:       a constant `swa_factor` over the last `swa_epochs` epochs

Stepping per iteration with a fractional epoch gives smooth curves even for short runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from reid_platform.config import TrainConfig


@dataclass(frozen=True)
class WarmupSchedule:
    """lr factor as a function of the (fractional) epoch; see the module docstring."""

    epochs: int
    kind: str = "cosine"
    warmup_epochs: float = 10
    warmup_factor: float = 0.01
    milestones: tuple[int, ...] = (40, 70)
    gamma: float = 0.1
    min_factor: float = 0.0
    swa_epochs: int = 0
    swa_factor: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "multistep"):
            raise ValueError(f"train.scheduler={self.kind!r}; choose cosine or multistep")

    @property
    def decay_epochs(self) -> int:
        """Epochs before SWA starts: the cosine reaches its floor here."""
        return max(self.epochs - self.swa_epochs, 1)

    def __call__(self, epoch: float) -> float:
        if self.swa_epochs > 0 and epoch >= self.decay_epochs:
            return self.swa_factor
        if self.warmup_epochs > 0 and epoch < self.warmup_epochs:
            alpha = epoch / self.warmup_epochs
            return self.warmup_factor + (1.0 - self.warmup_factor) * alpha
        if self.kind == "multistep":
            return self.gamma ** sum(epoch >= m for m in self.milestones)
        span = self.decay_epochs - self.warmup_epochs
        progress = min(max((epoch - self.warmup_epochs) / span, 0.0), 1.0) if span > 0 else 1.0
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_factor + (1.0 - self.min_factor) * cosine

    @classmethod
    def from_config(cls, train: TrainConfig) -> WarmupSchedule:
        return cls(
            epochs=train.epochs,
            kind=train.scheduler,
            warmup_epochs=min(train.warmup_epochs, max(train.epochs - train.swa_epochs - 1, 0)),
            warmup_factor=train.warmup_factor,
            milestones=train.milestones,
            gamma=train.gamma,
            min_factor=train.min_lr_factor,
            swa_epochs=train.swa_epochs,
            swa_factor=train.swa_lr_factor,
        )
