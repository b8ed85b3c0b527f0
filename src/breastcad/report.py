"""The run's plots and its self-contained ``report.html`` (images inlined).

The sample-prediction grid shows each case beside its Grad-CAM overlay (computed by
the fold model that tested it) with the lesion outline; the Grad-CAM/lesion agreement
section appears when ``lesion_agreement.json`` exists (see
:func:`breastcad.lesion_agreement.explain_run`), and is simply left out otherwise.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from breastcad import plots
from breastcad.errors import BreastcadError
from breastcad.io import atomic_write_text, read_json

#: plot key -> file under plots/ (what the template shows)
PLOT_FILES = {
    "curves": "training_curves.png",
    "roc": "roc.png",
    "confusion": "confusion.png",
    "reliability": "reliability.png",
    "samples": "sample_predictions.png",
    "robustness": "robustness.png",  # written by `breastcad robustness`
}


def _sample_grid_cases(
    y_bin: np.ndarray, prob: np.ndarray, threshold: float, per_kind: int = 3
) -> list[tuple[int, bool]]:
    """Indices of correct and wrong cases of both classes: the most confident of each kind."""
    chosen: list[tuple[int, bool]] = []
    decided = prob >= threshold
    for cls in (1, 0):
        for correct in (True, False):
            mask = (y_bin == cls) & ((decided == (cls == 1)) == correct) & np.isfinite(prob)
            idx = np.flatnonzero(mask)
            # confident mistakes and confident successes are the instructive ones
            order = np.argsort(-np.abs(prob[idx] - threshold))
            chosen += [(int(i), correct) for i in idx[order][:per_kind]]
    return chosen


def _case_overlays(
    run_dir: Path, ds: Any, cases: list[tuple[int, bool]], stack: np.ndarray, folds: np.ndarray
) -> tuple[list[np.ndarray] | None, list[np.ndarray | None] | None, str]:
    """Grad-CAM overlays (positive class) of the grid's cases, each by its test-fold model.

    Returns ``(overlays, masks, note)``; ``(None, None, why)`` when the fold models
    cannot be loaded, so the grid falls back to plain images.
    """
    import torch

    from breastcad.checkpoint import load_fold_model
    from breastcad.data.imageio import read_mask
    from breastcad.gradcam import compute_gradcam, overlay_rgb, positive_index

    overlays: dict[int, np.ndarray] = {}
    models: dict[int, tuple[Any, dict[str, Any]]] = {}
    try:
        for i, _ in cases:
            k = int(folds[i])
            if k not in models:
                models[k] = load_fold_model(run_dir / f"fold-{k}")
            model, card = models[k]
            tta = card.get("preprocessing", {}).get("tta", "none") != "none"
            x = torch.from_numpy(np.ascontiguousarray(stack[i : i + 1]))
            heat = compute_gradcam(model, card["architecture"], x, positive_index(card), tta=tta)
            overlays[i] = overlay_rgb(stack[i], heat[0])
    except (BreastcadError, OSError, KeyError, ValueError) as err:
        return None, None, f"Grad-CAM overlays unavailable ({err})"
    masks: list[np.ndarray | None] = []
    for i, _ in cases:
        mp = ds.samples[i].mask_paths
        try:
            masks.append(read_mask(mp, stack[i].shape) if mp else None)
        except BreastcadError:
            masks.append(None)
    return [overlays[i] for i, _ in cases], masks, ""


def make_plots(
    run_dir: Path, ds: Any, results: list[Any], arrays: dict[str, np.ndarray], stack: np.ndarray
) -> dict[str, Path]:
    metrics = read_json(run_dir / "metrics.json")
    pdir = run_dir / "plots"
    pos = ds.task.positive
    threshold = metrics["operating_point"]["threshold"]
    y_bin = (ds.targets == pos).astype(int)
    p_cal = arrays["oof_cal"][0, :, pos]
    p_raw = arrays["oof_raw"][0, :, pos]
    out: dict[str, Path] = {}
    first = [r for r in results if r.plan.repeat == 0]
    histories = [{k: [h[k] for h in r.history] for k in r.history[0]} for r in first]
    out["curves"] = plots.plot_training_curves(
        histories, pdir / "training_curves.png", best_epochs=[r.best_epoch for r in first]
    )
    out["roc"] = plots.plot_roc(
        y_bin, p_cal, pdir / "roc.png", threshold=threshold, fold=arrays["oof_fold"][0]
    )
    binary = ds.task.num_classes == 2
    cm = np.asarray(metrics["confusion"] if binary else metrics["multiclass"]["confusion_matrix"])
    out["confusion"] = plots.plot_confusion(
        cm,
        list(ds.task.classes),
        pdir / "confusion.png",
        title="Confusion matrix (out-of-fold test predictions)",
    )
    out["reliability"] = plots.plot_reliability(y_bin, p_raw, p_cal, pdir / "reliability.png")
    cases = _sample_grid_cases(y_bin, p_cal, threshold)
    pos_name = ds.task.classes[pos]
    titles = [f"{ds.samples[i].label} · p({pos_name})={p_cal[i]:.2f}" for i, _ in cases]
    overlays, masks, note = _case_overlays(run_dir, ds, cases, stack, arrays["oof_fold"][0])
    heading = "Most confident correct and wrong out-of-fold predictions, both classes"
    if overlays is not None:
        heading += f"; right: Grad-CAM of p({pos_name}), lesion outlined"
    elif note:
        heading += f" ({note})"
    out["samples"] = plots.plot_sample_grid(
        [stack[i].astype(np.float32) / 255.0 for i, _ in cases],
        titles,
        [c for _, c in cases],
        pdir / "sample_predictions.png",
        heading=heading,
        overlays=overlays,
        masks=masks,
    )
    return out


def _inline_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_report(run_dir: Path, plot_paths: dict[str, Path]) -> str:
    env = Environment(
        loader=PackageLoader("breastcad", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
    )
    metrics = read_json(run_dir / "metrics.json")
    audit_text = (run_dir / "audit.txt").read_text(encoding="utf-8")
    config_text = (run_dir / "config.yaml").read_text(encoding="utf-8")
    envinfo = read_json(run_dir / "env.json")
    from breastcad.lesion_agreement import LABELS, METRICS, read_agreement

    agreement = read_agreement(run_dir)
    if agreement is not None:
        agreement = {k: v for k, v in agreement.items() if k != "per_image"}
    from breastcad.robustness import read_robustness

    template = env.get_template("report.html.j2")
    return template.render(
        rb=read_robustness(run_dir),
        run_name=html.escape(run_dir.name),
        m=metrics,
        la=agreement,
        la_metrics=[(k, LABELS[k]) for k in METRICS],
        audit_text=audit_text,
        config_text=config_text,
        env=envinfo,
        images={k: _inline_png(v) for k, v in plot_paths.items() if Path(v).is_file()},
        # Optuna's plots of `breastcad tune`, one pair per study (outer folds, final)
        tune_plots=[
            (f.stem.removeprefix("tune_"), _inline_png(f))
            for f in sorted((run_dir / "plots").glob("tune_*.png"))
        ],
    )


def write_report(
    run_dir: Path, ds: Any, results: list[Any], arrays: dict[str, np.ndarray], stack: np.ndarray
) -> Path:
    plot_paths = make_plots(run_dir, ds, results, arrays, stack)
    robustness = run_dir / "plots" / PLOT_FILES["robustness"]
    if robustness.is_file():  # a collected or resumed run keeps its robustness curve
        plot_paths["robustness"] = robustness
    return atomic_write_text(run_dir / "report.html", render_report(run_dir, plot_paths))


def rerender_report(run_dir: Path) -> Path:
    """Write ``report.html`` again from the run's files and existing plots.

    Used after ``lesion_agreement.json`` is added to a finished run, so the report
    shows it without retraining or redrawing anything.
    """
    run_dir = Path(run_dir)
    plot_paths = {k: run_dir / "plots" / name for k, name in PLOT_FILES.items()}
    return atomic_write_text(run_dir / "report.html", render_report(run_dir, plot_paths))
