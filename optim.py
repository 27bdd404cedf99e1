"""Drop-in `torch.optim` optimisers that tune their own hyperparameters while they train.

    optimiser = optim.Implicit(model, validation=lambda: loss_fn(model(x_val), y_val))
    for inputs, targets in loader:
        loss = optimiser.step(lambda: loss_fn(model(inputs), targets))

`Implicit` takes weight steps with SGD (momentum, L2 weight decay) or Adam and, after every window
of `window` (T) steps, moves lr, weight decay and momentum or betas (or one lr per weight element)
along the implicit hypergradient of the validation loss, with `terms` (i) Neumann terms (Clarke et
al., ICLR 2022: the "Ours" algorithms of configs/). `Baydin` is the paper's hypergradient descent
on lr after every step (configs/Baydin.yaml). Both are the training loop of train.py driven by the
user's loop instead of the config's data streams: the same weight-update rules
(algorithms/weight_update.py), weight steps and hypergradients (algorithms/steps.py) and
hyper-optimisers (algorithms/implicit.py, algorithms/baydin.py), so that they follow the same
trajectory as `python train.py` on the same batches.

Why `step` needs a closure that returns the loss (without calling backward): the last step of each
window is differentiated twice more (the Neumann series), so the optimiser needs the training loss
as a function of the weights, not a gradient in `.grad`. For the same reason the optimiser takes
the model rather than its parameters: it evaluates the closure with copies of the weights in the
model's place (torch.func.functional_call). Gradient clipping is the `gradient_clip` argument (the
optimiser makes the gradients itself, so clip_grad_norm_ between backward and step has nothing to
clip).

Data parallelism: in an initialised `torch.distributed` process group, every rank passes its
model (not wrapped in DistributedDataParallel) and a closure returning the mean loss of its equal
share of the global batch; gradients and hypergradients are summed over ranks as train.py sums
them (distributed.py), so the weights and hyperparameters stay identical on every rank and N ranks
take the steps one process takes on the whole batch.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from onepass import distributed
from onepass.algorithms.baydin import BaydinHyperOptimiser
from onepass.algorithms.hyperparameters import Hyperparameters, tag
from onepass.algorithms.implicit import ImplicitHyperOptimiser
from onepass.algorithms.steps import Problem, Step, Weights, weight_step_
from onepass.algorithms.weight_update import RULES, detached
from onepass.schema import Config, OptimiserConfig, TuningConfig

Closure = Callable[[], torch.Tensor]
RULE_NAMES = ("sgd", "adam")
# The paper's starting values (those of the dataset configs): the schema's 0 for weight decay and
# momentum cannot start an optimisation in log10 / logit space.
WEIGHT_DECAY, MOMENTUM = 1.0e-6, 0.5
BETAS = (OptimiserConfig.beta1, OptimiserConfig.beta2)
# (low, high) of each hyperparameter, from the schema (a tuned one must lie strictly inside).
RANGES = {field.name: (field.metadata["low"], field.metadata["high"]) for field in dataclasses.fields(OptimiserConfig)}
CLOSURE_HELP = "pass a function that returns the batch's loss without calling backward(), e.g. " \
               "optimiser.step(lambda: loss_fn(model(inputs), targets))"


class _Call(nn.Module):
    """Runs a closure as its forward pass, so that functional_call can swap the model's weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, closure: Closure) -> torch.Tensor:
        return closure()


class TunedOptimiser(torch.optim.Optimizer):
    """What `Implicit` and `Baydin` share: the window loop of train.py's Learner around a
    hyper-optimiser of algorithms/ (`hyper_optimiser_class`), fed by the user's closures.

    One parameter group, holding the current natural values (lr, weight_decay, and momentum or
    betas; a per-element lr as its mean), rewritten after every hyperparameter step. A value written
    into it (by hand or by an LR scheduler) moves that hyperparameter from the next step on, tuned
    or not (a per-element lr scales every element alike): schedulers that multiply the current lr
    (StepLR, ExponentialLR, ReduceLROnPlateau) scale the tuned lr; those that compute it afresh from
    the initial lr (LambdaLR, OneCycleLR) override the tuning at every step they take.
    `hypergradients` holds the last hyperparameter step's, by log tag (Hypergradient/Lr, ...)."""

    hyper_optimiser_class: type

    def __init__(self, model: nn.Module, validation: Closure | Iterable, validation_loss: Callable[[Any], torch.Tensor]
                 | None, settings: OptimiserConfig, tuning: TuningConfig, window: int):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("pass the model itself, not DistributedDataParallel: the optimiser sums the gradients "
                            "over ranks itself")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected the torch.nn.Module to train, got {type(model).__name__} (the "
                            f"optimiser evaluates the closure at copies of its weights)")
        _check_settings(settings, tuning, window)
        self.hyper_optimiser_class.check_config(tuning, name=type(self).__name__, window_steps=window)
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        group = {"lr": settings.lr, "weight_decay": settings.weight_decay}
        group |= {"betas": (settings.beta1, settings.beta2)} if settings.name == "adam" else \
            {"momentum": settings.momentum}
        super().__init__(params, group)
        self.window = window            # T: weight steps per hyperparameter step
        self._model, self._params = model, params
        self._names, self._call = [f"model.{name}" for name, _ in named], _Call(model)
        context = _context(params[0].device)
        self._share = 1.0 / context.world_size
        self._rule_name, self._rule = settings.name, RULES[settings.name]
        self._rule_state = self._rule.init_state(params)
        self._hyperparameters = Hyperparameters(settings, tuning, self._rule.hyperparameters, params)
        self._problem = Problem(self._loss_at, self._validation_loss_at, self._rule, settings.gradient_clip,
                                context, distributed.couples_ranks(model))
        self._hyper_optimiser = self.hyper_optimiser_class(tuning, self._problem, self._hyperparameters, params,
                                                           self._rule_state, window_steps=window)
        self._validation = _validation_closures(validation, validation_loss)
        self._steps = 0
        self._fast_hyperparameters = self._hyperparameters.natural_values()
        self._write_group()
        self.hypergradients: dict[str, float] = {}     # of the last hyperparameter step, by log tag

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError(f"{type(self).__name__} tunes one set of hyperparameters for the whole model: it has "
                             f"one parameter group (freeze parameters with requires_grad=False instead)")
        super().add_param_group(param_group)

    def step(self, closure: Closure | None = None) -> torch.Tensor:
        """One weight step on the loss that `closure` returns (called once, with autograd enabled;
        it must not call backward). The last step of every window also takes the hyperparameter
        step, on one validation loss. Returns the closure's loss, detached."""
        if not callable(closure):
            raise TypeError(f"{type(self).__name__}.step() needs the closure that computes the loss: {CLOSURE_HELP}")
        self._read_group()
        position = self._steps % self.window
        try:
            with torch.enable_grad():
                if position < self.window - self._hyper_optimiser.tracked_steps:
                    step = weight_step_(self._problem, self._params, self._rule_state, self._fast_hyperparameters,
                                        closure)
                else:
                    step = self._tracked_step(closure)
                if position == self.window - 1:
                    self._hyper_step(step)
        except RuntimeError as error:
            if "backward through the graph a second time" in str(error):
                raise ValueError("the loss's graph was used before the optimiser differentiated it: the closure "
                                 "must build the loss afresh at every call and return it without calling "
                                 "backward() (the optimiser differentiates it itself)") from None
            raise
        self._steps += 1
        return step.outputs.detach()

    def _tracked_step(self, closure: Closure) -> Step:
        """The window's last step through the hyper-optimiser, from a detached copy of the weights,
        on the graph; the model's parameters take its values."""
        weights = [p.detach().clone().requires_grad_() for p in self._params]
        step = self._hyper_optimiser.track(weights, self._rule_state, closure)
        with torch.no_grad():
            torch._foreach_copy_(self._params, step.weights)
        return step

    def _hyper_step(self, last: Step) -> None:
        self.hypergradients = self._hyper_optimiser.hyper_step(last, next(self._validation))
        if self._hyper_optimiser.tracked_steps:
            self._rule_state = detached(last.rule_state)
        self._hyperparameters.end_window()
        self._fast_hyperparameters = self._hyperparameters.natural_values()
        self._write_group()

    def _loss_at(self, weights: Weights, closure: Closure) -> tuple[torch.Tensor, torch.Tensor]:
        """(the closure's loss, this rank's share of the global loss) with `weights` in the place of
        the model's parameters (the model itself when they are its parameters)."""
        loss = closure() if weights is self._params else \
            functional_call(self._call, dict(zip(self._names, weights, strict=True)), (closure,))
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(f"the closure must return the loss as a 0-d tensor, got "
                            f"{type(loss).__name__ if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError("the closure returned a loss without a graph: compute it with autograd enabled from the "
                             "model's outputs, and return it without .item() or .detach()")
        return loss, loss if self._share == 1 else loss * self._share

    def _validation_loss_at(self, weights: Weights, closure: Closure) -> tuple[torch.Tensor, torch.Tensor]:
        """The validation loss at `weights`, with the model in evaluation mode (as train.py measures
        it: BatchNorm's running statistics, no dropout); the model's mode is restored after."""
        training = self._model.training
        self._model.eval()
        try:
            return self._loss_at(weights, closure)
        finally:
            self._model.train(training)

    def _write_group(self) -> None:
        """Publish the natural values in the parameter group (and remember what was written)."""
        values = self._hyperparameters.log_values()
        self._written = {name: values[tag(name)] for name in self._hyperparameters.names}
        group = self.param_groups[0]
        for name, value in self._written.items():
            if name not in ("beta1", "beta2"):
                group[name] = value
        if "beta1" in self._written:
            group["betas"] = (self._written["beta1"], self._written["beta2"])

    def _read_group(self) -> None:
        """Take up values written into the parameter group since `_write_group`."""
        group = self.param_groups[0]
        values = {name: group[name] for name in self._written if name in group}
        if "betas" in group:
            values["beta1"], values["beta2"] = group["betas"]
        if values != self._written:
            check = OptimiserConfig(**{"name": self._rule_name, **self._written, **values})
            _check_settings(check, TuningConfig(hyperparameters=self._hyperparameters.optimised), self.window)
            self._hyperparameters.shift_(self._written, values)
            self._fast_hyperparameters = self._hyperparameters.natural_values()
            self._write_group()

    def state_dict(self) -> dict[str, Any]:
        """Everything that the rest of the run depends on (copies): weight steps taken, the rule's
        state (momentum buffers or Adam's moments), the hyperparameters and the hyper-optimiser's
        state. The weights are the model's (model.state_dict())."""
        return {"method": type(self).__name__, "rule": self._rule_name, "steps": self._steps,
                "rule_state": copy.deepcopy(self._rule_state),
                "hyperparameters": self._hyperparameters.state_dict(),
                "hyper_optimiser": copy.deepcopy(self._hyper_optimiser.state_dict()),
                "param_groups": [{key: value for key, value in self.param_groups[0].items() if key != "params"}]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from `state_dict` (from an optimiser of the same class, rule and settings)."""
        saved = (state_dict.get("method"), state_dict.get("rule"))
        if saved != (type(self).__name__, self._rule_name):
            raise ValueError(f"the state is that of {saved[0]} with rule {saved[1]!r}, not of this "
                             f"{type(self).__name__} with rule {self._rule_name!r}")
        raw = [leaf.shape for leaf in self._hyperparameters.leaves()]
        if [tuple(leaf.shape) for leaf in state_dict["hyperparameters"]["raw"]] != [tuple(s) for s in raw]:
            raise ValueError("the state tunes other hyperparameters (or another model's per-element lr) than this "
                             "optimiser: build it with the same settings")
        self._steps = state_dict["steps"]
        self._rule_state = copy.deepcopy(state_dict["rule_state"])
        self._hyperparameters.load_state_dict(state_dict["hyperparameters"])
        self._hyper_optimiser.load_state_dict(copy.deepcopy(state_dict["hyper_optimiser"]))
        self._fast_hyperparameters = self._hyperparameters.natural_values()
        self._write_group()


class Implicit(TunedOptimiser):
    """SGD or Adam whose hyperparameters follow the implicit hypergradient of a validation loss.

    - `validation`: a function returning a validation loss (it picks its own batch), or an iterable
      of validation batches (a DataLoader; cycled) with `validation_loss(batch)` returning one's loss.
    - `rule`: "sgd" (lr, weight_decay, momentum) or "adam" (lr, weight_decay, betas): initial values.
    - `tune`: the hyperparameters tuned (default: all of the rule's); the others keep their values.
      `per_element_lr`: one lr per weight element (configs/Ours_HDLR_*.yaml).
    - `window`: T, weight steps per hyperparameter step; `terms`: i, Neumann-series terms;
      `hyper_optimiser` ("adam" or "sgd") and `hyper_lr`: how the raw values (log10 lr, log10 weight
      decay, logit momentum and betas) move. The defaults are the paper's (configs/Ours_*.yaml).
    - `gradient_clip`: the global gradient norm is scaled down to at most this before each update.
    """

    hyper_optimiser_class = ImplicitHyperOptimiser

    def __init__(self, model: nn.Module, validation: Closure | Iterable,
                 validation_loss: Callable[[Any], torch.Tensor] | None = None, *, rule: str = OptimiserConfig.name,
                 lr: float = OptimiserConfig.lr, weight_decay: float = WEIGHT_DECAY, momentum: float = MOMENTUM,
                 betas: tuple[float, float] = BETAS, tune: tuple[str, ...] | None = None,
                 per_element_lr: bool = False, window: int = Config.network_weight_steps,
                 terms: int = TuningConfig.rollback_distance, hyper_optimiser: str = TuningConfig.optimiser,
                 hyper_lr: float = TuningConfig.lr, gradient_clip: float | None = None):
        settings = _settings(rule, lr, weight_decay, momentum, betas, gradient_clip)
        tune = RULES[settings.name].hyperparameters if tune is None else tuple(tune)
        tuning = TuningConfig(method="implicit", hyperparameters=tune, optimiser=hyper_optimiser, lr=hyper_lr,
                              high_dimensional=("lr",) if per_element_lr else (), rollback_distance=terms)
        super().__init__(model, validation, validation_loss, settings, tuning, window)


class Baydin(TunedOptimiser):
    """SGD (or Adam) whose lr follows Baydin et al.'s hypergradient descent, as the paper ran it:
    after every step, log10 lr += hyper_lr * grad L(w_t) . grad L(w_{t-1}), the second gradient from
    the loss `validation` returns (the paper used training data there; see algorithms/baydin.py).
    Arguments as `Implicit`'s; the defaults are configs/Baydin.yaml's."""

    hyper_optimiser_class = BaydinHyperOptimiser

    def __init__(self, model: nn.Module, validation: Closure | Iterable,
                 validation_loss: Callable[[Any], torch.Tensor] | None = None, *, rule: str = OptimiserConfig.name,
                 lr: float = OptimiserConfig.lr, weight_decay: float = WEIGHT_DECAY, momentum: float = MOMENTUM,
                 betas: tuple[float, float] = BETAS, hyper_lr: float = 1.0e-3, gradient_clip: float | None = None):
        settings = _settings(rule, lr, weight_decay, momentum, betas, gradient_clip)
        tuning = TuningConfig(method="baydin", hyperparameters=("lr",), optimiser="sgd", lr=hyper_lr,
                              validation_data="training", every_weight_step=True)
        super().__init__(model, validation, validation_loss, settings, tuning, window=1)


def from_config(cfg: Config, model: nn.Module, validation: Closure | Iterable,
                validation_loss: Callable[[Any], torch.Tensor] | None = None) -> TunedOptimiser:
    """The optimiser with the settings of a run's config (tuning.method implicit or baydin), e.g.
    to follow an algorithm of configs/ in a loop of one's own."""
    o, t = cfg.optimiser, cfg.tuning
    common = dict(rule=o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum, betas=(o.beta1, o.beta2),
                  gradient_clip=o.gradient_clip)
    if t.method == "baydin":
        return Baydin(model, validation, validation_loss, hyper_lr=t.lr, **common)
    if t.method != "implicit":
        raise ValueError(f"tuning.method = {t.method!r}: the optimisers run the implicit and baydin methods only")
    return Implicit(model, validation, validation_loss, tune=t.hyperparameters, per_element_lr=bool(t.high_dimensional),
                    window=cfg.network_weight_steps, terms=t.rollback_distance, hyper_optimiser=t.optimiser,
                    hyper_lr=t.lr, **common)


def _settings(rule: str, lr: float, weight_decay: float, momentum: float, betas: tuple[float, float],
              gradient_clip: float | None) -> OptimiserConfig:
    if rule not in RULE_NAMES:
        raise ValueError(f"rule={rule!r}: must be one of {', '.join(map(repr, RULE_NAMES))}")
    beta1, beta2 = betas
    return OptimiserConfig(name=rule, lr=lr, weight_decay=weight_decay, momentum=momentum, beta1=beta1, beta2=beta2,
                           gradient_clip=gradient_clip)


def _check_settings(settings: OptimiserConfig, tuning: TuningConfig, window: int) -> None:
    """One-line ValueErrors for values the rule or the tuning cannot use (a tuned value must lie
    strictly inside its range: it is optimised as a logarithm or a logit)."""
    names = RULES[settings.name].hyperparameters
    unknown = [name for name in tuning.hyperparameters if name not in names]
    if unknown:
        raise ValueError(f"tune={tuple(tuning.hyperparameters)}: {settings.name} has no {', '.join(unknown)} "
                         f"(it has {', '.join(names)})")
    for name in names:
        value, (low, high) = getattr(settings, name), RANGES[name]
        tuned = name in tuning.hyperparameters or name == "lr"
        if not (low < value if tuned else low <= value) or (high is not None and not value < high):
            where = f"({low:g}, {high:g})" if high is not None else f"{'above' if tuned else 'at least'} {low:g}"
            raise ValueError(f"{name}={value!r}: must be {where}{' to be tuned' if tuned and name != 'lr' else ''}")
    for name, value, low in (("window", window, 1), ("terms", tuning.rollback_distance, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r}: must be a whole number of at least {low}")
    if tuning.optimiser not in ("adam", "sgd") or not tuning.lr >= 0:
        raise ValueError(f"hyper_optimiser={tuning.optimiser!r}, hyper_lr={tuning.lr!r}: must be 'adam' or 'sgd' "
                         f"with a step size of at least 0")
    if settings.gradient_clip is not None and not settings.gradient_clip > 0:
        raise ValueError(f"gradient_clip={settings.gradient_clip!r}: must be above 0 (or None: no clipping)")


def _context(device: torch.device) -> distributed.Context:
    """This process's place in the initialised process group (one process of one if there is none)."""
    if dist.is_available() and dist.is_initialized():
        return distributed.Context(dist.get_rank(), dist.get_world_size(), device)
    return distributed.Context(device=device)


def _validation_closures(validation: Closure | Iterable, validation_loss: Callable[[Any], torch.Tensor] | None
                         ) -> Iterator[Closure]:
    """Endless closures of validation losses: `validation` itself, or `validation_loss` on each
    batch of the iterable `validation` in turn, starting it again when it ends."""
    if validation_loss is None:
        if not callable(validation):
            raise TypeError("validation: pass a function returning the validation loss, or an iterable of batches "
                            "with validation_loss=lambda batch: ... returning one batch's loss")
        return itertools.repeat(validation)
    if not isinstance(validation, Iterable):
        raise TypeError(f"validation: with validation_loss, expected an iterable of batches (e.g. a DataLoader), "
                        f"got {type(validation).__name__}")
    return _cycled(validation, validation_loss)


def _cycled(batches: Iterable, loss: Callable[[Any], torch.Tensor]) -> Iterator[Closure]:
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield lambda batch=batch: loss(batch)
        if empty:
            raise ValueError("validation: the iterable of batches has no (more) batches; pass one that can be "
                             "iterated again, such as a DataLoader or a list, not a one-pass iterator")
