"""``breastcad tune``: nested Optuna search; the test folds never choose a setting."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from breastcad.errors import BreastcadError

EXAMPLES = """examples:
  breastcad tune --model basic_cnn --trials 20 --out runs/tuned        # nested search, 5 folds
  breastcad tune --trials 10 --timeout 600 --data ~/Dataset_BUSI_with_GT
  breastcad tune --resume runs/tuned                                   # continue a stopped search
  breastcad train --config runs/tuned/best.yaml                        # use the final winner
  # several machines, one study (each runs trials until the study has --trials finished ones):
  breastcad tune --search-only --storage postgresql://user:pw@db/optuna --study busi \\
      --trials 100 --best best.yaml
"""


def add_parser(sub: Any) -> None:
    from breastcad.cli import add_run_options

    p = sub.add_parser(
        "tune",
        help="nested hyperparameter search (Optuna) -> honest tuned result and best.yaml",
        description="For each outer grouped fold, search on that fold's training part only "
        "(validation AUC on a grouped inner split, TPE sampler, pruning), train the winner and "
        "score it on the outer test fold. A final search on all data writes best.yaml for later "
        "use; it is never scored.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="registered model name (default basic_cnn)")
    p.add_argument("--trials", type=int, help="finished trials per search (default 20)")
    p.add_argument("--timeout", type=float, help="seconds per search (default: no limit)")
    p.add_argument("--trial-epochs", type=int, help="maximum epochs of one trial (default 12)")
    p.add_argument("--storage", help="Optuna storage URL (default: optuna.db in the run folder)")
    p.add_argument("--study", default="tune", help="study name (prefix) in the storage")
    p.add_argument(
        "--search-only",
        action="store_true",
        help="be one worker of a shared study on all data (needs --storage); no nested CV",
    )
    p.add_argument("--best", help="with --search-only: write the study's best config here")
    add_run_options(p)
    p.add_argument("--out", help="run folder (default runs/<timestamp>-tune-<model>)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted tuning run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from breastcad.cli import run_overrides
    from breastcad.config import load_config
    from breastcad.tuning import run_search_only, run_tuning

    if args.resume:
        if run_overrides(args) or args.config or args.out or args.trials or args.storage:
            raise BreastcadError("--resume RUN continues RUN with its own settings; drop others")
        m = run_tuning(None, Path(args.resume), progress=not args.quiet, resume=True)
        _print(m, Path(args.resume))
        return 0
    pairs = run_overrides(args)
    for key, value in (
        ("tune.trials", args.trials),
        ("tune.timeout", args.timeout),
        ("tune.epochs", args.trial_epochs),
    ):
        if value is not None:
            pairs.append((key, value))
    cfg = load_config(args.config, pairs)
    if args.search_only:
        if not args.storage:
            raise BreastcadError("--search-only shares a study: give its --storage URL")
        study = run_search_only(
            cfg, args.storage, args.study, Path(args.best) if args.best else None, not args.quiet
        )
        n = len(study.trials)
        print(f"study {args.study}: {n} trial(s); best value {study.best_value:.3f}")
        return 0
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-tune-{cfg.model.name}"
    out = Path(args.out or Path("runs") / name)
    m = run_tuning(cfg, out, args.storage, args.study, progress=not args.quiet)
    _print(m, out)
    return 0


def _print(m: dict[str, Any], out: Path) -> None:
    auc = m["pooled"]["roc_auc"]
    t = m["tuning"]
    print(
        f"Nested-tuned pooled out-of-fold ROC-AUC {auc['value']:.3f} "
        f"(95% CI {auc['low']:.3f}-{auc['high']:.3f}); {t['trials_per_search']} trials per "
        f"search, {len(t['winners'])} outer folds"
    )
    print(f"best.yaml (final search on all data, never scored): {out / 'best.yaml'}")
    print(f"Trials: {out / 'trials.csv'}\nReport: {out / 'report.html'}")
