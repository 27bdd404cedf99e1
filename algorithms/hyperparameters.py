"""Weight-update hyperparameters: natural values, their unconstrained parametrisation, schedules.

Configs and logs speak natural units. Gradient-based hyperparameter optimisers work on an
unconstrained parametrisation instead, so that no step can leave the valid range:

    lr = 10^a,   weight_decay = 10^c,   momentum = sigmoid(m)

`to_raw` and `to_natural` convert between the two.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from config import OptimiserConfig

NAMES = ("lr", "weight_decay", "momentum")

# name -> (natural -> raw, raw -> natural), on tensors.
TRANSFORMS = {
    "lr": (torch.log10, lambda raw: torch.pow(10.0, raw)),
    "weight_decay": (torch.log10, lambda raw: torch.pow(10.0, raw)),
    "momentum": (torch.logit, torch.sigmoid),
}


def to_raw(name: str, natural: torch.Tensor) -> torch.Tensor:
    return TRANSFORMS[name][0](natural)


def to_natural(name: str, raw: torch.Tensor) -> torch.Tensor:
    return TRANSFORMS[name][1](raw)


def tag(name: str) -> str:
    """TensorBoard tag of a hyperparameter, e.g. weight_decay -> Hyperparameter/Weight_Decay."""
    return f"Hyperparameter/{name.title()}"


class Hyperparameters:
    """The current natural values of lr, weight_decay and momentum, plus the ×LR schedule."""

    def __init__(self, cfg: OptimiserConfig):
        self.values = {name: float(getattr(cfg, name)) for name in NAMES}
        self.lr_multiplier = cfg.lr_multiplier
        self.lr_bounds = cfg.lr_bounds

    def __getitem__(self, name: str) -> float:
        return self.values[name]

    def end_window(self) -> None:
        """After each hyperparameter step: scale lr by the multiplier (if any), clipped to lr_bounds."""
        if self.lr_multiplier is not None:
            low, high = self.lr_bounds
            self.values["lr"] = min(max(self.values["lr"] * self.lr_multiplier, low), high)

    def log_values(self) -> dict[str, float]:
        return {tag(name): value for name, value in self.values.items()}
