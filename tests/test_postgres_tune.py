"""Two `breastcad tune --search-only` workers share one Optuna study on a real PostgreSQL server.

The fixture starts a throw-away server (Debian's postgresql, installed by
`make postgres`) on a free loopback port in a temporary folder, and stops it
at the end. Without the server binaries the test fails: it never skips.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml

from synthetic import write_busi_like

USER = "breastcad"


def _server_bin() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3])
    )
    if not found and shutil.which("initdb"):
        found = [shutil.which("initdb") or ""]
    if not found:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: run `make postgres`")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    bin_dir = _server_bin()
    # PostgreSQL refuses to run as root (CI runs as root): then run it as the postgres user,
    # in a folder outside pytest's root-only temporary tree that this user can write.
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="breastcad-pg-"))
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.fail("running as root needs `runuser` to start PostgreSQL as its own user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    data, log = root / "data", root / "server.log"
    port = _free_port()

    def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=timeout)

    try:
        proc = run(str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "-A", "trust",
                   "-E", "UTF8", "--no-sync")  # fmt: skip
        if proc.returncode != 0:
            pytest.fail(f"initdb failed (run `make postgres`?): {proc.stderr[-1500:]}")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        proc = run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log),
                   "-w", "-t", "60", "start")  # fmt: skip
        if proc.returncode != 0:
            text = log.read_text() if log.exists() else ""
            pytest.fail(f"PostgreSQL did not start: {proc.stderr[-800:]} {text[-800:]}")
        proc = run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", USER,
                   "optuna")  # fmt: skip
        if proc.returncode != 0:
            pytest.fail(f"createdb failed: {proc.stderr[-1500:]}")
        yield f"postgresql://{USER}@127.0.0.1:{port}/optuna"
    finally:
        if (data / "postmaster.pid").exists():
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _worker(data: Path, storage: str, best: Path, cache: Path) -> subprocess.Popen:
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "breastcad", "tune", "--search-only", "--storage", storage,
        "--study", "shared", "--trials", "6", "--trial-epochs", "1", "--data", str(data),
        "--set", "cv.val_fraction=0.34", "--set", "train.threads=1", "--quiet",
        "--best", str(best),
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_two_workers_share_one_postgresql_study(postgres_url: str, tmp_path: Path) -> None:
    data = write_busi_like(tmp_path / "data", n_per_class=10, size=40)
    best = [tmp_path / f"best-{i}.yaml" for i in range(2)]
    workers = [_worker(data, postgres_url, b, tmp_path / "cache") for b in best]
    outs = [w.communicate(timeout=300) for w in workers]
    for w, (_, err) in zip(workers, outs, strict=True):
        assert w.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    finished = {t.number for t in study.trials if t.state.is_finished()}
    # each worker stops once the study holds 6 finished trials; one may overshoot by one
    assert 6 <= len(finished) <= 7, len(finished)
    # every worker ran its own trials of the one study: none twice, none lost
    ran = [set(map(int, re.findall(r"shared trial (\d+):", out))) for out, _ in outs]
    assert ran[0] and ran[1], outs
    assert not ran[0] & ran[1]
    assert ran[0] | ran[1] == finished
    for path in best:
        doc = yaml.safe_load(path.read_text())
        assert doc["model"]["name"] == "basic_cnn"
