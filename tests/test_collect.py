"""Fold-parallel jobs (`train --fold K`) into one shared run folder, merged by `collect`."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from breastcad.experiment import publish_once
from synthetic import write_busi_like
from test_cli import assert_clean_error, run_cli

ARGS = [
    "--quiet", "--folds", "2", "--epochs", "2", "--image-size", "32",
    "--set", "eval.n_bootstrap=50", "--set", "cv.val_fraction=0.34",
    "--set", "train.batch_size=8", "--set", "train.threads=1",
    "--set", "eval.lesion_agreement=false",
]  # fmt: skip


def _train(*args: str, cache: Path) -> subprocess.Popen:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "breastcad", "train", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _numbers(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    m.pop("timing")
    for f in m["per_fold"]:
        f.pop("seconds")
    return m


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path, str]:
    tmp = tmp_path_factory.mktemp("collect")
    data = write_busi_like(tmp / "data", n_per_class=10, size=40, seed=7)
    cache = tmp / "cache"
    single, shared = tmp / "single", tmp / "shared"
    jobs = [_train("--data", str(data), "--out", str(single), *ARGS, cache=cache)]
    # two fold jobs started together, as a job array would: both create the shared files
    jobs += [
        _train("--data", str(data), "--out", str(shared), "--fold", str(k), *ARGS, cache=cache)
        for k in (0, 1)
    ]
    outs = [j.communicate(timeout=300) for j in jobs]
    for j, (_, err) in zip(jobs, outs, strict=True):
        assert j.returncode == 0, err[-3000:]
    return data, single, shared, cache, outs[1][0] + outs[2][0]


def test_fold_jobs_write_only_their_folds_and_the_shared_files(runs) -> None:
    _, _, shared, _, stdout = runs
    for name in ("config.yaml", "audit.json", "audit.txt", "folds.json", "env.json"):
        assert (shared / name).is_file(), name
    for k in (0, 1):
        assert (shared / f"fold-{k}" / "DONE").is_file()
    assert not (shared / "metrics.json").exists()  # no summary before collect
    assert not [p for p in shared.rglob("*") if p.name.endswith((".tmp", ".publish"))]
    assert "collect" in stdout  # the job that finishes last says what to do next


def test_collect_gives_the_numbers_of_a_single_run(runs) -> None:
    _, single, shared, cache, _ = runs
    proc = run_cli("collect", str(shared), "--quiet", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Pooled out-of-fold ROC-AUC" in proc.stdout
    assert _numbers(shared) == _numbers(single)
    oof = (shared / "oof_predictions.csv").read_text()
    assert oof == (single / "oof_predictions.csv").read_text()
    assert (shared / "report.html").stat().st_size > 10_000
    assert (shared / "plots" / "roc.png").is_file()


def test_collect_names_the_missing_folds(runs, tmp_path: Path) -> None:
    _, _, shared, cache, _ = runs
    partial = tmp_path / "partial"
    shutil.copytree(shared, partial)
    (partial / "fold-1" / "DONE").unlink()
    (partial / "metrics.json").unlink(missing_ok=True)
    proc = run_cli("collect", str(partial), "--quiet", cache=cache)
    assert_clean_error(proc, "fold-1", "1 of 2 folds not done")
    assert "fold-0" not in proc.stderr.split("not done")[1]
    assert not (partial / "metrics.json").exists()


def test_a_fold_job_with_other_settings_is_refused(runs) -> None:
    data, _, shared, cache, _ = runs
    before = (shared / "config.yaml").read_text()
    proc = run_cli(
        "train", "--data", str(data), "--out", str(shared), "--fold", "1", *ARGS,
        "--set", "train.lr=0.01", cache=cache,
    )  # fmt: skip
    assert_clean_error(proc, "other settings", "config.yaml")
    assert (shared / "config.yaml").read_text() == before
    proc = run_cli("train", "--data", str(data), "--out", str(shared), "--fold", "5", *ARGS)
    assert_clean_error(proc, "--fold 5", "0 to 1")


def _publish(args: tuple[str, int]) -> bool:
    path, i = args
    return publish_once(Path(path), lambda t: Path(t).write_text(f"writer {i}\n" * 1000))


def test_publish_once_has_exactly_one_creator_among_racing_processes(tmp_path: Path) -> None:
    target = tmp_path / "folds.json"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        created = pool.map(_publish, [(str(target), i) for i in range(12)])
    assert sum(created) == 1
    winner = created.index(True)
    assert target.read_text() == f"writer {winner}\n" * 1000  # complete, never mixed
    assert [p.name for p in tmp_path.iterdir()] == ["folds.json"]
