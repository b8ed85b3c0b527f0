"""report.html of a comparison: the table, overlaid ROC curves, each model's plots."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from breastcad import plots
from breastcad.io import atomic_write_text


def _inline(path: Path) -> str | None:
    if not path.exists():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_compare_report(
    out: Path, doc: dict[str, Any], oof: dict[str, tuple[np.ndarray, np.ndarray, Any, Any]]
) -> Path:
    roc = plots.plot_roc_overlay(
        {label: (y, p) for label, (y, p, _, _) in oof.items()}, out / "plots" / "roc_overlay.png"
    )
    models = [
        {
            "row": row,
            "confusion": _inline(out / row["model"] / "plots" / "confusion.png"),
            "curves": _inline(out / row["model"] / "plots" / "training_curves.png"),
            "report": f"{row['model']}/report.html",
        }
        for row in doc["rows"]
    ]
    env = Environment(
        loader=PackageLoader("breastcad", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
    )
    text = env.get_template("compare.html.j2").render(
        name=out.name, doc=doc, models=models, roc=_inline(roc)
    )
    return atomic_write_text(out / "report.html", text)
