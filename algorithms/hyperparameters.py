"""Weight-update hyperparameters: natural values, their unconstrained parametrisation, schedules.

Configs and logs speak natural units. Hyperparameter optimisers work on an unconstrained ("raw")
parametrisation instead, so that no step can leave the valid range:

    lr = 10^a,  weight_decay = 10^c,  momentum = sigmoid(m),  beta1 = sigmoid(b1),  beta2 = sigmoid(b2)

Optimised hyperparameters are raw leaf tensors (one per weight tensor, shaped like it, when
high-dimensional); `natural()` maps them through the transforms with autograd, so hypergradients
reach the raw values. The others are constants in natural units.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from onepass.schema import OptimiserConfig, TuningConfig

# name -> (natural -> raw, raw -> natural), on tensors.
_LOG10 = (torch.log10, lambda raw: torch.pow(10.0, raw))
_LOGIT = (torch.logit, torch.sigmoid)
TRANSFORMS = {"lr": _LOG10, "weight_decay": _LOG10, "momentum": _LOGIT, "beta1": _LOGIT, "beta2": _LOGIT}


def to_raw(name: str, natural: torch.Tensor) -> torch.Tensor:
    return TRANSFORMS[name][0](natural)


def to_natural(name: str, raw: torch.Tensor) -> torch.Tensor:
    return TRANSFORMS[name][1](raw)


def tag(name: str) -> str:
    """TensorBoard tag of a hyperparameter, e.g. weight_decay -> Hyperparameter/Weight_Decay."""
    return f"Hyperparameter/{name.title()}"


class Hyperparameters:
    """The hyperparameters of one weight-update rule, as raw leaves (optimised) or constants."""

    def __init__(self, optimiser: OptimiserConfig, tuning: TuningConfig, names: tuple[str, ...],
                 params: list[torch.Tensor]):
        """`names`: the rule's hyperparameters, starting at `optimiser`'s values; those `tuning`
        optimises are raw leaves (per element where it says so), the others constants."""
        self.names = names
        self.optimised = tuple(n for n in names if n in tuning.hyperparameters)
        self.high_dimensional = tuple(tuning.high_dimensional)
        self.lr_multiplier = optimiser.lr_multiplier
        self.lr_bounds = optimiser.lr_bounds
        like = params[0]
        self.constants = {n: float(getattr(optimiser, n)) for n in names if n not in self.optimised}
        self.raw: dict[str, torch.Tensor | list[torch.Tensor]] = {}
        for name in self.optimised:
            raw = to_raw(name, torch.tensor(float(getattr(optimiser, name)), dtype=like.dtype,
                                            device=like.device))
            self.raw[name] = ([torch.full_like(p, raw.item()).requires_grad_() for p in params]
                              if name in self.high_dimensional else raw.requires_grad_())

    def state_dict(self) -> dict:
        return {"raw": [leaf.detach().clone() for leaf in self.leaves()], "constants": dict(self.constants)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state["raw"]:                                     # (fixed hyperparameters have no leaves)
            torch._foreach_copy_(self.leaves(), state["raw"])   # in place: optimisers keep their leaves
        self.constants = dict(state["constants"])

    @torch.no_grad()
    def shift_(self, old: dict[str, float], new: dict[str, float]) -> None:
        """Move every hyperparameter by the change of its starting value from `old` to `new`,
        measured in the raw space it is optimised in (log10, logit). Population-based training
        uses it: a trial that copies another's state continues from that state's values, perturbed
        as its own starting values were."""
        for name in [*self.raw, *self.constants]:
            if new[name] == old[name]:
                continue
            delta = to_raw(name, torch.tensor(new[name], dtype=torch.float64)) - to_raw(
                name, torch.tensor(old[name], dtype=torch.float64))
            if name in self.raw:
                for leaf in self.raw[name] if isinstance(self.raw[name], list) else [self.raw[name]]:
                    leaf += delta.to(leaf.dtype)
            else:
                current = to_raw(name, torch.tensor(self.constants[name], dtype=torch.float64))
                self.constants[name] = float(to_natural(name, current + delta))

    def leaves(self) -> list[torch.Tensor]:
        """The raw tensors a hyper-optimiser steps, in a fixed order."""
        return [leaf for name in self.optimised
                for leaf in (self.raw[name] if isinstance(self.raw[name], list) else [self.raw[name]])]

    def natural(self) -> dict:
        """Natural values, differentiable with respect to the raw leaves (for tracked steps)."""
        values = {}
        for name in self.names:
            raw = self.raw.get(name)
            if raw is None:
                values[name] = self.constants[name]
            else:
                values[name] = [to_natural(name, r) for r in raw] if isinstance(raw, list) else to_natural(name, raw)
        return values

    @torch.no_grad()
    def natural_values(self) -> dict:
        """Natural values without a graph, for the fast path: floats, or tensor lists when
        high-dimensional (one host sync per call)."""
        return {name: value.item() if isinstance(value, torch.Tensor) else value
                for name, value in self.natural().items()}

    @torch.no_grad()
    def clip_(self) -> None:
        """Keep an optimised lr inside lr_bounds (in raw space, after each hyperparameter step)."""
        if "lr" in self.raw:
            low, high = (math.log10(bound) for bound in self.lr_bounds)
            for leaf in self.raw["lr"] if isinstance(self.raw["lr"], list) else [self.raw["lr"]]:
                leaf.clamp_(low, high)

    def end_window(self) -> None:
        """After each hyperparameter step: scale a fixed lr by the multiplier (if any), clipped."""
        if self.lr_multiplier is not None:
            low, high = self.lr_bounds
            self.constants["lr"] = min(max(self.constants["lr"] * self.lr_multiplier, low), high)

    @torch.no_grad()
    def summed_by_tag(self, per_leaf: list[torch.Tensor], prefix: str) -> dict[str, float]:
        """Tensors aligned with `leaves()` (e.g. hypergradients) summed per hyperparameter, as
        `prefix/Name` tags (a high-dimensional one's sum is the derivative for a common shift)."""
        sums, first = {}, 0
        for name, raw in self.raw.items():
            count = len(raw) if isinstance(raw, list) else 1
            sums[f"{prefix}/{name.title()}"] = float(sum(t.sum() for t in per_leaf[first:first + count]))
            first += count
        return sums

    @torch.no_grad()
    def log_values(self) -> dict[str, float]:
        """Natural values for TensorBoard; a high-dimensional one as its mean over all elements."""
        values = {}
        for name, value in self.natural().items():
            if isinstance(value, list):
                flat = torch.cat([v.reshape(-1) for v in value])
                value = flat.mean()
            values[tag(name)] = float(value)
        return values

    @torch.no_grad()
    def histograms(self) -> dict[str, torch.Tensor]:
        """Every element of each high-dimensional hyperparameter (natural values), by tag."""
        return {tag(name): torch.cat([to_natural(name, r).reshape(-1) for r in self.raw[name]])
                for name in self.high_dimensional}
