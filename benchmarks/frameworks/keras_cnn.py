"""The study's basic CNN in Keras 3: one definition for the TensorFlow, JAX and PyTorch backends.

It mirrors ``breastcad.models.BasicCNN`` and breastcad's training recipe so that
only the framework differs:

* layers: ``depth`` blocks of conv (no bias, "same" padding) -> batch norm ->
  ReLU -> 2x2 max-pool, widths ``width * 2**min(i, 3)``; global average
  pooling; dense ``dense_units`` -> ReLU -> dropout -> dense ``num_classes``
  (logits);
* initialisation: PyTorch's defaults, which Keras can express exactly:
  kernels ``U(+-1/sqrt(fan_in))`` (Kaiming-uniform with a = sqrt(5), i.e.
  ``VarianceScaling(1/3, "fan_in", "uniform")``), dense biases the same;
* batch norm with PyTorch's momentum (0.1, Keras' 0.9) and epsilon (1e-5);
* inputs are uint8 images; the model scales them to [0, 1], augments (training
  only) and standardises every image (zero mean, unit sample std + 1e-3);
* augmentation: breastcad's ``augment_batch`` re-written with ``keras.ops``
  (one affine warp per image with flip, rotation, shear, scale and shift;
  gamma, contrast, brightness and multiplicative speckle). Keras' own
  preprocessing layers cover the geometry and two of the intensity changes but
  resample once per layer and have neither gamma nor speckle;
* AdamW (epsilon 1e-8 as PyTorch) with breastcad's per-step linear warm-up then
  cosine decay (:class:`WarmupCosine`), label smoothing, and class weights
  normalised by the batch's total weight as PyTorch's weighted cross-entropy.

Import only after ``KERAS_BACKEND`` is set.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import layers, ops


def torch_default_init(seed: int) -> keras.initializers.Initializer:
    """PyTorch's default for conv and linear weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return keras.initializers.VarianceScaling(
        scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=seed
    )


def torch_bias_init(fan_in: int, seed: int) -> keras.initializers.Initializer:
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound, seed=seed)


class ToUnit(layers.Layer):
    """uint8 pixels -> float32 in [0, 1]."""

    def call(self, x: Any) -> Any:
        return ops.cast(x, "float32") / 255.0


class Standardize(layers.Layer):
    """breastcad's ``standardize``: per image (x - mean) / (sample std + eps)."""

    def __init__(self, eps: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eps = eps

    def call(self, x: Any) -> Any:
        n = ops.cast(ops.prod(ops.shape(x)[1:]), x.dtype)
        mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
        var = ops.sum(ops.square(x - mean), axis=(1, 2, 3), keepdims=True) / (n - 1.0)
        return (x - mean) / (ops.sqrt(var) + self.eps)


def pixel_affine(a00: Any, a01: Any, a10: Any, a11: Any, tx: Any, ty: Any, size: int) -> Any:
    """``affine_grid``'s (n, 2, 3) matrix as ``affine_transform``'s (n, 8) pixel transform.

    ``affine_grid`` (align_corners=False) maps normalised output coordinates
    ``u = 2 (x - c) / S`` (c = (S - 1) / 2) to input ones; ``affine_transform``
    maps output pixel (x, y) to input pixel. Both are the same map about the
    image centre, the shift scaled by S / 2 (a test checks them against each other).
    """
    centre, half = (size - 1) / 2.0, size / 2.0
    b0 = centre - (a00 + a01) * centre + tx * half
    b1 = centre - (a10 + a11) * centre + ty * half
    zeros = ops.zeros_like(a00)
    return ops.stack([a00, a01, b0, a10, a11, b1, zeros, zeros], axis=1)


class BreastcadAugment(layers.Layer):
    """breastcad's batch augmentation (``breastcad.data.augment``) with ``keras.ops``.

    The affine matrix of ``affine_matrices`` is drawn the same way and moved to
    pixel coordinates by :func:`pixel_affine`.
    """

    def __init__(self, cfg: dict[str, Any], seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cfg = dict(cfg)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _uniform(self, shape: tuple[Any, ...], lo: float, hi: float) -> Any:
        return keras.random.uniform(shape, lo, hi, seed=self.seed_generator)

    def _transforms(self, n: Any, size: int) -> Any:
        c = self.cfg
        deg = math.pi / 180
        angle = self._uniform((n,), -c["rotate_deg"] * deg, c["rotate_deg"] * deg)
        shear = self._uniform((n,), -c["shear_deg"] * deg, c["shear_deg"] * deg)
        scale = self._uniform((n,), c["scale_min"], c["scale_max"])
        tx = self._uniform((n,), -c["translate"], c["translate"]) * 2
        ty = self._uniform((n,), -c["translate"], c["translate"]) * 2
        flip = ops.where(self._uniform((n,), 0.0, 1.0) < c["hflip"], -1.0, 1.0)
        cos, sin, tan = ops.cos(angle), ops.sin(angle), ops.tan(shear)
        # the same output -> input map as breastcad.data.augment.affine_matrices
        a00, a01 = cos * flip / scale, (-sin + cos * tan) * flip / scale
        a10, a11 = sin / scale, (cos + sin * tan) / scale
        return pixel_affine(a00, a01, a10, a11, tx, ty, size)

    def call(self, x: Any, training: bool | None = None) -> Any:
        if not training:
            return x
        c = self.cfg
        n, size = ops.shape(x)[0], x.shape[1]
        x = ops.image.affine_transform(
            x, self._transforms(n, size), interpolation="bilinear", fill_mode="constant"
        )
        gamma = ops.exp(self._uniform((n, 1, 1, 1), -c["gamma"], c["gamma"]))
        x = ops.power(ops.clip(x, 0.0, 1.0), gamma)
        contrast = self._uniform((n, 1, 1, 1), 1 - c["contrast"], 1 + c["contrast"])
        mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
        brightness = self._uniform((n, 1, 1, 1), -c["brightness"], c["brightness"])
        x = (x - mean) * contrast + mean + brightness
        if c["speckle"] > 0:
            strength = self._uniform((n, 1, 1, 1), 0.0, c["speckle"])
            noise = keras.random.normal(ops.shape(x), seed=self.seed_generator)
            x = x * (1 + strength * noise)
        return ops.clip(x, 0.0, 1.0)


def build_model(
    size: int, num_classes: int, model_cfg: dict[str, Any], augment_cfg: dict[str, Any], seed: int
) -> keras.Model:
    """The basic CNN (channels-last, Keras' default layout) with its input pipeline inside."""
    inputs = keras.Input((size, size, 1), dtype="uint8", name="image")
    x = ToUnit()(inputs)
    if augment_cfg.get("enabled", True):
        x = BreastcadAugment(augment_cfg, seed=seed + 7919)(x)
    x = Standardize()(x)
    k, width, c_in = model_cfg["kernel_size"], model_cfg["width"], 1
    for i in range(model_cfg["depth"]):
        c_out = width * 2 ** min(i, 3)
        x = layers.Conv2D(
            c_out,
            k,
            padding="same",
            use_bias=False,
            kernel_initializer=torch_default_init(seed + i),
        )(x)
        x = layers.BatchNormalization(momentum=0.9, epsilon=1e-5)(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling2D(2)(x)
        c_in = c_out
    x = layers.GlobalAveragePooling2D()(x)
    dense = model_cfg["dense_units"]
    x = layers.Dense(
        dense,
        kernel_initializer=torch_default_init(seed + 100),
        bias_initializer=torch_bias_init(c_in, seed + 101),
    )(x)
    x = layers.ReLU()(x)
    x = layers.Dropout(model_cfg["dropout"], seed=seed + 102)(x)
    logits = layers.Dense(
        num_classes,
        kernel_initializer=torch_default_init(seed + 103),
        bias_initializer=torch_bias_init(dense, seed + 104),
        name="logits",
    )(x)
    return keras.Model(inputs, logits, name="basic_cnn")


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """breastcad's ``engine.lr_at``: linear warm-up to ``base`` in ``warmup`` steps, then cosine."""

    def __init__(self, base: float, total: int, warmup: int) -> None:
        self.base, self.total, self.warmup = float(base), int(total), int(warmup)

    def __call__(self, step: Any) -> Any:
        step = ops.cast(step, "float32")
        warm = self.base * (step + 1.0) / max(1, self.warmup)
        progress = ops.minimum(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        cosine = self.base * 0.5 * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < self.warmup, warm, cosine)

    def get_config(self) -> dict[str, Any]:
        return {"base": self.base, "total": self.total, "warmup": self.warmup}


def compile_model(
    model: keras.Model, train_cfg: dict[str, Any], total_steps: int, warmup_steps: int
) -> None:
    """AdamW + schedule + smoothed cross-entropy normalised by the batch's sample weights."""
    optimizer = keras.optimizers.AdamW(
        learning_rate=WarmupCosine(train_cfg["lr"], total_steps, warmup_steps),
        weight_decay=train_cfg["weight_decay"],
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
    )
    loss = keras.losses.CategoricalCrossentropy(
        from_logits=True,
        label_smoothing=train_cfg["label_smoothing"],
        # PyTorch's cross_entropy(weight=...) divides by the summed weights, not the batch size
        reduction="mean_with_sample_weight",
    )
    model.compile(optimizer=optimizer, loss=loss)
