"""Faster Neumann-series hypergradients for the implicit algorithms (Ours, Lorraine): variants, timed.

    .venv/bin/python bench/bench_neumann.py [--variants NAME ...] [--calls N] [--rounds N] [--runs N]
                                            [--terms I] [--skip-compile] [--skip-runs]

A full run takes about 2-4 minutes on 2 cores (most of it compiling, and the whole runs).

What it measures, on UCI Energy with Ours_LR_Momentum (configs/uci_energy.yaml +
configs/Ours_LR_Momentum.yaml: 8-50-1 ReLU MLP, full batch, T = 10, i = 5, 400 windows):

1. Correctness, in float64: each variant's hypergradient (and the new weights and momentum
   buffer) against the current implementation (`ImplicitHyperOptimiser` from its tracked step to
   its hypergradient), at several points of a run, to rtol 1e-12 (atol 0); and a whole float64 run
   with the compiled window end against one of the current implementation.
2. The end of an implicit window in float32 (the run's precision): the tracked last weight step,
   the validation gradient, the i - 1 Neumann products and the product into the raw
   hyperparameters, for the current implementation and each variant, interleaved in rounds;
   median seconds per call. The bare window ratio is (9 fast steps + end) / (10 fast steps).
3. Whole runs (`Learner.run()`, 4000 steps, TensorBoard file written), interleaved: Random, Ours
   as it is, and Ours with the compiled window end in place of its tracked step and hypergradient;
   the projected whole-run ratio of every variant is Ours' run less 400 times the end-of-window
   time it saves. Timers around the methods of the Learner, its Meter and its hyperparameters show
   where the rest of a window goes (the held-out measurement, scalars and log events, the
   hyper-optimiser step, hyperparameter values).
4. Compile time of the compiled window end: its first call in a fresh process, with an empty
   inductor cache and then with that cache warm.

Variants: reference (the current algorithm as a pure function), flat (one weight vector), split
(update VJP + Hessian-vector product through the gradient only), functorch and forward_ad
(forward-over-reverse products), func_vjp (one torch.func.vjp of the step, reused), compiled and
compiled_forward (the solve by torch.compile), compiled_window and compiled_window_cpp (step,
validation gradient and solve as one compiled graph; the latter with inductor's C++ wrapper).

Every variant has the signature `neumann_hypergradient_<name>(problem, validation_gradient, terms)`
-> `Result`: `problem` is a `TrackedStep` (the training loss as a pure function of the weights,
the update rule, the raw hyperparameter leaves, the weights and rule state before the step),
`validation_gradient(new_weights)` writes the new weights into the model and returns dL_V/dw at
them, and `terms` is i (the compiled window variants take the validation batch instead of the
callback). Timings on a shared machine swing: compare ratios from one run.
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.autograd import forward_ad
from torch.func import functional_call

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script, Python puts bench/ (not the repo root) on sys.path

import config  # noqa: E402
import measure  # noqa: E402
import train  # noqa: E402
import util  # noqa: E402
from algorithms.hyperparameters import to_natural  # noqa: E402
from algorithms.implicit import ImplicitHyperOptimiser  # noqa: E402
from algorithms.steps import Step, Weights  # noqa: E402
from algorithms.weight_update import clip_gradient_norm, detached  # noqa: E402
from datasets import Batch  # noqa: E402

Tensors = list[torch.Tensor]


# -- the problem a variant solves ------------------------------------------------------------------

@dataclass
class TrackedStep:
    """The last weight step of a window, as pure functions.

    loss(weights, inputs, targets): the training loss of the step's batch (the data are arguments,
        so that the functions stay the same from window to window, as torch.compile's guards need,
        and forward-mode transforms can give the targets a materialised zero tangent).
    update(weights, grads, state, hyper) -> (new weights, new state): the rule's differentiable
        `update`, gradient clipping included.
    natural(leaves) -> hyper: the natural hyperparameters from the raw leaves, differentiable.
    """
    loss: Callable[[Tensors, torch.Tensor, torch.Tensor], torch.Tensor]
    inputs: torch.Tensor
    targets: torch.Tensor
    update: Callable[[Tensors, Tensors, dict, dict], tuple[Tensors, dict]]
    natural: Callable[[Tensors], dict]
    leaves: Tensors
    weights: Tensors
    state: dict
    elementwise: bool = True       # the update acts on each element alone (no gradient clipping)
    shapes: list[torch.Size] = field(init=False)

    def __post_init__(self) -> None:
        self.shapes = [w.shape for w in self.weights]

    def step(self, weights: Tensors, hyper: dict, create_graph: bool) -> tuple[Tensors, dict]:
        """step(weights, hyper): the new weights (and state) of one weight step."""
        grads = list(torch.autograd.grad(self.training_loss(weights), weights, create_graph=create_graph))
        return self.update(weights, grads, self.state, hyper)

    def training_loss(self, weights: Tensors) -> torch.Tensor:
        return self.loss(weights, self.inputs, self.targets)

    def views(self, flat: torch.Tensor) -> Tensors:
        return [chunk.view(shape) for chunk, shape in zip(flat.split([s.numel() for s in self.shapes]), self.shapes,
                                                           strict=True)]


@dataclass
class Result:
    weights: Tensors              # after the step, detached
    state: dict                   # the rule's state after the step, detached
    hypergradient: Tensors        # d L_V / d leaf, one per leaf
    loss: torch.Tensor | None = None   # the step's training loss, where a variant computes it anyway


def _hypergradient(after: Tensors | torch.Tensor, leaves: Tensors, total: Tensors | torch.Tensor) -> Tensors:
    grads = torch.autograd.grad(after, leaves, grad_outputs=total, allow_unused=True)
    return [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads, strict=True)]


def _flat_state(state: dict) -> dict:
    return {key: [torch.cat([v.reshape(-1) for v in value])] if isinstance(value, (list, tuple)) and value else value
            for key, value in state.items()}


def _unflat_state(state: dict, problem: TrackedStep) -> dict:
    return {key: problem.views(value[0].detach()) if isinstance(value, (list, tuple)) and value else value
            for key, value in state.items()}


# -- variants ---------------------------------------------------------------------------------------

def neumann_hypergradient_reference(problem: TrackedStep, validation_gradient: Callable[[Tensors], Tensors],
                                    terms: int) -> Result:
    """The current algorithm as a pure function: reverse-over-reverse, i - 1 VJPs through the
    graph of the whole step (built with create_graph), over lists of tensors."""
    before = [w.detach().clone().requires_grad_() for w in problem.weights]
    after, state = problem.step(before, problem.natural(problem.leaves), create_graph=terms > 1)
    term = validation_gradient([a.detach() for a in after])
    total = list(term)
    for _ in range(terms - 1):
        term = list(torch.autograd.grad(after, before, grad_outputs=term, retain_graph=True))
        torch._foreach_add_(total, term)
    return Result([a.detach() for a in after], detached(state), _hypergradient(after, problem.leaves, total))


def neumann_hypergradient_flat(problem: TrackedStep, validation_gradient: Callable[[Tensors], Tensors],
                               terms: int) -> Result:
    """Reverse-over-reverse, with all weights as one flat vector: the update's elementwise nodes
    and every autograd call act on one tensor instead of one per parameter."""
    before = torch.cat([w.detach().reshape(-1) for w in problem.weights]).requires_grad_()
    (grad,) = torch.autograd.grad(problem.training_loss(problem.views(before)), before,
                                  create_graph=terms > 1)
    (after,), state = problem.update([before], [grad], _flat_state(problem.state), problem.natural(problem.leaves))
    term = torch.cat([g.reshape(-1) for g in validation_gradient(problem.views(after.detach()))])
    total = term.clone()
    for _ in range(terms - 1):
        (term,) = torch.autograd.grad(after, before, grad_outputs=term, retain_graph=True)
        total += term
    return Result(problem.views(after.detach()), _unflat_state(state, problem),
                  _hypergradient(after, problem.leaves, total))


def _split_step(problem: TrackedStep, create_graph: bool) -> tuple[Tensors, Tensors, Tensors, Tensors, dict]:
    """The step with the update cut from the gradient's graph: (weights, their gradient, the update
    evaluated on detached copies of both, those copies, new state). The product through the step
    is then v^T J = v^T du_w + (v^T du_g) H, H the symmetric Hessian of the training loss."""
    before = [w.detach().clone().requires_grad_() for w in problem.weights]
    grads = list(torch.autograd.grad(problem.training_loss(before), before, create_graph=create_graph))
    cut = [g.detach().requires_grad_() for g in grads]
    after, state = problem.update(before, cut, problem.state, problem.natural(problem.leaves))
    return before, grads, after, cut, state


def neumann_hypergradient_split(problem: TrackedStep, validation_gradient: Callable[[Tensors], Tensors],
                                terms: int) -> Result:
    """Reverse-over-reverse through the gradient's graph only: each product is a first-order VJP
    through the update (into the weights and the gradient) and a Hessian-vector product by double
    backward of the gradient."""
    before, grads, after, cut, state = _split_step(problem, create_graph=terms > 1)
    term = validation_gradient([a.detach() for a in after])
    total = list(term)
    n = len(before)
    for _ in range(terms - 1):
        products = torch.autograd.grad(after, before + cut, grad_outputs=term, retain_graph=True)
        hessian = torch.autograd.grad(grads, before, grad_outputs=products[n:], retain_graph=True)
        term = torch._foreach_add(list(products[:n]), list(hessian))
        torch._foreach_add_(total, term)
    return Result([a.detach() for a in after], detached(state), _hypergradient(after, problem.leaves, total))


def _hvp_functorch(problem: TrackedStep, weights: Tensors, tangent: Tensors | tuple) -> Tensors:
    """H t by forward-over-reverse with torch.func. The targets get a materialised zero tangent:
    without one, mse_loss's backward meets an immutable ZeroTensor in torch 2.13."""
    zero = torch.zeros_like(problem.targets)
    def gradient(weights: tuple, targets: torch.Tensor) -> tuple:
        return torch.func.grad(problem.loss)(weights, problem.inputs, targets)
    _, product = torch.func.jvp(gradient, (tuple(weights), problem.targets), (tuple(tangent), zero))
    return list(product)


def _hvp_forward_ad(problem: TrackedStep, weights: Tensors, tangent: Tensors | tuple) -> Tensors:
    """H t by forward-over-reverse with torch.autograd.forward_ad (dual tensors) around a plain
    autograd.grad; the same zero-tangent workaround for the targets."""
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(w.requires_grad_(), t) for w, t in zip(weights, tangent, strict=True)]
        targets = forward_ad.make_dual(problem.targets, torch.zeros_like(problem.targets))
        grads = torch.autograd.grad(problem.loss(duals, problem.inputs, targets), duals)
        return [forward_ad.unpack_dual(g).tangent for g in grads]


def _forward_over_reverse(hvp: Callable[[TrackedStep, Tensors, Tensors], Tensors], problem: TrackedStep,
                          validation_gradient: Callable[[Tensors], Tensors], terms: int) -> Result:
    before, _, after, cut, state = _split_step(problem, create_graph=False)
    weights = [w.detach() for w in before]      # (fresh tensors: the dual route marks them requires_grad)
    term = validation_gradient([a.detach() for a in after])
    total = list(term)
    n = len(before)
    for _ in range(terms - 1):
        products = torch.autograd.grad(after, before + cut, grad_outputs=term, retain_graph=True)
        term = torch._foreach_add(list(products[:n]), hvp(problem, weights, products[n:]))
        torch._foreach_add_(total, term)
    return Result([a.detach() for a in after], detached(state), _hypergradient(after, problem.leaves, total))


def neumann_hypergradient_functorch(problem: TrackedStep, validation_gradient: Callable[[Tensors], Tensors],
                                    terms: int) -> Result:
    """Forward-over-reverse: the step's gradient without create_graph; each product is a
    first-order VJP through the update and torch.func.jvp(torch.func.grad(loss)) for H t."""
    return _forward_over_reverse(_hvp_functorch, problem, validation_gradient, terms)


def neumann_hypergradient_forward_ad(problem: TrackedStep, validation_gradient: Callable[[Tensors], Tensors],
                                     terms: int) -> Result:
    """Forward-over-reverse with dual tensors (torch.autograd.forward_ad) instead of torch.func."""
    return _forward_over_reverse(_hvp_forward_ad, problem, validation_gradient, terms)


def neumann_hypergradient_func_vjp(problem: TrackedStep, validation_gradient: Callable[[Tensors], Tensors],
                                   terms: int) -> Result:
    """Reverse-over-reverse with torch.func: one torch.func.vjp of the whole step (gradient by
    torch.func.grad inside), its VJP function reused for all i - 1 products; then one more
    torch.func.vjp into the raw hyperparameters."""
    weights = tuple(w.detach().clone() for w in problem.weights)   # (the model's are overwritten)
    with torch.no_grad():
        hyper = problem.natural(problem.leaves)
        grads = list(torch.func.grad(problem.loss)(list(weights), problem.inputs, problem.targets))
        after, state = problem.update(list(weights), grads, problem.state, hyper)

    def step(*weights: torch.Tensor) -> tuple:
        gradient = torch.func.grad(problem.loss)(list(weights), problem.inputs, problem.targets)
        return tuple(problem.update(list(weights), gradient, problem.state, hyper)[0])
    term = tuple(validation_gradient(after))
    total = list(term)
    if terms > 1:
        _, step_vjp = torch.func.vjp(step, *weights)
        for _ in range(terms - 1):
            term = step_vjp(term)
            torch._foreach_add_(total, term)

    def by_leaves(*leaves: torch.Tensor) -> tuple:
        return tuple(problem.update(list(weights), grads, problem.state, problem.natural(list(leaves)))[0])
    _, leaves_vjp = torch.func.vjp(by_leaves, *problem.leaves)
    return Result(after, detached(state), list(leaves_vjp(tuple(total))))


def functional_neumann(loss: Callable, update: Callable, natural: Callable, weights: Tensors, grads: Tensors,
                       state: dict, leaves: Tensors, inputs: torch.Tensor, targets: torch.Tensor,
                       validation_gradient: Tensors, terms: int, forward_over_reverse: bool = False) -> Tensors:
    """The Neumann solve as one pure function of tensors, for torch.compile: p = sum_j v^T J^j with
    v^T J = v^T du_w + H (v^T du_g) (the update's VJP by torch.func.vjp, built once; Hessian-vector
    products by the VJP of torch.func.grad, built once so that the forward and backward pass are
    computed once, or forward-over-reverse, which recomputes them for every product), then
    p^T dw_t/dlambda by torch.func.vjp into the leaves."""
    hyper = natural(leaves)
    zero = torch.zeros_like(targets)

    def new_weights(weights: tuple, grads: tuple) -> tuple:
        return tuple(update(list(weights), list(grads), state, hyper)[0])

    def gradient(weights: tuple, targets: torch.Tensor) -> tuple:
        return tuple(torch.func.grad(loss)(list(weights), inputs, targets))

    def by_leaves(leaves: tuple) -> tuple:
        return tuple(update(weights, grads, state, natural(list(leaves)))[0])

    term = tuple(validation_gradient)
    total = list(term)
    if terms > 1:
        _, update_vjp = torch.func.vjp(new_weights, tuple(weights), tuple(grads))
        if not forward_over_reverse:
            _, gradient_vjp = torch.func.vjp(lambda weights: gradient(weights, targets), tuple(weights))
        for _ in range(terms - 1):
            direct, through_gradient = update_vjp(term)
            if forward_over_reverse:
                _, hessian = torch.func.jvp(gradient, (tuple(weights), targets), (through_gradient, zero))
            else:
                (hessian,) = gradient_vjp(through_gradient)
            term = tuple(a + b for a, b in zip(direct, hessian, strict=True))
            total = [a + b for a, b in zip(total, term, strict=True)]
    _, leaves_vjp = torch.func.vjp(by_leaves, tuple(leaves))
    return list(leaves_vjp(tuple(total))[0])


_compiled: dict[bool | str, Callable] = {}


def _lists(state: dict) -> dict:
    """The rule state with lists for its per-parameter sequences (the fast path leaves tuples after
    its first step): one container type, so compiled code is not guarded into a recompile."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in state.items()}


def _neumann_compiled(problem: TrackedStep, validation_gradient: Callable[[Tensors], Tensors], terms: int,
                      forward_over_reverse: bool) -> Result:
    if forward_over_reverse not in _compiled:
        _compiled[forward_over_reverse] = torch.compile(functional_neumann, fullgraph=True, dynamic=False)
    weights = [w.detach().clone().requires_grad_() for w in problem.weights]   # (the model's are overwritten)
    grads = list(torch.autograd.grad(problem.training_loss(weights), weights))
    weights = [w.detach() for w in weights]
    with torch.no_grad():
        after, state = problem.update(weights, grads, problem.state, problem.natural(problem.leaves))
    v = validation_gradient(after)
    with torch.no_grad():       # (an inference graph: no backward of the solve is compiled)
        hypergradient = _compiled[forward_over_reverse](
            problem.loss, problem.update, problem.natural, weights, grads, _lists(problem.state), problem.leaves,
            problem.inputs, problem.targets, v, terms, forward_over_reverse)
    return Result(after, detached(state), hypergradient)


def neumann_hypergradient_compiled(problem: TrackedStep, validation_gradient: Callable[[Tensors], Tensors],
                                   terms: int) -> Result:
    """The step eagerly without a graph (as a fast step), the validation gradient eagerly, then
    `functional_neumann` (reverse-over-reverse) compiled by torch.compile (inductor, whole graph;
    compiled at the first call, and again for a new dtype or the first window's empty momentum buffer)."""
    return _neumann_compiled(problem, validation_gradient, terms, forward_over_reverse=False)


def neumann_hypergradient_compiled_forward(problem: TrackedStep, validation_gradient: Callable[[Tensors], Tensors],
                                           terms: int) -> Result:
    """As `neumann_hypergradient_compiled`, with forward-over-reverse Hessian-vector products."""
    return _neumann_compiled(problem, validation_gradient, terms, forward_over_reverse=True)

def functional_window_end(loss: Callable, update: Callable, natural: Callable, weights: Tensors, state: dict,
                          leaves: Tensors, inputs: torch.Tensor, targets: torch.Tensor,
                          validation_inputs: torch.Tensor, validation_targets: torch.Tensor,
                          terms: int) -> tuple[Tensors, dict, Tensors, torch.Tensor]:
    """The whole end of a window as one pure function: the step's gradient, the update, the
    validation gradient at the new weights (the same `loss`, so in the model's current mode) and
    `functional_neumann`; returns (new weights, new state, hypergradient, training loss)."""
    grads, value = torch.func.grad_and_value(loss)(weights, inputs, targets)
    after, new_state = update(weights, grads, state, natural(leaves))
    v = torch.func.grad(loss)(after, validation_inputs, validation_targets)
    return after, new_state, functional_neumann(loss, update, natural, weights, grads, state, leaves, inputs, targets,
                                                v, terms), value


def neumann_hypergradient_compiled_window(problem: TrackedStep, validation_batch: tuple[torch.Tensor, torch.Tensor],
                                          terms: int, cpp_wrapper: bool = False) -> Result:
    """`functional_window_end` compiled as one graph: the step, the validation gradient and the
    solve in one call. It takes the validation batch instead of a callback and evaluates the
    validation loss in the model's training mode: valid for models without dropout or BatchNorm.
    `cpp_wrapper`: inductor calls the graph's kernels from generated C++ instead of Python."""
    key = f"window, cpp_wrapper={cpp_wrapper}"
    if key not in _compiled:
        _compiled[key] = torch.compile(functional_window_end, fullgraph=True, dynamic=False,
                                       options={"cpp_wrapper": cpp_wrapper})
    with torch.no_grad():
        after, state, hypergradient, loss = _compiled[key](
            problem.loss, problem.update, problem.natural, [w.detach() for w in problem.weights], _lists(problem.state),
            problem.leaves, problem.inputs, problem.targets, *validation_batch, terms)
    return Result(after, detached(state), hypergradient, loss)


def neumann_hypergradient_compiled_window_cpp(problem: TrackedStep,
                                              validation_batch: tuple[torch.Tensor, torch.Tensor],
                                              terms: int) -> Result:
    """`neumann_hypergradient_compiled_window` with inductor's C++ wrapper."""
    return neumann_hypergradient_compiled_window(problem, validation_batch, terms, cpp_wrapper=True)


neumann_hypergradient_compiled_window.takes_validation_batch = True
neumann_hypergradient_compiled_window_cpp.takes_validation_batch = True


VARIANTS: dict[str, Callable[[TrackedStep, Callable[[Tensors], Tensors], int], Result]] = {
    "reference": neumann_hypergradient_reference,
    "flat": neumann_hypergradient_flat,
    "split": neumann_hypergradient_split,
    "functorch": neumann_hypergradient_functorch,
    "forward_ad": neumann_hypergradient_forward_ad,
    "func_vjp": neumann_hypergradient_func_vjp,
    "compiled": neumann_hypergradient_compiled,
    "compiled_forward": neumann_hypergradient_compiled_forward,
    "compiled_window": neumann_hypergradient_compiled_window,
    "compiled_window_cpp": neumann_hypergradient_compiled_window_cpp,
}


# -- the Learner side ---------------------------------------------------------------------------------

def make_learner(algorithm: str, dtype: str, log_root: str | None = None, log: util.RunLog | None = None
                 ) -> train.Learner:
    overrides = ["seed=0", f"dtype={dtype}", "optimiser.weight_decay=1e-4"]
    if log_root is not None:
        overrides.append(f"log_root={log_root}")
    cfg = config.load_from([str(REPO / "configs/uci_energy.yaml"), str(REPO / f"configs/{algorithm}.yaml")],
                           overrides=overrides)
    return train.Learner(train.prepare(cfg), log)


def tracked_step(learner: train.Learner, batch: Batch | None = None, weights: Tensors | None = None,
                 state: dict | None = None) -> TrackedStep:
    """A weight step of the Learner on `batch` (default: its next training batch, counted as a
    step) from `weights` and `state` (default: the model's parameters and the Learner's rule
    state), as a TrackedStep; its functions are built once per Learner."""
    hyperparameters = learner.hyperparameters
    assert not hyperparameters.high_dimensional, "per-element hyperparameters are not handled here"
    if batch is None:
        batch = next(learner.train_batches)
        learner.steps_done += 1
    assert batch.fraction == 1.0 and batch.carry is None, "one process, feed-forward models only"
    if not learner.model.training:
        learner.model.train()
    if not hasattr(learner, "pure_functions"):
        learner.pure_functions = pure_functions(learner)
    loss, update, natural = learner.pure_functions
    return TrackedStep(loss, batch.inputs, batch.targets, update, natural, hyperparameters.leaves(),
                       learner.params if weights is None else weights,
                       learner.rule_state if state is None else state,
                       elementwise=learner.cfg.optimiser.gradient_clip is None)


def pure_functions(learner: train.Learner) -> tuple[Callable, Callable, Callable]:
    """The training loss, the update rule and the hyperparameters' transforms of a Learner as pure
    functions (full batches only: the loss is scaled by the whole batch's fraction, 1)."""
    hyperparameters, model, names = learner.hyperparameters, learner.model, learner.names
    loss_fn, clip, rule = learner.loss_fn, learner.cfg.optimiser.gradient_clip, learner.rule

    def loss(weights: Tensors, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, dict(zip(names, weights, strict=True)), (inputs,)), targets) * 1.0

    def update(weights: Tensors, grads: Tensors, state: dict, hyper: dict) -> tuple[Tensors, dict]:
        return rule.update(weights, clip_gradient_norm(grads, clip), state, hyper)

    def natural(leaves: Tensors) -> dict:
        values = dict(hyperparameters.constants)
        values.update({name: to_natural(name, leaf) for name, leaf in zip(hyperparameters.optimised, leaves,
                                                                          strict=True)})
        return values

    return loss, update, natural


def validation_gradient_of(learner: train.Learner) -> Callable[[Tensors], Tensors]:
    """As ImplicitHyperOptimiser does: write the new weights into the model, then dL_V/dw on the
    next validation batch, in eval mode."""
    def validation_gradient(weights: Tensors) -> Tensors:
        with torch.no_grad():
            torch._foreach_copy_(learner.params, weights)
        batch = next(learner.hyper_batches)
        learner.model.eval()
        loss = measure.local_loss(learner.loss_fn, measure.forward(learner.model, batch), batch)
        return list(torch.autograd.grad(loss, learner.params))
    return validation_gradient


def tracked_last_step(learner: train.Learner) -> Step:
    """The current implementation's tracked last step of a window, as the loop takes it
    (`Learner._tracked_steps` with one tracked step, without its measuring and logging): through
    `algorithm.track` from detached copies of the weights, which the model's parameters then follow."""
    weights = [p.detach().clone().requires_grad_() for p in learner.params]
    last, _ = learner.weight_step(functools.partial(learner.algorithm.track, weights, learner.rule_state))
    with torch.no_grad():
        torch._foreach_copy_(learner.params, last.weights)
    return last


def end_current(learner: train.Learner) -> Tensors:
    """The current implementation: the tracked last step of a window and its hypergradient (on
    the next validation batch, as the loop draws it); the new rule state kept, detached."""
    last = tracked_last_step(learner)
    hypergradient = learner.algorithm.hypergradient(last, next(learner.hyper_batches))
    learner.rule_state = detached(last.rule_state)
    return hypergradient


def finish_window(learner: train.Learner) -> None:
    """The tracked last step and the hyperparameter step, as the loop ends a window."""
    last = tracked_last_step(learner)
    learner.algorithm.hyper_step(last, next(learner.hyper_batches))
    learner.rule_state = detached(last.rule_state)


def end_variant(learner: train.Learner, variant: Callable, terms: int) -> Tensors:
    """The same through a variant: the new weights written into the model, the new rule state kept."""
    if getattr(variant, "takes_validation_batch", False):
        problem = tracked_step(learner)
        batch = next(learner.hyper_batches)
        result = variant(problem, (batch.inputs, batch.targets), terms)
        with torch.no_grad():
            torch._foreach_copy_(learner.params, result.weights)
    else:
        result = variant(tracked_step(learner), validation_gradient_of(learner), terms)
    learner.rule_state = result.state
    return result.hypergradient


# -- correctness ------------------------------------------------------------------------------------

def advance_window(learner: train.Learner) -> None:
    """One whole window of the current implementation (9 fast steps, tracked step, hyper step)."""
    learner.fast_hyperparameters = learner.hyperparameters.natural_values()
    for _ in range(learner.cfg.network_weight_steps - 1):
        learner.weight_step(learner.fast_step)
    finish_window(learner)


def check(variants: dict[str, Callable], terms: int, points: tuple[int, ...] = (0, 1, 5, 40)) -> dict[str, float]:
    """Largest relative difference of each variant's hypergradient, new weights and new state
    from the current implementation's, in float64, at the start of the windows in `points`;
    raises if any exceeds 1e-12."""
    learner = make_learner("Ours_LR_Momentum", "float64")
    learner.algorithm.rollback_distance = terms
    worst = dict.fromkeys(variants, 0.0)
    for window in range(max(points) + 1):
        if window in points:
            for _ in range(learner.cfg.network_weight_steps - 1):   # the window's fast steps
                learner.weight_step(learner.fast_step)
            snapshot = copy.deepcopy(learner.state_dict())
            expected = [t.detach().clone() for t in end_current(learner)]
            expected += [p.detach().clone() for p in learner.params] + list(learner.rule_state["momentum_buffer"])
            for name, variant in variants.items():
                learner.load_state_dict(copy.deepcopy(snapshot))
                got = list(end_variant(learner, variant, terms))
                got += [p.detach().clone() for p in learner.params] + list(learner.rule_state["momentum_buffer"])
                for g, e in zip(got, expected, strict=True):
                    torch.testing.assert_close(g, e, rtol=1e-12, atol=0.0, msg=lambda m, n=name: f"{n}: {m}")
                    worst[name] = max(worst[name], float(((g.detach() - e).abs() / e.abs().clamp_min(1e-300)).max()))
            learner.load_state_dict(snapshot)
            finish_window(learner)                  # finish the window as the run does
        else:
            advance_window(learner)
    return worst


def check_run(variant: str = "compiled_window") -> tuple[float, float]:
    """Largest relative differences of the final raw hyperparameters and of the final weights of a
    whole float64 run (4000 steps) with the compiled window end, from the current implementation's."""
    finals = []
    with tempfile.TemporaryDirectory(prefix="bench_neumann-") as log_root:
        for algorithm in ("Ours_LR_Momentum", f"Ours_LR_Momentum+{variant}"):
            learner = learner_for_run(algorithm, "float64", log_root, None)
            learner.run()
            finals.append((torch.stack([leaf.detach() for leaf in learner.hyperparameters.leaves()]),
                           torch.cat([p.detach().reshape(-1) for p in learner.params])))
    (leaves, weights), (leaves_variant, weights_variant) = finals
    return (float(((leaves_variant - leaves).abs() / leaves.abs()).max()),
            float((weights_variant - weights).abs().max() / weights.abs().max()))


# -- timing -----------------------------------------------------------------------------------------

def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def time_interleaved(actions: dict[str, Callable[[], object]], calls: int, rounds: int) -> dict[str, float]:
    """Median seconds per call of each action: `rounds` rounds, each running every action
    `calls` times in turn (after one untimed call), so drift on a shared machine hits all alike."""
    seconds: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(rounds):
        for name, action in actions.items():
            action()
            seconds[name] += [timed(action) for _ in range(calls)]
    return {name: statistics.median(values) for name, values in seconds.items()}


def end_actions(variants: dict[str, Callable], terms: int) -> tuple[dict[str, Callable[[], object]], train.Learner,
                                                                    train.Learner]:
    """A fast step of Random and of Ours, and the end of an Ours window by each implementation,
    each on its own float32 Learner (the variants' weights drift apart; the costs do not)."""
    random = make_learner("Random", "float32")
    ours = make_learner("Ours_LR_Momentum", "float32")
    ours.algorithm.rollback_distance = terms
    for learner in (random, ours):
        for _ in range(9):
            learner.weight_step(learner.fast_step)
    actions = {"fast step, Random": lambda: random.weight_step(random.fast_step),
               "fast step, Ours": lambda: ours.weight_step(ours.fast_step),
               "current": lambda: end_current(ours)}
    for name, variant in variants.items():
        learner = make_learner("Ours_LR_Momentum", "float32")
        for _ in range(9):
            learner.weight_step(learner.fast_step)
        actions[name] = lambda learner=learner, variant=variant: end_variant(learner, variant, terms)
    return actions, random, ours


class Peekable:
    """A batch stream whose next batch can be looked at before the loop draws it."""

    def __init__(self, stream: Iterator[Batch]):
        self.stream, self._next = stream, None

    def __iter__(self) -> Peekable:
        return self

    def peek(self) -> Batch:
        if self._next is None:
            self._next = next(self.stream)
        return self._next

    def __next__(self) -> Batch:
        batch = self.peek()
        self._next = None
        return batch


class CompiledWindowHyperOptimiser(ImplicitHyperOptimiser):
    """Ours with the end of every window taken by `neumann_hypergradient_compiled_window`, for
    timing whole runs: its `track` computes the step, the validation gradient (on the validation
    batch that the loop draws next for `hyper_step`, peeked) and the hypergradient, which
    `hypergradient` then returns (regression: the tracked step returns no outputs, which only
    classification metrics read). `learner_for_run` plugs it in."""

    cpp_wrapper = False
    learner: train.Learner          # for the pure functions of its model, and its validation stream
    _hypergradient: tuple[Batch, Tensors] | None = None

    def track(self, weights: Weights, rule_state: dict, batch: Batch) -> Step:
        learner = self.learner
        problem = tracked_step(learner, batch, weights, rule_state)
        validation = learner.hyper_batches.peek()
        result = neumann_hypergradient_compiled_window(problem, (validation.inputs, validation.targets),
                                                       self.rollback_distance, self.cpp_wrapper)
        self._hypergradient = (validation, result.hypergradient)
        return Step(weights, result.weights, result.state, torch.empty(0), result.loss, [])

    def hypergradient(self, last: Step, batch: Batch) -> Tensors:
        validation, hypergradient = self._hypergradient
        assert batch is validation, "the validation batch of the tracked step"
        self._hypergradient = None
        return hypergradient


def learner_for_run(algorithm: str, dtype: str, log_root: str, log: util.RunLog | None) -> train.Learner:
    """A Learner for a whole run; algorithm "Ours_LR_Momentum+compiled_window" is Ours with the
    compiled window end ("+compiled_window_cpp": with the C++ wrapper)."""
    name, _, variant = algorithm.partition("+")
    learner = make_learner(name, dtype, log_root, log)
    if variant:
        assert variant in ("compiled_window", "compiled_window_cpp"), variant
        plugged = CompiledWindowHyperOptimiser(learner.cfg.tuning, learner.problem, learner.hyperparameters,
                                               learner.params, learner.rule_state,
                                               window_steps=learner.cfg.network_weight_steps)
        plugged.cpp_wrapper = variant == "compiled_window_cpp"
        plugged.learner = learner
        learner.hyper_batches = Peekable(learner.hyper_batches)
        learner.algorithm = plugged
    return learner


# -- whole runs, the rest of a window, compile time -----------------------------------------------------

LEARNER_PARTS = ("_log", "_log_last", "_log_histograms")
METER_PARTS = ("held_out", "to_scalars", "batch_metrics")
HYPERPARAMETER_PARTS = ("log_values", "natural_values", "end_window")


def time_run(algorithm: str, log_root: str) -> tuple[float, dict[str, float]]:
    """Seconds of one `Learner.run()` (4000 steps, TensorBoard file written; setup not timed) and
    the seconds spent in the loop's parts other than weight steps (each wrapped by a timer)."""
    parts: dict[str, float] = {}

    def timer(owner: object, name: str, label: str) -> None:
        method = getattr(owner, name)

        def wrapped(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                parts[label] = parts.get(label, 0.0) + time.perf_counter() - start
        setattr(owner, name, wrapped)

    log = util.RunLog(util.make_run_dir(log_root, "bench_neumann", None))
    try:
        learner = learner_for_run(algorithm, "float32", log_root, log)
        for name in LEARNER_PARTS:
            timer(learner, name, name)
        for name in METER_PARTS:
            timer(learner.meter, name, name)
        for name in HYPERPARAMETER_PARTS:
            timer(learner.hyperparameters, name, name)
        if learner.algorithm.optimises:
            timer(learner.algorithm, "hypergradient", "hypergradient")
            timer(learner.algorithm, "hyper_step", "hyper_step")
        start = time.perf_counter()
        learner.run()
        seconds = time.perf_counter() - start
    finally:
        log.close()
    if "hyper_step" in parts:        # the hyper-optimiser step alone (hyper_step calls hypergradient)
        parts["hyper_step"] -= parts["hypergradient"]
    return seconds, parts


def whole_runs(algorithms: list[str], repeats: int) -> dict[str, tuple[float, dict[str, float]]]:
    """Median seconds of each algorithm's run and the medians of its parts, runs interleaved after
    one warm-up each (the warm-up compiles what is compiled)."""
    runs: dict[str, list[tuple[float, dict[str, float]]]] = {name: [] for name in algorithms}
    with tempfile.TemporaryDirectory(prefix="bench_neumann-") as log_root:
        for algorithm in algorithms:
            time_run(algorithm, log_root)
        for _ in range(repeats):
            for algorithm in algorithms:
                runs[algorithm].append(time_run(algorithm, log_root))
    return {name: (statistics.median(r[0] for r in results),
                   {part: statistics.median(r[1].get(part, 0.0) for r in results) for part in results[0][1]})
            for name, results in runs.items()}


COMPILE_PROBE = """
import sys, time
sys.path.insert(0, {bench!r})
import bench_neumann as b
learner = b.make_learner("Ours_LR_Momentum", "float32")
for _ in range(9):
    learner.weight_step(learner.fast_step)
start = time.perf_counter()
b.end_variant(learner, b.VARIANTS[{variant!r}], 5)
first = time.perf_counter() - start
start = time.perf_counter()
b.end_variant(learner, b.VARIANTS[{variant!r}], 5)
print(first, time.perf_counter() - start)
"""


def compile_seconds(variant: str) -> tuple[float, float]:
    """Seconds of the first call of a compiled variant in a fresh process: with an empty inductor
    cache (a new TORCHINDUCTOR_CACHE_DIR) and again in a second process with that cache warm."""
    firsts = []
    with tempfile.TemporaryDirectory(prefix="bench_neumann-inductor-") as cache:
        for _ in range(2):
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            probe = COMPILE_PROBE.format(bench=str(REPO / "bench"), variant=variant)
            out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                 check=True).stdout.split()
            firsts.append(float(out[0]))
    return firsts[0], firsts[1]


# -- the report -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="variants to check and time (default: all)")
    parser.add_argument("--terms", type=int, default=5, help="i, the Neumann terms (default 5, the configs' value)")
    parser.add_argument("--calls", type=int, default=30, help="timed calls of each variant per round (default 30)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--runs", type=int, default=5, help="timed whole runs of each algorithm (default 5)")
    parser.add_argument("--skip-runs", action="store_true", help="no whole runs (no projected run ratios)")
    parser.add_argument("--skip-compile", action="store_true", help="no compile-time measurement in fresh processes")
    args = parser.parse_args(argv)
    variants = {name: VARIANTS[name] for name in args.variants}
    torch.set_num_threads(1)          # as train.prepare sets for these small models
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, {os.cpu_count()} cores, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; UCI Energy, Ours_LR_Momentum, "
          f"i = {args.terms}")

    print("\n1. hypergradient, new weights and momentum buffer against ImplicitHyperOptimiser, float64, "
          "windows 0, 1, 5, 40")
    worst = check(variants, args.terms)
    for name, difference in worst.items():
        print(f"   {name:<18} largest relative difference {difference:.1e}  (<= 1e-12: ok)")

    for name in ("compiled_window", "compiled_window_cpp"):
        if name in variants:
            leaves, weights = check_run(name)
            print(f"   a whole float64 run with {name}: final raw hyperparameters within {leaves:.1e}, weights "
                  f"within {weights:.1e} (relative to their largest) of the current implementation's")

    actions, _, _ = end_actions(variants, args.terms)
    median = time_interleaved(actions, args.calls, args.rounds)
    fast, fast_random, current = median["fast step, Ours"], median["fast step, Random"], median["current"]
    runs = None
    if not args.skip_runs:
        plugged = [f"Ours_LR_Momentum+{name}" for name in ("compiled_window", "compiled_window_cpp")
                   if name in variants]
        runs = whole_runs(["Random", "Ours_LR_Momentum", *plugged], args.runs)
    windows = 400
    print(f"\n2. end of a window (tracked step + validation gradient + {args.terms - 1} products + product into "
          f"lambda), float32, median of {args.calls * args.rounds} calls")
    print(f"   fast step: Ours {fast * 1e6:.0f} us, Random {fast_random * 1e6:.0f} us")
    print(f"   {'variant':<18}{'us':>7}{'fast steps':>12}{'window vs Random':>18}{'saves/window':>14}"
          f"{'run vs Random':>15}  1.5x target")
    for name in ["current", *variants]:
        end = median[name]
        window = (9 * fast + end) / (10 * fast_random)
        line = f"   {name:<18}{end * 1e6:>7.0f}{end / fast:>12.2f}{window:>17.2f}x{(current - end) * 1e6:>11.0f} us"
        if runs is not None:
            projected = (runs["Ours_LR_Momentum"][0] - windows * (current - end)) / runs["Random"][0]
            line += f"{projected:>14.2f}x  {'met' if projected <= 1.5 else 'missed'}"
        print(line)
    print("   (window vs Random: 9 fast steps + the end against 10 of Random's fast steps, no measurement or logging;"
          "\n    run vs Random: Ours' measured whole run less 400 x the saving, against Random's run)")

    if runs is not None:
        random_seconds = runs["Random"][0]
        print(f"\n3. whole runs (4000 steps, TensorBoard file written), median of {args.runs}, interleaved; "
              f"per window (us):")
        names = list(runs)
        parts = sorted({part for _, p in runs.values() for part in p})
        labels = [name.replace("Ours_LR_Momentum", "Ours") for name in names]
        width = max(len(label) for label in labels) + 2
        print(f"   {'':<24}" + "".join(f"{label:>{width}}" for label in labels))
        print(f"   {'run (s)':<24}" + "".join(f"{f'{runs[n][0]:.3f} ({runs[n][0] / random_seconds:.2f}x)':>{width}}"
                                               for n in names))
        print(f"   {'window':<24}" + "".join(f"{runs[n][0] / windows * 1e6:>{width}.0f}" for n in names))
        for part in parts:
            print(f"   {part:<24}" + "".join(f"{runs[n][1].get(part, 0.0) / windows * 1e6:>{width}.1f}"
                                            for n in names))
        print(f"   {'steps, loop, the rest':<24}" + "".join(
            f"{(runs[n][0] - sum(runs[n][1].values())) / windows * 1e6:>{width}.0f}" for n in names))
        print("   (hypergradient: the validation gradient and the solve, inside hyper_step; hyper_step: the rest of "
              "it,\n    the hyper-optimiser's Adam step and the hypergradient tags; a compiled window does all "
              "in its tracked step)")

    compiled = [name for name in ("compiled_window", "compiled_window_cpp") if name in variants]
    if not args.skip_compile and compiled:
        print("\n4. compile time (first call in a fresh process; empty inductor cache, then warm)")
        for name in compiled:
            cold, warm = compile_seconds(name)
            line = f"   {name:<20} {cold:5.1f} s cold, {warm:4.1f} s warm"
            if runs is not None:
                run = runs[f"Ours_LR_Momentum+{name}"][0]
                ratios = [(run + seconds) / random_seconds for seconds in (cold, warm, warm / 10, warm / 100)]
                line += (f"; a run paying it: {ratios[0]:.1f}x Random cold, {ratios[1]:.1f}x warm; once per "
                         f"process of 10 runs {ratios[2]:.2f}x, of 100 runs {ratios[3]:.2f}x")
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
