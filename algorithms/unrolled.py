"""Differentiation through unrolled optimisation (Domke 2012): Diff-through-Opt and its Long variants.

The last R weight steps of each window run on a `higher` monkey-patched copy of the model
(`innerloop_ctx(..., copy_initial_weights=False)`, so the graph starts at the registered
parameters), with the hyperparameters passed as tensors through `override`. The hypergradient is
the exact derivative of the validation loss after those R steps with respect to the raw
hyperparameters. Steps before them take the fast path; after the hyperparameter step the fast
weights and momentum buffers are written back into the model and the graph is dropped.

With `reset_weights`, every window restarts from the initial weights and optimiser state, so each
hyperparameter step differentiates through a whole short training run (Long Diff-through-Opt).
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING

import higher
import torch

from algorithms import distributed
from algorithms.base import GradientHyperOptimiser, Stepper

if TYPE_CHECKING:
    from config import Config
    from datasets import Batch
    from train import Learner


class UnrolledHyperOptimiser(GradientHyperOptimiser):

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        from config import ConfigError
        if cfg.optimiser.name != "sgd":
            raise ConfigError(f"{cfg.algorithm} differentiates through SGD steps with higher: optimiser.name "
                              f"must be sgd, not {cfg.optimiser.name!r}")
        steps = cfg.tuning.unroll_steps
        if steps is not None and steps > cfg.network_weight_steps:
            raise ConfigError(f"tuning.unroll_steps = {steps} exceeds network_weight_steps = "
                              f"{cfg.network_weight_steps}")
        if cfg.tuning.high_dimensional:
            raise ConfigError(f"{cfg.algorithm} tunes scalar hyperparameters only: tuning.high_dimensional "
                              f"must be empty")

    def __init__(self, cfg: Config, learner: Learner):
        super().__init__(cfg, learner)
        self.tracked_steps = cfg.tuning.unroll_steps or cfg.network_weight_steps
        self.reset_weights = cfg.tuning.reset_weights
        self._initial = ([p.detach().clone() for p in learner.params], copy.deepcopy(learner.rule_state))
        self._fast_model: torch.nn.Module | None = None

    def start_window(self, learner: Learner, window: int) -> None:
        if self.reset_weights and window > 0:
            weights, state = self._initial
            with torch.no_grad():
                torch._foreach_copy_(learner.params, weights)
            learner.rule_state = copy.deepcopy(state)

    def state_dict(self) -> dict:
        return super().state_dict() | {"initial": self._initial}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._initial = state["initial"]

    @contextlib.contextmanager
    def tracking(self, learner: Learner) -> Iterator[Stepper]:
        natural = self.hyperparameters.natural()
        torch_sgd = torch.optim.SGD(learner.params, lr=1.0, momentum=0.0)
        for p, buffer in zip(learner.params, learner.rule_state["momentum_buffer"], strict=False):
            torch_sgd.state[p]["momentum_buffer"] = buffer
        override = {name: [natural[name]] for name in ("lr", "weight_decay", "momentum")}
        def global_gradient(grads: list[torch.Tensor]) -> list[torch.Tensor]:
            return learner.global_gradient(list(grads))

        with higher.innerloop_ctx(learner.model, torch_sgd, copy_initial_weights=False,
                                  override=override) as (fast_model, differentiable_sgd):
            def unrolled_step(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
                outputs = learner.forward(fast_model, batch)
                loss = learner.local_loss(outputs, batch)
                differentiable_sgd.step(loss, grad_callback=global_gradient)
                return outputs, loss

            self._fast_model = fast_model
            try:
                yield Stepper(fast_model, unrolled_step)
            finally:
                self._fast_model = None
            with torch.no_grad():
                torch._foreach_copy_(learner.params, [w.detach() for w in fast_model.parameters()])
            buffers = [differentiable_sgd.state[0].get(i, {}).get("momentum_buffer")
                       for i in range(len(learner.params))]
            if all(b is not None for b in buffers):
                learner.rule_state = {"momentum_buffer": [b.detach() for b in buffers]}

    def hypergradient(self, learner: Learner, stepper: Stepper) -> list[torch.Tensor]:
        batch = next(learner.hyper_batches)
        self._fast_model.eval()
        validation_loss = learner.local_loss(learner.forward(self._fast_model, batch), batch)
        leaves = self.hyperparameters.leaves()
        grads = torch.autograd.grad(validation_loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads, strict=True)]
        return distributed.all_reduce_(grads, learner.context)    # each rank held its shard's share
