"""``breastcad export`` (ONNX, TorchScript) parity with PyTorch, predicting with the export,
and the refusal of pickled checkpoints (nothing in them may run)."""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from synthetic import write_busi_like


def run_cli(*args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if cache is not None:
        env["XDG_CACHE_HOME"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "breastcad", *args],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("export")
    data = write_busi_like(tmp / "data", n_per_class=10, size=40)
    run = tmp / "run"
    proc = run_cli(
        "train", "--data", str(data), "--out", str(run), "--quiet", "--folds", "2",
        "--epochs", "1", "--image-size", "32", "--set", "eval.n_bootstrap=50",
        "--set", "cv.val_fraction=0.34", "--set", "train.batch_size=8",
        cache=tmp / "cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, run


def model_inputs(data: Path, size: int) -> tuple[list[str], np.ndarray]:
    from breastcad.data.cache import prepare_for_model
    from breastcad.data.imageio import read_image

    paths = sorted(str(p) for p in data.rglob("*.png") if "_mask" not in p.name)
    card = {"input_size": size}
    return paths, np.stack([prepare_for_model(read_image(p), card) for p in paths])


def fp32_reference(run: Path, images: np.ndarray, fold: int | None = None) -> np.ndarray:
    from breastcad.export import reference_probabilities
    from breastcad.predict import load_ensemble

    return reference_probabilities(load_ensemble(run, fold), images)


def test_onnx_export_of_the_ensemble_matches_pytorch(tiny: tuple[Path, Path], tmp_path) -> None:
    import onnxruntime as ort

    from breastcad.errors import BreastcadError
    from breastcad.predict import load_model

    data, run = tiny
    out = tmp_path / "model.onnx"
    proc = run_cli("export", str(run), "--format", "onnx", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "parity with PyTorch" in proc.stdout
    side = json.loads((tmp_path / "model.onnx.json").read_text())
    assert side["format"] == "onnx" and side["members"] == ["fold-0", "fold-1"]
    assert side["parity"]["max_abs_diff"] <= 1e-4
    metrics = json.loads((run / "metrics.json").read_text())
    assert side["threshold"] == metrics["operating_point"]["threshold"]
    assert side["model_card"]["cross_validated_metrics"]["pooled"] == metrics["pooled"]

    # independently: onnxruntime on the real images, several batch sizes, vs PyTorch float32
    paths, images = model_inputs(data, 32)
    ref = fp32_reference(run, images)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    for batch in (1, 5, len(images)):
        got = session.run(None, {"image": images[:batch]})[0]
        assert got.shape == (batch, 2)
        assert np.abs(got - ref[:batch]).max() <= 1e-4
    assert np.allclose(ref.sum(axis=1), 1, atol=1e-6)

    # `predict` runs the export with onnxruntime and reads threshold etc. from the sidecar
    preds = tmp_path / "preds.csv"
    proc = run_cli("predict", str(out), str(data), "--out", str(preds))
    assert proc.returncode == 0, proc.stderr
    rows = {r["path"]: r for r in csv.DictReader(preds.open())}
    assert sorted(rows) == paths
    for i, p in enumerate(paths):
        assert abs(float(rows[p]["prob"]) - ref[i, 1]) <= 1e-4
        assert rows[p]["backend"] == "onnx" and rows[p]["model_version"] == side["model_version"]
        if abs(ref[i, 1] - side["threshold"]) > 1e-4:
            decision = "malignant" if ref[i, 1] >= side["threshold"] else "benign"
            assert rows[p]["decision"] == decision

    # a tampered model file no longer matches its sidecar and is refused
    blob = bytearray(out.read_bytes())
    blob[-10] ^= 0xFF
    out.write_bytes(bytes(blob))
    with pytest.raises(BreastcadError, match="does not match its sidecar"):
        load_model(out)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch 2.14 deprecates torch.jit
def test_one_fold_as_torchscript_and_the_onnx_backend(tiny: tuple[Path, Path], tmp_path):
    from breastcad.errors import BreastcadError
    from breastcad.export import export_model
    from breastcad.predict import load_ensemble, load_model, predict_images

    data, run = tiny
    out = tmp_path / "fold1.pt"
    ens = load_ensemble(run, 1)
    _, side_path, side = export_model(ens, "torchscript", out)
    assert side_path == tmp_path / "fold1.pt.json"
    assert side["members"] == ["fold-1"] and side["parity"]["max_abs_diff"] <= 1e-4
    paths, images = model_inputs(data, 32)
    ref = fp32_reference(run, images, fold=1)
    module = torch.jit.load(str(out))
    with torch.no_grad():
        got = module(torch.from_numpy(images)).numpy()
    assert np.abs(got - ref).max() <= 1e-4
    # the same fold through the onnx backend of predict (exported in memory)
    onnx_model = load_model(run, 1, backend="onnx")
    assert onnx_model.backend == "onnx" and onnx_model.version == ens.version
    rows, bad = predict_images(onnx_model, paths)
    assert not bad
    assert np.abs(np.array([r["prob"] for r in rows]) - ref[:, 1]).max() <= 1e-4
    # an existing output is not overwritten
    with pytest.raises(BreastcadError, match="already exists"):
        export_model(ens, "torchscript", out)


class Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickled_checkpoint_is_refused_and_never_unpickled(tiny: tuple[Path, Path], tmp_path):
    from breastcad.errors import BreastcadError
    from breastcad.predict import load_model

    data, run = tiny
    image = str(next((data / "benign").glob("benign (1).png")))
    marker = tmp_path / "code-ran"
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # 1. a fold folder whose model.safetensors is really a torch.save zip archive
    torch.save({"weights": Payload(marker)}, copy / "fold-0" / "model.safetensors")
    line = assert_clean_error(run_cli("predict", str(copy / "fold-0"), image))
    assert "pickled checkpoint" in line and "refused" in line and "model.safetensors" in line
    for args in ((copy,), (copy, 0), (copy / "fold-0",), (copy / "fold-0" / "model.safetensors",)):
        with pytest.raises(BreastcadError, match="pickled checkpoint"):
            load_model(*args)
    # 2. a legacy raw pickle under the safetensors name
    (copy / "fold-0" / "model.safetensors").write_bytes(pickle.dumps(Payload(marker), protocol=2))
    with pytest.raises(BreastcadError, match="pickled checkpoint"):
        load_model(copy / "fold-0")
    # 3. a fold folder with only a model.pt, and a .pt file given directly
    (copy / "fold-0" / "model.safetensors").unlink()
    torch.save(Payload(marker), copy / "fold-0" / "model.pt")
    with pytest.raises(BreastcadError, match="model.pt: a pickled checkpoint"):
        load_model(copy / "fold-0")
    with pytest.raises(BreastcadError, match="pickled checkpoint"):
        load_model(copy / "fold-0" / "model.pt")
    assert not marker.exists()
    # the other fold still works, with its card and safetensors only
    assert load_model(copy, 1).name == "basic_cnn x1"
