"""Models and losses, by name."""
from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from config import ConfigError

if TYPE_CHECKING:
    from config import ModelConfig

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "elu": nn.ELU, "gelu": nn.GELU,
}

# Each loss is the mean over the batch, so full-data losses are size-weighted batch means.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": F.mse_loss, "cross_entropy": F.cross_entropy,
}


class MLP(nn.Sequential):
    """Linear, then [BatchNorm] -> activation -> Linear for each further width in `layer_sizes`.

    With BatchNorm, hidden Linear layers have no bias (the BatchNorm shift replaces it).
    """

    def __init__(self, layer_sizes: tuple[int, ...], activation: str = "relu", batch_norm: bool = False):
        layers: list[nn.Module] = []
        for index, (width_in, width_out) in enumerate(itertools.pairwise(layer_sizes)):
            if index > 0:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(width_in))
                layers.append(ACTIVATIONS[activation]())
            is_last = index == len(layer_sizes) - 2
            layers.append(nn.Linear(width_in, width_out, bias=is_last or not batch_norm))
        super().__init__(*layers)


MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "mlp": lambda cfg: MLP(cfg.layer_sizes, cfg.activation, cfg.batch_norm),
}


def build(cfg: ModelConfig, num_inputs: int, num_outputs: int) -> nn.Module:
    """Build the model named in `cfg`, checking that its ends fit the data."""
    if cfg.name == "mlp":
        if len(cfg.layer_sizes) < 2:
            raise ConfigError(f"model.layer_sizes = {list(cfg.layer_sizes)}: needs at least inputs and outputs")
        if (cfg.layer_sizes[0], cfg.layer_sizes[-1]) != (num_inputs, num_outputs):
            raise ConfigError(f"model.layer_sizes = {list(cfg.layer_sizes)} does not fit the data: the dataset "
                             f"has {num_inputs} inputs and {num_outputs} outputs, so use "
                             f"[{num_inputs}, ..., {num_outputs}]")
    return MODELS[cfg.name](cfg)


def build_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return LOSSES[name]
