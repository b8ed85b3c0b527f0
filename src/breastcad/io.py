"""Atomic file output: temporary file in the same folder, fsync, rename.

A reader (or a resumed run) sees either the old file or the complete new one,
never half of it. Errors such as a full disk or an unwritable folder become a
one-line :class:`BreastcadError`, and the previous file stays intact.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from breastcad.errors import BreastcadError

SCHEMA_VERSION = 1


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    path = Path(path)
    tmp_name: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        # mkstemp creates 0600; give the file the mode a plain open() would (umask applied)
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_dir(path.parent)
    except OSError as err:
        raise BreastcadError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    return path


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """mkdir -p with a one-line error (e.g. a file where a folder should be, no permission)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BreastcadError(f"{path}: cannot create folder ({err.strerror or err})") from None
    return path


def remove_stale_temp_files(folder: str | os.PathLike[str]) -> int:
    """Delete temporary files that a killed writer left behind (never a finished file)."""
    removed = 0
    for tmp in Path(folder).rglob(".*.tmp"):
        try:
            tmp.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows it.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8", errors="backslashreplace"))


def atomic_write_csv(
    path: str | os.PathLike[str], header: list[str], rows: list[list[Any]]
) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def _json_safe(obj: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _json_safe(obj.item())
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: dict[str, Any]) -> Path:
    """Write a JSON document; every document carries a ``schema_version``."""
    doc = {"schema_version": SCHEMA_VERSION, **obj}
    return atomic_write_text(path, json.dumps(_json_safe(doc), indent=2) + "\n")


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise BreastcadError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError) as err:
        raise BreastcadError(f"{path}: cannot read JSON ({err})") from None


def read_json_if_valid(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """An optional JSON document: None when the file is absent, unreadable or not an object."""
    if not Path(path).is_file():
        return None
    try:
        doc = read_json(path)
    except BreastcadError:
        return None
    return doc if isinstance(doc, dict) else None
