"""Importers of the public mammography datasets' label files, on small synthetic copies."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastcad.data.importers import (
    import_cbis_ddsm,
    import_inbreast,
    import_mias,
    run_import,
    write_manifest,
)
from breastcad.data.sources import load_manifest
from breastcad.errors import DataError

MIAS_INFO = """\
MIAS database: description of the Info.txt columns (first lines are free text)
1st column: MIAS database reference number.

mdb001 G CIRC B 535 425 197
mdb002 G CIRC B 522 280 69
mdb003 D NORM
mdb004 D NORM
mdb005 F CIRC B 477 133 30
mdb005 F CIRC B 500 168 26
mdb006 F NORM
mdb007 G NORM
mdb008 G XXXX B 1 2 3
mdb009 F SPIC M 40 30 8
mdb010 F CALC M
mdb010 F CALC B 60 60 5
mdb011 F CIRC Q 1 2 3
mdb012 F NORM
"""


def _mias(tmp_path: Path, size: int = 100) -> Path:
    root = tmp_path / "mias"
    root.mkdir()
    (root / "Info.txt").write_text(MIAS_INFO)
    for n in range(1, 13):
        if n != 12:  # mdb012 is missing on disk
            Image.fromarray(np.full((size, size), 80, np.uint8)).save(root / f"mdb{n:03d}.pgm")
    return root / "Info.txt"


def test_mias_rows_labels_groups_and_bad_lines(tmp_path: Path) -> None:
    info = _mias(tmp_path)
    res = import_mias(info, masks_dir=tmp_path / "masks")
    rows = {Path(r.path).stem: r for r in res.rows}
    assert sorted(rows) == [f"mdb{n:03d}" for n in (1, 2, 3, 4, 5, 6, 7, 9, 10, 12)]
    assert rows["mdb001"].label == "benign" and rows["mdb003"].label == "normal"
    assert rows["mdb009"].label == "malignant"
    assert rows["mdb010"].label == "malignant"  # any malignant finding makes the image malignant
    # consecutive images are one woman's left and right breast: one group
    assert rows["mdb001"].patient_id == rows["mdb002"].patient_id != rows["mdb003"].patient_id
    assert rows["mdb005"].patient_id == rows["mdb006"].patient_id
    assert rows["mdb009"].patient_id == rows["mdb010"].patient_id
    # two findings on one image: one row, both circles
    assert rows["mdb005"].extra["roi"] == "477 133 30;500 168 26"
    problems = " | ".join(f"{b.path}: {b.problem}" for b in res.bad)
    assert len(res.bad) == 2, problems
    assert "Info.txt:12" in problems and "XXXX" in problems
    assert "Info.txt:16" in problems and "severity" in problems
    assert res.missing == [str(info.parent / "mdb012.pgm")]
    # no masks for normal images and for findings without coordinates only
    assert rows["mdb003"].masks == [] and rows["mdb010"].masks != []


def test_mias_masks_use_a_bottom_left_origin(tmp_path: Path) -> None:
    info = _mias(tmp_path, size=100)
    res = import_mias(info, masks_dir=tmp_path / "masks")
    row = next(
        r for r in res.rows if Path(r.path).stem == "mdb009"
    )  # x=40, y=30 (from bottom), r=8
    mask = np.asarray(Image.open(row.masks[0])) > 0
    assert mask.shape == (100, 100)
    ys, xs = np.nonzero(mask)
    assert xs.mean() == pytest.approx(40, abs=0.5)
    assert ys.mean() == pytest.approx(99 - 30, abs=0.5)  # row 69 from the top, not 30
    assert mask.sum() == pytest.approx(np.pi * 64, rel=0.1)


def test_mias_without_rows_is_a_clean_error(tmp_path: Path, assert_clean_error) -> None:
    bad = tmp_path / "Info.txt"
    bad.write_text("just some text\nno rows here\n")
    with pytest.raises(DataError) as err:
        import_mias(bad)
    assert_clean_error(err.value, bad, "no mini-MIAS rows")
    with pytest.raises(DataError) as err:
        import_mias(tmp_path / "absent.txt")
    assert_clean_error(err.value, tmp_path / "absent.txt", "no such file")


# --------------------------------------------------------------------------- CBIS-DDSM

MASS_HEADER = (
    "patient_id,breast_density,left or right breast,image view,abnormality id,"
    "abnormality type,mass shape,mass margins,assessment,pathology,subtlety,"
    "image file path,cropped image file path,ROI mask file path\n"
)
CALC_HEADER = (
    "patient_id,breast density,left or right breast,image view,abnormality id,"
    "abnormality type,calc type,calc distribution,assessment,pathology,subtlety,"
    "image file path,cropped image file path,ROI mask file path\n"
)
UID = "1.3.6.1.4.1.9590.100.1.2.1/1.3.6.1.4.1.9590.100.1.2.2"


def _cbis_row(pid: str, side: str, view: str, aid: int, kind: str, path: str, pathology: str):
    case = f"{path}_{pid}_{side}_{view}"
    return (
        f"{pid},2,{side},{view},{aid},{kind},OVAL,CIRCUMSCRIBED,4,{pathology},3,"
        f"{case}/{UID}/000000.dcm,{case}_{aid}/{UID}/000000.dcm,{case}_{aid}/{UID}/000001.dcm\n"
    )


def _cbis(tmp_path: Path, write_dicom) -> tuple[Path, Path, Path]:
    root = tmp_path / "cbis"
    mass = root / "mass_case_description_train_set.csv"
    calc = root / "calc_case_description_test_set.csv"
    root.mkdir()
    mass.write_text(
        MASS_HEADER
        + _cbis_row("P_00001", "LEFT", "CC", 1, "mass", "Mass-Training", "MALIGNANT")
        + _cbis_row("P_00001", "LEFT", "MLO", 1, "mass", "Mass-Training", "BENIGN")
        + _cbis_row("P_00001", "LEFT", "MLO", 2, "mass", "Mass-Training", "MALIGNANT")
        + _cbis_row("P_00004", "RIGHT", "CC", 1, "mass", "Mass-Training", "BENIGN_WITHOUT_CALLBACK")
        + _cbis_row("P_00005", "RIGHT", "CC", 1, "mass", "Mass-Training", "UNKNOWN")
    )
    calc.write_text(
        CALC_HEADER + _cbis_row("P_00038", "LEFT", "CC", 1, "calcification", "Calc-Test", "BENIGN")
    )
    # TCIA layout: the CSV's UID paths do not exist; case folders do, one DICOM each
    tcia = root / "CBIS-DDSM"
    pix = np.zeros((40, 30), np.uint16)
    for case in (
        "Mass-Training_P_00001_LEFT_CC",
        "Mass-Training_P_00001_LEFT_MLO",
        "Mass-Training_P_00004_RIGHT_CC",
    ):
        write_dicom(tcia / case / "07-20-2016-DDSM-1" / "1.000-full mammogram" / "1-1.dcm", pix)
    # an ROI folder with the cropped lesion (small) and the mask (full size)
    roi = tcia / "Mass-Training_P_00001_LEFT_CC_1" / "x" / "y"
    write_dicom(roi / "1-1.dcm", np.zeros((8, 6), np.uint16))
    mask = np.zeros((40, 30), np.uint16)
    mask[10:20, 5:15] = 255
    write_dicom(roi / "1-2.dcm", mask)
    return mass, calc, root


def test_cbis_ddsm_merges_findings_per_image_and_groups_by_patient(
    tmp_path: Path, write_dicom
) -> None:
    mass, calc, root = _cbis(tmp_path, write_dicom)
    res = import_cbis_ddsm([mass, calc], images_dir=root)
    rows = {Path(r.path).parts[-4] if r.path.endswith("1-1.dcm") else r.path: r for r in res.rows}
    assert len(res.rows) == 4  # CC, MLO (two findings merged), P_00004, P_00038
    cc = rows["Mass-Training_P_00001_LEFT_CC"]
    mlo = rows["Mass-Training_P_00001_LEFT_MLO"]
    assert cc.label == "malignant" and mlo.label == "malignant"  # benign + malignant finding
    assert cc.patient_id == mlo.patient_id == "P_00001"
    assert rows["Mass-Training_P_00004_RIGHT_CC"].label == "benign"  # BENIGN_WITHOUT_CALLBACK
    assert cc.extra == {
        "laterality": "L",
        "view": "CC",
        "abnormality": "mass",
        "split": "train",
    }
    # the ROI folder holds the crop and the mask: the (larger) mask is chosen
    assert len(cc.masks) == 1 and cc.masks[0].endswith("1-2.dcm")
    calc_row = next(r for r in res.rows if r.patient_id == "P_00038")
    assert calc_row.extra["split"] == "test" and calc_row.label == "benign"
    assert [b.problem for b in res.bad] == ["unknown pathology 'UNKNOWN'"]
    assert res.bad[0].path == f"{mass}:6"
    assert len(res.missing) == 1 and "Calc-Test_P_00038" in res.missing[0]


def test_cbis_ddsm_manifest_loads_with_masks(tmp_path: Path, write_dicom) -> None:
    from breastcad.data.imageio import read_mask

    mass, calc, root = _cbis(tmp_path, write_dicom)
    out = write_manifest(import_cbis_ddsm([mass], images_dir=root), tmp_path / "cbis.csv")
    src = load_manifest(out)
    assert [s.label for s in src.samples] == ["malignant", "malignant", "benign"]
    assert [s.group for s in src.samples] == ["P_00001", "P_00001", "P_00004"]
    with_mask = src.samples[0]
    mask = read_mask(with_mask.mask_paths, (40, 30))  # a DICOM mask
    assert mask.sum() == 100 and mask[10:20, 5:15].all()


def test_cbis_ddsm_wrong_csv_is_a_clean_error(tmp_path: Path, assert_clean_error) -> None:
    other = tmp_path / "other.csv"
    other.write_text("path,label\na.png,benign\n")
    with pytest.raises(DataError) as err:
        import_cbis_ddsm([other])
    assert_clean_error(err.value, other, "not a CBIS-DDSM description CSV", "pathology")


# --------------------------------------------------------------------------- INbreast

INBREAST_CSV = """\
Patient ID;Patient age;Laterality;View;Acquisition date;File Name;ACR;Bi-Rads
removed;removed;R;CC;201001;22678622;4;1
removed;removed;L;CC;201001;22678646;4;3
removed;removed;R;MLO;201001;22678694;4;4a
removed;removed;L;MLO;201001;22678787;4;5
removed;removed;R;CC;201001;20586908;2;6
removed;removed;L;CC;201001;20586934;2;0
removed;removed;L;CC;201001;abc;2;2
removed;removed;L;MLO;201001;24065530;2;2
;;;;;;;
Total;;;;;;;
"""


def test_inbreast_birads_mapping_and_patients_from_file_names(tmp_path: Path, write_dicom) -> None:
    root = tmp_path / "INbreast"
    (root / "AllDICOMs").mkdir(parents=True)
    table = root / "INbreast.csv"
    table.write_text(INBREAST_CSV)
    pix = np.zeros((20, 10), np.uint16)
    for name in (
        "22678622_6c613a14b80a8591_MG_R_CC_ANON.dcm",
        "22678646_6c613a14b80a8591_MG_L_CC_ANON.dcm",
        "22678694_6c613a14b80a8591_MG_R_ML_ANON.dcm",
        "22678787_6c613a14b80a8591_MG_L_ML_ANON.dcm",
        "20586908_6bd8d4e4ff2ef6a4_MG_R_CC_ANON.dcm",
    ):
        write_dicom(root / "AllDICOMs" / name, pix)
    res = import_inbreast(table, images_dir=root / "AllDICOMs")
    labels = {Path(r.path).name.split("_")[0].split(".")[0]: r.label for r in res.rows}
    assert labels == {
        "22678622": "normal",  # BI-RADS 1
        "22678646": "benign",  # 3
        "22678694": "malignant",  # 4a
        "22678787": "malignant",  # 5
        "20586908": "malignant",  # 6
        "24065530": "benign",  # 2, image not on disk
    }
    groups = {r.patient_id for r in res.rows if "22678" in r.path}
    assert groups == {"6c613a14b80a8591"}  # one woman's four views: one group
    assert next(r for r in res.rows if "20586908" in r.path).patient_id == "6bd8d4e4ff2ef6a4"
    assert res.missing == [str(root / "AllDICOMs" / "24065530.dcm")]
    problems = sorted(b.problem for b in res.bad)
    assert len(problems) == 2 and "BI-RADS 0 has no label" in problems[0]
    assert "'abc' is not a number" in problems[1]


def test_inbreast_xls_without_a_reader_says_what_to_do(tmp_path: Path, assert_clean_error) -> None:
    try:
        import xlrd  # noqa: F401

        pytest.skip("xlrd is installed: the .xls is read directly")
    except ImportError:
        pass
    xls = tmp_path / "INbreast.xls"
    xls.write_bytes(b"\xd0\xcf\x11\xe0not really")
    with pytest.raises(DataError) as err:
        import_inbreast(xls)
    assert_clean_error(err.value, xls, "xlrd", "CSV")


def test_manifest_round_trip_and_relative_paths(tmp_path: Path) -> None:
    info = _mias(tmp_path)
    out = tmp_path / "mias" / "manifest.csv"
    res = run_import("mias", [str(info)], None, str(tmp_path / "mias" / "masks"))
    write_manifest(res, out)
    with open(out, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["path", "label", "patient_id", "mask", "tissue", "abnormality", "roi"]
    assert table[0]["path"] == "mdb001.pgm" and table[0]["mask"] == "masks/mdb001_mask.png"
    src = load_manifest(out)
    assert len(src.samples) == len(res.rows) and not src.bad
    assert src.samples[0].path == str(info.parent / "mdb001.pgm")
    assert src.samples[0].group == "mias-001"
    with pytest.raises(DataError, match="exactly one"):
        run_import("mias", ["a", "b"])
    with pytest.raises(DataError, match="unknown format"):
        run_import("ddsm", ["a"])


def test_import_command_writes_and_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    from breastcad.cli import main

    info = _mias(tmp_path)
    out = tmp_path / "mias.csv"
    assert main(["import", "mias", str(info), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "mini-MIAS: 10 images (benign: 3, malignant: 2, normal: 5) of 6 patients" in captured.out
    assert "Info.txt:12: mdb008: unknown abnormality class" in captured.err
    assert "1 image(s) not found" in captured.err
    assert (tmp_path / "mias_masks" / "mdb001_mask.png").is_file()
    assert len(load_manifest(out).samples) == 10
    assert main(["import", "mias", str(info), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and str(out) in err[0]
    assert main(["import", "mias", str(info), "--out", str(out), "--force"]) == 0
