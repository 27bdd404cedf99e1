"""Hypergradients driven through the real training loop, against ground truths written here.

Each test builds a Learner from the real config files (diabetes.yaml and an algorithm config; float64,
CPU, seed 0, a 10-8-1 tanh MLP, nonzero weight decay and momentum, plain SGD as the hyper-optimiser so
that the reference can take the same hyperparameter steps), runs whole windows with `Learner.run()`,
records the hypergradient of every hyperparameter step, and replays the run here in plain torch
(its own MLP forward, MSE, PyTorch's SGD convention g = dL_T/dw + wd w, b <- mu b + g (b = g at the
very first step), w <- w - lr b) from the Learner's initial weights. The diabetes training and
validation splits are each one full batch, so the replay needs no data order.

- `test_implicit_hypergradients_through_the_loop` (T = 10, i = 5): every window's last step
  u(w, raw) = lr (mu b + dL_T/dw + wd w), with explicit Jacobians du/dw (P x P) and du/draw,
  p = dL_V/dw sum_{j<i} (I - du/dw)^j by explicit matrix powers, hypergradient -p du/draw; and the
  final weights and hyperparameters. [scalar_lr] is Ours_LR_Momentum; [per_element_lr] is
  Ours_HDLR_Momentum, its lr hypergradient in closed form -p_k (mu b + dL_T/dw + wd w)_k lr_k ln 10.
  Catches i - 1 or i + 1 Neumann terms, a sign flip, the momentum buffer not detached between
  windows, weight decay missing from the differentiable update, the tracked step at the wrong place
  in the window, a step too many or too few per window.
- `test_unrolled_hypergradients_equal_an_explicit_unroll` (Diff-through-Opt, T = 10, R = 5): in
  every window, T - R plain steps, then R steps written with autograd (create_graph) from those
  weights and the raw hyperparameters, the validation loss's gradient into the raw values; and
  the final weights and hyperparameters. Catches R - 1 or R + 1 unrolled steps, the momentum
  buffer not detached, weight decay dropped, a sign flip.
- `test_unrolled_first_hypergradient_equals_finite_differences`: central differences of the
  validation loss after the first window, each raw hyperparameter perturbed in its last R steps only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from onepass import config, train
from tests.conftest import REPO, TEST_DEVICE

WINDOWS, STEPS, TERMS, UNROLLED = 3, 10, 5, 5    # H, T, i, R
HYPER_LR = 1.0                                   # plain SGD on the raw hyperparameters
NAMES = ("lr", "weight_decay", "momentum")
COMMON = (f"device={TEST_DEVICE}", "model.layer_sizes=[10, 8, 1]", "model.activation=tanh", "optimiser.lr=0.05",
          "optimiser.weight_decay=0.01", "optimiser.momentum=0.7", "tuning.optimiser=sgd", f"tuning.lr={HYPER_LR}",
          f"hyperparameter_steps={WINDOWS}", f"network_weight_steps={STEPS}")
Raw = dict[str, torch.Tensor]         # raw hyperparameters by name: log10 lr, log10 weight decay, logit momentum


def learner_for(algorithm: str, *overrides: str) -> train.Learner:
    cfg = config.load_from([str(REPO / "configs" / "diabetes.yaml"), str(REPO / "configs" / f"{algorithm}.yaml")],
                           overrides=["dtype=float64", "seed=0", *COMMON, *overrides])
    return train.Learner(train.prepare(cfg))


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@dataclass
class Problem:
    """The 10-8-1 tanh MLP as a function of its flat weight vector, and the two full-batch MSE losses."""
    shapes: list[torch.Size]
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    validation_inputs: torch.Tensor
    validation_targets: torch.Tensor

    def outputs(self, theta: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        sizes = [math.prod(shape) for shape in self.shapes]
        w1, b1, w2, b2 = (t.reshape(s) for t, s in zip(theta.split(sizes), self.shapes, strict=True))
        return torch.tanh(inputs @ w1.T + b1) @ w2.T + b2

    def training_loss(self, theta: torch.Tensor) -> torch.Tensor:
        return ((self.outputs(theta, self.train_inputs) - self.train_targets) ** 2).mean()

    def validation_loss(self, theta: torch.Tensor) -> torch.Tensor:
        return ((self.outputs(theta, self.validation_inputs) - self.validation_targets) ** 2).mean()

    def training_gradient(self, theta: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        if not theta.requires_grad:
            theta = theta.detach().requires_grad_()
        (gradient,) = torch.autograd.grad(self.training_loss(theta), theta, create_graph=create_graph)
        return gradient

    def validation_gradient(self, theta: torch.Tensor) -> torch.Tensor:
        theta = theta.detach().requires_grad_()
        (gradient,) = torch.autograd.grad(self.validation_loss(theta), theta)
        return gradient


def problem_of(learner: train.Learner) -> Problem:
    """The Learner's data and network as plain tensors, after checking that every weight step and
    every hypergradient of the loop sees the whole of its split (so the replay needs no data order)."""
    model = learner.model
    assert [type(layer) for layer in model] == [nn.Linear, nn.Tanh, nn.Linear]
    splits = learner.splits
    assert learner.cfg.batch_size is None and learner.cfg.tuning.validation_data == "validation"
    assert (len(splits.train), len(splits.validation)) == (318, 80)      # 398 rows, validation_proportion 0.2
    for stream, split in ((learner.streams.train, splits.train), (learner.streams.hyper, splits.validation)):
        assert stream.full_batch
        batch = next(stream)
        assert batch.fraction == 1.0
        assert torch.equal(batch.inputs, split.inputs) and torch.equal(batch.targets, split.targets)
    problem = Problem([p.shape for p in learner.params], splits.train.inputs, splits.train.targets,
                      splits.validation.inputs, splits.validation.targets)
    with torch.no_grad():
        torch.testing.assert_close(problem.outputs(flat(learner.params), splits.train.inputs),
                                   model(splits.train.inputs), rtol=1e-14, atol=1e-14)
    return problem


def initial_raw(learner: train.Learner, per_element_lr: bool = False) -> Raw:
    """The configured starting values, in raw form (computed here, not by the project's transforms)."""
    optimiser = learner.cfg.optimiser
    values = {"lr": math.log10(optimiser.lr), "weight_decay": math.log10(optimiser.weight_decay),
              "momentum": math.log(optimiser.momentum / (1 - optimiser.momentum))}
    device = learner.params[0].device
    raw = {name: torch.tensor(value, dtype=torch.float64, device=device) for name, value in values.items()}
    if per_element_lr:
        raw["lr"] = raw["lr"].expand(sum(p.numel() for p in learner.params)).clone()
    return raw


def natural(raw: Raw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return 10 ** raw["lr"], 10 ** raw["weight_decay"], torch.sigmoid(raw["momentum"])


def sgd_step(problem: Problem, theta: torch.Tensor, buffer: torch.Tensor | None, raw: Raw,
             create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    lr, weight_decay, momentum = natural(raw)
    gradient = problem.training_gradient(theta, create_graph) + weight_decay * theta
    buffer = gradient if buffer is None else momentum * buffer + gradient
    return theta - lr * buffer, buffer


def plain_steps(problem: Problem, theta: torch.Tensor, buffer: torch.Tensor | None, raw: Raw,
                count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    fixed = {name: value.detach() for name, value in raw.items()}
    for _ in range(count):
        theta, buffer = sgd_step(problem, theta, buffer, fixed)
    return theta, buffer


def hyper_step(raw: Raw, hypergradient: Raw) -> Raw:
    """Plain SGD on the raw values; lr's clipping into [1e-10, 1] must not be active here."""
    raw = {name: (raw[name] - HYPER_LR * hypergradient[name]).detach() for name in NAMES}
    assert -10 < float(raw["lr"].min()) and float(raw["lr"].max()) < 0
    return raw


def implicit_reference(problem: Problem, theta: torch.Tensor, raw: Raw, windows: int,
                       per_element_lr: bool, terms: int = TERMS) -> tuple[list[Raw], torch.Tensor, Raw]:
    """Every window's implicit hypergradient (`terms` Neumann terms through its last step, explicit
    matrices), the final weights and the final raw hyperparameters."""
    buffer, hypergradients = None, []
    identity = torch.eye(len(theta), dtype=theta.dtype, device=theta.device)
    for _ in range(windows):
        theta, buffer = plain_steps(problem, theta, buffer, raw, STEPS - 1)
        before, previous = theta, buffer

        def direction(w: torch.Tensor, log_wd: torch.Tensor, logit_momentum: torch.Tensor,
                      previous: torch.Tensor = previous) -> torch.Tensor:
            """mu b + dL_T/dw + wd w: the update u divided by lr."""
            gradient = problem.training_gradient(w, create_graph=True)
            return torch.sigmoid(logit_momentum) * previous + gradient + 10 ** log_wd * w

        def update(w: torch.Tensor, log_lr: torch.Tensor, log_wd: torch.Tensor,
                   logit_momentum: torch.Tensor) -> torch.Tensor:
            return 10 ** log_lr * direction(w, log_wd, logit_momentum)

        a, c, m = (raw[name] for name in NAMES)
        lr = 10 ** a
        d = direction(before, c, m).detach()
        theta, buffer = (before - lr * d).detach(), d
        du_dw = torch.autograd.functional.jacobian(lambda w, a=a, c=c, m=m: update(w, a, c, m), before)
        v = problem.validation_gradient(theta)
        step_jacobian = identity - du_dw
        p = v @ sum(torch.linalg.matrix_power(step_jacobian, j) for j in range(terms))
        du_dc, du_dm = torch.autograd.functional.jacobian(
            lambda c, m, a=a, w=before: update(w, a, c, m), (c, m))
        if per_element_lr:
            lr_hypergradient = -p * d * lr * math.log(10)
        else:
            lr_hypergradient = -p @ torch.autograd.functional.jacobian(
                lambda a, c=c, m=m, w=before: update(w, a, c, m), a)
        hypergradient = {"lr": lr_hypergradient, "weight_decay": -p @ du_dc, "momentum": -p @ du_dm}
        hypergradients.append({name: g.detach() for name, g in hypergradient.items()})
        raw = hyper_step(raw, hypergradient)
    return hypergradients, theta, raw


def unroll_reference(problem: Problem, theta: torch.Tensor, raw: Raw,
                     windows: int) -> tuple[list[Raw], torch.Tensor, Raw]:
    """Every window's hypergradient through its last R steps, by a plain autograd unroll; the final
    weights and raw hyperparameters."""
    buffer, hypergradients = None, []
    for _ in range(windows):
        theta, buffer = plain_steps(problem, theta, buffer, raw, STEPS - UNROLLED)
        leaves = {name: value.clone().requires_grad_() for name, value in raw.items()}
        weights = theta.detach().requires_grad_()
        for _ in range(UNROLLED):
            weights, buffer = sgd_step(problem, weights, buffer, leaves, create_graph=True)
        grads = torch.autograd.grad(problem.validation_loss(weights), [leaves[name] for name in NAMES])
        hypergradient = dict(zip(NAMES, grads, strict=True))
        hypergradients.append(hypergradient)
        theta, buffer = weights.detach(), buffer.detach()
        raw = hyper_step(raw, hypergradient)
    return hypergradients, theta, raw


@dataclass
class LoopRun:
    """What a Learner did: its starting weights, every hypergradient and its final state, by name."""
    learner: train.Learner
    initial_weights: torch.Tensor
    hypergradients: list[Raw]
    final_weights: torch.Tensor
    final_raw: Raw
    buffer_graphs: list[bool]


def by_name(learner: train.Learner, per_leaf: list[torch.Tensor]) -> Raw:
    """Tensors aligned with `Hyperparameters.leaves()` (one leaf per weight tensor for a
    high-dimensional lr, in parameter order) as one flat tensor per hyperparameter."""
    hyperparameters, grouped, first = learner.hyperparameters, {}, 0
    assert hyperparameters.optimised == NAMES
    for name in NAMES:
        count = len(hyperparameters.raw[name]) if isinstance(hyperparameters.raw[name], list) else 1
        part = per_leaf[first:first + count]
        grouped[name] = flat(part) if isinstance(hyperparameters.raw[name], list) else part[0].detach().clone()
        first += count
    assert first == len(per_leaf)
    return grouped


def run_loop(algorithm: str, *overrides: str) -> LoopRun:
    learner = learner_for(algorithm, *overrides)
    initial_weights = flat(learner.params).clone()
    recorded: list[Raw] = []
    graphs: list[bool] = []      # after each window: is the momentum buffer missing or still on a graph?
    compute = learner.algorithm.hypergradient

    def recording(*args: object) -> list[torch.Tensor]:
        grads = compute(*args)
        recorded.append(by_name(learner, grads))
        return grads

    def check_state(learner: train.Learner) -> None:
        buffers = learner.rule_state["momentum_buffer"]
        graphs.append(not buffers or any(b.requires_grad or b.grad_fn is not None for b in buffers))

    learner.algorithm.hypergradient = recording
    assert learner.run(after_window=check_state)["status"] == "completed"
    assert learner.record.steps_done == WINDOWS * STEPS and len(recorded) == WINDOWS
    return LoopRun(learner, initial_weights, recorded, flat(learner.params).clone(),
                   by_name(learner, learner.hyperparameters.leaves()), graphs)


def assert_plain_buffers(run: LoopRun) -> None:
    """The momentum buffer carried from window to window must be a plain value: one on a graph keeps
    the last window's graph alive, and would add paths to earlier hyperparameters. (Diff-through-Opt's
    values cannot show it: higher copies an optimiser's state with clone().detach() on entering an
    unroll, so only this check sees a buffer written back undetached.)"""
    assert run.buffer_graphs == [False] * WINDOWS, f"momentum buffer missing or on a graph after windows: " \
        f"{[w for w, on_graph in enumerate(run.buffer_graphs) if on_graph]}"


def assert_agrees(got: Raw, expected: Raw, what: str) -> None:
    for name in NAMES:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-8, atol=1e-12 * float(expected[name].abs().max()),
                                   msg=lambda message, name=name: f"{what}, {name}: {message}")


@pytest.mark.parametrize("algorithm", ["Ours_LR_Momentum", "Ours_HDLR_Momentum"], ids=["scalar_lr", "per_element_lr"])
def test_implicit_hypergradients_through_the_loop(algorithm):
    per_element_lr = algorithm == "Ours_HDLR_Momentum"
    run = run_loop(algorithm, f"tuning.rollback_distance={TERMS}")
    problem = problem_of(run.learner)
    raw = initial_raw(run.learner, per_element_lr)
    expected, final_weights, final_raw = implicit_reference(problem, run.initial_weights, raw, WINDOWS, per_element_lr)

    for window, (got, want) in enumerate(zip(run.hypergradients, expected, strict=True)):
        assert_agrees(got, want, f"window {window} hypergradient")
    torch.testing.assert_close(run.final_weights, final_weights, rtol=1e-10, atol=1e-12)
    assert_agrees(run.final_raw, final_raw, "final raw hyperparameters")
    if per_element_lr:    # the per-element lrs really differ after the first hyperparameter step
        assert float(final_raw["lr"].std()) > 1e-4
    assert_plain_buffers(run)


@pytest.fixture(scope="module")
def unrolled_run() -> LoopRun:
    return run_loop("DiffThroughOpt", f"tuning.unroll_steps={UNROLLED}")


def test_unrolled_hypergradients_equal_an_explicit_unroll(unrolled_run):
    problem = problem_of(unrolled_run.learner)
    expected, final_weights, final_raw = unroll_reference(problem, unrolled_run.initial_weights,
                                                          initial_raw(unrolled_run.learner), WINDOWS)

    for window, (got, want) in enumerate(zip(unrolled_run.hypergradients, expected, strict=True)):
        assert_agrees(got, want, f"window {window} hypergradient")
    torch.testing.assert_close(unrolled_run.final_weights, final_weights, rtol=1e-10, atol=1e-12)
    assert_agrees(unrolled_run.final_raw, final_raw, "final raw hyperparameters")
    assert_plain_buffers(unrolled_run)


def test_unrolled_first_hypergradient_equals_finite_differences(unrolled_run):
    problem = problem_of(unrolled_run.learner)
    raw = initial_raw(unrolled_run.learner)
    start, buffer = plain_steps(problem, unrolled_run.initial_weights, None, raw, STEPS - UNROLLED)
    eps = 1e-5

    def validation_loss_after_window(name: str, shift: float) -> float:
        shifted = raw | {name: raw[name] + shift}
        weights, _ = plain_steps(problem, start, buffer, shifted, UNROLLED)
        return float(problem.validation_loss(weights))

    for name in NAMES:
        difference = (validation_loss_after_window(name, eps) - validation_loss_after_window(name, -eps)) / (2 * eps)
        got = float(unrolled_run.hypergradients[0][name])
        assert abs(got - difference) <= 1e-6 * abs(difference), (name, got, difference)
