"""Data parallelism: the process group, and the few all-reduces the training loop needs.

N processes with a global batch of B rows compute the same weights and hyperparameters as one
process with batch B. Every rank draws the same global batch and keeps its contiguous shard; its
loss is the shard's mean weighted by (shard rows / B), so the sum over ranks of the shard losses,
and of their gradients, is the global batch mean and its gradient (uneven shards included).

Differentiating through an all-reduced gradient, two ways:
- Implicit algorithms take vector-Jacobian products of one tracked step w' = w - u(w, sum_r g_r(w))
  with a vector every rank holds alike. `sum_gradients` sums the shard gradients with a backward
  that passes the incoming gradient through unchanged, and `share_direct_path` makes w enter u's
  direct (non-gradient) path scaled by 1/N. A product on rank r then yields
  (1/N) * direct + (shard r's Hessian) * vector, and one all-reduce (sum) of that over ranks is the
  exact global product: one model-sized all-reduce per Neumann term.
- Unrolled algorithms back-propagate each rank's share of the validation loss through R steps.
  `all_reduce_differentiable` has the exact adjoint of a cross-rank sum (its backward sums the
  incoming gradients over ranks, one all-reduce per unrolled step), and the hypergradients of the
  shares are summed at the end.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from onepass import util
from onepass.schema import ConfigError


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")     # this rank's device: its model, data and collectives

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


SINGLE = Context()


def from_environment(device: str = "cpu") -> Context:
    """The context torchrun (or our own launcher, or a user by hand) describes in RANK / WORLD_SIZE,
    on this rank's device for the configured `device` (LOCAL_RANK picks the GPU); a value that cannot
    describe a rank of the job is a ConfigError naming it."""
    world_size = environment_number("WORLD_SIZE", 1, 1, None, "the number of processes of the job")
    rank = environment_number("RANK", 0, 0, world_size - 1, f"this process's place among WORLD_SIZE={world_size}, "
                              f"each process its own")
    local_rank = environment_number("LOCAL_RANK", 0, 0, local_world_size(world_size) - 1,
                                    "this process's place among the job's processes on this machine")
    return Context(rank, world_size, rank_device(device, local_rank))


def local_world_size(world_size: int) -> int:
    """How many of the job's `world_size` processes run on this machine (LOCAL_WORLD_SIZE; all by default)."""
    return environment_number("LOCAL_WORLD_SIZE", world_size, 1, world_size,
                              f"the processes on this machine, of WORLD_SIZE={world_size}")


def environment_number(name: str, default: int, low: int, high: int | None, meaning: str) -> int:
    """The environment variable `name` as a whole number from `low` to `high` (None: no limit), or
    `default` where it is unset; otherwise a ConfigError naming the variable, its value and `meaning`."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        bounds = f"a whole number at least {low}" if high is None else str(low) if high == low \
            else f"a whole number from {low} to {high}"
        raise ConfigError(f"{name}={value}: must be {bounds} ({meaning})")
    return number


def backend(device: torch.device) -> str:
    """The process-group backend for ranks on `device`: NCCL between GPUs, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(configured: str, local_rank: int) -> torch.device:
    """The device of the rank with index `local_rank` on its machine, for the configured device:
    `cuda` (and `auto` where CUDA is available) gives GPU number `local_rank`, one GPU per rank;
    `cuda:N` names one GPU (for a single process); `cpu` is shared by every rank."""
    if configured == "auto":
        configured = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(configured)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    return device


def resolve_device(configured: str) -> torch.device:
    """The configured device of a process on its own, with its index: `cuda` (and `auto` where CUDA
    is available) is the process's current GPU, which a rank of several sets to its own
    (rank_device). ConfigError for a GPU that is not there."""
    if configured.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device = {configured!r}, but CUDA is not available here; use --device cpu")
    device = rank_device(configured, torch.cuda.current_device() if torch.cuda.is_available() else 0)
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device = {configured!r}, but only {torch.cuda.device_count()} GPU(s) are visible here "
                          f"(numbered from 0; CUDA_VISIBLE_DEVICES chooses them)")
    return device


def use_device(device: torch.device) -> None:
    """Make `device` this process's current GPU (where an unindexed "cuda" tensor goes, and the
    device NCCL's collectives and barriers use); nothing for the CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


TIMEOUT_VARIABLE = "ONEPASS_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT = 60.0     # seconds
# Below a second, a busy machine's ordinary delays fail the job; above a day, a hang goes unnoticed
# (and far above, the value no longer fits a timedelta).
TIMEOUT_RANGE = (1.0, 86400.0)


def collective_timeout() -> float:
    """How long a rank waits for the others in any collective (seconds; the environment variable
    ONEPASS_COLLECTIVE_TIMEOUT, default 60, from 1 s to a day) before it fails: a hung or dead rank
    ends the job."""
    value = os.environ.get(TIMEOUT_VARIABLE, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        seconds = math.nan
    low, high = TIMEOUT_RANGE
    if not low <= seconds <= high:
        raise ConfigError(f"{TIMEOUT_VARIABLE}={value}: must be a number of seconds from {low:g} to {high:g} "
                          f"(a day); unset, it is {DEFAULT_TIMEOUT:g}")
    return seconds


def is_timeout(error: BaseException) -> bool:
    """Whether `error` is a collective that gave up waiting for another rank (gloo's message; NCCL's
    watchdog usually ends the process itself)."""
    return isinstance(error, RuntimeError) and "timed out" in str(error).lower()


_joined_a_group = False      # see exit_process


def init_process_group(backend: str, **options: object) -> None:
    """torch's init_process_group, its connection noise held back; the process is a rank from now on."""
    global _joined_a_group
    _joined_a_group = True
    with held_back_stderr():
        dist.init_process_group(backend, **options)


def init(context: Context) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPU) when there is more than one rank (under
    torchrun: the ranks on this machine, LOCAL_WORLD_SIZE, share its cores), meeting at MASTER_ADDR
    and MASTER_PORT. A group that cannot form there is a ConfigError saying what to set right."""
    if context.active and not dist.is_initialized():
        address, timeout = meeting_point(context.world_size), collective_timeout()
        util.share_cores(local_world_size(context.world_size))
        use_device(context.device)
        try:
            init_process_group(backend(context.device), rank=context.rank, world_size=context.world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as error:        # torch's DistNetworkError and DistStoreError among them
            raise rendezvous_failure(context, address, timeout, error) from None


STDERR = 2        # the file descriptor, which C++ libraries write to as well as Python


@contextlib.contextmanager
def held_back_stderr() -> Iterator[None]:
    """Hold back what is written to file descriptor 2 (where C++ libraries write) while the block
    runs: passed on if it succeeds, dropped if it raises, as its one-line report says it all (c10d
    logs every failed attempt to connect, with a C++ stack)."""
    sys.stderr.flush()
    real = os.dup(STDERR)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), STDERR)
        succeeded = False
        try:
            yield
            succeeded = True
        finally:
            sys.stderr.flush()
            os.dup2(real, STDERR)
            os.close(real)
            if succeeded:
                held.seek(0)
                os.write(STDERR, held.read())


def meeting_point(world_size: int) -> str:
    """Where the ranks of a job started by torchrun or by hand meet: MASTER_ADDR (rank 0's machine)
    and MASTER_PORT (a free port there), which every rank needs."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set: every process of a job "
                          f"started by hand needs MASTER_ADDR and MASTER_PORT, rank 0's machine and a free port there, "
                          f"the same for all (or start them with torchrun, or use train.py --nproc {world_size})")
    port = environment_number("MASTER_PORT", 0, 1, 65535, "the port on MASTER_ADDR where the ranks meet")
    return f"{os.environ['MASTER_ADDR']}:{port}"


def rendezvous_failure(context: Context, address: str, timeout: float, error: RuntimeError) -> Exception:
    """Why the ranks could not form their group, as a ConfigError naming what to set right where the
    cause is known (else `error` itself)."""
    last = context.world_size - 1
    if "EADDRINUSE" in str(error):
        return ConfigError(f"MASTER_PORT={address.rpartition(':')[2]} is already in use on this machine, perhaps by "
                           f"another process started with RANK=0: give each process its own RANK from 0 to {last}, "
                           f"and the job a free MASTER_PORT")
    if not is_timeout(error):
        return error
    if context.is_rank0:
        return ConfigError(f"WORLD_SIZE={context.world_size}: not every rank joined rank 0 at {address} within "
                           f"{timeout:g} s; start all {context.world_size} processes, RANK=0 to {last}, with the same "
                           f"MASTER_ADDR and MASTER_PORT ({TIMEOUT_VARIABLE} sets the wait)")
    return ConfigError(f"RANK={context.rank}: no rank 0 answered at MASTER_ADDR:MASTER_PORT={address} within "
                       f"{timeout:g} s; start the process with RANK=0 on that machine, with the same MASTER_PORT "
                       f"({TIMEOUT_VARIABLE} sets the wait)")


def exit_process(code: int) -> NoReturn:
    """End the process with `code`. One that has been a rank of a process group ends at once,
    skipping the interpreter's teardown: gloo's threads may still run while C++ static objects
    are destroyed, which aborted about one rank exit in 40 (SIGABRT, "terminate called without an
    active exception") after runs that had succeeded. Open files must be closed before."""
    if not _joined_a_group:
        sys.exit(code)
    atexit._run_exitfuncs()      # Python's own exit work (multiprocessing's clean-up among it)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def shutdown(finished: bool = False) -> None:
    """Leave the process group. After a run that `finished` on every rank, the ranks first meet at
    a barrier, so that none tears its connections down while another still uses them (gloo may
    abort a process whose peer has gone). After a failure there is no barrier: the others may
    never arrive."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def broadcast_from_rank0(value: object, context: Context) -> object:
    """Rank 0's `value` on every rank (a Python object, e.g. a freshly drawn seed)."""
    if not context.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=context.device)   # NCCL sends objects from a GPU
    return box[0]


def shard(rows: torch.Tensor, context: Context) -> torch.Tensor:
    """This rank's contiguous part of a global batch's row indices (sizes differ by at most 1)."""
    return torch.tensor_split(rows, context.world_size)[context.rank]


def all_reduce_(tensors: list[torch.Tensor], context: Context) -> list[torch.Tensor]:
    """Sum `tensors` over ranks, in place, as one flat message; returns them."""
    if context.active and tensors:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        torch._foreach_copy_(tensors, [chunk.view_as(t) for chunk, t in
                                       zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)])
    return tensors


class _SumGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, context: Context, *gradients: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(all_reduce_([g.clone() for g in gradients], context))

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor) -> tuple:
        return (None, *grad_outputs)       # see the module docstring: the product is summed later


def sum_gradients(gradients: list[torch.Tensor], context: Context) -> list[torch.Tensor]:
    """The global gradient from shard gradients, differentiably (identity backward)."""
    if not context.active:
        return list(gradients)
    return list(_SumGradients.apply(context, *gradients))


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, context: Context, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.context = context
        return tuple(all_reduce_([t.clone() for t in tensors], context))

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor) -> tuple:
        # The adjoint of a sum over ranks is a sum over ranks, itself differentiable (second order).
        return (None, *_AllReduceSum.apply(ctx.context, *grad_outputs))


def all_reduce_differentiable(tensors: list[torch.Tensor], context: Context) -> list[torch.Tensor]:
    """Sum over ranks with the exact adjoint (its backward sums the incoming gradients over ranks):
    for graphs in which each rank differentiates its own share of a global objective, such as an
    unrolled run's validation loss over a sharded batch."""
    if not context.active:
        return list(tensors)
    return list(_AllReduceSum.apply(context, *tensors))


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d or 2d) whose training statistics are those of the global batch (all ranks'
    shards), through differentiable all-reduces of the per-channel sums and squared deviations: the
    data-parallel equivalent of one process's BatchNorm, to second order, on any device."""

    def __init__(self, source: torch.nn.modules.batchnorm._BatchNorm, context: Context):
        super().__init__(source.num_features, source.eps, source.momentum, source.affine,
                         source.track_running_stats, device=source.weight.device, dtype=source.weight.dtype)
        self.load_state_dict(source.state_dict())
        self.context = context

    def _check_input_dim(self, inputs: torch.Tensor) -> None:
        if inputs.dim() < 2:
            raise ValueError(f"expected at least 2-d input (batch, channels, ...), got {inputs.dim()}-d")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(inputs)
        dims = [0, *range(2, inputs.dim())]            # all but the channel dimension
        shape = (1, -1) + (1,) * (inputs.dim() - 2)
        per_channel = inputs.numel() // max(inputs.shape[1], 1)
        count = torch.full((1,), float(per_channel), dtype=inputs.dtype, device=inputs.device)
        # Two passes (mean, then squared deviations), as one process's BatchNorm computes them:
        # E[x^2] - E[x]^2 would lose digits where the variance is small next to the mean.
        total, count = all_reduce_differentiable([inputs.sum(dim=dims), count], self.context)
        mean = total / count
        (squares,) = all_reduce_differentiable([((inputs - mean.view(shape)) ** 2).sum(dim=dims)], self.context)
        variance = squares / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                unbiased = variance * count / (count - 1)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(unbiased, self.momentum)
        normalised = (inputs - mean.view(shape)) / torch.sqrt(variance.view(shape) + self.eps)
        return normalised * self.weight.view(shape) + self.bias.view(shape) if self.affine else normalised


def synchronise_batch_norm(model: torch.nn.Module, context: Context) -> torch.nn.Module:
    """Replace every BatchNorm of `model` by a GlobalBatchNorm (on several processes)."""
    if context.active:
        for name, child in model.named_children():
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
                setattr(model, name, GlobalBatchNorm(child, context))
            else:
                synchronise_batch_norm(child, context)
    return model


def couples_ranks(model: torch.nn.Module) -> bool:
    """Whether the model's forward pass itself communicates (so products need exact adjoints)."""
    return any(isinstance(m, GlobalBatchNorm) for m in model.modules())


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale: float, tensor: torch.Tensor) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple:
        return None, grad_output * ctx.scale


def share_direct_path(params: list[torch.Tensor], context: Context) -> list[torch.Tensor]:
    """The same tensors' values, with gradients scaled by 1/N, so that a sum over ranks counts
    the direct path once."""
    if not context.active:
        return params
    return [_ScaleGradient.apply(1 / context.world_size, p) for p in params]
