"""Web-service latency and throughput: ``breastcad serve`` measured from a second process.

    .venv/bin/python benchmarks/bench_serve.py --run runs/bench-demo
    .venv/bin/python benchmarks/bench_serve.py --run RUN --configs fold0-torch --n-single 100

For each configuration (one fold vs the whole fold ensemble; PyTorch vs an ONNX
export run by onnxruntime) a server is started as a user starts it
(``python -m breastcad serve RUN [--fold 0] [--backend onnx] --port 0
--no-access-log``) on loopback, and this process (the client) sends real BUSI
images from the bundled copy (multipart uploads, keep-alive connections):

* single-request latency: ``--n-single`` requests one after another (after
  ``--warmup`` untimed ones), wall time per request seen by the client:
  p50, p90, p99, mean;
* heatmap latency: ``--n-heatmap`` sequential requests with ``heatmap=true``
  (torch backends only; Grad-CAM needs gradients);
* throughput under bounded concurrent load: ``--clients`` threads, each with
  its own connection, share ``--n-load`` requests; requests/s over the wall
  time, the latency percentiles under load and the number of failed requests
  (anything but HTTP 200, or a connection error).

The server gets ``--threads`` CPU threads (default: all cores). The machine's
load average is recorded at the start and end: other work on a shared
machine raises every latency here. ``--json PATH`` writes every number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import common
import httpx

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "src" / "breastcad" / "data" / "bundled" / "busi"
CONFIGS = {
    "fold0-torch": ["--fold", "0"],
    "ensemble-torch": [],
    "fold0-onnx": ["--fold", "0", "--backend", "onnx"],
    "ensemble-onnx": ["--backend", "onnx"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a trained run folder (e.g. runs/bench-demo)")
    p.add_argument("--images", default=str(BUNDLED), help="folder of images to send")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    p.add_argument("--n-single", type=int, default=200)
    p.add_argument("--n-heatmap", type=int, default=20)
    p.add_argument("--n-load", type=int, default=400)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, help="server CPU threads (default: all cores)")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1000 * s for s in seconds)

    def q(p: float) -> float:
        return ms[min(len(ms) - 1, max(0, round(p * (len(ms) - 1))))]

    return {
        "n": len(ms),
        "p50_ms": round(q(0.50), 2),
        "p90_ms": round(q(0.90), 2),
        "p99_ms": round(q(0.99), 2),
        "mean_ms": round(statistics.fmean(ms), 2),
        "max_ms": round(ms[-1], 2),
    }


@contextmanager
def server(run: str, extra: list[str], threads: int | None, log: Path) -> Iterator[str]:
    args = [sys.executable, "-m", "breastcad", "serve", run, *extra, "--port", "0"]
    args += ["--no-access-log"] + (["--threads", str(threads)] if threads else [])
    with open(log, "wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{log.read_text()}")
            for word in log.read_text().split():
                if word.startswith("http://127.0.0.1:") and word.endswith("/"):
                    try:
                        if httpx.get(word + "healthz", timeout=5).status_code == 200:
                            yield word.rstrip("/")
                            return
                    except httpx.HTTPError:
                        pass
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def send(client: httpx.Client, url: str, image: tuple[str, bytes], heatmap: bool = False):
    name, data = image
    ctype = "image/png" if name.endswith(".png") else "image/jpeg"
    return client.post(
        url + "/api/v1/predict",
        files={"file": (name, data, ctype)},
        params={"heatmap": "true"} if heatmap else None,
        timeout=120,
    )


def sequential(url: str, images: list, n: int, warmup: int, heatmap: bool = False) -> dict:
    times, failed = [], 0
    with httpx.Client() as client:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            try:
                ok = send(client, url, images[i % len(images)], heatmap).status_code == 200
            except httpx.HTTPError:
                ok = False
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                failed += not ok
    return {**percentiles(times), "failed": failed}


def concurrent(url: str, images: list, n: int, clients: int) -> dict:
    counter = iter(range(n))
    lock = threading.Lock()
    times: list[float] = []
    failures: list[str] = []

    def worker() -> None:
        with httpx.Client() as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    r = send(client, url, images[i % len(images)])
                    if r.status_code != 200:
                        failures.append(f"HTTP {r.status_code}")
                except httpx.HTTPError as err:
                    failures.append(type(err).__name__)
                with lock:
                    times.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": n,
        "failed": len(failures),
        "failures": sorted(set(failures)),
        "seconds": round(wall, 3),
        "requests_per_second": round(n / wall, 2),
        "latency_under_load": percentiles(times),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = common.machine_info()
    paths = sorted(
        p
        for p in Path(args.images).rglob("*")
        if p.suffix.lower() in (".png", ".jpg", ".jpeg") and "_mask" not in p.stem
    )
    if not paths:
        raise SystemExit(f"no images under {args.images}")
    images = [(p.name, p.read_bytes()) for p in paths]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_{os.getpid()}.log"
    results: dict[str, Any] = {}
    for name in args.configs.split(","):
        extra = CONFIGS[name]
        t0 = time.perf_counter()
        with server(args.run, extra, args.threads, log) as url:
            startup = time.perf_counter() - t0
            model = httpx.get(url + "/healthz").json()
            row: dict[str, Any] = {"server_args": extra, "model": model, "startup_s": startup}
            row["single"] = sequential(url, images, args.n_single, args.warmup)
            if name.endswith("torch") and args.n_heatmap:
                row["single_heatmap"] = sequential(url, images, args.n_heatmap, 2, heatmap=True)
            row["load"] = concurrent(url, images, args.n_load, args.clients)
        results[name] = row
        s, ld = row["single"], row["load"]
        print(
            f"{name:15s} single p50 {s['p50_ms']:7.1f} ms  p99 {s['p99_ms']:7.1f} ms | "
            f"{args.clients} clients {ld['requests_per_second']:6.1f} req/s, "
            f"p50 {ld['latency_under_load']['p50_ms']:7.1f} ms, failed {ld['failed']}"
            + (
                f" | heatmap p50 {row['single_heatmap']['p50_ms']:.0f} ms"
                if "single_heatmap" in row
                else ""
            ),
            flush=True,
        )
    machine["load_average_at_end"] = common.load_average()
    doc = {
        "schema_version": 1,
        "benchmark": "serve",
        "date": machine["date"],
        "settings": {
            "run": args.run,
            "images": args.images,
            "n_images": len(images),
            "n_single": args.n_single,
            "n_heatmap": args.n_heatmap,
            "n_load": args.n_load,
            "clients": args.clients,
            "warmup": args.warmup,
            "server_threads": args.threads or machine["cores"],
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        },
        "machine": machine,
        "results": results,
    }
    if args.json:
        common.write_json(args.json, doc)
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
