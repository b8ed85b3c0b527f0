"""End to end on synthetic mammograms: import -> train (breast-crop) -> predict, as a user would."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from synthetic_mammo import save_16bit_png, synthetic_mammogram

H, W = 300, 200
FAST = [
    "--quiet",
    "--folds", "2",
    "--epochs", "2",
    "--image-size", "48",
    "--set", "eval.n_bootstrap=50",
    "--set", "cv.val_fraction=0.34",
    "--set", "train.batch_size=8",
    "--set", "data.preprocess=breast-crop",
]  # fmt: skip


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    return subprocess.run(
        [sys.executable, "-m", "breastcad", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        errors="backslashreplace",
    )


def write_mias_like(root: Path, n_pairs: int = 13, seed: int = 0, texture: float = 0.0) -> Path:
    """A mini-MIAS-shaped dataset: 16-bit PNGs, Info.txt with bottom-left coordinates.

    ``texture`` adds fine noise of that amplitude inside the breast: on the generator's
    smooth tissue alone, lesion patches of different women (a bright disc in the middle)
    look so alike that the audit links them as near-duplicates.
    """
    root.mkdir(parents=True)
    lines = ["synthetic mini-MIAS (free text header)", ""]
    for n in range(1, 2 * n_pairs + 1):
        pair = (n - 1) // 2  # both breasts of a woman share a class here; the last are normal
        kind = "normal" if pair == n_pairs - 1 else ("benign", "malignant")[pair % 2]
        m = synthetic_mammogram(
            H, W, seed=seed + n, chest_right=n % 2 == 0, malignant=kind == "malignant",
            lesion=kind != "normal",
        )  # fmt: skip
        img = m.image
        if texture:
            fine = ndimage.gaussian_filter(np.random.default_rng(n).standard_normal((H, W)), 1.0)
            img = np.clip(np.where(m.breast, img + texture * fine / np.abs(fine).max(), img), 0, 1)
        save_16bit_png(root / f"mdb{n:03d}.png", img)
        x, y = m.lesion_xy
        if kind == "normal":
            lines.append(f"mdb{n:03d} F NORM")
        else:
            cls, sev = ("SPIC", "M") if kind == "malignant" else ("CIRC", "B")
            lines.append(f"mdb{n:03d} F {cls} {sev} {x:.0f} {H - 1 - y:.0f} {m.lesion_r:.0f}")
    (root / "Info.txt").write_text("\n".join(lines) + "\n")
    return root / "Info.txt"


@pytest.fixture(scope="module")
def mammo_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("mammo-cli")
    info = write_mias_like(tmp / "mias")
    cache = tmp / "cache"
    manifest = tmp / "mias.csv"
    imp = run_cli(
        "import", "mias", str(info), "--out", str(manifest),
        "--examples", str(tmp / "examples.png"), cache=cache,
    )  # fmt: skip
    train = run_cli("train", "--data", str(manifest), "--out", str(tmp / "run"), *FAST, cache=cache)
    return {"tmp": tmp, "info": info, "manifest": manifest, "imp": imp, "train": train}


def test_import_writes_a_manifest_with_masks_and_examples(mammo_run: dict) -> None:
    imp, manifest = mammo_run["imp"], mammo_run["manifest"]
    assert imp.returncode == 0, imp.stderr
    assert "26 images (benign: 12, malignant: 12, normal: 2) of 13 patients" in imp.stdout
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 26
    assert sum(1 for r in rows if r["mask"]) == 24
    assert rows[0]["patient_id"] == rows[1]["patient_id"] != rows[2]["patient_id"]
    # the mask drawn from bottom-left coordinates covers the lesion
    first = rows[0]
    mask = np.asarray(Image.open(manifest.parent / first["mask"])) > 0
    lesion = synthetic_mammogram(H, W, seed=1, chest_right=False).lesion
    assert (mask & lesion).sum() > 0.7 * lesion.sum()
    with Image.open(mammo_run["tmp"] / "examples.png") as im:
        assert im.size[1] > 500  # several examples drawn


def test_train_on_mammograms_with_breast_crop(mammo_run: dict) -> None:
    proc, run = mammo_run["train"], mammo_run["tmp"] / "run"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Pooled out-of-fold ROC-AUC" in proc.stdout
    for k in (0, 1):
        card = json.loads((run / f"fold-{k}" / "card.json").read_text())
        assert card["preprocessing"]["mode"] == "breast-crop"
        assert card["input_size"] == 48
    folds = json.loads((run / "folds.json").read_text())
    # the manifest's patients are the groups: both breasts of a woman in one test fold
    samples, test_fold = folds["samples"], folds["repeats"][0]["test_fold"]
    by_name = {
        Path(s["path"]).stem: (s["group"], f) for s, f in zip(samples, test_fold, strict=True)
    }
    pairs = [(f"mdb{n:03d}", f"mdb{n + 1:03d}") for n in range(1, 25, 2)]
    kept = [(a, b) for a, b in pairs if a in by_name and b in by_name]
    assert len(kept) >= 10  # (the audit may still link a few synthetic look-alikes)
    for a, b in kept:
        assert by_name[a] == by_name[b]
    metrics = json.loads((run / "metrics.json").read_text())
    # benign-vs-malignant: the normal images are left out; the breast-crop audit does not
    # lump the images together by their identical label markers (stretch would)
    assert 20 <= metrics["n_images"] <= 24
    assert (run / "report.html").stat().st_size > 10_000


def test_predict_applies_the_runs_preprocessing_to_png_and_dicom(
    mammo_run: dict, write_dicom
) -> None:
    assert mammo_run["train"].returncode == 0
    tmp, run = mammo_run["tmp"], mammo_run["tmp"] / "run"
    m = synthetic_mammogram(H, W, seed=99, chest_right=True, malignant=True)
    png = save_16bit_png(tmp / "new" / "case.png", m.image, bits=16)
    stored = np.asarray(Image.open(png)).astype(np.uint16)
    dcm = write_dicom(
        tmp / "new" / "case-mono1.dcm", 65535 - stored, photometric="MONOCHROME1",
        BitsStored=16, HighBit=15,
    )  # fmt: skip
    out = tmp / "preds.csv"
    proc = run_cli("predict", str(run), str(png), str(dcm), "--out", str(out), cache=tmp / "cache")
    assert proc.returncode == 0, proc.stderr
    with open(out, newline="") as fh:
        preds = {Path(r["path"]).name: float(r["prob"]) for r in csv.DictReader(fh)}
    assert set(preds) == {"case.png", "case-mono1.dcm"}
    # the MONOCHROME1 DICOM is the same picture: the same probability
    assert preds["case.png"] == pytest.approx(preds["case-mono1.dcm"], abs=1e-6)
