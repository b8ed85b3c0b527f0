"""Grouped cross-validation of one model -> a run folder (see docs/run-folder.md).

Order of events, chosen so the test folds never decide anything:
1. audit the data; conflicting-label duplicate groups are left out;
2. grouped stratified folds; inside each training part, a grouped validation split;
3. per fold: train, choose the epoch by validation AUC, fit the temperature on
   validation logits, then predict the test fold once;
4. one decision threshold per run, from the pooled validation predictions of
   all folds (a single small validation split holds only a handful of
   malignant images);
5. metrics on the pooled out-of-fold test predictions, with CIs by bootstrap
   over duplicate groups.
"""

from __future__ import annotations

import copy
import csv
import errno
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from breastcad import __version__, distributed
from breastcad.checkpoint import load_resume_state, save_fold_model, save_resume_state
from breastcad.config import Config, training_mode, with_model_defaults
from breastcad.data.audit import AuditReport, run_audit
from breastcad.data.cache import load_stack, preprocessing_card
from breastcad.data.patches import card_entry as patch_card_entry
from breastcad.data.records import Sample, Task, get_task
from breastcad.data.sources import load_source
from breastcad.data.splits import FoldPlan, assert_no_group_leak, make_folds
from breastcad.engine import Runtime, predict_logits, runtime_settings, train_one_epoch
from breastcad.envinfo import environment
from breastcad.errors import BreastcadError, ConfigError, DataError
from breastcad.io import (
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    ensure_dir,
    read_json,
    remove_stale_temp_files,
)
from breastcad.metrics import (
    apply_temperature,
    binary_metrics,
    bootstrap_metrics,
    classification_report_text,
    fit_temperature,
    multiclass_metrics,
    threshold_for_sensitivity,
    to_dict,
)
from breastcad.models import count_parameters, create_model, param_groups
from breastcad.pretrained import resolve_pretrained

DONE = "DONE"
RESUME = "resume.pt"


@dataclass
class Dataset:
    samples: list[Sample]
    targets: np.ndarray
    groups: list[str]
    hashes: list[str]
    task: Task


@dataclass
class FoldResult:
    plan: FoldPlan
    temperature: float
    best_epoch: int
    history: list[dict[str, float]]
    val_logits: np.ndarray
    test_logits: np.ndarray
    seconds: float
    images_per_second: float


@dataclass
class RunSummary:
    run_dir: Path
    metrics: dict[str, Any]
    fold_seconds: list[float] = field(default_factory=list)
    images_per_second: float = 0.0


def select_task_samples(audit: AuditReport, cfg: Config) -> Dataset:
    task = get_task(cfg.data.task)
    usable = audit.usable_samples(keep_conflicts=cfg.data.keep_conflicts)
    chosen = [s for s in usable if task.target(s.label) is not None]
    if not chosen:
        found = sorted({s.label for s in usable})
        raise DataError(
            f"no images with labels {', '.join(task.label_map)} for task {task.name}; "
            f"found labels: {', '.join(found) or 'none'}"
        )
    targets = np.array([task.target(s.label) for s in chosen], dtype=np.int64)
    present = set(targets.tolist())
    if len(present) < 2:
        only = task.classes[next(iter(present))]
        raise DataError(f"only one class ({only}) left for task {task.name}; need at least two")
    return Dataset(
        samples=chosen,
        targets=targets,
        # The leaky split exists only to show how much it inflates results.
        groups=[s.path if cfg.data.leaky_image_split else str(s.group) for s in chosen],
        hashes=[audit.file_sha256[s.path] for s in chosen],
        task=task,
    )


def _auc_or_nan(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def _class_weights(targets: np.ndarray, num_classes: int) -> torch.Tensor:
    counts = np.bincount(targets, minlength=num_classes).astype(np.float64)
    weights = counts.sum() / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32)


def _parameter_groups(model: torch.nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """Head at lr, backbone at lr x backbone_lr_factor; only trainable parameters."""
    if getattr(model, "breastcad_classifier", ""):
        return param_groups(model, cfg.train.lr, cfg.train.backbone_lr_factor)
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.train.lr}]


def train_fold(
    cfg: Config,
    ds: Dataset,
    images: torch.Tensor,
    plan: FoldPlan,
    rt: Runtime,
    fold_dir: Path | None,
    progress: bool,
    on_epoch: Callable[[int, float], None] | None = None,
) -> FoldResult:
    """Train one fold; choose the epoch on ``plan.val``; calibrate; predict ``plan.test``.

    With ``fold_dir`` None (a tuning trial) nothing is written, nothing is
    resumed and the fold stops after choosing its epoch (no test prediction).
    ``on_epoch(epoch, val_auc)`` is called after every epoch (it may raise to stop).
    """
    t_start = time.perf_counter()
    seed = cfg.seed * 1000 + plan.repeat * 100 + plan.fold
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    num_classes = ds.task.num_classes
    options = {
        "width": cfg.model.width,
        "depth": cfg.model.depth,
        "kernel_size": cfg.model.kernel_size,
        "dense_units": cfg.model.dense_units,
        "dropout": cfg.model.dropout,
    }
    model = create_model(
        cfg.model.name,
        num_classes,
        1,
        pretrained=cfg.model.pretrained,
        freeze_backbone=cfg.model.freeze_backbone,
        **options,
    ).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    world = rt.world
    net = model  # what trains: the model itself, or DDP around it under torchrun
    if world.enabled:
        # batch norm and dropout of the global batch: the same maths as one process
        model = distributed.convert_for_global_batch(model, rt.device.type)
        net = distributed.wrap(model, rt.device)
    if cfg.train.compile:
        model.compile()  # in place: the state-dict keys stay the same for saving and resuming
    optimizer = torch.optim.AdamW(
        _parameter_groups(model, cfg), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # the schedule scales each group's own peak
    targets = torch.from_numpy(ds.targets)
    weights = (
        _class_weights(ds.targets[plan.train], num_classes)
        if cfg.train.balance == "weighted-loss"
        else None
    )
    bs = cfg.train.batch_size
    steps_per_epoch = len(plan.train) // bs + (1 if len(plan.train) % bs > 1 else 0)
    total_steps = steps_per_epoch * cfg.train.epochs
    warmup = steps_per_epoch * cfg.train.warmup_epochs
    y_val = (ds.targets[plan.val] == ds.task.positive).astype(int)

    best: dict[str, Any] = {"auc": -1.0, "loss": float("inf"), "epoch": -1, "state": None}
    history: list[dict[str, float]] = []
    step, stale, images_seen, train_seconds, start_epoch = 0, 0, 0, 0.0, 0
    resume_path = fold_dir / RESUME if fold_dir is not None else None
    state = None
    if resume_path is not None and world.is_main and resume_path.exists():
        state = load_resume_state(resume_path)
    if world.enabled and resume_path is not None:
        state = distributed.broadcast(state)  # rank 0's run folder decides, for every rank
    if state is not None:
        if state.get("fold_name") != plan.name or state.get("seed") != seed:
            raise DataError(f"{resume_path}: resume state of another fold or seed; remove it")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        best = state["best"]
        history = state["history"]
        step, stale, start_epoch = state["step"], state["stale"], state["epoch"]
        images_seen, train_seconds = state["images_seen"], state["train_seconds"]
    finished = start_epoch > 0 and (stale >= cfg.train.patience or start_epoch >= cfg.train.epochs)
    bar = tqdm(
        range(start_epoch, cfg.train.epochs if not finished else start_epoch),
        initial=start_epoch,
        total=cfg.train.epochs,
        desc=f"{plan.name} ({len(plan.train)} train / {len(plan.val)} val / {len(plan.test)} test)",
        disable=not progress or not world.is_main,
        leave=True,
        dynamic_ncols=True,
    )
    for epoch in bar:
        stats, step = train_one_epoch(
            net, images, targets, plan.train, optimizer, weights, cfg.train, cfg.augment,
            gen, rt, step, total_steps, warmup,
        )  # fmt: skip
        images_seen += stats.images
        train_seconds += stats.seconds_total
        val_logits = predict_logits(model, images, plan.val, rt)
        val_t = torch.from_numpy(val_logits)
        val_loss = float(torch.nn.functional.cross_entropy(val_t, targets[plan.val]))
        val_acc = float((val_t.argmax(1) == targets[plan.val]).float().mean())
        val_auc = _auc_or_nan(y_val, torch.softmax(val_t, 1)[:, ds.task.positive].numpy())
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": stats.loss,
                "train_acc": stats.accuracy,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "val_auc": val_auc,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": stats.seconds_total,
            }
        )
        score = val_auc if np.isfinite(val_auc) else -val_loss
        improved = score > best["auc"] or (score == best["auc"] and val_loss < best["loss"])
        if improved:
            best = {
                "auc": score,
                "loss": val_loss,
                "epoch": epoch + 1,
                "state": copy.deepcopy(model.state_dict()),
            }
            stale = 0
        else:
            stale += 1
        if on_epoch is not None:
            on_epoch(epoch + 1, val_auc)
        if resume_path is not None and world.is_main:
            # Everything needed to continue exactly here after a crash or a kill.
            save_resume_state(
                resume_path,
                {
                    "fold_name": plan.name,
                    "seed": seed,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "best": best,
                    "history": history,
                    "step": step,
                    "stale": stale,
                    "epoch": epoch + 1,
                    "images_seen": images_seen,
                    "train_seconds": train_seconds,
                },
            )
        bar.set_postfix(loss=f"{stats.loss:.3f}", val_auc=f"{val_auc:.3f}", best=best["epoch"])
        if stale >= cfg.train.patience:
            break
    bar.close()
    if fold_dir is None:
        return FoldResult(
            plan=plan,
            temperature=1.0,
            best_epoch=best["epoch"],
            history=history,
            val_logits=np.empty((0, num_classes)),
            test_logits=np.empty((0, num_classes)),
            seconds=time.perf_counter() - t_start,
            images_per_second=images_seen / max(train_seconds, 1e-9),
        )
    model.load_state_dict(best["state"])
    val_logits = predict_logits(model, images, plan.val, rt, tta=cfg.eval.tta)
    temperature = fit_temperature(val_logits, ds.targets[plan.val])
    test_logits = predict_logits(model, images, plan.test, rt, tta=cfg.eval.tta)

    card = {
        "architecture": cfg.model.name,
        "model_options": options,
        "num_classes": num_classes,
        "in_chans": 1,
        "parameters": count_parameters(model),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "training_mode": training_mode(cfg),
        "pretrained": cfg.model.pretrained,
        "input_size": cfg.data.image_size,
        "preprocessing": {
            **preprocessing_card(cfg.data.preprocess, crop_rule_card(cfg)),
            "intensity": "grayscale [0,1] -> uint8 -> per-image standardisation",
            "tta": "mean of logits over image and horizontal mirror" if cfg.eval.tta else "none",
        },
        "task": ds.task.name,
        "class_names": list(ds.task.classes),
        "positive_class": ds.task.classes[ds.task.positive],
        "temperature": temperature,
        "best_epoch": best["epoch"],
        "best_val_auc": best["auc"],
        "repeat": plan.repeat,
        "fold": plan.fold,
        "seed": seed,
        "breastcad_version": __version__,
        **patch_card_entry(cfg.data.path),  # patch runs: the patch side, for sliding windows
    }
    if world.is_main:
        save_fold_model(fold_dir, model, card)
    seconds = time.perf_counter() - t_start
    return FoldResult(
        plan=plan,
        temperature=temperature,
        best_epoch=best["epoch"],
        history=history,
        val_logits=val_logits,
        test_logits=test_logits,
        seconds=seconds,
        images_per_second=images_seen / max(train_seconds, 1e-9),
    )


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def save_fold_outputs(fold_dir: Path, res: FoldResult, ds: Dataset) -> None:
    keys = list(res.history[0]) if res.history else ["epoch"]
    atomic_write_csv(fold_dir / "history.csv", keys, [[h[k] for k in keys] for h in res.history])
    c = ds.task.num_classes
    logit_cols = [f"logit_{name}" for name in ds.task.classes]
    for part, idx, logits in (
        ("val", res.plan.val, res.val_logits),
        ("test", res.plan.test, res.test_logits),
    ):
        rows = [[int(i), *(float(v) for v in logits[j, :c])] for j, i in enumerate(idx)]
        atomic_write_csv(fold_dir / f"{part}_logits.csv", ["index", *logit_cols], rows)
    atomic_write_json(
        fold_dir / "fold.json",
        {
            "repeat": res.plan.repeat,
            "fold": res.plan.fold,
            "temperature": res.temperature,
            "best_epoch": res.best_epoch,
            "seconds": res.seconds,
            "train_images_per_second": res.images_per_second,
        },
    )
    atomic_write_text(fold_dir / DONE, "done\n")
    (fold_dir / RESUME).unlink(missing_ok=True)


def load_fold_outputs(fold_dir: Path, plan: FoldPlan) -> FoldResult:
    """Read a finished fold back (used when a run is resumed or collected)."""
    info = read_json(fold_dir / "fold.json")

    def logits(part: str) -> np.ndarray:
        rows = _read_csv(fold_dir / f"{part}_logits.csv")
        return np.array([[float(v) for k, v in r.items() if k != "index"] for r in rows])

    hist = [{k: float(v) for k, v in r.items()} for r in _read_csv(fold_dir / "history.csv")]
    return FoldResult(
        plan=plan,
        temperature=float(info["temperature"]),
        best_epoch=int(info["best_epoch"]),
        history=hist,
        val_logits=logits("val"),
        test_logits=logits("test"),
        seconds=float(info["seconds"]),
        images_per_second=float(info["train_images_per_second"]),
    )


def folds_document(ds: Dataset, plans: list[FoldPlan], cfg: Config) -> dict[str, Any]:
    """Every sample with its group and content hash, and per repeat each sample's folds."""
    repeats = []
    for r in sorted({p.repeat for p in plans}):
        fold_of = [-1 for _ in ds.samples]
        val_in = ["" for _ in ds.samples]
        for p in (p for p in plans if p.repeat == r):
            for i in p.test:
                fold_of[i] = p.fold
            for i in p.val:
                val_in[i] += f"val@{p.fold};"
        repeats.append(
            {
                "repeat": r,
                "seed": cfg.seed + r,
                "test_fold": fold_of,
                "inner_validation_in_folds": val_in,
            }
        )
    return {
        "task": ds.task.name,
        "classes": list(ds.task.classes),
        "n_folds": cfg.cv.folds,
        "val_fraction": cfg.cv.val_fraction,
        "method": "StratifiedGroupKFold over duplicate/patient groups; inner grouped split",
        "samples": [
            {"path": s.path, "sha256": h, "label": s.label, "target": int(t), "group": g}
            for s, t, g, h in zip(ds.samples, ds.targets, ds.groups, ds.hashes, strict=True)
        ],
        "repeats": repeats,
    }


LIMITS = [
    "BUSI has no patient identifiers: images of the same woman that are not near-duplicates "
    "may still fall in different folds, so results can remain slightly optimistic.",
    "The decision threshold is chosen on inner-validation predictions that also chose the "
    "epoch; its sensitivity on the test folds is reported as measured, not as targeted.",
    "All images come from one hospital and scanner family; cross-validated results do not "
    "show how the model transfers to another site; that needs an external test set.",
]


def summarise(
    cfg: Config, ds: Dataset, results: list[FoldResult]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Pooled out-of-fold metrics, threshold from pooled validation predictions."""
    pos = ds.task.positive
    n = len(ds.samples)
    n_rep = max(r.plan.repeat for r in results) + 1
    val_y, val_p = [], []
    oof_raw = np.full((n_rep, n, ds.task.num_classes), np.nan)
    oof_cal = np.full_like(oof_raw, np.nan)
    oof_fold = np.full((n_rep, n), -1)
    for r in results:
        cal_val = apply_temperature(r.val_logits, r.temperature)
        val_y.append((ds.targets[r.plan.val] == pos).astype(int))
        val_p.append(cal_val[:, pos])
        oof_raw[r.plan.repeat, r.plan.test] = apply_temperature(r.test_logits, 1.0)
        oof_cal[r.plan.repeat, r.plan.test] = apply_temperature(r.test_logits, r.temperature)
        oof_fold[r.plan.repeat, r.plan.test] = r.plan.fold
    threshold = threshold_for_sensitivity(
        np.concatenate(val_y), np.concatenate(val_p), cfg.eval.target_sensitivity
    )
    y_bin = (ds.targets == pos).astype(int)
    groups = np.asarray(ds.groups)
    alpha = 1 - cfg.eval.ci_level
    per_repeat = []
    for rep in range(n_rep):
        p = oof_cal[rep, :, pos]
        cis = bootstrap_metrics(
            y_bin, p, groups, threshold, n_boot=cfg.eval.n_bootstrap, seed=cfg.seed, alpha=alpha
        )
        point = binary_metrics(y_bin, p, threshold)
        per_repeat.append({"repeat": rep, "cis": cis, "point": point})
    head = per_repeat[0]
    per_fold = []
    for r in results:
        yt = y_bin[r.plan.test]
        pt = oof_cal[r.plan.repeat, r.plan.test, pos]
        m = binary_metrics(yt, pt, threshold)
        per_fold.append(
            {
                "repeat": r.plan.repeat,
                "fold": r.plan.fold,
                "n_test": len(r.plan.test),
                "best_epoch": r.best_epoch,
                "temperature": r.temperature,
                "roc_auc": m.roc_auc,
                "sensitivity": m.sensitivity,
                "specificity": m.specificity,
                "accuracy": m.accuracy,
                "seconds": r.seconds,
            }
        )
    raw_auc = _auc_or_nan(y_bin, oof_raw[0, :, pos])
    metrics: dict[str, Any] = {
        "task": ds.task.name,
        "classes": list(ds.task.classes),
        "positive_class": ds.task.classes[pos],
        "n_images": n,
        "n_groups": len(set(ds.groups)),
        "n_positive": int(y_bin.sum()),
        "operating_point": {
            "target_sensitivity": cfg.eval.target_sensitivity,
            "threshold": threshold,
            "chosen_on": "pooled inner-validation predictions of all folds (calibrated)",
            "test_sensitivity": head["point"].sensitivity,
            "test_specificity": head["point"].specificity,
        },
        "pooled": {k: to_dict(v) for k, v in head["cis"].items()},
        "confusion": [[head["point"].tn, head["point"].fp], [head["point"].fn, head["point"].tp]],
        "roc_auc_uncalibrated": raw_auc,
        "per_fold": per_fold,
        "ci": {
            "level": cfg.eval.ci_level,
            "method": "percentile bootstrap over duplicate groups",
            "n_bootstrap": cfg.eval.n_bootstrap,
        },
        "limits": LIMITS,
        "model": {
            "name": cfg.model.name,
            "training_mode": training_mode(cfg),
            "input_size": cfg.data.image_size,
            "batch_size": cfg.train.batch_size,
            "epochs": cfg.train.epochs,
        },
        "leaky_image_split": cfg.data.leaky_image_split,
    }
    if n_rep > 1:
        aucs = np.array([pr["cis"]["roc_auc"].value for pr in per_repeat])
        metrics["repeats"] = {
            "n": n_rep,
            "roc_auc_per_repeat": aucs.tolist(),
            "roc_auc_mean": float(aucs.mean()),
            "roc_auc_sd": float(aucs.std(ddof=1)),
        }
    if ds.task.num_classes > 2:
        mc = multiclass_metrics(ds.targets, oof_cal[0], list(ds.task.classes))
        metrics["multiclass"] = to_dict(mc)
    decision = (oof_cal[0, :, pos] >= threshold).astype(int)
    if ds.task.num_classes == 2:
        metrics["classification_report"] = classification_report_text(
            y_bin, decision, list(ds.task.classes)
        )
    arrays = {"oof_raw": oof_raw, "oof_cal": oof_cal, "oof_fold": oof_fold}
    return metrics, arrays


def write_oof(path: Path, ds: Dataset, arrays: dict[str, np.ndarray], threshold: float) -> None:
    pos = ds.task.positive
    binary = ds.task.num_classes == 2
    prob_cols = ["prob"] if binary else [f"prob_{c}" for c in ds.task.classes]
    raw_cols = ["prob_raw"] if binary else [f"prob_raw_{c}" for c in ds.task.classes]
    header = ["path", "group", "label", "repeat", "fold", *prob_cols, *raw_cols, "decision"]
    rows = []
    for rep in range(arrays["oof_cal"].shape[0]):
        for i, s in enumerate(ds.samples):
            cal, raw = arrays["oof_cal"][rep, i], arrays["oof_raw"][rep, i]
            probs = [cal[pos]] if binary else list(cal)
            raws = [raw[pos]] if binary else list(raw)
            if cal[pos] >= threshold:
                decision = ds.task.classes[pos]
            else:  # the most likely of the other classes
                others = [c for c in range(len(cal)) if c != pos]
                decision = ds.task.classes[max(others, key=lambda c: cal[c])]
            rows.append(
                [s.path, ds.groups[i], s.label, rep, int(arrays["oof_fold"][rep, i]),
                 *(f"{v:.9f}" for v in probs), *(f"{v:.9f}" for v in raws), decision]
            )  # fmt: skip
    atomic_write_csv(path, header, rows)


def _check_same_folds(
    path: Path, ds: Dataset, plans: list[FoldPlan], cfg: Config, fix: str = ""
) -> None:
    """On resume, the data and settings must give exactly the folds the run started with."""
    saved = read_json(path)
    fresh = folds_document(ds, plans, cfg)
    if saved.get("samples") != fresh["samples"] or saved.get("repeats") != fresh["repeats"]:
        raise DataError(
            f"{path}: the data or settings changed since this run started; "
            + (fix or "start a new run instead of resuming")
        )


def write_lesion_agreement(cfg: Config, ds: Dataset, run_dir: Path, log: Any) -> None:
    """Where the fold models look, against the lesion masks (docs/explain.md), when it applies."""
    if not cfg.eval.lesion_agreement or not any(s.mask_paths for s in ds.samples):
        return
    if cfg.data.preprocess != "stretch":  # heatmaps map back to the image only when stretched
        log("lesion agreement: not computed for preprocess " + cfg.data.preprocess)
        return
    from breastcad.lesion_agreement import explain_run

    t0 = time.perf_counter()
    doc = explain_run(run_dir)
    pg = doc["metrics"].get("pointing_game") or {}
    log(
        f"Grad-CAM pointing game on lesion masks {pg.get('value', float('nan')):.3f} "
        f"({time.perf_counter() - t0:.0f} s)"
    )


class RunSetupError(DataError):
    """A run folder that this job cannot write into (another run's, or other settings)."""


class MissingFoldsError(DataError):
    """``collect`` on a run whose folds are not all done."""


def prepare_data(
    cfg: Config, progress: bool, log: Any
) -> tuple[AuditReport, str, Dataset, list[FoldPlan]]:
    """Audit the data and make the grouped folds: what a run, a fold job and collect share."""
    source = load_source(cfg.data.path)
    audit = run_audit(
        source, max_pixels=cfg.data.max_pixels, progress=progress, preprocess=cfg.data.preprocess
    )
    audit_text = audit.summary_text()
    log(audit_text)
    ds = select_task_samples(audit, cfg)
    plans = make_folds(
        ds.targets, ds.groups, cfg.cv.folds, cfg.seed, cfg.cv.val_fraction, cfg.cv.repeats
    )
    for plan in plans:
        assert_no_group_leak(plan, ds.groups)
    return audit, audit_text, ds, plans


def load_images(cfg: Config, ds: Dataset) -> np.ndarray:
    return load_stack(
        [s.path for s in ds.samples],
        ds.hashes,
        cfg.data.image_size,
        cfg.data.cache_dir,
        cfg.data.max_pixels,
        preprocess=cfg.data.preprocess,
    )


def publish_once(path: Path, write: Callable[[Path], Any]) -> bool:
    """Create ``path`` with ``write(tmp)`` unless it exists; True when this call created it.

    The file is written completely under a private temporary name, then linked
    to ``path`` (``link`` fails when ``path`` exists, atomically, also on NFS),
    so of several jobs starting together exactly one creates it and the others
    read the complete file.
    """
    if path.exists():
        return False
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.publish"
    try:
        write(tmp)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as err:  # a file system without hard links: exclusive create
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(tmp.read_bytes())
                fh.flush()
                os.fsync(fh.fileno())
            return True
    except OSError as err:
        raise RunSetupError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _check_out_folder(run_dir: Path, resume: bool, fold: int | None) -> None:
    """Which folders a run may write into (checked before anything is written)."""
    if resume:
        if not (run_dir / "config.yaml").exists():
            raise DataError(f"{run_dir}: not a run folder that can be resumed (no config.yaml)")
        return
    if not run_dir.is_dir():
        return
    entries = [p for p in run_dir.iterdir() if not p.name.endswith((".tmp", ".publish"))]
    if not entries:
        return
    if fold is not None and (run_dir / "config.yaml").exists():
        return  # a shared run folder of fold jobs: its settings are compared on writing
    raise DataError(
        f"{run_dir}: folder exists and is not empty; continue it with "
        f"`breastcad train --resume {run_dir}` or choose another --out"
    )


def _write_shared_files(
    run_dir: Path,
    cfg: Config,
    audit: AuditReport,
    audit_text: str,
    ds: Dataset,
    plans: list[FoldPlan],
    rt: Runtime,
    resume: bool,
    fold: int | None,
) -> None:
    """config.yaml, audit, folds.json, env.json: rewritten by a run, created once by fold jobs."""
    ensure_dir(run_dir)
    if fold is None:
        remove_stale_temp_files(run_dir)  # left by a run killed while writing its first file
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        audit.write(run_dir / "audit.json")
        atomic_write_text(run_dir / "audit.txt", audit_text + "\n")
        if resume and (run_dir / "folds.json").exists():
            _check_same_folds(run_dir / "folds.json", ds, plans, cfg)
        else:  # a new run, or one killed before its folds were written
            atomic_write_json(run_dir / "folds.json", folds_document(ds, plans, cfg))
        atomic_write_json(run_dir / "env.json", environment(rt))
        return
    # Fold jobs (perhaps many, starting together, on several machines) share these files:
    # each is created exactly once, and every job checks that it agrees with it.
    text = cfg.to_yaml()
    publish_once(run_dir / "config.yaml", lambda t: atomic_write_text(t, text))
    if (run_dir / "config.yaml").read_text(encoding="utf-8") != text:
        raise RunSetupError(
            f"{run_dir}: this run folder was started with other settings (config.yaml differs); "
            f"give every --fold job the same settings, or use `--resume {run_dir} --fold {fold}`"
        )
    publish_once(run_dir / "audit.json", audit.write)
    publish_once(run_dir / "audit.txt", lambda t: atomic_write_text(t, audit_text + "\n"))
    doc = folds_document(ds, plans, cfg)
    if not publish_once(run_dir / "folds.json", lambda t: atomic_write_json(t, doc)):
        _check_same_folds(
            run_dir / "folds.json", ds, plans, cfg,
            fix="give every --fold job the same data and settings",
        )  # fmt: skip
    publish_once(run_dir / "env.json", lambda t: atomic_write_json(t, environment(rt)))


def finish_run(
    cfg: Config,
    ds: Dataset,
    results: list[FoldResult],
    stack: np.ndarray,
    run_dir: Path,
    log: Any,
    lesion_crop: dict[str, Any] | None = None,
) -> RunSummary:
    """Pooled metrics, out-of-fold predictions, lesion agreement and report from the folds."""
    metrics, arrays = summarise(cfg, ds, results)
    if lesion_crop is not None:
        metrics["lesion_crop"] = lesion_crop
    threshold = metrics["operating_point"]["threshold"]
    write_oof(run_dir / "oof_predictions.csv", ds, arrays, threshold)
    metrics["timing"] = {
        "fold_seconds": [r.seconds for r in results],
        "train_images_per_second": float(np.mean([r.images_per_second for r in results])),
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    write_lesion_agreement(cfg, ds, run_dir, log)
    from breastcad.report import write_report  # imports matplotlib: only when a report is due

    write_report(run_dir, ds, results, arrays, stack)
    return RunSummary(
        run_dir=run_dir,
        metrics=metrics,
        fold_seconds=[r.seconds for r in results],
        images_per_second=metrics["timing"]["train_images_per_second"],
    )


def run_cross_validation(
    cfg: Config,
    run_dir: Path,
    progress: bool = True,
    log: Any = print,
    resume: bool = False,
    fold: int | None = None,
) -> RunSummary:
    """Train every fold (or, with ``fold``, only outer fold ``fold`` of each repeat) into run_dir.

    Under torchrun every rank runs this; all of them train each fold together
    and only rank 0 writes. With ``fold`` the shared files are created once and
    no summary is made (``collect_run`` makes it when all folds are done).
    """
    rt = runtime_settings(cfg.train, distributed=True)
    world = rt.world
    if not world.is_main:
        progress, log = False, _quiet
    error: BreastcadError | None = None
    try:
        if fold is not None and not 0 <= fold < cfg.cv.folds:
            raise ConfigError(f"--fold {fold}: the run has folds 0 to {cfg.cv.folds - 1}")
        if cfg.data.preprocess == "lesion-crop" and (fold is not None or world.enabled):
            raise ConfigError(
                "data.preprocess lesion-crop trains its segmentation models first: run it as "
                "one job (no --fold, no torchrun)"
            )
        _check_out_folder(run_dir, resume, fold)
        cfg = with_model_defaults(cfg)  # also fails early on an unknown model
        resolve_pretrained(cfg.model.name, cfg.model.pretrained)  # a missing file fails now
        # Everything that can refuse the data runs before the run folder is made.
        audit, audit_text, ds, plans = prepare_data(cfg, progress, log)
    except BreastcadError as err:
        error = err
    distributed.agree(error)  # every rank stops together, before any rank writes
    if world.is_main:
        _write_shared_files(run_dir, cfg, audit, audit_text, ds, plans, rt, resume, fold)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    t0 = time.perf_counter()
    crops = None
    if cfg.data.preprocess == "lesion-crop":
        crops = lesion_crop_inputs(cfg, ds, plans, run_dir, rt, log)
        stack = crops.out_of_fold
    else:
        stack = load_images(cfg, ds)
    images = torch.from_numpy(stack)
    per_class = ", ".join(
        f"{c}: {int((ds.targets == i).sum())}" for i, c in enumerate(ds.task.classes)
    )
    procs = f", {world.size} processes" if world.enabled else ""
    log(
        f"{len(ds.samples)} images ({per_class}) in {len(set(ds.groups))} groups, "
        f"{cfg.data.image_size} px, loaded in "
        f"{time.perf_counter() - t0:.1f} s; device {rt.device}, bf16 {'on' if rt.bf16 else 'off'}"
        + procs
    )

    results = []
    todo = [p for p in plans if fold is None or p.fold == fold]
    done = {p.name for p in todo if (run_dir / p.name / DONE).exists()} if world.is_main else None
    done = distributed.broadcast(done)
    for plan in todo:
        fold_dir = run_dir / plan.name
        if plan.name in done:
            if world.is_main:
                results.append(load_fold_outputs(fold_dir, plan))
            log(f"{plan.name}: already done, reusing its predictions")
            continue
        if world.is_main:
            ensure_dir(fold_dir)
        fold_images = images if crops is None else torch.from_numpy(crops.for_fold(plan))
        res = train_fold(cfg, ds, fold_images, plan, rt, fold_dir, progress)
        if world.is_main:
            save_fold_outputs(fold_dir, res, ds)
        results.append(res)
    distributed.barrier()  # every rank leaves once rank 0 has written the folds
    if not world.is_main:
        return RunSummary(run_dir=run_dir, metrics={})
    if fold is not None:
        return RunSummary(
            run_dir=run_dir,
            metrics={},
            fold_seconds=[r.seconds for r in results],
            images_per_second=float(np.mean([r.images_per_second for r in results])),
        )
    return finish_run(
        cfg, ds, results, stack, run_dir, log, crops.fallbacks if crops is not None else None
    )


def lesion_crop_inputs(
    cfg: Config, ds: Dataset, plans: list[FoldPlan], run_dir: Path, rt: Runtime, log: Any
) -> Any:
    """Segmentation on the run's own folds, then the lesion crops (breastcad.lesion_crop)."""
    from breastcad.lesion_crop import run_crop_inputs

    def check(path: Path) -> None:
        _check_same_folds(path, ds, plans, cfg, fix="segment.reuse needs a run on the same folds")

    return run_crop_inputs(
        cfg, [s.path for s in ds.samples], [s.mask_paths for s in ds.samples], plans, run_dir,
        rt, check, log,
    )  # fmt: skip


def crop_rule_card(cfg: Config) -> dict[str, Any] | None:
    if cfg.data.preprocess != "lesion-crop":
        return None
    from breastcad.lesion_crop import CropRule

    return CropRule(cfg.data.crop_margin, cfg.data.crop_min_side).card()


def missing_folds(run_dir: Path, plans: list[FoldPlan]) -> list[str]:
    return [p.name for p in plans if not (run_dir / p.name / DONE).exists()]


def collect_run(run_dir: Path, progress: bool = True, log: Any = print) -> RunSummary:
    """Merge the folds of a run trained by fold jobs into its metrics, predictions and report."""
    from breastcad.config import load_config

    if not (run_dir / "config.yaml").is_file() or not (run_dir / "folds.json").is_file():
        raise DataError(f"{run_dir}: not a run folder (no config.yaml and folds.json)")
    cfg = with_model_defaults(load_config(run_dir / "config.yaml"))
    _, _, ds, plans = prepare_data(cfg, progress, _quiet)
    _check_same_folds(
        run_dir / "folds.json", ds, plans, cfg,
        fix="collect needs the data the folds were trained on",
    )  # fmt: skip
    missing = missing_folds(run_dir, plans)
    if missing:
        raise MissingFoldsError(
            f"{run_dir}: {len(missing)} of {len(plans)} folds not done (no DONE marker): "
            f"{', '.join(missing)}; train each with `breastcad train --resume {run_dir} --fold K`"
        )
    results = [load_fold_outputs(run_dir / p.name, p) for p in plans]
    if cfg.data.preprocess == "lesion-crop":  # its segmentation models are reused, not retrained
        crops = lesion_crop_inputs(cfg, ds, plans, run_dir, runtime_settings(cfg.train), log)
        stack, fallbacks = crops.out_of_fold, crops.fallbacks
    else:
        stack, fallbacks = load_images(cfg, ds), None
    log(f"{len(results)} folds collected from {run_dir}")
    return finish_run(cfg, ds, results, stack, run_dir, log, fallbacks)


def _quiet(*_: Any) -> None:
    pass


def missing_folds_in(run_dir: Path) -> list[str]:
    """The folds of a run folder (from its folds.json) that have no DONE marker yet."""
    doc = read_json(run_dir / "folds.json")
    names = [
        f"fold-{k}" if r["repeat"] == 0 else f"repeat-{r['repeat']}/fold-{k}"
        for r in doc["repeats"]
        for k in range(int(doc["n_folds"]))
    ]
    return [n for n in names if not (run_dir / n / DONE).exists()]
