"""Single process vs ``torchrun --nproc_per_node N`` (CPU, gloo) on the same tiny run.

    python benchmarks/bench_ddp.py --name ddp-cpu2                 # synthetic data, 2 processes
    python benchmarks/bench_ddp.py --name ddp-cpu2 --bf16 auto     # bf16 where the CPU has it

Trains the same run (same seed, data and settings) once in one process with
all the cores and once with N gloo processes sharing them (cores / N threads
each), and writes ``benchmarks/results/<name>.json``: pooled out-of-fold AUC
of both, the largest difference of a calibrated out-of-fold probability
(and, for scale, the same between one process with 1 thread and with all),
training throughput (images/s over the fold's epochs) and wall time, and the
scaling efficiency = (single time / N-process time) / N, for the whole run
and for the training loop alone. The run folders go to a temporary folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def _probs(run: Path) -> dict[str, float]:
    with open(run / "oof_predictions.csv", newline="") as fh:
        return {r["path"]: float(r["prob"]) for r in csv.DictReader(fh)}


def _train(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=40, help="synthetic images per class")
    ap.add_argument("--size", type=int, default=64, help="image size (px)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--bf16", default="off", choices=("off", "auto"))
    args = ap.parse_args()
    from synthetic import write_busi_like

    tmp = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    data = write_busi_like(tmp / "data", n_per_class=args.per_class, size=args.size, seed=11)
    common = [
        "train", "--quiet", "--data", str(data), "--folds", "3", "--epochs", str(args.epochs),
        "--image-size", str(args.size), "--set", "eval.n_bootstrap=200",
        "--set", "eval.lesion_agreement=false", "--set", "train.batch_size=16",
        "--set", f'train.bf16="{args.bf16}"',
    ]  # fmt: skip
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp / "cache"))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    # warm the image cache so neither run pays for decoding
    _train([sys.executable, "-m", "breastcad", *common, "--epochs", "1", "--folds", "2",
            "--out", str(tmp / "warm")], env)  # fmt: skip
    single, single1, multi = tmp / "single", tmp / "single-1thread", tmp / "multi"
    t_single = _train([sys.executable, "-m", "breastcad", *common, "--out", str(single)], env)
    # the same single process with one thread, as each of the N processes has on this machine
    t_single1 = _train(
        [sys.executable, "-m", "breastcad", *common, "--set", "train.threads=1",
         "--out", str(single1)], env,
    )  # fmt: skip
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    t_multi = _train(
        [torchrun, "--standalone", "--nproc_per_node", str(args.nproc), "-m", "breastcad",
         *common, "--out", str(multi)], env,
    )  # fmt: skip
    ms = json.loads((single / "metrics.json").read_text())
    mm = json.loads((multi / "metrics.json").read_text())
    m1 = json.loads((single1 / "metrics.json").read_text())
    ps, pm, p1 = _probs(single), _probs(multi), _probs(single1)
    train_1 = sum(m1["timing"]["fold_seconds"])
    train_s = sum(ms["timing"]["fold_seconds"])
    train_m = sum(mm["timing"]["fold_seconds"])
    doc = {
        "what": f"1 process vs torchrun --nproc_per_node {args.nproc} (gloo, CPU)",
        "data": f"synthetic BUSI-like, {2 * args.per_class} images, {args.size} px",
        "settings": {"folds": 3, "epochs": args.epochs, "batch_size": 16, "bf16": args.bf16},
        "cores": len(os.sched_getaffinity(0)),
        "load_average_at_end": os.getloadavg()[0],
        "auc_single": ms["pooled"]["roc_auc"]["value"],
        "auc_ddp": mm["pooled"]["roc_auc"]["value"],
        "auc_difference": abs(ms["pooled"]["roc_auc"]["value"] - mm["pooled"]["roc_auc"]["value"]),
        "auc_single_1thread": m1["pooled"]["roc_auc"]["value"],
        "max_prob_difference": max(abs(ps[k] - pm[k]) for k in ps),
        # the same code, one process, 1 vs all threads: how far float-order noise alone goes
        "max_prob_difference_threads_1_vs_all": max(abs(ps[k] - p1[k]) for k in ps),
        "auc_difference_threads_1_vs_all": abs(
            ms["pooled"]["roc_auc"]["value"] - m1["pooled"]["roc_auc"]["value"]
        ),
        "wall_seconds_single": t_single,
        "wall_seconds_single_1thread": t_single1,
        "wall_seconds_ddp": t_multi,
        "fold_seconds_single_1thread": train_1,
        "fold_seconds_single": train_s,
        "fold_seconds_ddp": train_m,
        "train_images_per_second_single": ms["timing"]["train_images_per_second"],
        "train_images_per_second_ddp": mm["timing"]["train_images_per_second"],
        "scaling_efficiency_wall": t_single / t_multi / args.nproc,
        "scaling_efficiency_folds": train_s / train_m / args.nproc,
        "scaling_efficiency_folds_vs_1thread": train_1 / train_m / args.nproc,
        "command": " ".join(sys.argv),
    }
    out = HERE / "results" / f"{args.name}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
