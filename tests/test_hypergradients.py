"""Every hypergradient against an independent ground truth, in float64.

- implicit (Ours, Lorraine): the closed-form ridge-regression IFT hypergradient at the optimum, and
  the exact -dL_V/dw (du/dw)^{-1} du/dlambda from explicit Jacobians at arbitrary weights;
- unrolled (Diff-through-Opt): central finite differences and an unroll written here;
- Baydin: the paper's step, the product of two consecutive plain gradients, replayed in closed form;
  Baydin_Exact: the exact derivative through the momentum update, in closed form.
"""
from __future__ import annotations

import copy
import functools
import gc
import math
from dataclasses import replace

import pytest
import torch
from torch.func import functional_call

from onepass import config, train
from onepass.algorithms.steps import Step
from tests.conftest import REPO, TEST_DEVICE


def learner_for(algorithm: str, *overrides: str, dataset: str = "diabetes.yaml") -> train.Learner:
    cfg = config.load_from([str(REPO / "configs" / dataset), str(REPO / "configs" / f"{algorithm}.yaml")],
                           overrides=["dtype=float64", "seed=0", f"device={TEST_DEVICE}", *overrides])
    return train.Learner(train.prepare(cfg))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm().detach())


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def design(learner: train.Learner, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[inputs, 1] and targets, so that a linear model's output is design @ [weight, bias]."""
    data = getattr(learner.splits, split)
    ones = torch.ones(len(data), 1, dtype=torch.float64, device=data.inputs.device)
    return torch.cat([data.inputs, ones], dim=1), data.targets


def tracked_steps(learner: train.Learner, steps: int) -> Step:
    """`steps` steps through the algorithm, as the loop takes a window's last ones (unlogged)."""
    weights, state = [p.detach().clone().requires_grad_() for p in learner.params], learner.rule_state
    for _ in range(steps):
        last, _ = learner.train_step(functools.partial(learner.algorithm.track, weights, state))
        weights, state = last.weights, last.rule_state
        with torch.no_grad():
            torch._foreach_copy_(learner.params, weights)
    return last


def tracked_hypergradient(learner: train.Learner) -> list[torch.Tensor]:
    """One tracked step on the (full) training batch, then the algorithm's hypergradient."""
    return learner.algorithm.hypergradient(tracked_steps(learner, 1), next(learner.streams.hyper))


def linear_learner(algorithm: str, *overrides: str) -> train.Learner:
    learner = learner_for(algorithm, "model.layer_sizes=[10, 1]", "optimiser.weight_decay=0.1",
                          "tuning.rollback_distance=4000", *overrides)
    inputs, _ = design(learner, "train")
    # lr = 1 / (largest eigenvalue of du/dw / lr): the Neumann series then converges quickly.
    identity = torch.eye(inputs.shape[1], dtype=torch.float64, device=inputs.device)
    hessian = 2 * inputs.T @ inputs / len(inputs) + 0.1 * identity
    lr = float(1 / torch.linalg.eigvalsh(hessian).max())
    hyperparameters = learner.hyperparameters
    if "lr" in hyperparameters.raw:
        with torch.no_grad():
            for leaf in hyperparameters.leaves()[:len(learner.params) if "lr" in hyperparameters.high_dimensional
                                                 else 1]:
                leaf.fill_(math.log10(lr))
    else:
        hyperparameters.constants["lr"] = lr
    return learner


def test_neumann_equals_closed_form_ridge_hypergradient_at_the_optimum():
    learner = linear_learner("Lorraine")
    inputs, targets = design(learner, "train")
    n, wd = len(inputs), 0.1
    hessian = 2 * inputs.T @ inputs / n + wd * torch.eye(inputs.shape[1], dtype=torch.float64, device=inputs.device)
    optimum = torch.linalg.solve(hessian, 2 * inputs.T @ targets / n)[:, 0]    # ridge with wd on all params
    with torch.no_grad():
        learner.params[0].copy_(optimum[:-1][None]), learner.params[1].copy_(optimum[-1:])
    learner.rule_state = {"momentum_buffer": [torch.zeros_like(p) for p in learner.params]}

    (got,) = tracked_hypergradient(learner)

    val_inputs, val_targets = design(learner, "validation")
    validation_gradient = 2 * val_inputs.T @ (val_inputs @ optimum[:, None] - val_targets)[:, 0] / len(val_inputs)
    natural = -validation_gradient @ torch.linalg.solve(hessian, optimum)      # dL_V/d weight_decay
    expected = natural * wd * math.log(10)                                     # chain rule into log10
    assert relative_error(got, expected) < 1e-6


@pytest.mark.parametrize("clipped", [False, True], ids=["", "clipped"])
@pytest.mark.parametrize("algorithm", ["Ours_LR_Momentum", "Ours_HDLR_Momentum"])
def test_neumann_equals_exact_implicit_hypergradient_through_u(algorithm, clipped):
    """At arbitrary weights and momentum buffer, the long Neumann series equals
    -dL_V/dw (du/dw)^{-1} du/dlambda built from explicit Jacobians of u written here (with the
    gradient-norm clipping inside u, when it is active)."""
    learner = linear_learner(algorithm)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in learner.params:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))   # (copy_ moves it)
    buffer_before = [0.1 * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.device)
                     for p in learner.params]
    learner.rule_state = {"momentum_buffer": [b.clone() for b in buffer_before]}
    theta = flat(learner.params).clone()
    raw = [leaf.detach().clone() for leaf in learner.hyperparameters.leaves()]
    high_dimensional = "lr" in learner.hyperparameters.high_dimensional
    inputs, targets = design(learner, "train")

    def gradient_at(theta: torch.Tensor) -> torch.Tensor:
        return 2 * inputs.T @ (inputs @ theta[:, None] - targets)[:, 0] / len(inputs)

    max_norm = 0.5 * float(gradient_at(theta).detach().norm()) if clipped else None    # active at theta
    learner.algorithm.problem = replace(learner.algorithm.problem, gradient_clip=max_norm)

    got = flat(tracked_hypergradient(learner))

    def update(theta: torch.Tensor, raw_values: list[torch.Tensor]) -> torch.Tensor:
        """u = lr * (momentum * b + clip(grad L_T(theta)) + wd * theta) for the linear model."""
        lr = 10 ** torch.cat([r.reshape(-1) for r in raw_values[:2]]) if high_dimensional else 10 ** raw_values[0]
        wd, momentum = (10 ** raw_values[-2], torch.sigmoid(raw_values[-1]))
        gradient = gradient_at(theta)
        if max_norm is not None:
            gradient = gradient * max_norm / (gradient.norm() + 1e-6)
        return lr * (momentum * flat(buffer_before) + gradient + wd * theta)

    du_dtheta = torch.autograd.functional.jacobian(lambda t: update(t, raw), theta)
    du_draw = torch.autograd.functional.jacobian(lambda *r: update(theta, list(r)), tuple(raw))
    du_draw = torch.cat([j.reshape(len(theta), -1) for j in du_draw], dim=1)
    after = theta - update(theta, raw)
    val_inputs, val_targets = design(learner, "validation")
    validation_gradient = 2 * val_inputs.T @ (val_inputs @ after[:, None] - val_targets)[:, 0] / len(val_inputs)
    expected = (-validation_gradient @ torch.linalg.solve(du_dtheta, du_draw)).detach()
    assert relative_error(got, expected) < 1e-6


def test_per_element_lr_hypergradient_sums_to_the_scalar_one():
    scalar, per_element = (learner_for(name, "model.layer_sizes=[10, 6, 1]")
                           for name in ("Ours_LR_Momentum", "Ours_HDLR_Momentum"))
    for learner in (scalar, per_element):
        learner.fast_hyperparameters = learner.hyperparameters.natural_values()
        for _ in range(3):
            learner.train_step(learner.fast_step)
    scalar_grads = tracked_hypergradient(scalar)
    element_grads = tracked_hypergradient(per_element)
    n = len(per_element.params)
    torch.testing.assert_close(sum(g.sum() for g in element_grads[:n]), scalar_grads[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.stack(element_grads[n:]), torch.stack(scalar_grads[1:]), rtol=1e-10, atol=0)


# -- unrolled ------------------------------------------------------------------------------------

UNROLLED = ("model.layer_sizes=[10, 8, 1]", "model.activation=tanh", "network_weight_steps=5",
            "tuning.unroll_steps=5", "optimiser.weight_decay=1e-2")


def warmed_up(learner: train.Learner, steps: int = 3) -> tuple[list[torch.Tensor], dict]:
    """A few fast steps (so momentum buffers exist), then a snapshot of weights and state."""
    learner.fast_hyperparameters = learner.hyperparameters.natural_values()
    for _ in range(steps):
        learner.train_step(learner.fast_step)
    return [p.detach().clone() for p in learner.params], copy.deepcopy(learner.rule_state)


def validation_loss_after_fast_steps(learner, weights, state, steps) -> float:
    with torch.no_grad():
        torch._foreach_copy_(learner.params, weights)
    learner.rule_state = copy.deepcopy(state)
    learner.fast_hyperparameters = learner.hyperparameters.natural_values()
    for _ in range(steps):
        learner.train_step(learner.fast_step)
    validation = learner.splits.validation
    return float(learner.meter.evaluate(learner.meter.whole(validation))["Loss"])


def unrolled_hypergradient(*overrides: str) -> tuple[train.Learner, list[torch.Tensor], dict, list[torch.Tensor]]:
    """Diff-through-Opt's hypergradient through 5 steps, with the weights and state they started from."""
    learner = learner_for("DiffThroughOpt", *UNROLLED, *overrides)
    weights, state = warmed_up(learner)
    last = tracked_steps(learner, 5)
    return learner, weights, state, learner.algorithm.hypergradient(last, next(learner.streams.hyper))


ADAM = ("optimiser.name=adam", "optimiser.lr=1e-2", "optimiser.beta1=0.8",
        "tuning.hyperparameters=[lr, weight_decay, beta1, beta2]")


def assert_finite_differences(learner: train.Learner, weights: list[torch.Tensor], state: dict,
                              got: list[torch.Tensor], steps: int = 5, eps: float = 1e-5) -> None:
    """`got` against central differences, in each raw hyperparameter, of the validation loss after
    `steps` fast steps from `weights` and `state` (relative error below 1e-5)."""
    for leaf, g in zip(learner.hyperparameters.leaves(), got, strict=True):
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                leaf += sign * eps
            losses.append(validation_loss_after_fast_steps(learner, weights, state, steps))
            with torch.no_grad():
                leaf -= sign * eps
        difference = (losses[0] - losses[1]) / (2 * eps)
        assert abs(float(g) - difference) / abs(difference) < 1e-5, (float(g), difference)


@pytest.mark.parametrize("overrides", [(), ("optimiser.gradient_clip=0.01",), ADAM], ids=["", "clipped", "adam"])
def test_unrolled_hypergradient_equals_central_finite_differences(overrides):
    learner, weights, state, got = unrolled_hypergradient(*overrides)

    assert_finite_differences(learner, weights, state, got)


def test_long_unrolled_hypergradient_with_adam_through_the_loop_equals_finite_differences():
    """Long Diff-through-Opt restarts every window from the initial weights and Adam state and
    unrolls the whole window: its third hypergradient, taken by the loop, is the derivative of the
    validation loss after T steps from the initial point at that window's hyperparameters."""
    learner = learner_for("LongDiffThroughOpt_UCI_Standalone", *UNROLLED[:2], "network_weight_steps=5",
                          "hyperparameter_steps=3", "optimiser.weight_decay=1e-2", *ADAM)
    weights, state = [p.detach().clone() for p in learner.params], copy.deepcopy(learner.rule_state)
    compute, recorded = learner.algorithm.hypergradient, []

    def recording(*args: object) -> list[torch.Tensor]:
        grads = compute(*args)
        recorded.append(([leaf.detach().clone() for leaf in learner.hyperparameters.leaves()], grads))
        return grads

    learner.algorithm.hypergradient = recording
    assert learner.run()["status"] == "completed" and len(recorded) == 3
    raw, got = recorded[-1]
    with torch.no_grad():
        torch._foreach_copy_(learner.hyperparameters.leaves(), raw)
    assert len(got) == 4
    assert_finite_differences(learner, weights, state, got)


def test_unrolled_hypergradient_equals_a_plain_autograd_unroll():
    learner, weights, state, got = unrolled_hypergradient()

    raw = [leaf.detach().clone().requires_grad_() for leaf in learner.hyperparameters.leaves()]
    lr, wd, momentum = 10 ** raw[0], 10 ** raw[1], torch.sigmoid(raw[2])
    names = [name for name, _ in learner.model.named_parameters()]
    train_data, validation = learner.splits.train, learner.splits.validation
    params, buffers = [w.clone().requires_grad_() for w in weights], state["momentum_buffer"]
    learner.model.train()
    for _ in range(5):
        outputs = functional_call(learner.model, dict(zip(names, params, strict=True)), (train_data.inputs,))
        loss = torch.nn.functional.mse_loss(outputs, train_data.targets)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        buffers = [momentum * b + g + wd * p for b, g, p in zip(buffers, grads, params, strict=True)]
        params = [p - lr * b for p, b in zip(params, buffers, strict=True)]
    learner.model.eval()
    outputs = functional_call(learner.model, dict(zip(names, params, strict=True)), (validation.inputs,))
    expected = torch.autograd.grad(torch.nn.functional.mse_loss(outputs, validation.targets), raw)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=0)


# -- Baydin --------------------------------------------------------------------------------------

def linear_gradient(learner: train.Learner, theta: torch.Tensor) -> torch.Tensor:
    """grad of the mean squared error of the linear model [weight, bias] = theta on the training split."""
    inputs, targets = design(learner, "train")
    return 2 * inputs.T @ (inputs @ theta[:, None] - targets)[:, 0] / len(inputs)


BAYDIN_LINEAR = ("model.layer_sizes=[10, 1]", "optimiser.momentum=0.9", "optimiser.weight_decay=0.1")


def test_paper_baydin_steps_log10_lr_by_the_product_of_consecutive_plain_gradients():
    """Through the training loop, with momentum and weight decay: log10 lr moves by
    +1e-3 * grad L(w_t) . grad L(w_{t-1}) (plain loss gradients, no chain-rule factor) after every
    step, against a replay with closed-form gradients of a linear model."""
    learner = learner_for("Baydin", *BAYDIN_LINEAR, "network_weight_steps=1", "hyperparameter_steps=30",
                          "optimiser.lr=0.02")
    theta = flat(learner.params).detach().clone()
    log10_lr, buffer = math.log10(0.02), None
    for _ in range(30):
        gradient = linear_gradient(learner, theta)
        decayed = gradient + 0.1 * theta
        buffer = decayed if buffer is None else 0.9 * buffer + decayed
        theta = theta - 10 ** log10_lr * buffer
        log10_lr += 1e-3 * float(linear_gradient(learner, theta) @ gradient)

    learner.run()

    assert learner.hyperparameters.leaves()[0].item() == pytest.approx(log10_lr, rel=1e-12, abs=0)
    assert relative_error(flat(learner.params).detach(), theta) < 1e-12
    assert abs(log10_lr - math.log10(0.02)) > 1e-3       # it moved by more than rounding


def test_exact_baydin_is_the_derivative_through_the_momentum_update():
    """Baydin_Exact's hypergradient is dL(w_t)/d log10 lr = -grad L(w_t) . b_t * lr * ln(10), b_t the
    momentum buffer the step used (weight decay included), for a linear model in closed form."""
    learner = learner_for("Baydin_Exact", *BAYDIN_LINEAR)
    warmed_up(learner)
    theta = flat(learner.params).detach().clone()
    buffer = 0.9 * flat(learner.rule_state["momentum_buffer"]) + linear_gradient(learner, theta) + 0.1 * theta
    lr = learner.hyperparameters.natural_values()["lr"]

    (got,) = tracked_hypergradient(learner)

    new_theta = theta - lr * buffer
    expected = -(linear_gradient(learner, new_theta) @ buffer) * lr * math.log(10)
    assert relative_error(flat(learner.params).detach(), new_theta) < 1e-12
    assert relative_error(got, expected) < 1e-12


# -- the tracked steps take the same steps as the fast path ---------------------------------------

TUNES_MOMENTUM = ("Ours_LR_Momentum", "Ours_HDLR_Momentum", "DiffThroughOpt")


@pytest.mark.parametrize("algorithm", ["Ours_LR_Momentum", "Ours_HDLR_Momentum", "Lorraine", "DiffThroughOpt",
                                       "Baydin", "Baydin_Exact"])
@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_with_a_zero_hyper_step_every_algorithm_trains_like_random(algorithm, rule):
    common = ["model.layer_sizes=[10, 8, 1]", "hyperparameter_steps=6", "tuning.lr=0", f"optimiser.name={rule}"]
    if rule == "adam" and algorithm in TUNES_MOMENTUM:     # Adam has betas where SGD has momentum
        common.append("tuning.hyperparameters=[lr, weight_decay, beta1, beta2]")
    tuned = learner_for(algorithm, *common)
    proportion = tuned.cfg.dataset.validation_proportion
    fixed = learner_for("Random", *common[:3], f"optimiser.name={rule}",
                        f"dataset.validation_proportion={proportion}",
                        f"network_weight_steps={tuned.cfg.network_weight_steps}",
                        f"hyperparameter_steps={tuned.cfg.hyperparameter_steps}")     # Baydin: 60 windows of 1
    tuned.run(), fixed.run()
    assert tuned.record.steps_done == fixed.record.steps_done > 0
    for a, b in zip(tuned.params, fixed.params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def tensors_on_a_graph() -> int:
    """Live tensors that still hold an autograd graph (a grad_fn)."""
    gc.collect()
    tensor_types = (torch.Tensor, torch.nn.Parameter)    # (exact types: isinstance is slow here)
    return sum(1 for obj in gc.get_objects() if type(obj) in tensor_types and obj.grad_fn is not None)


@pytest.mark.parametrize("algorithm", ["Ours_LR_Momentum", "DiffThroughOpt", "Baydin_Exact"])
def test_graph_is_cut_after_every_hyperparameter_step(algorithm):
    """Between windows no tensor holds a graph: a window's graph kept alive (a momentum buffer or
    weights not detached, a tracked step kept) would be seen here, and would make memory grow
    with every hyperparameter step."""
    learner = learner_for(algorithm, "model.layer_sizes=[10, 16, 1]", "hyperparameter_steps=3",
                          "network_weight_steps=5", "tuning.unroll_steps=3")
    counts = []
    learner.algorithm.start_window = lambda window: counts.append(tensors_on_a_graph()) if window == 2 else None
    assert learner.run()["status"] == "completed"
    assert counts == [0]


def test_initial_weights_do_not_depend_on_the_default_dtype():
    """A seed gives the same float64 network (and first hypergradient) whether or not the calling
    program changed torch's default dtype: weights are drawn in float32, then cast."""
    def initial_weights_and_hypergradient() -> tuple[torch.Tensor, torch.Tensor]:
        learner = learner_for("Ours_LR_Momentum", "model.layer_sizes=[10, 8, 1]")
        weights = flat(learner.params).detach().clone()
        return weights, flat(tracked_hypergradient(learner))

    expected = initial_weights_and_hypergradient()
    torch.set_default_dtype(torch.float64)
    try:
        got = initial_weights_and_hypergradient()
    finally:
        torch.set_default_dtype(torch.float32)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
