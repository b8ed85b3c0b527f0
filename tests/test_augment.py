from __future__ import annotations

import dataclasses

import torch

from breastcad.config import AugmentConfig
from breastcad.data.augment import augment_batch, standardize, to_float

NO_CHANGE = AugmentConfig(
    hflip=0.0, rotate_deg=0, shear_deg=0, scale_min=1, scale_max=1, translate=0,
    brightness=0, contrast=0, gamma=0, speckle=0,
)  # fmt: skip


def _ramp(n: int = 4, size: int = 16) -> torch.Tensor:
    x = torch.linspace(0, 1, size).repeat(size, 1)  # bright on the right
    return x.expand(n, 1, size, size).clone()


def test_identity_settings_leave_the_image_unchanged() -> None:
    x = _ramp()
    out = augment_batch(x, NO_CHANGE, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x, atol=1e-5)


def test_a_flip_really_flips() -> None:
    x = _ramp()
    cfg = dataclasses.replace(NO_CHANGE, hflip=1.0)
    out = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(out, torch.flip(x, dims=[3]), atol=1e-5)
    assert out[0, 0, 0, 0] > out[0, 0, 0, -1]


def test_outputs_keep_shape_and_range_and_depend_on_the_seed() -> None:
    x = torch.rand(8, 1, 32, 32)
    cfg = AugmentConfig()
    a = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    c = augment_batch(x, cfg, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_batched_equals_per_sample_definition() -> None:
    """The batch is the per-sample maths vectorised: same seed, same draws, same images."""
    x = torch.rand(6, 1, 24, 24)
    cfg = dataclasses.replace(AugmentConfig(), speckle=0.0)
    batched = augment_batch(x, cfg, torch.Generator().manual_seed(5))
    # Draw the same random numbers one image at a time by replaying the generator per image.
    from breastcad.data.augment import affine_matrices

    theta = affine_matrices(6, cfg, torch.Generator().manual_seed(5))
    import torch.nn.functional as F

    for i in range(6):
        grid = F.affine_grid(theta[i : i + 1], [1, 1, 24, 24], align_corners=False)
        warped = F.grid_sample(x[i : i + 1], grid, align_corners=False)
        # geometry must agree wherever intensity changes are monotone: compare rank order
        a = warped.flatten()
        b = batched[i].flatten()
        inside = a > 0.05
        corr = torch.corrcoef(torch.stack([a[inside], b[inside]]))[0, 1]
        assert corr > 0.95


def test_flip_share_matches_its_probability() -> None:
    x = _ramp(n=400)
    cfg = dataclasses.replace(NO_CHANGE, hflip=0.3)
    out = augment_batch(x, cfg, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] > out[:, 0, 0, -1]).float().mean()
    assert 0.22 < float(flipped) < 0.38


def test_standardize_and_to_float() -> None:
    u8 = torch.randint(0, 256, (3, 10, 10), dtype=torch.uint8)
    x = to_float(u8)
    assert x.shape == (3, 1, 10, 10) and x.max() <= 1
    z = standardize(x)
    assert torch.allclose(z.mean(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std(dim=(1, 2, 3)), torch.ones(3), atol=1e-2)


def _high_frequency(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, per image."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))


def test_blur_softens_each_image_by_its_own_sigma_and_keeps_the_mean() -> None:
    from breastcad.data.augment import gaussian_blur

    x = torch.rand(3, 1, 32, 32)
    out = gaussian_blur(x, torch.tensor([1e-4, 1.0, 3.0]))
    assert out.shape == x.shape
    assert torch.allclose(out[0], x[0], atol=1e-5)  # sigma ~ 0: unchanged
    hf = _high_frequency(out)
    assert hf[0] > hf[1] > hf[2]  # more blur, fewer sharp edges
    assert torch.allclose(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=0.02)
    # the same image alone gets the same blur: the batch is the per-image definition (up to
    # where the kernel is cut: 3 sigma of the batch's largest sigma, not of this one's)
    assert torch.allclose(gaussian_blur(x[1:2], torch.tensor([1.0])), out[1:2], atol=1e-3)


def test_lower_resolution_keeps_the_shape_and_loses_detail() -> None:
    from breastcad.data.augment import down_up

    x = torch.rand(2, 1, 32, 32)
    out = down_up(x, torch.tensor([1.0, 4.0]))
    assert out.shape == x.shape
    assert torch.allclose(out[0], x[0], atol=1e-5)  # factor 1: unchanged
    assert _high_frequency(out)[1] < 0.5 * _high_frequency(x)[1]


def test_site_style_changes_are_off_by_default_and_drawn_only_when_on() -> None:
    x = torch.rand(4, 1, 24, 24)
    base = augment_batch(x, AugmentConfig(), torch.Generator().manual_seed(3))
    on = dataclasses.replace(AugmentConfig(), blur=2.0, resolution=4.0)
    site = augment_batch(x, on, torch.Generator().manual_seed(3))
    assert site.shape == x.shape and 0 <= site.min() and site.max() <= 1
    assert _high_frequency(site).mean() < _high_frequency(base).mean()


def test_masks_follow_the_images_geometry_and_only_images_get_intensity_changes() -> None:
    from breastcad.data.augment import augment_with_masks

    x = torch.rand(6, 1, 32, 32)
    masks = torch.zeros(6, 1, 32, 32)
    masks[:, :, 8:20, 4:14] = 1  # a lesion on the left
    geometry = dataclasses.replace(NO_CHANGE, hflip=1.0, rotate_deg=15, scale_min=0.8,
                                   translate=0.1)  # fmt: skip
    # the images' own warp, seen through an image that equals its mask, is the mask's warp
    warped_mask_as_image = augment_batch(masks.clone(), geometry, torch.Generator().manual_seed(4))
    _, warped = augment_with_masks(x, masks, geometry, torch.Generator().manual_seed(4))
    assert torch.equal(warped, (warped_mask_as_image > 0.5).float())
    assert warped[:, :, :, 16:].sum() > warped[:, :, :, :16].sum()  # flipped to the right
    # intensity and site-style changes (blur, lower resolution) touch the images only
    site = dataclasses.replace(NO_CHANGE, gamma=0.3, contrast=0.3, speckle=0.2, blur=2.0,
                               resolution=4.0)  # fmt: skip
    out, same = augment_with_masks(x, masks, site, torch.Generator().manual_seed(5))
    assert torch.equal(same, masks)
    assert _high_frequency(out).mean() < 0.5 * _high_frequency(x).mean()
    assert torch.equal(out, augment_batch(x, site, torch.Generator().manual_seed(5)))
