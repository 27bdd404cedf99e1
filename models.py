"""Models and losses, by name."""
from __future__ import annotations

import importlib
import itertools
import re
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from onepass.schema import ConfigError

if TYPE_CHECKING:
    from onepass.schema import ModelConfig

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "elu": nn.ELU, "gelu": nn.GELU,
}

# Each loss is the mean over the batch, so full-data losses are size-weighted batch means.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": F.mse_loss,
    # Token targets arrive as a (time, streams) table; the logits are already flattened to match.
    "cross_entropy": lambda outputs, targets: F.cross_entropy(outputs, targets.reshape(-1)),
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


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (a 1x1 projection when the
    shape changes), as in He et al. (2016) and torchvision."""

    def __init__(self, width_in: int, width_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width_out)
        self.conv2 = nn.Conv2d(width_out, width_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or width_in != width_out:
            self.shortcut = nn.Sequential(nn.Conv2d(width_in, width_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(width_out))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = F.relu(self.bn1(self.conv1(inputs)))
        return F.relu(self.bn2(self.conv2(outputs)) + self.shortcut(inputs))


class ResNet18(nn.Sequential):
    """torchvision's resnet18 (the ImageNet stem: 7x7 stride-2 convolution and max-pooling, as
    the paper's CIFAR-10 runs used), with the same initialisation."""

    def __init__(self, in_channels: int, num_classes: int):
        stages, width = [], 64
        for index, width_out in enumerate((64, 128, 256, 512)):
            stride = 1 if index == 0 else 2
            stages += [BasicBlock(width, width_out, stride), BasicBlock(width_out, width_out, 1)]
            width = width_out
        super().__init__(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1), *stages,
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class LSTMLayer(nn.Module):
    """One LSTM layer in plain tensor operations, so that it has second derivatives on every device
    (cuDNN's fused RNN has no double backward) and works under `higher` and torch.func alike.
    Gates in PyTorch's order (input, forget, cell, output) and its uniform initialisation."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        bound = hidden_size ** -0.5
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size).uniform_(-bound, bound))

    def forward(self, inputs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """inputs (time, batch, input_size), state (h, c) each (batch, hidden_size)."""
        h, c = state
        projected = F.linear(inputs, self.weight_ih, self.bias)   # every time step at once
        outputs = []
        for x in projected:
            i, f, g, o = (x + h @ self.weight_hh.T).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs), (h, c)


class LSTMLanguageModel(nn.Module):
    """Token embedding, stacked LSTM layers, linear decoder to next-token logits.

    `forward(tokens (time, streams), hidden)` returns the logits flattened to (time * streams,
    vocabulary) and the final state (h, c), each (layers, streams, hidden_size); `hidden=None`
    starts from zeros.
    """

    def __init__(self, vocabulary_size: int, embedding_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocabulary_size, embedding_size)
        self.layers = nn.ModuleList(LSTMLayer(embedding_size if index == 0 else hidden_size, hidden_size)
                                    for index in range(num_layers))
        self.decoder = nn.Linear(hidden_size, vocabulary_size)

    def forward(self, tokens: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if hidden is None:
            zeros = self.decoder.weight.new_zeros(len(self.layers), tokens.shape[1], self.hidden_size)
            hidden = (zeros, zeros)
        outputs, final_h, final_c = self.embedding(tokens), [], []
        for layer, h, c in zip(self.layers, *hidden, strict=True):
            outputs, (h, c) = layer(outputs, (h, c))
            final_h.append(h)
            final_c.append(c)
        return self.decoder(outputs).flatten(0, 1), (torch.stack(final_h), torch.stack(final_c))


MODELS: dict[str, Callable[[ModelConfig, tuple[int, ...], int], nn.Module]] = {
    "mlp": lambda cfg, input_shape, outputs: MLP(cfg.layer_sizes, cfg.activation, cfg.batch_norm),
    "resnet18": lambda cfg, input_shape, outputs: ResNet18(input_shape[0], outputs),
    "lstm": lambda cfg, input_shape, outputs: LSTMLanguageModel(outputs, cfg.embedding_size, cfg.hidden_size,
                                                               cfg.num_layers),
}
# The shape of one input row each model takes: features, images, or token ids.
INPUT_RANKS = {"mlp": 1, "resnet18": 3, "lstm": 0}


# A user's own model: `model.name: package.module:factory` names a callable that is imported and
# called as factory(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module,
# the signature of the MODELS entries above: cfg is the whole `model` section, input_shape the shape of
# one input row ((features,) for a table, (C, H, W) for images), num_outputs the number of regression
# targets or classes. The module must be importable (installed, or on PYTHONPATH).
FACTORY_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_factory_name(name: str) -> bool:
    """Whether `name` has the form `module.path:attribute` of a user's model factory."""
    return FACTORY_NAME.fullmatch(name) is not None


def factory(name: str) -> Callable[..., nn.Module]:
    """The callable a `module.path:attribute` name refers to; a ConfigError naming what was not found."""
    if not is_factory_name(name):
        raise ConfigError(f"{name!r} is not of the form module.path:factory")
    module_name, _, attribute = name.partition(":")
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name) \
                and module_name[len(error.name):len(error.name) + 1] in ("", "."):
            raise ConfigError(f"no module named {error.name!r} (is it installed, or on PYTHONPATH?)") from None
        raise ConfigError(f"importing {module_name!r} failed: {type(error).__name__}: {error}") from None
    except Exception as error:      # the user's module raised while being imported
        message = " ".join(str(error).split())
        raise ConfigError(f"importing {module_name!r} failed: {type(error).__name__}: {message}") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{name!r} is a {type(target).__name__}, not a callable that returns an nn.Module")
    return target


def _build_own(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    try:
        make = factory(cfg.name)
    except ConfigError as error:
        raise ConfigError(f"model.name = {cfg.name!r}: {error}") from None
    try:
        model = make(cfg, tuple(input_shape), num_outputs)
    except Exception as error:       # the user's code: say where it failed, in one line
        frame = traceback.extract_tb(error.__traceback__)[-1]
        raise ConfigError(f"model.name = {cfg.name!r}: the factory raised {type(error).__name__}: {error} "
                          f"({frame.filename}, line {frame.lineno})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name = {cfg.name!r}: the factory returned a {type(model).__name__}, "
                          f"not a torch.nn.Module")
    return model


def build(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Build the model named in `cfg` (a registered name, or a `module:factory`), checking that a
    registered model fits the data."""
    own = cfg.name not in MODELS
    if not own and len(input_shape) != INPUT_RANKS[cfg.name]:
        kind = {0: "token ids", 1: "feature vectors", 3: "images"}
        raise ConfigError(f"model.name = {cfg.name!r} takes {kind[INPUT_RANKS[cfg.name]]}, but the dataset's "
                          f"inputs are {kind.get(len(input_shape), f'{len(input_shape)}-d arrays')}")
    if cfg.name == "mlp":
        num_inputs = input_shape[0]
        if len(cfg.layer_sizes) < 2:
            raise ConfigError(f"model.layer_sizes = {list(cfg.layer_sizes)}: needs at least inputs and outputs")
        if (cfg.layer_sizes[0], cfg.layer_sizes[-1]) != (num_inputs, num_outputs):
            raise ConfigError(f"model.layer_sizes = {list(cfg.layer_sizes)} does not fit the data: the dataset "
                              f"has {num_inputs} inputs and {num_outputs} outputs, so use "
                              f"[{num_inputs}, ..., {num_outputs}]")
    # Initial weights are drawn in float32 whatever the process's default dtype, so that a seed gives
    # the same network in every program (a float64 run casts them afterwards).
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        return _build_own(cfg, input_shape, num_outputs) if own else MODELS[cfg.name](cfg, input_shape, num_outputs)
    finally:
        torch.set_default_dtype(default_dtype)


def build_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return LOSSES[name]
