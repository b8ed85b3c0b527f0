"""The ``breastcad`` command line.

Errors in the user's input are printed as one line (``error: FILE: problem``)
with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from breastcad import __version__
from breastcad.errors import BreastcadError

EXAMPLES_TRAIN = """examples:
  breastcad train                                   # basic CNN, 5-fold grouped CV, bundled BUSI
  breastcad train --data ~/Dataset_BUSI_with_GT --out runs/busi-full
  breastcad train --data manifest.csv --task three-class --folds 10 --repeats 3
  breastcad train --config configs/default.yaml --set train.lr=1e-3 --set augment.enabled=false
  breastcad train --resume runs/busi-full               # continue after a crash or a kill
  breastcad train --out runs/shared --fold 2            # one fold job; then: breastcad collect
  torchrun --nproc_per_node 4 -m breastcad train --out runs/ddp   # data-parallel (DDP)
"""

EXAMPLES_AUDIT = """examples:
  breastcad audit                                   # the bundled BUSI copy
  breastcad audit ~/Dataset_BUSI_with_GT --out busi-audit.json
  breastcad audit manifest.csv
"""


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Settings shared by train and compare (each also settable with --set)."""
    p.add_argument("--data", help="folder of class folders, BUSI folder or CSV (default: bundled)")
    p.add_argument("--config", help="YAML config file (see configs/default.yaml)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting"
    )
    p.add_argument("--task", help="benign-vs-malignant | three-class | malignant-vs-rest")
    p.add_argument("--folds", type=int, help="number of outer folds (default 5)")
    p.add_argument("--repeats", type=int, help="repeat the k-fold with N seeds")
    p.add_argument("--epochs", type=int, help="maximum epochs per fold")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--image-size", type=int, help="input size in pixels (default: the model's own)")
    p.add_argument("--batch-size", type=int, help="images per step (default: the model's own)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument(
        "--pretrained",
        metavar="imagenet|FILE",
        help="start from weights: torchvision's ImageNet weights in $TORCH_HOME, or a file",
    )
    p.add_argument(
        "--freeze-backbone", action="store_true", help="train only the new head (with --pretrained)"
    )
    p.add_argument(
        "--backbone-lr-factor",
        type=float,
        help="backbone learning rate = lr x this when fine-tuning (e.g. 0.1)",
    )
    p.add_argument("--keep-conflicts", action="store_true", help="keep conflicting-label groups")
    p.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="deterministic algorithms: same seed, same predictions (default: on)",
    )


def _add_train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="grouped cross-validation of a model -> a run folder with report",
        description="Audit the data, run grouped stratified k-fold cross-validation, "
        "and write a run folder (metrics with CIs, plots, report.html, fold models).",
        epilog=EXAMPLES_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_options(p)
    p.add_argument("--model", help="registered model name (default basic_cnn)")
    p.add_argument("--out", help="run folder to write (default runs/<timestamp>-<model>)")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue an interrupted run folder with its own config (other settings refused)",
    )
    p.add_argument(
        "--fold",
        type=int,
        metavar="K",
        help="train only outer fold K (0-based, folder fold-K) into a shared run folder "
        "(with --out or --resume); `breastcad collect RUN` merges the folds",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


EXAMPLES_PREDICT = """examples:
  breastcad predict runs/demo ~/scans/case17.png          # the run's fold ensemble
  breastcad predict runs/demo ~/scans/ --out preds.csv     # every image in a folder
  breastcad predict runs/demo/fold-2 case17.dcm            # one fold model alone
  breastcad predict runs/demo --fold 2 case17.dcm          # the same
  breastcad predict demo.onnx ~/scans/                     # an exported model (onnxruntime)
  breastcad predict runs/demo ~/scans/ --backend onnx      # the run, run by onnxruntime
  breastcad predict runs/patches mammo.dcm --sliding-window # a patch model over a whole image
"""


def _add_predict_parser(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="probabilities and decisions from a trained run",
        description="Predict with a run (the ensemble of its fold models, calibrated, with the "
        "run's threshold) or with one fold folder. Unreadable files are listed with the "
        "reason; the others are still predicted.",
        epilog=EXAMPLES_PREDICT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        metavar="RUN_OR_CHECKPOINT",
        help="run folder, fold folder, or an exported .onnx file (with its .onnx.json sidecar)",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    p.add_argument("--fold", type=int, help="use only fold K of the run")
    p.add_argument("--out", help="write the predictions as CSV to this file")
    p.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default=None,
        help="torch (default for runs) or onnx (onnxruntime; default for .onnx files)",
    )
    p.add_argument(
        "--sliding-window",
        action="store_true",
        help="whole mammograms with a patch model (trained on `breastcad patches` output): "
        "p = max over windows of the patch size inside the breast; reports the top window",
    )
    p.add_argument(
        "--stride",
        type=float,
        default=None,
        help="with --sliding-window: step between windows as a share of their side (default 0.5)",
    )
    p.add_argument(
        "--heatmaps", metavar="DIR", help="with --sliding-window: one window-map PNG per image"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="breastcad",
        description="Train, evaluate and audit breast-lesion classifiers honestly.",
        epilog="examples:\n  breastcad audit\n  breastcad train --epochs 20 --out runs/demo\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"breastcad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pa = sub.add_parser(
        "audit",
        help="what is in a dataset, and what is wrong with it",
        description="Count classes and sizes, list unreadable files, find exact and near "
        "duplicates and duplicate groups with conflicting labels.",
        epilog=EXAMPLES_AUDIT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pa.add_argument("data", nargs="?", help="dataset folder or CSV manifest (default: bundled)")
    pa.add_argument("--out", help="write the full audit as JSON to this file")
    pa.add_argument(
        "--preprocess",
        default="stretch",
        choices=("stretch", "breast-crop"),
        help="compare images as the model will see them (breast-crop: mammograms, markers "
        "outside the breast ignored)",
    )
    pa.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_train_parser(sub)
    _add_predict_parser(sub)
    for name in COMMAND_MODULES:
        _command_module(name).add_parser(sub)
    return parser


def cmd_audit(args: argparse.Namespace) -> int:
    from breastcad.data.audit import run_audit
    from breastcad.data.sources import load_source

    report = run_audit(load_source(args.data), progress=not args.quiet, preprocess=args.preprocess)
    print(report.summary_text())
    if args.out:
        report.write(Path(args.out))
        print(f"audit written to {args.out}")
    return 0


def run_overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    from breastcad.config import parse_override

    pairs: list[tuple[str, Any]] = [parse_override(s) for s in args.set]
    flags = {
        "data.path": args.data,
        "model.name": getattr(args, "model", None),
        "data.task": args.task,
        "cv.folds": args.folds,
        "cv.repeats": args.repeats,
        "train.epochs": args.epochs,
        "seed": args.seed,
        "data.image_size": args.image_size,
        "train.deterministic": args.deterministic,
        "train.batch_size": args.batch_size,
        "train.device": args.device,
        "model.pretrained": args.pretrained,
        "train.backbone_lr_factor": args.backbone_lr_factor,
    }
    pairs += [(k, v) for k, v in flags.items() if v is not None]
    if args.keep_conflicts:
        pairs.append(("data.keep_conflicts", True))
    if args.freeze_backbone:
        pairs.append(("model.freeze_backbone", True))
    return pairs


def _fmt_ci(m: dict[str, Any]) -> str:
    return f"{m['value']:.3f} (95% CI {m['low']:.3f}-{m['high']:.3f})"


def print_summary(summary: Any) -> None:
    m = summary.metrics
    op = m["operating_point"]
    pooled = m["pooled"]
    folds = len(m["per_fold"])
    print()
    if m.get("leaky_image_split"):
        print("LEAKY image-level split (duplicate groups ignored): numbers are inflated")
    what = "" if len(m["classes"]) == 2 else f" ({m['positive_class']} vs rest)"
    print(f"Pooled out-of-fold ROC-AUC{what} {_fmt_ci(pooled['roc_auc'])}")
    print(
        f"  {m['task']}, grouped CV ({folds} fold runs), {m['n_images']} images "
        f"in {m['n_groups']} groups"
        + (
            " (every image its own group)"
            if m.get("leaky_image_split")
            else " (duplicates kept together)"
        )
    )
    print(
        f"Operating point (target sensitivity {op['target_sensitivity']:.2f}, "
        f"threshold {op['threshold']:.3f} chosen on validation data):"
    )
    print(f"  sensitivity {_fmt_ci(pooled['sensitivity'])}")
    print(f"  specificity {_fmt_ci(pooled['specificity'])}")
    if "repeats" in m:
        r = m["repeats"]
        print(f"AUC over {r['n']} repeats: mean {r['roc_auc_mean']:.3f}, sd {r['roc_auc_sd']:.3f}")
    secs = summary.fold_seconds
    print(
        f"Time per fold {sum(secs) / len(secs):.0f} s, training {summary.images_per_second:.0f} "
        "images/s"
    )
    print(f"Run folder: {summary.run_dir}")
    print(f"Report:     {summary.run_dir / 'report.html'}")


def cmd_train(args: argparse.Namespace) -> int:
    from breastcad import distributed

    try:
        return _train(args)
    except BreastcadError:
        if not distributed.world_from_env().is_main:
            return 2  # rank 0 says it once
        raise
    finally:
        distributed.cleanup()


def _train(args: argparse.Namespace) -> int:
    from breastcad import distributed
    from breastcad.config import load_config
    from breastcad.experiment import run_cross_validation

    main_rank = distributed.world_from_env().is_main
    if args.resume:
        overrides = run_overrides(args)
        if overrides or args.config or args.out:
            raise BreastcadError(
                "--resume RUN continues RUN with its own config; drop other settings"
            )
        run_dir = Path(args.resume)
        cfg = load_config(run_dir / "config.yaml")
        summary = run_cross_validation(
            cfg, run_dir, progress=not args.quiet, resume=True, fold=args.fold
        )
    else:
        cfg = load_config(args.config, run_overrides(args))
        if args.out:
            run_dir = Path(args.out)
        elif args.fold is not None:
            raise BreastcadError("--fold K writes into a run folder shared by the fold jobs: "
                                 "give it with --out RUN")  # fmt: skip
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = Path("runs") / f"{stamp}-{cfg.name or cfg.model.name}"
        summary = run_cross_validation(cfg, run_dir, progress=not args.quiet, fold=args.fold)
    if not main_rank:
        return 0
    if args.fold is not None:
        from breastcad.experiment import missing_folds_in

        missing = missing_folds_in(run_dir)
        print(
            f"fold-{args.fold} done in {sum(summary.fold_seconds):.0f} s; run folder {run_dir}; "
            + (
                f"still missing: {', '.join(missing)}"
                if missing
                else f"all folds done: `breastcad collect {run_dir}` merges them"
            )
        )
        return 0
    print_summary(summary)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from breastcad.errors import printable
    from breastcad.io import atomic_write_csv
    from breastcad.predict import expand_inputs, load_model, predict_images

    if args.backend == "torch" and str(args.model).lower().endswith(".onnx"):
        raise BreastcadError(f"{args.model}: an .onnx file runs with --backend onnx only")
    if not args.sliding_window and (args.stride is not None or args.heatmaps):
        raise BreastcadError("--stride and --heatmaps go with --sliding-window")
    ens = load_model(args.model, args.fold, backend=args.backend or "torch")
    paths = expand_inputs(args.images)
    if args.sliding_window:
        from breastcad.sliding_window import DEFAULT_STRIDE, predict_sliding

        stride = DEFAULT_STRIDE if args.stride is None else args.stride
        rows, bad = predict_sliding(ens, paths, stride, heatmaps=args.heatmaps)
    else:
        rows, bad = predict_images(ens, paths)
    for b in bad:
        print(f"skipped {printable(b.path)}: {b.problem}", file=sys.stderr)
    if not rows:
        raise BreastcadError(f"no readable image among {len(paths)} input(s)")
    model = f"{ens.name} ({ens.source})"
    header = [*rows[0], "threshold", "model", "model_version", "backend"]
    table = [
        [*(f"{v:.6f}" if isinstance(v, float) else v for v in r.values()),
         f"{ens.threshold:.6f}", model, ens.version, ens.backend]
        for r in rows
    ]  # fmt: skip
    if args.out:
        atomic_write_csv(args.out, header, table)
        print(f"{len(rows)} prediction(s) written to {args.out}; {len(bad)} skipped")
    else:
        pos = ens.card["positive_class"]
        print(f"# model {model}, version {ens.version}, threshold {ens.threshold:.3f}")
        for r in rows:
            where = (
                f"\twindow {r['window_x0']},{r['window_y0']}-{r['window_x1']},{r['window_y1']}"
                if "window_x0" in r
                else ""
            )
            print(f"{printable(r['path'])}\tp({pos})={r['prob']:.3f}\t{r['decision']}{where}")
    return 0


COMMANDS = {"audit": cmd_audit, "train": cmd_train, "predict": cmd_predict}

# Further commands live in breastcad.commands.<name>, each with ``add_parser(sub)`` and
# ``run(args) -> int``; they import their heavy dependencies inside ``run`` so that
# ``breastcad --help`` stays fast.
COMMAND_MODULES: tuple[str, ...] = (
    "export", "serve", "explain", "import_data", "compare", "models", "tune",
    "evaluate", "collect", "robustness", "segment", "patches",
)  # fmt: skip


def _command_module(name: str) -> Any:
    return importlib.import_module(f"breastcad.commands.{name}")


def main(argv: Sequence[str] | None = None) -> int:
    # Non-UTF-8 file names arrive as surrogate escapes: print them, never crash on them.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        if args.command in COMMANDS:
            return COMMANDS[args.command](args)
        # a module may name itself when its command differs (import -> import_data)
        return int(_command_module(getattr(args, "command_module", args.command)).run(args))
    except BreastcadError as err:
        print(f"error: {err}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
