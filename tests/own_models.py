"""Model factories of a user's own, for `model.name: tests.own_models:<factory>` (tests only)."""
from __future__ import annotations

from torch import nn

from onepass.schema import ModelConfig

NOT_CALLABLE = 3
calls: list[tuple] = []     # the arguments of every call, in this process


def small_mlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """inputs -> 16 tanh units -> num_outputs, sized from what the factory is given."""
    calls.append((cfg, input_shape, num_outputs))
    return nn.Sequential(nn.Linear(input_shape[0], 16), nn.Tanh(), nn.Linear(16, num_outputs))


def not_a_module(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> str:
    return "a string"


def failing(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    raise ValueError("this factory needs images")


def wrong_inputs(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return nn.Linear(input_shape[0] + 1, num_outputs)


def wrong_outputs(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return nn.Linear(input_shape[0], 3)
