"""Measuring a run: a model's outputs and loss on a batch, metrics of batches and whole splits,
summed over ranks into TensorBoard tags.

Every rank holds a shard of each batch; what it measures is its share (weighted by the shard's
fraction of the global batch), so that one all-reduce (sum) of all the shares gives the global
metrics, uneven shards included.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from onepass import datasets, distributed
from onepass.schema import ConfigError, short

EVALUATION_BATCH = 8192   # rows per forward pass when evaluating a whole split


def forward(model: nn.Module, batch: datasets.Batch, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """`model`'s outputs on a batch (with `weights` in place of its parameters, if given). A
    recurrent model starts from the state the batch's stream carries and leaves its new state
    there, detached: truncated backpropagation through time."""
    inputs = (batch.inputs,) if batch.carry is None else (batch.inputs, batch.hidden)
    outputs = model(*inputs) if weights is None else functional_call(model, weights, inputs)
    if batch.carry is not None:
        outputs, hidden = outputs
        batch.carry.hidden = tuple(h.detach() for h in hidden)
    return outputs


def local_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], outputs: torch.Tensor,
               batch: datasets.Batch) -> torch.Tensor:
    """This rank's part of the global batch's mean loss: the sum over ranks is the global loss."""
    if len(batch.targets) == 0:
        return outputs.sum() * 0.0
    return loss_fn(outputs, batch.targets) * batch.fraction


def loss_function(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  params: list[torch.Tensor]) -> Callable[[list[torch.Tensor], datasets.Batch],
                                                          tuple[torch.Tensor, torch.Tensor]]:
    """`loss_at(weights, batch)`: (outputs, this rank's loss) with `weights` in place of the model's
    parameters `params` (the model itself when `weights` is that very list: functional_call costs
    tens of microseconds)."""
    names = [name for name, _ in model.named_parameters()]

    def loss_at(weights: list[torch.Tensor], batch: datasets.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = forward(model, batch, None if weights is params else dict(zip(names, weights, strict=True)))
        return outputs, local_loss(loss_fn, outputs, batch)
    return loss_at


def in_eval_mode(model: nn.Module, loss_at: Callable) -> Callable:
    """`loss_at` with `model` in evaluation mode: the hypergradient's validation loss is measured as
    the held-out metrics are (BatchNorm's running statistics, no dropout)."""
    def validation_loss_at(weights: list[torch.Tensor], batch: datasets.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        model.eval()
        return loss_at(weights, batch)
    return validation_loss_at


class Meter:
    """The metrics of a model on the run's splits: of single batches (the validation and test
    streams, when configured) or of whole splits."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 splits: datasets.Splits, context: distributed.Context, sequence_rows: int | None,
                 validation_batches: Iterator[datasets.Batch] | None = None,
                 test_batches: Iterator[datasets.Batch] | None = None):
        self.model, self.loss_fn, self.splits, self.context = model, loss_fn, splits, context
        self.sequence_rows = sequence_rows      # token streams are evaluated in chunks of the BPTT length
        self.validation_batches, self.test_batches = validation_batches, test_batches
        self._whole_shards: dict[int, datasets.Batch] = {}

    def batch_metrics(self, outputs: torch.Tensor, batch: datasets.Batch,
                      loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """This rank's contributions (summed over ranks in `to_scalars`) to a batch's metrics."""
        metrics = {"Loss": loss.detach()}
        if self.splits.task == "classification":
            correct = (outputs.detach().argmax(dim=1) == batch.targets).to(loss.dtype)
            metrics["Accuracy"] = correct.mean() * batch.fraction if len(correct) else correct.sum()
        return metrics

    @torch.no_grad()
    def evaluate(self, batch: datasets.Batch) -> dict[str, torch.Tensor]:
        """This rank's contributions to the model's metrics over a batch, in eval mode, in chunks
        of EVALUATION_BATCH rows (token streams: of the BPTT length, carrying the state through)."""
        self.model.eval()
        totals: dict[str, torch.Tensor] = {}
        chunk_rows = EVALUATION_BATCH if batch.carry is None else self.sequence_rows
        for start in range(0, max(len(batch.inputs), 1), chunk_rows):
            chunk = slice(start, start + chunk_rows)
            rows = len(batch.inputs[chunk])
            part = datasets.Batch(batch.inputs[chunk], batch.targets[chunk],
                                  batch.fraction * rows / len(batch.inputs) if rows else 0.0,
                                  None if batch.carry is None else batch.carry.hidden, batch.carry)
            outputs = forward(self.model, part)
            for name, value in self.batch_metrics(outputs, part, local_loss(self.loss_fn, outputs, part)).items():
                totals[name] = totals[name] + value if name in totals else value
        return totals

    def whole(self, split: datasets.Split) -> datasets.Batch:
        """This rank's shard of a whole split (computed once per split; token streams start from
        an empty recurrent state each time)."""
        if id(split) not in self._whole_shards:
            self._whole_shards[id(split)] = datasets.shard_batch(split, self.context)
        batch = self._whole_shards[id(split)]
        return batch if batch.carry is None else batch._replace(carry=datasets.Carry())

    def held_out(self, whole: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """Validation and test metrics: of their next batch, or of the whole split when `whole` or
        configured so."""
        measured = {}
        validation = self.splits.validation
        if validation is not None:
            use_batch = self.validation_batches is not None and not whole
            batch = next(self.validation_batches) if use_batch else self.whole(validation)
            measured["Validation"] = self.evaluate(batch)
        use_batch = self.test_batches is not None and not whole
        measured["Test"] = self.evaluate(next(self.test_batches) if use_batch else self.whole(self.splits.test))
        return measured

    def to_scalars(self, measured: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
        """Flatten {split: {metric: tensor}} into TensorBoard tags, summed over ranks with one
        all-reduce and one host sync for all."""
        tags = {f"{metric}/{split}": value for split, metrics in measured.items()
                for metric, value in metrics.items()}
        if self.splits.target_std is not None:
            scale = self.splits.target_std ** 2   # MSE in target units = normalised MSE * std^2
            tags.update({f"Unnormalised_Loss/{split}": metrics["Loss"] * scale
                         for split, metrics in measured.items()})
        names = list(tags)
        (values,) = distributed.all_reduce_([torch.stack([tags[name] for name in names])], self.context)
        scalars = dict(zip(names, values.tolist(), strict=True))
        if self.splits.task == "language_model":   # of the global mean loss, so after the reduction
            scalars |= {f"Perplexity/{split}": math.exp(min(scalars[f"Loss/{split}"], 700.0)) for split in measured}
        return scalars

    def final_tags(self) -> list[str]:
        """The tags of a run's headline results (TensorBoard's HParams tab)."""
        splits = ["Training", "Test"] + (["Validation"] if self.splits.validation is not None else [])
        headline = {"classification": "Accuracy", "language_model": "Perplexity"}.get(self.splits.task)
        tags = [f"Loss/{split}" for split in splits] + ([f"{headline}/Test"] if headline else [])
        return tags + (["Unnormalised_Loss/Test"] if self.splits.target_std is not None else [])


PROBE_ROWS = 2    # training rows the model and loss are tried on before a run (2: BatchNorm needs more than 1)


def _one_line(error: BaseException) -> str:
    return short(f"{type(error).__name__}: {' '.join(str(error).split())}", 200)


def _probe_outputs(model: nn.Module, batch: datasets.Batch) -> Any:
    """The model's outputs on `batch` with no trace left: no graph, no random numbers drawn (the
    run's results stay those of a run without the probe), its modes and buffers (BatchNorm's
    running statistics) as they were."""
    modes = {module: module.training for module in model.modules()}
    buffers = [buffer.clone() for buffer in model.buffers()]
    devices = [batch.inputs.device] if batch.inputs.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            return forward(model.eval(), batch)
    finally:
        for module, training in modes.items():
            module.training = training
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers, strict=True):
                buffer.copy_(saved)


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def check_fit(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              splits: datasets.Splits, model_name: str, loss_name: str | None) -> None:
    """Try `model` and `loss_fn` on the first training rows: a ConfigError naming what does not fit
    (the model and the data, the outputs and the targets, a loss that is not a scalar tensor),
    instead of PyTorch's error from inside the training loop. `loss_name` names a built-in loss,
    whose outputs' shape is known (mse: the targets'; cross_entropy: a column per class)."""
    train = splits.train
    batch = datasets.Batch(train.inputs[:PROBE_ROWS], train.targets[:PROBE_ROWS], 1.0,
                           carry=datasets.Carry() if train.sequential else None)
    try:
        outputs = _probe_outputs(model, batch)
    except Exception as error:      # the model's own code: any exception means it does not fit
        raise ConfigError(f"{model_name} does not fit the data: on inputs of shape {_shape(batch.inputs)} it "
                          f"raised {_one_line(error)}") from None
    if not isinstance(outputs, torch.Tensor):
        raise ConfigError(f"{model_name} returned a {type(outputs).__name__}, not a tensor of outputs")
    _check_outputs(outputs, batch.targets, splits, model_name, loss_name)
    try:
        with torch.no_grad():
            loss = loss_fn(outputs, batch.targets)
    except Exception as error:      # a user's loss, or outputs a built-in loss cannot take
        raise ConfigError(f"loss does not fit {model_name}'s outputs: loss(outputs {_shape(outputs)}, targets "
                          f"{_shape(batch.targets)}) raised {_one_line(error)}") from None
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.is_floating_point():
        got = f"a tensor of shape {_shape(loss)} and dtype {loss.dtype}" if isinstance(loss, torch.Tensor) \
            else f"a {type(loss).__name__}"
        raise ConfigError(f"loss returned {got}: it must return the batch's mean loss as a scalar floating-point "
                          f"tensor (torch operations throughout, no .item() or float())")


def _check_outputs(outputs: torch.Tensor, targets: torch.Tensor, splits: datasets.Splits, model_name: str,
                   loss_name: str | None) -> None:
    """Outputs a built-in loss would take but misread: mse broadcasts (rows, 1) against (rows,),
    and cross_entropy indexes classes beyond the outputs (a device-side assert on CUDA)."""
    if loss_name == "mse" and outputs.shape != targets.shape:
        raise ConfigError(f"{model_name} does not fit the data: outputs of shape {_shape(outputs)} for targets of "
                          f"shape {_shape(targets)} (mse needs the same shape: one output per target)")
    if loss_name == "cross_entropy" and (outputs.ndim != 2 or outputs.shape[0] != targets.numel()
                                         or outputs.shape[1] < splits.num_outputs):
        raise ConfigError(f"{model_name} does not fit the data: outputs of shape {_shape(outputs)}, but "
                          f"cross_entropy needs ({targets.numel()}, {splits.num_outputs}): a row per target and "
                          f"a column per class")
