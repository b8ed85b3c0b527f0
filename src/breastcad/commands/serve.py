"""``breastcad serve``: the model as a web service (FastAPI + uvicorn) with a page."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  breastcad serve                                  # the newest run under ./runs (make demo's)
  breastcad serve runs/demo                        # http://127.0.0.1:8000/ (page), /docs (API)
  breastcad serve runs/demo --fold 0 --port 8080   # one fold model
  breastcad serve demo.onnx                        # an exported model, run by onnxruntime
  BREASTCAD_TOKEN=s3cret breastcad serve runs/demo --host 0.0.0.0   # others may reach it
  curl -F file=@case17.png 'http://127.0.0.1:8000/api/v1/predict?heatmap=true'
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a trained model over HTTP: JSON API and a page to drop images on",
        description="Serve a run (its fold ensemble at the run's threshold), one fold "
        "(--fold K) or an exported .onnx file. POST /api/v1/predict, GET /api/v1/model, "
        "GET /healthz, GET / (the page), /docs. Uploads are processed in memory and never "
        "stored or logged. Binds to loopback unless --host says otherwise. "
        "Research tool, not a diagnosis.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        metavar="RUN_OR_CHECKPOINT",
        nargs="?",
        help="run folder, fold folder or exported .onnx (default: the newest finished run "
        "under ./runs, e.g. the one `make demo` wrote)",
    )
    p.add_argument("--fold", type=int, help="serve only fold K of the run")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--token",
        help="bearer token required by /api/ (default: $BREASTCAD_TOKEN; none if unset); "
        "prefer the environment variable, a command line is visible to other users",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow cross-origin requests from ORIGIN (repeatable; CORS is off by default)",
    )
    p.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest upload (default 20 MB)"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="largest image in pixels (default 40,000,000, a full-field mammogram)",
    )
    p.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default=None,
        help="torch (default for runs; needed for heatmaps) or onnx (default for .onnx files)",
    )
    p.add_argument("--threads", type=int, help="CPU threads for inference (default: all cores)")
    p.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log one line per request (method, path, status; never the upload)",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from breastcad.data.imageio import DEFAULT_MAX_PIXELS
    from breastcad.errors import BreastcadError

    if not 0 <= args.port <= 65535:
        raise BreastcadError(f"--port {args.port}: not a port number (0-65535)")
    if args.max_upload_mb <= 0:
        raise BreastcadError("--max-upload-mb must be positive")
    if args.max_pixels is not None and args.max_pixels <= 0:
        raise BreastcadError("--max-pixels must be positive")
    if args.backend == "torch" and str(args.model).lower().endswith(".onnx"):
        raise BreastcadError(f"{args.model}: an .onnx file runs with --backend onnx only")
    if args.model is None:
        args.model = str(newest_run(Path("runs")))
        print(f"serving the newest finished run: {args.model}", flush=True)
    token = args.token if args.token is not None else os.environ.get("BREASTCAD_TOKEN")
    token = token or None
    # bind first: a busy port is reported at once, before the model is loaded
    sock = _bind(args.host, args.port)

    import torch
    import uvicorn

    from breastcad.predict import load_model
    from breastcad.serve.app import ServeSettings, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, args.fold, backend=args.backend or "torch", threads=args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)  # load_model's runtime settings use all cores
    settings = ServeSettings(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        token=token,
        cors_origins=list(args.cors_origin),
    )
    app = create_app(model, settings)
    # warm up once, so the first request is not the slow one
    import numpy as np

    size = int(model.card["input_size"])
    model.probabilities(np.zeros((1, size, size), np.uint8))
    if not _is_loopback(args.host) and not token:
        print(
            f"warning: binding {args.host} without a token: anyone who can reach this "
            "machine can use the API (set BREASTCAD_TOKEN)",
            file=sys.stderr,
        )
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"breastcad serve: {model.name} version {model.version} ({model.backend}) from "
        f"{model.source}\n  page http://{shown}:{port}/  API docs "
        f"http://{shown}:{port}/docs" + ("  (API needs the bearer token)" if token else ""),
        flush=True,
    )
    config = uvicorn.Config(
        app,
        log_level="info",
        access_log=args.access_log,
        limit_concurrency=128,
        timeout_keep_alive=5,
        server_header=False,
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0 if server.started else 2


def _bind(host: str, port: int) -> socket.socket:
    """Bind here (not in uvicorn) for a one-line error, and so --port 0 can show its port."""
    from breastcad.errors import BreastcadError

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise BreastcadError(f"cannot use --host {host} ({err.strerror or err})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise BreastcadError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    sock.set_inheritable(True)
    return sock


def newest_run(root: Path) -> Path:
    """The finished run (metrics.json written) under ``root`` that finished last."""
    from breastcad.errors import BreastcadError

    runs = [m.parent for m in root.glob("*/metrics.json") if any(m.parent.glob("**/DONE"))]
    if not runs:
        raise BreastcadError(
            f"no finished run under {root}/ (run `make demo` or `breastcad train` first, "
            "or name a run folder)"
        )
    return max(runs, key=lambda r: (r / "metrics.json").stat().st_mtime)
