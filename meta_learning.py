"""Meta-learning by differentiating through gradient updates, inside a module's forward pass.

`MetaModule` wraps a module so that its forward runs a differentiable inner loop and returns the
adapted module's output (the recipe of "higher-order gradients, parallelized"):

1. inner-only parameters (CAVIA's beta) are created afresh and registered on the module; with
   none, the inner loop adapts the module's own parameters (MAML, theta = beta);
2. `higher.innerloop_ctx(..., copy_initial_weights=False)` patches the module so that the graph
   starts at its *registered* parameters, and the inner optimiser takes `inner_steps` steps;
3. the final forward pass of the adapted module is returned.

Because the whole inner loop happens inside forward, a DistributedDataParallel wrapper sees an
ordinary forward and backward and averages the outer gradient over ranks. Running the inner loop
outside the wrapped module's forward (calling `inner_loop` yourself on a DDP-wrapped model) would
skip DDP's all-reduce silently: it is not supported. In eval mode no higher-order graph is built.

Run as a command, it learns a dataset that fresh classifiers learn fast (configs/meta_dataset.yaml),
on one process or N (--nproc N, or torchrun), logged like a training run:

    python meta_learning.py -c configs/meta_dataset.yaml [--nproc 4] [--set meta.outer_steps=100]
"""
from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import higher
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from onepass import distributed, launch, run_files, util
from onepass.schema import Config, ConfigError


class MetaModule(nn.Module):
    def __init__(self, module: nn.Module, inner_loss: Callable[[nn.Module], torch.Tensor],
                 inner_optimiser: Callable[[list[nn.Parameter]], torch.optim.Optimizer], inner_steps: int,
                 output: Callable[[nn.Module], torch.Tensor],
                 inner_parameters: Callable[[], dict[str, torch.Tensor]] | None = None):
        super().__init__()
        self.module = module
        self.inner_loss, self.output = inner_loss, output
        self.inner_optimiser, self.inner_steps = inner_optimiser, inner_steps
        self.inner_parameters = inner_parameters

    def forward(self) -> torch.Tensor:
        if self.inner_parameters is None:                     # MAML: adapt the outer parameters
            adapted = list(self.module.parameters())
        else:                                                 # CAVIA: fresh inner-only parameters
            adapted = []
            for name, value in self.inner_parameters().items():
                self.module.register_parameter(name, nn.Parameter(value))
                adapted.append(getattr(self.module, name))
        optimiser = self.inner_optimiser(adapted)
        caller_grad_mode = torch.is_grad_enabled()
        with torch.enable_grad(), higher.innerloop_ctx(   # adapting takes gradients even when evaluating
                self.module, optimiser, copy_initial_weights=False,
                track_higher_grads=self.training) as (patched, differentiable_optimiser):
            for _ in range(self.inner_steps):
                differentiable_optimiser.step(self.inner_loss(patched))
            with torch.set_grad_enabled(caller_grad_mode):
                return self.output(patched)


class LearnedDataset(nn.Module):
    """The toy of the recipe: a learned dataset X (points x dimensions) with fixed labels, half 0
    and half 1, classified by a linear model (w, b) that is an inner-only parameter."""

    def __init__(self, points: int, dimensions: int, generator: torch.Generator, dtype: torch.dtype):
        super().__init__()
        self.X = nn.Parameter(torch.randn(points, dimensions, generator=generator, dtype=dtype))
        self.register_buffer("Y", torch.cat([torch.zeros(points // 2, dtype=dtype),
                                             torch.ones(points - points // 2, dtype=dtype)]))

    @staticmethod
    def logits(module: nn.Module) -> torch.Tensor:
        return module.X @ module.w + module.b

    @staticmethod
    def loss(module: nn.Module) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(LearnedDataset.logits(module), module.Y)


def classifier_draw(dimensions: int, generator: torch.Generator, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> Callable[[], dict]:
    """A fresh random linear classifier (w, b) per call, from `generator` (seeded per rank; a CPU
    generator, so the draws do not depend on the device), on `device`."""
    def draw() -> dict[str, torch.Tensor]:
        return {"w": torch.randn(dimensions, generator=generator, dtype=dtype).to(device),
                "b": torch.randn(1, generator=generator, dtype=dtype).to(device)}
    return draw


def learned_dataset_meta_module(points: int, dimensions: int, inner_steps: int, inner_lr: float,
                                dataset_generator: torch.Generator, task_generator: torch.Generator,
                                dtype: torch.dtype = torch.float32,
                                device: torch.device | str = "cpu") -> MetaModule:
    """The toy as a MetaModule: forward returns the logits of a freshly drawn classifier after
    `inner_steps` SGD steps on the learned dataset."""
    return MetaModule(LearnedDataset(points, dimensions, dataset_generator, dtype).to(device),
                      inner_loss=LearnedDataset.loss,
                      inner_optimiser=lambda params: torch.optim.SGD(params, lr=inner_lr),
                      inner_steps=inner_steps, output=LearnedDataset.logits,
                      inner_parameters=classifier_draw(dimensions, task_generator, dtype, device))


def train_learned_dataset(cfg: Config, context: distributed.Context, log: run_files.RunLog | None,
                          device: torch.device | None = None) -> dict:
    """The toy task: learn the dataset so that fresh classifiers learn it in `inner_steps` steps.

    Every rank draws its own classifier each outer step (a generator seeded per rank), so N
    processes see N tasks per outer step; DistributedDataParallel averages the dataset's gradient.
    Runs on `device` (default: the context's, a rank's own GPU under NCCL).
    """
    device = device or context.device
    meta, dtype = cfg.meta, getattr(torch, cfg.dtype)
    dataset_generator = torch.Generator().manual_seed(cfg.seed)
    task_generator = torch.Generator().manual_seed(cfg.seed + 1 + context.rank)
    meta_module = learned_dataset_meta_module(meta.points, meta.dimensions, meta.inner_steps, meta.inner_lr,
                                              dataset_generator, task_generator, dtype, device)
    model = DistributedDataParallel(meta_module) if context.active else meta_module
    optimiser = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[meta.outer_optimiser](
        [meta_module.module.X], lr=meta.outer_lr)
    labels = meta_module.module.Y
    start = time.perf_counter()
    for step in range(meta.outer_steps):
        optimiser.zero_grad(set_to_none=True)
        loss = nn.functional.binary_cross_entropy_with_logits(model(), labels)
        loss.backward()                                   # DDP averages d loss / d X over ranks
        optimiser.step()
        if step % cfg.log_every == 0:
            (mean_loss,) = distributed.all_reduce_([loss.detach().reshape(1) / context.world_size], context)
            if log is not None:
                log.scalars(step, {"Meta/Outer_Loss": mean_loss.item()})
    train_seconds = time.perf_counter() - start
    final = evaluate_learned_dataset(meta_module, meta.evaluation_tasks, cfg.seed)
    if log is not None:
        log.scalars(meta.outer_steps, final)
        torch.save({"X": meta_module.module.X.detach(), "Y": labels}, log.run_dir / "learned_dataset.pt")
    return {"status": "completed", "outer_steps": meta.outer_steps, "train_seconds": train_seconds,
            "final": final}


def evaluate_learned_dataset(meta_module: MetaModule, tasks: int, seed: int) -> dict[str, float]:
    """Mean accuracy and loss of `tasks` fresh classifiers, each adapted on the learned dataset
    (no higher-order graph). The classifiers depend on the seed alone, not on the world size."""
    evaluation = copy.deepcopy(meta_module).eval()
    evaluation.inner_parameters = classifier_draw(evaluation.module.X.shape[1],
                                                  torch.Generator().manual_seed(seed + 10**6),
                                                  evaluation.module.X.dtype, evaluation.module.X.device)
    labels = evaluation.module.Y
    accuracy = loss = 0.0
    with torch.no_grad():
        for _ in range(tasks):
            logits = evaluation()
            accuracy += ((logits > 0).to(labels.dtype) == labels).to(labels.dtype).mean().item() / tasks
            loss += nn.functional.binary_cross_entropy_with_logits(logits, labels).item() / tasks
    return {"Meta/Adapted_Accuracy": accuracy, "Meta/Adapted_Loss": loss}


class LearnedDatasetJob:
    """meta_learning.py as a launch.Job: learn a dataset that classifiers learn fast."""
    name = "meta_learning.py"
    interruptible = False        # no windows to stop between: a signal ends it at once

    def check(self, cfg: Config, args: argparse.Namespace) -> None:
        if cfg.task != "meta_dataset":
            raise ConfigError(f"task = {cfg.task!r}: meta_learning.py runs task: meta_dataset "
                              f"(e.g. -c configs/meta_dataset.yaml); train.py runs the others")
        if args.save_state or args.load_state:
            raise ConfigError("-S/-s: checkpoints are for hyperparameter optimisation runs, not task: meta_dataset")

    def run(self, cfg: Config, args: argparse.Namespace, context: distributed.Context,
            stop_requested: Callable[[], object]) -> tuple[Path | None, dict]:
        self.check(cfg, args)
        cfg = replace(util.seeded(cfg), threads=cfg.threads or 1)       # a model of a few hundred parameters
        torch.set_num_threads(cfg.threads)
        run_dir, log = run_files.open_run(cfg, context)
        try:
            device = context.device if context.active else distributed.resolve_device(cfg.device)
            metrics = train_learned_dataset(cfg, context, log, device)
            return run_dir, run_files.close_run(run_dir, log, metrics, cfg, context)
        finally:
            if log is not None:
                log.release()

    @staticmethod
    def summary(run_dir: Path | None, cfg: Config, metrics: dict) -> str:
        final = metrics["final"]
        processes = f", {metrics['world_size']} processes" if metrics["world_size"] > 1 else ""
        return "\n".join([
            f"Learned dataset ({cfg.meta.points} points): {metrics['status']} after {metrics['outer_steps']} outer "
            f"steps in {metrics['train_seconds']:.1f} s (seed {metrics['seed']}{processes})",
            f"  {cfg.meta.evaluation_tasks} fresh classifiers after {cfg.meta.inner_steps} steps: accuracy "
            f"{final['Meta/Adapted_Accuracy']:.4f}, loss {final['Meta/Adapted_Loss']:.4f}",
            f"  logs                  {run_dir}  (config.json, metrics.json, learned_dataset.pt, TensorBoard)"])


def main(argv: list[str] | None = None) -> int:
    return launch.main(LearnedDatasetJob(), argv)


if __name__ == "__main__":
    distributed.exit_process(util.run_command(main))
