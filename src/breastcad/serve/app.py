"""The web service: a FastAPI app around one loaded model (a run, a fold or an ONNX export).

Routes:
    GET  /                 the page (drop an image, see it, its heatmap, probability, decision)
    POST /api/v1/predict   an image (multipart field ``file``, or the raw bytes) -> JSON
    GET  /api/v1/model     the model card
    GET  /healthz          liveness: status, model name and version
    GET  /docs, /openapi.json

Every failure is JSON ``{"error": {"status", "code", "message"}}``; a bad
request is a 4xx, never a 500. Uploads live in memory only and are never
stored or logged; the API can be guarded by a bearer token; CORS is off
unless origins are given.
"""

from __future__ import annotations

import base64
import hmac
import io
import logging
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from breastcad import __version__
from breastcad.data.cache import prepare_for_model
from breastcad.data.imageio import DEFAULT_MAX_PIXELS
from breastcad.predict import CALIBRATED_MEANING, decide, model_card
from breastcad.serve.uploads import (
    GENERIC_TYPES,
    Upload,
    UploadError,
    base_type,
    decode,
    parse_multipart,
)

log = logging.getLogger("breastcad.serve")

DISCLAIMER = (
    "Research tool, not a diagnosis. breastcad is not a medical device: its output must not "
    "be used for diagnosis, screening or any clinical decision."
)
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
DISPLAY_MAX_SIDE = 512


@dataclass
class ServeSettings:
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    token: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_decodes: int = 4  # images decoded at once (bounds memory under load)


def _png_base64(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=3)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _display_image(img: np.ndarray) -> np.ndarray:
    """The decoded image as uint8, longest side at most DISPLAY_MAX_SIDE (aspect kept)."""
    from PIL import Image

    h, w = img.shape
    scale = min(1.0, DISPLAY_MAX_SIDE / max(h, w))
    pil = Image.fromarray(img.astype(np.float32, copy=False), mode="F")
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        pil = pil.resize(size, Image.Resampling.BILINEAR)
    return np.clip(np.rint(np.asarray(pil) * 255.0), 0, 255).astype(np.uint8)


class Service:
    """The loaded model and what a request needs from it (thread-safe)."""

    def __init__(self, model: Any, settings: ServeSettings) -> None:
        self.model = model
        self.settings = settings
        self.card = model_card(model)
        self._model_lock = threading.Lock()  # Grad-CAM hooks must not see other requests
        self._decodes = threading.BoundedSemaphore(settings.max_decodes)
        classes = model.card["class_names"]
        self.positive = model.card["positive_class"]
        self.pos_index = classes.index(self.positive)

    def summary(self) -> dict[str, Any]:
        c = self.card
        pooled = c["cross_validated_metrics"].get("pooled", {})
        return {
            "name": c["name"],
            "version": c["version"],
            "architecture": c["architecture"]["name"],
            "members": c["architecture"]["members"],
            "task": c["task"],
            "classes": c["classes"],
            "positive_class": c["positive_class"],
            "backend": c["backend"],
            "cross_validated_roc_auc": pooled.get("roc_auc"),
            "intended_use": c["intended_use"],
        }

    def predict(self, upload: Upload, heatmap: bool) -> dict[str, Any]:
        t0 = time.perf_counter()
        with self._decodes:
            img = decode(upload, self.settings.max_pixels)
            cropper = getattr(self.model, "cropper", None)
            if cropper is not None:  # lesion-crop model: the heatmap is drawn on the crop
                x, found = cropper(img)
                display = x if heatmap else None
            else:
                x, found = prepare_for_model(img, self.model.card), None
                display = _display_image(img) if heatmap else None
        h, w = img.shape
        del img
        with self._model_lock:
            probs = self.model.probabilities(x[None])
            heat = self._heatmap(x) if heatmap else None
        decision = decide(probs, self.model)[0]
        p = float(probs[0, self.pos_index])
        classes = self.model.card["class_names"]
        out: dict[str, Any] = {
            "probability": p,
            "positive_class": self.positive,
            "probability_meaning": f"P({self.positive}): {CALIBRATED_MEANING}",
            "probabilities": {c: float(probs[0, k]) for k, c in enumerate(classes)},
            "decision": decision,
            "operating_point": self.card["operating_point"],
            "model": self.summary(),
            "image": {"width": int(w), "height": int(h)},
            "disclaimer": DISCLAIMER,
        }
        if found is not None:
            from breastcad.lesion_crop import crop_column

            out["model_input"] = crop_column(found)
        if heatmap:
            if heat is None:
                out["heatmap"] = None
                out["heatmap_unavailable"] = (
                    "Grad-CAM needs the PyTorch model; this server runs an ONNX export "
                    "(serve the run folder to get heatmaps)"
                )
            else:
                from breastcad.gradcam import overlay_rgb

                out["heatmap"] = {
                    "method": "Grad-CAM, averaged over the ensemble's fold models",
                    "target_class": self.positive,
                    "meaning": f"regions that raised the model's {self.positive} score; "
                    "not a lesion outline",
                    "image_png_base64": _png_base64(display),
                    "overlay_png_base64": _png_base64(overlay_rgb(display, heat)),
                }
        out["seconds"] = round(time.perf_counter() - t0, 4)
        return out

    def _heatmap(self, x: np.ndarray) -> np.ndarray | None:
        if not self.model.models:  # ONNX backend: no gradients
            return None
        import torch

        from breastcad.gradcam import ensemble_gradcam

        return np.asarray(ensemble_gradcam(self.model, torch.from_numpy(x[None]))[0])


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "code": code, "message": message}},
        status_code=status,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = UploadError(413, "upload_too_large", f"the upload is over the limit of {limit} bytes")
    if declared is not None:
        try:
            if int(declared) > limit + 64 * 1024:  # multipart framing on top of the file
                raise too_big
        except ValueError:
            raise UploadError(400, "bad_request", "invalid Content-Length") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit + 64 * 1024:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/dicom": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "400": {"description": "malformed request (no file, bad multipart, empty file)"},
        "401": {"description": "missing or wrong bearer token"},
        "413": {"description": "upload over the size limit, or image over the pixel limit"},
        "415": {"description": "a type that is not accepted"},
        "422": {"description": "not a readable image"},
    },
}


def create_app(model: Any, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    service = Service(model, settings)
    app = FastAPI(
        title="breastcad",
        version=__version__,
        description=f"{service.card['name']} (version {service.card['version']}). " + DISCLAIMER,
    )
    app.state.service = service

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        path = request.url.path
        if settings.token and path.startswith("/api/") and request.method != "OPTIONS":
            given = request.headers.get("authorization", "")
            scheme, _, credential = given.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                credential.strip().encode(), settings.token.encode()
            )
            if not ok:
                return _error(
                    401,
                    "unauthorized",
                    "a bearer token is required (Authorization: Bearer TOKEN)",
                    {"WWW-Authenticate": "Bearer"},
                )
        try:
            response = await call_next(request)
        except Exception as err:  # never a traceback to the client, never the upload in logs
            log.error("internal error (%s) on %s %s", type(err).__name__, request.method, path)
            return _error(500, "internal_error", "internal error; the request was not stored")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, err: UploadError) -> JSONResponse:
        return _error(err.status, err.code, err.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        parts = []
        for e in err.errors():
            where = ".".join(str(x) for x in e.get("loc", ()))
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return _error(err.status_code, code, str(err.detail))

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, Any]:
        """Liveness and the model being served."""
        return {
            "status": "ok",
            "model": service.card["name"],
            "version": service.card["version"],
            "backend": service.card["backend"],
        }

    @app.get("/api/v1/model", tags=["model"])
    def model_info() -> dict[str, Any]:
        """The model card: architecture, training data, cross-validated metrics with CIs,
        operating point, intended use and limits."""
        return {**service.card, "disclaimer": DISCLAIMER}

    @app.post("/api/v1/predict", tags=["model"], openapi_extra=PREDICT_OPENAPI)
    async def predict(request: Request, heatmap: bool = False) -> dict[str, Any]:
        """Probability (calibrated), decision at the run's operating point, model summary;
        with ``heatmap=true`` also the Grad-CAM overlay as a base64 PNG. Send the image as
        the multipart form field ``file`` or as the raw body with its image type."""
        body = await _read_body(request, settings.max_upload_bytes)
        ctype = request.headers.get("content-type", "")
        if base_type(ctype) == "multipart/form-data":
            upload = parse_multipart(body, ctype)
        elif base_type(ctype) == "application/x-www-form-urlencoded" and not body:
            raise UploadError(400, "no_file", "no file: send the image as the form field 'file'")
        else:
            upload = Upload(data=body, declared_type=base_type(ctype))
            if upload.declared_type in GENERIC_TYPES and not body:
                raise UploadError(400, "no_file", "empty request body: send an image")
        if len(upload.data) > settings.max_upload_bytes:
            raise UploadError(
                413,
                "upload_too_large",
                f"the upload is over the limit of {settings.max_upload_bytes} bytes",
            )
        del body
        return await run_in_threadpool(service.predict, upload, heatmap)

    def static(name: str) -> Response:
        data = resources.files("breastcad.serve").joinpath("static", name).read_bytes()
        headers = {"Cache-Control": "no-cache"}
        if name == "index.html":
            headers["Content-Security-Policy"] = PAGE_CSP
            headers["X-Frame-Options"] = "DENY"
        return Response(data, media_type=STATIC_FILES[name], headers=headers)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def page() -> Response:
        return static("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> Response:
        if name not in STATIC_FILES or name == "index.html":
            return _error(404, "not_found", "no such file")
        return static(name)

    return app
