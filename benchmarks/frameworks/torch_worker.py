"""PyTorch contenders: breastcad's own training code, eager or with ``torch.compile``.

    .venv/bin/python benchmarks/frameworks/torch_worker.py JOB.json

Run by ``bench_frameworks.py`` with the project's own environment. Every fold
is trained by ``breastcad.experiment.train_fold`` itself (the decoded uint8
stack in memory, breastcad's batched augmentation, bf16 autocast and
channels_last where the CPU has native bf16, deterministic algorithms, epoch
chosen on validation AUC); the job's ``config.yaml`` sets ``train.compile``
for the compiled contender. The fold models are written to the work folder
(the ONNX Runtime contender exports them). Writes the record described in
``worker_common``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import worker_common as wc
from torch.optim.optimizer import register_optimizer_step_post_hook

from breastcad.checkpoint import load_fold_model
from breastcad.config import Config, load_config
from breastcad.data.records import get_task
from breastcad.data.splits import FoldPlan
from breastcad.engine import Runtime, predict_logits, runtime_settings, train_one_epoch
from breastcad.experiment import Dataset, train_fold


def watch_first_step(clock: dict[str, float]) -> None:
    """Record when the first optimizer step of the process ends (hook on every optimizer)."""

    def hook(*_: Any) -> None:
        clock.setdefault("first_batch_end", time.time())

    register_optimizer_step_post_hook(hook)


def images_per_epoch(n_train: int, batch: int) -> int:
    """What ``train_one_epoch`` trains on: a last batch of one image is dropped."""
    return n_train - 1 if n_train % batch == 1 else n_train


def run_fold(
    cfg: Config, ds: Dataset, images: torch.Tensor, fold: wc.Fold, rt: Runtime, work: Path
) -> wc.FoldRecord:
    plan = FoldPlan(
        repeat=0, seed=cfg.seed, fold=fold.fold, train=fold.train, val=fold.val, test=fold.test
    )
    fold_dir = work / f"fold-{fold.fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    res = train_fold(cfg, ds, images, plan, rt, fold_dir, progress=False)
    (fold_dir / "DONE").write_text("done\n")
    n = images_per_epoch(len(fold.train), int(cfg.train.batch_size))
    epochs = [
        wc.EpochRecord(
            int(h["epoch"]), n, float(h["seconds"]), float(h["val_auc"]), float(h["train_loss"])
        )
        for h in res.history
    ]
    return wc.FoldRecord(
        fold=fold.fold,
        best_epoch=res.best_epoch,
        val_logits=res.val_logits.astype(np.float64).tolist(),
        test_logits=res.test_logits.astype(np.float64).tolist(),
        epochs=epochs,
    )


def time_inference(
    cfg: Config, images: torch.Tensor, fold: wc.Fold, rt: Runtime, work: Path, batch: int
) -> dict[str, Any]:
    """The last fold's saved model, loaded as ``predict`` loads it, on its test fold."""
    model, _ = load_fold_model(work / f"fold-{fold.fold}")
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        model.compile()
    timing = wc.time_inference(
        lambda: predict_logits(model, images, fold.test, rt, batch_size=batch), len(fold.test)
    )
    return {**timing, "batch": batch, "how": "breastcad.engine.predict_logits"}


def determinism_probe(
    cfg: Config,
    images: torch.Tensor,
    targets: torch.Tensor,
    fold: wc.Fold,
    rt: Runtime,
    batches: int = 3,
) -> dict[str, Any]:
    """Two identical short trainings (``train_one_epoch``) from one seed: same weights?"""
    from breastcad.models import create_model

    bs = int(cfg.train.batch_size)
    idx = fold.train[: batches * bs]
    runs = []
    for _ in range(2):
        torch.manual_seed(12345)
        gen = torch.Generator().manual_seed(12345)
        model = create_model(cfg.model.name, 2, 1).to(rt.device)
        if rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            model.compile()
        opt = torch.optim.AdamW(
            model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
        train_one_epoch(
            model, images, targets, idx, opt, None, cfg.train, cfg.augment, gen, rt, 0, batches, 1
        )
        runs.append(
            torch.cat(
                [p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()]
            )
        )
    diff = float((runs[0] - runs[1]).abs().max())
    return {"identical": diff == 0.0, "max_abs_diff": diff, "batches": batches}


def main(argv: list[str]) -> int:
    job = wc.load_job(argv[1])
    clock: dict[str, float] = {"imported": time.time()}  # torch and breastcad are imported
    watch_first_step(clock)
    cfg = load_config(job["config_yaml"])
    rt = runtime_settings(cfg.train)
    if cfg.train.deterministic:  # as `breastcad train` does
        torch.use_deterministic_algorithms(True, warn_only=True)
    inputs = wc.load_inputs(job)
    images, targets = torch.from_numpy(inputs.images), torch.from_numpy(inputs.targets)
    ds = Dataset(
        samples=[], targets=inputs.targets, groups=[], hashes=[], task=get_task(cfg.data.task)
    )
    work = Path(job["work_dir"])
    folds = [run_fold(cfg, ds, images, fold, rt, work) for fold in inputs.folds]
    inference = time_inference(cfg, images, inputs.folds[-1], rt, work, job["eval_batch"])
    wc.write_record(
        job,
        {
            "framework": {"torch": torch.__version__, "threads": str(torch.get_num_threads())},
            "precision": "bf16 autocast" if rt.bf16 else "float32",
            "data_format": "channels_last (NHWC)" if rt.channels_last else "NCHW",
            "jit_compile": "torch.compile (inductor)" if cfg.train.compile else "eager",
            "determinism_switch": "torch.manual_seed + torch.use_deterministic_algorithms(True)",
            "clock": clock,
            "folds": folds,
            "inference": inference,
            "determinism": determinism_probe(cfg, images, targets, inputs.folds[0], rt),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
