"""Export a run (or one fold) as one self-contained graph: ONNX or TorchScript.

The exported graph is the whole deployable model, preprocessing included:

    input  ``image``          uint8 (batch, S, S): the model input ``prepare_for_model``
                              makes from a decoded image (grayscale, resized to S x S)
    output ``probabilities``  float32 (batch, C): the mean over the fold models of
                              softmax(logits / T), each fold with its own temperature T
                              (and its mirror-image test-time augmentation when its card
                              says so)

The per-image standardisation runs inside the graph. The threshold, the cards
and the run's metrics go into a sidecar JSON next to the file
(``model.onnx`` -> ``model.onnx.json``), which ``predict`` and ``serve`` read.

Every export is checked against PyTorch before it is kept: the exported file
is run (onnxruntime for ONNX, ``torch.jit.load`` for TorchScript) on sample
inputs and its probabilities must match the PyTorch ensemble's (float32,
the same code path ``predict`` uses) to within ``TOLERANCE``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from breastcad import __version__
from breastcad.data.augment import standardize
from breastcad.engine import Runtime
from breastcad.errors import BreastcadError, printable
from breastcad.io import SCHEMA_VERSION, atomic_write_bytes, atomic_write_json
from breastcad.predict import SIDECAR_KIND, Ensemble, model_card, sidecar_path

TOLERANCE = 1e-4  # max absolute difference in probabilities, exported vs PyTorch
FORMATS = ("onnx", "torchscript")
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"


class EnsembleGraph(nn.Module):
    """uint8 images (N, S, S) -> calibrated ensemble probabilities (N, C), in one module."""

    def __init__(self, ens: Ensemble) -> None:
        super().__init__()
        members = []
        for m in ens.models:
            m = copy.deepcopy(m).cpu().float().eval()
            for p in m.parameters():
                p.requires_grad_(False)
            members.append(m)
        self.members = nn.ModuleList(members)
        self.tta = [c["preprocessing"].get("tta", "none") != "none" for c in ens.cards]
        temps = [float(c["temperature"]) for c in ens.cards]
        self.register_buffer("temperatures", torch.tensor(temps, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # float64 statistics: a flat or low-contrast image divides the rounding residue of
        # its mean by the small std (+eps); float32 reductions that sum in another order
        # (onnxruntime's) would then differ from PyTorch's by more than the tolerance
        x = standardize(images.to(torch.float64).div(255.0).unsqueeze(1)).to(torch.float32)
        total = torch.zeros(())
        for i, model in enumerate(self.members):
            logits = model(x)
            if self.tta[i]:
                logits = 0.5 * (logits + model(torch.flip(x, dims=[3])))
            total = total + torch.softmax(logits / self.temperatures[i], dim=1)
        return total / len(self.members)


def sample_inputs(size: int, n: int = 6, seed: int = 0) -> np.ndarray:
    """Varied uint8 inputs for the parity check: noise, gradients, blobs, flat and extreme."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    out = [
        rng.integers(0, 256, (size, size)),
        255 * xx,
        255 * (0.6 - 0.4 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.45) ** 2) / 0.02)),
        np.full((size, size), 128),
        np.where(rng.random((size, size)) < 0.5, 0, 255),
        np.clip(140 + 40 * rng.standard_normal((size, size)), 0, 255),
    ]
    while len(out) < n:
        out.append(rng.integers(0, 256, (size, size)))
    return np.stack(out[:n]).astype(np.uint8)


def reference_probabilities(ens: Ensemble, images: np.ndarray) -> np.ndarray:
    """What ``predict`` computes, in float32 on the CPU (no bf16): the parity reference."""
    rt = Runtime(device=torch.device("cpu"), bf16=False, channels_last=False)
    return ens.probabilities(images, rt)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings; a CLI command prints its own summary."""
    with (
        warnings.catch_warnings(),
        open(os.devnull, "w") as null,
        contextlib.redirect_stdout(null),
    ):
        warnings.simplefilter("ignore")
        yield


def _onnx_program(ens: Ensemble) -> Any:
    graph = EnsembleGraph(ens).eval()
    size = int(ens.card["input_size"])
    example = torch.from_numpy(sample_inputs(size, 2))
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                external_data=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"images": {0: batch}},
                verbose=False,
            )
    except Exception as err:  # the exporter raises many types
        msg = " ".join(str(err).split())[:300]
        raise BreastcadError(f"ONNX export of {ens.name} failed ({msg})") from None
    return program


def refuse_lesion_crop(ens: Ensemble) -> None:
    """A lesion-crop run's segmentation step is not part of any graph: refuse it in one line."""
    if getattr(ens, "cropper", None) is not None:
        raise BreastcadError(
            f"{ens.source}: a lesion-crop run cannot be exported or run with ONNX yet (its "
            "segmentation step is not part of the graph); use the PyTorch backend on the run folder"
        )


def onnx_bytes(ens: Ensemble, metadata: dict[str, str] | None = None) -> bytes:
    """The ensemble as a serialized ONNX model (dynamic batch, everything inline)."""
    refuse_lesion_crop(ens)
    proto = _onnx_program(ens).model_proto
    proto.doc_string = f"breastcad {ens.name}: uint8 image (N,S,S) -> probabilities (N,C)"
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def torchscript_bytes(ens: Ensemble) -> bytes:
    refuse_lesion_crop(ens)
    graph = EnsembleGraph(ens).eval()
    example = torch.from_numpy(sample_inputs(int(ens.card["input_size"]), 2))
    try:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(graph, (example,), check_trace=False)
            buf = io.BytesIO()
            torch.jit.save(traced, buf)
    except Exception as err:
        msg = " ".join(str(err).split())[:300]
        raise BreastcadError(f"TorchScript export of {ens.name} failed ({msg})") from None
    return buf.getvalue()


def run_exported(fmt: str, data: bytes, images: np.ndarray) -> np.ndarray:
    """Probabilities from the exported bytes, by the runtime a user would use."""
    if fmt == "onnx":
        from breastcad.predict import onnx_session

        session = onnx_session(data)
        return session.run(None, {INPUT_NAME: images})[0]
    with _quiet(), torch.no_grad():
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        return module(torch.from_numpy(images)).numpy()


def check_parity(ens: Ensemble, fmt: str, data: bytes) -> dict[str, Any]:
    """Exported vs PyTorch on sample inputs (batches of 1 and 6); raise past TOLERANCE."""
    size = int(ens.card["input_size"])
    images = sample_inputs(size, 6)
    ref = reference_probabilities(ens, images)
    diffs = [
        float(np.abs(run_exported(fmt, data, images[:1]) - ref[:1]).max()),
        float(np.abs(run_exported(fmt, data, images) - ref).max()),
    ]
    worst = max(diffs)
    if not worst <= TOLERANCE:
        raise BreastcadError(
            f"exported {fmt} model differs from PyTorch by {worst:.2e} in probability "
            f"(tolerance {TOLERANCE:.0e}); nothing written"
        )
    import onnxruntime

    return {
        "max_abs_diff": worst,
        "tolerance": TOLERANCE,
        "n_inputs": int(len(images)),
        "batch_sizes": [1, int(len(images))],
        "reference": "PyTorch float32 on the CPU (the predict code path)",
        "runtime": f"onnxruntime {onnxruntime.__version__}"
        if fmt == "onnx"
        else f"torch.jit {torch.__version__}",
    }


def export_model(
    ens: Ensemble, fmt: str, out: str | Path, force: bool = False
) -> tuple[Path, Path, dict[str, Any]]:
    """Write the exported model and its sidecar; returns (model path, sidecar path, sidecar)."""
    if fmt not in FORMATS:
        raise BreastcadError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    refuse_lesion_crop(ens)
    out = Path(out)
    side = sidecar_path(out)
    for p in (out, side):
        if p.exists() and not force:
            raise BreastcadError(f"{printable(str(p))}: already exists (use --force to replace)")
    if out.parent and not out.parent.is_dir():
        raise BreastcadError(f"{printable(str(out.parent))}: no such folder")
    meta_props = {
        "breastcad_model_version": ens.version,
        "threshold": repr(ens.threshold),
        "class_names": json.dumps(ens.card["class_names"]),
        "positive_class": ens.card["positive_class"],
    }
    data = onnx_bytes(ens, meta_props) if fmt == "onnx" else torchscript_bytes(ens)
    parity = check_parity(ens, fmt, data)
    size = int(ens.card["input_size"])
    sidecar = {
        "schema_version": SCHEMA_VERSION,
        "kind": SIDECAR_KIND,
        "format": fmt,
        "file": out.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "model_name": ens.name,
        "model_version": ens.version,
        "source": ens.source,
        "members": ens.members,
        "threshold": ens.threshold,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "shape": ["batch", size, size],
            "meaning": "grayscale image decoded to [0, 1], then "
            + str((ens.card.get("preprocessing") or {}).get("resize", "stretch to square"))
            + f" to {size} x {size}, quantised to uint8, as "
            "breastcad.data.cache.prepare_for_model does (mode in model_card.preprocessing)",
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", int(ens.card["num_classes"])],
            "classes": ens.card["class_names"],
            "meaning": "calibrated probabilities (mean over members of softmax(logits / T))",
        },
        "cards": ens.cards,
        "run": ens.run,
        "model_card": {**model_card(ens), "backend": fmt},
        "parity": parity,
        "exported_with": {"breastcad": __version__, "torch": torch.__version__},
    }
    atomic_write_bytes(out, data)
    atomic_write_json(side, sidecar)
    return out, side, sidecar
