"""The web pages (``/ui``): follow jobs, look at masks, download results, submit work.

Server-rendered Jinja2 templates (autoescaped) over the same data and access control as the JSON API: a
page needs the same principal (bearer token or the ``tileseg_token`` cookie set by the login form), only
shows the caller's own jobs (admins see all) and answers 404 for anyone else's. The one script
(``static/app.js``) polls ``GET /jobs/{id}`` for live progress and drives the mask opacity slider.

CSRF: the login cookie is ``SameSite=Strict`` and ``HttpOnly``, so a cross-site form never carries it;
every state-changing page is a POST that also refuses a foreign ``Origin`` header.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

import jinja2
import numpy as np
from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from api import auth
from core import jobs
from core.db import session_scope
from core.models import Item, JobStatus
from core.settings import get_settings
from core.store import ArtifactStore
from core.tokens import Principal, verify_token

__all__ = ["Bar", "BarChart", "bar_chart", "colour_mask", "router", "thumb_shape"]

PREFIX = "/ui"
HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
TERMINAL = [s.value for s in JobStatus if s.terminal]
JOBS_PER_PAGE = 20
ITEMS_PER_PAGE = 24
#: Seconds the login cookie lives (the token itself stays valid until revoked).
COOKIE_MAX_AGE = 14 * 24 * 3600
#: Overlay colours for classes whose model spec is unknown (tab10).
FALLBACK_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
NODATA_CLASS = 255
#: Page security headers: no inline scripts or styles, no framing, no third-party anything.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                "script-src 'self'; object-src 'none'; base-uri 'none'; "
                                "frame-ancestors 'none'; form-action 'self'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix=PREFIX, include_in_schema=False)


# Pure helpers ---------------------------------------------------------------------------------------------
def thumb_shape(height: int, width: int, max_size: int) -> tuple[int, int]:
    """``(h, w)`` with the longer side at most ``max_size`` px, never upscaled, never 0 (as the adapters'
    ``Item.preview`` does, so a mask and a preview of the same size line up)."""
    scale = min(1.0, max_size / max(height, width, 1))
    return max(1, round(height * scale)), max(1, round(width * scale))


def colour_mask(classes: np.ndarray, colours: Sequence[tuple[int, int, int]], transparent: set[int],
                shape: tuple[int, int] | None = None) -> np.ndarray:
    """Class ids ``(H, W)`` integer -> ``(h, w, 4) uint8`` RGBA: class ``i`` painted ``colours[i]``, opaque;
    ids in ``transparent``, ids without a colour and 255 (no data) fully transparent.

    ``shape`` resamples (nearest neighbour, so no invented classes) to ``(h, w)`` first.
    """
    from PIL import Image

    cls = np.asarray(classes)
    if cls.ndim != 2:
        raise ValueError(f"class mask must be (H, W), got {cls.shape}")
    cls = np.clip(cls, 0, 255).astype(np.uint8)
    if shape is not None and shape != cls.shape:
        cls = np.asarray(Image.fromarray(cls).resize((shape[1], shape[0]), Image.Resampling.NEAREST))
    lut = np.zeros((256, 4), np.uint8)
    for i, c in enumerate(colours[:NODATA_CLASS]):
        if i not in transparent:
            lut[i] = (*[int(v) & 0xFF for v in c], 255)
    return lut[cls]


@dataclass(frozen=True)
class Bar:
    """One bar of a horizontal bar chart, in SVG user units."""

    label: str
    value: float
    text: str
    colour: str
    y: float
    width: float


@dataclass(frozen=True)
class BarChart:
    """Geometry of a horizontal bar chart rendered as inline SVG by the templates (escaped there)."""

    title: str
    bars: list[Bar]
    width: int
    height: int
    label_width: int
    bar_height: int
    plot_width: int


def bar_chart(title: str, rows: Sequence[tuple[str, float, tuple[int, int, int]]], *,
              max_value: float | None = None, fmt: str = "{:.1%}", width: int = 460, bar_height: int = 22,
              gap: int = 8, label_width: int = 140) -> BarChart:
    """Lay out ``rows`` of ``(label, value >= 0, (r, g, b))`` as bars scaled to ``max_value`` (default: the
    largest value). Non-finite and negative values draw as empty bars."""
    values = [v if (v is not None and math.isfinite(v) and v > 0) else 0.0 for _, v, _ in rows]
    top = max_value if max_value and max_value > 0 else max(values, default=0.0) or 1.0
    plot = width - label_width - 64  # room on the right for the value text
    bars = []
    for n, ((label, raw, rgb), v) in enumerate(zip(rows, values, strict=True)):
        text = fmt.format(raw) if raw is not None and math.isfinite(raw) else "–"
        bars.append(Bar(label=label, value=v, text=text, colour="#{:02x}{:02x}{:02x}".format(*rgb),
                        y=gap + n * (bar_height + gap), width=round(plot * min(v / top, 1.0), 2)))
    height = gap + len(rows) * (bar_height + gap)
    return BarChart(title=title, bars=bars, width=width, height=height, label_width=label_width,
                    bar_height=bar_height, plot_width=plot)


def _fmt_time(value: datetime | None) -> str:
    if value is None:
        return "–"
    if value.tzinfo is None:  # SQLite hands back naive UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _basename(source: str) -> str:
    return source.rstrip("/").rsplit("/", 1)[-1] or source


def _safe_next(target: str | None) -> str:
    """Only same-site paths under /ui after login (no open redirect to ``//host``, ``/\\host`` or a URL)."""
    if target and target.startswith(PREFIX + "/") and "\\" not in target:
        return target
    return PREFIX + "/jobs"


# Templates ------------------------------------------------------------------------------------------------
_env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                          trim_blocks=True, lstrip_blocks=True)
_env.filters.update(time=_fmt_time, bytes=_fmt_bytes, basename=_basename)
_env.globals.update(terminal=TERMINAL, statuses=[s.value for s in JobStatus])
templates = Jinja2Templates(env=_env)


def _page(request: Request, name: str, context: dict[str, Any], status_code: int = 200,
          viewer: Principal | None = None) -> Response:
    root = request.scope.get("root_path", "")
    ctx = {"root": root, "ui": root + PREFIX, "viewer": viewer, "auth": get_settings().auth, **context}
    return templates.TemplateResponse(request, name, ctx, status_code=status_code, headers=SECURITY_HEADERS)


def _error(request: Request, status_code: int, message: str, viewer: Principal | None = None) -> Response:
    return _page(request, "error.html", {"status_code": status_code, "message": message}, status_code, viewer)


# Access ---------------------------------------------------------------------------------------------------
def _viewer(request: Request) -> Principal:
    """The caller, or a 303 to the login page (with ``next``) when there is no valid token or cookie."""
    try:
        return auth.resolve_principal(request)
    except HTTPException as exc:
        if exc.status_code != 401:
            raise
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        root = request.scope.get("root_path", "")
        login_url = f"{root}{PREFIX}/login?{urlencode({'next': here})}"
        raise HTTPException(303, "sign in first", headers={"Location": login_url}) from None


Viewer = Annotated[Principal, Depends(_viewer)]


def _same_origin(request: Request) -> None:
    """Refuse POSTs whose ``Origin`` names another site (defence in depth next to SameSite=Strict)."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    # Behind a proxy that rewrites Host, the browser's host arrives as X-Forwarded-Host.
    hosts = {request.headers.get("host", "")} | {
        h.strip() for h in request.headers.get("x-forwarded-host", "").split(",") if h.strip()}
    if urlsplit(origin).netloc not in hosts:
        raise HTTPException(403, f"cross-site request from {origin} refused")


SameOrigin = Depends(_same_origin)


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _owned_job(session: Any, job_id: str, viewer: Principal) -> Any:
    jid = _uuid(job_id)
    return None if jid is None else jobs.get_job(session, jid, viewer.scope)


def _owned_item(session: Any, job_id: str, item_id: str, viewer: Principal) -> tuple[Any, Any]:
    job = _owned_job(session, job_id, viewer)
    iid = _uuid(item_id)
    if job is None or iid is None:
        return job, None
    item = session.get(Item, iid)
    return job, (item if item is not None and item.job_id == job.id else None)


# Login ----------------------------------------------------------------------------------------------------
@router.get("")
@router.get("/")
def home(request: Request) -> RedirectResponse:
    return RedirectResponse(request.scope.get("root_path", "") + PREFIX + "/jobs", status_code=303)


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> Response:
    if not get_settings().auth:
        return RedirectResponse(request.scope.get("root_path", "") + _safe_next(next), status_code=303)
    return _page(request, "login.html", {"next": _safe_next(next), "error": None})


@router.post("/login", dependencies=[SameOrigin])
def login(request: Request, token: Annotated[str, Form(max_length=512)] = "",
          next: Annotated[str, Form(max_length=2048)] = "") -> Response:
    if not get_settings().auth:
        return RedirectResponse(request.scope.get("root_path", "") + _safe_next(next), status_code=303)
    with session_scope() as session:
        principal = verify_token(session, token.strip())
    if principal is None:
        error = "That token is unknown or revoked."
        return _page(request, "login.html", {"next": _safe_next(next), "error": error}, status_code=401)
    root = request.scope.get("root_path", "")
    resp = RedirectResponse(root + _safe_next(next), status_code=303)
    resp.set_cookie(auth.COOKIE, token.strip(), max_age=COOKIE_MAX_AGE, path=root or "/", httponly=True,
                    samesite="strict", secure=request.url.scheme == "https")
    return resp


@router.post("/logout", dependencies=[SameOrigin])
def logout(request: Request) -> Response:
    root = request.scope.get("root_path", "")
    resp = RedirectResponse(root + PREFIX + "/login", status_code=303)
    resp.delete_cookie(auth.COOKIE, path=root or "/", httponly=True, samesite="strict",
                       secure=request.url.scheme == "https")
    return resp


# Job list -------------------------------------------------------------------------------------------------
@router.get("/jobs")
def job_list(request: Request, viewer: Viewer, status: str | None = None,
             page: Annotated[int, Query(ge=1, le=100_000)] = 1) -> Response:
    status = status or None
    if status is not None and status not in JobStatus.__members__:
        return _error(request, 422, f"unknown status {status!r}", viewer)
    with session_scope() as session:
        rows, total = jobs.list_jobs(session, owner=viewer.scope, status=status, limit=JOBS_PER_PAGE,
                                     offset=(page - 1) * JOBS_PER_PAGE)
        listed = [_job_view(j) for j in rows]
    pages = max(1, math.ceil(total / JOBS_PER_PAGE))
    return _page(request, "jobs.html", {"jobs": listed, "total": total, "status": status, "page": page,
                                        "pages": pages, "per_page": JOBS_PER_PAGE}, viewer=viewer)


def _job_view(job: Any) -> dict[str, Any]:
    return {"id": str(job.id), "owner": job.owner, "pipeline": job.pipeline, "status": job.status,
            "items_total": job.items_total, "items_done": job.items_done, "items_failed": job.items_failed,
            "progress": job.progress, "error": job.error, "created_at": job.created_at,
            "started_at": job.started_at, "finished_at": job.finished_at, "inputs": list(job.inputs or []),
            "options": dict(job.options or {}), "terminal": JobStatus(job.status).terminal}


# Job page -------------------------------------------------------------------------------------------------
@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str, viewer: Viewer,
             page: Annotated[int, Query(ge=1, le=100_000)] = 1) -> Response:
    with session_scope() as session:
        job = _owned_job(session, job_id, viewer)
        if job is None:
            return _error(request, 404, f"job {job_id} not found", viewer)
        view = _job_view(job)
        items, total = jobs.list_items(session, job.id, limit=ITEMS_PER_PAGE,
                                       offset=(page - 1) * ITEMS_PER_PAGE)
        item_scores = jobs.items_scores(session, [i.id for i in items])
        item_views = [{**_item_view(i), "scores": item_scores.get(i.id, [])} for i in items]
        rows = jobs.job_metrics(session, job.id)
        metrics, scores = [_metric_view(m) for m in rows], jobs.score_summaries(rows)
        colours = _class_colours(session, job)
    pages = max(1, math.ceil(total / ITEMS_PER_PAGE))
    return _page(request, "job.html", {"job": view, "items": item_views, "items_total": total, "page": page,
                                       "pages": pages, "metrics": metrics, "scores": scores,
                                       "charts": _charts(metrics, colours),
                                       "columns": _metric_columns(metrics)}, viewer=viewer)


@router.post("/jobs/{job_id}/cancel", dependencies=[SameOrigin])
def cancel_job(request: Request, job_id: str, viewer: Viewer) -> Response:
    from api.app import cancel

    jid = _uuid(job_id)
    if jid is None:
        return _error(request, 404, f"job {job_id} not found", viewer)
    try:
        cancel(jid, viewer)  # the API's own handler: same access check, same finalisation
    except HTTPException as exc:
        return _error(request, exc.status_code, str(exc.detail), viewer)
    return RedirectResponse(request.scope.get("root_path", "") + f"{PREFIX}/jobs/{jid}", status_code=303)


def _item_view(item: Any) -> dict[str, Any]:
    arts = item.artifacts or {}
    base = f"/jobs/{item.job_id}/items/{item.id}"
    return {"id": str(item.id), "seq": item.seq, "source": item.source, "key": item.key,
            "format": item.format, "status": item.status, "error": item.error, "meta": dict(item.meta or {}),
            "started_at": item.started_at, "finished_at": item.finished_at,
            "artifacts": [{"kind": k, "url": f"{base}/artifacts/{k}", "bytes": v.get("bytes"),
                           "media_type": v.get("media_type"), "sha256": v.get("sha256")}
                          for k, v in sorted(arts.items())],
            "has_mask": "mask_png" in arts or "class_raster" in arts, "has_overlay": "overlay" in arts}


_METRIC_FIELDS = ("pixel_count", "fraction", "mean_confidence", "area", "dice", "iou", "instance_count",
                  "mean_score")


def _metric_view(m: Any) -> dict[str, Any]:
    return {"class_id": m.class_id, "class_name": m.class_name, "area_unit": m.area_unit,
            **{f: getattr(m, f) for f in _METRIC_FIELDS}}


def _metric_columns(metrics: Sequence[dict[str, Any]]) -> list[str]:
    """Only the figures some class has (no Dice column without ground truth, no areas without a scale)."""
    return [f for f in _METRIC_FIELDS if any(m[f] is not None for m in metrics)]


def _charts(metrics: Sequence[dict[str, Any]], colours: dict[str, tuple[int, int, int]]) -> list[BarChart]:
    def colour(m: dict[str, Any]) -> tuple[int, int, int]:
        return colours.get(m["class_name"]) or FALLBACK_COLOURS[m["class_id"] % len(FALLBACK_COLOURS)]

    charts = []
    if any(m["fraction"] is not None for m in metrics):
        charts.append(bar_chart("Share of pixels", [(m["class_name"], m["fraction"], colour(m))
                                                    for m in metrics], max_value=1.0))
    if any(m["dice"] is not None for m in metrics):
        charts.append(bar_chart("Dice against ground truth",
                                [(m["class_name"], m["dice"], colour(m)) for m in metrics], max_value=1.0,
                                fmt="{:.3f}"))
    if any(m["instance_count"] for m in metrics):
        charts.append(bar_chart("Detected objects",
                                [(m["class_name"], float(m["instance_count"] or 0), colour(m))
                                 for m in metrics], fmt="{:.0f}"))
    return charts


def _spec(name: str | None) -> Any:
    if not name or name == "auto":
        return None
    from pipelines.registry import find_specs

    return find_specs().get(name)


def _class_colours(session: Any, job: Any, item: Any | None = None) -> dict[str, tuple[int, int, int]]:
    """Class name -> overlay colour from the model specs that produced the job's items."""
    from sqlalchemy import select

    names = {job.pipeline}
    if item is not None:
        names.add((item.meta or {}).get("model"))
    else:
        for meta in session.scalars(select(Item.meta).where(Item.job_id == job.id,
                                                            Item.status == "succeeded").limit(200)):
            names.add((meta or {}).get("model"))
    out: dict[str, tuple[int, int, int]] = {}
    for name in names:
        spec = _spec(name)
        if spec is not None:
            for c in spec.classes:
                out.setdefault(c.name, tuple(c.color))
    return out


# Item page ------------------------------------------------------------------------------------------------
@router.get("/jobs/{job_id}/items/{item_id}")
def item_page(request: Request, job_id: str, item_id: str, viewer: Viewer) -> Response:
    with session_scope() as session:
        job, item = _owned_item(session, job_id, item_id, viewer)
        if job is None or item is None:
            return _error(request, 404, f"item {item_id} not found", viewer)
        view = _item_view(item)
        rows = jobs.job_metrics(session, job.id, item.id)
        metrics, scores = [_metric_view(m) for m in rows], jobs.score_summaries(rows)
        instances = [{"class_name": r.class_name, "score": r.score, "box": r.box, "area_px": r.area_px}
                     for r in jobs.item_instances(session, item.id)[:200]]
        colours = _class_colours(session, job, item)
        job_view = _job_view(job)
    return _page(request, "item.html", {"job": job_view, "item": view, "metrics": metrics, "scores": scores,
                                        "columns": _metric_columns(metrics),
                                        "charts": _charts(metrics, colours), "instances": instances},
                 viewer=viewer)


# Images ---------------------------------------------------------------------------------------------------
_LAYERS = ("source", "mask", "overlay")


@router.get("/jobs/{job_id}/items/{item_id}/{layer}.png")
def item_image(request: Request, job_id: str, item_id: str, layer: str, viewer: Viewer,
               size: Annotated[int, Query(ge=16, le=2048)] = 512) -> Response:
    """``source``: the input through its adapter's ``Item.preview``; ``mask``: the class mask as RGBA with
    background and no-data transparent; ``overlay``: the stored overlay artifact. All at most ``size`` px."""
    if layer not in _LAYERS:
        raise HTTPException(404, f"no {layer} image")
    with session_scope() as session:
        _, item = _owned_item(session, job_id, item_id, viewer)
        if item is None:
            raise HTTPException(404, f"item {item_id} not found")
        source, key, meta = item.source, item.key, dict(item.meta or {})
        arts = dict(item.artifacts or {})
        spec = _spec(meta.get("model"))
    from adapters import AdapterError

    try:
        if layer == "source":
            rgb = _source_preview(source, key, size)
        elif layer == "mask":
            rgb = _mask_image(arts, meta, spec, size)
        else:
            rgb = _overlay_image(arts, size)
    except AdapterError as exc:
        raise HTTPException(422, str(exc)) from exc
    except FileNotFoundError as exc:
        raise HTTPException(410, f"{layer} image: the stored file is gone ({exc})") from exc
    return Response(_png(rgb), media_type="image/png",
                    headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"})


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def _source_preview(source: str, key: str, size: int) -> np.ndarray:
    from adapters import open_input
    from core.store import fetch_input

    s = get_settings()
    with fetch_input(source, s.storage_options) as local:
        _, src = open_input(local, max_pixels=s.max_pixels)
        with src:
            return np.ascontiguousarray(src.item(key).preview(max_size=size))


def _open_artifact(art: dict[str, Any]) -> Any:
    s = get_settings()
    store = ArtifactStore(s.artifacts, s.storage_options)
    local = store.local_path(art["uri"])
    if local is not None:
        return open(local, "rb")
    return store.open(art["uri"])


def _mask_image(arts: dict[str, Any], meta: dict[str, Any], spec: Any, size: int) -> np.ndarray:
    from PIL import Image

    from adapters import AdapterError

    colours: list[tuple[int, int, int]] = spec.colors_by_id() if spec is not None else []
    transparent = {NODATA_CLASS}
    if spec is not None:
        if spec.background_class is not None:
            transparent.add(spec.background_class)
        transparent |= {c.id for c in spec.classes if c.name.strip().lower() == "background"}
    if "mask_png" in arts:
        with _open_artifact(arts["mask_png"]) as fh, Image.open(fh) as im:
            if im.mode != "P":
                raise AdapterError("mask_png artifact is not a palette image of class ids")
            classes = np.asarray(im)
            if not colours:  # no spec: the palette the sink wrote is the best guess
                pal = im.getpalette() or []
                colours = [tuple(pal[i:i + 3]) for i in range(0, len(pal), 3)]
    elif "class_raster" in arts:
        classes = _read_class_raster(arts["class_raster"], size)
    else:
        raise HTTPException(404, "this item has no class mask (instance results: see the overlay)")
    if not colours:
        colours = FALLBACK_COLOURS
    h, w = int(meta.get("height") or classes.shape[0]), int(meta.get("width") or classes.shape[1])
    return colour_mask(classes, colours, transparent, thumb_shape(h, w, size))


def _read_class_raster(art: dict[str, Any], size: int) -> np.ndarray:
    """A decimated nearest-neighbour read, so a large raster never loads whole."""
    import rasterio
    from rasterio.enums import Resampling

    from adapters import AdapterError

    s = get_settings()
    local = ArtifactStore(s.artifacts, s.storage_options).local_path(art["uri"])
    try:
        # A local COG is read in place (overviews make this cheap); a remote one comes through fsspec.
        with (contextlib.nullcontext(str(local)) if local is not None else _open_artifact(art)) as src, \
                rasterio.open(src) as ds:
            h, w = thumb_shape(ds.height, ds.width, size)
            return ds.read(1, out_shape=(h, w), resampling=Resampling.nearest)
    except rasterio.errors.RasterioIOError as exc:
        if local is not None and not local.is_file():
            raise FileNotFoundError(str(local)) from exc
        raise AdapterError(f"class_raster artifact cannot be read: {exc}") from exc
    except rasterio.errors.RasterioError as exc:
        raise AdapterError(f"class_raster artifact cannot be read: {exc}") from exc


def _overlay_image(arts: dict[str, Any], size: int) -> np.ndarray:
    from PIL import Image

    if "overlay" not in arts:
        raise HTTPException(404, "this item has no overlay")
    with _open_artifact(arts["overlay"]) as fh, Image.open(fh) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        return np.asarray(im)


# Submission -----------------------------------------------------------------------------------------------
def _pipelines() -> list[dict[str, Any]]:
    from pipelines.registry import find_specs

    return [{"name": s.name, "kind": s.kind, "description": s.description, "default_for": s.default_for}
            for s in sorted(find_specs().values(), key=lambda s: s.name)]


def _submit_form(request: Request, viewer: Principal, *, error: str | None = None, paths: str = "",
                 pipeline: str = "auto", options: str = "", status_code: int = 200) -> Response:
    s = get_settings()
    return _page(request, "submit.html", {"pipelines": _pipelines(), "error": error, "paths": paths,
                                          "pipeline": pipeline, "options": options,
                                          "input_roots": [str(r) for r in s.input_roots],
                                          "max_upload": _fmt_bytes(s.max_upload_bytes)},
                 status_code=status_code, viewer=viewer)


@router.get("/submit")
def submit_page(request: Request, viewer: Viewer) -> Response:
    return _submit_form(request, viewer)


def _json_request(request: Request, body: bytes) -> Request:
    """The same request re-addressed as a JSON POST, so the API's own ``submit`` validates and queues it."""
    headers = [(k, v) for k, v in request.scope["headers"] if k not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request({**request.scope, "headers": headers}, receive)


async def _call_submit(request: Request, viewer: Principal) -> tuple[str | None, str | None, int]:
    """Run ``api.app.submit``; returns (job id, None, 202) or (None, error message, status)."""
    from api.app import _readable_422, submit

    try:
        resp = await submit(request, viewer)
    except HTTPException as exc:
        return None, str(exc.detail), exc.status_code
    except RequestValidationError as exc:
        detail = json.loads((await _readable_422(request, exc)).body)["detail"]
        return None, detail, 422
    return json.loads(resp.body)["id"], None, resp.status_code


@router.post("/submit/paths", dependencies=[SameOrigin])
async def submit_paths(request: Request, viewer: Viewer,
                       paths: Annotated[str, Form(max_length=1_000_000)] = "",
                       pipeline: Annotated[str, Form(max_length=64)] = "auto",
                       options: Annotated[str, Form(max_length=100_000)] = "") -> Response:
    """Server-side paths (one per line, under the input roots) or object-store URLs."""
    lines = [ln.strip() for ln in paths.splitlines() if ln.strip()]
    keep = {"paths": paths, "pipeline": pipeline, "options": options}
    if not lines:
        return _submit_form(request, viewer, error="List at least one path.", status_code=422, **keep)
    try:
        opts = json.loads(options) if options.strip() else {}
    except json.JSONDecodeError as exc:
        return _submit_form(request, viewer, error=f"options: not valid JSON ({exc})", status_code=422,
                            **keep)
    body = json.dumps({"inputs": lines, "pipeline": pipeline, "options": opts}).encode()
    job_id, error, code = await _call_submit(_json_request(request, body), viewer)
    if job_id is None:
        return _submit_form(request, viewer, error=error, status_code=code, **keep)
    return RedirectResponse(request.scope.get("root_path", "") + f"{PREFIX}/jobs/{job_id}", status_code=303)


@router.post("/submit/upload", dependencies=[SameOrigin])
async def submit_upload(request: Request, viewer: Viewer) -> Response:
    """Multipart uploads (``files``, ``pipeline``, ``options``), streamed by the API's own upload code."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return _submit_form(request, viewer, error="Uploads must be sent as multipart/form-data.",
                            status_code=415)
    job_id, error, code = await _call_submit(request, viewer)
    if job_id is None:
        form = await request.form() if code != 413 else {}
        return _submit_form(request, viewer, error=error, status_code=code,
                            pipeline=str(form.get("pipeline") or "auto"),
                            options=str(form.get("options") or ""))
    return RedirectResponse(request.scope.get("root_path", "") + f"{PREFIX}/jobs/{job_id}", status_code=303)


# Static files ---------------------------------------------------------------------------------------------
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".svg": "image/svg+xml"}


@router.get("/static/{name}")
def static(name: str) -> Response:
    path = (STATIC / name).resolve()
    if path.parent != STATIC or path.suffix not in _STATIC_TYPES or not path.is_file():
        raise HTTPException(404, f"no static file {name}")
    return FileResponse(path, media_type=_STATIC_TYPES[path.suffix],
                        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"})
