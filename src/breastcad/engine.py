"""One plain training loop: ``train_one_epoch`` and ``predict_logits``.

Images live in memory as one uint8 tensor (decoded once by the cache), so a
"data loader" is just indexing with a seeded permutation; augmentation runs
on the whole batch. bf16 autocast and channels_last are used where the
device supports them (see :func:`runtime_settings`).

Under torchrun (``runtime_settings(..., distributed=True)``) the same loop
trains data-parallel: every rank draws and augments the same global batch
and trains on its share of it, and predictions are sharded and gathered
(see :mod:`breastcad.distributed`). A single process runs exactly the
single-process code.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from breastcad.config import AugmentConfig, TrainConfig
from breastcad.data.augment import augment_batch, standardize, to_float
from breastcad.distributed import (
    SINGLE,
    World,
    all_sum,
    gather_rows,
    global_batch,
    padded_shard,
    shard,
)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    channels_last: bool
    world: World = SINGLE  # the torchrun process group this process trains in


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 maths (AVX512-BF16 or AMX); otherwise bf16 is slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def runtime_settings(cfg: TrainConfig, distributed: bool = False) -> Runtime:
    """Device, bf16, threads; with ``distributed`` also joins torchrun's process group (if any).

    Under torchrun each rank takes its own GPU (``cuda:LOCAL_RANK``), or on CPUs
    ``cores / processes on this node`` threads (unless ``train.threads`` is set).
    """
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    world = SINGLE
    if distributed:
        from breastcad import distributed as dist

        world = dist.init(device.type)
        device = dist.local_device(device, world)
    if cfg.bf16 == "auto":
        bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    else:
        bf16 = cfg.bf16 == "on"
    if device.type == "cpu":
        threads = cfg.threads or max(1, len(os.sched_getaffinity(0)) // world.local_size)
        torch.set_num_threads(threads)
    return Runtime(device=device, bf16=bf16, channels_last=cfg.channels_last, world=world)


def autocast(rt: Runtime) -> Any:
    if not rt.bf16:
        return nullcontext()
    return torch.autocast(rt.device.type, dtype=torch.bfloat16)


def prepare(x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    x = x.to(rt.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x


def lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds_data: float
    seconds_total: float


def train_one_epoch(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    indices: np.ndarray,
    optimizer: torch.optim.Optimizer,
    class_weights: torch.Tensor | None,
    train_cfg: TrainConfig,
    aug_cfg: AugmentConfig,
    gen: torch.Generator,
    rt: Runtime,
    step: int,
    total_steps: int,
    warmup_steps: int,
) -> tuple[EpochStats, int]:
    """One pass over ``indices`` in a seeded random order; returns stats and the next step.

    Under torchrun (``rt.world``) each rank trains on its share of every global
    batch; the returned stats are those of the whole global batches.
    """
    if rt.world.enabled:
        return _train_one_epoch_sharded(
            model, images, targets, indices, optimizer, class_weights, train_cfg, aug_cfg,
            gen, rt, step, total_steps, warmup_steps,
        )  # fmt: skip
    model.train()
    order = torch.from_numpy(indices)[torch.randperm(len(indices), generator=gen)]
    bs = train_cfg.batch_size
    # Drop a last batch of one: batch norm cannot train on a single image.
    n_batches = len(order) // bs + (1 if len(order) % bs > 1 else 0)
    weights = class_weights.to(rt.device) if class_weights is not None else None
    loss_sum, correct, seen, t_data = 0.0, 0, 0, 0.0
    t0 = time.perf_counter()
    for b in range(n_batches):
        td = time.perf_counter()
        idx = order[b * bs : (b + 1) * bs]
        x = to_float(images[idx])
        if aug_cfg.enabled:
            x = augment_batch(x, aug_cfg, gen)
        x = prepare(standardize(x), rt)
        y = targets[idx].to(rt.device)
        t_data += time.perf_counter() - td
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, warmup_steps, group["initial_lr"])
        with autocast(rt):
            logits = model(x)
        loss = F.cross_entropy(
            logits.float(), y, weight=weights, label_smoothing=train_cfg.label_smoothing
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        loss_sum += float(loss.detach()) * len(idx)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(idx)
    stats = EpochStats(
        loss=loss_sum / max(1, seen),
        accuracy=correct / max(1, seen),
        images=seen,
        seconds_data=t_data,
        seconds_total=time.perf_counter() - t0,
    )
    return stats, step


def _train_one_epoch_sharded(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    indices: np.ndarray,
    optimizer: torch.optim.Optimizer,
    class_weights: torch.Tensor | None,
    train_cfg: TrainConfig,
    aug_cfg: AugmentConfig,
    gen: torch.Generator,
    rt: Runtime,
    step: int,
    total_steps: int,
    warmup_steps: int,
) -> tuple[EpochStats, int]:
    """The data-parallel epoch: same global batches and augmentation as one process.

    Every rank draws the same order and augments the whole global batch with the
    shared generator (so the generator stays in step and the images are those a
    single process would see), then keeps its contiguous share (``shard``: the
    first ``batch % ranks`` ranks take one image more). The loss of a share is
    its weighted sum divided by the global batch's total weight, times the
    number of ranks, so DDP's gradient average is exactly the gradient of the
    global batch's loss, whatever the shares' sizes.
    """
    world = rt.world
    model.train()
    order = torch.from_numpy(indices)[torch.randperm(len(indices), generator=gen)]
    bs = train_cfg.batch_size
    n_batches = len(order) // bs + (1 if len(order) % bs > 1 else 0)
    weights = class_weights.to(rt.device) if class_weights is not None else None
    loss_sum, correct, seen, t_data = 0.0, 0, 0, 0.0
    t0 = time.perf_counter()
    for b in range(n_batches):
        td = time.perf_counter()
        idx = order[b * bs : (b + 1) * bs]
        x = to_float(images[idx])
        if aug_cfg.enabled:
            x = augment_batch(x, aug_cfg, gen)
        mine = shard(len(idx), world)
        y_all = targets[idx]
        w_all = class_weights[y_all] if class_weights is not None else torch.ones(len(idx))
        total_weight = float(w_all.sum())
        x = x[mine]
        x = prepare(standardize(x) if len(x) else x, rt)  # a rank may get no image of a batch
        y = y_all[mine].to(rt.device)
        t_data += time.perf_counter() - td
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, warmup_steps, group["initial_lr"])
        with autocast(rt), global_batch(len(idx), mine):
            logits = model(x)
        per_image = F.cross_entropy(
            logits.float(), y, weight=weights, label_smoothing=train_cfg.label_smoothing,
            reduction="none",
        )  # fmt: skip
        part = per_image.sum() / total_weight  # this rank's part of the global batch's loss
        optimizer.zero_grad(set_to_none=True)
        (part * world.size).backward()  # DDP divides the summed gradients by the ranks
        optimizer.step()
        step += 1
        loss_sum += float(part.detach()) * len(idx)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += int(y.shape[0])
    loss_sum, correct_f, seen_f = all_sum([loss_sum, float(correct), float(seen)])
    stats = EpochStats(
        loss=loss_sum / max(1.0, seen_f),
        accuracy=correct_f / max(1.0, seen_f),
        images=int(seen_f),
        seconds_data=t_data,
        seconds_total=time.perf_counter() - t0,
    )
    return stats, step


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    indices: np.ndarray,
    rt: Runtime,
    batch_size: int = 128,
    tta: bool = False,
) -> np.ndarray:
    """Logits (N, C) in float32; with ``tta`` the mean over the image and its mirror.

    Under torchrun every rank predicts its share of ``indices`` (padded to equal
    sizes) and every rank gets all N rows back, in order, without the padding.
    """
    world = rt.world
    if world.enabled:
        own, real = padded_shard(np.asarray(indices), world)
        local = _predict(model, images, own, rt, batch_size, tta)
        return gather_rows(local, real, len(indices), world)
    return _predict(model, images, indices, rt, batch_size, tta)


def _predict(
    model: nn.Module,
    images: torch.Tensor,
    indices: np.ndarray,
    rt: Runtime,
    batch_size: int,
    tta: bool,
) -> np.ndarray:
    model.eval()
    outs: list[torch.Tensor] = []
    idx_t = torch.from_numpy(np.asarray(indices))
    for b in range(0, len(idx_t), batch_size):
        x = prepare(standardize(to_float(images[idx_t[b : b + batch_size]])), rt)
        with autocast(rt):
            logits = model(x).float()
            if tta:
                logits = 0.5 * (logits + model(torch.flip(x, dims=[3])).float())
        outs.append(logits.cpu())
    if not outs:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(outs).numpy().astype(np.float32)
