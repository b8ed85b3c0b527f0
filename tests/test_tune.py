"""`breastcad tune`: nested search that never sees its outer test fold, resumable, shareable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from breastcad import experiment, tuning
from breastcad.config import load_config
from synthetic import write_busi_like
from test_cli import run_cli

TINY_TUNE = [
    "--folds", "2",
    "--trials", "3",
    "--trial-epochs", "2",
    "--epochs", "2",
    "--set", "eval.n_bootstrap=50",
    "--set", "cv.val_fraction=0.34",
    "--set", "train.threads=1",
    "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_busi_like(tmp_path_factory.mktemp("tune") / "data", n_per_class=10, size=40)


@pytest.fixture(scope="module")
def tuned(data: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("tuned")
    run = tmp / "run"
    proc = run_cli("tune", "--data", str(data), "--out", str(run), *TINY_TUNE, cache=tmp / "c")
    return run, proc


def test_nested_search_writes_fold_winners_and_a_best_yaml_train_accepts(
    tuned, data: Path, tmp_path: Path
) -> None:
    run, proc = tuned
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nested-tuned pooled out-of-fold ROC-AUC" in proc.stdout
    for k in (0, 1):
        fold_best = load_config(run / f"fold-{k}" / "best.yaml")
        card = json.loads((run / f"fold-{k}" / "card.json").read_text())
        assert card["input_size"] == fold_best.data.image_size  # the winner was trained
        assert card["model_options"]["width"] == fold_best.model.width
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["tuning"]["winners"]) == 2
    assert metrics["tuning"]["trials_per_search"] == 3
    trials = (run / "trials.csv").read_text().splitlines()
    studies = [line.split(",")[0] for line in trials[1:]]
    assert sorted(set(studies)) == ["tune-final", "tune-fold-0", "tune-fold-1"]
    assert all(studies.count(s) == 3 for s in set(studies))
    assert (run / "plots" / "tune_tune-final_history.png").exists()
    report = (run / "report.html").read_text()
    assert "Hyperparameter search (nested)" in report and "tune-fold-1_history" in report
    best = yaml.safe_load((run / "best.yaml").read_text())
    assert best["model"]["name"] == "basic_cnn"
    again = run_cli(
        "train", "--config", str(run / "best.yaml"), "--data", str(data), "--folds", "2",
        "--epochs", "1", "--out", str(tmp_path / "from-best"), "--quiet",
        "--set", "eval.n_bootstrap=20", "--set", "cv.val_fraction=0.34",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]


def test_resuming_a_finished_tuning_run_trains_nothing_new(tuned) -> None:
    run, proc = tuned
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = (run / "fold-0" / "model.safetensors").stat().st_mtime_ns
    again = run_cli("tune", "--resume", str(run), "--quiet")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (run / "fold-0" / "model.safetensors").stat().st_mtime_ns == before
    study = optuna.load_study(study_name="tune-fold-0", storage=f"sqlite:///{run / 'optuna.db'}")
    assert len(study.trials) == 3


def test_no_search_ever_sees_its_outer_test_fold(data: Path, tmp_path: Path, monkeypatch) -> None:
    seen: list[tuple[str, np.ndarray]] = []
    current: dict[str, np.ndarray] = {}
    real_search, real_train = tuning.run_search, experiment.train_fold

    def search(study, base, ds, stack_for, search_idx, *args, **kwargs):
        current["name"], current["idx"] = study.study_name, search_idx
        return real_search(study, base, ds, stack_for, search_idx, *args, **kwargs)

    def train(cfg, ds, images, plan, rt, fold_dir, progress, on_epoch=None):
        if fold_dir is None:  # a trial
            used = np.concatenate([plan.train, plan.val, plan.test])
            assert np.isin(used, current["idx"]).all()
            seen.append((current["name"], used))
        return real_train(cfg, ds, images, plan, rt, fold_dir, progress, on_epoch)

    monkeypatch.setattr(tuning, "run_search", search)
    monkeypatch.setattr(experiment, "train_fold", train)
    cfg = load_config(
        None,
        [("data.path", str(data)), ("cv.folds", 2), ("cv.val_fraction", 0.34),
         ("tune.trials", 2), ("tune.epochs", 1), ("train.epochs", 1),
         ("eval.n_bootstrap", 20), ("data.cache_dir", str(tmp_path / "cache"))],
    )  # fmt: skip
    run = tmp_path / "run"
    tuning.run_tuning(cfg, run, progress=False, log=lambda *_: None)
    folds = json.loads((run / "folds.json").read_text())
    test_fold = np.array(folds["repeats"][0]["test_fold"])
    by_study = {name for name, _ in seen}
    assert by_study == {"tune-fold-0", "tune-fold-1", "tune-final"}
    for name, used in seen:
        if name == "tune-final":
            continue
        k = int(name.rsplit("-", 1)[1])
        assert not np.isin(used, np.flatnonzero(test_fold == k)).any(), name


def _worker(data: Path, storage: str, trials: int, cache: Path) -> subprocess.Popen:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "breastcad", "tune", "--search-only", "--storage", storage,
        "--study", "shared", "--trials", str(trials), "--trial-epochs", "1", "--data", str(data),
        "--set", "cv.val_fraction=0.34", "--set", "train.threads=1", "--quiet",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_workers_share_one_sqlite_study(data: Path, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    workers = [_worker(data, storage, 6, tmp_path / "cache") for _ in range(2)]
    outs = [w.communicate(timeout=300) for w in workers]
    for w, (_, err) in zip(workers, outs, strict=True):
        assert w.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    # each worker stops once the study holds 6 finished trials; one may overshoot by one
    assert 6 <= len(finished) <= 7


def test_a_resumed_study_adds_trials_instead_of_starting_over(data: Path, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    w = _worker(data, storage, 2, tmp_path / "cache")
    assert w.wait(timeout=300) == 0, w.stderr.read()[-2000:]
    first = optuna.load_study(study_name="shared", storage=storage).trials
    w = _worker(data, storage, 4, tmp_path / "cache")
    assert w.wait(timeout=300) == 0, w.stderr.read()[-2000:]
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert len(trials) == 4
    assert [t.params for t in trials[:2]] == [t.params for t in first]


def test_search_only_needs_a_storage_and_a_bad_storage_is_one_line(data: Path) -> None:
    proc = run_cli("tune", "--search-only", "--data", str(data), "--quiet")
    assert proc.returncode == 2 and "--storage" in proc.stderr
    proc = run_cli(
        "tune", "--search-only", "--storage", "nosuchdb://x", "--data", str(data), "--quiet"
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "nosuchdb" in proc.stderr


def test_lesion_crop_is_refused_in_one_line_before_any_work(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "tune"
    proc = run_cli("tune", "--data", str(data), "--out", str(out), "--quiet",
                   "--set", "data.preprocess=lesion-crop")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "lesion-crop" in proc.stderr and not out.exists()
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = run_cli("tune", "--search-only", "--storage", storage, "--data", str(data), "--quiet",
                   "--set", "data.preprocess=lesion-crop")  # fmt: skip
    assert proc.returncode == 2 and "lesion-crop" in proc.stderr, proc.stderr
