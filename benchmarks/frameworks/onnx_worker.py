"""ONNX Runtime contender (inference only): breastcad's fold models exported and run with ORT.

    .venv/bin/python benchmarks/frameworks/onnx_worker.py JOB.json

Run by ``bench_frameworks.py`` after the PyTorch eager contender, whose fold
models it takes from ``job["models_dir"]``. Each fold model is exported the way
``breastcad export --format onnx`` exports it (dynamo exporter, preprocessing
and temperature inside the graph, checked against PyTorch), then its test fold
is predicted with onnxruntime. The probabilities it returns are already
calibrated with the fold's temperature. Writes the record described in
``worker_common``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
import worker_common as wc

from breastcad.checkpoint import load_fold_model
from breastcad.export import INPUT_NAME, check_parity, onnx_bytes
from breastcad.predict import Ensemble, onnx_session


def export_fold(folder: Path) -> tuple[bytes, dict[str, Any], float]:
    """(ONNX bytes, parity record, export seconds) for one fold folder."""
    model, card = load_fold_model(folder)
    ens = Ensemble(
        models=[model], cards=[card], threshold=0.5, source=str(folder), members=[folder.name]
    )
    t0 = time.perf_counter()
    data = onnx_bytes(ens)
    seconds = time.perf_counter() - t0
    return data, check_parity(ens, "onnx", data), seconds


def predict(session: Any, images: np.ndarray, batch: int) -> np.ndarray:
    out = [
        session.run(None, {INPUT_NAME: np.ascontiguousarray(images[b : b + batch])})[0]
        for b in range(0, len(images), batch)
    ]
    return np.concatenate(out).astype(np.float64)


def main(argv: list[str]) -> int:
    job = wc.load_job(argv[1])
    clock: dict[str, float] = {"imported": time.time()}
    inputs = wc.load_inputs(job)
    models_dir, batch = Path(job["models_dir"]), int(job["eval_batch"])
    folds, exports, session, test = [], [], None, None
    for fold in inputs.folds:
        data, parity, seconds = export_fold(models_dir / f"fold-{fold.fold}")
        exports.append({"fold": fold.fold, "seconds": seconds, "bytes": len(data), **parity})
        session = onnx_session(data)
        test = inputs.images[fold.test]
        probs = predict(session, test, batch)
        clock.setdefault("first_batch_end", time.time())  # first predictions out
        folds.append(
            wc.FoldRecord(fold=fold.fold, best_epoch=0, val_logits=[], test_probs=probs.tolist())
        )
    inference = wc.time_inference(lambda: predict(session, test, batch), len(test))
    wc.write_record(
        job,
        {
            "framework": {"onnxruntime": onnxruntime.__version__, "exported_by": torch.__version__},
            "precision": "float32",
            "data_format": "NCHW (exported graph)",
            "jit_compile": "ONNX Runtime graph optimisations (default level)",
            "determinism_switch": "n/a (inference only)",
            "clock": clock,
            "folds": folds,
            "exports": exports,
            "inference": {**inference, "batch": batch, "how": "InferenceSession.run"},
            "determinism": None,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
