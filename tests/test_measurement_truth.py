"""What the reported numbers rest on besides the hypergradient, against values computed apart from
the code: losses re-computed in plain torch from a run's final weights (in evaluation mode, in
target units), a clipped lr trajectory replayed by hand, the implicit hypergradient at other i and
at the shipped configs' i, the order of the hypergradient's batches, and data-parallel runs with
uneven shards and active clipping against one process. Float64 throughout."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onepass import algorithms, config, datasets, measure, train, util
from onepass.algorithms.implicit import ImplicitHyperOptimiser
from tests import test_loop_ground_truth as loop
from tests.conftest import REPO, run_cli

CONFIGS = REPO / "configs"
DIABETES = ["dtype=float64", "seed=0", "model.layer_sizes=[10, 8, 1]"]
BN_EPS = 1e-5            # BatchNorm1d's default


def learner(algorithm: str, dataset: str = "diabetes", *overrides: str) -> train.Learner:
    cfg = config.load_from([str(CONFIGS / f"{dataset}.yaml"), str(CONFIGS / f"{algorithm}.yaml")],
                           overrides=["dtype=float64", "seed=0", *overrides])
    return train.Learner(train.prepare(cfg))


def eval_forward(state: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """The 10-8-1 BatchNorm MLP in evaluation mode, by hand: Linear (no bias), BatchNorm with its
    running statistics, ReLU, Linear."""
    hidden = inputs @ state["0.weight"].T
    hidden = (hidden - state["1.running_mean"]) / torch.sqrt(state["1.running_var"] + BN_EPS)
    hidden = torch.relu(hidden * state["1.weight"] + state["1.bias"])
    return hidden @ state["3.weight"].T + state["3.bias"]


@dataclass
class BatchNormRun:
    learner: train.Learner
    final: dict[str, float]
    validation_losses: list[tuple[torch.Tensor, torch.Tensor]]    # (the hypergradient's, by hand)
    initial_state: dict[str, torch.Tensor]
    first_log: dict[str, float]        # measured at step 0, where the model is still in training mode


@pytest.fixture(scope="module")
def batch_norm_run() -> BatchNormRun:
    """Ours_LR_Momentum on diabetes with a BatchNorm MLP and minibatches of 32 (batch statistics
    differ from the running ones), recording every validation loss the hypergradient computes next
    to the eval-mode loss by hand at the same weights and running statistics."""
    run = learner("Ours_LR_Momentum", "diabetes", *DIABETES, "model.batch_norm=true", "batch_size=32",
                  "hyperparameter_steps=5")
    model, recorded = run.model, []
    names = [name for name, _ in model.named_parameters()]
    problem = run.algorithm.problem

    def validation_loss(weights: list[torch.Tensor], batch: datasets.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}   # before the call moves them
        state = buffers | dict(zip(names, weights, strict=True))
        expected = F.mse_loss(eval_forward(state, batch.inputs), batch.targets)
        outputs, loss = problem.validation_loss(weights, batch)
        recorded.append((loss.detach(), expected.detach()))
        return outputs, loss

    run.algorithm.problem = dataclasses.replace(problem, validation_loss=validation_loss)
    initial_state = {name: value.clone() for name, value in model.state_dict().items()}
    logged: list[tuple[int, dict[str, float]]] = []
    run.record._log = lambda step, scalars: logged.append((step, scalars))
    metrics = run.run()
    assert metrics["status"] == "completed" and len(recorded) == 5 and logged[0][0] == 0
    return BatchNormRun(run, metrics["final"], recorded, initial_state, logged[0][1])


def test_the_loss_in_target_units_is_a_plain_forward_on_the_raw_test_rows(batch_norm_run):
    """Unnormalised_Loss/Test (the paper's tables): the final weights' predictions taken back to
    target units with the train+validation targets' mean and std, against the raw test targets.
    Catches the normalised MSE scaled by std instead of std^2, or not at all."""
    run = batch_norm_run.learner
    raw = datasets.make_splits(dataclasses.replace(run.cfg.dataset, normalise_outputs=False), torch.float64,
                               torch.device("cpu"))
    train_val = torch.cat([raw.train.targets, raw.validation.targets]).numpy()
    mean, std = train_val.mean(), train_val.std()
    assert std > 10          # diabetes' targets: the scalings differ by orders of magnitude
    with torch.no_grad():
        predictions = eval_forward(run.model.state_dict(), raw.test.inputs) * std + mean
    expected = float(((predictions - raw.test.targets) ** 2).mean())
    assert batch_norm_run.final["Unnormalised_Loss/Test"] == pytest.approx(expected, rel=1e-10)


def test_held_out_metrics_are_an_eval_mode_forward(batch_norm_run):
    """The final losses of every whole split, and the test loss logged at step 0 (before any
    hypergradient has switched the model to eval mode), equal the eval-mode forward by hand
    (BatchNorm's running statistics). Catches held-out metrics measured in training mode (batch
    statistics, and running statistics moved by the measurement)."""
    run = batch_norm_run.learner
    with torch.no_grad():
        first = float(F.mse_loss(eval_forward(batch_norm_run.initial_state, run.splits.test.inputs),
                                 run.splits.test.targets))
    assert batch_norm_run.first_log["Loss/Test"] == pytest.approx(first, rel=1e-10)
    state = run.model.state_dict()
    for name, split in [("Training", run.splits.train), ("Validation", run.splits.validation),
                        ("Test", run.splits.test)]:
        with torch.no_grad():
            expected = float(F.mse_loss(eval_forward(state, split.inputs), split.targets))
        assert batch_norm_run.final[f"Loss/{name}"] == pytest.approx(expected, rel=1e-10), name


def test_the_hypergradient_validation_gradient_is_an_eval_mode_gradient(batch_norm_run):
    """Every validation loss of the hypergradient (taken where the loop leaves the model in training
    mode) equals the eval-mode loss by hand. Catches it computed in training mode."""
    for window, (got, expected) in enumerate(batch_norm_run.validation_losses):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0, msg=f"window {window}")


HYPER_LR = 10.0
LR, LR_BOUNDS = 0.01, (0.009, 0.011)


def test_a_clipped_lr_trajectory_is_a_raw_step_then_a_clip_into_the_log10_bounds():
    """Ours_LR with plain SGD as the hyper-optimiser and lr bounds close around the starting lr:
    every window, log10 lr moves by -HYPER_LR x its hypergradient, then is clipped into
    [log10 low, log10 high]. Catches the bounds taken to raw space with ln, and the clip applied
    before the hyper-optimiser's step."""
    run = learner("Ours_LR", "diabetes", *DIABETES, "tuning.optimiser=sgd", f"tuning.lr={HYPER_LR}",
                  f"optimiser.lr={LR}", f"optimiser.lr_bounds=[{LR_BOUNDS[0]}, {LR_BOUNDS[1]}]",
                  "hyperparameter_steps=8")
    assert run.hyperparameters.optimised[0] == "lr"
    hypergradients, raw_after = [], []
    compute = run.algorithm.hypergradient

    def recording(*args: object) -> list[torch.Tensor]:
        grads = compute(*args)
        hypergradients.append(float(grads[0]))
        return grads

    run.algorithm.hypergradient = recording
    final = run.run(after_window=lambda done: raw_after.append(done.hyperparameters.raw["lr"].item()))["final"]
    low, high = math.log10(LR_BOUNDS[0]), math.log10(LR_BOUNDS[1])
    raw, clipped = math.log10(LR), 0
    for window, gradient in enumerate(hypergradients):
        stepped = raw - HYPER_LR * gradient
        raw = min(max(stepped, low), high)
        clipped += raw != stepped
        assert raw_after[window] == pytest.approx(raw, abs=1e-12), f"window {window}"
    assert 0 < clipped and len(hypergradients) == 8
    assert final["Hyperparameter/Lr"] == pytest.approx(10 ** raw, rel=1e-12)


# The paper's method (Ours): i = 5 Neumann terms, T = 10 weight steps per hyperparameter step,
# Adam with step 0.05 on the raw hyperparameters, log10 lr clipped into [-10, 0].
PAPER_TERMS, PAPER_T, PAPER_BOUNDS = 5, 10, (1e-10, 1.0)
OURS = {"Ours_LR": ({"lr", "weight_decay"}, ()), "Ours_LR_Momentum": ({"lr", "weight_decay", "momentum"}, ()),
        "Ours_HDLR_Momentum": ({"lr", "weight_decay", "momentum"}, ("lr",)),
        "Ours_Adam_LR_WD": ({"lr", "weight_decay"}, ()), "Ours_HDLR_Adam": ({"lr", "weight_decay"}, ("lr",)),
        "Ours_Adam_LR_WD_Betas": ({"lr", "weight_decay", "beta1", "beta2"}, ()),
        "Ours_Adam_LR_WD_Betas_AllRows": ({"lr", "weight_decay", "beta1", "beta2"}, ())}
# Trained on every row, with the hypergradient on training batches (as the peers study's peers train)
# and a hyper-optimiser step of 0.1: the recommended method.
ALL_ROWS = {"Ours_Adam_LR_WD_Betas_AllRows"}
PAPER_DATASETS = [*(f"uci_{name}" for name in ("boston", "concrete", "energy", "kin8nm", "naval", "power", "wine",
                                               "yacht")), "fashion_mnist", "fashion_mnist_BatchNorm", "cifar10",
                  "penn_treebank"]


def test_the_shipped_ours_configs_are_the_papers_settings():
    """Every shipped configs/Ours*.yaml, on every dataset of the paper, sets the paper's values (the
    recommended all-rows variant: its own data and hyper-optimiser step).
    Catches a shipped Ours config with i = 1 (or another number of terms, T, hyper-optimiser)."""
    shipped = sorted(path.stem for path in CONFIGS.glob("Ours*.yaml"))
    assert shipped == sorted(OURS)
    for name in shipped:
        for dataset in PAPER_DATASETS:
            cfg = config.load_from([str(CONFIGS / f"{dataset}.yaml"), str(CONFIGS / f"{name}.yaml")])
            where = f"{name} on {dataset}"
            assert algorithms.METHODS[cfg.tuning.method] is ImplicitHyperOptimiser, where
            assert (cfg.tuning.rollback_distance, cfg.network_weight_steps) == (PAPER_TERMS, PAPER_T), where
            assert (cfg.tuning.optimiser, cfg.tuning.lr) == ("adam", 0.1 if name in ALL_ROWS else 0.05), where
            assert tuple(cfg.optimiser.lr_bounds) == PAPER_BOUNDS, where
            assert (set(cfg.tuning.hyperparameters), tuple(cfg.tuning.high_dimensional)) == OURS[name], where
            all_rows = name in ALL_ROWS
            assert cfg.tuning.validation_data == ("training" if all_rows else "validation"), where
            assert (cfg.dataset.validation_proportion == 0) == all_rows, where


@pytest.mark.parametrize("overrides,terms", [(("tuning.rollback_distance=2",), 2), ((), PAPER_TERMS)],
                         ids=["i2", "shipped_i"])
def test_implicit_hypergradients_at_other_i(overrides, terms):
    """The loop's implicit hypergradients (Ours_LR_Momentum) against explicit matrix powers (see
    test_loop_ground_truth): at i = 2, where the tracked step's second derivatives enter through
    one Jacobian product, and at the shipped config's own i against the paper's i = 5. Catches the
    tracked step built without create_graph at i = 2, and a shipped config computing other terms."""
    run = loop.run_loop("Ours_LR_Momentum", *overrides)
    expected, final_weights, final_raw = loop.implicit_reference(loop.problem_of(run.learner), run.initial_weights,
                                                                 loop.initial_raw(run.learner), loop.WINDOWS,
                                                                 False, terms)
    for window, (got, want) in enumerate(zip(run.hypergradients, expected, strict=True)):
        loop.assert_agrees(got, want, f"window {window} hypergradient")
    torch.testing.assert_close(run.final_weights, final_weights, rtol=1e-10, atol=1e-12)


def row_indices(batch: datasets.Batch, split: datasets.Split) -> torch.Tensor:
    """Which rows of `split` a batch holds, in order (found by their inputs: diabetes' rows differ)."""
    equal = (batch.inputs[:, None, :] == split.inputs[None]).all(dim=2)
    assert bool((equal.sum(dim=1) == 1).all())
    return equal.double().argmax(dim=1)


def test_the_hypergradient_batches_are_drawn_apart_from_the_training_batches():
    """With the training split as the hypergradient's data and minibatches of 32, the hypergradient's
    batches cover every training row once per epoch in an order of their own: not the training
    batches' order, and the same however often the training stream has been read. Catches the
    hypergradient's stream seeded like the training stream (validation batches in the training order)."""
    overrides = (*DIABETES, "tuning.validation_data=training", "batch_size=32")
    fresh, read = learner("Ours_LR", "diabetes", *overrides), learner("Ours_LR", "diabetes", *overrides)
    split, epoch = fresh.splits.train, math.ceil(318 / 32)
    assert len(split) == 318
    training = torch.cat([row_indices(next(fresh.streams.train), split) for _ in range(epoch)])
    for _ in range(3 * epoch):
        next(read.streams.train)
    hyper = torch.cat([row_indices(next(fresh.streams.hyper), split) for _ in range(epoch)])
    assert torch.equal(hyper.sort().values, torch.arange(318))
    assert torch.equal(training.sort().values, torch.arange(318))
    assert not torch.equal(hyper, training)
    assert len(set(hyper[:32].tolist()) & set(training[:32].tolist())) < 16   # unrelated first batches
    assert torch.equal(torch.cat([row_indices(next(read.streams.hyper), split) for _ in range(epoch)]), hyper)


CLIP = 0.01
DDP_TAGS = [f"{metric}/{split}" for metric in ("Loss", "Accuracy") for split in ("Training", "Validation", "Test")]


def digits_run(tmp_path: Path, nproc: int) -> tuple[dict, util.Run]:
    """Random_TrainingSetOnly on digits over `nproc` ranks: batches of 5 (shards of 2, 2, 1 on three
    ranks), gradients clipped to norm CLIP, held-out metrics logged every step."""
    checkpoint = tmp_path / f"{nproc}.pt"
    result = run_cli("train.py", "-c", "configs/digits.yaml", "configs/Random_TrainingSetOnly.yaml",
                     "--nproc", str(nproc), "--seed", "5", "--set", "dtype=float64", "--set", "batch_size=5",
                     "--set", f"optimiser.gradient_clip={CLIP}", "--set", "log_every=1",
                     "--hyperparameter_steps", "3", "-l", str(tmp_path / f"runs{nproc}"), "-S", str(checkpoint))
    assert result.returncode == 0, result.stderr
    (run,) = util.get_tags(tmp_path / f"runs{nproc}").values()
    return torch.load(checkpoint, weights_only=True), run


@pytest.mark.slow
def test_n_ranks_measure_and_clip_like_one_rank_with_uneven_shards(tmp_path):
    """Three ranks with uneven shards (training and validation batches of 5 rows, the 323-row
    validation split) and active gradient clipping end with one process's weights and log its
    losses and accuracies. Catches each rank clipping its own shard's gradient before the sum,
    and accuracies averaged over ranks without weighting by shard size."""
    probe = learner("Random_TrainingSetOnly", "digits", "batch_size=5", "seed=5")
    batch = next(probe.streams.train)
    loss = F.cross_entropy(probe.model(batch.inputs), batch.targets)
    norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, probe.params)]))
    assert float(norm) > 10 * CLIP and len(probe.splits.validation) % 3 != 0     # clipping and uneven shards
    (one, one_log), (many, many_log) = digits_run(tmp_path, 1), digits_run(tmp_path, 3)
    for name, value in one["model"].items():
        torch.testing.assert_close(many["model"][name], value, rtol=1e-9, atol=1e-12, msg=name)
    assert many_log.metrics["world_size"] == 3
    for tag in DDP_TAGS:
        assert len(one_log.scalars[tag].values) == 31, tag
        np.testing.assert_allclose(many_log.scalars[tag].values, one_log.scalars[tag].values, rtol=1e-9,
                                   err_msg=tag)


def test_a_chunked_whole_split_evaluation_equals_one_plain_forward(monkeypatch):
    """A whole split evaluated in chunks of 7 rows (uneven last chunks: 180 = 25 x 7 + 5 test rows,
    323 = 46 x 7 + 1 validation rows) gives the loss and accuracy of one plain forward over it.
    Catches chunks averaged without weighting by their size."""
    monkeypatch.setattr(measure, "EVALUATION_BATCH", 7)
    run = learner("Random_TrainingSetOnly", "digits")
    run.model.eval()
    for split in (run.splits.test, run.splits.validation):
        assert len(split) % 7 != 0
        measured = run.meter.evaluate(run.meter.whole(split))
        with torch.no_grad():
            outputs = run.model(split.inputs)
        expected_loss = float(F.cross_entropy(outputs, split.targets))
        expected_accuracy = float((outputs.argmax(dim=1) == split.targets).double().mean())
        assert float(measured["Loss"]) == pytest.approx(expected_loss, rel=1e-12)
        assert float(measured["Accuracy"]) == pytest.approx(expected_accuracy, rel=1e-12)
