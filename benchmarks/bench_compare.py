"""The study's five models compared on the same grouped folds of BUSI, recorded in results/.

    python benchmarks/bench_compare.py --data ../shared/data/busi           # CPU protocol below
    python benchmarks/bench_compare.py --data ../shared/data/busi --name busi-quick \
        --protocol cpu-quick                                                # CPU without bf16
    python benchmarks/bench_compare.py --data ../shared/data/busi --protocol full   # a GPU

Runs ``breastcad compare`` as a user would (continuing the comparison folder if
it exists) and writes ``benchmarks/results/compare-<name>.json`` with the
table rows and the command. On a 2-core CPU a full schedule of vgg16, resnet50
and densenet201 at 224 px takes hours, so the CPU protocol trains basic_cnn
and alexnet at the full protocol and the three heavy models at 112 px with a
shortened schedule; every row states its input size and epochs. On a 2-core CPU
without bf16 (3-4x slower still) the ``cpu-quick`` protocol keeps basic_cnn at the
full protocol and trains the four torchvision models at 112 px (alexnet) or 64 px
for 3-6 epochs: a table of what such a machine affords in about an hour, not an
estimate of what those architectures can do.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUDY = ("basic_cnn", "alexnet", "vgg16", "resnet50", "densenet201")
# label=model,settings: the shortened schedules used on the 2-core CPU
CPU_PROTOCOL = (
    "basic_cnn",
    "alexnet",
    "resnet50-112px-8ep=resnet50,data.image_size=112,train.epochs=8",
    "densenet201-112px-8ep=densenet201,data.image_size=112,train.epochs=8",
    "vgg16-112px-6ep=vgg16,data.image_size=112,train.epochs=6",
)
CPU_QUICK_PROTOCOL = (
    "basic_cnn",
    "alexnet-112px-6ep=alexnet,data.image_size=112,train.epochs=6",
    "resnet50-64px-4ep=resnet50,data.image_size=64,train.epochs=4",
    "densenet201-64px-3ep=densenet201,data.image_size=64,train.epochs=3",
    "vgg16-64px-4ep=vgg16,data.image_size=64,train.epochs=4",
)
# cpu-quick with alexnet at its full protocol (224 px, up to 30 epochs, about an hour on a
# 2-core CPU without bf16), usually with --reuse busi-quick (alexnet and vgg16 train again:
# their learning rate is now their own 1e-4)
CPU_NOBF16_PROTOCOL = ("basic_cnn", "alexnet", *CPU_QUICK_PROTOCOL[2:])
PROTOCOLS = {
    "cpu": CPU_PROTOCOL,
    "cpu-quick": CPU_QUICK_PROTOCOL,
    "cpu-nobf16": CPU_NOBF16_PROTOCOL,
}


def reuse_finished(src: Path, out: Path, protocol: str) -> list[str]:
    """Start ``out`` from comparison ``src``'s base settings (so the same folds) with
    ``protocol``'s variants; a finished model of ``src`` is copied when its effective
    settings (model defaults filled in) are exactly what ``out`` would train, the rest
    train on ``compare --resume``."""
    from breastcad.compare import parse_variant, variant_config
    from breastcad.config import load_config, with_model_defaults

    plan = json.loads((src / "compare.json").read_text())
    if plan["base"]["train"].get("lr") == 0.003:  # the old global default, not a choice
        plan["base"]["train"]["lr"] = None  # today's: each model's own learning rate
    out.mkdir(parents=True, exist_ok=True)  # compare.json absent: nothing started there
    variants = []
    for text in PROTOCOLS[protocol]:
        v = parse_variant(text)
        variants.append({"label": v.label, "overrides": v.overrides})
        sub = src / v.label
        if not ((sub / "metrics.json").exists() and (sub / "report.html").exists()):
            continue
        wanted = with_model_defaults(variant_config(plan["base"], v)).to_dict()
        if load_config(sub / "config.yaml").to_dict() == wanted:
            shutil.copytree(sub, out / v.label)
            print(f"reused {sub} (same effective settings)")
    plan["variants"] = variants
    (out / "compare.json").write_text(json.dumps(plan, indent=2) + "\n")
    return ["compare", "--resume", str(out), "--quiet"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--name", default="busi")
    ap.add_argument(
        "--protocol",
        choices=(*PROTOCOLS, "full"),
        default="cpu",
        help="cpu (default), cpu-quick or cpu-nobf16 (CPUs without bf16) or full (every "
        "model at its full protocol, for a GPU)",
    )
    ap.add_argument(
        "--reuse",
        metavar="NAME",
        help="copy the finished models of runs/bench-compare-NAME whose settings are identical "
        "(same base, same variant) instead of training them again",
    )
    ap.add_argument("extra", nargs="*", help="more arguments for breastcad compare (after --)")
    args = ap.parse_args()
    if args.reuse and args.protocol == "full":
        ap.error("--reuse works with the cpu protocols")
    out = Path("runs") / f"bench-compare-{args.name}"
    if (out / "compare.json").exists():
        cmd = ["compare", "--resume", str(out), "--quiet"]
    else:
        cmd = ["compare", "--data", args.data, "--out", str(out), "--quiet", *args.extra]
        if args.protocol == "full":
            cmd += ["--models", ",".join(STUDY)]
        else:
            cmd += [a for v in PROTOCOLS[args.protocol] for a in ("--variant", v)]
        if args.reuse:
            cmd = reuse_finished(Path("runs") / f"bench-compare-{args.reuse}", out, args.protocol)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "breastcad", *cmd], text=True)
    if proc.returncode != 0:
        return proc.returncode
    doc = json.loads((out / "comparison.json").read_text())
    env = json.loads((out / doc["best"] / "env.json").read_text())
    plan = json.loads((out / "compare.json").read_text())
    record = {
        "name": f"compare-{args.name}",
        "date": time.strftime("%Y-%m-%d"),
        "command": "breastcad compare --data DATA "
        + " ".join(
            f"--variant {v['label']}={dict(v['overrides'])['model.name']}"
            + "".join(f",{k}={val}" for k, val in v["overrides"][1:])
            for v in plan["variants"]
        ),  # fmt: skip
        "protocol": args.protocol,
        # finished models copied from that comparison (same base settings and variant)
        "reused_from": f"compare-{args.reuse}" if args.reuse else None,
        "wall_seconds_this_call": round(time.perf_counter() - t0, 1),
        "environment": env,
        "comparison": doc,
    }
    path = HERE / "results" / f"compare-{args.name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"recorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
