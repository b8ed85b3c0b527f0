"""benchmarks/bench_train.py end to end at a toy size: every pipeline's figure is printed
as soon as it is measured (a run cut off by a time limit still leaves numbers), and the
JSON record holds the side-by-side rows and ratios the speed issue asks for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from synthetic import write_busi_like

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_train.py"


def test_bench_train_prints_each_pipeline_as_it_finishes(tmp_path: Path) -> None:
    data = write_busi_like(tmp_path / "busi", n_per_class=6, size=40)
    record = tmp_path / "train.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(data), "--size", "32", "--batch", "4",
         "--steps", "2", "--warmup", "1", "--matmul-n", "128", "--matmul-reps", "1",
         "--cache-dir", str(tmp_path / "cache"), "--bf16", "off", "--json", str(record)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    table_at = next(i for i, ln in enumerate(lines) if ln.startswith("pipeline "))
    early = [ln for ln in lines[:table_at] if "images/s, data wait" in ln]
    assert [ln.split(":")[0] for ln in early] == [
        "naive, workers=2",
        "naive, workers=0",
        "breastcad, fp32",
    ]
    doc = json.loads(record.read_text())
    rows = {r["pipeline"]: r for r in doc["pipelines"]}
    assert set(rows) == {"naive, workers=2", "naive, workers=0", "breastcad, fp32"}
    for row in rows.values():
        assert row["images"] == 2 * 4  # exactly the timed steps x batch
        assert 0 <= row["data_wait_share"] <= 1
        assert row["images_per_s"] > 0 and row["peak_rss_mb"] > 0
    assert doc["peak"]["peak_fp32_flops"] > 0
    ratio = doc["ratios"]["naive, workers=0"]["images_per_s"]
    assert (
        ratio == rows["breastcad, fp32"]["images_per_s"] / rows["naive, workers=0"]["images_per_s"]
    )
