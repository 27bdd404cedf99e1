"""The paper's larger workloads: Fashion-MNIST (the real data), CIFAR-10 (a small copy in the real
file format) and Penn Treebank (its validation text as a small corpus), every algorithm on each."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from onepass import config, datasets, measure, models, train, util
from tests.conftest import REPO
from tests.test_train import ALGORITHM_CONFIGS

# Small versions of each workload, for a few steps: the real model where it is cheap enough.
SMALL = {
    "fashion_mnist": ["batch_size=20"],
    "fashion_mnist_BatchNorm": ["batch_size=20"],
    "cifar10": ["batch_size=15", "dataset.test_batch_size=6"],       # 45 training images: 3 whole batches
    "penn_treebank_small": ["batch_size=6", "dataset.test_batch_size=6", "model.embedding_size=12",
                            "model.hidden_size=12"],
}


def workload_config(workload: str, algorithm: str, data: Path, log_root: Path, *overrides: str) -> config.Config:
    # Baydin_Exact's own step (1e-3 on log10 lr) moves lr by less than float32 logs can show in two steps.
    steps = ["hyperparameter_steps=2"] + {"Baydin": [], "Baydin_Exact": ["tuning.lr=10"]}.get(
        algorithm, ["network_weight_steps=5"])
    return config.load_from([str(REPO / "configs" / f"{workload}.yaml"), str(REPO / "configs" / f"{algorithm}.yaml")],
                            overrides=[*SMALL[workload], *steps, f"dataset.data_dir={data}", f"log_root={log_root}",
                                       "seed=0", "log_every=1", *overrides])


# algorithm: the hyperparameters it changes
CHANGES = {"Random": (), "Random_Validation": (), "Random_TrainingSetOnly": (), "Random_SteppedLR": ("Lr",),
           **ALGORITHM_CONFIGS}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", CHANGES)
@pytest.mark.parametrize("workload", SMALL)
def test_every_algorithm_runs_on_every_workload(workload, algorithm, workload_data, tmp_path):
    run_dir, metrics = train.train(workload_config(workload, algorithm, workload_data, tmp_path))
    assert metrics["status"] == "completed"
    record = util.get_tags(run_dir)["."]
    headline = "Perplexity" if workload.startswith("penn") else "Accuracy"
    for tag in ("Loss/Training", "Loss/Test", f"{headline}/Test", "Last_Loss/Training"):
        assert np.isfinite(record.scalars[tag].values).all(), tag
    for name in ("Lr", "Weight_Decay", "Momentum"):
        trajectory = record.scalars[f"Last_Hyperparameter/{name}"].values
        assert (len(np.unique(trajectory)) > 1) == (name in CHANGES[algorithm]), (name, trajectory)


def test_fashion_mnist_splits_are_the_papers(workload_data):
    cfg = config.load_from([str(REPO / "configs/fashion_mnist.yaml")], overrides=[f"dataset.data_dir={workload_data}"])
    splits = datasets.make_splits(cfg.dataset, torch.float32, torch.device("cpu"))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (50000, 10000, 10000)
    assert splits.input_shape == (784,) and splits.num_outputs == 10
    train_val = torch.cat([splits.train.inputs, splits.validation.inputs])
    assert train_val.mean(0).abs().max() < 1e-4       # standardised with train+validation statistics
    assert splits.test.targets[:5].tolist() == [9, 2, 1, 1, 6]


def test_cifar10_pixels_are_scaled_then_normalised_per_channel(workload_data):
    raw = np.load(workload_data / "cifar10.npz")
    cfg = config.load_from([str(REPO / "configs/cifar10.yaml")], overrides=[f"dataset.data_dir={workload_data}"])
    splits = datasets.make_splits(cfg.dataset, torch.float64, torch.device("cpu"))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (45, 5, 10)
    mean, std = np.array(datasets.CIFAR10_MEAN), np.array(datasets.CIFAR10_STD)
    expected = (raw["inputs"][:45] / 255.0 - mean[None, :, None, None]) / std[None, :, None, None]
    np.testing.assert_allclose(splits.train.inputs.numpy(), expected, rtol=1e-12)
    assert splits.input_shape == (3, 32, 32)


def test_token_streams_are_columns_with_the_next_token_as_target(workload_data):
    cfg = config.load_from([str(REPO / "configs/penn_treebank_small.yaml")],
                           overrides=[f"dataset.data_dir={workload_data}"])
    splits = datasets.make_splits(cfg.dataset, torch.float32, torch.device("cpu"))
    tokens = np.load(workload_data / "penn_treebank_small.npz")["train_val"]
    rows = len(tokens) // 40
    table = torch.as_tensor(tokens[:rows * 40]).view(40, rows).t()
    validation_rows = round((rows - 1) * 0.0735138)
    assert len(splits.train) + len(splits.validation) == rows - 1 and len(splits.validation) == validation_rows
    assert torch.equal(splits.train.inputs[:, 3], table[:len(splits.train), 3])       # stream 3, in time order
    assert torch.equal(splits.train.targets[:-1], splits.train.inputs[1:])            # the next token
    assert torch.equal(splits.validation.inputs[0], table[len(splits.train)])          # the tail of every stream
    assert splits.num_outputs == len(np.load(workload_data / "penn_treebank_small.npz")["vocabulary"])


def test_hidden_state_is_carried_detached_and_cleared_each_epoch(workload_data):
    cfg = workload_config("penn_treebank_small", "Random", workload_data, Path("unused"), "batch_size=500")
    learner = train.Learner(train.prepare(cfg))
    stream, model = learner.streams.train, learner.model
    batches_per_epoch = math.ceil(len(learner.splits.train) / 500)
    first = next(stream)
    assert first.hidden is None and first.inputs.shape == (500, 40)
    logits = measure.forward(model, first)
    assert logits.shape == (500 * 40, learner.splits.num_outputs)
    _, expected = model(first.inputs)
    second = next(stream)
    assert all(torch.equal(h, e) and not h.requires_grad for h, e in zip(second.hidden, expected, strict=True))
    assert torch.equal(second.inputs[0], learner.splits.train.inputs[500])       # consecutive chunks
    batch = second
    for _ in range(batches_per_epoch - 2):      # on to the epoch's last batch
        measure.forward(model, batch)
        batch = next(stream)
    assert batch.hidden is not None and len(batch.inputs) == len(learner.splits.train) % 500   # the short last one
    wrapped = next(stream)
    assert wrapped.hidden is None and torch.equal(wrapped.inputs[0], learner.splits.train.inputs[0])


def test_lstm_layers_compute_what_torch_lstm_computes():
    torch.manual_seed(0)
    ours = models.LSTMLanguageModel(30, 7, 5, 2).double()
    reference = torch.nn.LSTM(7, 5, num_layers=2).double()
    with torch.no_grad():
        for index, layer in enumerate(ours.layers):
            getattr(reference, f"weight_ih_l{index}").copy_(layer.weight_ih)
            getattr(reference, f"weight_hh_l{index}").copy_(layer.weight_hh)
            getattr(reference, f"bias_ih_l{index}").copy_(layer.bias)
            getattr(reference, f"bias_hh_l{index}").zero_()
    tokens = torch.randint(0, 30, (9, 4))
    state = (torch.randn(2, 4, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64))
    logits, (h, c) = ours(tokens, state)
    outputs, (h_ref, c_ref) = reference(ours.embedding(tokens), state)
    torch.testing.assert_close(logits, ours.decoder(outputs).flatten(0, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((h, c), (h_ref, c_ref), rtol=1e-12, atol=1e-12)


def test_lstm_language_model_has_correct_second_derivatives():
    torch.manual_seed(0)
    model = models.LSTMLanguageModel(6, 3, 3, 2).double()
    tokens, targets = torch.randint(0, 6, (4, 2)), torch.randint(0, 6, (4, 2))
    names = [name for name, _ in model.named_parameters()]

    def loss(*weights: torch.Tensor) -> torch.Tensor:
        logits, _ = torch.func.functional_call(model, dict(zip(names, weights, strict=True)), (tokens,))
        return models.build_loss("cross_entropy")(logits, targets)

    assert torch.autograd.gradgradcheck(loss, tuple(p.detach().requires_grad_() for p in model.parameters()))


def test_resnet18_has_torchvisions_architecture():
    model = models.ResNet18(3, 10)
    assert sum(p.numel() for p in model.parameters()) == 11_181_642     # torchvision resnet18(num_classes=10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 20


def test_models_refuse_data_of_the_wrong_shape(workload_data, tmp_path, capsys):
    code = train.main(["-c", str(REPO / "configs/cifar10.yaml"), "--set", "model.name=lstm", "--batch_size", "15",
                       "--set", f"dataset.data_dir={workload_data}", "-l", str(tmp_path)])    # 45 stand-in images
    assert code == 2 and "takes token ids, but the dataset's inputs are images" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_gradient_clipping_matches_torch_clip_grad_norm():
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=generator, dtype=torch.float64), torch.randn(5, generator=generator,
                                                                                      dtype=torch.float64)]
    for max_norm in (0.1, 100.0):
        params = [torch.zeros_like(g, requires_grad=True) for g in grads]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        from onepass.algorithms.weight_update import clip_gradient_norm
        for got, p in zip(clip_gradient_norm(grads, max_norm), params, strict=True):
            torch.testing.assert_close(got, p.grad, rtol=1e-15, atol=0)


@pytest.mark.slow
def test_fashion_mnist_trains_in_full_from_the_shared_data(workload_data, tmp_path):
    """The paper's whole Fashion-MNIST protocol (1000 x 10 steps) with Ours_LR_Momentum."""
    cfg = config.load_from([str(REPO / "configs/fashion_mnist.yaml"), str(REPO / "configs/Ours_LR_Momentum.yaml")],
                           overrides=[f"dataset.data_dir={workload_data}", f"log_root={tmp_path}", "seed=0",
                                      "log_every=100"])
    run_dir, metrics = train.train(cfg)
    assert metrics["status"] == "completed" and metrics["weight_steps"] == 10000
    assert metrics["final"]["Accuracy/Test"] > 0.8
    assert json.loads((run_dir / "metrics.json").read_text())["final"] == metrics["final"]
