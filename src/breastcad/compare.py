"""Several models (or settings) on the same grouped folds, and a table that says which is better.

Each variant is a full run (see docs/run-folder.md) in ``OUT/<label>/``. All
variants share every setting that decides the folds (data, task, cv, seed), so
they see identical train/validation/test splits; this is checked from their
``folds.json`` before anything is compared. The AUC difference between each
model and the best one is a paired bootstrap over duplicate groups with the
same resamples for every model; DeLong's test (which assumes independent
images) is shown beside it.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from breastcad.config import Config, load_config, parse_override, with_model_defaults
from breastcad.errors import ConfigError, DataError
from breastcad.io import (
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    ensure_dir,
    read_json,
)
from breastcad.lesion_agreement import read_agreement
from breastcad.metrics import delong_auc_difference, paired_bootstrap_auc_difference, to_dict
from breastcad.pretrained import resolve_pretrained

COMPARE_FILE = "compare.json"
# Settings that decide the folds: a variant may not change them, or the models
# would not be compared on the same images.
FOLD_SETTINGS = ("seed", "data.path", "data.task", "data.keep_conflicts", "data.leaky_image_split")
FOLD_PREFIXES = ("cv.",)
TABLE_METRICS = (
    "roc_auc",
    "accuracy",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
)


@dataclass
class Variant:
    """One contender: a label (its sub-folder) and the settings it changes."""

    label: str
    overrides: list[tuple[str, Any]] = field(default_factory=list)


def parse_variant(text: str) -> Variant:
    """``MODEL`` or ``LABEL=MODEL[,key=value...]``.

    Example: ``basic_cnn-noaug=basic_cnn,augment.enabled=false``.
    """
    text = text.strip()
    if not text:
        raise ConfigError("empty model or variant name")
    label, _, rest = text.partition("=") if "=" in text.split(",")[0] else ("", "", text)
    model, *settings = rest.split(",")
    label = label.strip() or model.strip()
    if not label.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ConfigError(f"variant label {label!r}: use letters, digits, - _ . only")
    overrides = [("model.name", model.strip())] + [parse_override(s) for s in settings if s]
    for key, _ in overrides:
        if key in FOLD_SETTINGS or key.startswith(FOLD_PREFIXES):
            raise ConfigError(
                f"variant {label}: {key} decides the folds and must be the same for every "
                "model; set it for the whole comparison instead"
            )
    return Variant(label, overrides)


def variant_config(base: dict[str, Any], variant: Variant) -> Config:
    """The base settings (a config dict) with the variant's changes applied."""
    pairs = list(_flatten(base)) + variant.overrides
    return load_config(None, pairs)


def _flatten(doc: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in doc.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


# ------------------------------------------------------------------------------ running


def run_comparison(
    base: Config | None,
    variants: list[Variant] | None,
    out: Path,
    progress: bool = True,
    resume: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """Train every variant into ``out/<label>`` (or continue them), then compare."""
    from breastcad.experiment import run_cross_validation

    plan_path = out / COMPARE_FILE
    if resume:
        if not plan_path.exists():
            raise DataError(
                f"{out}: not a comparison folder that can be resumed (no {COMPARE_FILE})"
            )
        plan = read_json(plan_path)
        base_doc = plan["base"]
        variants = [
            Variant(v["label"], [(k, val) for k, val in v["overrides"]]) for v in plan["variants"]
        ]
    else:
        if base is None or not variants:
            raise ConfigError("compare needs at least one model")
        if out.is_dir() and any(not p.name.endswith(".tmp") for p in out.iterdir()):
            raise DataError(
                f"{out}: folder exists and is not empty; continue it with "
                f"`breastcad compare --resume {out}` or choose another --out"
            )
        labels = [v.label for v in variants]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"variant labels must differ: {', '.join(labels)}")
        base_doc = base.to_dict()
        for v in variants:  # every variant's settings are checked before any training
            cfg = with_model_defaults(variant_config(base_doc, v))
            resolve_pretrained(cfg.model.name, cfg.model.pretrained)
        ensure_dir(out)
        atomic_write_json(
            plan_path,
            {
                "base": base_doc,
                "variants": [{"label": v.label, "overrides": v.overrides} for v in variants],
            },
        )
    assert variants is not None
    for i, v in enumerate(variants, 1):
        sub = out / v.label
        if (sub / "metrics.json").exists() and (sub / "report.html").exists():
            log(f"[{i}/{len(variants)}] {v.label}: already done")
            continue
        log(f"[{i}/{len(variants)}] {v.label}")
        if (sub / "config.yaml").exists():
            run_cross_validation(load_config(sub / "config.yaml"), sub, progress, log, resume=True)
        else:
            run_cross_validation(variant_config(base_doc, v), sub, progress, log)
    return write_comparison(out, [v.label for v in variants], log=log)


# ---------------------------------------------------------------------------- comparing


def check_same_folds(out: Path, labels: list[str]) -> None:
    """Every variant must have seen exactly the same samples in exactly the same folds."""
    ref = read_json(out / labels[0] / "folds.json")
    for label in labels[1:]:
        doc = read_json(out / label / "folds.json")
        same = [s["path"] for s in doc["samples"]] == [s["path"] for s in ref["samples"]]
        same = same and [r["test_fold"] for r in doc["repeats"]] == [
            r["test_fold"] for r in ref["repeats"]
        ]
        same = same and [r["inner_validation_in_folds"] for r in doc["repeats"]] == [
            r["inner_validation_in_folds"] for r in ref["repeats"]
        ]
        if not same:
            raise DataError(
                f"{out / label / 'folds.json'}: folds differ from {labels[0]}'s; "
                "models can only be compared on identical folds"
            )


def _oof(run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Labels (positive = 1), calibrated probabilities and groups of repeat 0, in sample order."""
    metrics = read_json(run / "metrics.json")
    pos = metrics["positive_class"]
    with open(run / "oof_predictions.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["repeat"] == "0"]
    prob_key = "prob" if "prob" in rows[0] else f"prob_{pos}"
    y = np.array([int(r["label"] == pos) for r in rows])
    p = np.array([float(r[prob_key]) for r in rows])
    groups = np.array([r["group"] for r in rows])
    return y, p, groups, [r["path"] for r in rows]


def inference_throughput(run: Path, n_images: int = 128, repeats: int = 2) -> float:
    """Images/s of one fold model on this machine (uint8 input to probabilities, batch 64)."""
    import torch

    from breastcad.checkpoint import load_fold_model
    from breastcad.engine import predict_logits, runtime_settings
    from breastcad.predict import fold_dirs

    fold_dir = fold_dirs(run)[0]
    model, card = load_fold_model(fold_dir)
    rt = runtime_settings(load_config(run / "config.yaml").train)
    model.to(rt.device)
    size = int(card["input_size"])
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, size, size), dtype=torch.uint8, generator=gen)
    idx = np.arange(n_images)
    predict_logits(model, images, idx[:8], rt, batch_size=64)  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict_logits(model, images, idx, rt, batch_size=64)
        best = min(best, time.perf_counter() - t0)
    return n_images / best


def _row(label: str, run: Path) -> dict[str, Any]:
    metrics = read_json(run / "metrics.json")
    from breastcad.predict import fold_dirs

    card = read_json(fold_dirs(run)[0] / "card.json")
    cfg = load_config(run / "config.yaml")
    row: dict[str, Any] = {
        "model": label,
        "architecture": card["architecture"],
        "training_mode": card.get("training_mode", "from scratch"),
        "input_size": card["input_size"],
        "epochs": cfg.train.epochs,
        "augmentation": cfg.augment.enabled,
        "parameters": card["parameters"],
    }
    for name in TABLE_METRICS:
        m = metrics["pooled"][name]
        row[name] = m["value"]
        row[f"{name}_low"] = m["low"]
        row[f"{name}_high"] = m["high"]
    timing = metrics.get("timing", {})
    row["train_seconds"] = float(sum(timing.get("fold_seconds", [])))
    row["train_images_per_second"] = float(timing.get("train_images_per_second", math.nan))
    row["threshold"] = metrics["operating_point"]["threshold"]
    agreement = read_agreement(run)
    if agreement is not None:  # Grad-CAM on the lesion masks (docs/explain.md)
        for key in ("pointing_game", "energy_in_lesion"):
            row[key] = (agreement["metrics"].get(key) or {}).get("value")
    return row


def write_comparison(out: Path, labels: list[str], log: Any = print) -> dict[str, Any]:
    """comparison.json/.csv/.md and report.html from finished variant runs."""
    check_same_folds(out, labels)
    base = load_config(out / labels[0] / "config.yaml")
    rows = [_row(label, out / label) for label in labels]
    for row in rows:
        row["inference_images_per_second"] = inference_throughput(out / row["model"])
    oof = {label: _oof(out / label) for label in labels}
    y, _, groups, paths = oof[labels[0]]
    for label in labels[1:]:
        if oof[label][3] != paths:
            raise DataError(f"{out / label}: out-of-fold predictions cover other images")
    best = max(rows, key=lambda r: -math.inf if math.isnan(r["roc_auc"]) else r["roc_auc"])
    n_boot, alpha = base.eval.n_bootstrap, 1 - base.eval.ci_level
    for row in rows:
        p_row, p_best = oof[row["model"]][1], oof[best["model"]][1]
        boot = paired_bootstrap_auc_difference(
            y, p_row, p_best, groups, n_boot=n_boot, seed=base.seed, alpha=alpha
        )
        delong = delong_auc_difference(y, p_row, p_best)
        row.update(
            {
                "auc_diff_vs_best": boot.diff,
                "auc_diff_low": boot.low,
                "auc_diff_high": boot.high,
                "auc_diff_p_bootstrap": boot.p_value,
                "auc_diff_p_delong": delong.p_value,
            }
        )
    rows.sort(key=lambda r: -r["roc_auc"] if not math.isnan(r["roc_auc"]) else math.inf)
    doc = {
        "best": best["model"],
        "n_images": int(len(y)),
        "n_groups": int(len(set(groups.tolist()))),
        "n_positive": int(y.sum()),
        "ci_level": base.eval.ci_level,
        "n_bootstrap": n_boot,
        "difference_method": "paired percentile bootstrap over duplicate groups, the same "
        "resamples for every model; DeLong p-value beside it assumes independent images",
        "rows": rows,
    }
    atomic_write_json(out / "comparison.json", to_dict(doc))
    columns = list(rows[0])
    extra = sorted({k for r in rows for k in r} - set(columns))
    columns += extra
    atomic_write_csv(
        out / "comparison.csv",
        columns,
        [[_csv_value(r.get(c)) for c in columns] for r in rows],
    )
    atomic_write_text(out / "comparison.md", comparison_markdown(doc))
    from breastcad.compare_report import write_compare_report  # matplotlib: only when due

    write_compare_report(out, doc, oof)
    log(comparison_markdown(doc))
    log(f"Comparison: {out / 'comparison.md'}\nReport:     {out / 'report.html'}")
    return doc


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def _params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def _num(v: float | None) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.2f}"


def _ci(row: dict[str, Any], name: str) -> str:
    v, lo, hi = row[name], row[f"{name}_low"], row[f"{name}_high"]
    if v is None or math.isnan(v):
        return "n/a"
    return f"{v:.3f} ({lo:.3f}-{hi:.3f})"


def _diff(row: dict[str, Any], best: str) -> str:
    if row["model"] == best:
        return "best"
    d, lo, hi = row["auc_diff_vs_best"], row["auc_diff_low"], row["auc_diff_high"]
    if math.isnan(d):
        return "n/a"
    real = "real" if hi < 0 else "not shown"
    return (
        f"{d:+.3f} ({lo:+.3f} to {hi:+.3f}), p={row['auc_diff_p_bootstrap']:.3f} "
        f"[DeLong p={row['auc_diff_p_delong']:.3f}]: {real}"
    )


def comparison_markdown(doc: dict[str, Any]) -> str:
    level = int(round(doc["ci_level"] * 100))
    lines = [
        "# Model comparison (pooled out-of-fold test predictions, identical grouped folds)",
        "",
        f"{doc['n_images']} images in {doc['n_groups']} duplicate groups, "
        f"{doc['n_positive']} positive. Values with {level}% CIs (bootstrap over groups, "
        f"{doc['n_bootstrap']} resamples); sensitivity, specificity, precision, F1 and "
        "accuracy at each model's own operating point (chosen on validation data).",
        "",
        "| model | mode | px | epochs | AUC | sensitivity | specificity | precision | F1 | "
        "accuracy | balanced acc. | params | train s | train img/s | infer img/s | "
        "AUC vs best (paired bootstrap) |",
        "|" + "---|" * 16,
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['model']} | {r['training_mode']} | {r['input_size']} | {r['epochs']} | "
            f"{_ci(r, 'roc_auc')} | {_ci(r, 'sensitivity')} | {_ci(r, 'specificity')} | "
            f"{_ci(r, 'precision')} | {_ci(r, 'f1')} | {_ci(r, 'accuracy')} | "
            f"{_ci(r, 'balanced_accuracy')} | {_params(r['parameters'])} | "
            f"{r['train_seconds']:.0f} | {r['train_images_per_second']:.0f} | "
            f"{r['inference_images_per_second']:.0f} | {_diff(r, doc['best'])} |"
        )
    if any("pointing_game" in r for r in doc["rows"]):
        lines += [
            "",
            "Grad-CAM agreement with the lesion masks (test folds): "
            + ", ".join(
                f"{r['model']}: pointing game {_num(r.get('pointing_game'))}, "
                f"energy in lesion {_num(r.get('energy_in_lesion'))}"
                for r in doc["rows"]
            ),
        ]
    lines += [
        "",
        f"A difference is called real when its {level}% interval excludes zero. "
        + doc["difference_method"]
        + ".",
        "",
    ]
    return "\n".join(lines)
