"""``breastcad serve`` over real HTTP: a uvicorn server started as a user would start it.

One tiny run is trained once for the module; two servers are started on free loopback
ports (``--port 0``): an open one with default settings, and one with a token, CORS
for one origin and small upload and pixel limits.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from synthetic import write_busi_like

TOKEN = "test-token-1f3a"
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-4417-SECRET"


def train_tiny_run(tmp: Path) -> tuple[Path, Path]:
    data = write_busi_like(tmp / "data", n_per_class=10, size=40)
    run = tmp / "run"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "breastcad", "train", "--data", str(data), "--out", str(run),
         "--quiet", "--folds", "2", "--epochs", "1", "--image-size", "32",
         "--set", "eval.n_bootstrap=50", "--set", "cv.val_fraction=0.34",
         "--set", "train.batch_size=8"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, run


class Server:
    """``python -m breastcad serve ... --port 0`` in a subprocess, its log in a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "breastcad", "serve", *args, "--port", "0"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = self.text()
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}):\n{text}")
            for word in text.split():
                if word.startswith("http://") and word.endswith("/") and "docs" not in word:
                    url = word.rstrip("/")
                    try:
                        if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                            return url
                    except httpx.HTTPError:
                        pass
            time.sleep(0.2)
        raise AssertionError(f"server did not start:\n{self.text()}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_tiny_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def spool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The open server's TMPDIR: it must stay empty (uploads never touch the disk)."""
    return tmp_path_factory.mktemp("spool")


@pytest.fixture(scope="module")
def server(tiny: tuple[Path, Path], spool: Path, tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("log") / "open.log"
    cache = str(spool.parent / "inductor")  # torch's own cache, kept out of the watched folder
    srv = Server([str(tiny[1])], log, env={"TMPDIR": str(spool), "TORCHINDUCTOR_CACHE_DIR": cache})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def guarded(tiny: tuple[Path, Path], tmp_path_factory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("log") / "guarded.log"
    args = [str(tiny[1]), "--fold", "1", "--max-upload-mb", "0.05", "--max-pixels", "10000",
            "--cors-origin", "https://viewer.example"]  # fmt: skip
    srv = Server(args, log, env={"BREASTCAD_TOKEN": TOKEN})
    yield srv
    srv.stop()


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def post(url: str, data: bytes, ctype: str = "image/png", name: str = "x.png", **kw):
    return httpx.post(
        url + "/api/v1/predict", files={"file": (name, data, ctype)}, timeout=60, **kw
    )


def assert_error(r: httpx.Response, status: int, code: str, *fragments: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["status"] == status and err["code"] == code, err
    for f in fragments:
        assert f in err["message"], err["message"]


def reference(run: Path, image_path: Path, fold: int | None = None) -> dict:
    """What ``breastcad predict`` says for the image (in-process, same code path)."""
    from breastcad.predict import load_ensemble, predict_images

    ens = load_ensemble(run, fold)
    rows, bad = predict_images(ens, [str(image_path)])
    assert not bad
    return {**rows[0], "threshold": ens.threshold, "version": ens.version}


def test_healthz_model_card_and_docs(server: Server, tiny: tuple[Path, Path]) -> None:
    _, run = tiny
    h = httpx.get(server.url + "/healthz").json()
    assert h["status"] == "ok" and h["model"] == "basic_cnn x2" and len(h["version"]) == 12
    card = httpx.get(server.url + "/api/v1/model").json()
    metrics = json.loads((run / "metrics.json").read_text())
    auc = card["cross_validated_metrics"]["pooled"]["roc_auc"]
    assert auc == metrics["pooled"]["roc_auc"] and auc["low"] <= auc["value"] <= auc["high"]
    assert card["operating_point"]["threshold"] == metrics["operating_point"]["threshold"]
    assert card["architecture"]["name"] == "basic_cnn" and card["architecture"]["members"] == 2
    assert card["training_data"]["per_class"]["benign"] == 10
    assert "not a medical device" in card["intended_use"].lower()
    assert any("one hospital" in lim or "dataset" in lim for lim in card["limits"])
    assert card["version"] == h["version"]
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/api/v1/predict" in spec["paths"] and "/api/v1/model" in spec["paths"]
    assert (
        "multipart/form-data" in spec["paths"]["/api/v1/predict"]["post"]["requestBody"]["content"]
    )
    assert httpx.get(server.url + "/docs").status_code == 200


def test_predict_matches_the_cli_and_returns_a_heatmap(
    server: Server, tiny: tuple[Path, Path]
) -> None:
    data, run = tiny
    image = data / "malignant" / "malignant (3).png"
    ref = reference(run, image)
    r = post(server.url, image.read_bytes())
    assert r.status_code == 200, r.text
    body = r.json()
    assert abs(body["probability"] - ref["prob"]) < 1e-4
    assert body["decision"] == ref["decision"]
    assert body["decision"] == (
        "malignant" if body["probability"] >= ref["threshold"] else "benign"
    )
    assert body["operating_point"]["threshold"] == ref["threshold"]
    assert body["model"]["version"] == ref["version"] and body["model"]["members"] == 2
    assert "calibrated" in body["probability_meaning"]
    assert "not a diagnosis" in body["disclaimer"]
    assert "heatmap" not in body
    assert r.headers["cache-control"] == "no-store"

    hm = post(server.url, image.read_bytes(), params={"heatmap": "true"}).json()
    assert abs(hm["probability"] - body["probability"]) < 1e-6
    overlay = Image.open(io.BytesIO(base64.b64decode(hm["heatmap"]["overlay_png_base64"])))
    shown = Image.open(io.BytesIO(base64.b64decode(hm["heatmap"]["image_png_base64"])))
    assert overlay.mode == "RGB" and overlay.size == shown.size == (40, 40)
    assert np.asarray(overlay).std(axis=2).max() > 0  # coloured, not the grey image
    assert hm["heatmap"]["target_class"] == "malignant"

    # the raw body with its image type works too, and so does a JPEG
    raw = httpx.post(
        server.url + "/api/v1/predict",
        content=image.read_bytes(),
        headers={"Content-Type": "image/png"},
    )
    assert raw.status_code == 200 and abs(raw.json()["probability"] - ref["prob"]) < 1e-4
    jpeg = png(np.asarray(Image.open(image)), "JPEG")
    assert post(server.url, jpeg, "image/jpeg", "x.jpg").status_code == 200


def test_dicom_upload_never_reveals_patient_fields(
    server: Server, write_dicom, tmp_path: Path
) -> None:
    pixels = (np.arange(48 * 48).reshape(48, 48) % 4096).astype(np.uint16)
    path = write_dicom(
        "case.dcm", pixels, PatientName=PATIENT_NAME, PatientID=PATIENT_ID,
        PatientBirthDate="19700101", InstitutionName="Secret Hospital",
    )  # fmt: skip
    data = path.read_bytes()
    assert PATIENT_ID.encode() in data
    for ctype in ("application/dicom", "application/octet-stream"):
        r = post(server.url, data, ctype, "Doe_Jane.dcm", params={"heatmap": "true"})
        assert r.status_code == 200, r.text
        assert r.json()["image"] == {"width": 48, "height": 48}
        for secret in (PATIENT_NAME, PATIENT_ID, "19700101", "Secret Hospital", "Doe_Jane"):
            assert secret not in r.text
    # a broken DICOM gets a clear 422 that does not quote its header either
    broken = data[: len(data) - 1000]
    r = post(server.url, broken, "application/dicom", "case.dcm")
    assert_error(r, 422, "unreadable_image")
    assert PATIENT_ID not in r.text and PATIENT_NAME not in r.text
    time.sleep(0.5)
    log = server.text()
    for secret in (PATIENT_NAME, PATIENT_ID, "Secret Hospital", "Doe_Jane"):
        assert secret not in log


def test_bad_uploads_get_clear_4xx_json_and_the_server_survives(
    server: Server, tiny: tuple[Path, Path]
) -> None:
    data, _ = tiny
    good = (data / "benign" / "benign (2).png").read_bytes()
    url = server.url
    assert_error(post(url, b"hello, world", "text/plain", "x.txt"), 415, "unsupported_media_type")
    assert_error(post(url, b"%PDF-1.4 ...", "application/pdf", "x.pdf"), 415,
                 "unsupported_media_type")  # fmt: skip
    gif = png(np.zeros((8, 8), np.uint8), "GIF")
    assert_error(post(url, gif, "application/octet-stream", "x.gif"), 415,
                 "unsupported_media_type", "image/gif")  # fmt: skip
    assert_error(post(url, b"not an image at all", "image/png"), 422, "not_an_image")
    lab = io.BytesIO()
    Image.new("LAB", (20, 20)).save(lab, format="TIFF")  # a mode PIL cannot make grey
    assert_error(post(url, lab.getvalue(), "image/tiff", "x.tif"), 422, "unreadable_image")
    assert_error(post(url, good[: len(good) // 2]), 422, "unreadable_image", "corrupt")
    assert_error(post(url, b""), 400, "empty_upload")
    r = httpx.post(url + "/api/v1/predict", data={"note": "no file here"}, files={"x": ("", b"")})
    assert r.status_code == 400, r.text
    r = httpx.post(
        url + "/api/v1/predict",
        content=b"--zzz\r\nContent-Disposition: form-data; name=file\r\n\r\nabc",
        headers={"Content-Type": "multipart/form-data; boundary=zzz"},
    )
    assert r.status_code in (400, 422), r.text
    r = httpx.post(
        url + "/api/v1/predict", content=b"", headers={"Content-Type": "multipart/form-data"}
    )
    assert_error(r, 400, "bad_multipart")
    assert_error(post(url, good, params={"heatmap": "maybe"}), 422, "invalid_request", "heatmap")
    assert_error(httpx.get(url + "/api/v1/nothing"), 404, "not_found")
    assert_error(httpx.get(url + "/api/v1/predict"), 405, "method_not_allowed")
    # still serving, and nothing went wrong inside
    assert post(url, good).status_code == 200
    assert "Traceback" not in server.text() and " 500 " not in server.text()


def test_uploads_stay_in_memory_and_concurrent_requests_all_succeed(
    server: Server, spool: Path, tiny: tuple[Path, Path]
) -> None:
    data, _ = tiny
    # a 2.5 MB PNG: Starlette's own form parser would spool this to a temporary file
    rng = np.random.default_rng(1)
    big = png(rng.integers(0, 256, (1200, 1400), dtype=np.uint8))
    assert len(big) > 1_500_000
    before = sorted(spool.rglob("*"))
    r = post(server.url, big)
    assert r.status_code == 200 and r.json()["image"] == {"width": 1400, "height": 1200}
    assert sorted(spool.rglob("*")) == before
    images = [p.read_bytes() for p in sorted((data / "benign").glob("benign (?).png"))]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda b: post(server.url, b).status_code, images * 3))
    assert codes == [200] * len(codes)


def test_server_binds_loopback_by_default(server: Server) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    assert server.url.startswith("http://127.0.0.1:")
    listening = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            listening.append(local.split(":")[0])
    assert listening == ["0100007F"]  # 127.0.0.1, not 0.0.0.0
    # CORS is off unless configured: no Access-Control headers for another origin
    r = httpx.get(server.url + "/api/v1/model", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_token_cors_and_limits(guarded: Server, tiny: tuple[Path, Path]) -> None:
    data, run = tiny
    url = guarded.url
    image = data / "benign" / "benign (3).png"
    assert httpx.get(url + "/healthz").status_code == 200  # liveness stays open
    assert httpx.get(url + "/").status_code == 200  # the page asks for the token itself
    r = httpx.get(url + "/api/v1/model")
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(post(url, image.read_bytes()), 401, "unauthorized")
    bad = {"Authorization": "Bearer wrong"}
    assert_error(httpx.get(url + "/api/v1/model", headers=bad), 401, "unauthorized")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    card = httpx.get(url + "/api/v1/model", headers=auth).json()
    assert card["architecture"]["members"] == 1 and card["architecture"]["member_folders"] == [
        "fold-1"
    ]
    r = post(url, image.read_bytes(), headers=auth)
    assert r.status_code == 200
    assert abs(r.json()["probability"] - reference(run, image, fold=1)["prob"]) < 1e-4
    # CORS for the configured origin only
    ok = httpx.get(url + "/healthz", headers={"Origin": "https://viewer.example"})
    assert ok.headers.get("access-control-allow-origin") == "https://viewer.example"
    other = httpx.get(url + "/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    # upload limit (0.05 MB) -> 413, pixel limit (10000) -> 413
    noisy = png(np.random.default_rng(2).integers(0, 256, (300, 300), dtype=np.uint8))
    assert len(noisy) > 0.05 * 1024 * 1024
    assert_error(post(url, noisy, headers=auth), 413, "upload_too_large")
    wide = png(np.zeros((101, 100), np.uint8))
    assert_error(post(url, wide, headers=auth), 413, "too_many_pixels", "10100")
    assert post(url, image.read_bytes(), headers=auth).status_code == 200
    assert TOKEN not in guarded.text()


def test_serve_refuses_bad_settings_in_one_line(tiny: tuple[Path, Path]) -> None:
    _, run = tiny
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "breastcad", "serve", str(run), "--port", str(port)],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: cannot listen on 127.0.0.1:")


def test_serve_without_a_model_uses_the_newest_finished_run(tmp_path: Path) -> None:
    from breastcad.commands.serve import newest_run

    proc = subprocess.run(
        [sys.executable, "-m", "breastcad", "serve"], capture_output=True, text=True,
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: no finished run under runs/")
    for i, name in enumerate(("20260101-000000-basic_cnn", "b-newer", "c-unfinished")):
        (tmp_path / "runs" / name / "fold-0").mkdir(parents=True)
        if name != "c-unfinished":
            (tmp_path / "runs" / name / "fold-0" / "DONE").write_text("")
        (tmp_path / "runs" / name / "metrics.json").write_text("{}")
        os.utime(tmp_path / "runs" / name / "metrics.json", (1000 + i, 1000 + i))
    assert newest_run(tmp_path / "runs") == tmp_path / "runs" / "b-newer"
