"""Data-parallel training under torchrun (CPU, gloo): same run folder, same numbers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from breastcad.distributed import SINGLE, World, gather_rows, padded_shard, shard
from synthetic import write_busi_like

ARGS = [
    "--quiet", "--folds", "2", "--epochs", "2", "--image-size", "32",
    "--set", "eval.n_bootstrap=50", "--set", "cv.val_fraction=0.34",
    "--set", "train.batch_size=7", "--set", "eval.lesion_agreement=false",
    # fp32: bf16 rounding would differ between shares of a batch (see docs/scale-out.md)
    "--set", 'train.bf16="off"',
]  # fmt: skip
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)
    return env


def _torchrun(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "breastcad", *args],
        capture_output=True, text=True, env=_env(cache), timeout=300,
    )  # fmt: skip


def _probs(run: Path) -> dict[str, float]:
    with open(run / "oof_predictions.csv", newline="") as fh:
        return {r["path"]: float(r["prob_raw"]) for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, str]:
    tmp = tmp_path_factory.mktemp("ddp")
    data = write_busi_like(tmp / "data", n_per_class=10, size=40, seed=5)
    single, ddp = tmp / "single", tmp / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "breastcad", "train", "--data", str(data), "--out", str(single),
         *ARGS, "--set", "train.threads=1"],
        capture_output=True, text=True, env=_env(tmp / "cache"), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _torchrun("train", "--data", str(data), "--out", str(ddp), *ARGS, cache=tmp / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, single, ddp, proc.stdout


def test_torchrun_two_cpu_processes_write_one_complete_run_folder(runs) -> None:
    _, _, ddp, stdout = runs
    for name in ("config.yaml", "audit.json", "folds.json", "env.json", "metrics.json",
                 "oof_predictions.csv", "report.html"):  # fmt: skip
        assert (ddp / name).is_file(), name
    for k in (0, 1):
        fold = ddp / f"fold-{k}"
        for name in ("model.safetensors", "card.json", "history.csv", "test_logits.csv", "DONE"):
            assert (fold / name).is_file(), (k, name)
        assert not (fold / "resume.pt").exists()
    # rank 0 alone wrote and printed: one summary, no temporary files left by a second writer
    assert stdout.count("Pooled out-of-fold ROC-AUC") == 1, stdout
    assert "2 processes" in stdout
    assert not [p for p in ddp.rglob("*") if p.name.endswith((".tmp", ".publish"))]


def test_two_processes_give_the_single_process_result(runs) -> None:
    _, single, ddp, _ = runs
    a, b = _probs(single), _probs(ddp)
    assert a.keys() == b.keys() and len(a) == 20
    # global batches, augmentation, dropout masks and batch-norm statistics are those of
    # one process: only the order of floating-point sums differs (measured ~2e-6)
    assert max(abs(a[k] - b[k]) for k in a) < 1e-4
    ma = json.loads((single / "metrics.json").read_text())
    mb = json.loads((ddp / "metrics.json").read_text())
    assert abs(ma["pooled"]["roc_auc"]["value"] - mb["pooled"]["roc_auc"]["value"]) <= 0.01
    assert [f["best_epoch"] for f in ma["per_fold"]] == [f["best_epoch"] for f in mb["per_fold"]]
    # the gathered predictions hold every test image once: the padding was dropped
    assert mb["n_images"] == 20 and sum(f["n_test"] for f in mb["per_fold"]) == 20


def test_a_refused_out_folder_stops_every_rank_with_one_line(runs, tmp_path: Path) -> None:
    data, _, ddp, _ = runs
    proc = _torchrun("train", "--data", str(data), "--out", str(ddp), *ARGS, cache=tmp_path)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "not empty" in errors[0], proc.stderr[-2000:]
    assert "src/breastcad" not in proc.stderr and "site-packages/breastcad" not in proc.stderr


def test_shards_cover_every_index_once() -> None:
    for n in (0, 1, 5, 7, 8):
        for size in (1, 2, 3):
            worlds = [World(size=size, rank=r, local_size=size) for r in range(size)]
            parts = [np.arange(n)[shard(n, w)] for w in worlds]
            assert np.array_equal(np.concatenate(parts), np.arange(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            padded = [padded_shard(np.arange(n), w) for w in worlds]
            assert len({len(p) for p, _ in padded}) == 1  # equal lengths for all_gather
            real = np.concatenate([p[:r] for p, r in padded])
            assert np.array_equal(real, np.arange(n))


def test_gather_rows_is_the_identity_for_one_process() -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert gather_rows(x, 3, 3, SINGLE) is x
