"""Lesion-agreement metrics, ``breastcad explain`` and the report's Grad-CAM parts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastcad import plots
from breastcad.cli import main
from breastcad.lesion_agreement import (
    compare_cells,
    energy_share,
    explain_run,
    format_ci,
    heat_region,
    image_agreement,
    iou_at,
    mean_with_ci,
    otsu_threshold,
    pointing_hit,
    read_agreement,
)
from synthetic import write_busi_like
from test_cli import FAST, run_cli

# ----------------------------------------------------------------------------- metrics


def disk(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return np.hypot(yy - cy, xx - cx) <= r


def test_pointing_game_hits_only_when_the_maximum_is_in_the_lesion() -> None:
    mask = disk((40, 50), 20, 25, 6)
    heat = np.zeros((40, 50))
    heat[20, 25] = 1.0
    assert pointing_hit(heat, mask) == 1.0
    heat[2, 2] = 2.0
    assert pointing_hit(heat, mask) == 0.0
    assert pointing_hit(np.zeros((40, 50)), mask) == 0.0  # no evidence: a miss
    plateau = np.zeros((40, 50))
    plateau[:, :30] = 1.0  # a maximal plateau mostly outside the lesion
    assert pointing_hit(plateau, mask) == 0.0
    with pytest.raises(ValueError):
        pointing_hit(np.zeros((4, 4)), np.zeros((5, 5), bool))


def test_energy_share_and_iou_are_exact_on_constructed_maps() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:, :2] = True  # 20% of the image
    heat = np.ones((10, 10))
    assert energy_share(heat, mask) == pytest.approx(0.2)  # uniform map = chance
    heat[:, :2] = 4.0
    assert energy_share(heat, mask) == pytest.approx(80 / (80 + 80))
    assert iou_at(heat, mask, "top20") == pytest.approx(1.0)  # top 20% = the mask
    assert iou_at(heat, mask, "otsu") == pytest.approx(1.0)
    shifted = np.roll(heat, 1, axis=1)  # top 20% now covers columns 1-2
    assert iou_at(shifted, mask, "top20") == pytest.approx(10 / 30)
    assert iou_at(np.zeros((10, 10)), mask) == 0.0
    assert not heat_region(np.zeros((3, 3))).any()
    with pytest.raises(ValueError, match="rule"):
        heat_region(heat, "median")


def test_otsu_separates_two_levels() -> None:
    values = np.concatenate([np.full(100, 0.1), np.full(50, 0.8)])
    t = otsu_threshold(values)
    assert 0.1 < t <= 0.8


def test_image_agreement_reports_every_metric_and_where_the_peak_is() -> None:
    mask = disk((40, 40), 30, 30, 5)
    heat = disk((40, 40), 30, 30, 4).astype(float)
    row = image_agreement(heat, mask)
    assert row["pointing_game"] == 1.0 and row["energy_in_lesion"] == pytest.approx(1.0)
    assert row["lesion_fraction"] == pytest.approx(mask.mean())
    assert row["peak_yx"][0] > 0.5 and row["lesion_centroid_yx"][0] == pytest.approx(
        30 / 39, abs=1e-3
    )
    assert not row["empty_heatmap"]


def test_ci_resamples_whole_groups() -> None:
    values = [1.0] * 10 + [0.0] * 10
    per_image = mean_with_ci(values, [str(i) for i in range(20)], n_boot=400)
    assert per_image["value"] == 0.5 and per_image["n"] == 20
    assert per_image["low"] < 0.5 < per_image["high"]
    # two groups of ten identical images: only two independent observations, wider CI
    two_groups = mean_with_ci(values, ["a"] * 10 + ["b"] * 10, n_boot=400)
    assert two_groups["high"] - two_groups["low"] > per_image["high"] - per_image["low"]
    assert mean_with_ci([], [], n_boot=10)["n"] == 0
    assert format_ci({"value": 0.5, "low": 0.25, "high": 0.75}) == "0.50 (0.25-0.75)"
    assert format_ci(None) == "n/a"


# ----------------------------------------------------------------------------- a real run


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """The CLI in-process (a subprocess would spend seconds importing torch)."""
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("explain")
    data = write_busi_like(tmp / "data", n_per_class=8, size=40, seed=3)
    out = tmp / "run"
    proc = run_cli(
        "train", "--data", str(data), "--out", str(out), *FAST, "--set", "model.depth=3",
        "--set", "eval.lesion_agreement=false", cache=tmp / "cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "data": data, "run": out, "report": (out / "report.html").read_text()}


def test_report_without_agreement_file_says_how_to_add_it(run: dict) -> None:
    assert "Where the model looks" in run["report"]
    assert "--agreement" in run["report"]  # tolerated: the file is absent after training
    assert (run["run"] / "plots" / "sample_predictions.png").stat().st_size > 1000


def test_report_grid_overlays_come_from_the_test_fold_models(run: dict) -> None:
    from breastcad.report import _case_overlays

    folds = json.loads((run["run"] / "folds.json").read_text())
    test_fold = np.array(folds["repeats"][0]["test_fold"])
    from breastcad.data.sources import load_source

    by_path = {s.path: s for s in load_source(run["data"]).samples}

    class DS:  # the two things _case_overlays reads
        samples = [by_path[s["path"]] for s in folds["samples"]]

    stack = np.stack([np.asarray(Image.open(s["path"]).resize((32, 32))) for s in folds["samples"]])
    cases = [(0, True), (len(stack) - 1, False)]
    overlays, masks, note = _case_overlays(run["run"], DS, cases, stack, test_fold)
    assert note == "" and len(overlays) == 2
    assert overlays[0].shape == (32, 32, 3) and masks[0].shape == (32, 32) and masks[0].any()
    missing, _, why = _case_overlays(run["tmp"] / "nowhere", DS, cases, stack, test_fold)
    assert missing is None and "unavailable" in why


def test_explain_writes_one_overlay_per_input_and_skips_a_corrupt_one(
    run: dict, capsys: pytest.CaptureFixture
) -> None:
    tmp = run["tmp"]
    square = np.asarray(Image.open(run["data"] / "benign" / "benign (1).png"))
    wide = np.clip(np.random.default_rng(0).normal(128, 30, (30, 52)), 0, 255).astype(np.uint8)
    Image.fromarray(square).save(tmp / "a.png")
    Image.fromarray(wide).save(tmp / "b.png")
    (tmp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    out = tmp / "overlays"
    rc, stdout, stderr = cli(
        capsys, "explain", str(run["run"]), str(tmp / "a.png"), str(tmp / "corrupt.png"),
        str(tmp / "b.png"), "--out", str(out),
    )  # fmt: skip
    assert rc == 0, stderr
    err = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("skipped ") and "corrupt.png: " in err[0]
    rows = list(csv.DictReader((out / "explain.csv").open()))
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.png"]
    assert sorted(p.name for p in out.glob("*.png")) == ["a_gradcam.png", "b_gradcam.png"]
    threshold = json.loads((run["run"] / "metrics.json").read_text())["operating_point"][
        "threshold"
    ]
    for r, src in zip(rows, (square, wide), strict=True):
        assert (int(r["height"]), int(r["width"])) == src.shape  # the overlay has the input's size
        assert r["decision"] == ("malignant" if float(r["prob"]) >= threshold else "benign")
        png = np.asarray(Image.open(out / r["overlay"]).convert("RGB"))
        h, w = src.shape
        band = png.shape[0] - h
        assert band > 20 and png.shape[1] >= 2 * w
        # the left panel is the input itself, pixel for pixel
        np.testing.assert_array_equal(png[band:, :w, 0], src)
    assert "2 overlay(s) written" in stdout and "1 skipped" in stdout


def test_explain_with_only_bad_inputs_fails_cleanly(
    run: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "x.png").write_bytes(b"nope")
    rc, _, err = cli(capsys, "explain", str(run["run"]), str(tmp_path / "x.png"), "--out",
                     str(tmp_path))  # fmt: skip
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: no readable image")
    rc, _, err = cli(capsys, "explain", str(run["run"]), str(tmp_path / "x.png"))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--out" in err
    rc, _, err = cli(capsys, "explain", str(tmp_path), str(tmp_path / "x.png"), "--out", "o")
    assert rc == 2 and "not a finished run folder" in err


def test_agreement_on_the_test_folds_is_written_and_shown_in_the_report(
    run: dict, capsys: pytest.CaptureFixture
) -> None:
    rc, stdout, stderr = cli(capsys, "explain", str(run["run"]), "--agreement")
    assert rc == 0, stderr
    assert "pointing game" in stdout and "8x8 grid" in stdout  # last ReLU of 3 blocks, 32 px
    doc = json.loads((run["run"] / "lesion_agreement.json").read_text())
    assert doc["schema_version"] == 1
    assert doc["n_images"] == 16 and len(doc["per_image"]) == 16  # every test image has a mask
    folds = json.loads((run["run"] / "folds.json").read_text())
    fold_of = {s["path"]: f for s, f in zip(folds["samples"], folds["repeats"][0]["test_fold"],
                                             strict=True)}  # fmt: skip
    assert all(r["fold"] == fold_of[r["path"]] for r in doc["per_image"])  # test-fold model
    for key in ("pointing_game", "energy_in_lesion", "iou_top20", "iou_otsu"):
        m = doc["metrics"][key]
        assert m["n"] == 16 and m["low"] <= m["value"] <= m["high"]
    assert doc["heatmap_grid"] == [8, 8] and "8x8" in doc["resolution_note"]
    assert set(doc["by_class"]) == {"benign", "malignant"}
    html = (run["run"] / "report.html").read_text()
    assert (
        "Heatmap resolution" in html and format_ci(doc["metrics"]["pointing_game"], 3)[:5] in html
    )
    assert read_agreement(run["run"])["n_images"] == 16
    assert compare_cells(doc)["heatmap grid"] == "8x8 @ 32 px"
    # a subset, through the Python API
    sub = explain_run(run["run"], max_images=5)
    assert sub["n_images"] == 5 and sub["max_images"] == 5


def test_read_agreement_tolerates_absent_and_broken_files(tmp_path: Path) -> None:
    assert read_agreement(tmp_path) is None
    (tmp_path / "lesion_agreement.json").write_text("{not json")
    assert read_agreement(tmp_path) is None
    assert compare_cells(None)["pointing game"] == "n/a"


def test_sample_grid_draws_overlays_beside_the_images(tmp_path: Path) -> None:
    images = [np.full((20, 20), 0.5) for _ in range(3)]
    blue = np.zeros((20, 20, 3), dtype=np.uint8)
    blue[..., 2] = 255
    masks = [np.pad(np.ones((6, 6), bool), 7), None, np.zeros((20, 20), bool)]
    out = plots.plot_sample_grid(
        images, ["a", "b", "c"], [True, False, True], tmp_path / "g.png",
        overlays=[blue] * 3, masks=masks,
    )  # fmt: skip
    rgb = np.asarray(Image.open(out).convert("RGB")).astype(int)
    pure_blue = (rgb[..., 2] > 200) & (rgb[..., 0] < 60) & (rgb[..., 1] < 60)
    assert pure_blue.sum() > 3 * 400  # each overlay is shown
    with pytest.raises(ValueError, match="overlays"):
        plots.plot_sample_grid(images, ["a"] * 3, [True] * 3, tmp_path / "x.png", overlays=[blue])


def test_explain_help_shows_examples(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--agreement" in out and "breastcad explain runs/demo" in out
