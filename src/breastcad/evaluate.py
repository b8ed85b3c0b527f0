"""External validation: a trained run applied, unchanged, to another labelled dataset.

``evaluate_run(run_dir, data, out_dir)`` uses the run as the deployable model it is
(docs/run-folder.md): the ensemble of its fold models, each fold's logits divided by
that fold's temperature, the probabilities averaged, and the run's one threshold
(``metrics.json: operating_point.threshold``) turning the probability of the positive
class into a decision. Nothing is fitted on the external data: not the temperatures,
not the threshold, not an epoch, not a preprocessing parameter.

The external data go through the same audit as training data (decoding every file,
exact and near-duplicate groups, manifest patient ids), so that

* unreadable files are listed and the others evaluated;
* every confidence interval resamples the external data's duplicate/patient groups
  (as :func:`breastcad.metrics.bootstrap_metrics` does for the run's own metrics);
* duplicate groups whose members carry different labels are left out (unless the
  run itself kept them, ``data.keep_conflicts``);
* images whose file is byte-identical to one the run trained or was tested on are
  left out and listed: they are not external.

Labels the run's task does not know (e.g. ``normal`` for ``benign-vs-malignant``)
are counted and left out. Outputs: ``evaluation.json``, ``predictions.csv``,
``audit.json``/``audit.txt`` of the external data, ``plots/roc.png``,
``plots/confusion.png``, ``plots/reliability.png`` and a self-contained
``report.html``.
"""

from __future__ import annotations

import base64
import html
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from breastcad.errors import BreastcadError, DataError, printable

FILENAME = "evaluation.json"
PLOTS = {"roc": "roc.png", "confusion": "confusion.png", "reliability": "reliability.png"}
NOTHING_REFIT = (
    "nothing was fitted on the external data: fold models, temperatures and the "
    "decision threshold are the run's own, fixed during training"
)


# ----------------------------------------------------------------------------- scoring


def runtime(threads: int | None = None, device: str | None = None) -> Any:
    """The inference runtime (CPU threads: ``threads`` or one per core)."""
    from breastcad.config import TrainConfig
    from breastcad.engine import runtime_settings

    cfg = TrainConfig()
    if threads:
        cfg.threads = int(threads)
    if device:
        cfg.device = device
    return runtime_settings(cfg)


def fold_probabilities(
    model: Any, card: dict[str, Any], stack: np.ndarray, rt: Any
) -> tuple[np.ndarray, np.ndarray]:
    """One fold model on uint8 inputs (N, S, S): calibrated and raw probabilities (N, C).

    Calibrated is ``softmax(logits / T)`` with the fold's own temperature ``T``; raw is
    ``softmax(logits)``. Test-time augmentation as the card says.
    """
    import torch

    from breastcad.engine import predict_logits
    from breastcad.metrics import apply_temperature

    model.to(rt.device)
    tta = (card.get("preprocessing") or {}).get("tta", "none") != "none"
    logits = predict_logits(model, torch.as_tensor(stack), np.arange(len(stack)), rt, tta=tta)
    return apply_temperature(logits, float(card["temperature"])), apply_temperature(logits, 1.0)


def ensemble_probabilities(ens: Any, stack: np.ndarray, rt: Any) -> tuple[np.ndarray, np.ndarray]:
    """The run's ensemble (mean over folds) on uint8 inputs: calibrated and raw (N, C).

    The calibrated one is exactly :meth:`breastcad.predict.Ensemble.probabilities`.
    """
    n_classes = int(ens.card["num_classes"])
    cal = np.zeros((len(stack), n_classes))
    raw = np.zeros_like(cal)
    for model, card in zip(ens.models, ens.cards, strict=True):
        c, r = fold_probabilities(model, card, stack, rt)
        cal += c
        raw += r
    return cal / len(ens.models), raw / len(ens.models)


# ----------------------------------------------------------------------------- data


def _external_samples(
    audit: Any, task: Any, keep_conflicts: bool, trained_hashes: set[str]
) -> tuple[list[Any], dict[str, Any]]:
    """The audited samples this evaluation scores, and what was left out and why."""
    usable = audit.usable_samples(keep_conflicts=keep_conflicts)
    conflicts = len(audit.samples) - len(usable)
    unknown = Counter(s.label for s in usable if task.target(s.label) is None)
    known = [s for s in usable if task.target(s.label) is not None]
    overlap = [s for s in known if audit.file_sha256.get(s.path) in trained_hashes]
    overlap_paths = {s.path for s in overlap}
    chosen = [s for s in known if s.path not in overlap_paths]
    left_out = {
        "unreadable": [{"path": b.path, "problem": b.problem} for b in audit.bad_files],
        "unknown_labels": dict(sorted(unknown.items())),
        "unknown_label_images": int(sum(unknown.values())),
        "conflicting_label_images": conflicts,
        "in_training_data": [s.path for s in overlap],
    }
    return chosen, left_out


def _decode_stack(
    samples: list[Any], card: dict[str, Any], max_pixels: int, cropper: Any = None
) -> tuple[list[int], np.ndarray, list[dict[str, str]]]:
    """Model inputs (N, S, S) uint8 of the samples that decode now; the others listed.

    ``cropper``: a lesion-crop run's segmentation models, which find each lesion.
    """
    from breastcad.data.cache import prepare_for_model
    from breastcad.data.imageio import read_image
    from breastcad.errors import ImageReadError

    kept, arrays, bad = [], [], []
    for i, s in enumerate(samples):
        try:
            arrays.append(
                prepare_for_model(read_image(s.path, max_pixels=max_pixels), card, cropper)
            )
            kept.append(i)
        except ImageReadError as err:
            bad.append({"path": s.path, "problem": err.problem})
    size = int(card["input_size"])
    stack = np.stack(arrays) if arrays else np.zeros((0, size, size), np.uint8)
    return kept, stack, bad


def _check_out_dir(out_dir: Path) -> None:
    """A new or empty folder, or one that holds an earlier evaluation (then refreshed)."""
    if out_dir.is_file():
        raise BreastcadError(f"{out_dir}: is a file; --out must name a folder")
    if out_dir.is_dir():
        entries = [p for p in out_dir.iterdir() if not p.name.endswith(".tmp")]
        if entries and not (out_dir / FILENAME).is_file():
            raise BreastcadError(
                f"{out_dir}: folder exists, is not empty and holds no earlier evaluation; "
                "choose another --out"
            )


def default_out_dir(run_dir: Path, data: str | os.PathLike[str]) -> Path:
    """``RUN/external/<name of the data>``: external results stay with the model."""
    name = Path(str(data)).resolve().name
    stem = Path(name).stem if name.lower().endswith(".csv") else name
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "data"
    return run_dir / "external" / safe


# ----------------------------------------------------------------------------- main


def evaluate_run(
    run_dir: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    threads: int | None = None,
    device: str | None = None,
    progress: bool = False,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Apply the run, unchanged, to ``data`` (folder or CSV manifest); write the outputs.

    Returns the ``evaluation.json`` document.
    """
    from breastcad.data.audit import run_audit
    from breastcad.data.imageio import DEFAULT_MAX_PIXELS
    from breastcad.data.records import get_task
    from breastcad.data.sources import load_source
    from breastcad.io import atomic_write_json, atomic_write_text, ensure_dir, read_json
    from breastcad.lesion_agreement import _read_config
    from breastcad.metrics import (
        binary_metrics,
        bootstrap_metrics,
        classification_report_text,
        multiclass_metrics,
        to_dict,
    )
    from breastcad.predict import decide, load_ensemble

    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise BreastcadError(f"{run_dir}: not a finished run folder (no metrics.json)")
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dir, data)
    _check_out_dir(out)

    ens = load_ensemble(run_dir)
    run_metrics = read_json(run_dir / "metrics.json")
    cfg = _read_config(run_dir)
    data_cfg, eval_cfg = cfg.get("data") or {}, cfg.get("eval") or {}
    seed = int(cfg.get("seed") or 0)
    max_pixels = int(data_cfg.get("max_pixels") or DEFAULT_MAX_PIXELS)
    n_boot = int(eval_cfg.get("n_bootstrap") or 1000)
    level = float(eval_cfg.get("ci_level") or 0.95)
    keep_conflicts = bool(data_cfg.get("keep_conflicts", False))
    card = ens.card
    task = get_task(card["task"])
    classes = list(card["class_names"])
    pos = classes.index(card["positive_class"])
    mode = (card.get("preprocessing") or {}).get("mode", "stretch")

    trained: set[str] = set()
    folds_path = run_dir / "folds.json"
    if folds_path.is_file():
        trained = {str(s.get("sha256")) for s in read_json(folds_path).get("samples", [])}

    source = load_source(data)
    audit = run_audit(source, max_pixels=max_pixels, progress=progress, preprocess=mode)
    samples, left_out = _external_samples(audit, task, keep_conflicts, trained)
    say(audit.summary_text())
    if left_out["unknown_label_images"]:
        what = ", ".join(f"{k} ({v})" for k, v in left_out["unknown_labels"].items())
        say(f"left out, labels the task {task.name} does not know: {what}")
    if left_out["in_training_data"]:
        say(f"left out, files identical to the run's own data: {len(left_out['in_training_data'])}")
    if not samples:
        raise DataError(
            f"{source.root}: no external image with a label of task {task.name} "
            f"({', '.join(task.label_map)}) left to evaluate"
        )

    kept, stack, late_bad = _decode_stack(samples, card, max_pixels, ens.cropper)
    left_out["unreadable"] += late_bad
    samples = [samples[i] for i in kept]
    if not samples:
        raise DataError(f"{source.root}: none of the external images could be read")
    rt = runtime(threads, device)
    cal, raw = ensemble_probabilities(ens, stack, rt)
    decisions = decide(cal, ens)

    targets = np.array([task.target(s.label) for s in samples], dtype=np.int64)
    y_bin = (targets == pos).astype(int)
    p = np.clip(cal[:, pos], 0.0, 1.0)
    groups = np.array([str(s.group) for s in samples])
    threshold = float(ens.threshold)
    point = binary_metrics(y_bin, p, threshold)
    cis = bootstrap_metrics(y_bin, p, groups, threshold, n_boot=n_boot, seed=seed, alpha=1 - level)
    raw_auc = binary_metrics(y_bin, np.clip(raw[:, pos], 0, 1), threshold).roc_auc

    run_op = run_metrics.get("operating_point", {})
    doc: dict[str, Any] = {
        "kind": "external-validation",
        "run": str(run_dir),
        "data": {
            "source": str(source.root),
            "source_kind": source.kind,
            "images_found": audit.n_found,
            "images_readable": len(audit.samples),
            "per_class": audit.class_counts(),
            "duplicate_groups": len(audit.duplicate_groups),
            "left_out": left_out,
        },
        "model": {
            "name": ens.name,
            "version": ens.version,
            "members": ens.members,
            "temperatures": [float(c["temperature"]) for c in ens.cards],
            "input_size": int(card["input_size"]),
            "preprocessing": card.get("preprocessing", {}),
        },
        "task": task.name,
        "classes": classes,
        "positive_class": classes[pos],
        "n_images": int(len(samples)),
        "n_groups": int(len(set(groups.tolist()))),
        "n_positive": int(y_bin.sum()),
        "per_class_evaluated": dict(sorted(Counter(s.label for s in samples).items())),
        "operating_point": {
            "threshold": threshold,
            "target_sensitivity": run_op.get("target_sensitivity"),
            "chosen_on": run_op.get("chosen_on"),
            "source": "the run's metrics.json, unchanged",
            "external_sensitivity": point.sensitivity,
            "external_specificity": point.specificity,
            "cross_validated_sensitivity": run_op.get("test_sensitivity"),
            "cross_validated_specificity": run_op.get("test_specificity"),
        },
        "refit": NOTHING_REFIT,
        "pooled": {k: to_dict(v) for k, v in cis.items()},
        "confusion": [[point.tn, point.fp], [point.fn, point.tp]],
        "roc_auc_uncalibrated": raw_auc,
        "cross_validated": {
            "pooled": run_metrics.get("pooled", {}),
            "n_images": run_metrics.get("n_images"),
            "n_groups": run_metrics.get("n_groups"),
        },
        "ci": {
            "level": level,
            "method": "percentile bootstrap over the external data's duplicate/patient groups",
            "n_bootstrap": n_boot,
        },
    }
    if len(classes) == 2:
        doc["classification_report"] = classification_report_text(
            y_bin, (p >= threshold).astype(int), classes
        )
    elif len(set(targets.tolist())) >= 2:
        doc["multiclass"] = to_dict(multiclass_metrics(targets, cal, classes))
    if ens.cropper is not None:  # a lesion-crop run: how often no lesion was found
        doc["lesion_crop"] = {"model_inputs": dict(ens.cropper.counts)}
    doc["segmentation"] = _segmentation_part(run_dir, samples, max_pixels, rt, n_boot, seed, level)
    doc["limits"] = _limits(doc)

    ensure_dir(out)
    audit.write(out / "audit.json")
    atomic_write_text(out / "audit.txt", audit.summary_text() + "\n")
    _write_predictions(out / "predictions.csv", samples, groups, classes, pos, cal, raw, decisions)
    plot_paths = _make_plots(out, y_bin, p, raw[:, pos], doc)
    doc["seconds"] = round(time.perf_counter() - t0, 2)
    atomic_write_json(out / FILENAME, doc)
    atomic_write_text(out / "report.html", render_report(out, doc, plot_paths))
    doc["out_dir"] = str(out)
    return doc


def _limits(doc: dict[str, Any]) -> list[str]:
    out = [
        "The threshold was chosen for the run's target sensitivity on the run's own data; "
        "at another site the same threshold can give a different sensitivity, as measured here.",
        "Temperatures were fitted on the run's own validation data; the reliability diagram "
        "and the ECE show how well they carry over.",
    ]
    if doc["n_positive"] == 0 or doc["n_positive"] == doc["n_images"]:
        out.append("Only one class was evaluated: ROC-AUC and balanced accuracy are undefined.")
    if doc["n_groups"] == doc["n_images"]:
        out.append(
            "No duplicates or patient ids were found in the external data, so every image is "
            "its own group; several images of one woman, if present, make the intervals too "
            "narrow (give a patient_id column in a CSV manifest)."
        )
    return out


def _write_predictions(
    path: Path,
    samples: list[Any],
    groups: np.ndarray,
    classes: list[str],
    pos: int,
    cal: np.ndarray,
    raw: np.ndarray,
    decisions: list[str],
) -> None:
    from breastcad.io import atomic_write_csv

    binary = len(classes) == 2
    prob_cols = ["prob"] if binary else [f"prob_{c}" for c in classes]
    raw_cols = ["prob_raw"] if binary else [f"prob_raw_{c}" for c in classes]
    header = ["path", "group", "label", *prob_cols, *raw_cols, "decision", "correct"]
    rows = []
    for i, s in enumerate(samples):
        probs = [cal[i, pos]] if binary else list(cal[i])
        raws = [raw[i, pos]] if binary else list(raw[i])
        rows.append(
            [s.path, groups[i], s.label, *(f"{v:.9f}" for v in probs),
             *(f"{v:.9f}" for v in raws), decisions[i], int(decisions[i] == s.label)]
        )  # fmt: skip
    atomic_write_csv(path, header, rows)


def _make_plots(
    out: Path, y_bin: np.ndarray, p: np.ndarray, p_raw: np.ndarray, doc: dict[str, Any]
) -> dict[str, Path]:
    from breastcad import plots

    pdir = out / "plots"
    cm = doc["multiclass"]["confusion_matrix"] if "multiclass" in doc else doc["confusion"]
    return {
        "roc": plots.plot_roc(
            y_bin, p, pdir / PLOTS["roc"], threshold=doc["operating_point"]["threshold"],
            label="external data",
        ),
        "confusion": plots.plot_confusion(
            np.asarray(cm), doc["classes"], pdir / PLOTS["confusion"],
            title="Confusion matrix (external data, the run's threshold)",
        ),
        "reliability": plots.plot_reliability(y_bin, p_raw, p, pdir / PLOTS["reliability"]),
    }  # fmt: skip


def _inline_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def render_report(out: Path, doc: dict[str, Any], plot_paths: dict[str, Path]) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(
        loader=PackageLoader("breastcad", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
    )
    audit_path = out / "audit.txt"
    names = list(doc["pooled"])
    return env.get_template("evaluate.html.j2").render(
        title=html.escape(Path(doc["data"]["source"]).name),
        d=doc,
        metric_names=names,
        run_name=Path(doc["run"]).name,
        audit_text=audit_path.read_text(encoding="utf-8") if audit_path.is_file() else "",
        images={k: _inline_png(v) for k, v in plot_paths.items() if Path(v).is_file()},
        shown=printable,
    )


# ----------------------------------------------------------------------------- segmentation


def _segmentation_part(
    run_dir: Path,
    samples: list[Any],
    max_pixels: int,
    rt: Any,
    n_boot: int,
    seed: int,
    level: float,
) -> dict[str, Any]:
    """Dice/IoU of the run's segmentation models on the external masks, when both exist."""
    with_mask = [s for s in samples if s.mask_paths]
    if not with_mask:
        return {"computed": False, "why": "the external data give no lesion masks"}
    try:
        from breastcad import segmentation
    except ImportError:  # pragma: no cover - the module ships with the package
        return {"computed": False, "why": "segmentation is not available in this version"}
    if not segmentation.has_models(run_dir):
        return {
            "computed": False,
            "why": "the run has no segmentation model (train one with "
            "`breastcad segment RUN --train`)",
        }
    return segmentation.evaluate_masks(
        run_dir, with_mask, max_pixels=max_pixels, rt=rt, n_boot=n_boot, seed=seed, level=level
    )
