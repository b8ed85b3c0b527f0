"""Runs survive SIGKILL at random points and resume to exactly the uninterrupted result."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from synthetic import write_busi_like

ARGS = [
    "--quiet", "--folds", "2", "--epochs", "6", "--image-size", "32",
    "--set", "eval.n_bootstrap=50", "--set", "cv.val_fraction=0.34",
    "--set", "train.batch_size=8", "--set", "train.patience=100",
]  # fmt: skip


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "breastcad", "train", *args]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "XDG_CACHE_HOME": str(cache)}


@pytest.fixture(scope="module")
def data_and_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    tmp = tmp_path_factory.mktemp("resume")
    data = write_busi_like(tmp / "data", n_per_class=10, size=40, seed=3)
    ref = tmp / "reference"
    t0 = time.perf_counter()
    proc = subprocess.run(
        _cmd("--data", str(data), "--out", str(ref), *ARGS),
        capture_output=True, text=True, env=_env(tmp / "cache"), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return data, ref, time.perf_counter() - t0


def test_kill_anywhere_then_resume_gives_identical_results(
    data_and_reference: tuple[Path, Path, float], tmp_path: Path
) -> None:
    data, ref, duration = data_and_reference
    rng = random.Random(1234)
    kills = 0
    for trial in range(5):
        run = tmp_path / f"run{trial}"
        proc = subprocess.Popen(
            _cmd("--data", str(data), "--out", str(run), *ARGS),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(tmp_path / "cache"),
        )  # fmt: skip
        # somewhere between start-up and the end of the uninterrupted run
        time.sleep(rng.uniform(0.2, 0.85) * duration)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if not (run / "config.yaml").exists():  # killed before the run folder was started
            proc2 = subprocess.run(
                _cmd("--data", str(data), "--out", str(run), *ARGS),
                capture_output=True, text=True, env=_env(tmp_path / "cache"), timeout=300,
            )  # fmt: skip
        else:
            proc2 = subprocess.run(
                _cmd("--resume", str(run), "--quiet"),
                capture_output=True, text=True, env=_env(tmp_path / "cache"), timeout=300,
            )  # fmt: skip
        assert proc2.returncode == 0, proc2.stderr[-2000:]
        assert (run / "oof_predictions.csv").read_text() == (
            ref / "oof_predictions.csv"
        ).read_text(), f"trial {trial}: resumed predictions differ"
        for name in ("metrics.json",):
            a = (run / name).read_text().replace(str(run), "RUN")
            b = (ref / name).read_text().replace(str(ref), "RUN")
            # timings differ between runs; everything else must be identical
            assert _without_timing(a) == _without_timing(b), f"trial {trial}: metrics differ"
        assert not list(run.rglob("*.tmp")), "temporary files left behind"
        assert not list(run.rglob("resume.pt")), "resume state left after completion"
    assert kills >= 3, "too few runs were really killed; the timing assumption is off"


def _without_timing(text: str) -> dict:
    import json

    doc = json.loads(text)
    doc.pop("timing", None)
    for f in doc.get("per_fold", []):
        f.pop("seconds", None)
    return doc


def test_two_identical_runs_give_identical_predictions(
    data_and_reference: tuple[Path, Path, float], tmp_path: Path
) -> None:
    data, ref, _ = data_and_reference
    run = tmp_path / "again"
    proc = subprocess.run(
        _cmd("--data", str(data), "--out", str(run), *ARGS),
        capture_output=True, text=True, env=_env(tmp_path / "cache"), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "oof_predictions.csv").read_text() == (ref / "oof_predictions.csv").read_text()


def test_resume_refuses_changed_data_and_extra_settings(
    data_and_reference: tuple[Path, Path, float], tmp_path: Path
) -> None:
    data, ref, _ = data_and_reference
    proc = subprocess.run(
        _cmd("--resume", str(ref), "--epochs", "3"), capture_output=True, text=True
    )
    assert proc.returncode == 2 and "drop other settings" in proc.stderr
    proc = subprocess.run(_cmd("--out", str(ref), *ARGS), capture_output=True, text=True)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    # a changed input image (same name, new pixels) must stop a resume
    import shutil

    data2, run2 = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data, data2)
    shutil.copytree(ref, run2)
    cfg = (run2 / "config.yaml").read_text().replace(str(data), str(data2))
    (run2 / "config.yaml").write_text(cfg)
    folds = (run2 / "folds.json").read_text().replace(str(data), str(data2))
    (run2 / "folds.json").write_text(folds)
    victim = data2 / "benign" / "benign (2).png"
    img = Image.open(victim)
    img.point(lambda v: 255 - v).save(victim)
    proc = subprocess.run(
        _cmd("--resume", str(run2), "--quiet"), capture_output=True, text=True,
        env=_env(tmp_path / "cache"), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "changed since this run started" in proc.stderr and "Traceback" not in proc.stderr
