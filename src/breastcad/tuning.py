"""Nested hyperparameter search with Optuna: the study's Keras-Tuner search, without leakage.

For each outer grouped fold a separate search runs on that fold's training
part only (objective: best validation AUC on a grouped inner split of it);
that fold's winner is then trained like any fold (epoch and temperature on
its own inner validation split) and predicts the outer test fold once. The
pooled outer-fold result is the honest estimate of "with tuning". A final
search on all the data writes ``best.yaml`` for later use; it is never scored.

Studies live in an Optuna storage (a SQLite file in the run folder by
default), so an interrupted search resumes where it stopped and several
workers can share one study (``--storage URL``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from breastcad.config import Config, with_model_defaults, with_overrides
from breastcad.data.splits import FoldPlan, grouped_split
from breastcad.errors import ConfigError
from breastcad.io import atomic_write_csv, atomic_write_json, atomic_write_text, read_json

PLAN_FILE = "tune.json"
_OPEN_ATTEMPTS = 10

# The default augmentation magnitudes, scaled together by one "strength" parameter.
_AUGMENT_SCALED = ("rotate_deg", "shear_deg", "translate", "brightness", "contrast", "gamma")


def _augment_settings(strength: float, base: Config) -> dict[str, Any]:
    """Augmentation magnitudes ``strength`` x the defaults (0 = off)."""
    from breastcad.config import AugmentConfig

    default = AugmentConfig()
    out: dict[str, Any] = {"augment.enabled": strength > 0}
    for key in _AUGMENT_SCALED:
        out[f"augment.{key}"] = round(getattr(default, key) * strength, 4)
    out["augment.speckle"] = round(min(default.speckle * strength, 0.3), 4)
    out["augment.scale_min"] = round(1 - (1 - default.scale_min) * strength, 4)
    out["augment.scale_max"] = round(1 + (default.scale_max - 1) * strength, 4)
    return out


def suggest(trial: Any, base: Config) -> dict[str, Any]:
    """One point of the search space, as dotted config keys."""
    from breastcad.models import get_spec

    own_lr = get_spec(base.model.name).lr  # 1/10 to 10/3 of it: 3e-4 to 1e-2 for 3e-3
    params: dict[str, Any] = {
        "train.lr": trial.suggest_float("lr", own_lr / 10, own_lr * 10 / 3, log=True),
        "train.weight_decay": trial.suggest_float("weight_decay", 1e-5, 1e-2, log=True),
        "train.batch_size": trial.suggest_categorical("batch_size", [16, 32, 64]),
    }
    params.update(_augment_settings(trial.suggest_float("augment_strength", 0.0, 1.5), base))
    if base.model.name == "basic_cnn":
        params.update(
            {
                "model.width": trial.suggest_categorical("width", [16, 24, 32, 48]),
                "model.depth": trial.suggest_int("depth", 3, 5),
                "model.kernel_size": trial.suggest_categorical("kernel_size", [3, 5]),
                "model.dense_units": trial.suggest_categorical("dense_units", [64, 128, 256]),
                "model.dropout": trial.suggest_float("dropout", 0.0, 0.5),
                "data.image_size": trial.suggest_categorical("image_size", [96, 128, 160]),
            }
        )
    elif base.model.pretrained is not None and not base.model.freeze_backbone:
        params["train.backbone_lr_factor"] = trial.suggest_float(
            "backbone_lr_factor", 0.01, 1.0, log=True
        )
    return params


def settings_for(params: dict[str, Any], base: Config) -> dict[str, Any]:
    """Dotted config keys of a finished trial's parameters (replays :func:`suggest`)."""
    import optuna

    fixed = optuna.trial.FixedTrial(params)
    return suggest(fixed, base)


def apply_settings(base: Config, settings: dict[str, Any]) -> Config:
    return with_overrides(base, list(settings.items()))


def _pruner(cfg: Config) -> Any:
    import optuna

    if cfg.tune.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.tune.startup_trials, n_warmup_steps=2
        )
    if cfg.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=cfg.tune.epochs)
    return optuna.pruners.NopPruner()


def open_study(name: str, storage: str, cfg: Config, seed: int | None) -> Any:
    """Create or continue a study; ``seed`` None for workers sharing one study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            return optuna.create_study(
                study_name=name,
                storage=storage,
                direction="maximize",
                sampler=optuna.samplers.TPESampler(seed=seed),
                pruner=_pruner(cfg),
                load_if_exists=True,
            )
        except (ValueError, ImportError, RuntimeError) as err:  # bad URL, missing driver, ...
            raise ConfigError(f"optuna storage {storage!r}: {err}".replace("\n", " ")) from None
        except Exception as err:  # SQLAlchemy's own errors (server down, no such database)
            # Workers that start together race to create the tables or the study:
            # the loser sees "already exists" (or a locked SQLite file) and tries again.
            transient = any(t in str(err) for t in ("already exists", "locked", "UNIQUE"))
            if transient and attempt + 1 < _OPEN_ATTEMPTS:
                time.sleep(0.2 * (attempt + 1))
                continue
            msg = f"{type(err).__name__}: {err}".splitlines()[0]
            raise ConfigError(f"optuna storage {storage!r}: {msg}") from None
    raise AssertionError("unreachable")


def finished_trials(study: Any) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def inner_split(
    targets: np.ndarray, groups: list[str], idx: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """A grouped, stratified train/validation split of the samples ``idx`` only."""
    _, codes = np.unique(np.asarray(groups, dtype=object)[idx].astype(str), return_inverse=True)
    n_inner = max(2, round(1.0 / val_fraction))
    tr, va = grouped_split(targets[idx], codes, n_inner, seed)[0]
    return np.sort(idx[tr]), np.sort(idx[va])


def run_search(
    study: Any,
    base: Config,
    ds: Any,
    stack_for: Callable[[int], torch.Tensor],
    search_idx: np.ndarray,
    rt: Any,
    seed: int,
    log: Any = print,
) -> Any:
    """Trials on ``search_idx`` only until the study holds ``tune.trials`` finished ones."""
    import optuna

    from breastcad import experiment

    train_idx, val_idx = inner_split(ds.targets, ds.groups, search_idx, base.cv.val_fraction, seed)

    def objective(trial: optuna.Trial) -> float:
        cfg = apply_settings(base, suggest(trial, base))
        cfg.train.epochs = base.tune.epochs
        cfg.train.warmup_epochs = min(cfg.train.warmup_epochs, max(0, cfg.train.epochs - 1))
        plan = FoldPlan(0, seed, trial.number, train_idx, val_idx, np.empty(0, dtype=np.int64))

        def report(epoch: int, val_auc: float) -> None:
            trial.report(val_auc if math.isfinite(val_auc) else 0.0, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        res = experiment.train_fold(
            cfg, ds, stack_for(cfg.data.image_size), plan, rt, None, False, on_epoch=report
        )
        aucs = [h["val_auc"] for h in res.history if math.isfinite(h["val_auc"])]
        return max(aucs) if aucs else 0.0

    remaining = base.tune.trials - finished_trials(study)
    if remaining <= 0:
        return study
    log(f"search {study.study_name}: {remaining} trial(s) on {len(search_idx)} images")
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
        study.optimize(
            objective,
            timeout=base.tune.timeout,
            callbacks=[
                optuna.study.MaxTrialsCallback(base.tune.trials, states=states),
                lambda st, t: log(_trial_line(st, t)),
            ],
            catch=(),
        )
    return study


def _trial_line(study: Any, trial: Any) -> str:
    steps = len(trial.intermediate_values)
    value = "" if trial.value is None else f" validation AUC {trial.value:.3f}"
    state = trial.state.name.lower()
    return f"  {study.study_name} trial {trial.number}: {state}{value} ({steps} epochs)"


def best_settings(study: Any, base: Config) -> dict[str, Any]:
    try:
        params = study.best_trial.params
    except ValueError:
        raise ConfigError(f"study {study.study_name}: no finished trial to choose from") from None
    return settings_for(params, base)


def trials_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        dur = t.duration.total_seconds() if t.duration is not None else math.nan
        rows.append(
            {
                "study": study.study_name,
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "epochs_run": len(t.intermediate_values),
                "seconds": round(dur, 1),
                **{f"param_{k}": v for k, v in t.params.items()},
            }
        )
    return rows


def write_trials_table(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    atomic_write_csv(
        path, keys, [["" if r.get(k) is None else r.get(k) for k in keys] for r in rows]
    )


def plot_study(study: Any, out_dir: Path) -> dict[str, Path]:
    """Optuna's optimisation history and parameter importances, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    from breastcad.io import atomic_write_bytes

    out: dict[str, Path] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind, fn in (("history", ovm.plot_optimization_history),
                         ("importance", ovm.plot_param_importances)):  # fmt: skip
            try:
                ax = fn(study)
            except (ValueError, RuntimeError, ZeroDivisionError, optuna.exceptions.OptunaError):
                continue  # e.g. importances need two or more finished trials
            fig = ax.figure
            fig.set_size_inches(7, 4.2)
            path = out_dir / f"tune_{study.study_name}_{kind}.png"
            import io

            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
            plt.close(fig)
            atomic_write_bytes(path, buf.getvalue())
            out[f"{study.study_name}_{kind}"] = path
    return out


def write_best_yaml(path: Path, base: Config, settings: dict[str, Any], note: str) -> Path:
    cfg = apply_settings(base, settings)
    cfg.data.path = base.data.path
    text = f"# {note}\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return atomic_write_text(path, text)


# ---------------------------------------------------------------------------- the pipeline


def _stack_loader(ds: Any, cfg: Config) -> Callable[[int], torch.Tensor]:
    """Decoded images at a given input size, loaded (from the cache) once per size."""
    from breastcad.data.cache import load_stack

    stacks: dict[int, torch.Tensor] = {}
    paths = [s.path for s in ds.samples]

    def stack_for(size: int) -> torch.Tensor:
        if size not in stacks:
            stacks[size] = torch.from_numpy(
                load_stack(
                    paths,
                    ds.hashes,
                    size,
                    cfg.data.cache_dir,
                    cfg.data.max_pixels,
                    preprocess=cfg.data.preprocess,
                )
            )
        return stacks[size]

    return stack_for


def refuse_lesion_crop(cfg: Config) -> None:
    """Before any work: a search trains on whole-image stacks and has no segmentation step."""
    if cfg.data.preprocess == "lesion-crop":
        raise ConfigError(
            "tune: data.preprocess lesion-crop is not supported (the search has no "
            "segmentation step); tune with stretch, then train the best settings with "
            "--set data.preprocess=lesion-crop"
        )


def run_tuning(
    cfg: Config | None,
    run_dir: Path,
    storage: str | None = None,
    study_prefix: str = "tune",
    progress: bool = True,
    resume: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """Nested search over the outer grouped folds, then a final search -> best.yaml."""
    from breastcad import experiment
    from breastcad.config import load_config
    from breastcad.engine import runtime_settings
    from breastcad.envinfo import environment
    from breastcad.io import ensure_dir, remove_stale_temp_files

    if resume:
        if not (run_dir / PLAN_FILE).exists():
            raise ConfigError(
                f"{run_dir}: not a tuning folder that can be resumed (no {PLAN_FILE})"
            )
        plan_doc = read_json(run_dir / PLAN_FILE)
        cfg = load_config(run_dir / "config.yaml")
        storage, study_prefix = plan_doc["storage"], plan_doc["study"]
    else:
        assert cfg is not None
        if run_dir.is_dir() and any(not p.name.endswith(".tmp") for p in run_dir.iterdir()):
            raise ConfigError(
                f"{run_dir}: folder exists and is not empty; continue it with "
                f"`breastcad tune --resume {run_dir}` or choose another --out"
            )
        if cfg.cv.repeats != 1:
            raise ConfigError("tune: cv.repeats must be 1 (one search per outer fold)")
    refuse_lesion_crop(cfg)
    cfg = with_model_defaults(cfg)
    audit, audit_text, ds, plans = experiment.prepare_data(cfg, progress, log)
    ensure_dir(run_dir)
    remove_stale_temp_files(run_dir)
    storage = storage or f"sqlite:///{(run_dir / 'optuna.db').resolve()}"
    if not resume:
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        audit.write(run_dir / "audit.json")
        atomic_write_text(run_dir / "audit.txt", audit_text + "\n")
        atomic_write_json(run_dir / "folds.json", experiment.folds_document(ds, plans, cfg))
        atomic_write_json(run_dir / PLAN_FILE, {"storage": storage, "study": study_prefix})
    else:
        experiment._check_same_folds(run_dir / "folds.json", ds, plans, cfg)
    rt = runtime_settings(cfg.train)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    atomic_write_json(run_dir / "env.json", environment(rt))

    stack_for = _stack_loader(ds, cfg)
    t0 = time.perf_counter()
    results, winners, all_rows, plot_paths = [], [], [], {}
    for plan in plans:
        search_idx = np.sort(np.concatenate([plan.train, plan.val]))  # never plan.test
        study = open_study(f"{study_prefix}-{plan.name}", storage, cfg, cfg.seed + plan.fold)
        run_search(
            study, cfg, ds, stack_for, search_idx, rt, cfg.seed + 7919 * (plan.fold + 1), log
        )
        settings = best_settings(study, cfg)
        fold_cfg = apply_settings(cfg, settings)
        fold_dir = ensure_dir(run_dir / plan.name)
        write_best_yaml(
            fold_dir / "best.yaml",
            cfg,
            settings,
            f"winner of the search on {plan.name}'s training part (inner validation AUC "
            f"{study.best_value:.3f})",
        )
        winners.append(
            {"fold": plan.fold, "inner_val_auc": study.best_value, "params": study.best_params}
        )
        all_rows += trials_rows(study)
        plot_paths.update(plot_study(study, ensure_dir(run_dir / "plots")))
        if (fold_dir / experiment.DONE).exists():
            results.append(experiment.load_fold_outputs(fold_dir, plan))
            continue
        stack = stack_for(fold_cfg.data.image_size)
        res = experiment.train_fold(fold_cfg, ds, stack, plan, rt, fold_dir, progress)
        experiment.save_fold_outputs(fold_dir, res, ds)
        results.append(res)
    nested_seconds = time.perf_counter() - t0

    metrics, arrays = experiment.summarise(cfg, ds, results)
    threshold = metrics["operating_point"]["threshold"]
    experiment.write_oof(run_dir / "oof_predictions.csv", ds, arrays, threshold)

    final = open_study(f"{study_prefix}-final", storage, cfg, cfg.seed + 99)
    run_search(final, cfg, ds, stack_for, np.arange(len(ds.samples)), rt, cfg.seed + 99, log)
    final_settings = best_settings(final, cfg)
    write_best_yaml(
        run_dir / "best.yaml",
        cfg,
        final_settings,
        f"breastcad tune: winner of the final search on all data (inner validation AUC "
        f"{final.best_value:.3f}); for future runs only, never scored on the data it was tuned on",
    )
    all_rows += trials_rows(final)
    plot_paths.update(plot_study(final, run_dir / "plots"))
    write_trials_table(run_dir / "trials.csv", all_rows)
    metrics["timing"] = {
        "fold_seconds": [r.seconds for r in results],
        "train_images_per_second": float(np.mean([r.images_per_second for r in results])),
        "nested_search_seconds": nested_seconds,
    }
    metrics["tuning"] = {
        "trials_per_search": cfg.tune.trials,
        "trial_epochs": cfg.tune.epochs,
        "pruner": cfg.tune.pruner,
        "timeout_per_search": cfg.tune.timeout,
        "storage": storage if not storage.startswith("sqlite") else "sqlite (optuna.db)",
        "winners": winners,
        "final_best": {"inner_val_auc": final.best_value, "params": final.best_params},
        "note": "each outer fold's search saw only that fold's training part; the final "
        "search (best.yaml) is for future use and is never scored",
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    from breastcad.report import write_report

    write_report(run_dir, ds, results, arrays, stack_for(cfg.data.image_size).numpy())
    return metrics


def run_search_only(
    cfg: Config, storage: str, study_name: str, out: Path | None, progress: bool, log: Any = print
) -> Any:
    """One shared study on all the data (a worker among several); best.yaml when ``out``."""
    from breastcad import experiment
    from breastcad.data.audit import run_audit
    from breastcad.data.sources import load_source
    from breastcad.engine import runtime_settings

    refuse_lesion_crop(cfg)
    cfg = with_model_defaults(cfg)
    # unseeded: workers sharing a study must not all propose the same points
    study = open_study(study_name, storage, cfg, None)  # a bad storage fails before any work
    audit = run_audit(
        load_source(cfg.data.path),
        max_pixels=cfg.data.max_pixels,
        progress=progress,
        preprocess=cfg.data.preprocess,
    )
    ds = experiment.select_task_samples(audit, cfg)
    rt = runtime_settings(cfg.train)
    stack_for = _stack_loader(ds, cfg)
    run_search(study, cfg, ds, stack_for, np.arange(len(ds.samples)), rt, cfg.seed + 99, log)
    if out is not None:
        write_best_yaml(
            out, cfg, best_settings(study, cfg), f"breastcad tune: best of study {study_name}"
        )
    return study
