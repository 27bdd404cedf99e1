"""Learning-rate-free optimisers that researchers reach for instead of tuning a learning rate, from
their own packages, as weight-update rules of fixed-hyperparameter runs (`tuning.method: fixed`):

    prodigy      Prodigy (prodigyopt): Adam whose step size d is estimated as it trains
    dadapt_sgd   D-Adaptation, SGD form (dadaptation)
    dadapt_adam  D-Adaptation, Adam form (dadaptation)
    sf_sgd       Schedule-Free SGD (schedulefree)
    sf_adamw     Schedule-Free AdamW (schedulefree)

A peer rule steps the package's own optimiser (its code, not a re-implementation) on the gradient
the loop hands every rule: summed over ranks, clipped when configured. The config's values are
written into the optimiser's parameter group before every step, as its `step` reads them there.
A peer has no differentiable form, so no one-pass method can tune it; and its state is the
package's optimiser object, which checkpoints do not cover. Schedule-Free trains at one sequence
of weights and is measured at another (its average): `measuring` switches to the evaluation
weights for every measurement and back.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

INSTALL = "make peers (or pip install -e '.[peers]')"


@dataclass(frozen=True)
class PeerRule:
    package: str                  # the PyPI package, which is also its import name
    optimiser: str                # its optimiser class
    hyperparameters: tuple[str, ...]
    group: Callable[[dict], dict]     # the config's values -> the parameter group's settings
    effective_lr: Callable[[dict], float]      # the step size it reached, from its parameter group
    schedule_free: bool = False
    differentiable = False
    checkpointable = False      # its state is the package's optimiser object

    def available(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def init_state(self, params: list[torch.Tensor]) -> dict:
        with contextlib.redirect_stdout(io.StringIO()):     # Prodigy prints its weight-decay mode
            optimiser = getattr(importlib.import_module(self.package), self.optimiser)(params)
        if self.schedule_free:
            optimiser.train()
        return {"optimiser": optimiser}

    @torch.no_grad()
    def update_(self, params: list[torch.Tensor], grads: list[torch.Tensor], state: dict, hp: dict) -> None:
        optimiser = state["optimiser"]
        for group in optimiser.param_groups:
            group.update(self.group(hp))
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        optimiser.step()
        for param in params:
            param.grad = None

    def logged(self, state: dict) -> dict[str, float]:
        """The step size the optimiser reached, as a hyperparameter tag."""
        return {"Hyperparameter/Effective_Lr": float(self.effective_lr(state["optimiser"].param_groups[0]))}

    @contextlib.contextmanager
    def measuring(self, state: dict) -> Iterator[None]:
        """Schedule-Free's evaluation weights while measuring; nothing to switch for the others."""
        if not self.schedule_free:
            yield
            return
        state["optimiser"].eval()
        try:
            yield
        finally:
            state["optimiser"].train()


def _adam_like(hp: dict) -> dict:
    return {"lr": hp["lr"], "weight_decay": hp["weight_decay"], "betas": (hp["beta1"], hp["beta2"])}


def _sgd_like(hp: dict) -> dict:
    return {"lr": hp["lr"], "weight_decay": hp["weight_decay"], "momentum": hp["momentum"]}


def _estimated(group: dict) -> float:
    return group["d"] * group["lr"]


def _scheduled(group: dict) -> float:
    return group["scheduled_lr"]


ADAM_LIKE, SGD_LIKE = ("lr", "weight_decay", "beta1", "beta2"), ("lr", "weight_decay", "momentum")
PEERS = {
    "prodigy": PeerRule("prodigyopt", "Prodigy", (*ADAM_LIKE, "d_coef"),
                        lambda hp: _adam_like(hp) | {"d_coef": hp["d_coef"]}, _estimated),
    "dadapt_sgd": PeerRule("dadaptation", "DAdaptSGD", SGD_LIKE, _sgd_like, _estimated),
    "dadapt_adam": PeerRule("dadaptation", "DAdaptAdam", ADAM_LIKE, _adam_like, _estimated),
    "sf_sgd": PeerRule("schedulefree", "SGDScheduleFree", (*SGD_LIKE, "warmup_steps"),
                       lambda hp: _sgd_like(hp) | {"warmup_steps": int(hp["warmup_steps"])}, _scheduled, True),
    "sf_adamw": PeerRule("schedulefree", "AdamWScheduleFree", (*ADAM_LIKE, "warmup_steps"),
                         lambda hp: _adam_like(hp) | {"warmup_steps": int(hp["warmup_steps"])}, _scheduled, True),
}
