"""Checkpoints: a run's complete state between two windows, written with `train.py -S FILE` and
resumed, bit for bit, with `-s FILE`.

A checkpoint is data from outside (a file a user hands over), so everything in it is checked before
a resumption trusts it: its config against the run's (up to RESUMABLE_KEYS), every bookkeeping field
and counter by type and range, and the run directory it names, which must lie below its log root.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from onepass import config, distributed, run_files, schema, util
from onepass.algorithms.weight_update import RULES
from onepass.schema import Config, ConfigError

if TYPE_CHECKING:
    from onepass.train import Learner


# Keys a resumed run may change: how long it goes on, where it logs, how it reports. Not the seed: a
# resumption continues the checkpoint's (`resumed` takes it when none is given).
RESUMABLE_KEYS = {"hyperparameter_steps", "log_root", "run_group_name", "run_name", "device", "log_every", "threads"}


# What `save` writes besides the optional keys (CUDA generator state, segment times).
CHECKPOINT_KEYS = {"config", "run_dir", "steps_done", "windows_done", "logged_at", "model", "rule_state",
                   "hyperparameters", "algorithm", "streams", "torch_rng", "window_hyperparameters"}


def differing_keys(saved: dict, current: dict) -> list[str]:
    """The config keys (other than RESUMABLE_KEYS) on which two config dicts differ."""
    saved, current = util.flatten(saved), util.flatten(current)
    return sorted(key for key in saved.keys() | current.keys()
                  if key.split(".")[0] not in RESUMABLE_KEYS and saved.get(key) != current.get(key))


def check_supported(cfg: Config, flag: str | None) -> None:
    """Refuse -S/-s (`flag`, if given) for a rule whose state is a package's optimiser object
    (algorithms/peers.py), which a checkpoint cannot hold as plain tensors."""
    rule = RULES[cfg.optimiser.name]
    if flag and not rule.checkpointable:
        raise ConfigError(f"-S/-s {flag}: checkpoints do not cover optimiser.name = {cfg.optimiser.name!r} (its "
                          f"state is {rule.package}'s optimiser object); run it without -S/-s")


def resumed(path: str, cfg: Config) -> tuple[Config, dict]:
    """The config that resumes the checkpoint at `path` (with the checkpoint's seed where `cfg` has
    none: the seed its run was started with), and the checkpoint."""
    checkpoint = load(path, cfg)
    return replace(cfg, seed=checkpoint["config"]["seed"]), checkpoint


def load(path: str, cfg: Config) -> dict:
    """Read a checkpoint written by `save`, refusing one made under another config (a
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
        load_into(learner, checkpoint)
    except (RuntimeError, KeyError, IndexError, TypeError, ValueError, AttributeError) as error:
        raise ConfigError(f"-s {path}: its saved state does not fit this run ({util.one_line(error)}); re-create it "
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
    """The run directory `name` below `root`, where a checkpoint may name one: never elsewhere, not
    even through a link."""
    candidate = run_files.below(root, name, follow_links=True)
    if candidate is None:
        raise ConfigError(f"-s {path}: its run directory '{name}' lies outside the log root {root.resolve()}; "
                          f"re-create the checkpoint with -S FILE")
    return candidate


def _holds_run(folder: Path, saved_config: dict) -> bool:
    """Whether `folder` is a run directory of the same config (up to the keys a resumption changes)."""
    try:
        logged = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(logged, dict) and not differing_keys(saved_config, logged)


def save(path: str, learner: Learner, run_dir: Path | None, context: distributed.Context) -> None:
    """Write the learner's complete state to `path` (rank 0, atomically); call it on every rank. The
    run directory is stored relative to the log root (see `resume_run_dir`)."""
    state = state_of(learner)
    if context.is_rank0:
        name = None if run_dir is None else os.path.relpath(run_dir, learner.cfg.log_root)
        # Where its log was, so that a resumption can drop what was logged after (discard_events_after).
        events = {"events": learner.record.log.position()} if learner.record.log is not None else {}
        try:
            util.atomic_torch_save(state | {"config": config.to_dict(learner.cfg), "run_dir": name} | events,
                                   Path(path))
        except OSError as error:
            raise ConfigError(f"-S {path}: could not write the checkpoint ({error.strerror or error}); free some "
                              f"space, or choose another file with -S") from None


def state_of(learner: Learner) -> dict:
    """Everything a resumed run needs to continue bit for bit (between windows). Collective under
    DDP (recurrent states are gathered from every rank): call it on all ranks."""
    return learner.record.state_dict() | random_state(learner.params[0].device) | {
        "model": learner.model.state_dict(), "rule_state": learner.rule_state,
        "streams": learner.streams.state_dict(), "hyperparameters": learner.hyperparameters.state_dict(),
        "algorithm": learner.algorithm.state_dict()}


def load_into(learner: Learner, state: dict) -> None:
    """Continue from `state_of`'s `state`."""
    learner.record.load_state_dict(state)
    learner.model.load_state_dict(state["model"])
    learner.rule_state = state["rule_state"]
    learner.hyperparameters.load_state_dict(state["hyperparameters"])
    learner.algorithm.load_state_dict(state["algorithm"])
    learner.streams.load_state_dict(state["streams"])
    set_random_state(state, learner.params[0].device)


def random_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's global random generators (the CPU's, and `device`'s if a GPU), for a checkpoint."""
    cuda = {"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
    return {"torch_rng": torch.get_rng_state()} | cuda


def set_random_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what `random_state` returned (a CPU run's checkpoint resumes on a GPU without its state)."""
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
