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

import argparse
import contextlib
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from onepass import algorithms, checkpoint, datasets, distributed, launch, measure, models, run_files, util
from onepass.algorithms.hyperparameters import Hyperparameters
from onepass.algorithms.hyperparameters import tag as hyperparameter_tag
from onepass.algorithms.steps import Problem, Step, weight_step_
from onepass.algorithms.weight_update import RULES, detached
from onepass.config import Config, ConfigError
from onepass.progress import Progress


@dataclass
class Setup:
    """Everything a run needs, built (and checked) before its run directory exists."""
    cfg: Config
    device: torch.device
    splits: datasets.Splits
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def prepare(cfg: Config) -> Setup:
    """Seed, load the data and build the model; raises ConfigError on anything a user must fix."""
    cfg = util.seeded(cfg)
    torch.manual_seed(cfg.seed)
    device = distributed.resolve_device(cfg.device)
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


class Record:
    """A run's bookkeeping and the cadence of its logs.

    Counts the weight steps and windows done (a resumption continues them), the run's status and its
    training time over every segment. Logs the per-step tags every `log_every` steps and, at the
    first step of each window, the previous window's Last_* tags (the measurement of the weights it
    produced, with the hyperparameters it used), and the per-element hyperparameters' histograms.
    """

    def __init__(self, log: run_files.RunLog | None, T: int, log_every: int):
        self.log, self.T, self.log_every = log, T, log_every
        self.steps_done = self.windows_done = 0
        self.logged_at: int | None = None      # a step whose measurement `finish` has logged
        self.status = "running"
        self.train_seconds = 0.0     # over every segment of a resumed run, up to the last window done
        self.segments = 1            # 1 + the resumptions of this run
        self.hyperparameters: dict[str, float] = {}     # the window's tags: values, then hypergradients
        self.previous: dict[str, float] = {}            # the window before's

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done, "windows_done": self.windows_done, "logged_at": self.logged_at,
                "window_hyperparameters": self.hyperparameters, "train_seconds": self.train_seconds,
                "segments": self.segments}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done, self.windows_done = state["steps_done"], state["windows_done"]
        self.logged_at = state["logged_at"]
        self.hyperparameters = state["window_hyperparameters"]
        self.train_seconds, self.segments = state.get("train_seconds", 0.0), state.get("segments", 1) + 1

    def start_window(self, h: int, hyperparameters: Hyperparameters, rule_values: dict[str, float]) -> None:
        """Window h begins: its hyperparameters (and the rule's own values, e.g. the step size it reached)."""
        self.previous, self.hyperparameters = self.hyperparameters, hyperparameters.log_values() | rule_values
        if self.log is not None:
            for tag, values in hyperparameters.histograms().items():
                self.log.histogram(h, tag, values)

    def wants(self, index: int) -> bool:
        """Whether weight step `index` is measured: every log_every steps, and first in its window
        (closing the previous one), unless `finish` has logged it already."""
        return (index % self.log_every == 0 or (index % self.T == 0 and index > 0)) and index != self.logged_at

    def log_step(self, index: int, scalars: dict[str, float]) -> None:
        """The measurement of weight step `index` (see `wants`), before its update."""
        if index % self.log_every == 0:
            self._log(index, scalars | self.hyperparameters)
        if index % self.T == 0 and index > 0:
            self._log_last(index // self.T - 1, scalars | self.previous)

    def finish(self, scalars: dict[str, float], hyperparameters: dict[str, float], budget: int) -> dict:
        """Log the final measurement at the last step (and as the last window's Last_* tags), and
        return the run's metrics."""
        if self.status == "running":
            self.status = "completed"
        final = scalars | hyperparameters
        self._log(self.steps_done, final)
        self._log_last((self.steps_done - 1) // self.T, scalars | self.hyperparameters)
        self.logged_at = self.steps_done
        return {"status": self.status, "weight_steps": self.steps_done,
                "weight_step_budget": budget,     # what every algorithm compared trains for
                "train_seconds": self.train_seconds, "segments": self.segments,
                "final": {tag: util.finite_or_none(value) for tag, value in final.items()}}

    def status_line(self, loss: float) -> str:
        values = "  ".join(f"{tag.split('/')[1].lower()} {value:.3g}"
                           for tag, value in self.hyperparameters.items() if tag.startswith("Hyperparameter/"))
        return f"loss {loss:.4g}  {values}"

    def _log(self, step: int, scalars: dict[str, float]) -> None:
        if self.log is not None:
            self.log.scalars(step, scalars)

    def _log_last(self, hyperparameter_step: int, scalars: dict[str, float]) -> None:
        self._log(hyperparameter_step, {f"Last_{tag}": value for tag, value in scalars.items()})


def _asked(stop_requested: Callable[[], object] | None) -> bool:
    return stop_requested is not None and bool(stop_requested())


class Learner:
    """The training loop: H windows of T weight steps, each followed by one hyperparameter step.

    It owns the weights (the model's parameters), the rule's state and the hyperparameters; the
    algorithm takes each window's last steps and the hyperparameter step; the record counts and logs."""

    def __init__(self, setup: Setup, log: run_files.RunLog | None = None,
                 context: distributed.Context = distributed.SINGLE):
        cfg = self.cfg = setup.cfg
        self.model, self.splits, self.context = setup.model, setup.splits, context
        distributed.synchronise_batch_norm(self.model, context)
        self.streams = datasets.Streams.of(cfg, self.splits, context)
        self.meter = measure.Meter(self.model, setup.loss_fn, self.splits, context, cfg.batch_size,
                                   self.streams.validation, self.streams.test)
        self.params = list(self.model.parameters())
        self.rule = RULES[cfg.optimiser.name]
        self.rule_state = self.rule.init_state(self.params)
        self.hyperparameters = Hyperparameters(cfg.optimiser, cfg.tuning, self.rule.hyperparameters, self.params)
        self.fast_hyperparameters = self.hyperparameters.natural_values()   # refreshed every window
        loss_at = measure.loss_function(self.model, setup.loss_fn, self.params)
        self.problem = Problem(loss_at, measure.in_eval_mode(self.model, loss_at), self.rule,
                               cfg.optimiser.gradient_clip, context, distributed.couples_ranks(self.model))
        self.algorithm = algorithms.build(cfg.tuning, self.problem, self.hyperparameters, self.params, self.rule_state,
                                          window_steps=cfg.network_weight_steps)
        self.record = Record(log, cfg.network_weight_steps, cfg.log_every)

    def fast_step(self, batch: datasets.Batch) -> Step:
        """An untracked step, in place (as the drop-in optimiser's, optim.py)."""
        return weight_step_(self.problem, self.params, self.rule_state, self.fast_hyperparameters, batch)

    def train_step(self, take_step: Callable[[datasets.Batch], Step]) -> tuple[Step, datasets.Batch]:
        """`take_step` on the next training batch, in training mode."""
        batch = next(self.streams.train)
        if not self.model.training:    # measuring leaves eval mode behind; switch back only then
            self.model.train()
        step = take_step(batch)
        self.record.steps_done += 1
        return step, batch

    def run(self, **options: object) -> dict:
        """Train for H windows of T steps (options: `train_windows`'); returns the final metrics."""
        self.train_windows(**options)
        return self.finish()

    def train_windows(self, until: int | None = None, after_window: Callable[[Learner], None] | None = None,
                      stop_requested: Callable[[], object] | None = None, show_progress: bool = True) -> float:
        """The windows still to do, up to window `until` (default: all H); returns the seconds they
        took. `after_window(learner)` follows each window's bookkeeping (e.g. a periodic checkpoint);
        `stop_requested()`, asked between windows, ends the run there with status "interrupted"."""
        record, T = self.record, self.cfg.network_weight_steps
        start, seconds_before = time.perf_counter(), record.train_seconds
        name = f"{self.cfg.algorithm} on {self.cfg.dataset.name}"
        progress = Progress(self.cfg.total_weight_steps, record.steps_done, name, "step",
                            enabled=show_progress and self.context.is_rank0)
        for h in range(record.windows_done, until or self.cfg.hyperparameter_steps):
            last = self._window(h)
            # Ranks agree on a stop request in the all-reduce of the divergence check, so that all stop
            # after the same window; one process asks after the window's bookkeeping (and after_window).
            asked_here = self.context.active and _asked(stop_requested)
            summed = torch.cat([last.loss.detach().reshape(1), last.loss.new_full((1,), float(asked_here))])
            last_loss, asked_anywhere = distributed.all_reduce_([summed], self.context)[0].tolist()
            if not math.isfinite(last_loss):
                record.status = "diverged"
                break
            self._hyper_step(last)
            del last                      # with the graph of the tracked steps: none outlives its window
            record.windows_done += 1
            record.train_seconds = seconds_before + time.perf_counter() - start
            if after_window is not None:
                after_window(self)
            progress.update(T, functools.partial(record.status_line, last_loss))
            if asked_anywhere or (not self.context.active and _asked(stop_requested)):
                record.status = "interrupted"      # between windows: a checkpoint now resumes bit for bit
                break
        if time.perf_counter() - start >= progress.every:       # long runs measure long splits: say so
            progress.write(f"{name}: measuring the final weights on the whole splits")
        progress.close()
        record.train_seconds = seconds_before + time.perf_counter() - start
        return time.perf_counter() - start

    def _window(self, h: int) -> Step:
        """Window h's T steps: the first in place, the last `tracked_steps` through the algorithm,
        from detached copies of the weights. Returns the last step."""
        restart = self.algorithm.start_window(h)
        if restart is not None:
            weights, self.rule_state = restart
            with torch.no_grad():
                torch._foreach_copy_(self.params, weights)
        self.record.start_window(h, self.hyperparameters, self.rule.logged(self.rule_state))
        self.fast_hyperparameters = self.hyperparameters.natural_values()
        T, tracked = self.cfg.network_weight_steps, self.algorithm.tracked_steps
        for s in range(T - tracked):
            last = self._logged_step(h * T + s, self.fast_step)
        return self._tracked_steps(h * T + T - tracked, tracked) if tracked else last

    def _tracked_steps(self, first: int, count: int) -> Step:
        """Weight steps `first`... through the algorithm, from detached copies of the weights; the
        model's parameters follow their values (for measurements). Returns the last."""
        weights, state = [p.detach().clone().requires_grad_() for p in self.params], self.rule_state
        for index in range(first, first + count):
            last = self._logged_step(index, functools.partial(self.algorithm.track, weights, state))
            weights, state = last.weights, last.rule_state
            with torch.no_grad():
                torch._foreach_copy_(self.params, weights)
        return last

    def _logged_step(self, index: int, take_step: Callable[[datasets.Batch], Step]) -> Step:
        """Weight step `index`, measured when due (held-out sets at its weights, before its update)."""
        wanted = self.record.wants(index)
        held_out = self._held_out() if index % self.cfg.log_every == 0 else {}
        step, batch = self.train_step(take_step)
        if wanted:
            training = self.meter.batch_metrics(step.outputs, batch, step.loss)
            self.record.log_step(index, self.meter.to_scalars({"Training": training} | held_out))
        return step

    def _held_out(self) -> dict[str, dict[str, torch.Tensor]]:
        with self.rule.measuring(self.rule_state):       # (Schedule-Free: its evaluation weights)
            return self.meter.held_out()

    def _hyper_step(self, last: Step) -> None:
        if self.algorithm.optimises:
            self.record.hyperparameters |= self.algorithm.hyper_step(last, next(self.streams.hyper))
        if self.algorithm.tracked_steps:
            self.rule_state = detached(last.rule_state)
        self.hyperparameters.end_window()

    def finish(self) -> dict:
        """Measure the final weights on whole splits, log them, return the metrics."""
        with self.rule.measuring(self.rule_state):
            final = self.meter.evaluate(self.meter.whole(self.splits.train))
            scalars = self.meter.to_scalars({"Training": final} | self.meter.held_out(whole=True))
        hyperparameters = self.hyperparameters.log_values() | self.rule.logged(self.rule_state)
        return self.record.finish(scalars, hyperparameters, self.cfg.weight_step_budget)


def hparams(learner: Learner) -> tuple[dict, list[str]]:
    """The run's settings and the tags of its final results, for TensorBoard's HParams tab."""
    cfg = learner.cfg
    values = {"algorithm": cfg.algorithm, "dataset": cfg.dataset.name, "seed": cfg.seed,
              "network_weight_steps": cfg.network_weight_steps, "batch_size": cfg.batch_size or 0}
    values |= {f"initial_{name}": float(getattr(cfg.optimiser, name)) for name in learner.hyperparameters.names}
    return values, learner.meter.final_tags() + [hyperparameter_tag(name) for name in learner.hyperparameters.names]


def start_log(learner: Learner, log: run_files.RunLog | None, resumed: bool) -> None:
    """Give the learner its log: a new run's starts with its HParams record; a resumed run's tells
    TensorBoard to drop what a killed predecessor logged after the checkpoint it resumes."""
    learner.record.log = log
    if log is not None and not resumed:
        log.hparams(*hparams(learner))
    if log is not None and resumed:
        log.restart_at(learner.record.steps_done + (learner.record.logged_at == learner.record.steps_done))


def periodic_checkpoint(path: str, every: int, run_dir: Path | None,
                        context: distributed.Context) -> Callable[[Learner], None]:
    """An after-window callback that writes a checkpoint to `path` every `every` windows."""
    def save(learner: Learner) -> None:
        if learner.record.windows_done % every == 0:
            if learner.record.log is not None:
                learner.record.log.flush()      # the logs are at least as far along as the checkpoint
            checkpoint.save(path, learner, run_dir, context)
    return save


def train(cfg: Config, save_state: str | None = None, load_state: str | None = None,
          context: distributed.Context = distributed.SINGLE,
          checkpoint_every: int | None = None, run_dir: Path | None = None,
          show_progress: bool = True, stop_requested: Callable[[], object] | None = None
          ) -> tuple[Path | None, dict]:
    """Run one configured job end to end (as one rank of `context`); returns the run directory
    (rank 0; None elsewhere) and the metrics. `load_state` resumes a checkpoint, logging on in its
    run directory; `save_state` writes one at the end, and every `checkpoint_every` hyperparameter
    steps if given. `run_dir` names the directory to log into (default: a new one under log_root).
    Only rank 0 writes anything, and shows progress unless `show_progress` is false (batches).
    `stop_requested`, asked after every window, ends the run there with status "interrupted"."""
    if run_dir is None:
        run_files.check_outputs(cfg, save_state)
    checkpoint.check_supported(cfg, save_state or load_state)
    saved = None
    if load_state:
        cfg, saved = checkpoint.resumed(load_state, cfg)
    setup = prepare(cfg)
    cfg = setup.cfg
    learner = Learner(setup, context=context)
    if saved is not None:
        checkpoint.restore(learner, saved, load_state)
        run_dir = checkpoint.resume_run_dir(load_state, saved, cfg)
    run_dir, log = run_files.open_run(cfg, context, run_dir, None if saved is None else saved.get("events"))
    start_log(learner, log, resumed=saved is not None)
    after_window = None
    if save_state and checkpoint_every:
        after_window = periodic_checkpoint(save_state, checkpoint_every, run_dir, context)
    try:
        metrics = learner.run(after_window=after_window, stop_requested=stop_requested,
                              show_progress=show_progress)
        if save_state:
            checkpoint.save(save_state, learner, run_dir, context)
        return run_dir, run_files.close_run(run_dir, log, metrics, cfg, context)
    except (ConfigError, OSError) as error:      # a full disk, a lost folder
        raise record_failure(run_dir, learner, context, error) from None
    finally:
        if log is not None:
            log.release()


def record_failure(run_dir: Path | None, learner: Learner, context: distributed.Context,
                   error: ConfigError | OSError) -> ConfigError:
    """Mark a run that failed mid-way as failed in its metrics.json, where its directory and the disk
    still allow, and return the one-line error to report."""
    if isinstance(error, OSError):
        error = run_files.write_failure(run_dir, error)
    record = learner.record
    metrics = {"status": "failed", "error": str(error), "weight_steps": record.steps_done,
               "train_seconds": record.train_seconds, "segments": record.segments, "final": {}}
    with contextlib.suppress(OSError):      # a removed run directory stays removed: nothing re-creates it
        run_files.close_run(run_dir, record.log, metrics, learner.cfg, context)
    return error


def summary(run_dir: Path, cfg: Config, metrics: dict) -> str:
    """A few lines for the terminal: outcome, final metrics, hyperparameters, where the logs are."""
    final = metrics["final"]
    processes = f", {metrics['world_size']} processes" if metrics["world_size"] > 1 else ""
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


class Training:
    """train.py as a launch.Job: hyperparameter optimisation while training."""
    name = "train.py"
    interruptible = True

    def check(self, cfg: Config, args: argparse.Namespace) -> None:
        meta_elsewhere(cfg)
        run_files.check_outputs(cfg, args.save_state)
        checkpoint.check_supported(cfg, args.save_state or args.load_state)
        if args.load_state:
            cfg, _ = checkpoint.resumed(args.load_state, cfg)
        prepare(cfg)                              # the data is there and the model fits it

    def run(self, cfg: Config, args: argparse.Namespace, context: distributed.Context,
            stop_requested: Callable[[], object]) -> tuple[Path | None, dict]:
        meta_elsewhere(cfg)
        return train(cfg, args.save_state, args.load_state, context, args.checkpoint_every,
                     stop_requested=stop_requested)

    summary = staticmethod(summary)


def meta_elsewhere(cfg: Config) -> None:
    if cfg.task == "meta_dataset":
        raise ConfigError("task: meta_dataset is the meta-learning task: run it with meta_learning.py "
                          "(e.g. python meta_learning.py -c configs/meta_dataset.yaml)")


def main(argv: list[str] | None = None) -> int:
    return launch.main(Training(), argv)


if __name__ == "__main__":
    distributed.exit_process(util.run_command(main))
