from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from breastcad.config import Config, load_config, valid_keys, validate
from breastcad.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_lists_every_setting_with_the_code_defaults() -> None:
    doc = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert doc == Config().to_dict()
    text = (ROOT / "configs" / "default.yaml").read_text()
    lines: dict[str, str] = {}  # dotted key -> its line, found within its own section
    section = ""
    for ln in text.splitlines():
        if not ln.strip() or ln.lstrip().startswith("#"):
            continue
        name = ln.strip().split(":")[0]
        if not ln.startswith(" "):
            section = name
            lines[name] = ln
        else:
            lines[f"{section}.{name}"] = ln
    for key in valid_keys():
        assert key in lines, f"{key} is not in configs/default.yaml"
        assert "#" in lines[key], f"{key} has no comment"


def test_overrides_apply_dotted_keys_with_types(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 7\nmodel:\n  width: 16\n")
    cfg = load_config(f, [("train.lr", "0.01"), ("augment.enabled", False), ("data.path", None)])
    assert cfg.train.epochs == 7 and cfg.model.width == 16
    assert cfg.train.lr == pytest.approx(0.01) and isinstance(cfg.train.lr, float)
    assert cfg.augment.enabled is False and cfg.data.path is None


@pytest.mark.parametrize(
    "override, message",
    [
        (("train.epoch", 3), "unknown setting 'train.epoch'; valid settings: seed"),
        (("nope", 1), "unknown setting 'nope'"),
        (("train.epochs", 2.5), "train.epochs: expected an integer"),
        (("train.channels_last", "yes"), "expected true or false"),
        (("cv.folds", 1), "cv.folds must be at least 2"),
        (("data.task", "cats"), "unknown task 'cats'"),
        (("train", 3), "train: expected a mapping"),
        (("segment.model", "resunet"), "segment.model must be one of lraspp_mobilenet_v3_large"),
    ],
)
def test_bad_settings_are_rejected_with_the_reason(override: tuple, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_unet_segmentation_needs_a_side_divisible_by_16() -> None:
    assert load_config(None, [("segment.model", "unet"), ("segment.image_size", 96)])
    with pytest.raises(ConfigError, match="multiple of 16"):
        load_config(None, [("segment.model", "unet"), ("segment.image_size", 100)])


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_each_model_brings_its_input_size_batch_size_and_learning_rate_unless_set() -> None:
    from breastcad.config import with_model_defaults
    from breastcad.models import get_spec

    cfg = Config()
    assert cfg.train.lr is None and cfg.data.image_size is None
    for name, lr in (("basic_cnn", 3e-3), ("resnet50", 3e-3), ("alexnet", 1e-4), ("vgg16", 1e-4)):
        cfg.model.name = name
        filled = with_model_defaults(cfg)
        assert filled.train.lr == pytest.approx(lr)
        assert filled.data.image_size == get_spec(name).input_size
        assert filled.train.batch_size == get_spec(name).batch_size
    cfg.train.lr = 0.02  # a learning rate the user set is kept
    assert with_model_defaults(cfg).train.lr == pytest.approx(0.02)
    cfg.train.lr = 0.0
    with pytest.raises(ConfigError, match="train.lr"):
        validate(cfg)
