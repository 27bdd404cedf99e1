"""Train a network while tuning its weight-update hyperparameters.

    python train.py -c configs/uci_energy.yaml configs/Random.yaml [--seed 0] [--set key=value]

One run = `hyperparameter_steps` windows of `network_weight_steps` (T) weight steps; after each
window the configured algorithm takes one hyperparameter step. Scalars are logged to TensorBoard
at global weight-step indices: per-step tags every `log_every` steps (measured before that step's
update) plus at the final step H*T; `Last_*` tags at every hyperparameter step h, holding the
measurement at step (h+1)*T, i.e. of the weights that window h produced: its hyperparameters,
hypergradients and training-batch metrics always, its held-out metrics when step (h+1)*T is one of
the `log_every` measurements (every window of T >= log_every steps). Held-out sets are measured on
the same cadence for every algorithm: a run of one-step windows (Baydin) measures no more often.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import multiprocessing.connection
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import algorithms
import config
import datasets
import distributed
import measure
import meta_learning
import models
import schema
import util
from algorithms.hyperparameters import Hyperparameters
from algorithms.hyperparameters import tag as hyperparameter_tag
from algorithms.steps import Problem, Step, Weights
from algorithms.weight_update import RULES, clip_gradient_norm, detached
from config import Config, ConfigError


@dataclass
class Setup:
    """Everything a run needs, built (and checked) before its run directory exists."""
    cfg: Config
    device: torch.device
    splits: datasets.Splits
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_device(name: str) -> torch.device:
    """The configured device, with its index: `cuda` (and `auto` where CUDA is available) is the
    process's current GPU, which a rank of several sets to its own (distributed.rank_device)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r}, but CUDA is not available here; use --device cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device = {name!r}, but only {torch.cuda.device_count()} GPU(s) are visible here "
                          f"(numbered from 0; CUDA_VISIBLE_DEVICES chooses them)")
    return device


def prepare(cfg: Config) -> Setup:
    """Seed, load the data and build the model; raises ConfigError on anything a user must fix."""
    if cfg.seed is None:
        cfg = replace(cfg, seed=secrets.randbelow(2**31))
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.dtype)
    splits = datasets.make_splits(cfg.dataset, dtype, device)
    if (splits.task == "regression") == (cfg.loss == "cross_entropy"):
        raise ConfigError(f"loss = {cfg.loss!r} does not suit the {splits.task} dataset '{cfg.dataset.name}'")
    if splits.task == "language_model" and cfg.batch_size is None:
        raise ConfigError(f"batch_size: the language-model dataset '{cfg.dataset.name}' needs a batch_size (the "
                          f"truncated-BPTT length, e.g. 70)")
    datasets.check_batch_size(cfg.batch_size, splits.train)
    model = models.build(cfg.model, splits.input_shape, splits.num_outputs).to(device=device, dtype=dtype)
    loss_fn = models.build_loss(cfg.loss)
    measure.check_fit(model, loss_fn, splits, f"model.name = {cfg.model.name!r}", cfg.loss)
    cfg = replace(cfg, threads=cfg.threads or default_threads(model))
    torch.set_num_threads(cfg.threads)
    return Setup(cfg, device, splits, model, loss_fn)


SMALL_MODEL = 1_000_000     # parameters; below this, one thread is fastest (bench/RESULTS.md, threads)


def default_threads(model: nn.Module) -> int:
    """One thread for a small model (more only add synchronisation, and oversubscribe a busy
    machine), else this process's share of the cores."""
    small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL
    return 1 if small else util.core_share()


class Learner:
    """The training loop: T weight steps, one hyperparameter step, repeated H times.

    The Learner owns the weights (the model's parameters), the weight-update rule's state and the
    hyperparameters; the algorithm decides how the last steps of each window are taken and turns
    them into a hyperparameter step.
    """

    def __init__(self, setup: Setup, log: util.RunLog | None = None,
                 context: distributed.Context = distributed.SINGLE):
        cfg = self.cfg = setup.cfg
        self.device = setup.device
        self.model, self.loss_fn, self.splits = setup.model, setup.loss_fn, setup.splits
        self.log = log
        self.context = context
        distributed.synchronise_batch_norm(self.model, context)
        # One generator per stream: the training order must not depend on how often the others are read.
        self.train_batches = self._stream(self.splits.train, 1)
        self.validation_batches = None
        if self.splits.validation is not None and not cfg.dataset.full_validation:
            self.validation_batches = self._stream(self.splits.validation, 2)
        self.test_batches = None
        if cfg.dataset.test_batch_size is not None:
            self.test_batches = self._stream(self.splits.test, 4, cfg.dataset.test_batch_size)
        self.meter = measure.Meter(self.model, self.loss_fn, self.splits, context, cfg.batch_size,
                                   self.validation_batches, self.test_batches)
        hyper_split = self.splits.train if cfg.tuning.validation_data == "training" else self.splits.validation
        self.hyper_batches = self._stream(hyper_split, 3) if hyper_split is not None else None
        self.names = [name for name, _ in self.model.named_parameters()]
        self.params = list(self.model.parameters())
        self.rule = RULES[cfg.optimiser.name]
        self.rule_state = self.rule.init_state(self.params)
        self.hyperparameters = Hyperparameters(cfg, self.rule.hyperparameters, self.params)
        self.fast_hyperparameters = self.hyperparameters.natural_values()   # refreshed every window
        self.problem = Problem(self._loss_at, self._validation_loss_at, self.rule, cfg.optimiser.gradient_clip,
                               context, distributed.couples_ranks(self.model))
        self.algorithm = algorithms.build(cfg.tuning, self.problem, self.hyperparameters, self.params, self.rule_state,
                                          window_steps=cfg.network_weight_steps)
        self.steps_done = 0
        self.windows_done = 0
        self.logged_at: int | None = None      # a step whose measurement finish() has logged
        self.after_window: Callable[[Learner], None] | None = None   # e.g. a periodic checkpoint
        self.stop_requested: Callable[[], bool] | None = None   # asked between windows, e.g. on SIGTERM
        self.status = "running"
        self._window_hyperparameters: dict[str, float] = {}
        self.train_seconds = 0.0     # over every segment of a resumed run, up to the last window done
        self.segments = 1            # 1 + the resumptions of this run
        self.show_progress = context.is_rank0

    def _streams(self) -> dict[str, datasets.BatchStream | datasets.SequenceStream]:
        named = {"train": self.train_batches, "validation": self.validation_batches, "hyper": self.hyper_batches,
                 "test": self.test_batches}
        return {name: stream for name, stream in named.items() if stream is not None}

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit for bit (between windows). Collective
        under DDP (recurrent states are gathered from every rank): call it on all ranks."""
        return {
            "steps_done": self.steps_done, "windows_done": self.windows_done, "logged_at": self.logged_at,
            "model": self.model.state_dict(), "rule_state": self.rule_state,
            "hyperparameters": self.hyperparameters.state_dict(), "algorithm": self.algorithm.state_dict(),
            "streams": {name: stream.state_dict() for name, stream in self._streams().items()},
            "torch_rng": torch.get_rng_state(), "window_hyperparameters": self._window_hyperparameters,
            "train_seconds": self.train_seconds, "segments": self.segments,
        } | ({"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {})

    def load_state_dict(self, state: dict) -> None:
        self.steps_done, self.windows_done = state["steps_done"], state["windows_done"]
        self.logged_at = state["logged_at"]
        self.model.load_state_dict(state["model"])
        self.rule_state = state["rule_state"]
        self.hyperparameters.load_state_dict(state["hyperparameters"])
        self.algorithm.load_state_dict(state["algorithm"])
        for name, stream in self._streams().items():
            stream.load_state_dict(state["streams"][name])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self._window_hyperparameters = state["window_hyperparameters"]
        self.train_seconds, self.segments = state.get("train_seconds", 0.0), state.get("segments", 1) + 1

    def _stream(self, split: datasets.Split, offset: int,
                batch_size: int | None = None) -> datasets.BatchStream | datasets.SequenceStream:
        generator = torch.Generator().manual_seed(self.cfg.seed + offset)
        return datasets.stream(split, batch_size or self.cfg.batch_size, generator, self.context)

    # -- weight steps -----------------------------------------------------------------------------

    def _loss_at(self, weights: Weights, batch: datasets.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs, this rank's loss) with `weights` in place of the model's parameters (the model
        itself when they are its parameters: functional_call costs tens of microseconds)."""
        substitutes = None if weights is self.params else dict(zip(self.names, weights, strict=True))
        outputs = measure.forward(self.model, batch, substitutes)
        return outputs, measure.local_loss(self.loss_fn, outputs, batch)

    def _validation_loss_at(self, weights: Weights, batch: datasets.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.eval()
        return self._loss_at(weights, batch)

    def fast_step(self, batch: datasets.Batch) -> Step:
        """An untracked step, in place: the gradient summed over ranks (clipped when configured),
        then the rule's foreach update."""
        outputs = measure.forward(self.model, batch)
        loss = measure.local_loss(self.loss_fn, outputs, batch)
        gradient = distributed.all_reduce_(list(torch.autograd.grad(loss, self.params)), self.context)
        clipped = clip_gradient_norm(gradient, self.cfg.optimiser.gradient_clip)
        self.rule.update_(self.params, clipped, self.rule_state, self.fast_hyperparameters)
        return Step(self.params, self.params, self.rule_state, outputs, loss, gradient)   # (one list: in place)

    def weight_step(self, take_step: Callable[[datasets.Batch], Step]) -> tuple[Step, datasets.Batch]:
        """`take_step` on the next training batch, in training mode."""
        batch = next(self.train_batches)
        if not self.model.training:    # measuring leaves eval mode behind; switch back only then
            self.model.train()
        step = take_step(batch)
        self.steps_done += 1
        return step, batch

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train for H windows of T steps, logging as configured; returns the final metrics."""
        self.train_windows()
        return self.finish()

    def train_windows(self) -> float:
        """The windows still to do (all H of them, unless resumed); returns the seconds they took
        (`train_seconds` adds them to those of earlier segments).

        The measurement at step (h+1)*T (the weights window h produced) is logged twice: as the
        per-step tags at that step, when due, and as the Last_* tags of hyperparameter step h,
        with the hyperparameters window h used. With log_every = T that is one measurement per window.
        """
        cfg, T = self.cfg, self.cfg.network_weight_steps
        tracked = self.algorithm.tracked_steps
        start, seconds_before = time.perf_counter(), self.train_seconds
        progress = util.Progress(cfg.total_weight_steps, self.steps_done, self.name, "step",
                                 enabled=self.show_progress)
        for h in range(self.windows_done, cfg.hyperparameter_steps):
            self._start_window(h)
            self._log_histograms(h)
            for s in range(T - tracked):
                last = self._logged_step(h, s, self.fast_step)
            if tracked:
                last = self._tracked_steps(h, T - tracked, T)
            # Ranks agree on a stop request in the all-reduce of the divergence check, so that all
            # stop after the same window; one process asks after the window's bookkeeping (where a
            # callback, after_window, may ask to stop).
            asked_here = self.context.active and self._stop_asked()
            summed = torch.cat([last.loss.detach().reshape(1), last.loss.new_full((1,), float(asked_here))])
            last_loss, asked_anywhere = distributed.all_reduce_([summed], self.context)[0].tolist()
            if not math.isfinite(last_loss):
                self.status = "diverged"
                break
            if self.algorithm.optimises:
                self._window_hyperparameters |= self.algorithm.hyper_step(last, next(self.hyper_batches))
            if tracked:
                self.rule_state = detached(last.rule_state)
            del last                      # with the graph of the tracked steps: none outlives its window
            self.hyperparameters.end_window()
            self.windows_done += 1
            self.train_seconds = seconds_before + time.perf_counter() - start
            if self.after_window is not None:
                self.after_window(self)
            progress.update(T, functools.partial(self._status_line, last_loss))
            if asked_anywhere or (not self.context.active and self._stop_asked()):
                self.status = "interrupted"      # between windows: a checkpoint now resumes bit for bit
                break
        if time.perf_counter() - start >= progress.every:       # long runs measure long splits: say so
            progress.write(f"{self.name}: measuring the final weights on the whole splits")
        progress.close()
        self.train_seconds = seconds_before + time.perf_counter() - start
        return time.perf_counter() - start

    @property
    def name(self) -> str:
        return f"{self.cfg.algorithm} on {self.cfg.dataset.name}"

    def _status_line(self, loss: float) -> str:
        values = "  ".join(f"{tag.split('/')[1].lower()} {value:.3g}"
                           for tag, value in self._window_hyperparameters.items() if tag.startswith("Hyperparameter/"))
        return f"loss {loss:.4g}  {values}"

    def _stop_asked(self) -> bool:
        return self.stop_requested is not None and bool(self.stop_requested())

    def _start_window(self, h: int) -> None:
        restart = self.algorithm.start_window(h)
        if restart is not None:
            weights, self.rule_state = restart
            with torch.no_grad():
                torch._foreach_copy_(self.params, weights)
        self._previous_window_hyperparameters = self._window_hyperparameters
        self._window_hyperparameters = self.hyperparameters.log_values()
        self.fast_hyperparameters = self.hyperparameters.natural_values()

    def _tracked_steps(self, h: int, first: int, T: int) -> Step:
        """Steps `first`..T-1 of window h through the algorithm, from detached copies of the
        weights; the model's parameters follow their values (for measurements). Returns the last."""
        weights, state = [p.detach().clone().requires_grad_() for p in self.params], self.rule_state
        for s in range(first, T):
            last = self._logged_step(h, s, functools.partial(self.algorithm.track, weights, state))
            weights, state = last.weights, last.rule_state
            with torch.no_grad():
                torch._foreach_copy_(self.params, weights)
        return last

    def _logged_step(self, h: int, s: int, take_step: Callable[[datasets.Batch], Step]) -> Step:
        """Weight step h*T + s, measured and logged when due."""
        index = h * self.cfg.network_weight_steps + s
        due, closes_previous = index % self.cfg.log_every == 0, s == 0 and h > 0
        # Held-out sets are measured at this step's weights, before its update.
        held_out = self.meter.held_out() if due else {}
        step, batch = self.weight_step(take_step)
        if (due or closes_previous) and index != self.logged_at:
            training = self.meter.batch_metrics(step.outputs, batch, step.loss)
            scalars = self.meter.to_scalars({"Training": training} | held_out)
            if due:
                self._log(index, scalars | self._window_hyperparameters)
            if closes_previous:
                self._log_last(h - 1, scalars | self._previous_window_hyperparameters)
        return step

    def finish(self) -> dict:
        """Measure the final weights on whole splits, log them at step H*T (and as the last
        window's Last_* tags), return the metrics."""
        if self.status == "running":
            self.status = "completed"
        final = self.meter.evaluate(self.meter.whole(self.splits.train))
        scalars = self.meter.to_scalars({"Training": final} | self.meter.held_out(whole=True))
        self._log(self.steps_done, scalars | self.hyperparameters.log_values())
        self._log_last((self.steps_done - 1) // self.cfg.network_weight_steps, scalars | self._window_hyperparameters)
        self.logged_at = self.steps_done
        return {
            "status": self.status,
            "weight_steps": self.steps_done,
            "weight_step_budget": self.cfg.weight_step_budget,     # what every algorithm compared trains for
            "train_seconds": self.train_seconds,
            "segments": self.segments,
            "final": {tag: util.finite_or_none(value)
                      for tag, value in (scalars | self.hyperparameters.log_values()).items()},
        }

    def hparams(self) -> tuple[dict, list[str]]:
        """The run's settings and the tags of its final results, for TensorBoard's HParams tab."""
        cfg = self.cfg
        values = {"algorithm": cfg.algorithm, "dataset": cfg.dataset.name, "seed": cfg.seed,
                  "network_weight_steps": cfg.network_weight_steps, "batch_size": cfg.batch_size or 0}
        values |= {f"initial_{name}": float(getattr(cfg.optimiser, name)) for name in self.hyperparameters.names}
        return values, self.meter.final_tags() + [hyperparameter_tag(name) for name in self.hyperparameters.names]

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        if self.log is not None:
            self.log.scalars(step, scalars)

    def _log_histograms(self, hyperparameter_step: int) -> None:
        """Every element of each high-dimensional hyperparameter, as used in this window."""
        if self.log is not None:
            for tag, values in self.hyperparameters.histograms().items():
                self.log.histogram(hyperparameter_step, tag, values)

    def _log_last(self, hyperparameter_step: int, scalars: dict[str, float]) -> None:
        self._log(hyperparameter_step, {f"Last_{tag}": value for tag, value in scalars.items()})


# -------------------------------------------------------------------------------------------------

def summary(run_dir: Path, cfg: Config, metrics: dict) -> str:
    """A few lines for the terminal: outcome, final metrics, hyperparameters, where the logs are."""
    final = metrics["final"]
    processes = f", {metrics['world_size']} processes" if metrics["world_size"] > 1 else ""
    if cfg.task == "meta_dataset":
        return "\n".join([
            f"Learned dataset ({cfg.meta.points} points): {metrics['status']} after {metrics['outer_steps']} outer "
            f"steps in {metrics['train_seconds']:.1f} s (seed {metrics['seed']}{processes})",
            f"  {cfg.meta.evaluation_tasks} fresh classifiers after {cfg.meta.inner_steps} steps: accuracy "
            f"{final['Meta/Adapted_Accuracy']:.4f}, loss {final['Meta/Adapted_Loss']:.4f}",
            f"  logs                  {run_dir}  (config.json, metrics.json, learned_dataset.pt, TensorBoard)"])
    segments = f" over {metrics['segments']} segments" if metrics.get("segments", 1) > 1 else ""
    rows = [f"{cfg.algorithm} on {cfg.dataset.name}: {metrics['status']} after {metrics['weight_steps']} "
            f"weight steps in {metrics['train_seconds']:.1f} s{segments} (seed {metrics['seed']}, "
            f"{metrics['threads']} thread{'s' if metrics['threads'] > 1 else ''}{processes})",
            f"  {'':<22}{'training':>12}{'validation':>12}{'test':>12}"]
    for metric, label in [("Loss", "loss"), ("Unnormalised_Loss", "loss in target units"),
                          ("Accuracy", "accuracy"), ("Perplexity", "perplexity")]:
        tags = [f"{metric}/{split}" for split in ("Training", "Validation", "Test")]
        if any(tag in final for tag in tags):
            rows.append(f"  {label:<22}" + "".join(_cell(final, tag) for tag in tags))
    rows += ["  hyperparameters       " + "  ".join(
                 f"{tag.split('/')[1].lower()} {'nan' if value is None else format(value, '.4g')}"
                 for tag, value in final.items() if tag.startswith("Hyperparameter/")),
             f"  logs                  {run_dir}  (config.json, metrics.json, TensorBoard events)",
             f"  view them with        tensorboard --logdir {cfg.log_root}"]
    return "\n".join(rows)


def _cell(final: dict, tag: str) -> str:
    if tag not in final:
        return f"{'-':>12}"
    return f"{'nan' if final[tag] is None else format(final[tag], '.6g'):>12}"


# Keys a resumed run may change: how long it goes on, where it logs, how it reports. Not the seed: a
# resumption continues the checkpoint's (`resumed` takes it when none is given).
RESUMABLE_KEYS = {"hyperparameter_steps", "log_root", "run_group_name", "run_name", "device", "log_every", "threads"}


# What `save_checkpoint` writes besides the optional keys (CUDA generator state, segment times).
CHECKPOINT_KEYS = {"config", "run_dir", "steps_done", "windows_done", "logged_at", "model", "rule_state",
                   "hyperparameters", "algorithm", "streams", "torch_rng", "window_hyperparameters"}


def one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut to `limit` characters (library messages run long)."""
    return config.short(" ".join(str(error).split()) or type(error).__name__, limit)


def differing_keys(saved: dict, current: dict) -> list[str]:
    """The config keys (other than RESUMABLE_KEYS) on which two config dicts differ."""
    saved, current = util.flatten(saved), util.flatten(current)
    return sorted(key for key in saved.keys() | current.keys()
                  if key.split(".")[0] not in RESUMABLE_KEYS and saved.get(key) != current.get(key))


def resumed(path: str, cfg: Config) -> tuple[Config, dict]:
    """The config that resumes the checkpoint at `path` (with the checkpoint's seed where `cfg` has
    none: the seed its run was started with), and the checkpoint."""
    checkpoint = load_checkpoint(path, cfg)
    return replace(cfg, seed=checkpoint["config"]["seed"]), checkpoint


def load_checkpoint(path: str, cfg: Config) -> dict:
    """Read a checkpoint written by `save_checkpoint`, refusing one made under another config (a
    seed of None matches any), and anything else (damaged, crafted, truncated, edited) as one
    ConfigError."""
    if not Path(path).is_file():
        raise ConfigError(f"-s {path}: no such checkpoint file")
    damaged = f"-s {path}: not a checkpoint written by train.py -S"
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:   # damaged or crafted bytes can raise almost anything; nothing in them runs
        raise ConfigError(f"{damaged} (it cannot be read safely: {type(error).__name__}); re-create it with -S FILE "
                          f"under this config") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("config"), dict):
        raise ConfigError(f"{damaged} (it holds a {type(checkpoint).__name__}, not a dict with a config); "
                          f"re-create it with -S FILE under this config")
    missing = sorted(CHECKPOINT_KEYS - checkpoint.keys())
    if missing:
        raise ConfigError(f"{damaged} (it lacks {', '.join(map(str, missing))}); re-create it with -S FILE")
    check_bookkeeping(path, checkpoint)
    current = config.to_dict(cfg if cfg.seed is not None else replace(cfg, seed=checkpoint["config"]["seed"]))
    different = differing_keys(checkpoint["config"], current)
    if different:
        raise ConfigError(f"-s {path}: the checkpoint was made with a different config; "
                          f"differing keys: {', '.join(different)}")
    check_progress(path, checkpoint, cfg)
    return checkpoint


def _count(value: object, least: int = 0) -> bool:
    return type(value) is int and value >= least         # not a bool, a float, a string


def _seconds(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


def _scalars(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(tag, str) and type(x) in (int, float) for tag, x in value.items())


def _event_file(value: object) -> bool:
    return isinstance(value, str) and Path(value).name == value and value.startswith(util.EVENTS_PREFIX)


# Each bookkeeping field of a checkpoint and what it must be.
BOOKKEEPING = {
    "steps_done": (_count, "an integer >= 0"),
    "windows_done": (_count, "an integer >= 0"),
    "logged_at": (lambda value: value is None or _count(value), "null or an integer >= 0"),
    "run_dir": (lambda value: isinstance(value, str) and value != "", "a folder name"),
    "window_hyperparameters": (_scalars, "a dict of tags and numbers"),
    "config.seed": (lambda value: _count(value) and value <= schema.MAX_SEED, "an integer seed >= 0"),
    "segments": (lambda value: _count(value, 1), "an integer >= 1"),
    "train_seconds": (_seconds, "a number of seconds >= 0"),
    "events": (lambda value: isinstance(value, dict), "a dict"),
    "events.file": (_event_file, f"an event file name ({util.EVENTS_PREFIX}...)"),
    "events.bytes": (_count, "an integer >= 0"),
}
OPTIONAL_FIELDS = {"segments", "train_seconds", "events"}     # absent from older checkpoints
_ABSENT = object()


def _field(checkpoint: dict, name: str) -> object:
    """The value at a dotted `name` of the checkpoint, or _ABSENT."""
    value = checkpoint
    for key in name.split("."):
        value = value.get(key, _ABSENT) if isinstance(value, dict) else _ABSENT
    return value


def _counters(state: object, name: str) -> Iterator[str]:
    """The dotted name of every integer (or bool) in a nested state: step counts, stream positions."""
    if isinstance(state, dict):
        for key, value in state.items():
            yield from _counters(value, f"{name}.{key}")
    elif isinstance(state, (list, tuple)):
        for index, value in enumerate(state):
            yield from _counters(value, f"{name}.{index}")
    elif isinstance(state, int):
        yield name


def edited(path: str, problem: str) -> ConfigError:
    """The one line for a checkpoint whose `problem` no run of train.py could have written."""
    return ConfigError(f"-s {path}: {problem}; the checkpoint is damaged or edited: re-create it with -S FILE")


def check_bookkeeping(path: str, checkpoint: dict) -> None:
    """Each bookkeeping field of a checkpoint, and every counter in its states, of its type and range:
    an edited or damaged one would otherwise resume into nonsense or fail mid-run."""
    fields = [(name, check, what) for name, (check, what) in BOOKKEEPING.items()
              if name.split(".")[0] not in OPTIONAL_FIELDS or name.split(".")[0] in checkpoint]
    fields += [(name, _count, "an integer >= 0") for part in ("rule_state", "hyperparameters", "algorithm", "streams")
               for name in _counters(checkpoint[part], part)]
    for name, check, what in fields:
        value = _field(checkpoint, name)
        if value is _ABSENT or not check(value):
            found = "missing" if value is _ABSENT else schema.short_repr(value)
            raise edited(path, f"its {name} is {found}, not {what}")


def check_progress(path: str, checkpoint: dict, cfg: Config) -> None:
    """The checkpoint's counters agree with each other and with this config: no more windows done
    than it asks for (the run would end past its own length)."""
    T, windows, steps = cfg.network_weight_steps, checkpoint["windows_done"], checkpoint["steps_done"]
    if not windows * T <= steps <= (windows + 1) * T:       # a diverged run stops after its window's steps
        raise edited(path, f"its steps_done = {steps} does not fit windows_done = {windows} of {T} steps")
    if checkpoint["logged_at"] is not None and checkpoint["logged_at"] > steps:
        raise edited(path, f"its logged_at = {checkpoint['logged_at']} lies after steps_done = {steps}")
    if windows > cfg.hyperparameter_steps:
        raise ConfigError(f"-s {path}: the checkpoint has done {windows} hyperparameter steps (windows_done), more "
                          f"than hyperparameter_steps = {cfg.hyperparameter_steps}; resume with "
                          f"--hyperparameter_steps {windows} or more")


def restore(learner: Learner, checkpoint: dict, path: str) -> None:
    """Load a checkpoint's state into the learner; a state that does not fit is a ConfigError."""
    try:
        learner.load_state_dict(checkpoint)
    except (RuntimeError, KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        raise ConfigError(f"-s {path}: its saved state does not fit this run ({one_line(error)}); re-create it "
                          f"with -S FILE under this config") from None


def resume_run_dir(path: str, checkpoint: dict, cfg: Config) -> Path:
    """The first run's directory, where a resumed run logs on. The checkpoint stores its name
    relative to the log root: it is taken under the log root the checkpoint was made with if a run
    of this config is there (its config.json), else under this run's log root. A checkpoint is
    data, not a place to write: a name leading outside its log root, or to another run's
    directory, is refused."""
    name, candidate = str(checkpoint["run_dir"]), None
    for root in (checkpoint["config"].get("log_root"), cfg.log_root):
        if isinstance(root, str):
            candidate = _below(path, Path(root), name)
            if _holds_run(candidate, checkpoint["config"]):
                return candidate
    if candidate.exists():
        raise ConfigError(f"-s {path}: its run directory {candidate} belongs to another run; resume with "
                          f"that run's own checkpoint, or move the checkpoint's run directory back there")
    return candidate


def _below(path: str, root: Path, name: str) -> Path:
    root = root.resolve()
    candidate = (root / name).resolve()
    if candidate == root or not candidate.is_relative_to(root):
        raise ConfigError(f"-s {path}: its run directory '{name}' lies outside the log root {root}; "
                          f"re-create the checkpoint with -S FILE")
    return candidate


def _holds_run(folder: Path, saved_config: dict) -> bool:
    """Whether `folder` is a run directory of the same config (up to the keys a resumption changes)."""
    try:
        logged = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(logged, dict) and not differing_keys(saved_config, logged)


def save_checkpoint(path: str, learner: Learner, run_dir: Path | None, context: distributed.Context) -> None:
    """Write the learner's complete state to `path` (rank 0, atomically); call it on every rank. The
    run directory is stored relative to the log root (see `resume_run_dir`)."""
    state = learner.state_dict()
    if context.is_rank0:
        name = None if run_dir is None else os.path.relpath(run_dir, learner.cfg.log_root)
        # Where its log was, so that a resumption can drop what was logged after (discard_events_after).
        events = {"events": learner.log.position()} if learner.log is not None else {}
        try:
            util.atomic_torch_save(state | {"config": config.to_dict(learner.cfg), "run_dir": name} | events,
                                   Path(path))
        except OSError as error:
            raise ConfigError(f"-S {path}: could not write the checkpoint ({error.strerror or error}); free some "
                              f"space, or choose another file with -S") from None


def check_outputs(cfg: Config, save_state: str | None) -> None:
    """Refuse, before anything runs, a log root or checkpoint file that cannot be written."""
    util.check_output_folder(Path(cfg.log_root), f"log_root = {cfg.log_root}", "choose another with -l DIR")
    if save_state:
        target = Path(save_state)
        if target.is_dir():
            raise ConfigError(f"-S {save_state}: is a folder; name a file in it, e.g. -S {target / 'state.pt'}")
        if not target.parent.is_dir():
            raise ConfigError(f"-S {save_state}: no folder {target.parent}; create it or choose another file")
        if not os.access(target.parent, os.W_OK | os.X_OK):
            raise ConfigError(f"-S {save_state}: the folder {target.parent} is not writable; choose another file")


def open_run(cfg: Config, context: distributed.Context, run_dir: Path | None = None,
             resumes: dict | None = None) -> tuple[Path | None, util.RunLog | None]:
    """Rank 0's run directory (a new one unless given), held by this process alone until its log is
    released, and its TensorBoard log; nothing elsewhere. A directory without a config.json (a new
    one, or one chosen by the caller) gets one. `resumes`: the log position of the checkpoint a
    resumption continues, to which the event files are cut back. A directory this call created is
    removed again if it fails (a full disk)."""
    if not context.is_rank0:
        return run_dir, None
    above = Path(cfg.log_root) / cfg.run_group if run_dir is None else run_dir.parent
    existing = next(folder for folder in (above, *above.parents) if folder.exists())
    new = run_dir is None or not run_dir.exists()
    try:
        if run_dir is None:
            run_dir = util.make_run_dir(cfg.log_root, cfg.run_group, cfg.run_name)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir, _open_log(cfg, run_dir, resumes)
    except OSError as error:
        if new:
            _remove_new(run_dir, above, existing)
        raise ConfigError(f"log_root = {cfg.log_root}: could not write the run directory {run_dir or above} "
                          f"({error.strerror or error}); {WRITE_ADVICE.get(error.errno, 'check its permissions')}, "
                          f"or choose another log root with -l DIR") from None


# What to do when a run directory cannot be written, by the error's errno.
WRITE_ADVICE = {errno.ENOSPC: "free some space", errno.EFBIG: "free some space", errno.EDQUOT: "free some space",
                errno.ELOOP: "remove the symbolic link planted in it (the run never writes through one)"}


def _open_log(cfg: Config, run_dir: Path, resumes: dict | None) -> util.RunLog:
    lock = util.hold_run_dir(run_dir)
    try:
        util.discard_events_after(run_dir, resumes)
        if not (run_dir / "config.json").is_file():
            util.write_json(run_dir / "config.json", config.to_dict(cfg))
        return util.RunLog(run_dir, lock=lock)
    except BaseException:
        lock.close()
        raise


def _remove_new(run_dir: Path | None, above: Path, existing: Path) -> None:
    """Remove a run directory this process created, and the folders above it that it created and
    that are still empty (others' runs may have appeared in them since)."""
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
    for folder in (above, *above.parents):
        if folder == existing:
            return
        with contextlib.suppress(OSError):
            folder.rmdir()


def close_run(run_dir: Path | None, log: util.RunLog | None, metrics: dict, cfg: Config,
              context: distributed.Context) -> dict:
    """Record the metrics and release the run directory (only then: it is the run's until they are
    written)."""
    metrics |= {"seed": cfg.seed, "threads": cfg.threads, "run_dir": str(run_dir), "world_size": context.world_size}
    if log is not None:
        log.close()
        util.write_json(run_dir / "metrics.json", metrics)
        log.release()
    return metrics


def train(cfg: Config, save_state: str | None = None, load_state: str | None = None,
          context: distributed.Context = distributed.SINGLE,
          checkpoint_every: int | None = None, run_dir: Path | None = None,
          show_progress: bool = True, stop_requested: Callable[[], bool] | None = None
          ) -> tuple[Path | None, dict]:
    """Run one configured job end to end (as one rank of `context`); returns the run directory
    (rank 0; None elsewhere) and the metrics. `load_state` resumes a checkpoint, logging on in its
    run directory; `save_state` writes one at the end, and every `checkpoint_every` hyperparameter
    steps if given. `run_dir` names the directory to log into (default: a new one under log_root).
    Only rank 0 writes anything, and shows progress unless `show_progress` is false (batches).
    `stop_requested`, asked after every window, ends the run there with status "interrupted"."""
    if cfg.task == "meta_dataset":
        return train_meta_dataset(cfg, context, save_state or load_state, run_dir)
    if run_dir is None:
        check_outputs(cfg, save_state)
    checkpoint = None
    if load_state:
        cfg, checkpoint = resumed(load_state, cfg)
    setup = prepare(cfg)
    cfg = setup.cfg
    learner = Learner(setup, context=context)
    learner.show_progress = context.is_rank0 and show_progress
    learner.stop_requested = stop_requested
    if checkpoint is not None:
        restore(learner, checkpoint, load_state)
        run_dir = resume_run_dir(load_state, checkpoint, cfg)
    run_dir, learner.log = open_run(cfg, context, run_dir, None if checkpoint is None else checkpoint.get("events"))
    if checkpoint is None and learner.log is not None:
        learner.log.hparams(*learner.hparams())
    if checkpoint is not None and learner.log is not None:
        # TensorBoard drops what a killed predecessor logged after the checkpoint it resumes.
        learner.log.restart_at(learner.steps_done + (learner.logged_at == learner.steps_done))
    if save_state and checkpoint_every:
        def periodic_checkpoint(learner: Learner) -> None:
            if learner.windows_done % checkpoint_every == 0:
                if learner.log is not None:
                    learner.log.flush()      # the logs are at least as far along as the checkpoint
                save_checkpoint(save_state, learner, run_dir, context)
        learner.after_window = periodic_checkpoint
    try:
        metrics = learner.run()
        if save_state:
            save_checkpoint(save_state, learner, run_dir, context)
        return run_dir, close_run(run_dir, learner.log, metrics, cfg, context)
    except (ConfigError, OSError) as error:      # a full disk, a lost folder
        raise record_failure(run_dir, learner, context, error) from None
    finally:
        if learner.log is not None:
            learner.log.release()


def record_failure(run_dir: Path | None, learner: Learner, context: distributed.Context,
                   error: ConfigError | OSError) -> ConfigError:
    """Mark a run that failed mid-way as failed in its metrics.json, where its directory and the disk
    still allow, and return the one-line error to report."""
    if isinstance(error, OSError):
        error = write_failure(run_dir, error)
    metrics = {"status": "failed", "error": str(error), "weight_steps": learner.steps_done,
               "train_seconds": learner.train_seconds, "segments": learner.segments, "final": {}}
    with contextlib.suppress(OSError):      # a removed run directory stays removed: nothing re-creates it
        close_run(run_dir, learner.log, metrics, learner.cfg, context)
    return error


def write_failure(run_dir: Path | None, error: OSError) -> ConfigError:
    """The one line for a write that failed mid-run: a removed run directory, log root or event file
    (util.RunLog.flush notices), a full disk."""
    if error.errno == errno.ENOENT:
        return ConfigError(f"{run_dir}: the run directory (or a folder above it, or its event file) was removed "
                           f"mid-run, so its logs are lost; run again, or resume from a checkpoint with -s FILE")
    return ConfigError(f"{error.filename or run_dir}: could not write ({error.strerror or error}); "
                       f"{WRITE_ADVICE.get(error.errno, 'check its permissions')} and resume from the last "
                       f"checkpoint (-s FILE), or run again")


def refuse_meta_checkpoint(cfg: Config, checkpoint: str | None) -> None:
    if cfg.task == "meta_dataset" and checkpoint:
        raise ConfigError("-S/-s: checkpoints are for hyperparameter optimisation runs, not task: meta_dataset")


def preflight(cfg: Config, save_state: str | None, load_state: str | None) -> None:
    """What the ranks of `launch` would reject, checked once before any starts (so it is one
    ConfigError line and exit 2, not one traceback per rank)."""
    refuse_meta_checkpoint(cfg, save_state or load_state)
    check_outputs(cfg, save_state)
    if cfg.task != "meta_dataset":
        if load_state:
            cfg, _ = resumed(load_state, cfg)
        prepare(cfg)                              # the data is there and the model fits it


def train_meta_dataset(cfg: Config, context: distributed.Context, checkpoint: str | None,
                       run_dir: Path | None = None) -> tuple[Path | None, dict]:
    """The meta-learning task (meta_learning.py): learn a dataset that classifiers learn fast."""
    refuse_meta_checkpoint(cfg, checkpoint)
    if cfg.seed is None:
        cfg = replace(cfg, seed=secrets.randbelow(2**31))
    cfg = replace(cfg, threads=cfg.threads or 1)       # a model of a few hundred parameters
    torch.set_num_threads(cfg.threads)
    run_dir, log = open_run(cfg, context, run_dir)
    try:
        device = context.device if context.active else resolve_device(cfg.device)
        metrics = meta_learning.train_learned_dataset(cfg, context, log, device)
        return run_dir, close_run(run_dir, log, metrics, cfg, context)
    finally:
        if log is not None:
            log.release()


def check_launch(cfg: Config, world_size: int, local_world_size: int | None = None) -> None:
    """Launch settings that cannot work, as ConfigErrors before any process starts. On CUDA every
    rank has a GPU of its own: the `local_world_size` ranks on this machine (default: all) need as
    many visible GPUs."""
    local_world_size = local_world_size or world_size
    distributed.collective_timeout()       # a bad value is refused even where one process makes no use of it
    device = resolve_device(cfg.device)
    if world_size > 1 and device.type == "cuda":
        if ":" in cfg.device:
            raise ConfigError(f"device = {cfg.device!r} names one GPU; with several processes use --device cuda "
                              f"(rank r of a machine runs on its GPU r)")
        gpus = torch.cuda.device_count()
        if local_world_size > gpus:
            raise ConfigError(f"{local_world_size} processes on this machine need a GPU each, but {gpus} "
                              f"{'is' if gpus == 1 else 'are'} visible; use --nproc {gpus} or fewer, or --device cpu")


def _rank_main(rank: int, world_size: int, port: int, cfg: Config, save_state: str | None,
               load_state: str | None, checkpoint_every: int | None, launcher: int) -> None:
    """One spawned process of `--nproc N`; it ends at once, and silently, if the launcher dies.
    Ctrl-C, which reaches every process of the terminal, is the launcher's to handle: it asks the
    ranks to stop through the rendezvous store. A rank that fails reports why to the launcher."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default lock is a semaphore that a rank the launcher kills would leak (and the launcher's
    # resource tracker would say so); a rank's bar needs no lock shared with other processes.
    tqdm.set_lock(threading.RLock())
    try:
        context = distributed.join_local_group(rank, world_size, port, launcher, cfg.device)
        run_dir, metrics = train(cfg, save_state, load_state, context, checkpoint_every,
                                 stop_requested=distributed.launcher_stop)
        if context.is_rank0:
            print(summary(run_dir, cfg, metrics), flush=True)
            if metrics["status"] == "interrupted":
                print(interrupted(distributed.launcher_stop(now=True) or "a signal", metrics, save_state),
                      file=sys.stderr)
        distributed.shutdown(finished=True)
    except Exception as error:
        distributed.report_failure(rank, rank_error(error), distributed.is_timeout(error))
        distributed.exit_process(1)
    distributed.exit_process(0)


def rank_error(error: Exception) -> str:
    """What a rank's failure was, in a line (gloo's timeout message is long and names no rank)."""
    if distributed.is_timeout(error):
        return (f"no answer from another rank within {distributed.collective_timeout():g} s in a collective "
                f"operation: a rank hung or died ({distributed.TIMEOUT_VARIABLE} sets the limit)")
    return f"{type(error).__name__}: {one_line(error, 1000)}"


def launch(cfg: Config, world_size: int, save_state: str | None, load_state: str | None,
           checkpoint_every: int | None = None) -> int:
    """Run `world_size` local processes; the first to fail stops the others, and one line says why.
    A SIGINT or SIGTERM asks the ranks to stop after their current window (exit 130 or 143); a
    second one abandons the run."""
    interruption = Interruption()
    catches = threading.current_thread() is threading.main_thread()
    with distributed.local_rendezvous() as store, interruption if catches else contextlib.nullcontext():
        ranks = torch.multiprocessing.spawn(
            _rank_main, args=(world_size, store.port, cfg, save_state, load_state, checkpoint_every, os.getpid()),
            nprocs=world_size, join=False)
        processes = ranks.processes
        try:
            if not watch(processes, store, interruption):
                print(f"train.py: {stop_failed_job(processes, store)}", file=sys.stderr)
                return 1
        except KeyboardInterrupt:            # a second Ctrl-C
            for process in processes:
                process.kill()
            print("train.py: abandoned by a second SIGINT: the ranks were killed mid-window (the last periodic "
                  "checkpoint, if any, still resumes)", file=sys.stderr)
            return 128 + signal.SIGINT
    return interruption.exit_code() if interruption() else 0


def watch(processes: list, store: torch.distributed.TCPStore, interruption: Interruption) -> bool:
    """Wait until every rank has ended well (True) or one has failed (False), passing an
    interruption on to the ranks as a request to stop."""
    asked = False
    while any(process.exitcode is None for process in processes):
        if any(process.exitcode for process in processes):
            return False
        multiprocessing.connection.wait([process.sentinel for process in processes if process.exitcode is None],
                                        timeout=0.2)
        if interruption() and not asked:
            distributed.request_stop(store, interruption.received.name)
            asked = True
    return not any(process.exitcode for process in processes)


# Ranks that wait in vain for a hung one time out within moments of each other: those still running
# this long after the first are the hung ones.
TIMEOUT_GRACE = 5.0     # seconds


def stop_failed_job(processes: list, store: torch.distributed.TCPStore) -> str:
    """End a job one of whose ranks has failed; returns the line that says why it stopped."""
    failures = distributed.reported_failures(store, len(processes))
    if failures and min(failures.values(), key=lambda failure: failure.time).timed_out:
        deadline = time.monotonic() + TIMEOUT_GRACE
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
    running = {rank for rank, process in enumerate(processes) if process.is_alive()}
    for rank in running:
        processes[rank].kill()        # SIGKILL: a stopped (SIGSTOP) process cannot act on SIGTERM
    for process in processes:
        process.join()
    return launch_failure(processes, distributed.reported_failures(store, len(processes)), running)


def launch_failure(processes: list, failures: dict[int, distributed.Failure], running: set[int]) -> str:
    """Why a job of local ranks stopped, from their reports and exit codes, where `running` are the
    ranks the launcher killed once the job had failed (never the cause of anything). First the ranks
    that ended without a word (a signal, an exit code): another rank's error follows from theirs.
    Then the first error reported; if it was a timeout, the ranks that never answered."""
    silent = [(rank, process.exitcode) for rank, process in enumerate(processes)
              if rank not in failures and rank not in running and process.exitcode]
    if silent:
        return "error: " + "; ".join(f"rank {rank} {exit_description(code)}" for rank, code in silent) + \
            ", so the job stopped"
    first = min(failures.values(), key=lambda failure: failure.time)
    hung = sorted(running - failures.keys())
    if first.timed_out and hung:
        names = ", ".join(map(str, hung))
        return (f"error: rank{'s' * (len(hung) > 1)} {names} stopped responding: the other ranks waited "
                f"{distributed.collective_timeout():g} s for {'them' if len(hung) > 1 else 'it'} in a collective "
                f"operation ({distributed.TIMEOUT_VARIABLE} sets the limit), so the job stopped")
    return f"error on rank {first.rank}: {first.line}"


def exit_description(code: int) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it)."""
    if code > 0:
        return f"exited with code {code}"
    try:
        return f"died from signal {signal.Signals(-code).name}"
    except ValueError:
        return f"died from signal {-code}"


class Interruption:
    """SIGINT and SIGTERM (Ctrl-C; what SLURM and Kubernetes send) turned into a request to stop
    at the next window boundary, while in use as a context manager; a second signal acts as if
    none were caught (abandoning the run). The previous handlers are restored on exit."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Interruption:
        # A signal the process was started ignoring (e.g. SIGINT of `cmd &` in a script) stays ignored.
        self._previous = {signum: signal.getsignal(signum) for signum in self.SIGNALS
                          if signal.getsignal(signum) is not signal.SIG_IGN}
        for signum in self._previous:
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            self.__exit__()
            signal.raise_signal(signum)
        self.received = signal.Signals(signum)

    def __call__(self) -> bool:
        return self.received is not None

    def exit_code(self) -> int:
        """The shell's code for death by the signal received: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.received


def interrupted(reason: str, metrics: dict, save_state: str | None) -> str:
    """The line that says a run stopped early, where, and how to go on."""
    resume = (f"resume with -s {save_state} -S {save_state}" if save_state
              else "no checkpoint written (-S FILE makes a run resumable)")
    return f"train.py: interrupted by {reason} after {metrics['weight_steps']} weight steps; {resume}"


def main(argv: list[str] | None = None) -> int:
    context = distributed.SINGLE
    try:
        cfg, args = config.parse_command_line(argv)
        context = distributed.from_environment(cfg.device)     # set by torchrun; one process otherwise
        local_ranks = distributed.local_world_size(context.world_size)
        check_launch(cfg, max(args.nproc, context.world_size), max(args.nproc, local_ranks))
        if args.checkpoint_every and not args.save_state:
            raise ConfigError("--checkpoint_every: name the checkpoint file with -S FILE")
        if args.nproc > 1 and context.active:
            raise ConfigError("--nproc: already running under torchrun; let torchrun start the processes")
        distributed.init(context)
        if cfg.seed is None and not args.load_state:    # drawn once, so that every rank agrees (a
            # resumption continues its checkpoint's)
            cfg = replace(cfg, seed=distributed.broadcast_from_rank0(secrets.randbelow(2**31), context))
        if args.nproc > 1:
            preflight(cfg, args.save_state, args.load_state)
            return launch(cfg, args.nproc, args.save_state, args.load_state, args.checkpoint_every)
        # One process of its own (not a rank, nor the meta task, which has no windows) stops cleanly;
        # only the main thread may set signal handlers (main() may run elsewhere, e.g. in a thread).
        interruption = Interruption()
        catches = (not context.active and cfg.task != "meta_dataset"
                   and threading.current_thread() is threading.main_thread())
        try:
            with interruption if catches else contextlib.nullcontext():
                run_dir, metrics = train(cfg, args.save_state, args.load_state, context, args.checkpoint_every,
                                         stop_requested=interruption)
            distributed.shutdown(finished=True)
        finally:
            distributed.shutdown()
    except ConfigError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if not context.active:
            raise
        distributed.report_failure(context.rank, rank_error(error), distributed.is_timeout(error))
        return 1
    if context.is_rank0:
        print(summary(run_dir, cfg, metrics), flush=True)
    if metrics["status"] == "interrupted":
        print(interrupted(interruption.received.name, metrics, args.save_state), file=sys.stderr)
        return interruption.exit_code()
    return 0   # a diverged run is a result (status "diverged" in metrics.json), not a failure


if __name__ == "__main__":
    distributed.exit_process(util.run_command(main))
