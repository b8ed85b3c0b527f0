"""Use a run as the deployable model it is: the ensemble of its fold models.

Each fold's logits are divided by its temperature and turned into
probabilities; the probabilities are averaged; the run's one threshold turns
the averaged probability of the positive class into a decision (see
docs/run-folder.md). A single fold folder (``model.safetensors`` +
``card.json``) can be used alone.

Loading reads JSON and safetensors only: no code from a file ever runs. A
pickled checkpoint (``torch.save``) is refused, whatever its name. An exported
ONNX model (``breastcad export``) is run with onnxruntime, described by the
JSON sidecar written next to it (threshold, cards, the run's metrics).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from breastcad import __version__
from breastcad.checkpoint import CARD, WEIGHTS, load_fold_model
from breastcad.data.cache import check_rule_version, prepare_for_model
from breastcad.data.imageio import DEFAULT_MAX_PIXELS, is_image_name, read_image
from breastcad.data.records import BadFile
from breastcad.engine import Runtime, predict_logits
from breastcad.errors import BreastcadError, ConfigError, ImageReadError, printable
from breastcad.io import read_json
from breastcad.lesion_crop import crop_column
from breastcad.metrics import apply_temperature

# File names that hold pickles (torch.save, pickle.dump): never loaded.
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar", ".zip"})
SIDECAR_SUFFIX = ".json"  # model.onnx -> model.onnx.json
SIDECAR_KIND = "breastcad-exported-model"

CALIBRATED_MEANING = (
    "calibrated probability of the positive class: the mean over the ensemble's fold models "
    "of softmax(logits / T), each fold's temperature T fitted on its own inner-validation "
    "data so that, among such images given probability p, roughly a fraction p are positive "
    "(the run's report shows how well this held on the test folds: reliability diagram, ECE)"
)


def _looks_pickled(head: bytes) -> bool:
    """torch.save writes a zip archive (``PK``) or, in its legacy format, a raw pickle."""
    return head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and head[1] <= 5)


def refuse_pickled_file(path: Path) -> None:
    """Raise a one-line BreastcadError if ``path`` holds (or is named as) a pickle."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        head = b""
    if _looks_pickled(head) or path.suffix.lower() in PICKLE_SUFFIXES:
        raise BreastcadError(
            f"{printable(str(path))}: a pickled checkpoint (torch.save/pickle) is refused, since "
            "loading one can run code; breastcad reads weights from model.safetensors + card.json"
        )


def check_fold_folder(folder: Path) -> None:
    """Refuse a fold folder whose weights are a pickle, before anything is loaded."""
    weights = folder / WEIGHTS
    if weights.is_file():
        refuse_pickled_file(weights)
        return
    pickled = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        refuse_pickled_file(pickled[0])
    raise BreastcadError(f"{printable(str(weights))}: no such file")


def _digest(dirs: list[Path], threshold: float) -> str:
    """The model's version: a hash of every member's weights and card and the threshold."""
    h = hashlib.sha256()
    for d in dirs:
        h.update(hashlib.sha256((d / WEIGHTS).read_bytes()).digest())
        card = read_json(d / CARD)
        h.update(json.dumps(card, sort_keys=True).encode())
    h.update(f"{threshold:.17g}".encode())
    return h.hexdigest()[:12]


def run_summary(run_dir: Path) -> dict[str, Any]:
    """What a model card says about how the run was trained and how it scored.

    Only summaries: the metrics with their CIs, the operating point, the limits,
    and the training data's counts (no file paths, no per-image rows).
    """
    out: dict[str, Any] = {}
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        m = read_json(metrics_path)
        keep = (
            "task", "classes", "positive_class", "n_images", "n_groups", "n_positive",
            "operating_point", "pooled", "confusion", "ci", "limits", "leaky_image_split",
            "repeats", "per_fold",
        )  # fmt: skip
        out["metrics"] = {k: m[k] for k in keep if k in m}
    audit_path = run_dir / "audit.json"
    if audit_path.is_file():
        a = read_json(audit_path)
        source = a.get("source", {})
        counts = a.get("counts", {})
        out["training_data"] = {
            "source_kind": source.get("kind"),
            "source_name": Path(str(source.get("root", source.get("path", "")))).name or None,
            "images_found": counts.get("found"),
            "per_class": counts.get("per_class"),
            "duplicate_groups": counts.get("duplicate_groups"),
            "duplicate_group_share": counts.get("duplicate_group_share"),
            "conflict_groups": counts.get("conflict_groups"),
            "conflict_images": counts.get("conflict_images"),
        }
    return out


class _Described:
    """What both kinds of loaded model tell about themselves, from their fold cards."""

    cards: list[dict[str, Any]]

    @property
    def card(self) -> dict[str, Any]:
        return self.cards[0]

    @property
    def name(self) -> str:
        return f"{self.card['architecture']} x{len(self.cards)}"


@dataclass
class Ensemble(_Described):
    """The fold models of a run (or one fold) with the run's threshold, run with PyTorch."""

    models: list[nn.Module]
    cards: list[dict[str, Any]]
    threshold: float
    source: str
    version: str = ""
    members: list[str] = field(default_factory=list)  # fold folder names, e.g. fold-0
    run: dict[str, Any] = field(default_factory=dict)  # run_summary() of the run
    backend: str = "torch"
    cropper: Any = None  # lesion-crop runs: the run's segmentation models + crop rule

    def probabilities(self, images: np.ndarray | torch.Tensor, rt: Runtime | None = None):
        """Calibrated ensemble probabilities (N, C) for uint8 model inputs (N, S, S)."""
        rt = rt or default_runtime()
        images = torch.as_tensor(images)
        idx = np.arange(len(images))
        probs = np.zeros((len(images), int(self.card["num_classes"])))
        for model, card in zip(self.models, self.cards, strict=True):
            model.to(rt.device)
            tta = card["preprocessing"].get("tta", "none") != "none"
            logits = predict_logits(model, images, idx, rt, tta=tta)
            probs += apply_temperature(logits, float(card["temperature"]))
        return probs / len(self.models)


@dataclass
class OnnxEnsemble(_Described):
    """An exported model (``breastcad export --format onnx``) run with onnxruntime."""

    session: Any
    cards: list[dict[str, Any]]
    threshold: float
    source: str
    version: str = ""
    members: list[str] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)
    backend: str = "onnx"
    input_name: str = "image"
    models: list[nn.Module] = field(default_factory=list)  # none: no Grad-CAM on ONNX

    def probabilities(self, images: np.ndarray | torch.Tensor, rt: Runtime | None = None):
        arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(arr, np.uint8)})[0]
        return out.astype(np.float64)


_RUNTIME: Runtime | None = None


def default_runtime() -> Runtime:
    global _RUNTIME
    if _RUNTIME is None:
        from breastcad.config import TrainConfig
        from breastcad.engine import runtime_settings

        _RUNTIME = runtime_settings(TrainConfig())
    return _RUNTIME


def fold_dirs(run_dir: Path) -> list[Path]:
    """Finished classification folds: fold-K/ and repeat-R/fold-K/ (not segmentation/...)."""
    done = [*run_dir.glob("fold-*/DONE"), *run_dir.glob("repeat-*/fold-*/DONE")]
    return sorted(p.parent for p in done if (p.parent / CARD).exists())


def load_ensemble(path: str | Path, fold: int | None = None) -> Ensemble:
    """A run folder (all finished folds, or ``fold`` K of the first repeat) or one fold folder."""
    path = Path(path)
    if path.is_file() and path.name == WEIGHTS:
        path = path.parent
    if path.is_file():
        refuse_pickled_file(path)
        raise BreastcadError(
            f"{printable(str(path))}: not a model; give a run folder, a fold folder "
            f"({WEIGHTS} + {CARD}) or an exported .onnx file"
        )
    if (path / CARD).exists():
        if fold is not None:
            raise BreastcadError(f"{path}: --fold K needs a run folder, not a fold folder")
        dirs, run_dir = [path], path.parent
    elif (path / "metrics.json").exists():
        run_dir = path
        dirs = [run_dir / f"fold-{fold}"] if fold is not None else fold_dirs(run_dir)
        if fold is not None and not (dirs[0] / "DONE").exists():
            raise BreastcadError(f"{dirs[0]}: no finished fold {fold} in this run")
    else:
        raise BreastcadError(f"{path}: not a finished run folder or a fold folder with {CARD}")
    if not dirs:
        raise BreastcadError(f"{path}: the run has no finished folds")
    for d in dirs:
        check_fold_folder(d)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        raise BreastcadError(
            f"{metrics_path}: no such file (the run's threshold lives there; a fold folder "
            "is used inside its run folder)"
        )
    threshold = float(read_json(metrics_path)["operating_point"]["threshold"])
    loaded = [load_fold_model(d) for d in dirs]
    try:
        check_rule_version(loaded[0][1])
    except ConfigError as err:
        raise BreastcadError(f"{run_dir}: {err}") from None
    cropper = None
    versioned = list(dirs)
    if loaded[0][1].get("preprocessing", {}).get("mode") == "lesion-crop":
        from breastcad.lesion_crop import LesionCropper
        from breastcad.segmentation import SEG_DIR

        cropper = LesionCropper.for_run(run_dir, loaded[0][1])
        # the segmentation decides what the classifier sees: part of the model's version
        seg_folds = (run_dir / SEG_DIR).glob("fold-*")
        versioned += sorted(d for d in seg_folds if (d / WEIGHTS).is_file())
    return Ensemble(
        models=[m for m, _ in loaded],
        cards=[c for _, c in loaded],
        threshold=threshold,
        source=str(path),
        version=_digest(versioned, threshold),
        members=[str(d.relative_to(run_dir)) if d != run_dir else d.name for d in dirs],
        run=run_summary(run_dir),
        cropper=cropper,
    )


def sidecar_path(onnx_path: str | Path) -> Path:
    p = Path(onnx_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def onnx_session(model: bytes | str, threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def load_onnx(path: str | Path, threads: int | None = None) -> OnnxEnsemble:
    """An exported .onnx model with its sidecar JSON (refused if they do not match)."""
    path = Path(path)
    side = sidecar_path(path)
    if not path.is_file():
        raise BreastcadError(f"{printable(str(path))}: no such file")
    if not side.is_file():
        raise BreastcadError(
            f"{printable(str(side))}: no such file (the sidecar written by `breastcad export` "
            "holds the threshold and the model card)"
        )
    meta = read_json(side)
    if meta.get("kind") != SIDECAR_KIND or meta.get("format") != "onnx":
        raise BreastcadError(f"{printable(str(side))}: not a breastcad ONNX export sidecar")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise BreastcadError(
            f"{printable(str(path))}: does not match its sidecar (sha256 differs); export again"
        )
    try:
        session = onnx_session(data, threads)
    except Exception as err:  # onnxruntime raises its own types
        msg = " ".join(str(err).split())[:200]
        raise BreastcadError(f"{printable(str(path))}: not a loadable ONNX model ({msg})") from None
    return OnnxEnsemble(
        session=session,
        cards=meta["cards"],
        threshold=float(meta["threshold"]),
        source=str(path),
        version=meta["model_version"],
        members=meta.get("members", []),
        run=meta.get("run", {}),
        input_name=meta.get("input", {}).get("name", "image"),
    )


def load_model(
    path: str | Path, fold: int | None = None, backend: str = "torch", threads: int | None = None
) -> Ensemble | OnnxEnsemble:
    """What ``predict`` and ``serve`` take: a run, a fold folder or an exported .onnx file.

    ``backend="onnx"`` with a run or fold folder exports it in memory and runs it
    with onnxruntime (the same graph ``breastcad export`` writes).
    """
    p = Path(path)
    if p.suffix.lower() == ".onnx":
        if fold is not None:
            raise BreastcadError(f"{printable(str(p))}: --fold applies to a run folder only")
        return load_onnx(p, threads)
    ens = load_ensemble(p, fold)
    if backend == "torch":
        return ens
    if backend != "onnx":
        raise BreastcadError(f"unknown backend {backend!r}; use torch or onnx")
    from breastcad.export import onnx_bytes

    return OnnxEnsemble(
        session=onnx_session(onnx_bytes(ens), threads),
        cards=ens.cards,
        threshold=ens.threshold,
        source=ens.source,
        version=ens.version,
        members=ens.members,
        run=ens.run,
    )


CARD_METRICS = (
    "pooled", "confusion", "ci", "n_images", "n_groups", "n_positive", "per_fold", "repeats",
    "leaky_image_split",
)  # fmt: skip


def model_card(ens: Ensemble | OnnxEnsemble) -> dict[str, Any]:
    """The model card served at /api/v1/model and written into export sidecars."""
    card = ens.card
    classes = card["class_names"]
    metrics = ens.run.get("metrics", {})
    return {
        "name": ens.name,
        "version": ens.version,
        "breastcad_version": card.get("breastcad_version", __version__),
        "backend": ens.backend,
        "architecture": {
            "name": card["architecture"],
            "options": card.get("model_options", {}),
            "parameters": card.get("parameters"),
            "members": len(ens.cards),
            "member_folders": ens.members,
            "temperatures": [float(c["temperature"]) for c in ens.cards],
            "input_size": card["input_size"],
            "in_chans": card.get("in_chans", 1),
            "preprocessing": card.get("preprocessing", {}),
        },
        "task": card["task"],
        "classes": classes,
        "positive_class": card["positive_class"],
        "output": CALIBRATED_MEANING,
        "operating_point": {
            "threshold": ens.threshold,
            **{k: v for k, v in metrics.get("operating_point", {}).items() if k != "threshold"},
            "rule": f"decision is {card['positive_class']} when the probability is at least "
            "the threshold, else the most probable other class",
        },
        "training_data": ens.run.get("training_data"),
        "cross_validated_metrics": {k: metrics[k] for k in CARD_METRICS if k in metrics},
        "intended_use": (
            "Research and education: studying how a classifier trained on public breast "
            "ultrasound data behaves. Not a medical device; not for diagnosis, screening or "
            "any clinical decision."
        ),
        "limits": [
            *metrics.get("limits", []),
            "Trained on one public dataset; performance on other scanners, sites or "
            "populations is unknown.",
            f"Input is treated as a single grayscale image of a {card['task']} case; "
            "images of another kind (other organs, mammograms for an ultrasound model, "
            "screenshots) still get a probability, which then means nothing.",
        ],
    }


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


def decide(probs: np.ndarray, ens: Ensemble | OnnxEnsemble) -> list[str]:
    """The class name per row: positive at or above the threshold, else the likeliest other."""
    classes = ens.card["class_names"]
    pos = classes.index(ens.card["positive_class"])
    out = []
    for row in probs:
        if row[pos] >= ens.threshold:
            out.append(classes[pos])
        else:
            others = [c for c in range(len(classes)) if c != pos]
            out.append(classes[max(others, key=lambda c: row[c])])
    return out


def predict_images(
    ens: Ensemble | OnnxEnsemble,
    paths: list[str],
    rt: Runtime | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    batch_size: int = 256,
) -> tuple[list[dict[str, Any]], list[BadFile]]:
    """Probabilities and decisions for every readable image; unreadable ones with the reason."""
    rows: list[dict[str, Any]] = []
    bad: list[BadFile] = []
    classes = ens.card["class_names"]
    pos = classes.index(ens.card["positive_class"])
    cropper = getattr(ens, "cropper", None)
    for start in range(0, len(paths), batch_size):
        arrays, kept, crops = [], [], []
        for p in paths[start : start + batch_size]:
            try:
                img = read_image(p, max_pixels=max_pixels)
            except ImageReadError as err:
                bad.append(BadFile(p, err.problem))
                continue
            if cropper is not None:  # lesion-crop model: say where each input came from
                arr, found = cropper(img)
                crops.append(crop_column(found))
            else:
                arr = prepare_for_model(img, ens.card)
            arrays.append(arr)
            kept.append(p)
        if not kept:
            continue
        probs = ens.probabilities(np.stack(arrays), rt)
        for i, (p, decision) in enumerate(zip(kept, decide(probs, ens), strict=True)):
            row = {"path": p, "prob": float(probs[i, pos]), "decision": decision}
            if crops:
                row["crop"] = crops[i]
            if len(classes) > 2:
                row.update({f"prob_{c}": float(probs[i, k]) for k, c in enumerate(classes)})
            rows.append(row)
    return rows, bad
