"""``breastcad export``: a run (or one fold) as one ONNX or TorchScript graph, parity-checked."""

from __future__ import annotations

import argparse
from typing import Any

EXAMPLES = """examples:
  breastcad export runs/demo --format onnx --out demo.onnx          # the fold ensemble
  breastcad export runs/demo --fold 2 --format onnx --out fold2.onnx
  breastcad export runs/demo --format torchscript --out demo.pt
  breastcad predict demo.onnx ~/scans/                              # runs with onnxruntime
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained run as ONNX or TorchScript (checked against PyTorch)",
        description="Export the run's deployable model (the ensemble of its fold models, "
        "temperature-scaled probabilities averaged, preprocessing inside the graph) or one "
        "fold with --fold K. The file is run on sample inputs and must match PyTorch to "
        "1e-4 in probability before it is written. A sidecar JSON (OUT.json) holds the "
        "threshold, the cards and the run's metrics.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="RUN_OR_CHECKPOINT", help="run folder or fold folder")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", required=True, help="file to write (its sidecar is OUT.json)")
    p.add_argument("--fold", type=int, help="export only fold K of the run")
    p.add_argument("--force", action="store_true", help="replace OUT and OUT.json if present")


def run(args: argparse.Namespace) -> int:
    from breastcad.errors import printable
    from breastcad.export import export_model
    from breastcad.predict import load_ensemble

    ens = load_ensemble(args.model, args.fold)
    out, side, meta = export_model(ens, args.format, args.out, force=args.force)
    parity = meta["parity"]
    print(
        f"exported {meta['model_name']} (version {meta['model_version']}) as {args.format} "
        f"to {printable(str(out))}"
    )
    print(
        f"  parity with PyTorch: max |diff| {parity['max_abs_diff']:.2e} in probability "
        f"(tolerance {parity['tolerance']:.0e}, {parity['runtime']})"
    )
    print(f"  sidecar: {printable(str(side))} (threshold {meta['threshold']:.6f})")
    return 0
