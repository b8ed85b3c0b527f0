"""The training loop and inference: bf16 vs fp32, test-time mirroring, repeatability, lr shape."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from breastcad import engine
from breastcad.config import AugmentConfig, TrainConfig
from breastcad.data.augment import standardize, to_float
from breastcad.engine import Runtime, lr_at, predict_logits, train_one_epoch
from breastcad.models import create_model

CPU = torch.device("cpu")
FP32 = Runtime(device=CPU, bf16=False, channels_last=False)
BF16 = Runtime(device=CPU, bf16=True, channels_last=True)

# bf16 keeps 8 bits of mantissa (2-3 significant digits). Through this model's three
# conv blocks and a head spread to probabilities of 0.1-0.9 (see below), the largest
# change of a probability measured 0.007-0.016 over six seeds; 0.02 max abs is allowed.
BF16_PROB_TOL = 0.02


def _uint8_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Varied structure (stripes of any angle and frequency, a dark disk, noise), as uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 8)
        img = 0.5 + 0.3 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
        (cy, cx), r = rng.uniform(0.2, 0.8, 2), rng.uniform(0.05, 0.3)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] *= rng.uniform(0, 0.5)
        img = img * rng.uniform(0.3, 1) + 0.1 * rng.standard_normal((size, size))
        out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return torch.from_numpy(np.stack(out))


def _model_with_real_outputs(images: torch.Tensor, seed: int = 0) -> nn.Module:
    """A seeded random basic_cnn whose probabilities spread out like a trained model's.

    Batch-norm statistics are set from ``images`` (as after training). A random
    head gives margins (logit 1 - logit 0) within about 0.1 of each other, so
    every probability is near the same value and any error vanishes; the head
    is rescaled (antisymmetric, centred) to margins of mean 0 and std 1 on
    ``images``, probabilities about 0.1 to 0.9, where a logit error shows most.
    """
    torch.manual_seed(seed)
    model = create_model("basic_cnn", num_classes=2, in_chans=1)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration pass
    model.train()
    with torch.no_grad():
        model(standardize(to_float(images)))
    model.eval()
    logits = predict_logits(model, images, np.arange(len(images)), FP32)
    margin = torch.from_numpy(logits[:, 1] - logits[:, 0])
    head = model.head[-1]
    with torch.no_grad():
        scale = 1.0 / margin.std()
        dw = (head.weight[1] - head.weight[0]) * scale / 2
        db = (head.bias[1] - head.bias[0] - margin.mean()) * scale / 2
        head.weight.copy_(torch.stack([-dw, dw]))
        head.bias.copy_(torch.stack([-db, db]))
    return model


@pytest.mark.skipif(
    not engine.cpu_has_bf16(),
    reason="CPU lacks native bf16 (no avx512_bf16 or amx_bf16): breastcad keeps fp32 there",
)
def test_bf16_and_fp32_evaluation_agree_within_tolerance() -> None:
    images = _uint8_images(32, 48)
    model = _model_with_real_outputs(images)
    idx = np.arange(len(images))
    p32 = torch.softmax(torch.from_numpy(predict_logits(model, images, idx, FP32)), dim=1)
    model_cl = model.to(memory_format=torch.channels_last)
    p16 = torch.softmax(torch.from_numpy(predict_logits(model_cl, images, idx, BF16)), dim=1)
    assert p32[:, 1].max() - p32[:, 1].min() > 0.5, "outputs too flat for a meaningful check"
    diff = float((p32 - p16).abs().max())
    assert diff <= BF16_PROB_TOL, f"bf16 moved a probability by {diff:.4f}"
    assert diff > 0, "bf16 autocast does not seem to be in effect"


def test_tta_is_the_mean_of_the_image_and_its_mirror() -> None:
    images = _uint8_images(10, 32, seed=3)
    model = _model_with_real_outputs(images, seed=1)
    idx = np.array([7, 0, 3, 3, 9])  # any order, repeats allowed
    tta = predict_logits(model, images, idx, FP32, batch_size=4, tta=True)
    plain = predict_logits(model, images, idx, FP32, batch_size=4)
    mirror = predict_logits(model, torch.flip(images, dims=[2]), idx, FP32, batch_size=4)
    assert tta.shape == (5, 2) and tta.dtype == np.float32
    np.testing.assert_allclose(tta, 0.5 * (plain + mirror), rtol=0, atol=1e-5)
    assert not np.allclose(plain, mirror, atol=1e-3), "model is mirror-symmetric: no test"


def _stripes(n: int = 16, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: vertical stripes, class 1: horizontal (survives flips and +-20 deg rotations)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images, targets = [], []
    for i in range(n):
        coord = yy if i % 2 else xx
        img = 0.5 + 0.35 * np.sin(2 * np.pi * coord / 6 + rng.uniform(0, 6))
        img = np.clip(img + 0.1 * rng.standard_normal((size, size)), 0, 1)
        images.append((img * 255).astype(np.uint8))
        targets.append(i % 2)
    return torch.from_numpy(np.stack(images)), torch.tensor(targets)


@pytest.fixture
def deterministic() -> Iterator[None]:
    was = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn_only)


def _train(images: torch.Tensor, targets: torch.Tensor, epochs: int) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = create_model("basic_cnn", num_classes=2, in_chans=1, width=8, dense_units=16)
    cfg = TrainConfig(batch_size=8, lr=3e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for group in opt.param_groups:
        group["initial_lr"] = cfg.lr
    gen = torch.Generator().manual_seed(0)
    steps_per_epoch = len(images) // cfg.batch_size
    step, losses = 0, []
    for _ in range(epochs):
        stats, step = train_one_epoch(
            model, images, targets, np.arange(len(images)), opt, None, cfg, AugmentConfig(),
            gen, FP32, step, epochs * steps_per_epoch, steps_per_epoch,
        )  # fmt: skip
        assert stats.images == len(images)
        losses.append(stats.loss)
    assert step == epochs * steps_per_epoch
    return losses, model.state_dict()


def test_train_one_epoch_lowers_the_loss_and_is_repeatable(deterministic: None) -> None:
    images, targets = _stripes()
    losses, state = _train(images, targets, epochs=6)
    assert all(math.isfinite(v) for v in losses)
    # Noisy (augmentation, 2 steps per epoch), so compare the end with the start.
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses

    losses2, state2 = _train(images, targets, epochs=6)
    assert losses2 == losses  # bit for bit, not approximately
    assert state2.keys() == state.keys()
    for k in state:
        assert torch.equal(state[k], state2[k]), f"{k} differs between identical runs"


def test_lr_warms_up_linearly_then_follows_a_cosine_to_zero() -> None:
    base, total, warmup = 0.1, 110, 10
    warm = [lr_at(s, total, warmup, base) for s in range(warmup)]
    assert warm == pytest.approx([base * (s + 1) / warmup for s in range(warmup)])
    assert lr_at(warmup, total, warmup, base) == pytest.approx(base)  # peak right after
    assert lr_at(warmup + 50, total, warmup, base) == pytest.approx(base / 2)  # half-way
    assert lr_at(warmup + 25, total, warmup, base) == pytest.approx(
        base * 0.5 * (1 + math.cos(math.pi / 4))
    )
    assert lr_at(total, total, warmup, base) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(total + 7, total, warmup, base) == pytest.approx(0.0, abs=1e-12)  # stays 0
    decay = [lr_at(s, total, warmup, base) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert lr_at(0, 10, 0, base) == pytest.approx(base)  # no warm-up: start at the peak
