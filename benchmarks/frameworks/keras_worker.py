"""Keras 3 contender: train and evaluate ``keras_cnn``'s basic CNN on the job's folds.

    KERAS_BACKEND=jax envs/keras-jax/bin/python keras_worker.py JOB.json

Run by ``bench_frameworks.py`` with the environment's own Python; the backend is
whatever ``KERAS_BACKEND`` names (tensorflow, jax or torch). Per fold: the
seed breastcad would use, ``model.fit`` on the training part (the framework's
own input pipeline over in-memory uint8 arrays, shuffled every epoch, class
weights), the validation AUC after every epoch choosing the epoch (breastcad's
rule), then the chosen weights predict the validation and test parts once.
Writes the record described in ``worker_common``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import keras  # the backend is fixed by KERAS_BACKEND before this import
import keras_cnn
import numpy as np
import worker_common as wc

BACKEND = keras.backend.backend()


def make_deterministic(seed: int) -> str:
    """Each backend's documented switch for repeatable runs; returns what was done."""
    keras.utils.set_random_seed(seed)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        return "keras.utils.set_random_seed + tf.config.experimental.enable_op_determinism()"
    if BACKEND == "torch":
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
        return "keras.utils.set_random_seed + torch.use_deterministic_algorithms(True)"
    return "keras.utils.set_random_seed (XLA on the CPU is deterministic by default)"


def framework_versions() -> dict[str, str]:
    versions = {"keras": keras.__version__, "backend": BACKEND}
    if BACKEND == "tensorflow":
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    elif BACKEND == "jax":
        import jax
        import jaxlib

        versions["jax"] = jax.__version__
        versions["jaxlib"] = jaxlib.__version__
        versions["jax_devices"] = ", ".join(str(d) for d in jax.devices())
    elif BACKEND == "torch":
        import torch

        versions["torch"] = torch.__version__
        versions["torch_threads"] = str(torch.get_num_threads())
    return versions


class Recorder(keras.callbacks.Callback):
    """Epoch timing (training only), validation AUC, the best weights, the first batch's end."""

    def __init__(
        self,
        x_val: np.ndarray,
        y_val: np.ndarray,
        eval_batch: int,
        n_train: int,
        clock: dict[str, float],
    ) -> None:
        super().__init__()
        self.x_val, self.eval_batch, self.n_train = x_val, eval_batch, n_train
        self.chooser = wc.EpochChooser(y_val)
        self.clock = clock
        self.epochs: list[wc.EpochRecord] = []
        self.best_weights: list[np.ndarray] | None = None

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.clock.setdefault("first_batch_end", time.time())

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        seconds = time.perf_counter() - self.t0  # before the validation pass
        val = self.model.predict(self.x_val, batch_size=self.eval_batch, verbose=0)
        auc, better = self.chooser.update(epoch + 1, np.asarray(val, np.float64))
        if better:
            self.best_weights = [w.copy() for w in self.model.get_weights()]
        loss = float((logs or {}).get("loss", float("nan")))
        self.epochs.append(wc.EpochRecord(epoch + 1, self.n_train, seconds, auc, loss))


def fold_seed(job: dict[str, Any], fold: int) -> int:
    return int(job["config"]["seed"]) * 1000 + fold  # breastcad's train_fold seed (repeat 0)


def train_fold(
    job: dict[str, Any], inputs: wc.Inputs, fold: wc.Fold, clock: dict[str, float]
) -> tuple[Any, wc.FoldRecord]:
    cfg = job["config"]
    train, aug, model_cfg = cfg["train"], cfg["augment"], cfg["model"]
    seed = fold_seed(job, fold.fold)
    keras.utils.set_random_seed(seed)
    size = inputs.images.shape[1]
    model = keras_cnn.build_model(size, 2, model_cfg, aug, seed)
    bs, epochs = int(train["batch_size"]), int(job["epochs"])
    steps = -(-len(fold.train) // bs)  # Keras keeps the last, partial batch
    keras_cnn.compile_model(model, train, steps * epochs, steps * int(train["warmup_epochs"]))
    x = inputs.images[..., None]
    y = inputs.targets
    weights = wc.class_weights(y[fold.train], 2)
    recorder = Recorder(x[fold.val], y[fold.val], job["eval_batch"], len(fold.train), clock)
    model.fit(
        x[fold.train],
        np.eye(2, dtype=np.float32)[y[fold.train]],
        batch_size=bs,
        epochs=epochs,
        shuffle=True,
        class_weight={0: float(weights[0]), 1: float(weights[1])}
        if train["balance"] == "weighted-loss"
        else None,
        callbacks=[recorder],
        verbose=0,
    )
    model.set_weights(recorder.best_weights)
    predict = lambda idx: np.asarray(  # noqa: E731
        model.predict(x[idx], batch_size=job["eval_batch"], verbose=0), np.float64
    )
    record = wc.FoldRecord(
        fold=fold.fold,
        best_epoch=recorder.chooser.best_epoch,
        val_logits=predict(fold.val).tolist(),
        test_logits=predict(fold.test).tolist(),
        epochs=recorder.epochs,
    )
    return model, record


def determinism_probe(job: dict[str, Any], inputs: wc.Inputs, batches: int = 3) -> dict[str, Any]:
    """Two identical short trainings from one seed: are the weights bit for bit the same?"""
    cfg = job["config"]
    fold, bs = inputs.folds[0], int(cfg["train"]["batch_size"])
    idx = fold.train[: batches * bs]
    x, y = inputs.images[idx][..., None], np.eye(2, dtype=np.float32)[inputs.targets[idx]]
    runs = []
    for _ in range(2):
        keras.utils.set_random_seed(12345)
        model = keras_cnn.build_model(x.shape[1], 2, cfg["model"], cfg["augment"], 12345)
        keras_cnn.compile_model(model, cfg["train"], batches, 1)
        model.fit(x, y, batch_size=bs, epochs=1, shuffle=True, verbose=0)
        runs.append(np.concatenate([w.ravel() for w in model.get_weights()]))
    diff = float(np.max(np.abs(runs[0] - runs[1])))
    return {"identical": diff == 0.0, "max_abs_diff": diff, "batches": batches}


def main(argv: list[str]) -> int:
    job = wc.load_job(argv[1])
    clock: dict[str, float] = {"imported": time.time()}  # the framework is imported by now
    switch = make_deterministic(int(job["config"]["seed"]))
    precision = job.get("keras_precision", "float32")
    keras.mixed_precision.set_global_policy(precision)
    inputs = wc.load_inputs(job)
    folds, model = [], None
    for fold in inputs.folds:
        model, record = train_fold(job, inputs, fold, clock)
        folds.append(record)
    x_test = inputs.images[inputs.folds[-1].test][..., None]
    inference = wc.time_inference(
        lambda: model.predict(x_test, batch_size=job["eval_batch"], verbose=0), len(x_test)
    )
    wc.write_record(
        job,
        {
            "framework": framework_versions(),
            "precision": precision,
            "data_format": keras.config.image_data_format(),
            "jit_compile": str(getattr(model, "jit_compile", "unknown")),
            "determinism_switch": switch,
            "clock": clock,
            "folds": folds,
            "inference": {**inference, "batch": job["eval_batch"], "how": "model.predict"},
            "determinism": determinism_probe(job, inputs),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
