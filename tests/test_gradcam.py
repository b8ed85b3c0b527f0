"""Grad-CAM: it points at what decides the class, works for every model, overlays fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from breastcad.data.augment import standardize, to_float
from breastcad.gradcam import (
    compute_gradcam,
    ensemble_gradcam,
    gradcam_grid,
    normalise_heat,
    overlay_rgb,
)
from breastcad.models import create_model, list_models
from breastcad.predict import Ensemble

S, R = 48, 6


@pytest.fixture(autouse=True)
def _one_thread():
    # the test machine's two cores are shared: oversubscribed threads are much slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blob_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Speckled images; class 1 iff a bright disk is present (at a random place)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:S, 0:S]
    imgs = np.clip(rng.normal(128, 25, (n, S, S)), 0, 255)
    y = rng.integers(0, 2, n)
    masks = np.zeros((n, S, S), dtype=bool)
    for i in range(n):
        cy, cx = rng.uniform(R + 1, S - R - 1, 2)
        masks[i] = np.hypot(yy - cy, xx - cx) <= R
        if y[i]:
            imgs[i][masks[i]] = 230
    return torch.from_numpy(imgs.astype(np.uint8)), torch.from_numpy(y), masks


@pytest.fixture(scope="module")
def blob_model() -> torch.nn.Module:
    torch.manual_seed(0)
    x, y, _ = blob_images(512, seed=0)
    model = create_model("basic_cnn", 2, 1, width=8, depth=2, dense_units=16, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = F.cross_entropy(model(standardize(to_float(x[idx]))), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_heatmap_maximum_falls_inside_the_blob(blob_model: torch.nn.Module) -> None:
    x, y, masks = blob_images(64, seed=1)
    with torch.no_grad():
        acc = (blob_model(standardize(to_float(x))).argmax(1) == y).float().mean()
    assert acc >= 0.95  # the model did learn the blob
    pos = (y == 1).numpy()
    heat = compute_gradcam(blob_model, "basic_cnn", x[pos], target=1)
    assert heat.shape == (int(pos.sum()), S, S) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1
    peaks = [np.unravel_index(h.argmax(), h.shape) for h in heat]
    hits = [m[p] for m, p in zip(masks[pos], peaks, strict=True)]
    assert np.mean(hits) >= 0.9, f"pointing-game hit rate {np.mean(hits):.2f}"
    # and the maximum moves with the blob: a mirrored image gives a mirrored maximum
    mirrored = compute_gradcam(blob_model, "basic_cnn", torch.flip(x[pos], dims=[2]), 1)
    assert np.mean([m[:, ::-1][np.unravel_index(h.argmax(), h.shape)]
                    for m, h in zip(masks[pos], mirrored, strict=True)]) >= 0.9  # fmt: skip


def test_tta_heatmap_of_a_mirrored_image_is_the_mirrored_heatmap(
    blob_model: torch.nn.Module,
) -> None:
    x, _, _ = blob_images(4, seed=2)
    a = compute_gradcam(blob_model, "basic_cnn", x, 1, tta=True)
    b = compute_gradcam(blob_model, "basic_cnn", torch.flip(x, dims=[2]), 1, tta=True)
    np.testing.assert_allclose(a, b[:, :, ::-1], atol=1e-4)


def test_per_image_targets_and_model_state_are_respected(blob_model: torch.nn.Module) -> None:
    x, _, _ = blob_images(6, seed=3)
    both = compute_gradcam(blob_model, "basic_cnn", x, [0, 1, 0, 1, 0, 1])
    one = compute_gradcam(blob_model, "basic_cnn", x, 1)
    zero = compute_gradcam(blob_model, "basic_cnn", x, 0)
    np.testing.assert_allclose(both[1::2], one[1::2], atol=1e-5)
    np.testing.assert_allclose(both[::2], zero[::2], atol=1e-5)
    assert not blob_model.training  # eval mode kept
    with pytest.raises(ValueError, match="uint8"):
        compute_gradcam(blob_model, "basic_cnn", x.float(), 1)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_gives_a_heatmap_of_the_input_size(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, 2, 1)
    x = torch.randint(0, 256, (1, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        before = model.eval()(standardize(to_float(x)))
    heat = compute_gradcam(model, name, x, 1)  # AlexNet/VGG: in-place ReLUs must not break it
    assert heat.shape == (1, 64, 64) and np.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1
    with torch.no_grad():  # the same model, the same outputs
        torch.testing.assert_close(model(standardize(to_float(x))), before)
    rows, cols = gradcam_grid(model, name, 64)
    assert 1 <= rows <= 64 and 1 <= cols <= 64


def test_ensemble_heatmap_is_the_renormalised_mean_of_the_fold_maps() -> None:
    torch.manual_seed(0)
    models = [create_model("basic_cnn", 2, 1, width=4, depth=2) for _ in range(2)]
    card = {
        "architecture": "basic_cnn",
        "class_names": ["benign", "malignant"],
        "positive_class": "malignant",
        "preprocessing": {"tta": "none"},
    }
    ens = Ensemble(models=models, cards=[card, card], threshold=0.5, source="test")
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    got = ensemble_gradcam(ens, x)
    maps = [compute_gradcam(m, "basic_cnn", x, 1) for m in models]
    np.testing.assert_allclose(got, normalise_heat((maps[0] + maps[1]) / 2), atol=1e-6)
    assert got.shape == (3, 32, 32)


def test_overlay_has_the_input_size_and_colours_only_where_it_is_hot() -> None:
    image = np.full((50, 70), 128, dtype=np.uint8)
    heat = np.zeros((8, 8), dtype=np.float32)
    heat[:4, :4] = 1.0  # hot top-left quarter, cold elsewhere
    out = overlay_rgb(image, heat)
    assert out.shape == (50, 70, 3) and out.dtype == np.uint8
    hot, cold = out[5, 5].astype(int), out[45, 65].astype(int)
    assert np.abs(hot - 128).max() > 60  # clearly coloured
    assert np.abs(cold - 128).max() < 60  # the image still shows through
    rgb_in = np.zeros((20, 30, 3), dtype=np.uint8)
    assert overlay_rgb(rgb_in, np.zeros((5, 5))).shape == (20, 30, 3)
    with pytest.raises(ValueError):
        overlay_rgb(np.zeros((2, 3, 4, 5), dtype=np.uint8), heat)


def test_normalise_heat_keeps_maps_without_evidence_at_zero() -> None:
    heat = np.stack([np.full((4, 4), -1.0), np.arange(16.0).reshape(4, 4)])
    out = normalise_heat(heat)
    assert (out[0] == 0).all()
    assert out[1].max() == pytest.approx(1.0) and out[1].min() == 0.0
