"""One configuration object, from YAML plus ``--set key=value`` overrides.

Every setting lives in ``configs/default.yaml`` with a comment. Unknown keys
are rejected with the list of valid ones, so a typo never silently does
nothing.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml

from breastcad.errors import ConfigError

#: Lesion segmentation models (breastcad.segmentation builds them).
SEG_ARCHS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "unet")
#: The U-Net halves its input four times: its side must be a multiple of this.
UNET_SIDE_MULTIPLE = 16


@dataclass
class DataConfig:
    path: str | None = None  # None: the bundled compact BUSI copy
    task: str = "benign-vs-malignant"
    keep_conflicts: bool = False
    leaky_image_split: bool = False  # demonstration only: every image its own group
    image_size: int | None = None  # None: the model's registered input size
    max_pixels: int = 40_000_000
    cache_dir: str | None = None  # None: $XDG_CACHE_HOME/breastcad or ~/.cache/breastcad
    preprocess: str = "stretch"  # stretch | scan-crop | breast-crop (mammograms) | lesion-crop
    crop_margin: float = 0.3  # lesion-crop: added on each side, share of the lesion's longer side
    crop_min_side: float = 0.1  # lesion-crop: smallest box, share of the image's shorter side


@dataclass
class ModelConfig:
    name: str = "basic_cnn"
    width: int = 32
    depth: int = 5
    dense_units: int = 128
    kernel_size: int = 3
    dropout: float = 0.3
    pretrained: str | None = None  # None (from scratch) | "imagenet" | path of a state dict
    freeze_backbone: bool = False  # train only the new head (needs pretrained weights)


@dataclass
class CVConfig:
    folds: int = 5
    repeats: int = 1
    val_fraction: float = 0.2


@dataclass
class AugmentConfig:
    enabled: bool = True
    hflip: float = 0.5
    rotate_deg: float = 10.0
    shear_deg: float = 5.0
    scale_min: float = 0.9
    scale_max: float = 1.1
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    gamma: float = 0.1
    speckle: float = 0.05
    blur: float = 0.0  # maximum Gaussian blur sigma in pixels of the input (0: off)
    resolution: float = 1.0  # maximum down-and-up-sampling factor (1: off)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int | None = None  # None: the model's registered batch size
    lr: float | None = None  # AdamW peak; None: the model's own (models.ModelSpec.lr)
    backbone_lr_factor: float = 1.0  # backbone lr = lr * this (fine-tuning: e.g. 0.1)
    weight_decay: float = 5e-4
    warmup_epochs: int = 2
    patience: int = 10
    label_smoothing: float = 0.05
    balance: str = "weighted-loss"  # weighted-loss | none
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: str = "auto"  # auto | on | off
    channels_last: bool = True
    threads: int = 0  # 0: one per core
    deterministic: bool = True
    compile: bool = False  # torch.compile the model (the first steps pay for compiling)


@dataclass
class EvalConfig:
    target_sensitivity: float = 0.95
    n_bootstrap: int = 1000
    tta: bool = True  # average the model over the image and its mirror
    ci_level: float = 0.95
    lesion_agreement: bool = True  # Grad-CAM vs lesion masks on the test folds, when masks exist


@dataclass
class TuneConfig:
    trials: int = 20  # finished (complete or pruned) trials per search
    epochs: int = 12  # maximum epochs of one trial (shorter than a full training)
    timeout: float | None = None  # seconds per search; None: no limit
    pruner: str = "median"  # median | hyperband | none
    startup_trials: int = 5  # trials run to the end before pruning starts


@dataclass
class SegmentConfig:
    """The lesion segmentation a ``lesion-crop`` run trains first, on its own folds."""

    model: str = "lraspp_mobilenet_v3_large"
    epochs: int = 30
    image_size: int = 128
    batch_size: int = 16
    lr: float | None = None  # None: the model's own (unet 1e-2, the others 2e-3)
    reuse: str | None = None  # a run folder with segmentation/ models on the same folds


@dataclass
class Config:
    seed: int = 0
    name: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys: list[str] = []
    hints = get_type_hints(cls)
    for f in fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += _valid_keys(t, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def valid_keys() -> list[str]:
    return _valid_keys(Config)


def _coerce(key: str, value: Any, target: Any) -> Any:
    """Convert a YAML value to the field's type (``int``, ``float | None``...), clearly."""
    args = get_args(target) or (target,)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key}: a value is required")
    typ = next(a for a in args if a is not type(None))
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if typ is int and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    try:
        out = typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    if typ is int and float(value) != out:
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return out


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown setting {key!r}; valid settings: {', '.join(valid_keys())}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of settings")
            _apply(current, v, f"{key}.")
        else:
            setattr(obj, k, _coerce(key, v, hints[k]))


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    path: str | Path | None = None, overrides: list[tuple[str, Any]] | None = None
) -> Config:
    """Defaults, then the YAML file, then overrides (dotted keys)."""
    cfg = Config()
    if path is not None:
        try:
            doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read config ({err})".replace("\n", " ")) from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of settings")
        doc.pop("schema_version", None)
        _apply(cfg, doc)
    for key, value in overrides or []:
        _apply(cfg, _nest(key, value))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    from breastcad.data.records import get_task

    get_task(cfg.data.task)
    checks = [
        (cfg.cv.folds >= 2, "cv.folds must be at least 2"),
        (cfg.cv.repeats >= 1, "cv.repeats must be at least 1"),
        (0.05 <= cfg.cv.val_fraction <= 0.5, "cv.val_fraction must be between 0.05 and 0.5"),
        (cfg.train.epochs >= 1, "train.epochs must be at least 1"),
        (
            cfg.train.batch_size is None or cfg.train.batch_size >= 2,
            "train.batch_size must be at least 2",
        ),
        (
            cfg.data.image_size is None or cfg.data.image_size >= 16,
            "data.image_size must be at least 16",
        ),
        (
            cfg.data.preprocess in ("stretch", "scan-crop", "breast-crop", "lesion-crop"),
            "data.preprocess must be stretch, scan-crop, breast-crop or lesion-crop",
        ),
        (0.0 <= cfg.data.crop_margin <= 2.0, "data.crop_margin must be between 0 and 2"),
        (0.0 <= cfg.data.crop_min_side <= 1.0, "data.crop_min_side must be between 0 and 1"),
        (
            cfg.data.preprocess != "lesion-crop" or cfg.cv.repeats == 1,
            "data.preprocess lesion-crop needs cv.repeats 1 (its segmentation models are "
            "trained on one set of folds)",
        ),
        (
            cfg.data.preprocess != "lesion-crop" or cfg.data.task == "benign-vs-malignant",
            "data.preprocess lesion-crop needs data.task benign-vs-malignant (normal images have "
            "no lesion: they would be whole images among crops, and the framing would give "
            "their label away)",
        ),
        (0.0 <= cfg.augment.blur <= 10.0, "augment.blur must be between 0 and 10 pixels"),
        (1.0 <= cfg.augment.resolution <= 16.0, "augment.resolution must be between 1 and 16"),
        (cfg.segment.epochs >= 1, "segment.epochs must be at least 1"),
        (cfg.segment.image_size >= 32, "segment.image_size must be at least 32"),
        (cfg.segment.lr is None or cfg.segment.lr > 0, "segment.lr must be positive"),
        (
            cfg.segment.model in SEG_ARCHS,
            f"segment.model must be one of {', '.join(SEG_ARCHS)}",
        ),
        (
            cfg.segment.model != "unet" or cfg.segment.image_size % UNET_SIDE_MULTIPLE == 0,
            f"segment.model unet needs segment.image_size a multiple of {UNET_SIDE_MULTIPLE}",
        ),
        (cfg.tune.trials >= 1, "tune.trials must be at least 1"),
        (cfg.tune.epochs >= 1, "tune.epochs must be at least 1"),
        (
            cfg.tune.pruner in ("median", "hyperband", "none"),
            "tune.pruner: median, hyperband or none",
        ),
        (cfg.train.lr is None or cfg.train.lr > 0, "train.lr must be positive"),
        (cfg.train.backbone_lr_factor > 0, "train.backbone_lr_factor must be positive"),
        (
            cfg.model.pretrained is not None or not cfg.model.freeze_backbone,
            "model.freeze_backbone needs model.pretrained (a frozen random backbone learns "
            "nothing)",
        ),
        (0.0 < cfg.eval.target_sensitivity < 1.0, "eval.target_sensitivity must be in (0, 1)"),
        (cfg.train.bf16 in ("auto", "on", "off"), "train.bf16 must be auto, on or off"),
        (cfg.train.balance in ("weighted-loss", "none"), "train.balance: weighted-loss or none"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def with_overrides(cfg: Config, pairs: list[tuple[str, Any]]) -> Config:
    """A validated copy of ``cfg`` with dotted-key settings applied."""
    out = copy.deepcopy(cfg)
    for key, value in pairs:
        _apply(out, _nest(key, value))
    validate(out)
    return out


def with_model_defaults(cfg: Config) -> Config:
    """A copy with the input size, batch size and learning rate the model registers, where
    unset."""
    from breastcad.models import get_spec  # imports torch: only when a model is due

    spec = get_spec(cfg.model.name)
    out = copy.deepcopy(cfg)
    if out.data.image_size is None:
        out.data.image_size = spec.input_size
    if out.train.batch_size is None:
        out.train.batch_size = spec.batch_size
    if out.train.lr is None:
        out.train.lr = spec.lr
    return out


def training_mode(cfg: Config) -> str:
    """How the weights started and what was trained, in words for tables and reports."""
    if cfg.model.pretrained is None:
        return "from scratch"
    source = "ImageNet" if cfg.model.pretrained == "imagenet" else Path(cfg.model.pretrained).name
    if cfg.model.freeze_backbone:
        return f"{source} weights, frozen backbone + new head"
    factor = cfg.train.backbone_lr_factor
    lr = "" if factor == 1.0 else f", backbone lr x{factor:g}"
    return f"{source} weights, full fine-tune{lr}"
