"""Data sources: class folders (incl. the BUSI layout) and CSV manifests.

Each source returns the same :class:`SourceResult`: the image records, the
files it had to skip (with the reason), and masks that belong to no image.
Decoding problems are found later by the audit, which reads every image.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from breastcad.data.imageio import is_image_name
from breastcad.data.records import BadFile, Sample
from breastcad.errors import DataError

# BUSI names lesion masks "X_mask.png", "X_mask_1.png", ... for image "X.png".
MASK_RE = re.compile(r"^(?P<stem>.+)_mask(?:_\d+)?$", re.IGNORECASE)


@dataclass
class SourceResult:
    kind: str
    root: str
    samples: list[Sample]
    bad: list[BadFile] = field(default_factory=list)
    orphan_masks: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def bundled_busi_path() -> Path:
    """The compact BUSI copy that ships inside the package."""
    return Path(__file__).resolve().parent / "bundled" / "busi"


def load_source(data: str | os.PathLike[str] | None) -> SourceResult:
    """Find the samples in ``data`` (a folder or a CSV manifest; None = bundled BUSI)."""
    root = bundled_busi_path() if data is None else Path(data)
    if not os.path.lexists(root):
        raise DataError(f"{root}: no such file or folder")
    if root.is_file() and root.suffix.lower() == ".csv":
        return load_manifest(root)
    if root.is_dir():
        return load_class_folders(root)
    raise DataError(f"{root}: not a folder of class folders or a .csv manifest")


def _descend_wrappers(root: Path) -> Path:
    """BUSI unzips as busi/Dataset_BUSI_with_GT/<class>/: skip folders that only wrap one folder.

    A folder wraps when it holds exactly one sub-folder and no images (a README
    beside it is fine), and that sub-folder itself holds folders but no images;
    a single class folder full of images is never mistaken for a wrapper.
    """
    for _ in range(3):
        entries = [e for e in _listdir(root) if not e.name.startswith(".")]
        dirs = [e for e in entries if e.is_dir(follow_symlinks=False)]
        if len(dirs) != 1 or any(is_image_name(e.name) for e in entries):
            break
        inner = [e for e in _listdir(Path(dirs[0].path)) if not e.name.startswith(".")]
        if any(is_image_name(e.name) for e in inner) or not any(
            e.is_dir(follow_symlinks=False) for e in inner
        ):
            break
        root = Path(dirs[0].path)
    return root


def _listdir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as err:
        raise DataError(f"{path}: cannot list folder ({err.strerror or err})") from None


def _walk_images(folder: Path, bad: list[BadFile]) -> tuple[list[str], list[str]]:
    """All image-named entries under ``folder`` (sorted) and the non-image files.

    Entries named like images are returned whatever they are (a directory, a
    FIFO, a broken link), so the audit reports them instead of losing them.
    Symlinked folders are not followed, which makes link loops harmless. A
    folder that cannot be listed is added to ``bad``; its siblings are kept.
    """
    images: list[str] = []
    others: list[str] = []
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as err:
        bad.append(BadFile(str(folder), f"cannot list folder ({err.strerror or err})"))
        return images, others
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if is_image_name(entry.name):
            images.append(entry.path)
        elif entry.is_dir(follow_symlinks=False):
            sub_images, sub_others = _walk_images(Path(entry.path), bad)
            images += sub_images
            others += sub_others
        else:
            others.append(entry.path)
    return images, others


def _split_masks(paths: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Separate images from masks; masks keyed by the image *stem* they belong to.

    Keyed by folder + stem without suffix, so ``X_mask.png`` belongs to
    ``X.png`` and also to ``X.jpg`` (the bundled copy stores images as JPEG
    and masks as lossless PNG).
    """
    images: list[str] = []
    masks: dict[str, list[str]] = {}
    for p in paths:
        stem = os.path.splitext(p)[0]
        m = MASK_RE.match(os.path.basename(stem))
        if m:
            owner = os.path.join(os.path.dirname(p), m.group("stem"))
            masks.setdefault(owner, []).append(p)
        else:
            images.append(p)
    return images, masks


def load_class_folders(root: Path) -> SourceResult:
    """One sub-folder per class; BUSI-style ``X_mask*.png`` files become masks of ``X.png``."""
    root = _descend_wrappers(root)
    class_dirs = [
        e for e in _listdir(root) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
    ]
    if not class_dirs:
        raise DataError(f"{root}: no class folders found (expected one sub-folder per class)")
    result = SourceResult(kind="class-folders", root=str(root), samples=[])
    n_masks = 0
    for cdir in class_dirs:
        label = cdir.name.lower()
        paths, others = _walk_images(Path(cdir.path), result.bad)
        result.ignored += others
        images, masks = _split_masks(paths)
        n_masks += sum(len(v) for v in masks.values())
        image_stems = {os.path.splitext(p)[0] for p in images}
        for owner, mps in masks.items():
            if owner not in image_stems:
                result.orphan_masks += mps
        result.samples += [
            Sample(p, label, None, tuple(sorted(masks.get(os.path.splitext(p)[0], []))))
            for p in images
        ]
        if masks:
            result.kind = "busi-folders"
    if not result.samples:
        what = "only mask files" if n_masks else "no image files"
        raise DataError(f"{root}: found {what} in its class folders; nothing to classify")
    return result


_GROUP_COLUMNS = ("group", "patient_id")


def load_manifest(csv_path: Path) -> SourceResult:
    """CSV with ``path,label`` and optional ``group``/``patient_id`` and ``mask`` columns.

    Relative paths resolve against the CSV's folder; ``mask`` may list several
    files separated by ``;``. Rows missing a path or a label are reported, not fatal.
    """
    base = csv_path.resolve().parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{csv_path}: cannot read CSV manifest ({err})") from None
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise DataError(
            f"{csv_path}: manifest lacks column(s) {', '.join(missing)}; "
            f"found {', '.join(header) or 'no header'}"
        )
    result = SourceResult(kind="csv-manifest", root=str(csv_path), samples=[])
    group_col = next((c for c in _GROUP_COLUMNS if c in header), None)

    def resolve(p: str) -> str:
        return str(Path(p) if os.path.isabs(p) else base / p)

    for lineno, raw in rows:
        extra = raw.pop(None, None)  # DictReader's list of fields beyond the header
        if extra and any((x or "").strip() for x in extra):
            result.bad.append(
                BadFile(f"{csv_path}:{lineno}", "row has more fields than the header")
            )
            continue
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in raw.items()}
        path, label = row.get("path", ""), row.get("label", "")
        if not path or not label:
            what = "path" if not path else "label"
            result.bad.append(BadFile(f"{csv_path}:{lineno}", f"row has no {what}"))
            continue
        group = row.get(group_col, "") if group_col else ""
        masks = tuple(resolve(m.strip()) for m in row.get("mask", "").split(";") if m.strip())
        result.samples.append(Sample(resolve(path), label.lower(), group or None, masks))
    if not result.samples:
        raise DataError(f"{csv_path}: manifest lists no usable rows")
    return result
