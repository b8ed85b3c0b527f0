"""ROI patches (``breastcad patches``) and sliding-window prediction, on synthetic mammograms."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastcad.cli import main
from breastcad.data.cache import prepare_for_model
from breastcad.data.imageio import read_image
from breastcad.data.importers import import_mias, write_manifest
from breastcad.data.patches import (
    MIN_BREAST,
    Box,
    PatchSettings,
    card_entry,
    crop,
    extract_patches,
    image_patches,
    lesions_from_mask,
    lesions_from_roi,
    place,
    prepare_image,
)
from breastcad.data.sources import load_manifest
from breastcad.errors import BreastcadError
from breastcad.sliding_window import patch_input, patch_side, positions, predict_sliding, slide
from synthetic_mammo import Mammo, save_16bit_png, synthetic_mammogram
from test_mammo_cli import run_cli, write_mias_like

H, W = 300, 200
SIZE = 48


def _rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="") as fh:
        return list(csv.DictReader(fh))


def _box(row: dict[str, str]) -> Box:
    x0, y0, x1, y1 = map(int, row["box"].split())
    assert x1 - x0 == y1 - y0 == int(row["side"])
    return Box(x0, y0, x1 - x0)


def _write(root: Path, name: str, m: Mammo, mask: bool = True) -> tuple[str, str]:
    save_16bit_png(root / f"{name}.png", m.image)
    if not mask:
        return f"{name}.png", ""
    Image.fromarray(m.lesion.astype(np.uint8) * 255).save(root / f"{name}_roi.png")
    return f"{name}.png", f"{name}_roi.png"


def _manifest(root: Path, lines: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "m.csv").write_text("path,label,patient_id,mask\n" + "\n".join(lines) + "\n")
    return root / "m.csv"


# ------------------------------------------------------------------------- geometry


def test_place_shifts_inward_at_borders_and_pads_only_small_images() -> None:
    assert place(100, 150, 48, (H, W)) == Box(76, 126, 48)  # centred
    assert place(3, 297, 48, (H, W)) == Box(0, H - 48, 48)  # corner: shifted inside, not padded
    assert place(W - 1, 5, 48, (H, W)) == Box(W - 48, 0, 48)
    small = place(10, 10, 48, (30, 20))  # image smaller than the side: centred on the image
    assert small == Box(-14, -9, 48)
    arr = np.arange(600, dtype=np.uint8).reshape(30, 20)
    out = crop(arr, small)
    assert out.shape == (48, 48)
    assert (out[9:39, 14:34] == arr).all() and out[:9].sum() == 0 and out[:, :14].sum() == 0


def test_mask_components_are_lesions_and_close_ones_merge() -> None:
    mask = np.zeros((100, 100), bool)
    mask[10:20, 10:30] = True  # 20 x 10: extent 20, centre (20, 15)
    mask[12:14, 33:35] = True  # 3 px away: the same lesion (a calcification speck)
    mask[70:80, 70:80] = True  # far away: a second lesion
    les = lesions_from_mask(mask, gap=8)
    assert len(les) == 2
    assert (les[0].cx, les[0].cy, les[0].extent) == (22.5, 15.0, 25.0)
    assert (les[1].cx, les[1].cy, les[1].extent) == (75.0, 75.0, 10.0)
    assert len(lesions_from_mask(mask, gap=1)) == 3


def test_mias_roi_uses_the_bottom_left_origin_like_the_importer(tmp_path: Path) -> None:
    # the importer draws the circle of "x y r" around pixel (x, h - 1 - y): same lesion
    (les,) = lesions_from_roi("60 25 7", height=H)
    root = tmp_path / "mias"
    root.mkdir()
    (root / "Info.txt").write_text("mdb001 F CIRC B 60 25 7\n")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "mdb001.png")
    res = import_mias(root / "Info.txt", masks_dir=tmp_path / "masks")
    mask = np.asarray(Image.open(res.rows[0].masks[0])) > 0
    (from_mask,) = lesions_from_mask(mask, gap=1)
    assert (les.cx, les.cy, les.extent) == (from_mask.cx, from_mask.cy, from_mask.extent)
    assert les.cy == pytest.approx(H - 1 - 25 + 0.5)
    with pytest.raises(ValueError):
        lesions_from_roi("60 25", height=H)


def test_bad_roi_cells_skip_their_row_only(tmp_path: Path) -> None:
    m = synthetic_mammogram(H, W, seed=8)
    for name in ("a", "b", "c"):
        save_16bit_png(tmp_path / f"{name}.png", m.image)
    x, y = m.lesion_xy
    (tmp_path / "m.csv").write_text(
        "path,label,patient_id,roi\n"
        f"a.png,benign,P1,{x:.0f} {H - 1 - y:.0f} {m.lesion_r:.0f}\n"
        "b.png,benign,P2,500 10 5\n"  # outside the 200 px wide image
        "c.png,benign,P3,12 abc\n"
    )
    res = extract_patches(tmp_path / "m.csv", tmp_path / "out", PatchSettings(size=SIZE))
    problems = {Path(b.path).name: b.problem for b in res.bad}
    assert "outside the 200 x 300 image" in problems["b.png"]
    assert "invalid roi" in problems["c.png"]
    assert res.images_used == 1 and res.counts()["benign"] == 1


# ------------------------------------------------------------------------- extraction


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two women: a benign image near the border, a malignant one, a normal one without mask,
    a malignant one without mask (skipped), one missing file and one corrupt file."""
    root = tmp_path_factory.mktemp("patches")
    data = root / "data"
    data.mkdir()
    ms = {
        "b": synthetic_mammogram(H, W, seed=3),
        "m": synthetic_mammogram(H, W, seed=4, chest_right=True, malignant=True),
        "n": synthetic_mammogram(H, W, seed=5, lesion=False),
        "x": synthetic_mammogram(H, W, seed=6, malignant=True),
    }
    # a second lesion at the image's top-left edge, in the mask only: clipped patch
    edge = ms["b"].lesion.copy()
    edge[0:6, 0:8] = True
    ms["b"] = Mammo(**{**ms["b"].__dict__, "lesion": edge})
    b, bm = _write(data, "b", ms["b"])
    m, mm = _write(data, "m", ms["m"])
    n, _ = _write(data, "n", ms["n"], mask=False)
    x, _ = _write(data, "x", ms["x"], mask=False)
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    manifest = _manifest(
        data,
        [
            f"{b},benign,P1,{bm}",
            f"{m},malignant,P2,{mm}",
            f"{n},normal,P1,",
            f"{x},malignant,,",
            "missing.png,benign,P3,missing_roi.png",
            "corrupt.png,normal,P4,",
        ],
    )
    out = root / "out"
    res = extract_patches(manifest, out, PatchSettings(size=SIZE, normal_per_image=3), workers=2)
    return {"ms": ms, "res": res, "out": out, "rows": _rows(out / "patches.csv"), "data": data}


def test_lesion_patches_are_centred_on_each_lesion(extracted: dict) -> None:
    rows, ms = extracted["rows"], extracted["ms"]
    lesions = {Path(r["source"]).stem: [] for r in rows if r["kind"] == "lesion"}
    for r in rows:
        if r["kind"] == "lesion":
            lesions[Path(r["source"]).stem].append((_box(r), r["label"]))
    assert sorted(lesions) == ["b", "m"]
    for name, items in lesions.items():
        (box, label), *edge = sorted(items, key=lambda t: t[0] == Box(0, 0, SIZE))
        assert len(edge) == (name == "b")  # b has a second lesion, at the image corner
        assert label == {"b": "benign", "m": "malignant"}[name]
        lesion = ms[name].lesion.copy()
        lesion[0:6, 0:8] = False  # the synthetic lesion alone
        ys, xs = np.nonzero(lesion)
        cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
        assert abs(box.x0 + box.side / 2 - cx) <= 0.5 and abs(box.y0 + box.side / 2 - cy) <= 0.5
        extent = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())
        assert box.side == max(SIZE, int(np.ceil(extent * 1.5)))


def test_lesion_patch_at_the_border_is_shifted_inside(extracted: dict) -> None:
    (edge,) = [_box(r) for r in extracted["rows"] if r["kind"] == "lesion" and _box(r).x0 == 0]
    assert edge == Box(0, 0, SIZE)  # whole lesion (0..8, 0..6) inside, no padding
    png = extracted["out"] / next(r["path"] for r in extracted["rows"] if _box(r) == edge)
    patch = np.asarray(Image.open(png))
    assert patch.shape == (SIZE, SIZE) and patch.dtype == np.uint8


def test_normal_patches_lie_in_the_breast_away_from_lesions(extracted: dict) -> None:
    rows, ms = extracted["rows"], extracted["ms"]
    normals = [r for r in rows if r["kind"] == "normal"]
    assert {r["label"] for r in normals} == {"normal"}
    per_source: dict[str, list[Box]] = {}
    for r in normals:
        per_source.setdefault(Path(r["source"]).stem, []).append(_box(r))
    assert sorted(per_source) == ["b", "m", "n"] and all(len(v) == 3 for v in per_source.values())
    for name, boxes in per_source.items():
        m = ms[name]
        lesion_boxes = [
            _box(r) for r in rows if r["kind"] == "lesion" and f"/{name}.png" in r["source"]
        ]
        for box in boxes:
            inside = m.breast[box.y0 : box.y1, box.x0 : box.x1].mean()
            assert inside >= MIN_BREAST - 0.1  # found on a downsampled mask: near the rule
            assert not m.lesion[box.y0 : box.y1, box.x0 : box.x1].any()
            assert not any(box.intersects(o) for o in lesion_boxes + [b for b in boxes if b != box])


def test_groups_are_the_patient_ids(extracted: dict, tmp_path: Path) -> None:
    manifest = extracted["out"] / "patches.csv"
    samples = load_manifest(manifest).samples
    groups = {
        (Path(r["source"]).stem, s.group) for r, s in zip(extracted["rows"], samples, strict=True)
    }
    assert {g for src, g in groups if src in ("b", "n")} == {"P1"}  # both images of woman P1
    assert {g for src, g in groups if src == "m"} == {"P2"}
    # every patch file is a readable 8-bit image of the recorded side
    for r in extracted["rows"]:
        assert read_image(manifest.parent / r["path"]).shape == (int(r["side"]),) * 2


def test_copies_of_an_image_share_a_group_even_without_patient_ids(tmp_path: Path) -> None:
    """A re-exported copy (here a 1-count brightness change) under another name, no patient
    ids: its normal patches are cut elsewhere, so only the audit of the sources can keep
    the two on one side of a split."""
    m = synthetic_mammogram(H, W, seed=11)
    a, am = _write(tmp_path, "a", m)
    save_16bit_png(tmp_path / "a-copy.png", np.clip(m.image + 1 / 4095, 0, 1))
    other, om = _write(tmp_path, "other", synthetic_mammogram(H, W, seed=12, malignant=True))
    manifest = _manifest(
        tmp_path, [f"{a},benign,,{am}", f"a-copy.png,benign,,{am}", f"{other},malignant,,{om}"]
    )
    extract_patches(manifest, tmp_path / "out", PatchSettings(size=SIZE))
    groups: dict[str, set[str]] = {}
    for r in _rows(tmp_path / "out" / "patches.csv"):
        groups.setdefault(Path(r["source"]).name, set()).add(r["patient_id"])
    assert groups["a.png"] == groups["a-copy.png"] and len(groups["a.png"]) == 1
    assert groups["other.png"] != groups["a.png"]


def test_an_image_listed_twice_is_refused(tmp_path: Path) -> None:
    a, am = _write(tmp_path, "a", synthetic_mammogram(H, W, seed=11))
    manifest = _manifest(tmp_path, [f"{a},benign,P1,{am}", f"{a},malignant,P1,{am}"])
    with pytest.raises(BreastcadError, match="listed on 2 rows"):
        extract_patches(manifest, tmp_path / "out", PatchSettings(size=SIZE))
    assert not (tmp_path / "out" / "patches.csv").exists()


def test_bad_files_and_images_without_coordinates_are_counted(extracted: dict) -> None:
    res = extracted["res"]
    bad = sorted(Path(b.path).name for b in res.bad)
    assert bad == ["corrupt.png", "missing.png"]
    assert res.no_coordinates == 1  # "x": malignant without mask or roi
    assert "x.png" not in {Path(r["source"]).name for r in extracted["rows"]}
    assert res.images_used == 3
    assert res.counts() == {"benign": 2, "malignant": 1, "normal": 9}


def test_cli_lists_each_bad_file_once_and_fails_only_when_nothing_is_usable(
    extracted: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = extracted["data"]
    opts = ["--size", str(SIZE), "--normal-per-image", "3", "--quiet"]
    assert main(["patches", str(data / "m.csv"), "--out", str(tmp_path / "o"), *opts]) == 0
    cap = capsys.readouterr()
    assert cap.err.count("skipped") == 2
    assert "missing.png: no such file" in cap.err and "corrupt.png:" in cap.err
    assert "12 patches" in cap.out
    # nothing usable: one line, exit 2
    bad = _manifest(tmp_path / "bad", ["missing.png,benign,P1,", "gone.png,normal,P2,"])
    assert main(["patches", str(bad), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 3 and [ln.split()[0] for ln in lines] == ["skipped", "skipped", "error:"]
    assert "no patch could be made" in lines[-1]
    # an existing non-empty folder is refused before any work
    assert main(["patches", str(data / "m.csv"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "new or empty folder" in capsys.readouterr().err


def test_jitter_moves_the_lesion_off_centre_but_keeps_it_whole(extracted: dict) -> None:
    m = extracted["ms"]["m"]
    prep = prepare_image(m.image)
    (les,) = lesions_from_mask(m.lesion, SIZE // 4)
    rng = np.random.default_rng(0)
    settings = PatchSettings(size=SIZE, normal_per_image=0, jitter=1.0)
    boxes = [image_patches(prep, [les], "malignant", settings, rng)[0].box for _ in range(20)]
    ys, xs = np.nonzero(m.lesion)
    for b in boxes:
        assert b.x0 <= xs.min() and xs.max() < b.x1 and b.y0 <= ys.min() and ys.max() < b.y1
    offsets = {(b.x0 + b.side / 2 - les.cx, b.y0 + b.side / 2 - les.cy) for b in boxes}
    assert len(offsets) > 10 and max(max(abs(dx), abs(dy)) for dx, dy in offsets) > 3


def test_sidecar_goes_into_the_card(extracted: dict, tmp_path: Path) -> None:
    entry = card_entry(extracted["out"] / "patches.csv")
    assert entry["patches"]["patch_side"] == SIZE
    assert card_entry(extracted["data"] / "m.csv") == {}  # an ordinary manifest: nothing
    assert card_entry(None) == {}


# ------------------------------------------------------------------------- sliding window


class BlobModel:
    """A hand-made patch 'model': p(malignant) = share of very bright pixels in the input."""

    def __init__(self, side: int = SIZE, size: int = 32) -> None:
        self.cards = [
            {
                "input_size": size,
                "preprocessing": {"mode": "stretch"},
                "class_names": ["normal", "benign", "malignant"],
                "positive_class": "malignant",
                "patches": {"patch_side": side},
            }
        ]
        self.source, self.threshold, self.inputs = "blob-model", 0.5, []

    @property
    def card(self) -> dict:
        return self.cards[0]

    def probabilities(self, images: np.ndarray, rt: object = None) -> np.ndarray:
        self.inputs.append(images)
        p = np.clip((images > 230).mean(axis=(1, 2)) * 4, 0, 1)
        return np.stack([1 - p, np.zeros_like(p), p], axis=1)


def test_window_input_is_the_patch_file_as_training_reads_it(extracted: dict) -> None:
    """A window at a patch's box gives exactly the model input training got from its PNG."""
    row = next(r for r in extracted["rows"] if r["kind"] == "lesion")
    card = BlobModel().card
    from_file = prepare_for_model(read_image(extracted["out"] / row["path"]), card)
    prep = prepare_image(read_image(extracted["data"] / "b.png"))
    from_window = prepare_for_model(patch_input(prep.pixels, _box(row)), card)
    assert np.array_equal(from_file, from_window)


def test_positions_cover_the_axis() -> None:
    assert positions(100, 48, 24) == [0, 24, 48, 52]
    assert positions(48, 48, 24) == [0]
    assert positions(30, 48, 24) == [-9]


def test_sliding_window_finds_the_bright_lesion() -> None:
    model = BlobModel()
    m = synthetic_mammogram(H, W, seed=11, malignant=True)
    res = slide(model, m.image, SIZE, 0.25)
    top = res.boxes[res.top]
    lx, ly = m.lesion_xy
    assert top.x0 <= lx < top.x1 and top.y0 <= ly < top.y1
    assert np.stack(model.inputs[0]).shape[1:] == (32, 32)
    # windows are scored only where the breast is; the marker outside never counts
    prep = prepare_image(m.image)
    assert all(prep.fraction(b) >= MIN_BREAST for b in res.boxes)
    without = slide(model, synthetic_mammogram(H, W, seed=11, lesion=False).image, SIZE, 0.25)
    assert res.prob > without.prob + 0.3
    heat = res.heatmap(0.5)
    assert heat.shape == (H // 2, W // 2) and np.nanmax(heat) == pytest.approx(res.prob)


def test_predict_sliding_rows_and_refusals(tmp_path: Path) -> None:
    m = synthetic_mammogram(H, W, seed=12, malignant=True)
    png = save_16bit_png(tmp_path / "case.png", m.image)
    rows, bad = predict_sliding(BlobModel(), [str(png), str(tmp_path / "nope.png")], 0.5)
    assert [Path(b.path).name for b in bad] == ["nope.png"]
    (row,) = rows
    assert row["decision"] == "malignant" and row["prob"] == row["prob_malignant"]
    assert row["window_x1"] - row["window_x0"] == SIZE and row["windows"] > 10
    plain = BlobModel()
    plain.cards[0].pop("patches")
    with pytest.raises(BreastcadError, match="not trained on patches"):
        patch_side(plain)
    two = BlobModel()
    two.cards[0].update(task="benign-vs-malignant", class_names=["benign", "malignant"])
    with pytest.raises(BreastcadError, match="no normal class"):
        patch_side(two)
    with pytest.raises(BreastcadError, match="stride"):
        slide(BlobModel(), m.image, SIZE, 0.0)


# ------------------------------------------------------------------------- end to end


def test_end_to_end_import_patches_train_predict_sliding_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    info = write_mias_like(tmp_path / "mias", n_pairs=15, seed=100, texture=0.3)
    res = import_mias(info)  # the roi column alone (no masks): patches use the circles
    write_manifest(res, tmp_path / "mias.csv")
    code = main(
        ["patches", str(tmp_path / "mias.csv"), "--out", str(tmp_path / "p"),
         "--size", str(SIZE), "--normal-per-image", "1", "--quiet"]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "58 patches (benign: 14, malignant: 14, normal: 30) from 30 images" in out
    # the lesion patch of mdb001 is centred on its lesion (roi circle, bottom-left origin)
    first = next(r for r in _rows(tmp_path / "p" / "patches.csv") if r["kind"] == "lesion")
    lx, ly = synthetic_mammogram(H, W, seed=101).lesion_xy
    box = _box(first)
    assert abs(box.x0 + box.side / 2 - lx) <= 1.5 and abs(box.y0 + box.side / 2 - ly) <= 1.5
    run = tmp_path / "run"
    proc = run_cli(
        "train", "--data", str(tmp_path / "p" / "patches.csv"), "--task", "three-class",
        "--out", str(run), "--quiet", "--folds", "2", "--epochs", "1", "--image-size", "32",
        "--set", "eval.n_bootstrap=20", "--set", "cv.val_fraction=0.34",
        "--set", "train.batch_size=8", cache=cache,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((run / "fold-0" / "card.json").read_text())
    assert card["patches"]["patch_side"] == SIZE
    new = save_16bit_png(tmp_path / "new" / "case.png", synthetic_mammogram(H, W, seed=7).image)
    out = tmp_path / "preds.csv"
    proc = run_cli(
        "predict", str(run), str(new), "--sliding-window", "--stride", "0.5",
        "--out", str(out), "--heatmaps", str(tmp_path / "maps"), cache=cache,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (row,) = _rows(out)
    assert 0.0 <= float(row["prob"]) <= 1.0 and row["decision"] in ("normal", "benign", "malignant")
    assert int(row["window_x1"]) - int(row["window_x0"]) == SIZE and int(row["windows"]) > 10
    assert (tmp_path / "maps" / "case_windows.png").stat().st_size > 5_000
    # --stride is a sliding-window setting: refused without it
    assert main(["predict", str(run), str(new), "--stride", "0.5"]) == 2
    assert "--sliding-window" in capsys.readouterr().err
