from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from breastcad import io as bio
from breastcad.errors import BreastcadError


def test_atomic_json_has_schema_version_and_no_temp_files(tmp_path: Path) -> None:
    out = bio.atomic_write_json(tmp_path / "a.json", {"x": float("nan"), "y": [1.5]})
    doc = json.loads(out.read_text())
    assert doc == {"schema_version": 1, "x": None, "y": [1.5]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)


def test_disk_full_keeps_the_old_file_and_says_so(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "metrics.json"
    bio.atomic_write_json(target, {"old": True})
    real_fdopen = os.fdopen

    class FullFile:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bio.os, "fdopen", lambda fd, mode: FullFile(real_fdopen(fd, mode)))
    with pytest.raises(
        BreastcadError, match=r"metrics.json: cannot write \(No space left on device\)"
    ):
        bio.atomic_write_json(target, {"old": False})
    monkeypatch.undo()
    assert json.loads(target.read_text())["old"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_dev_full_is_reported_as_a_clean_error() -> None:
    # /dev/full is a device, not a folder: writing "into" it must fail cleanly
    with pytest.raises(BreastcadError, match="/dev/full"):
        bio.atomic_write_text("/dev/full/report.html", "x")


def test_unwritable_output_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the run folder should go")
    with pytest.raises(BreastcadError, match="cannot create folder"):
        bio.ensure_dir(blocker / "run1")
    with pytest.raises(BreastcadError, match="cannot write"):
        bio.atomic_write_text(blocker / "x.txt", "hi")


def test_read_json_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(BreastcadError, match="no such file"):
        bio.read_json(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(BreastcadError, match="cannot read JSON") as err:
        bio.read_json(bad)
    assert "\n" not in str(err.value)


def test_stale_temp_files_are_removed_and_finished_files_kept(tmp_path: Path) -> None:
    done = bio.atomic_write_text(tmp_path / "fold-0" / "history.csv", "epoch\n1\n")
    stale = tmp_path / "fold-0" / ".resume.pt.abc123.tmp"
    stale.write_bytes(b"half a write")
    assert bio.remove_stale_temp_files(tmp_path) == 1
    assert not stale.exists() and done.read_text() == "epoch\n1\n"
