"""One plain training loop: ``train_one_epoch`` and ``predict_logits``.

Images live in memory as one uint8 tensor (decoded once by the cache), so a
"data loader" is just indexing with a seeded permutation; augmentation runs
on the whole batch. bf16 autocast and channels_last are used where the
device supports them (see :func:`runtime_settings`).
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


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    channels_last: bool


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 maths (AVX512-BF16 or AMX); otherwise bf16 is slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def runtime_settings(cfg: TrainConfig) -> Runtime:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if cfg.bf16 == "auto":
        bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
    else:
        bf16 = cfg.bf16 == "on"
    if device.type == "cpu":
        threads = cfg.threads or len(os.sched_getaffinity(0))
        torch.set_num_threads(threads)
    return Runtime(device=device, bf16=bf16, channels_last=cfg.channels_last)


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
    """One pass over ``indices`` in a seeded random order; returns stats and the next step."""
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


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    indices: np.ndarray,
    rt: Runtime,
    batch_size: int = 128,
    tta: bool = False,
) -> np.ndarray:
    """Logits (N, C) in float32; with ``tta`` the mean over the image and its mirror."""
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
