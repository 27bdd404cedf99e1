"""The update rules against torch.optim (the oracle), and their two forms against each other."""
from __future__ import annotations

import itertools

import pytest
import torch

from onepass.algorithms.weight_update import RULES

SGD_GRID = [dict(lr=lr, momentum=m, weight_decay=wd) for lr, m, wd in
            itertools.product([0.1, 0.01], [0.0, 0.9], [0.0, 1e-2])]
ADAM_GRID = [dict(lr=lr, betas=betas, weight_decay=wd) for lr, betas, wd in
             itertools.product([1e-2, 1e-3], [(0.9, 0.999), (0.5, 0.9)], [0.0, 1e-2])]


def case_id(case: dict) -> str:
    return "-".join(f"{k}({v})" for k, v in case.items())


def problem(seed: int = 0) -> tuple[list[torch.Tensor], callable]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(4, 3, generator=generator, dtype=torch.float64),
              torch.randn(3, generator=generator, dtype=torch.float64)]
    data = torch.randn(8, 4, generator=generator, dtype=torch.float64)

    def loss(ps: list[torch.Tensor]) -> torch.Tensor:
        return torch.tanh(data @ ps[0] + ps[1]).pow(2).sum()
    return params, loss


def hyper_of(rule_name: str, case: dict) -> dict:
    if rule_name == "adam":
        return dict(lr=case["lr"], weight_decay=case["weight_decay"], beta1=case["betas"][0], beta2=case["betas"][1])
    return case


def oracle_trajectory(rule_name: str, case: dict, steps: int) -> list[torch.Tensor]:
    params, loss = problem()
    params = [p.clone().requires_grad_() for p in params]
    optimiser = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[rule_name](params, **case)
    for _ in range(steps):
        optimiser.zero_grad()
        loss(params).backward()
        optimiser.step()
    return [p.detach() for p in params]


def functional_trajectory(rule_name: str, hp: dict, steps: int, in_place: bool) -> list[torch.Tensor]:
    rule = RULES[rule_name]
    params, loss = problem()
    state = rule.init_state(params)
    for _ in range(steps):
        leaves = [p.detach().requires_grad_() for p in params]
        grads = torch.autograd.grad(loss(leaves), leaves)
        if in_place:
            rule.update_(params, list(grads), state, hp)
        else:
            params, state = rule.update(params, list(grads), state, hp)
    return params


@pytest.mark.parametrize("in_place", [False, True], ids=["update", "update_"])
@pytest.mark.parametrize("rule_name,case", [("sgd", c) for c in SGD_GRID] + [("adam", c) for c in ADAM_GRID],
                         ids=[f"sgd-{case_id(c)}" for c in SGD_GRID] + [f"adam-{case_id(c)}" for c in ADAM_GRID])
def test_rule_matches_torch_optim(rule_name, case, in_place):
    expected = oracle_trajectory(rule_name, case, steps=6)
    got = functional_trajectory(rule_name, hyper_of(rule_name, case), steps=6, in_place=in_place)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("rule_name", ["sgd", "adam"])
def test_per_element_lr_all_equal_matches_scalar_lr(rule_name):
    case = SGD_GRID[-1] if rule_name == "sgd" else ADAM_GRID[-1]
    hp = hyper_of(rule_name, case)
    params, _ = problem()
    per_element = dict(hp, lr=[torch.full_like(p, hp["lr"]) for p in params])
    for in_place in (False, True):
        scalar = functional_trajectory(rule_name, hp, steps=5, in_place=in_place)
        elementwise = functional_trajectory(rule_name, per_element, steps=5, in_place=in_place)
        for a, b in zip(scalar, elementwise, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


def test_differentiable_update_reaches_every_hyperparameter():
    params, loss = problem()
    params = [p.requires_grad_() for p in params]
    lr, wd, momentum = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.1, 0.01, 0.9))
    state = RULES["sgd"].init_state(params)
    for _ in range(3):
        grads = torch.autograd.grad(loss(params), params, create_graph=True)
        params, state = RULES["sgd"].update(params, list(grads), state,
                                            dict(lr=lr, weight_decay=wd, momentum=momentum))
    grads = torch.autograd.grad(loss(params), [lr, wd, momentum])
    assert all(torch.isfinite(g) and g != 0 for g in grads)
