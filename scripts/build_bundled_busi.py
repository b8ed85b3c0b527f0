"""Rebuild the compact BUSI copy that ships inside breastcad.

Usage::

    python scripts/build_bundled_busi.py SRC_DIR OUT_DIR [--max-side N] [--format png|jpeg]

``SRC_DIR`` is a BUSI download (``Dataset_BUSI_with_GT``: folders ``benign/``,
``malignant/``, ``normal/`` holding ``benign (1).png`` and its masks
``benign (1)_mask.png``, ``benign (1)_mask_1.png``, ...). ``OUT_DIR`` receives
the same layout and the same file names:

- images become 8-bit grayscale (ITU-R 601 luminance, alpha ignored) and are
  downsized with Lanczos so that the longer side is at most ``--max-side``
  pixels, aspect ratio kept, never upscaled;
- every mask file is kept separately under its own name, binarised (any
  non-zero colour channel is lesion, as ``breastcad.data.imageio.read_mask``
  reads it), resized with NEAREST to exactly the downsized image's size and
  written as a 1-bit PNG;
- PNGs carry no metadata (no time, dpi, gamma or text chunks) and are written
  with ``optimize=True``, so a rebuild from the same source gives the same bytes.

``--format jpeg`` writes the images (never the masks) as JPEG (quality 90 or
more, no metadata) with a ``.jpg`` suffix instead of ``.png``; the rest of the
name is unchanged, so ``benign (1).jpg`` keeps its masks ``benign (1)_mask.png``.

Size of the whole output (780 images, 798 masks, README) measured on the
BUSI download; "du" is the disk usage with 4 KiB blocks::

    max side  format     total MB  du
    320       PNG         35.99    39M
    288       PNG         30.08    34M
    256       PNG         24.46    28M
    224       PNG         19.33    23M
    320       JPEG q90    17.02    21M
    288       JPEG q90    14.40    19M   <- shipped (PSNR vs PNG: median 41.9 dB)
    288       JPEG q95    19.63    24M
    256       JPEG q90    11.90    16M
    256       JPEG q95    16.25    20M

Ultrasound speckle makes lossless PNG expensive: within the 20 MB budget it
only reaches a 224 px side, and even that fills the budget, so the shipped copy
(the defaults below) uses JPEG quality 90 at a 288 px side.

A README.md describing the copy (provenance, citation, licence) is written
into ``OUT_DIR``. Existing BUSI-named files in ``OUT_DIR``'s class folders
are replaced; nothing else there is touched.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("benign", "malignant", "normal")
# "benign (12).png" and its masks "benign (12)_mask.png", "benign (12)_mask_1.png".
NAME_RE = re.compile(
    r"^(?P<cls>benign|malignant|normal) \((?P<num>\d+)\)(?P<mask>_mask(?:_\d+)?)?\.png$"
)
OUT_NAME_RE = re.compile(
    r"^(?:benign|malignant|normal) \(\d+\)(?:_mask(?:_\d+)?\.png|\.png|\.jpg)$"
)
JPEG_MIN_QUALITY = 90
# The settings of the shipped copy (see the size table in the module docstring).
DEFAULT_MAX_SIDE = 288
DEFAULT_FORMAT = "jpeg"
DEFAULT_QUALITY = 90

README_TEMPLATE = """\
# Bundled BUSI copy (compact)

This folder is a compact copy of the **Breast Ultrasound Images dataset
(BUSI)**. breastcad uses it when no `--data` is given, so that the tools,
examples and tests run out of the box.

## What this copy is

- Derived from the public BUSI download (`Dataset_BUSI_with_GT`), in the same
  folder layout (`benign/`, `malignant/`, `normal/`) and with the **file names
  unchanged** (`benign/benign (1){img_ext}`, `benign/benign (1)_mask.png`,
  `benign/benign (1)_mask_1.png`, ...){ext_note}.
- Images: converted to 8-bit **grayscale** (ITU-R 601 luminance; the 16 colour
  images of the original become gray) and **downsized** with Lanczos so that
  the longer side is at most **{max_side} px**, aspect ratio kept, never
  upscaled. Stored as {image_format_text}.
- Masks: **every mask file is kept** under its own name (images with two or
  three lesions keep `_mask_1.png`, `_mask_2.png`); binarised (any non-zero
  colour channel is lesion), resized with nearest-neighbour to exactly the
  size of their downsized image and stored as 1-bit PNG.
- Contents: {n_images} images ({class_counts}) and {n_masks} mask files.
- Rebuilt (byte for byte with the same Pillow and libjpeg versions) by

      python scripts/build_bundled_busi.py /path/to/Dataset_BUSI_with_GT \\
          src/breastcad/data/bundled/busi --max-side {max_side}{format_arg}

## Source and citation

Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound
images. Data in Brief. 2020;28:104863. doi:10.1016/j.dib.2019.104863

The images were collected in 2018 at Baheya Hospital, Cairo, Egypt, from 600
women aged 25 to 75 years.

## Licence

BUSI is distributed by its authors for research use. It is redistributed
(resized) by MedMNIST as BreastMNIST under the CC BY 4.0 licence. This
resized copy is included for **research and education only; it is not for
clinical use**. Cite the paper above in any work that uses it.

## Known problems (not fixed here)

BUSI has known problems: near-duplicate images (the same lesion or frame
exported more than once, small crops, re-exports), at least one image stored
under two classes, burned-in text, calipers and annotation marks, and no
patient identifiers or official train/test split. This copy keeps the data
as it is; `breastcad audit` finds these problems, and its duplicate groups
must be kept inside one split, or metrics are inflated by leakage.
"""


class BuildError(Exception):
    """A one-line reason to stop."""


@dataclass(frozen=True)
class Job:
    """One image and its masks to convert."""

    cls: str
    image: Path
    masks: tuple[Path, ...]


@dataclass(frozen=True)
class Done:
    """What one job wrote."""

    cls: str
    image_bytes: int
    mask_bytes: int
    n_masks: int
    size: tuple[int, int]


def target_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(w, h) with the longer side at most ``max_side``, aspect kept, never upscaled."""
    w, h = size
    longest = max(w, h)
    if longest <= max_side:
        return w, h
    scale = max_side / longest
    return max(1, round(w * scale)), max(1, round(h * scale))


def to_gray(img: Image.Image) -> Image.Image:
    """8-bit luminance, alpha ignored (same rule as breastcad's image reader)."""
    if img.mode == "L":
        return img
    if img.mode == "1":
        return img.convert("L")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        raise BuildError(f"unexpected high-bit-depth image (mode {img.mode})")
    if img.mode in ("RGBA", "LA", "PA", "P"):
        img = img.convert("RGBA").convert("RGB")
    return img.convert("L")


def mask_to_bool(img: Image.Image) -> np.ndarray:
    """Lesion where any colour channel is non-zero (as imageio.read_mask)."""
    if img.mode in ("RGBA", "LA", "PA", "P"):
        arr = np.asarray(img.convert("RGBA"))[..., :3].max(axis=-1)
    elif img.mode == "RGB":
        arr = np.asarray(img).max(axis=-1)
    else:
        arr = np.asarray(img.convert("L") if img.mode not in ("1", "L") else img)
    return np.asarray(arr) > 0


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise BuildError(f"{path}: cannot read image ({err})") from None
    return img


def save_png(img: Image.Image, path: Path) -> int:
    """Write ``img`` as a metadata-free, optimised PNG; return its size in bytes."""
    img = img.copy()
    img.info.clear()  # no gamma/dpi/sRGB/text chunks carried over
    img.save(path, format="PNG", optimize=True)
    return path.stat().st_size


def save_jpeg(img: Image.Image, path: Path, quality: int) -> int:
    """Write ``img`` as a metadata-free, optimised JPEG; return its size in bytes."""
    img = img.copy()
    img.info.clear()
    img.save(path, format="JPEG", quality=quality, optimize=True, progressive=False)
    return path.stat().st_size


def convert_one(job: Job, out_dir: Path, max_side: int, fmt: str, quality: int) -> Done:
    """Convert one image and its masks into ``out_dir/<class>/``."""
    src = _open(job.image)
    gray = to_gray(src)
    size = target_size(gray.size, max_side)
    if size != gray.size:
        gray = gray.resize(size, Image.Resampling.LANCZOS)
    dest = out_dir / job.cls
    if fmt == "png":
        image_bytes = save_png(gray, dest / job.image.name)
    else:
        image_bytes = save_jpeg(gray, dest / (job.image.stem + ".jpg"), quality)
    mask_bytes = 0
    for mp in job.masks:
        m = _open(mp)
        if m.size != src.size:
            print(
                f"note: {mp.name} is {m.size[0]}x{m.size[1]}, its image "
                f"{src.size[0]}x{src.size[1]}; resized to the image",
                file=sys.stderr,
            )
        lesion = Image.fromarray(mask_to_bool(m).astype(np.uint8) * 255, mode="L")
        if lesion.size != size:
            lesion = lesion.resize(size, Image.Resampling.NEAREST)
        bw = lesion.convert("1", dither=Image.Dither.NONE)
        mask_bytes += save_png(bw, dest / mp.name)
    return Done(job.cls, image_bytes, mask_bytes, len(job.masks), size)


def find_jobs(src_dir: Path) -> tuple[list[Job], list[str]]:
    """Images with their masks, per class; raise BuildError unless a BUSI folder."""
    if not src_dir.is_dir():
        raise BuildError(f"{src_dir}: not a folder")
    missing = [c for c in CLASSES if not (src_dir / c).is_dir()]
    if missing:
        raise BuildError(
            f"{src_dir}: not a BUSI folder (missing {', '.join(m + '/' for m in missing)}; "
            "expected benign/, malignant/, normal/)"
        )
    jobs: list[Job] = []
    skipped: list[str] = []
    for cls in CLASSES:
        images: dict[str, Path] = {}
        masks: dict[str, list[Path]] = {}
        for name in sorted(os.listdir(src_dir / cls)):
            path = src_dir / cls / name
            m = NAME_RE.match(name)
            if not m or m.group("cls") != cls or not path.is_file():
                skipped.append(f"{cls}/{name}")
                continue
            key = m.group("num")
            if m.group("mask"):
                masks.setdefault(key, []).append(path)
            else:
                images[key] = path
        if not images:
            raise BuildError(f"{src_dir}: not a BUSI folder (no '{cls} (N).png' images in {cls}/)")
        orphans = sorted(set(masks) - set(images))
        if orphans:
            raise BuildError(
                f"{src_dir / cls}: {len(orphans)} mask(s) without an image, e.g. "
                f"'{cls} ({orphans[0]})_mask.png'"
            )
        for key in sorted(images, key=int):
            jobs.append(Job(cls, images[key], tuple(sorted(masks.get(key, [])))))
    return jobs, skipped


def prepare_out_dir(src_dir: Path, out_dir: Path) -> None:
    """Create the class folders and remove stale BUSI-named files from them."""
    src_r, out_r = src_dir.resolve(), out_dir.resolve()
    if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
        raise BuildError(f"{out_dir}: OUT_DIR must not be, contain or lie inside SRC_DIR")
    for cls in CLASSES:
        folder = out_dir / cls
        folder.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(folder):
            if OUT_NAME_RE.match(name) and (folder / name).is_file():
                (folder / name).unlink()


def write_readme(
    out_dir: Path, max_side: int, fmt: str, quality: int, counts: dict[str, int], n_masks: int
) -> None:
    """Write OUT_DIR/README.md describing the copy."""
    if fmt == "png":
        image_format_text = "lossless 8-bit grayscale PNG"
        format_arg = " --format png"
        img_ext, ext_note = ".png", ""
    else:
        image_format_text = (
            f"8-bit grayscale JPEG, quality {quality}, to keep the copy small\n"
            "  (lossless PNG would fit the size budget only at a 224 px side)"
        )
        format_arg = f" \\\n          --format jpeg --quality {quality}"
        img_ext = ".jpg"
        ext_note = (
            ";\n  only the images' suffix differs: `.jpg` instead of `.png` (masks stay `.png`)"
        )
    text = README_TEMPLATE.format(
        max_side=max_side,
        image_format_text=image_format_text,
        format_arg=format_arg,
        img_ext=img_ext,
        ext_note=ext_note,
        n_images=sum(counts.values()),
        class_counts=", ".join(f"{counts[c]} {c}" for c in CLASSES),
        n_masks=n_masks,
    )
    (out_dir / "README.md").write_text(text, encoding="utf-8")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(src_dir: Path, out_dir: Path, max_side: int, fmt: str, quality: int, jobs_n: int) -> int:
    jobs, skipped = find_jobs(src_dir)
    prepare_out_dir(src_dir, out_dir)
    if jobs_n > 1:
        with ProcessPoolExecutor(max_workers=jobs_n) as pool:
            results = list(
                pool.map(
                    convert_one,
                    jobs,
                    [out_dir] * len(jobs),
                    [max_side] * len(jobs),
                    [fmt] * len(jobs),
                    [quality] * len(jobs),
                    chunksize=16,
                )
            )
    else:
        results = [convert_one(j, out_dir, max_side, fmt, quality) for j in jobs]
    counts = {c: sum(1 for r in results if r.cls == c) for c in CLASSES}
    n_masks = sum(r.n_masks for r in results)
    write_readme(out_dir, max_side, fmt, quality, counts, n_masks)
    img_b = sum(r.image_bytes for r in results)
    mask_b = sum(r.mask_bytes for r in results)
    total = dir_bytes(out_dir)
    longest = max(max(r.size) for r in results)
    for s in skipped:
        print(f"skipped (not a BUSI image or mask name): {s}", file=sys.stderr)
    print(
        f"{len(results)} images ({', '.join(f'{counts[c]} {c}' for c in CLASSES)}), "
        f"{n_masks} masks, max side {max_side} ({fmt}; largest written side {longest})"
    )
    print(
        f"images {img_b / 1e6:.2f} MB, masks {mask_b / 1e6:.2f} MB, "
        f"total {total / 1e6:.2f} MB ({total / 2**20:.2f} MiB) in {out_dir}"
    )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Rebuild breastcad's compact bundled copy of BUSI.",
    )
    p.add_argument("src_dir", type=Path, help="BUSI folder (Dataset_BUSI_with_GT)")
    p.add_argument(
        "out_dir", type=Path, help="output folder (e.g. src/breastcad/data/bundled/busi)"
    )
    p.add_argument(
        "--max-side",
        type=int,
        default=DEFAULT_MAX_SIDE,
        help=f"longest image side in px (default {DEFAULT_MAX_SIDE})",
    )
    p.add_argument(
        "--format",
        choices=("png", "jpeg"),
        default=DEFAULT_FORMAT,
        help=f"image format; masks are always 1-bit PNG (default {DEFAULT_FORMAT})",
    )
    p.add_argument(
        "--quality",
        type=int,
        default=DEFAULT_QUALITY,
        help=f"JPEG quality, {JPEG_MIN_QUALITY}..100 (default {DEFAULT_QUALITY}; jpeg only)",
    )
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    args = p.parse_args(argv)
    if args.max_side < 16:
        p.error("--max-side must be at least 16")
    if not JPEG_MIN_QUALITY <= args.quality <= 100:
        p.error(f"--quality must be between {JPEG_MIN_QUALITY} and 100")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return build(
            args.src_dir, args.out_dir, args.max_side, args.format, args.quality, args.jobs
        )
    except BuildError as err:
        print(f"build_bundled_busi: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
