"""Convert public mammography datasets' own label files to a breastcad CSV manifest.

``breastcad import FORMAT LABEL_FILE... --out manifest.csv`` (see
docs/mammograms.md). Every importer returns an :class:`ImportResult`: one
row per image (``path``, ``label``, ``patient_id``, ``mask`` plus
informational columns that ``load_manifest`` ignores), the rows it had to
skip with the reason (a bad row never loses the others), and the images it
could not find (kept, so the audit lists them).

* **mini-MIAS** ``Info.txt``: ``REF TISSUE CLASS [SEVERITY X Y RADIUS]`` per
  finding, several lines per image possible, ``NORM`` = normal, ``B``/``M`` =
  benign/malignant (an image with any malignant finding is malignant). The
  coordinates have their origin at the *bottom-left*; they are converted to
  top-left and written as circular lesion masks. Consecutive images
  (mdb001/mdb002, mdb003/mdb004, ...) are the left and right breast of one
  woman and share a ``patient_id``.
* **CBIS-DDSM** description CSVs (mass and calc, train and test): one row per
  abnormality; ``MALIGNANT`` = malignant, ``BENIGN`` and
  ``BENIGN_WITHOUT_CALLBACK`` = benign; rows are merged per image (any
  malignant finding makes the image malignant); ``patient_id`` is the group.
  The CSV's file paths use DICOM UIDs that the TCIA download does not; when a
  path does not exist, the image is looked up by its case folder
  (``Mass-Training_P_00001_LEFT_CC``).
* **INbreast** table (``INbreast.xls`` exported to CSV, or read directly
  when ``xlrd``/``openpyxl`` is installed): BI-RADS 1 = normal, 2 and 3 =
  benign, 4a/4b/4c, 5 and 6 = malignant (an assessment, not pathology; see
  docs/mammograms.md). The patient is the second part of the DICOM file name
  (``22678622_6c613a14b80a8591_MG_R_CC_ANON.dcm``).
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from breastcad.data.records import BadFile
from breastcad.errors import DataError
from breastcad.io import atomic_write_bytes, atomic_write_csv

FORMATS = ("mias", "cbis-ddsm", "inbreast")
BASE_COLUMNS = ["path", "label", "patient_id", "mask"]


@dataclass
class ManifestRow:
    path: str
    label: str
    patient_id: str = ""
    masks: list[str] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class ImportResult:
    dataset: str
    rows: list[ManifestRow]
    bad: list[BadFile] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    masks_written: int = 0

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.label] = counts.get(r.label, 0) + 1
        per = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        patients = len({r.patient_id for r in self.rows if r.patient_id})
        with_masks = sum(1 for r in self.rows if r.masks)
        return (
            f"{self.dataset}: {len(self.rows)} images ({per}) of {patients} patients, "
            f"{with_masks} with lesion masks; {len(self.bad)} row(s) skipped, "
            f"{len(self.missing)} image(s) not found"
        )


# ------------------------------------------------------------------------- helpers


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a label file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    for enc in ("utf-8-sig", "latin-1"):
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    raise DataError(f"{path}: not a text file")  # pragma: no cover (latin-1 decodes anything)


def _field(col: dict[str, int], cells: list[str], name: str) -> str:
    """The cell of column ``name`` (normalised header) in a row, or '' when absent."""
    i = col.get(name)
    return _cell(cells[i]) if i is not None and i < len(cells) else ""


def _norm_header(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header (normalised) and (line number, cells) rows of a CSV with , ; or tab."""
    text = _read_text(path)
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    delim = max(",;\t", key=first.count) if first else ","
    try:
        reader = csv.reader(io.StringIO(text), delimiter=delim)
        rows = [(reader.line_num, [c.strip() for c in row]) for row in reader]
    except csv.Error as err:
        raise DataError(f"{path}: cannot parse as CSV ({err})") from None
    rows = [(n, r) for n, r in rows if any(r)]
    if not rows:
        raise DataError(f"{path}: empty table")
    header = [_norm_header(h) for h in rows[0][1]]
    return header, rows[1:]


def _where(path: str, base: Path) -> str:
    """The path as written in a manifest at ``base``: relative when inside it."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(base.resolve()))
    except ValueError:
        return str(p)


def write_manifest(result: ImportResult, out: str | os.PathLike[str]) -> Path:
    """The CSV manifest: ``path,label,patient_id,mask`` then the informational columns."""
    out = Path(out)
    base = out.resolve().parent
    extra: list[str] = []
    for r in result.rows:
        extra += [k for k in r.extra if k not in extra]
    rows = [
        [
            _where(r.path, base),
            r.label,
            r.patient_id,
            ";".join(_where(m, base) for m in r.masks),
            *(r.extra.get(k, "") for k in extra),
        ]
        for r in result.rows
    ]
    return atomic_write_csv(out, BASE_COLUMNS + extra, rows)


def _index_files(root: Path, want: Iterable[str] = (".dcm",)) -> list[Path]:
    suffixes = tuple(want)
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(suffixes)]
    return out


def _write_mask_png(path: Path, mask: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG", optimize=True)
    atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------- mini-MIAS

MIAS_CLASSES = {"CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM", "NORM"}
_MIAS_REF = re.compile(r"^mdb(\d{3})$", re.IGNORECASE)
MIAS_SIZE = 1024  # every mini-MIAS image is 1024 x 1024


def _mias_image(images: Path, ref: str) -> Path | None:
    for suffix in (".pgm", ".png", ".tif", ".tiff", ".bmp", ".jpg"):
        for name in (ref + suffix, ref.upper() + suffix.upper()):
            if (images / name).is_file():
                return images / name
    return None


def _image_shape(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:  # the audit reports unreadable images; here the default size is used
        return None


def import_mias(
    info_txt: str | os.PathLike[str],
    images_dir: str | os.PathLike[str] | None = None,
    masks_dir: str | os.PathLike[str] | None = None,
) -> ImportResult:
    """mini-MIAS ``Info.txt`` -> rows; lesion circles written as PNG masks into ``masks_dir``."""
    info = Path(info_txt)
    images = Path(images_dir) if images_dir else info.parent
    result = ImportResult("mini-MIAS", [])
    findings: dict[str, list[tuple[str, str, str, tuple[float, float, float] | None]]] = {}
    for lineno, line in enumerate(_read_text(info).splitlines(), 1):
        tokens = line.split()
        if not tokens or not _MIAS_REF.match(tokens[0]):
            continue  # the file's description lines, blank lines
        where = f"{info}:{lineno}"
        ref = tokens[0].lower()
        if len(tokens) < 3:
            result.bad.append(BadFile(where, f"{ref}: expected tissue and class"))
            continue
        tissue, cls = tokens[1].upper(), tokens[2].upper()
        if cls not in MIAS_CLASSES:
            result.bad.append(BadFile(where, f"{ref}: unknown abnormality class {tokens[2]!r}"))
            continue
        if cls == "NORM":
            findings.setdefault(ref, []).append((tissue, cls, "normal", None))
            continue
        sev = tokens[3].upper() if len(tokens) > 3 else ""
        if sev not in ("B", "M"):
            result.bad.append(BadFile(where, f"{ref}: severity must be B or M, got {sev!r}"))
            continue
        xyr = None
        if len(tokens) >= 7:
            try:
                xyr = (float(tokens[4]), float(tokens[5]), float(tokens[6]))
            except ValueError:
                xyr = None  # e.g. "*NOTE 3*": a finding without coordinates
            if xyr is not None and (min(xyr) < 0 or xyr[2] <= 0):
                result.bad.append(BadFile(where, f"{ref}: invalid coordinates {tokens[4:7]}"))
                continue
        label = "malignant" if sev == "M" else "benign"
        findings.setdefault(ref, []).append((tissue, cls, label, xyr))
    if not findings:
        raise DataError(f"{info}: no mini-MIAS rows (lines like 'mdb001 G CIRC B 535 425 197')")
    mdir = Path(masks_dir) if masks_dir else None
    rank = {"normal": 0, "benign": 1, "malignant": 2}
    for ref, items in sorted(findings.items()):
        labels = {lab for _, _, lab, _ in items}
        if "normal" in labels and len(labels) > 1:
            result.bad.append(BadFile(f"{info}:{ref}", "listed both as normal and with a finding"))
            continue
        label = max(labels, key=rank.__getitem__)
        img = _mias_image(images, ref)
        if img is None:
            result.missing.append(str(images / f"{ref}.pgm"))
        n = int(ref[3:])
        row = ManifestRow(
            path=str(img or images / f"{ref}.pgm"),
            label=label,
            patient_id=f"mias-{(n + 1) // 2:03d}",
            extra={
                "tissue": items[0][0],
                "abnormality": ";".join(sorted({c for _, c, _, _ in items})),
                "roi": ";".join(
                    f"{x:g} {y:g} {r:g}" for _, _, _, xyr in items if xyr for x, y, r in [xyr]
                ),
            },
        )
        circles = [xyr for _, _, _, xyr in items if xyr]
        if circles and mdir is not None:
            h, w = _image_shape(img) or (MIAS_SIZE, MIAS_SIZE)
            yy, xx = np.ogrid[0:h, 0:w]
            mask = np.zeros((h, w), dtype=bool)
            for x, y, r in circles:
                mask |= (xx - x) ** 2 + (yy - (h - 1 - y)) ** 2 <= r * r  # bottom-left origin
            mpath = mdir / f"{ref}_mask.png"
            _write_mask_png(mpath, mask)
            result.masks_written += 1
            row.masks = [str(mpath)]
        result.rows.append(row)
    return result


# ------------------------------------------------------------------------- CBIS-DDSM

_CBIS_PATHOLOGY = {
    "MALIGNANT": "malignant",
    "BENIGN": "benign",
    "BENIGN_WITHOUT_CALLBACK": "benign",
}


class _CaseFolders:
    """CBIS-DDSM case folders (``Mass-Training_P_00001_LEFT_CC``) under a download root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: dict[str, Path] | None = None

    def find(self, name: str) -> Path | None:
        if self._dirs is None:
            self._dirs = {}
            if self.root.is_dir():
                for dirpath, dirnames, _ in os.walk(self.root):
                    for d in dirnames:
                        self._dirs.setdefault(d, Path(dirpath) / d)
        return self._dirs.get(name)


def _dicom_area(path: Path) -> int:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        return int(ds.get("Rows", 0)) * int(ds.get("Columns", 0))
    except Exception:
        return 0


def _cbis_resolve(raw: str, root: Path, cases: _CaseFolders, largest: bool) -> Path | None:
    rel = raw.strip().replace("\\", "/").strip("/")
    if not rel:
        return None
    direct = root / rel
    if direct.is_file():
        return direct
    folder = cases.find(rel.split("/")[0])
    if folder is None:
        return None
    files = _index_files(folder)
    if len(files) == 1:
        return files[0]
    if len(files) > 1 and largest:  # ROI folders hold the crop and the mask: the mask is larger
        return max(files, key=_dicom_area)
    return None


def import_cbis_ddsm(
    csv_paths: Sequence[str | os.PathLike[str]], images_dir: str | os.PathLike[str] | None = None
) -> ImportResult:
    """CBIS-DDSM description CSVs (any of mass/calc, train/test) -> one row per image."""
    result = ImportResult("CBIS-DDSM", [])
    by_image: dict[str, ManifestRow] = {}
    required = ("patientid", "pathology", "imagefilepath")
    for csv_path in map(Path, csv_paths):
        root = Path(images_dir) if images_dir else csv_path.parent
        cases = _CaseFolders(root)
        header, rows = _read_table(csv_path)
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(
                f"{csv_path}: not a CBIS-DDSM description CSV (no column "
                f"{', '.join(missing)}); found {', '.join(header) or 'no header'}"
            )
        col = {name: i for i, name in reversed(list(enumerate(header)))}
        split = "test" if "test" in csv_path.name.lower() else "train"
        for lineno, cells in rows:
            where = f"{csv_path}:{lineno}"
            get = partial(_field, col, cells)

            patient, pathology, image = get("patientid"), get("pathology"), get("imagefilepath")
            if not patient or not image:
                result.bad.append(BadFile(where, "row has no patient_id or image file path"))
                continue
            label = _CBIS_PATHOLOGY.get(pathology.upper())
            if label is None:
                result.bad.append(BadFile(where, f"unknown pathology {pathology!r}"))
                continue
            key = image.replace("\\", "/").strip("/").split("/")[0]
            row = by_image.get(key)
            if row is None:
                found = _cbis_resolve(image, root, cases, largest=False)
                if found is None:
                    result.missing.append(str(root / image))
                row = ManifestRow(
                    path=str(found or root / image),
                    label=label,
                    patient_id=patient,
                    extra={
                        "laterality": get("leftorrightbreast")[:1].upper(),
                        "view": get("imageview").upper(),
                        "abnormality": "",
                        "split": split,
                    },
                )
                by_image[key] = row
                result.rows.append(row)
            elif row.patient_id != patient:
                result.bad.append(
                    BadFile(where, f"image {key} listed for patients {row.patient_id}, {patient}")
                )
                continue
            if label == "malignant":
                row.label = "malignant"
            kind = get("abnormalitytype").lower()
            kinds = set(filter(None, row.extra["abnormality"].split(";") + [kind]))
            row.extra["abnormality"] = ";".join(sorted(kinds))
            roi = get("roimaskfilepath")
            if roi:
                mask = _cbis_resolve(roi, root, cases, largest=True)
                if mask is not None and str(mask) not in row.masks:
                    row.masks.append(str(mask))
    if not result.rows:
        raise DataError(f"{', '.join(map(str, csv_paths))}: no usable CBIS-DDSM rows")
    return result


# ------------------------------------------------------------------------- INbreast

# BI-RADS is the radiologist's assessment, not pathology: 1 negative, 2 benign,
# 3 probably benign (< 2% malignant), 4 suspicious (biopsy), 5 highly
# suggestive of malignancy, 6 biopsy-proven malignant.
INBREAST_BIRADS = {
    "1": "normal",
    "2": "benign",
    "3": "benign",
    "4": "malignant",
    "4a": "malignant",
    "4b": "malignant",
    "4c": "malignant",
    "5": "malignant",
    "6": "malignant",
}
_INBREAST_DICOM = re.compile(r"^(\d+)_([0-9a-z]+)_MG_([LR])_([A-Z]+)_ANON\.dcm$", re.IGNORECASE)


def _cell(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value).strip()


def _read_spreadsheet(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The first sheet of an .xls/.xlsx, when a reader is installed; else a one-line error."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".xls":
            import xlrd  # type: ignore[import-not-found]

            sheet = xlrd.open_workbook(str(path)).sheet_by_index(0)
            table = [sheet.row_values(i) for i in range(sheet.nrows)]
        else:
            import openpyxl  # type: ignore[import-not-found]

            wb = openpyxl.load_workbook(str(path), read_only=True, data_only=True)
            table = [list(r) for r in wb.worksheets[0].iter_rows(values_only=True)]
    except ImportError:
        need = "xlrd" if suffix == ".xls" else "openpyxl"
        raise DataError(
            f"{path}: reading {suffix} needs the {need} package; save the sheet as CSV "
            f"(INbreast.csv) or pip install {need}"
        ) from None
    except Exception as err:
        raise DataError(f"{path}: cannot read spreadsheet ({' '.join(str(err).split())})") from None
    rows = [(i + 1, [_cell(c) for c in r]) for i, r in enumerate(table) if any(_cell(c) for c in r)]
    if not rows:
        raise DataError(f"{path}: empty sheet")
    return [_norm_header(h) for h in rows[0][1]], rows[1:]


def import_inbreast(
    table_path: str | os.PathLike[str], images_dir: str | os.PathLike[str] | None = None
) -> ImportResult:
    """INbreast's table (CSV export of INbreast.xls, or the .xls/.xlsx itself) -> rows."""
    table = Path(table_path)
    if table.suffix.lower() in (".xls", ".xlsx"):
        header, rows = _read_spreadsheet(table)
    else:
        header, rows = _read_table(table)
    missing_cols = [c for c in ("filename", "birads") if c not in header]
    if missing_cols:
        raise DataError(
            f"{table}: not the INbreast table (no column {', '.join(missing_cols)}); "
            f"found {', '.join(header) or 'no header'}"
        )
    col = {name: i for i, name in reversed(list(enumerate(header)))}
    root = Path(images_dir) if images_dir else table.parent
    dicoms: dict[str, tuple[Path, str]] = {}
    for f in _index_files(root) if root.is_dir() else []:
        m = _INBREAST_DICOM.match(f.name)
        if m:
            dicoms.setdefault(m.group(1), (f, m.group(2)))
    result = ImportResult("INbreast", [])
    seen: set[str] = set()
    for lineno, cells in rows:
        where = f"{table}:{lineno}"
        get = partial(_field, col, cells)

        fname, birads = get("filename"), get("birads").lower().replace(" ", "")
        if not fname:
            continue  # the sheet's trailing notes and totals
        if not fname.isdigit():
            result.bad.append(BadFile(where, f"file name {fname!r} is not a number"))
            continue
        label = INBREAST_BIRADS.get(birads)
        if label is None:
            result.bad.append(
                BadFile(where, f"{fname}: BI-RADS {birads or '(empty)'} has no label")
            )
            continue
        if fname in seen:
            result.bad.append(BadFile(where, f"{fname}: listed twice"))
            continue
        seen.add(fname)
        hit = dicoms.get(fname)
        patient = get("patientid")
        if patient.lower() in ("removed", "", "-"):
            patient = hit[1] if hit else ""
        if hit is None:
            result.missing.append(str(root / f"{fname}.dcm"))
        result.rows.append(
            ManifestRow(
                path=str(hit[0] if hit else root / f"{fname}.dcm"),
                label=label,
                patient_id=patient,
                extra={
                    "laterality": get("laterality").upper(),
                    "view": get("view").upper(),
                    "birads": birads,
                    "acr": get("acr"),
                },
            )
        )
    if not result.rows:
        raise DataError(f"{table}: no usable INbreast rows")
    return result


def run_import(
    fmt: str,
    files: Sequence[str],
    images_dir: str | None = None,
    masks_dir: str | None = None,
) -> ImportResult:
    if fmt == "mias":
        if len(files) != 1:
            raise DataError("mias: give exactly one Info.txt")
        return import_mias(files[0], images_dir, masks_dir)
    if fmt == "cbis-ddsm":
        return import_cbis_ddsm(files, images_dir)
    if fmt == "inbreast":
        if len(files) != 1:
            raise DataError("inbreast: give exactly one table (INbreast.csv or INbreast.xls)")
        return import_inbreast(files[0], images_dir)
    raise DataError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
