"""Site-shift proxy: how the run's test-fold AUC holds up under realistic appearance shifts.

Without an external dataset, the next best check of "will it work in another
hospital" is to make the run's own test images look like another site's (gain,
gamma, blur, speckle, resolution, field of view, calipers, text; see
:mod:`breastcad.shifts`) and score them again. Protocol:

* each image of the run (``folds.json``, repeat 0) is scored only by the fold model
  whose *test* fold it was: no model sees a shifted image it trained on, and the
  training images are never shifted (the models were trained as they were);
* the shift acts on the decoded image at its own resolution, then the card's
  preprocessing makes the model input, as for a real image from another site;
* the random shifts (speckle, calipers, text) draw from a stream seeded by the run's
  seed, the shift, the level and the image: the same on every run;
* AUC (and sensitivity/specificity at the run's unchanged threshold) per shift and
  level, with percentile bootstrap CIs over duplicate groups, and the AUC change from
  the unshifted images with a paired bootstrap CI. The unshifted AUC equals the
  run's pooled out-of-fold AUC (same models, same images).

Writes ``robustness.json`` (into the run folder by default) and ``robustness.png``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from breastcad.errors import BreastcadError
from breastcad.shifts import BATTERY, Shift, image_rng, select

FILENAME = "robustness.json"
PLOT = "robustness.png"
REFERENCE = "none"


def fold_test_plan(folds: dict[str, Any], repeat: int = 0) -> dict[int, list[int]]:
    """Sample indices per fold model: each image under the fold whose test fold it was."""
    plan: dict[int, list[int]] = {}
    for i, k in enumerate(folds["repeats"][repeat]["test_fold"]):
        if int(k) >= 0:
            plan.setdefault(int(k), []).append(i)
    return plan


def _pick(plan: dict[int, list[int]], max_images: int | None, seed: int) -> dict[int, list[int]]:
    total = sum(len(v) for v in plan.values())
    if max_images is None or max_images >= total:
        return plan
    if max_images < 1:
        raise BreastcadError(f"--max-images must be at least 1, not {max_images}")
    every = np.array(sorted(i for v in plan.values() for i in v))
    chosen = set(np.random.default_rng(seed).choice(every, max_images, replace=False).tolist())
    return {k: [i for i in v if i in chosen] for k, v in plan.items()}


def _conditions(shifts: Sequence[Shift]) -> list[tuple[str, float]]:
    return [(REFERENCE, 0.0)] + [(s.name, lv) for s in shifts for lv in s.levels]


def _key(name: str, level: float) -> str:
    return REFERENCE if name == REFERENCE else f"{name}@{level:g}"


def robustness_run(
    run_dir: str | os.PathLike[str],
    shifts: str | Sequence[str] | Sequence[Shift] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    max_images: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Score the run's test folds under each shift; write ``robustness.json`` and the plot.

    ``shifts``: names (a list or comma-separated), :class:`Shift` objects, or None
    for the whole battery. ``out_dir`` defaults to the run folder (the plot then goes
    to ``RUN/plots/robustness.png``).
    """
    from breastcad.checkpoint import load_fold_model
    from breastcad.data.cache import prepare_for_model
    from breastcad.data.imageio import DEFAULT_MAX_PIXELS, read_image
    from breastcad.evaluate import fold_probabilities, runtime
    from breastcad.io import atomic_write_json, read_json
    from breastcad.lesion_agreement import _read_config
    from breastcad.lesion_crop import fold_cropper

    t0 = time.perf_counter()
    say = log or (lambda _m: None)
    run_dir = Path(run_dir)
    for name in ("folds.json", "metrics.json"):
        if not (run_dir / name).is_file():
            raise BreastcadError(f"{run_dir}: not a finished run folder (no {name})")
    if shifts is None or isinstance(shifts, str) or all(isinstance(s, str) for s in shifts):
        battery = select(shifts)  # type: ignore[arg-type]
    else:
        battery = list(shifts)  # type: ignore[arg-type]
    cfg = _read_config(run_dir)
    data_cfg, eval_cfg = cfg.get("data") or {}, cfg.get("eval") or {}
    seed = int(cfg.get("seed") or 0)
    max_pixels = int(data_cfg.get("max_pixels") or DEFAULT_MAX_PIXELS)
    n_boot = int(eval_cfg.get("n_bootstrap") or 1000)
    level_ci = float(eval_cfg.get("ci_level") or 0.95)
    metrics = read_json(run_dir / "metrics.json")
    threshold = float(metrics["operating_point"]["threshold"])
    folds = read_json(run_dir / "folds.json")
    samples = folds["samples"]
    plan = _pick(fold_test_plan(folds), max_images, seed)
    conds = _conditions(battery)
    order = list(BATTERY)
    rt = runtime(threads, device)
    say(
        f"robustness: {sum(len(v) for v in plan.values())} test images x {len(conds)} "
        f"conditions ({len(battery)} shifts)"
    )

    probs: dict[str, dict[int, float]] = {_key(n, lv): {} for n, lv in conds}
    scored_by: dict[int, int] = {}
    skipped: list[dict[str, str]] = []
    pos_name = metrics.get("positive_class")
    card0: dict[str, Any] = {}
    for k in sorted(plan):
        fold_dir = run_dir / f"fold-{k}"
        if not (fold_dir / "DONE").exists():
            raise BreastcadError(f"{fold_dir}: fold {k} is not finished; cannot score its test")
        model, card = load_fold_model(fold_dir)
        cropper = fold_cropper(run_dir, k, card)  # lesion-crop runs: fold K's segmentation
        card0 = card0 or card
        pos = card["class_names"].index(card["positive_class"])
        pos_name = card["positive_class"]
        originals: list[tuple[int, np.ndarray]] = []
        for i in plan[k]:
            try:
                originals.append((i, read_image(samples[i]["path"], max_pixels=max_pixels)))
            except BreastcadError as err:
                skipped.append({"path": samples[i]["path"], "problem": str(err)})
        for name, lv in conds:
            shift = None if name == REFERENCE else next(s for s in battery if s.name == name)
            s_idx = order.index(name) if name in order else len(order)
            l_idx = 0 if shift is None else shift.levels.index(lv)
            stack = []
            for i, img in originals:
                shown = (
                    img if shift is None else shift.apply(img, lv, image_rng(seed, s_idx, l_idx, i))
                )
                stack.append(prepare_for_model(shown, card, cropper))
            if not stack:
                continue
            cal, _ = fold_probabilities(model, card, np.stack(stack), rt)
            for (i, _img), p in zip(originals, cal[:, pos], strict=True):
                probs[_key(name, lv)][i] = float(p)
        for i, _ in originals:
            scored_by[i] = k
        say(f"  fold-{k}: {len(originals)} test images scored under {len(conds)} conditions")
    if not scored_by:
        raise BreastcadError(f"{run_dir}: no readable test image to score")

    idx = sorted(scored_by)
    y = np.array([int(samples[i]["label"] == pos_name) for i in idx])
    groups = np.array([str(samples[i]["group"]) for i in idx])
    doc_shifts = _summaries(battery, probs, idx, y, groups, threshold, n_boot, seed, 1 - level_ci)
    ref = doc_shifts.pop(REFERENCE)
    doc: dict[str, Any] = {
        "run": str(run_dir),
        "model": card0.get("architecture"),
        "input_size": card0.get("input_size"),
        "preprocessing": card0.get("preprocessing"),
        "positive_class": pos_name,
        "threshold": threshold,
        "n_images": len(idx),
        "n_groups": int(len(set(groups.tolist()))),
        "n_positive": int(y.sum()),
        "max_images": max_images,
        "scored_by": "each image by the fold model whose test fold it was (repeat 0); "
        "training images are never shifted",
        "applied_to": "the decoded image at its own resolution, before the card's preprocessing",
        "reference": ref,
        "run_pooled_roc_auc": (metrics.get("pooled") or {}).get("roc_auc"),
        "shifts": [
            {
                "name": s.name,
                "what": s.what,
                "unit": s.unit,
                "identity_level": s.identity_level,
                "levels": doc_shifts[s.name],
            }
            for s in battery
        ],  # fmt: skip
        "ci": {
            "level": level_ci,
            "method": "percentile bootstrap over duplicate groups; AUC change: paired bootstrap",
            "n_bootstrap": n_boot,
        },
        "skipped": skipped,
        "seed": seed,
        "per_image": [
            {
                "path": samples[i]["path"],
                "group": samples[i]["group"],
                "label": samples[i]["label"],
                "fold": scored_by[i],
                "prob": {key: round(v[i], 6) for key, v in probs.items() if i in v},
            }
            for i in idx
        ],  # fmt: skip
    }
    out = Path(out_dir) if out_dir is not None else run_dir
    plot_path = (out / "plots" / PLOT) if out_dir is None else out / PLOT
    doc["plot"] = str(plot_path)
    doc["seconds"] = round(time.perf_counter() - t0, 2)
    plot_robustness(doc, plot_path)
    atomic_write_json(out / FILENAME, doc)
    return doc


def _summaries(
    battery: Sequence[Shift],
    probs: dict[str, dict[int, float]],
    idx: list[int],
    y: np.ndarray,
    groups: np.ndarray,
    threshold: float,
    n_boot: int,
    seed: int,
    alpha: float,
) -> dict[str, Any]:
    from breastcad.metrics import bootstrap_metrics, paired_bootstrap_auc_difference, to_dict

    def vec(key: str) -> np.ndarray:
        return np.clip(np.array([probs[key][i] for i in idx]), 0.0, 1.0)

    def summary(p: np.ndarray) -> dict[str, Any]:
        cis = bootstrap_metrics(y, p, groups, threshold, n_boot=n_boot, seed=seed, alpha=alpha)
        return {k: to_dict(cis[k]) for k in ("roc_auc", "sensitivity", "specificity", "ece")}

    ref = vec(REFERENCE)
    out: dict[str, Any] = {REFERENCE: summary(ref)}
    for s in battery:
        rows = []
        for lv in s.levels:
            p = vec(_key(s.name, lv))
            row = {"level": lv, **summary(p)}
            d = paired_bootstrap_auc_difference(
                y, p, ref, groups, n_boot=n_boot, seed=seed, alpha=alpha
            )
            row["auc_change"] = to_dict(d)
            rows.append(row)
        out[s.name] = rows
    return out


def plot_robustness(doc: dict[str, Any], out: str | os.PathLike[str]) -> Path:
    """AUC against severity, one panel per shift, CIs as error bars, unshifted AUC as a line."""
    import matplotlib.pyplot as plt

    from breastcad.plots import _rc, _save

    shifts = doc["shifts"]
    ref = doc["reference"]["roc_auc"]
    n = max(1, len(shifts))
    cols = min(4, n)
    rows = math.ceil(n / cols)

    def val(x: Any) -> float:
        return float("nan") if x is None else float(x)

    with _rc():
        fig, axes = plt.subplots(
            rows, cols, figsize=(3.3 * cols, 3.0 * rows + 0.6), sharey=True, squeeze=False
        )
        try:
            for ax in axes.ravel()[n:]:
                ax.set_visible(False)
            for ax, s in zip(axes.ravel(), shifts, strict=False):
                pairs = [(float(s["identity_level"]), ref)]
                pairs += [(float(r["level"]), r["roc_auc"]) for r in s["levels"]]
                if len({lv < pairs[0][0] for lv, _ in pairs[1:]}) > 1:
                    pairs.sort(key=lambda lp: lp[0])  # levels on both sides: numeric order
                xs = list(range(len(pairs)))
                labels = [f"{lv:g}" for lv, _ in pairs]
                pts = [pt for _, pt in pairs]
                v = np.array([val(p["value"]) for p in pts])
                lo = np.array([val(p["low"]) for p in pts])
                hi = np.array([val(p["high"]) for p in pts])
                rv, rl, rh = val(ref["value"]), val(ref["low"]), val(ref["high"])
                ax.axhspan(rl, rh, color="0.85", alpha=0.6, lw=0)
                ax.axhline(rv, color="0.35", ls="--", lw=1.2)
                ax.axhline(0.5, color="0.6", ls=":", lw=1.0)
                ax.errorbar(
                    xs, v, yerr=[np.maximum(v - lo, 0), np.maximum(hi - v, 0)], color="tab:blue",
                    marker="o", ms=5, capsize=3, lw=1.6,
                )  # fmt: skip
                k0 = next(k for k, (_, pt) in enumerate(pairs) if pt is ref)
                ax.plot(xs[k0], v[k0], "s", color="0.45", ms=7, zorder=5)
                ax.set_xticks(xs, labels)
                ax.set_xlabel(s["unit"])
                ax.set_title(f"{s['name']}: {s['what']}", fontsize=10)
            for ax in axes[:, 0]:
                ax.set_ylabel("ROC-AUC (95% CI)")
            lo_all = min([val(ref["low"])] + [val(r["roc_auc"]["low"]) for s in shifts
                                               for r in s["levels"]])  # fmt: skip
            axes[0, 0].set_ylim(max(0.0, min(0.45, lo_all - 0.05)), 1.0)
            mode = (doc.get("preprocessing") or {}).get("mode")
            model = (
                doc.get("model") if mode in (None, "stretch") else f"{doc.get('model')} ({mode})"
            )
            fig.suptitle(
                f"Site-shift proxy: test-fold AUC of {model} under appearance shifts "
                f"({doc['n_images']} images, {doc['n_groups']} groups)\ndashed: unshifted AUC "
                f"{val(ref['value']):.3f} (grey band: its CI); dotted: chance; grey square: "
                "no shift",
                fontsize=10,
            )
            fig.tight_layout()
        except BaseException:
            plt.close(fig)
            raise
        return _save(fig, out)


def read_robustness(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run's ``robustness.json`` without its per-image rows (for the run report), or
    None when it is absent or unreadable."""
    from breastcad.io import read_json_if_valid

    doc = read_json_if_valid(Path(run_dir) / FILENAME)
    if doc is None or not isinstance(doc.get("shifts"), list) or "reference" not in doc:
        return None
    return {k: v for k, v in doc.items() if k != "per_image"}
