"""Data-parallel training under ``torchrun`` (see docs/scale-out.md).

Without torchrun's environment (``WORLD_SIZE`` unset or 1) nothing here is
active and training is the single-process loop, unchanged. Under torchrun:

* one process group: NCCL when the run trains on CUDA, gloo on CPUs;
* every global batch of ``train.batch_size`` images is drawn and augmented
  identically on every rank (same seeded generator), and each rank trains on
  its contiguous share of it (``shard``); the loss is normalised by the whole
  global batch, so the averaged gradient is the global batch's gradient;
* batch norm uses the statistics of the global batch: torch's SyncBatchNorm
  on GPUs, :class:`GlobalBatchNorm` on CPUs (torch's SyncBatchNorm refuses
  CPU tensors); dropout draws the global batch's mask from the random state
  that every rank shares and keeps the rank's rows (:class:`GlobalDropout`),
  so the masks are those a single process draws;
* validation and test indices are split across ranks, the logits gathered
  and the padding dropped (``gather_rows``), so every metric is computed
  once, over all predictions;
* only rank 0 writes the run folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from breastcad.errors import BreastcadError


class DistributedError(BreastcadError):
    """The distributed setup is unusable, or another rank failed."""


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def world_from_env() -> World:
    """The process's place as torchrun (or any launcher setting its variables) describes it."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return SINGLE
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    local_size = _env_int("LOCAL_WORLD_SIZE", size)
    if not 0 <= rank < size:
        raise DistributedError(f"RANK={rank} is outside WORLD_SIZE={size}")
    return World(size=size, rank=rank, local_rank=local_rank, local_size=max(1, local_size))


def current() -> World:
    """The world of the initialised process group, or the single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return world_from_env()


def init(device_type: str) -> World:
    """Join the process group (once) when launched by torchrun; a no-op otherwise."""
    world = world_from_env()
    if not world.enabled or dist.is_initialized():
        return world if world.enabled else SINGLE
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    try:
        dist.init_process_group(backend=backend)
    except (RuntimeError, ValueError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DistributedError(f"torch.distributed ({backend}): {msg}") from None
    return world


def local_device(device: torch.device, world: World) -> torch.device:
    """Under torchrun every rank uses its own GPU (cuda:LOCAL_RANK)."""
    if world.enabled and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def agree(error: BaseException | None) -> None:
    """Collective: raise on every rank when any rank failed, so no rank waits forever.

    Each rank passes the error it met (or None) after a step that may fail the
    same way everywhere (bad data, a non-empty --out); all of them then stop
    with the first rank's message.
    """
    if not current().enabled:
        if error is not None:
            raise error
        return
    msgs: list[Any] = [None] * current().size
    dist.all_gather_object(msgs, None if error is None else str(error))
    if error is not None:
        raise error
    first = next((m for m in msgs if m is not None), None)
    if first is not None:
        raise DistributedError(f"another rank failed: {first}")


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(n: int, world: World) -> slice:
    """This rank's contiguous part of ``n`` items (sizes differ by one at most)."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (1 if world.rank < extra else 0))


def padded_shard(indices: np.ndarray, world: World) -> tuple[np.ndarray, int]:
    """This rank's share of ``indices`` for evaluation, padded to ``ceil(n / size)`` items.

    Like torch's DistributedSampler, the short ranks repeat an index so every
    rank predicts the same number of rows; :func:`gather_rows` drops them again.
    Returns the padded indices and how many of them are real.
    """
    n = len(indices)
    per = -(-n // world.size) if n else 0
    own = np.asarray(indices)[world.rank * per : (world.rank + 1) * per]
    real = len(own)
    if real < per:
        filler = own[-1:] if real else np.asarray(indices)[:1]
        own = np.concatenate([own, np.repeat(filler, per - real)]) if len(filler) else own
    return own, real


def gather_rows(local: np.ndarray, real: int, n_total: int, world: World) -> np.ndarray:
    """All ranks' rows in rank order, the padding removed: the predictions of all ``n_total``."""
    if not world.enabled:
        return local
    t = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float32))
    if dist.get_backend() == "nccl":
        t = t.cuda()
    shape = torch.tensor([t.shape[0], t.shape[1] if t.ndim == 2 else 0, real], device=t.device)
    shapes = [torch.zeros_like(shape) for _ in range(world.size)]
    dist.all_gather(shapes, shape)
    rows = int(max(int(s[0]) for s in shapes))
    cols = int(max(int(s[1]) for s in shapes))
    buf = torch.zeros((rows, cols), dtype=torch.float32, device=t.device)
    if t.numel():
        buf[: t.shape[0], : t.shape[1]] = t
    parts = [torch.zeros_like(buf) for _ in range(world.size)]
    dist.all_gather(parts, buf)
    out = torch.cat([p[: int(s[2])] for p, s in zip(parts, shapes, strict=True)]).cpu().numpy()
    if out.shape[0] != n_total:
        raise DistributedError(f"gathered {out.shape[0]} predictions, expected {n_total}")
    return out


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64 on the CPU for gloo, on the GPU for NCCL)."""
    if not current().enabled:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the gradients (each rank's
    statistic feeds every rank's loss)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch of all ranks, for CPU tensors (gloo).

    Same parameters and buffers as ``nn.BatchNorm1d/2d`` (its weights load
    into a plain model); in training mode the mean and the (biased) variance
    are those of the images of every rank together, computed in two passes
    with differentiable all-reduces; the running statistics are updated as
    torch updates them (unbiased variance). Evaluation uses the running
    statistics and needs no communication.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and current().enabled):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor(
            [float(xf.numel() // max(1, xf.shape[1]))], dtype=torch.float32, device=x.device
        )
        sums = all_reduce(torch.cat([xf.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * n / torch.clamp(n - 1, min=1)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


_GLOBAL_BATCH: tuple[int, slice] | None = None


@contextmanager
def global_batch(size: int, rows: slice) -> Iterator[None]:
    """During one sharded training step: the global batch's size and this rank's rows of it."""
    global _GLOBAL_BATCH
    previous, _GLOBAL_BATCH = _GLOBAL_BATCH, (size, rows)
    try:
        yield
    finally:
        _GLOBAL_BATCH = previous


class GlobalDropout(nn.Dropout):
    """Dropout whose mask is the global batch's, as one process would draw it.

    Every rank holds the same torch random state, draws the mask of the whole
    global batch (same shape, dtype and device as a single process's dropout
    would) and keeps its own rows; outside a sharded step it is ``nn.Dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or _GLOBAL_BATCH is None:
            return super().forward(x)
        size, rows = _GLOBAL_BATCH
        ones = torch.ones((size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        return x * F.dropout(ones, self.p, True)[rows]


def convert_for_global_batch(module: nn.Module, device_type: str) -> nn.Module:
    """Batch norm over the global batch (torch's SyncBatchNorm on GPUs, GlobalBatchNorm on CPUs)
    and dropout with the global batch's mask."""
    module = _convert_dropout(module)
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_batchnorm(module)


def _convert_dropout(module: nn.Module) -> nn.Module:
    out = module
    if type(module) is nn.Dropout:
        out = GlobalDropout(module.p, module.inplace)
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert_dropout(child))
    return out


def _convert_batchnorm(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlobalBatchNorm
    ):
        out = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert_batchnorm(child))
    return out


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` (already converted and on its device)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device.type == "cuda":
        return DDP(model, device_ids=[device.index])
    return DDP(model)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
