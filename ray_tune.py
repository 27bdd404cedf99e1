"""Ray Tune's searches of the paper: ASHA and population-based training (PBT) over the initial
hyperparameters of one algorithm on one dataset, on a running Ray cluster.

    ray_tune.tune_search("asha", "uci_energy", "Ours_LR_Momentum", samples=100, root=Path("runs/asha"))

Each trial is a run of the framework from the trial's lr, weight decay, momentum and seed, reporting
its validation and test loss after every weight step and checkpointing the run's complete state; a
PBT trial that copies another continues that state. Ray is an optional extra (`make ray`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from onepass import config, util
from onepass.parallel_exec import CONFIGS, LOG10_LR, LOG10_WEIGHT_DECAY, MOMENTUM, connect_to_ray, import_ray

if TYPE_CHECKING:
    from onepass import train

SEARCH_RANGES = {"lr": tuple(10**end for end in LOG10_LR), "weight_decay": tuple(10**end for end in LOG10_WEIGHT_DECAY),
                 "momentum": MOMENTUM}


def search_space() -> dict:
    tune = import_ray("Ray Tune's search", "ray.tune")
    return {"lr": tune.loguniform(*SEARCH_RANGES["lr"]),
            "weight_decay": tune.loguniform(*SEARCH_RANGES["weight_decay"]),
            "momentum": tune.uniform(*SEARCH_RANGES["momentum"])}


class TuneReporter:
    """A trial's log: TensorBoard as usual, plus one `tune.report` of the validation and test loss
    per weight step (its per-step measurement), carrying the latest checkpoint when there is one."""

    def __init__(self, log: object):
        self.log = log
        self.checkpoint: Path | None = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        tune = import_ray("a Ray Tune trial", "ray.tune")
        self.log.scalars(step, values)
        if "Loss/Validation" in values:
            metrics = {name: value if np.isfinite(value) else float("inf") for name, value in
                       (("validation_loss", values["Loss/Validation"]), ("test_loss", values["Loss/Test"]))}
            checkpoint = tune.Checkpoint.from_directory(str(self.checkpoint)) if self.checkpoint else None
            tune.report(metrics | {"weight_step": step}, checkpoint=checkpoint)
            self.checkpoint = None

    def histogram(self, step: int, tag: str, values: object) -> None:
        self.log.histogram(step, tag, values)

    def flush(self) -> None:
        self.log.flush()

    def position(self) -> dict:
        return self.log.position()

    def close(self) -> None:
        self.log.close()


def continue_from(learner: train.Learner, state: dict) -> None:
    """A PBT trial's start from another trial's checkpoint `state`: that complete state, with the
    hyperparameters moved by the change of the starting values (the state's config to the
    learner's), in the log10/logit space they are tuned in."""
    from onepass import checkpoint
    checkpoint.load_into(learner, state)
    learner.hyperparameters.shift_({name: state["config"]["optimiser"][name] for name in SEARCH_RANGES},
                                   {name: getattr(learner.cfg.optimiser, name) for name in SEARCH_RANGES})


def tune_trial(trial: dict, files: tuple[str, ...], extra: tuple[str, ...], checkpoint_interval: int) -> None:
    """One Ray Tune trial: a run of `files` from the trial's hyperparameters, logging every weight
    step, checkpointed (the framework's complete state) every `checkpoint_interval` steps. A trial
    started from another's checkpoint (PBT) continues that state, its hyperparameters moved by the
    perturbation of the starting values."""
    import tempfile

    import torch

    from onepass import checkpoint, run_files, train
    tune = import_ray("a Ray Tune trial", "ray.tune")
    values = {f"optimiser.{name}": trial[name] for name in SEARCH_RANGES} | {"seed": trial["seed"]}
    cfg = config.load_from(list(files), overrides=[f"{key}={value!r}" for key, value in values.items()]
                           + [*extra, "log_every=1"])
    learner = train.Learner(train.prepare(cfg))
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as folder:
            state = torch.load(Path(folder) / "state.pt", weights_only=True)
        continue_from(learner, state)
    run_dir = Path(tune.get_context().get_trial_dir()) / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    util.write_json(run_dir / "config.json", config.to_dict(cfg))    # after a PBT exploit: the new values
    if restored is not None:       # a record of what this trial continued from
        util.write_json(run_dir / f"restored_at_step_{learner.record.steps_done}.json",
                        {"from_config": state["config"], "hyperparameters_after": learner.hyperparameters.log_values()})
    reporter = learner.record.log = TuneReporter(run_files.RunLog(run_dir))

    def save(learner: train.Learner) -> None:
        if learner.record.steps_done % checkpoint_interval == 0:
            reporter.checkpoint = Path(tempfile.mkdtemp(prefix="checkpoint-"))
            checkpoint.save(str(reporter.checkpoint / "state.pt"), learner, run_dir, learner.context)
    try:
        metrics = learner.run(after_window=save)
    finally:
        reporter.close()
    run_files.close_run(run_dir, reporter, metrics, cfg, learner.context)


def tune_search(scheduler_name: str, dataset: str, algorithm: str, samples: int, root: Path, steps: int = 4000,
                perturbation_interval: int = 100, extra: tuple[str, ...] = (), address: str = "auto",
                seed: int = 0) -> object:
    """The paper's ASHA or PBT search: `samples` trials of `algorithm` on `dataset`, minimising the
    validation loss reported every weight step, for at most `steps` weight steps each."""
    tune = import_ray(scheduler_name.upper(), "ray.tune")
    schedulers = import_ray(scheduler_name.upper(), "ray.tune.schedulers")
    connect_to_ray(address)
    files = (str(CONFIGS / f"{dataset}.yaml"), str(CONFIGS / f"{algorithm}.yaml"))
    if scheduler_name == "asha":
        scheduler = schedulers.ASHAScheduler(time_attr="training_iteration", max_t=steps)
    else:
        def explore(trial: dict) -> dict:     # resampling may not reach momentum 1
            return trial | {"momentum": min(trial["momentum"], 1 - 1e-6)}
        scheduler = schedulers.PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=perturbation_interval,
            hyperparam_mutations=search_space(), custom_explore_fn=explore)
    rng = np.random.default_rng(seed)
    space = search_space() | {"seed": tune.sample_from(lambda _: int(rng.integers(2**31)))}
    trainable = tune.with_parameters(tune_trial, files=files, extra=tuple(extra),
                                     checkpoint_interval=perturbation_interval)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}), param_space=space,
        tune_config=tune.TuneConfig(metric="validation_loss", mode="min", num_samples=samples, scheduler=scheduler),
        run_config=tune.RunConfig(name=f"{scheduler_name}_{dataset}_{algorithm}",
                                  storage_path=str(Path(root).resolve()), stop={"training_iteration": steps},
                                  verbose=0))
    return tuner.fit()
