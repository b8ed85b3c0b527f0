"""Model registry, gray-input adaptation, local-only pretrained weights, frozen backbones.

Everything runs on tiny inputs (batch 2, 64 px) with weights made locally: no
download is ever attempted (the ImageNet tests make any network call fail).
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from breastcad.errors import BreastcadError, ConfigError
from breastcad.models import (
    count_parameters,
    create_model,
    disable_inplace_relu,
    get_layer,
    get_spec,
    list_models,
    param_groups,
)
from breastcad.pretrained import (
    adapt_first_conv,
    imagenet_weights_location,
    read_state_dict,
    resolve_pretrained,
)

TORCHVISION_MODELS = [
    "alexnet",
    "vgg16",
    "resnet50",
    "densenet201",
    "efficientnet_b0",
    "convnext_tiny",
]
# the options the training code passes to every model (basic-CNN options)
BASIC_OPTIONS = {"width": 8, "depth": 3, "kernel_size": 3, "dense_units": 16, "dropout": 0.1}
SIZE = 64  # small enough to be quick, large enough for every architecture
STAND_IN = "efficientnet_b0"  # small torchvision model for the pretrained tests


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run these tests on one intra-op thread.

    The models here run thousands of tiny kernels (DenseNet, depthwise convs);
    on a busy 2-core machine two threads spend most of that time waiting for
    each other at every kernel's barrier, turning a 0.1 s pass into 10 s or more.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class NotATensor:
    """A pickled object a weights-only load must refuse."""

    def __init__(self) -> None:
        self.payload = "x"


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(err.value)
    assert "\n" not in text and text.strip() == text and text
    return text


def test_registry_lists_the_study_models_and_the_extras() -> None:
    assert set(TORCHVISION_MODELS) | {"basic_cnn"} <= set(list_models())
    assert list_models() == sorted(list_models())
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        create_model("nope", 2)


@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_on_gray_images_and_has_a_gradcam_layer(name: str) -> None:
    spec = get_spec(name)
    assert spec.input_size == (128 if name == "basic_cnn" else 224)
    torch.manual_seed(0)
    model = create_model(name, 3, 1, **BASIC_OPTIONS)
    assert count_parameters(model) > 0

    first = get_layer(model, spec.first_conv)
    assert isinstance(first, nn.Conv2d) and first.in_channels == 1
    head = get_layer(model, spec.classifier)
    assert isinstance(head, nn.Linear) and head.out_features == 3
    layer = get_layer(model, spec.gradcam_layer)
    if name in ("alexnet", "vgg16"):  # the ReLU right after the last conv
        index = int(spec.gradcam_layer.rsplit(".", 1)[1])
        assert isinstance(layer, nn.ReLU)
        assert isinstance(model.features[index - 1], nn.Conv2d)
        assert not any(isinstance(m, nn.Conv2d) for m in model.features[index:])

    assert disable_inplace_relu(model) is model
    assert not any(getattr(m, "inplace", False) is True for m in model.modules())
    seen: dict[str, Any] = {}

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        seen["act"] = output
        seen["version"] = output._version
        output.register_hook(lambda grad: seen.__setitem__("grad", grad))

    handle = layer.register_forward_hook(hook)
    model.train()
    x = torch.rand(2, 1, SIZE, SIZE)
    out = model(x)
    handle.remove()
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 2])).backward()
    for key, param in model.named_parameters():
        assert param.grad is not None, key
        assert torch.isfinite(param.grad).all(), key
    # Grad-CAM's activation is a 4-D map, untouched by later (in-place) ops, with a gradient
    act = seen["act"]
    assert act.ndim == 4 and act.shape[0] == 2
    assert act._version == seen["version"]
    assert seen["grad"].shape == act.shape and torch.isfinite(seen["grad"]).all()


def test_options_a_builder_does_not_take_are_ignored() -> None:
    model = create_model("basic_cnn", 2, 1, width=8, depth=2, dense_units=16, unused=1)
    assert model.features[0].out_channels == 8
    model = create_model("efficientnet_b0", 2, 1, width=8, depth=2, unused=1)
    assert get_layer(model, "classifier.1").out_features == 2
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("basic_cnn", 0)
    with pytest.raises(ConfigError, match="in_chans"):
        create_model("basic_cnn", 2, in_chans=0)


def test_gradcam_layer_lookup_error_is_clear() -> None:
    model = create_model("basic_cnn", 2, width=8, depth=2)
    with pytest.raises(ConfigError, match="no layer 'features.99'"):
        get_layer(model, "features.99")


# ---------------------------------------------------------------- pretrained weights


@pytest.fixture(scope="module")
def stand_in_state() -> dict[str, torch.Tensor]:
    """A torchvision-style checkpoint (RGB first conv, 1000-class head), not a random init."""
    torch.manual_seed(123)
    reference = torchvision.models.get_model(STAND_IN, weights=None)
    gen = torch.Generator().manual_seed(7)
    state = {}
    for key, value in reference.state_dict().items():
        if value.is_floating_point():
            value = value + 0.05 * torch.randn(value.shape, generator=gen)
        state[key] = value.clone()
    return state


@pytest.fixture
def stand_in_file(tmp_path: Path, stand_in_state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "stand_in.pth"
    torch.save(stand_in_state, path)
    return path


def check_loaded(model: nn.Module, state: dict[str, torch.Tensor], scratch: nn.Module) -> None:
    loaded = model.state_dict()
    spec = get_spec(STAND_IN)
    conv = f"{spec.first_conv}.weight"
    for key, value in loaded.items():
        if key.startswith(spec.classifier + "."):
            # the new head keeps the random init (same seed as the scratch model)
            assert torch.equal(value, scratch.state_dict()[key]), key
        elif key == conv:
            assert value.shape[1] == 1
            torch.testing.assert_close(value, state[key].sum(dim=1, keepdim=True))
        else:
            assert torch.equal(value, state[key]), key
    changed = [k for k, v in scratch.state_dict().items() if not torch.equal(v, loaded[k])]
    assert conv in changed and len(changed) > len(loaded) // 2


def test_pretrained_file_is_loaded_with_gray_first_conv_and_new_head(
    stand_in_file: Path, stand_in_state: dict[str, torch.Tensor]
) -> None:
    torch.manual_seed(5)
    scratch = create_model(STAND_IN, 3, 1)
    torch.manual_seed(5)
    model = create_model(STAND_IN, 3, 1, pretrained=str(stand_in_file), **BASIC_OPTIONS)
    check_loaded(model, stand_in_state, scratch)
    model.eval()
    assert model(torch.rand(2, 1, SIZE, SIZE)).shape == (2, 3)


def test_first_conv_sum_equals_the_rgb_net_on_a_replicated_gray_image() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, 3, 3, generator=gen)
    gray = torch.rand(1, 1, 8, 8, generator=gen)
    rgb_out = F.conv2d(gray.repeat(1, 3, 1, 1), weight)
    torch.testing.assert_close(F.conv2d(gray, adapt_first_conv(weight, 1)), rgb_out)
    two = adapt_first_conv(weight, 2)
    assert two.shape == (4, 2, 3, 3)
    torch.testing.assert_close(F.conv2d(gray.repeat(1, 2, 1, 1), two), rgb_out)
    assert adapt_first_conv(weight, 3) is weight


def test_safetensors_file_and_basic_cnn_transfer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_model("basic_cnn", 5, 1, width=8, depth=2, dense_units=16)
    path = tmp_path / "own.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(path))
    model = create_model("basic_cnn", 2, 1, pretrained=path, width=8, depth=2, dense_units=16)
    for key, value in model.state_dict().items():
        if not key.startswith("head.4."):
            assert torch.equal(value, source.state_dict()[key]), key
    assert model.head[4].out_features == 2


def test_legacy_densenet_checkpoint_keys_are_rewritten() -> None:
    spec = get_spec("densenet201")
    keys = create_model("densenet201", 2).state_dict()
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
        for k, v in keys.items()
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    assert spec.remap_keys is not None
    assert list(spec.remap_keys(legacy)) == list(keys)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        pytest.fail("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)
    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    monkeypatch.setattr(urllib.request, "urlopen", forbidden)


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.delenv("TORCH_HUB", raising=False)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return home


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_missing_imagenet_weights_say_what_to_place_where(
    name: str, empty_torch_home: Path, no_network: None
) -> None:
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    expected = empty_torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    assert imagenet_weights_location(name) == (expected, url)
    with pytest.raises(BreastcadError) as err:
        resolve_pretrained(name, "imagenet")
    text = one_line(err)
    assert str(expected) in text and url in text
    assert not expected.exists()


def test_missing_imagenet_weights_fail_create_model_without_download(
    empty_torch_home: Path, no_network: None
) -> None:
    with pytest.raises(BreastcadError, match=r"resnet50-11ad3fa6\.pth"):
        create_model("resnet50", 2, pretrained="imagenet")
    with pytest.raises(BreastcadError, match="no ImageNet weights"):
        create_model("basic_cnn", 2, pretrained="imagenet")


def test_imagenet_weights_in_the_hub_cache_are_used(
    empty_torch_home: Path,
    no_network: None,
    stand_in_state: dict[str, torch.Tensor],
) -> None:
    path, _ = imagenet_weights_location(STAND_IN)
    path.parent.mkdir(parents=True)
    torch.save(stand_in_state, path)
    assert resolve_pretrained(STAND_IN, "imagenet") == path
    assert resolve_pretrained(STAND_IN, None) is None
    torch.manual_seed(9)
    scratch = create_model(STAND_IN, 2, 1)
    torch.manual_seed(9)
    model = create_model(STAND_IN, 2, 1, pretrained="imagenet")
    check_loaded(model, stand_in_state, scratch)


def test_unsafe_or_malformed_weight_files_are_refused(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.pth"
    torch.save({"features.0.0.weight": torch.zeros(1), "extra": NotATensor()}, pickled)
    with pytest.raises(BreastcadError) as err:
        read_state_dict(pickled)
    assert "refused" in one_line(err) and str(pickled) in str(err.value)

    numbers = tmp_path / "numbers.pth"
    torch.save({"a": 1, "b": [2]}, numbers)
    with pytest.raises(BreastcadError) as err:
        read_state_dict(numbers)
    assert "not a state dict" in one_line(err)

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BreastcadError) as err:
        read_state_dict(junk)
    assert "not a readable" in one_line(err)

    with pytest.raises(BreastcadError) as err:
        create_model("basic_cnn", 2, pretrained=tmp_path / "absent.pth")
    assert "not found" in one_line(err)


def test_wrapped_state_dict_is_unwrapped(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.pth"
    state = {"module.a.weight": torch.ones(2), "module.b": torch.zeros(1)}
    torch.save({"state_dict": state, "epoch": 3}, path)
    assert list(read_state_dict(path)) == ["a.weight", "b"]


def test_weights_of_another_architecture_name_the_mismatched_keys(
    tmp_path: Path, stand_in_state: dict[str, torch.Tensor]
) -> None:
    state = dict(stand_in_state)
    del state["features.1.0.block.1.fc1.weight"]
    state["bogus.weight"] = torch.zeros(1)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(BreastcadError) as err:
        create_model(STAND_IN, 2, pretrained=str(path))
    text = one_line(err)
    assert "features.1.0.block.1.fc1.weight" in text and "bogus.weight" in text

    state = dict(stand_in_state)
    state["features.8.0.weight"] = torch.zeros(7, 320, 1, 1)
    torch.save(state, path)
    with pytest.raises(BreastcadError) as err:
        create_model(STAND_IN, 2, pretrained=str(path))
    assert "features.8.0.weight" in one_line(err)


# ---------------------------------------------------------------- frozen backbone, lr groups


def test_frozen_backbone_gets_no_gradients_but_the_head_does(stand_in_file: Path) -> None:
    model = create_model(STAND_IN, 2, 1, pretrained=str(stand_in_file), freeze_backbone=True)
    head = get_spec(STAND_IN).classifier
    model.train()
    F.cross_entropy(model(torch.rand(2, 1, SIZE, SIZE)), torch.tensor([0, 1])).backward()
    trainable = 0
    for key, param in model.named_parameters():
        if key.startswith(head + "."):
            assert param.requires_grad and param.grad is not None, key
            assert param.grad.abs().sum() > 0, key
            trainable += 1
        else:
            assert not param.requires_grad and param.grad is None, key
    assert trainable == 2  # weight and bias
    groups = param_groups(model, 1e-3, 0.1)
    assert [g["name"] for g in groups] == ["head"]


def test_param_groups_give_the_backbone_a_lower_lr() -> None:
    model = create_model("basic_cnn", 2, 1, width=8, depth=2, dense_units=16)
    groups = param_groups(model, 1e-3, 0.1)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == pytest.approx(1e-4) and groups[1]["lr"] == pytest.approx(1e-3)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.head[4].parameters()}
    n_grouped = sum(p.numel() for g in groups for p in g["params"])
    assert n_grouped == count_parameters(model)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [groups[0]["lr"], groups[1]["lr"]]
    with pytest.raises(ConfigError, match="backbone_lr_factor"):
        param_groups(model, 1e-3, 0)
    with pytest.raises(ConfigError, match="classifier head"):
        param_groups(nn.Linear(2, 2), 1e-3, 0.1)
