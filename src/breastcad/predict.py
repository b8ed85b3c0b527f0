"""Use a run as the deployable model it is: the ensemble of its fold models.

Each fold's logits are divided by its temperature and turned into
probabilities; the probabilities are averaged; the run's one threshold turns
the averaged probability of the positive class into a decision (see
docs/run-folder.md). A single fold folder (``model.safetensors`` +
``card.json``) can be used alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from breastcad.checkpoint import CARD, load_fold_model
from breastcad.data.cache import prepare_for_model
from breastcad.data.imageio import DEFAULT_MAX_PIXELS, is_image_name, read_image
from breastcad.data.records import BadFile
from breastcad.engine import Runtime, predict_logits
from breastcad.errors import BreastcadError, ImageReadError
from breastcad.io import read_json
from breastcad.metrics import apply_temperature


@dataclass
class Ensemble:
    models: list[nn.Module]
    cards: list[dict[str, Any]]
    threshold: float
    source: str

    @property
    def card(self) -> dict[str, Any]:
        return self.cards[0]


def _fold_dirs(run_dir: Path) -> list[Path]:
    return sorted(p.parent for p in run_dir.glob("**/DONE") if (p.parent / CARD).exists())


def load_ensemble(path: str | Path, fold: int | None = None) -> Ensemble:
    """A run folder (all finished folds, or ``fold`` K of the first repeat) or one fold folder."""
    path = Path(path)
    if (path / CARD).exists():
        dirs, run_dir = [path], path.parent
    elif (path / "metrics.json").exists():
        run_dir = path
        dirs = [run_dir / f"fold-{fold}"] if fold is not None else _fold_dirs(run_dir)
        if fold is not None and not (dirs[0] / "DONE").exists():
            raise BreastcadError(f"{dirs[0]}: no finished fold {fold} in this run")
    else:
        raise BreastcadError(f"{path}: not a finished run folder or a fold folder with {CARD}")
    if not dirs:
        raise BreastcadError(f"{path}: the run has no finished folds")
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        raise BreastcadError(f"{metrics_path}: no such file (the run's threshold lives there)")
    threshold = float(read_json(metrics_path)["operating_point"]["threshold"])
    loaded = [load_fold_model(d) for d in dirs]
    return Ensemble(
        models=[m for m, _ in loaded],
        cards=[c for _, c in loaded],
        threshold=threshold,
        source=str(path),
    )


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given; folders searched (recursively) for image files, masks left out."""
    out: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(
                str(f)
                for f in p.rglob("*")
                if is_image_name(f.name) and "_mask" not in f.stem and not f.is_dir()
            )
        else:
            out.append(item)
    return out


def predict_images(
    ens: Ensemble, paths: list[str], rt: Runtime, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[dict[str, Any]], list[BadFile]]:
    """Probabilities and decisions for every readable image; unreadable ones with the reason."""
    arrays, kept, bad = [], [], []
    for p in paths:
        try:
            arrays.append(prepare_for_model(read_image(p, max_pixels=max_pixels), ens.card))
            kept.append(p)
        except ImageReadError as err:
            bad.append(BadFile(p, err.problem))
    if not kept:
        return [], bad
    images = torch.from_numpy(np.stack(arrays))
    idx = np.arange(len(kept))
    probs = np.zeros((len(kept), int(ens.card["num_classes"])))
    for model, card in zip(ens.models, ens.cards, strict=True):
        model.to(rt.device)
        tta = card["preprocessing"].get("tta", "none") != "none"
        logits = predict_logits(model, images, idx, rt, tta=tta)
        probs += apply_temperature(logits, float(card["temperature"]))
    probs /= len(ens.models)
    classes = ens.card["class_names"]
    pos = classes.index(ens.card["positive_class"])
    rows = []
    for i, p in enumerate(kept):
        if probs[i, pos] >= ens.threshold:
            decision = classes[pos]
        else:
            decision = max((c for c in range(len(classes)) if c != pos), key=lambda c: probs[i, c])
            decision = classes[decision]
        row = {"path": p, "prob": float(probs[i, pos]), "decision": decision}
        if len(classes) > 2:
            row.update({f"prob_{c}": float(probs[i, k]) for k, c in enumerate(classes)})
        rows.append(row)
    return rows, bad
