"""MetaModule: outer gradients against hand-written unrolls, eval mode, and real DDP processes."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.func import grad

from onepass import distributed, launch, meta_learning, meta_scaling
from tests.conftest import run_cli

DTYPE = torch.float64


def toy(seed: int = 0, task_seed: int = 1) -> meta_learning.MetaModule:
    return meta_learning.learned_dataset_meta_module(20, 2, 3, 0.1, torch.Generator().manual_seed(seed),
                                            torch.Generator().manual_seed(task_seed), DTYPE)


def bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, labels)


def test_cavia_outer_gradient_equals_a_torch_func_unroll():
    module = toy()
    outer = bce(module(), module.module.Y)
    (got,) = torch.autograd.grad(outer, module.module.X)

    draw = meta_learning.classifier_draw(2, torch.Generator().manual_seed(1), DTYPE)()      # the same classifier
    labels = module.module.Y

    def inner_loss(w: torch.Tensor, b: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return bce(X @ w + b, labels)

    def outer_loss(X: torch.Tensor) -> torch.Tensor:
        w, b = draw["w"], draw["b"]
        for _ in range(3):
            gw, gb = grad(inner_loss, argnums=(0, 1))(w, b, X)
            w, b = w - 0.1 * gw, b - 0.1 * gb
        return inner_loss(w, b, X)

    expected = grad(outer_loss)(module.module.X.detach())
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_maml_outer_gradient_equals_a_hand_written_unroll():
    torch.manual_seed(0)
    inputs, targets = torch.randn(16, 3, dtype=DTYPE), torch.randn(16, 1, dtype=DTYPE)
    net = nn.Linear(3, 1).to(DTYPE)
    module = meta_learning.MetaModule(net, inner_loss=lambda m: nn.functional.mse_loss(m(inputs), targets),
                             inner_optimiser=lambda params: torch.optim.SGD(params, lr=0.05), inner_steps=2,
                             output=lambda m: m(inputs))
    got = torch.autograd.grad(nn.functional.mse_loss(module(), targets), list(net.parameters()))

    weight, bias = (p.detach().clone().requires_grad_() for p in net.parameters())
    w, b = weight, bias
    for _ in range(2):
        gw, gb = torch.autograd.grad(nn.functional.mse_loss(inputs @ w.T + b, targets), (w, b), create_graph=True)
        w, b = w - 0.05 * gw, b - 0.05 * gb
    expected = torch.autograd.grad(nn.functional.mse_loss(inputs @ w.T + b, targets), (weight, bias))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=0)


def test_eval_mode_builds_no_higher_order_graph():
    module = toy().eval()
    logits = module()
    (grad,) = torch.autograd.grad(logits.sum(), module.module.X)
    # Without a graph through the adaptation, d(X w + b)/dX is the adapted w on every row.
    assert torch.allclose(grad, grad[:1].expand_as(grad))
    module.train()
    (grad,) = torch.autograd.grad(module().sum(), module.module.X)
    assert not torch.allclose(grad, grad[:1].expand_as(grad))


def _gradients(rank: int) -> dict:
    """The DDP outer gradient, this rank's own single-process gradient, and its first classifier.
    (A function of its own: the DDP wrapper must be gone before the process group is.)"""
    local = toy(seed=0, task_seed=100 + rank)
    wrapped = torch.nn.parallel.DistributedDataParallel(toy(seed=0, task_seed=100 + rank))
    (alone,) = torch.autograd.grad(bce(local(), local.module.Y), local.module.X)
    bce(wrapped(), wrapped.module.module.Y).backward()
    return {"ddp": wrapped.module.module.X.grad.tolist(), "alone": alone.tolist(),
            "w": wrapped.module.module.w.tolist()}


def _rank_gradients(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank of the test below: writes `_gradients` to `out`.<rank>."""
    context = launch.join_local_group(rank, world_size, port)
    try:
        with open(f"{out}.{rank}", "w") as file:
            json.dump(_gradients(rank), file)
        distributed.shutdown(finished=True)
        distributed.exit_process(0)
    finally:
        distributed.shutdown()
        del context


@pytest.mark.slow
def test_ddp_averages_outer_gradients_of_per_rank_tasks(tmp_path):
    out = str(tmp_path / "rank")
    with launch.local_rendezvous() as store:
        torch.multiprocessing.spawn(_rank_gradients, args=(2, store.port, out), nprocs=2)
    ranks = [json.loads(open(f"{out}.{rank}").read()) for rank in range(2)]
    ddp = [torch.tensor(r["ddp"], dtype=DTYPE) for r in ranks]
    torch.testing.assert_close(ddp[0], ddp[1], rtol=0, atol=0)                      # identical on every rank
    average = (torch.tensor(ranks[0]["alone"], dtype=DTYPE) + torch.tensor(ranks[1]["alone"], dtype=DTYPE)) / 2
    torch.testing.assert_close(ddp[0], average, rtol=1e-12, atol=1e-15)             # = mean of per-rank grads
    assert ranks[0]["w"] != ranks[1]["w"]                                           # each rank its own task


@pytest.mark.slow
def test_meta_dataset_config_runs_on_one_and_two_processes(tmp_path):
    for nproc in ("1", "2"):
        result = run_cli("meta_learning.py", "-c", "configs/meta_dataset.yaml", "--seed", "4", "--nproc", nproc,
                         "--set", "meta.outer_steps=100", "--set", "meta.evaluation_tasks=50",
                         "-l", str(tmp_path / nproc))
        assert result.returncode == 0, result.stderr
        assert "50 fresh classifiers after 3 steps: accuracy" in result.stdout
        run_dir = next((tmp_path / nproc).rglob("metrics.json")).parent
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert 0 <= metrics["final"]["Meta/Adapted_Accuracy"] <= 1 and metrics["world_size"] == int(nproc)
        assert (run_dir / "learned_dataset.pt").is_file()


@pytest.mark.slow
def test_scaling_command_writes_figure_and_table(tmp_path):
    result = run_cli("meta_scaling.py", "--world-sizes", "1", "2", "--seeds", "1", "--out", str(tmp_path),
                     "--set", "meta.outer_steps=20", "--set", "meta.evaluation_tasks=20")
    assert result.returncode == 0, result.stderr
    for name in ("figure.png", "figure.pdf"):
        assert (tmp_path / name).stat().st_size > 10_000
    rows = (tmp_path / "results.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in rows[2:]] == ["1", "2"]
    run_dir = next((tmp_path / "world1").rglob("config.json")).parent
    assert meta_scaling.axis_texts(meta_scaling.meta_settings(run_dir)) == (      # was "500 outer steps" always
        "accuracy after 3 inner steps", "20 fresh classifiers,\n20 outer steps")
