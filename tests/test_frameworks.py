"""The framework benchmark (benchmarks/frameworks): clean refusals, and one smoke run per contender.

The refusal tests run everywhere (CI has only the default install, so the
Keras environments are absent there). The smoke tests train each contender
for one epoch on a tiny synthetic dataset; a Keras contender is skipped,
with the reason, when its environment (benchmarks/frameworks/envs/<name>,
made by setup_envs.sh) does not exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synthetic import write_busi_like

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "frameworks" / "bench_frameworks.py"
ENVS = ROOT / "benchmarks" / "frameworks" / "envs"


def run_bench(*args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def assert_one_line_refusal(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_refuses_a_contender_whose_environment_is_missing(tmp_path: Path) -> None:
    # A work tree without any Keras environment, as in CI: point the script at a copy.
    bench = tmp_path / "benchmarks"
    (bench / "frameworks").mkdir(parents=True)
    for f in (ROOT / "benchmarks" / "frameworks").glob("*.py"):
        (bench / "frameworks" / f.name).write_bytes(f.read_bytes())
    (bench / "common.py").write_bytes((ROOT / "benchmarks" / "common.py").read_bytes())
    proc = subprocess.run(
        [
            sys.executable,
            str(bench / "frameworks" / "bench_frameworks.py"),
            "--contenders",
            "pytorch-eager,keras-jax",
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    line = assert_one_line_refusal(proc, "keras-jax", "setup_envs.sh keras-jax")
    assert "environment missing" in line
    assert not (tmp_path / "work").exists(), "nothing may run before the refusal"


def test_refuses_unknown_contender_and_onnx_without_its_models(tmp_path: Path) -> None:
    assert_one_line_refusal(run_bench("--contenders", "caffe"), "unknown contender caffe")
    assert_one_line_refusal(run_bench("--contenders", "onnxruntime"), "add pytorch-eager")


def test_refuses_a_run_folder_without_folds(tmp_path: Path) -> None:
    proc = run_bench(
        "--run",
        str(tmp_path),
        "--contenders",
        "pytorch-eager",
        "--work",
        str(tmp_path / "w"),
        "--out",
        str(tmp_path / "o"),
    )
    assert_one_line_refusal(proc, "no folds.json")


# ---------------------------------------------------------------- smoke runs (slow)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 16 images per class at 32 px: 5 grouped folds still hold both classes
    return write_busi_like(tmp_path_factory.mktemp("fw") / "busi", n_per_class=16, size=32)


def smoke(tiny_data: Path, tmp_path: Path, contenders: str) -> dict:
    proc = run_bench(
        "--data",
        str(tiny_data),
        "--contenders",
        contenders,
        "--folds",
        "1",
        "--epochs",
        "1",
        "--size",
        "32",
        "--n-bootstrap",
        "50",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    doc = json.loads((tmp_path / "out" / "frameworks.json").read_text())
    assert (tmp_path / "out" / "frameworks.png").stat().st_size > 0
    assert "| contender |" in (tmp_path / "out" / "frameworks.md").read_text()
    return doc


def check_row(row: dict, trains: bool = True) -> None:
    assert 0.0 <= row["auc"] <= 1.0
    assert row["auc_low"] <= row["auc"] <= row["auc_high"]
    assert row["inference_images_per_s"] > 0
    assert row["peak_rss_mb"] > 0
    assert row["seconds_to_first_batch"] > 0
    if trains:
        assert row["train_images_per_s"] > 0
        assert row["determinism"]["identical"] is True  # each framework's switch is on


@pytest.mark.slow
def test_smoke_pytorch_eager_and_onnxruntime(tiny_data: Path, tmp_path: Path) -> None:
    doc = smoke(tiny_data, tmp_path, "pytorch-eager,onnxruntime")
    rows = doc["contenders"]
    check_row(rows["pytorch-eager"])
    check_row(rows["onnxruntime"], trains=False)
    # the exported graph predicts what the PyTorch fold model predicts (fp32 vs bf16 aside)
    assert rows["onnxruntime"]["max_abs_prob_diff_to_breastcad"] < 0.05


@pytest.mark.slow
def test_smoke_pytorch_compile(tiny_data: Path, tmp_path: Path) -> None:
    doc = smoke(tiny_data, tmp_path, "pytorch-compile")
    check_row(doc["contenders"]["pytorch-compile"])
    assert doc["contenders"]["pytorch-compile"]["jit_compile"].startswith("torch.compile")


@pytest.mark.slow
@pytest.mark.parametrize("env", ["keras-tensorflow", "keras-jax", "keras-torch"])
def test_smoke_keras(env: str, tiny_data: Path, tmp_path: Path) -> None:
    if not (ENVS / env / ".installed").is_file():
        pytest.skip(f"{env} environment absent (benchmarks/frameworks/setup_envs.sh {env})")
    doc = smoke(tiny_data, tmp_path, env)
    row = doc["contenders"][env]
    check_row(row)
    assert row["framework"]["backend"] == env.removeprefix("keras-")


# Run inside a Keras environment: breastcad's warp matrix -> keras_cnn's pixel transform.
WARP_IN_KERAS = """
import json, sys
import numpy as np
from keras import ops
import keras_cnn
doc = json.loads(sys.stdin.read())
img = np.asarray(doc["image"], np.float32)
keys = ("a00", "a01", "a10", "a11", "tx", "ty")
m = [ops.convert_to_tensor(np.asarray([doc[k]], np.float32)) for k in keys]
t = keras_cnn.pixel_affine(*m, img.shape[0])
out = ops.image.affine_transform(img[None, :, :, None], t, fill_mode="constant")
print(json.dumps(ops.convert_to_numpy(out)[0, :, :, 0].tolist()))
"""


@pytest.mark.slow
@pytest.mark.parametrize("env", ["keras-tensorflow", "keras-jax", "keras-torch"])
def test_keras_augmentation_warps_like_breastcad(env: str, tmp_path: Path) -> None:
    """The Keras contenders' affine warp is breastcad's grid_sample warp, border included."""
    if not (ENVS / env / ".installed").is_file():
        pytest.skip(f"{env} environment absent (benchmarks/frameworks/setup_envs.sh {env})")
    import numpy as np
    import torch
    import torch.nn.functional as F

    from breastcad.config import AugmentConfig
    from breastcad.data.augment import affine_matrices

    size = 40
    yy, xx = np.mgrid[0:size, 0:size]
    image = (0.1 + 0.8 * ((xx // 5 + yy // 5) % 2)).astype(np.float32)
    cfg = AugmentConfig(rotate_deg=20.0, shear_deg=10.0, hflip=1.0, translate=0.1)
    theta = affine_matrices(1, cfg, torch.Generator().manual_seed(3))
    x = torch.from_numpy(image)[None, None]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    want = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = theta[0].tolist()
    doc = {"image": image.tolist(), "a00": m[0][0], "a01": m[0][1], "a10": m[1][0],
           "a11": m[1][1], "tx": m[0][2], "ty": m[1][2]}  # fmt: skip
    proc = subprocess.run(
        [str(ENVS / env / "bin" / "python"), "-c", WARP_IN_KERAS],
        input=json.dumps(doc), capture_output=True, text=True, timeout=300,
        cwd=ROOT / "benchmarks" / "frameworks",
        env={**os.environ, "KERAS_BACKEND": env.removeprefix("keras-"),
             "KERAS_HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.asarray(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert np.abs(got - want[0, 0].numpy()).max() < 1e-4
