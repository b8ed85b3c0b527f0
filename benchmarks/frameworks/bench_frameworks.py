"""The study's basic CNN in several deep-learning frameworks, on breastcad's grouped folds.

    .venv/bin/python benchmarks/frameworks/bench_frameworks.py --data ../shared/data/busi
    .venv/bin/python benchmarks/frameworks/bench_frameworks.py --run runs/busi-full --folds 2
    .venv/bin/python benchmarks/frameworks/bench_frameworks.py --contenders pytorch-eager,keras-jax

(`make bench-frameworks` creates the environments and runs the shortened schedule.)

Contenders: breastcad itself (PyTorch eager) and with ``torch.compile``; Keras 3
on TensorFlow, JAX and PyTorch (one model definition, ``keras_cnn.py``, the
backend chosen by ``KERAS_BACKEND``, each in its own virtual environment under
``benchmarks/frameworks/envs/``, made by ``setup_envs.sh``); and, for inference
only, ONNX Runtime on the exported breastcad fold models.

Every contender gets identical inputs: the outer folds of a breastcad run
folder's ``folds.json`` (``--run``), or of breastcad's own grouped split of
``--data`` (audit, conflicting groups left out, StratifiedGroupKFold over
duplicate groups), and the images decoded once by breastcad's loader into one
``inputs.npz``. Each contender runs in its own process (its peak memory is its
own) and trains the first ``--folds`` outer folds for ``--epochs`` epochs with
breastcad's settings (AdamW, warm-up + cosine, label smoothing, class weights,
augmentation, batch size), choosing the epoch on the inner validation part.
This process then scores all of them alike: temperature fitted on the
validation logits, pooled out-of-fold ROC AUC with a 95% bootstrap CI over
duplicate groups (breastcad.metrics), and the paired difference to breastcad.

Writes ``OUT/NAME.json``, ``OUT/NAME.md`` (the table) and ``OUT/NAME.png``
(bar chart); NAME is ``frameworks`` unless ``--name`` says otherwise, and
``--rescore`` scores the records of an earlier run in ``--work`` again. A
contender whose environment is missing is refused before anything runs: one
line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCHMARKS = HERE.parent
ENVS = HERE / "envs"
REFERENCE = "pytorch-eager"  # breastcad itself: what the others are compared with
SPEED_RIVAL = "keras-tensorflow"  # the study's own framework
SPEED_TARGET = 1.5  # breastcad's training throughput / Keras-TensorFlow's, at least


class BenchError(Exception):
    """A refusal shown to the user as one line (exit status 2)."""


@dataclass(frozen=True)
class Contender:
    name: str
    label: str
    script: str
    packages: tuple[str, ...]  # distributions whose closure is the install size
    env: str | None = None  # its own environment under envs/ (None: the project's .venv)
    backend: str | None = None  # KERAS_BACKEND
    compile: bool = False

    def python(self) -> Path:
        return ENVS / self.env / "bin" / "python" if self.env else Path(sys.executable)


CONTENDERS = {
    c.name: c
    for c in (
        Contender("pytorch-eager", "PyTorch eager (breastcad)", "torch_worker.py", ("torch",)),
        Contender(
            "pytorch-compile",
            "PyTorch + torch.compile",
            "torch_worker.py",
            ("torch",),
            compile=True,
        ),
        Contender(
            "keras-tensorflow",
            "Keras 3 / TensorFlow",
            "keras_worker.py",
            ("keras", "tensorflow-cpu"),
            env="keras-tensorflow",
            backend="tensorflow",
        ),
        Contender(
            "keras-jax",
            "Keras 3 / JAX",
            "keras_worker.py",
            ("keras", "jax", "jaxlib"),
            env="keras-jax",
            backend="jax",
        ),
        Contender(
            "keras-torch",
            "Keras 3 / PyTorch",
            "keras_worker.py",
            ("keras", "torch"),
            env="keras-torch",
            backend="torch",
        ),
        Contender(
            "onnxruntime",
            "ONNX Runtime (inference)",
            "onnx_worker.py",
            ("onnxruntime",),
        ),
    )
}


# ---------------------------------------------------------------- arguments and refusals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--run", help="a breastcad run folder: its folds.json gives the folds")
    src.add_argument("--data", help="dataset to split with breastcad (default: the bundled copy)")
    ap.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated, from: {', '.join(CONTENDERS)} (default: all)",
    )
    ap.add_argument("--folds", type=int, default=2, help="outer folds to run (the first K)")
    ap.add_argument(
        "--cv-folds",
        type=int,
        default=5,
        help="outer folds of the split made for --data (default 5)",
    )
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--size", type=int, default=128, help="input side in pixels (basic_cnn: 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-batch", type=int, default=64, help="batch of the inference timing")
    ap.add_argument(
        "--keras-precision",
        choices=("float32", "mixed_bfloat16"),
        default="float32",
        help="Keras dtype policy (default: Keras' own, float32)",
    )
    ap.add_argument(
        "--torch-bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="PyTorch contenders' train.bf16 (default: breastcad's own, auto)",
    )
    ap.add_argument("--name", default="frameworks", help="file stem of the results")
    ap.add_argument(
        "--rescore",
        action="store_true",
        help="score the records already in --work again (same folds) instead of running",
    )
    ap.add_argument(
        "--work",
        default="runs/bench-frameworks",
        help="scratch folder: inputs, jobs, logs, fold models",
    )
    ap.add_argument(
        "--out", default=str(BENCHMARKS / "results"), help="where frameworks.json/.md/.png go"
    )
    ap.add_argument("--cache-dir", help="breastcad's decoded-image cache (default: its own)")
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per contender")
    args = ap.parse_args(argv)
    if args.folds < 1 or args.epochs < 1 or args.size < 16 or args.eval_batch < 1:
        ap.error("need --folds >= 1, --epochs >= 1, --size >= 16, --eval-batch >= 1")
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    return args


def env_marker(c: Contender) -> Path | None:
    return ENVS / c.env / ".installed" if c.env else None


def check_contenders(names: list[str]) -> list[Contender]:
    """The contenders in run order, or a one-line refusal naming what is missing."""
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise BenchError(
            f"unknown contender {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}"
        )
    if not names:
        raise BenchError("no contender given")
    chosen = [CONTENDERS[n] for n in CONTENDERS if n in names]  # the defined order
    missing = [c for c in chosen if c.env and not env_marker(c).is_file()]
    if missing:
        envs = " ".join(c.env for c in missing)
        paths = ", ".join(
            str((ENVS / c.env).relative_to(Path.cwd().resolve()))
            if (ENVS / c.env).is_relative_to(Path.cwd().resolve())
            else str(ENVS / c.env)
            for c in missing
        )
        raise BenchError(
            f"environment missing for {', '.join(c.name for c in missing)} ({paths}); "
            f"create it with `benchmarks/frameworks/setup_envs.sh {envs}` or run "
            "`make bench-frameworks`"
        )
    if "onnxruntime" in names and REFERENCE not in names:
        raise BenchError(
            f"onnxruntime runs the fold models that {REFERENCE} trains; add {REFERENCE} to "
            "--contenders"
        )
    if "pytorch-compile" in names and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise BenchError("pytorch-compile needs a C++ compiler for torch.compile (g++ or clang++)")
    return chosen


# ---------------------------------------------------------------- folds and inputs


def folds_from_data(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """breastcad's own audit and grouped split of ``--data``, as a run's folds.json."""
    from breastcad.config import load_config, with_model_defaults
    from breastcad.experiment import folds_document, prepare_data
    from breastcad.io import atomic_write_json

    pairs: list[tuple[str, Any]] = [("seed", args.seed), ("cv.folds", args.cv_folds)]
    if args.data:
        pairs.append(("data.path", str(Path(args.data).resolve())))
    cfg = with_model_defaults(load_config(None, pairs))
    _, _, ds, plans = prepare_data(cfg, progress=False, log=lambda *_: None)
    doc = folds_document(ds, plans, cfg)
    doc["seed"] = args.seed
    atomic_write_json(work / "folds.json", doc)
    return doc


def folds_from_run(run: Path) -> dict[str, Any]:
    path = run / "folds.json"
    if not path.is_file():
        raise BenchError(f"{run}: not a breastcad run folder (no folds.json)")
    doc = json.loads(path.read_text(encoding="utf-8"))
    config = run / "config.yaml"
    if config.is_file():
        import yaml

        doc["seed"] = int((yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("seed", 0))
    return doc


def fold_indices(doc: dict[str, Any], k: int) -> dict[str, Any]:
    """train / val / test indices of outer fold ``k`` (first repeat) from a folds document."""
    import numpy as np

    rep = doc["repeats"][0]
    test_fold = np.asarray(rep["test_fold"])
    in_val = np.array([f"val@{k};" in v for v in rep["inner_validation_in_folds"]])
    test = np.flatnonzero(test_fold == k)
    val = np.flatnonzero(in_val & (test_fold != k))
    train = np.flatnonzero(~in_val & (test_fold != k))
    return {"train": train, "val": val, "test": test}


def write_inputs(args: argparse.Namespace, doc: dict[str, Any], work: Path) -> dict[str, Any]:
    """Decode the images once (breastcad's cache) and write inputs.npz for every contender."""
    import numpy as np

    from breastcad.data.cache import load_stack
    from breastcad.data.splits import FoldPlan, assert_no_group_leak

    if doc.get("task") != "benign-vs-malignant":
        raise BenchError(f"folds of task {doc.get('task')!r}; the benchmark is benign-vs-malignant")
    n_folds = int(doc["n_folds"])
    if args.folds > n_folds:
        raise BenchError(f"--folds {args.folds}: the split has only {n_folds} outer folds")
    samples = doc["samples"]
    groups = [s["group"] for s in samples]
    arrays: dict[str, Any] = {"targets": np.array([s["target"] for s in samples], np.int64)}
    for k in range(args.folds):
        idx = fold_indices(doc, k)
        plan = FoldPlan(repeat=0, seed=0, fold=k, **idx)
        assert_no_group_leak(plan, groups)  # the folds must be grouped, as breastcad makes them
        arrays.update({f"{part}_{k}": v for part, v in idx.items()})
    t0 = time.perf_counter()
    arrays["images"] = load_stack(
        [s["path"] for s in samples],
        [s["sha256"] for s in samples],
        args.size,
        args.cache_dir,
        workers=os.cpu_count() or 1,
    )
    np.savez(work / "inputs.npz", **arrays)
    return {
        "n_images": len(samples),
        "n_groups": len(set(groups)),
        "n_positive": int(arrays["targets"].sum()),
        "n_folds_in_split": n_folds,
        "decode_seconds": time.perf_counter() - t0,
        "groups": groups,
        "targets": arrays["targets"],
        "folds": [
            {k: arrays[f"{k}_{f}"] for k in ("train", "val", "test")} for f in range(args.folds)
        ],
    }


def benchmark_config(args: argparse.Namespace, seed: int, c: Contender, n_folds: int) -> Any:
    """breastcad's defaults for basic_cnn, the shortened schedule and the contender's switch."""
    from breastcad.config import load_config, with_model_defaults

    pairs = [
        ("seed", seed),
        ("data.image_size", args.size),
        ("cv.folds", n_folds),
        ("train.epochs", args.epochs),
        ("train.patience", args.epochs),  # no early stop: every contender trains every epoch
        ("train.device", "cpu"),
        ("train.compile", c.compile),
        ("train.bf16", args.torch_bf16),
        ("eval.tta", False),  # one forward pass per image everywhere
    ]
    return with_model_defaults(load_config(None, pairs))


# ---------------------------------------------------------------- running the contenders


def run_contender(
    args: argparse.Namespace, c: Contender, cfg: Any, work: Path
) -> tuple[dict[str, Any] | None, str]:
    """Run one worker in its own process; (its record, or None, and a one-line status)."""
    folder = work / c.name
    shutil.rmtree(folder, ignore_errors=True)  # no stale fold models or resume state
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    job = {
        "contender": c.name,
        "inputs": str(work / "inputs.npz"),
        "folds": list(range(args.folds)),
        "epochs": args.epochs,
        "eval_batch": args.eval_batch,
        "keras_precision": args.keras_precision,
        "config": cfg.to_dict(),
        "config_yaml": str(folder / "config.yaml"),
        "work_dir": str(folder),
        "models_dir": str(work / REFERENCE),
        "out": str(folder / "record.json"),
    }
    (folder / "job.json").write_text(json.dumps(job, indent=1), encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": str(HERE),
        "KERAS_HOME": str(work / "keras-home"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    if c.backend:
        env["KERAS_BACKEND"] = c.backend
    log = folder / "log.txt"
    launched = time.time()
    with open(log, "w", encoding="utf-8") as fh:
        try:
            proc = subprocess.run(
                [str(c.python()), str(HERE / c.script), str(folder / "job.json")],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=args.timeout,
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.time() - launched
    record_path = Path(job["out"])
    if rc != 0 or not record_path.is_file():
        why = "timed out" if rc is None else f"exit {rc}"
        return None, f"{c.name} failed ({why}): {last_line(log)} [log: {log}]"
    record = json.loads(record_path.read_text(encoding="utf-8"))
    record.update(launched=launched, wall_seconds=wall)
    return record, f"{c.name} done in {wall:.0f} s"


def save_record(record: dict[str, Any], path: Path) -> None:
    """The worker's record with the orchestrator's own measurements, for --rescore."""
    path.write_text(json.dumps(record), encoding="utf-8")


def saved_record(c: Contender, work: Path) -> tuple[dict[str, Any] | None, str]:
    path = work / c.name / "record.json"
    if not path.is_file():
        return None, f"{c.name}: no record to rescore ({path})"
    record = json.loads(path.read_text(encoding="utf-8"))
    if "launched" not in record:
        return None, f"{c.name}: {path} is a worker's record without the orchestrator's timing"
    return record, f"{c.name}: record of {time.ctime(record['launched'])} rescored"


def last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [ln for ln in lines if ln]
    return lines[-1][:300] if lines else "no output"


def install_size(c: Contender) -> dict[str, Any]:
    """Bytes of the contender's framework closure in its environment (and the whole env)."""
    proc = subprocess.run(
        [str(c.python()), str(HERE / "install_size.py"), *c.packages],
        capture_output=True,
        text=True,
    )
    out: dict[str, Any] = {"packages": list(c.packages)}
    if proc.returncode == 0:
        doc = json.loads(proc.stdout)
        out.update(closure_mb=doc["bytes"] / 2**20, distributions=sorted(doc["distributions"]))
    if c.env:
        out["env_mb"] = (
            sum(
                p.stat().st_size
                for p in (ENVS / c.env).rglob("*")
                if p.is_file() and not p.is_symlink()
            )
            / 2**20
        )
    return out


# ---------------------------------------------------------------- scoring


def pooled_probabilities(record: dict[str, Any], inputs: dict[str, Any]) -> Any:
    """Calibrated p(malignant) for every test index of the run folds (NaN elsewhere)."""
    import numpy as np

    from breastcad.metrics import apply_temperature, fit_temperature

    p = np.full(len(inputs["targets"]), np.nan)
    for fold, idx in zip(record["folds"], inputs["folds"], strict=True):
        if fold.get("test_probs") is not None:  # already calibrated (ONNX graph)
            probs = np.asarray(fold["test_probs"])
        else:
            val = np.asarray(fold["val_logits"])
            t = fit_temperature(val, inputs["targets"][idx["val"]])
            probs = apply_temperature(np.asarray(fold["test_logits"]), t)
        p[idx["test"]] = probs[:, 1]
    return p


def train_throughput(record: dict[str, Any]) -> tuple[float, bool]:
    """Training images/s over every epoch after each fold's first; (value, warm-up excluded)."""
    epochs = [e for f in record["folds"] for e in f["epochs"]]
    later = [e for e in epochs if e["epoch"] > 1]
    use = later or epochs
    seconds = sum(e["seconds"] for e in use)
    return (sum(e["images"] for e in use) / seconds if seconds else float("nan")), bool(later)


def score(
    records: dict[str, dict[str, Any]], inputs: dict[str, Any], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    import numpy as np

    from breastcad.metrics import bootstrap_metrics, paired_bootstrap_auc_difference

    tested = np.concatenate([f["test"] for f in inputs["folds"]])
    y = inputs["targets"][tested]
    groups = np.asarray(inputs["groups"], dtype=object)[tested]
    full = {name: pooled_probabilities(r, inputs) for name, r in records.items()}
    probs = {name: p[tested] for name, p in full.items()}
    rows: dict[str, dict[str, Any]] = {}
    for name, r in records.items():
        auc = bootstrap_metrics(
            y, probs[name], groups, 0.5, n_boot=args.n_bootstrap, seed=args.seed
        )["roc_auc"]
        row: dict[str, Any] = {"auc": auc.value, "auc_low": auc.low, "auc_high": auc.high}
        if name != REFERENCE and REFERENCE in probs:
            d = paired_bootstrap_auc_difference(
                y, probs[name], probs[REFERENCE], groups, n_boot=args.n_bootstrap, seed=args.seed
            )
            row["auc_minus_breastcad"] = {"diff": d.diff, "low": d.low, "high": d.high}
        if REFERENCE in probs:
            row["max_abs_prob_diff_to_breastcad"] = float(
                np.abs(probs[name] - probs[REFERENCE]).max()
            )
        ips, warm = train_throughput(r) if r["folds"] and r["folds"][0]["epochs"] else (None, False)
        inf = r["inference"]
        clock = r["clock"]
        row.update(
            train_images_per_s=ips,
            train_warmup_excluded=warm,
            inference_images_per_s=inf["images"] / inf["seconds"],
            peak_rss_mb=r["peak_rss_mb"],
            seconds_to_first_batch=clock["first_batch_end"] - r["launched"],
            seconds_to_import=clock["imported"] - r["launched"],
            wall_seconds=r["wall_seconds"],
            best_epochs=[f["best_epoch"] for f in r["folds"]],
            per_fold_auc=[
                _auc(inputs["targets"][f["test"]], full[name][f["test"]]) for f in inputs["folds"]
            ],
        )
        rows[name] = row
    return rows


def _auc(y: Any, p: Any) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else float("nan")


def verdicts(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's two targets, checked on these numbers."""
    out = []
    ref = rows.get(REFERENCE)
    if ref is None:
        return ["targets not checked: pytorch-eager (breastcad) did not run"]
    worse = [n for n, r in rows.items() if n != REFERENCE and ref["auc_high"] < r["auc_low"]]
    out.append(
        "accuracy target (breastcad at least as accurate as every contender, overlapping CIs "
        + (
            "count as equal): met"
            if not worse
            else f"count as equal): NOT met ({', '.join(worse)})"
        )
    )
    rival = rows.get(SPEED_RIVAL)
    if rival and rival.get("train_images_per_s") and ref.get("train_images_per_s"):
        ratio = ref["train_images_per_s"] / rival["train_images_per_s"]
        state = "met" if ratio >= SPEED_TARGET else "NOT met"
        out.append(
            f"speed target (training >= {SPEED_TARGET}x Keras/TensorFlow): {state} ({ratio:.2f}x)"
        )
    return out


# ---------------------------------------------------------------- reporting


def _fmt(v: Any, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:,.{digits}f}"


def markdown_table(rows: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table (the README/RESULTS format) and the verdict lines."""
    head = (
        "| contender | precision | pooled OOF ROC-AUC (95% CI) | AUC − breastcad (paired 95% CI) "
        "| training images/s | inference images/s | peak RSS MiB | install MiB "
        "| time to first batch s |"
    )
    lines = [head, "|" + " --- |" * 9]
    for name, r in rows.items():
        d = r.get("auc_minus_breastcad")
        diff = f"{d['diff']:+.3f} ({d['low']:+.3f} to {d['high']:+.3f})" if d else "-"
        diff = "reference" if name == REFERENCE else diff
        size = r["install"].get("closure_mb")
        lines.append(
            f"| {CONTENDERS[name].label} | {r['precision']} | {r['auc']:.3f} "
            f"({r['auc_low']:.3f}–{r['auc_high']:.3f}) | {diff} | "
            f"{_fmt(r['train_images_per_s'], 1) if r['train_images_per_s'] else 'n/a'} | "
            f"{_fmt(r['inference_images_per_s'], 1)} | {_fmt(r['peak_rss_mb'])} | "
            f"{_fmt(size)} | {_fmt(r['seconds_to_first_batch'], 1)} |"
        )
    lines += ["", *(f"- {v}" for v in meta["verdicts"])]
    return "\n".join(lines) + "\n"


def bar_chart(rows: dict[str, dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    labels = [CONTENDERS[n].label for n in names]
    colors = [
        "#1f77b4" if n.startswith("pytorch") else "#7f7f7f" if n == "onnxruntime" else "#d62728"
        for n in names
    ]
    panels = [
        ("pooled OOF ROC-AUC (95% CI)", "auc"),
        ("training images/s", "train_images_per_s"),
        ("inference images/s", "inference_images_per_s"),
        ("time to first batch, s", "seconds_to_first_batch"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(17, 0.55 * len(names) + 1.8), sharey=True)
    for ax, (title, key) in zip(axes, panels, strict=True):
        vals = [rows[n].get(key) or 0.0 for n in names]
        xerr = None
        if key == "auc":
            xerr = [
                [v - rows[n]["auc_low"] for n, v in zip(names, vals, strict=True)],
                [rows[n]["auc_high"] - v for n, v in zip(names, vals, strict=True)],
            ]
        ax.barh(labels, vals, color=colors, xerr=xerr, capsize=3)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis() if ax is axes[0] else None
        if key == "auc":
            ax.set_xlim(0.5, 1.0)
        for i, (n, v) in enumerate(zip(names, vals, strict=True)):
            if v:
                ax.text(
                    rows[n]["auc_high"] if key == "auc" else v,  # beyond the error bar
                    i,
                    f" {v:.3f}" if key == "auc" else f" {v:,.0f}" if v >= 10 else f" {v:.1f}",
                    va="center",
                    fontsize=8,
                )
    fig.suptitle(
        f"basic CNN, {meta['data']}: {meta['folds']} grouped folds x {meta['epochs']} epochs, "
        f"{meta['machine']['cpu']} ({meta['machine']['cores']} cores), {meta['date'][:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, Any]:
    sys.path.insert(0, str(BENCHMARKS))
    import common

    return common.machine_info()


def run(args: argparse.Namespace) -> int:
    chosen = check_contenders(args.contenders)  # refuse before any work
    if args.run and not Path(args.run).is_dir():
        raise BenchError(f"{args.run}: no such run folder")
    if args.data and not os.path.lexists(args.data):
        raise BenchError(f"{args.data}: no such file or folder")
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    doc = folds_from_run(Path(args.run)) if args.run else folds_from_data(args, work)
    inputs = write_inputs(args, doc, work)
    print(
        f"{inputs['n_images']} images in {inputs['n_groups']} groups, "
        f"outer folds 0-{args.folds - 1} of {inputs['n_folds_in_split']}, "
        f"{args.epochs} epochs, {args.size} px (decoded in {inputs['decode_seconds']:.1f} s)",
        flush=True,
    )
    seed = int(doc.get("seed", args.seed))
    records: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for c in chosen:
        if args.rescore:
            record, status = saved_record(c, work)
        else:
            cfg = benchmark_config(args, seed, c, inputs["n_folds_in_split"])
            record, status = run_contender(args, c, cfg, work)
            if record is not None:
                record["install"] = install_size(c)
                save_record(record, work / c.name / "record.json")
        print(status, flush=True)
        if record is None:
            failures.append(status)
            continue
        records[c.name] = record
    if not records:
        raise BenchError("no contender finished: " + "; ".join(failures))
    rows = score(records, inputs, args)
    for name, row in rows.items():
        r = records[name]
        row.update(
            {
                k: r.get(k)
                for k in (
                    "precision",
                    "data_format",
                    "jit_compile",
                    "framework",
                    "determinism",
                    "determinism_switch",
                    "install",
                    "inference",
                    "exports",
                )
            }
        )
        row["peak_rss_children_mb"] = r.get("peak_rss_children_mb")
    meta = {
        "benchmark": "frameworks",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**machine(), "load_average_at_end": os.getloadavg()},
        "data": args.run or args.data or "bundled BUSI copy",
        "folds_source": "folds.json of " + args.run
        if args.run
        else "breastcad's split of the data",
        "folds": args.folds,
        "epochs": args.epochs,
        "size": args.size,
        "seed": seed,
        "n_images": inputs["n_images"],
        "n_groups": inputs["n_groups"],
        "n_test_images": int(sum(len(f["test"]) for f in inputs["folds"])),
        "keras_precision": args.keras_precision,
        "eval_batch": args.eval_batch,
        "wall_seconds": time.time() - t0,
        "failures": failures,
    }
    meta["verdicts"] = verdicts(rows)
    (out / f"{args.name}.json").write_text(
        json.dumps({**meta, "contenders": rows}, indent=2, default=float) + "\n", encoding="utf-8"
    )
    table = markdown_table(rows, meta)
    (out / f"{args.name}.md").write_text(table, encoding="utf-8")
    bar_chart(rows, meta, out / f"{args.name}.png")
    print(table)
    print(f"wrote {out / args.name}.json, .md and .png")
    for f in failures:
        print(f"bench_frameworks: {f}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except BenchError as err:
        print(f"bench_frameworks: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # breastcad's own refusals (bad data) are one line too
        from breastcad.errors import BreastcadError

        if isinstance(err, BreastcadError):
            print(f"bench_frameworks: {err}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
