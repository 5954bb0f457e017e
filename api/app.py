"""The HTTP API (FastAPI). OpenAPI docs at /docs. Jobs are created here and processed by workers."""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Query, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from api import schemas
from api.auth import CurrentPrincipal
from core import jobs
from core.db import engine, session_scope
from core.models import Item, ItemStatus, JobStatus
from core.settings import get_settings
from core.store import ArtifactStore
from core.tokens import Principal

app = FastAPI(title="tileseg", version="0.1.0",
              description="Batch segmentation service: submit jobs, follow them, fetch masks and metrics.")


#: The caller (see api.auth); ``.scope`` is the owner filter for queries, None for admins.
Owner = CurrentPrincipal


@app.exception_handler(RequestValidationError)
async def _readable_422(_: Request, exc: RequestValidationError) -> JSONResponse:
    msgs = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        msgs.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return JSONResponse(status_code=422, content={"detail": "; ".join(msgs), "errors": jsonable(exc.errors())})


@app.exception_handler(StarletteHTTPException)
async def _full_allow_header(request: Request, exc: StarletteHTTPException) -> Response:
    """A 405 names every documented method of the path. Starlette answers from the first route whose path
    matches, so ``OPTIONS /jobs`` said ``Allow: POST`` although ``GET /jobs`` exists too. The OpenAPI document
    is the public list of routes (included routers are not flattened in ``app.routes``)."""
    if exc.status_code == 405:
        allowed = {m.upper() for path, ops in request.app.openapi().get("paths", {}).items()
                   if compile_path(path)[0].match(request.url.path) for m in ops if m != "parameters"}
        if allowed:
            exc = StarletteHTTPException(405, exc.detail, headers={**(exc.headers or {}),
                                                                   "Allow": ", ".join(sorted(allowed))})
    return await http_exception_handler(request, exc)


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values; anything else, and NaN or infinite floats (which strict JSON lacks, so a
    422 echoing them back failed with a 500), become strings."""
    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [finite(x) for x in v]
        return v

    return finite(json.loads(json.dumps(obj, default=str)))


def _job_or_404(session: Any, job_id: uuid.UUID, owner: Principal) -> Any:
    job = jobs.get_job(session, job_id, owner.scope)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return job


def _include_optional_routers() -> None:
    """Routers of features that live in their own modules (schedules, the web pages)."""
    import importlib
    import importlib.util

    for name in ("api.routes_schedules", "api.web"):
        if importlib.util.find_spec(name) is not None:
            app.include_router(importlib.import_module(name).router)


# Health ---------------------------------------------------------------------------------------------------
@app.get("/health", response_model=schemas.Health, tags=["service"])
def health() -> JSONResponse:
    """Checks the database and the broker; 503 if either is down."""
    from sqlalchemy import text

    db = broker = "ok"
    try:
        with session_scope() as s:
            s.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        db = f"error: {type(exc).__name__}"
    try:
        from worker.app import app as celery_app

        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:  # noqa: BLE001
        broker = f"error: {type(exc).__name__}"
    ok = db == "ok" and broker == "ok"
    body = schemas.Health(status="ok" if ok else "degraded", database=db, broker=broker)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@app.get("/models", response_model=list[schemas.ModelOut], tags=["models"])
def models(_: Owner) -> list[schemas.ModelOut]:
    from pipelines.registry import find_specs

    return [schemas.ModelOut(name=s.name, kind=s.kind, source=s.source, source_format=s.source_format,
                             classes=s.class_names, input_size=s.input_size, channels=s.channels, mode=s.mode,
                             default_for=s.default_for, description=s.description,
                             truth_map=s.truth_map.model_dump() if s.truth_map else None)
            for s in sorted(find_specs().values(), key=lambda s: s.name)]


# Submission -----------------------------------------------------------------------------------------------
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_name(name: str | None, n: int) -> str:
    base = _SAFE.sub("_", Path(name or "").name)[:100].strip("._") or "upload"
    return f"{n:05d}-{base}"


async def _uploaded_inputs(request: Request, job_hint: uuid.UUID) -> tuple[list[jobs.InputSpec], dict[str, Any]]:
    """Stream multipart uploads into the artifact store (never trusting file names); other form fields
    come back as a dict."""
    s = get_settings()
    limit = s.max_upload_bytes
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit:
        raise HTTPException(413, f"upload of {declared} bytes exceeds the limit of {limit} bytes")
    form = await request.form(max_files=10_000, max_fields=100)
    store = ArtifactStore(s.artifacts, s.storage_options)
    uploads: list[tuple[str, str, str]] = []
    fields: dict[str, Any] = {}
    total = 0
    import tempfile

    for n, (key, value) in enumerate(form.multi_items()):
        if isinstance(value, str):
            fields[key] = value
            continue
        if not value.filename and not value.size:  # a form's file input left empty still sends a part
            continue
        with tempfile.NamedTemporaryFile(prefix="tileseg-up-", delete=True) as tmp:
            while chunk := await value.read(1 << 20):
                total += len(chunk)
                if total > limit:
                    raise HTTPException(413, f"uploads exceed the limit of {limit} bytes")
                tmp.write(chunk)
            tmp.flush()
            stored = store.put(Path(tmp.name), f"uploads/{job_hint}/{_safe_name(value.filename, n)}")
        uploads.append((key, Path(value.filename or "").name, stored.uri))
    return _pair_truths(uploads), fields


def _pair_truths(uploads: list[tuple[str, str, str]]) -> list[jobs.InputSpec]:
    """Inputs from ``(form field, file name, stored URI)`` uploads: files under ``truth`` are the ground truth
    of the upload with the same file stem (``cat.jpg`` <- ``cat.png``), or of the only upload; a truth that
    matches no upload is a 422, not a truth silently dropped."""
    images = [(name, uri) for key, name, uri in uploads if key != "truth"]
    truths: dict[str, str] = {}
    for key, name, uri in uploads:
        if key == "truth":
            if Path(name).stem in truths:
                raise HTTPException(422, f"truth: two files with the stem {Path(name).stem!r}")
            truths[Path(name).stem] = uri
    if len(images) == 1 and len(truths) == 1:
        return [jobs.InputSpec(path=images[0][1], truth=next(iter(truths.values())))]
    out = [jobs.InputSpec(path=uri, truth=truths.pop(Path(name).stem, None)) for name, uri in images]
    if truths:
        raise HTTPException(422, f"truth: {', '.join(sorted(truths))} match no uploaded file by name (the truth "
                                 "of cat.jpg is a truth upload named cat.*)")
    return out


#: The JSON body of POST /jobs, documented by hand because the route reads JSON or multipart itself; its models
#: go to the document's components, where a ``$ref`` resolves (a bare ``$defs`` inside a route does not).
_JOB_IN_SCHEMA = schemas.JobIn.model_json_schema(ref_template="#/components/schemas/{model}")
_JOB_IN_DEFS = {"JobIn": _JOB_IN_SCHEMA, **_JOB_IN_SCHEMA.pop("$defs", {})}


def _openapi_with_job_in(default: Any = app.openapi) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = default()
        found = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model in _JOB_IN_DEFS.items():
            found.setdefault(name, model)
        # Every 422 answers {"detail": "<readable sentence>", "errors": [...]} (_readable_422), not FastAPI's
        # {"detail": [...]}, and the document says so.
        found["HTTPValidationError"] = schemas.ValidationProblem.model_json_schema()
        _document_errors(schema)
    return app.openapi_schema


app.openapi = _openapi_with_job_in  # type: ignore[method-assign]


def _document_errors(schema: dict[str, Any]) -> None:
    """Add the error answers every route gives to the document, so that clients generated from it expect them:
    401 without a valid token (all but /health and the pages), 404 for an unknown or foreign ID in the path,
    422 for a bad request, 400 for a body that does not parse, and POST /jobs' 413 (too large) and 503 (queue
    down). Found missing by schemathesis (``st run .../openapi.json --checks all``)."""
    problem = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}}}
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            answers = op.setdefault("responses", {})
            codes = {"422": "bad request: the detail says what is wrong"}
            if "requestBody" in op:
                codes["400"] = "the body could not be parsed"
            if path != "/health" and not path.startswith("/ui"):
                codes["401"] = "missing, unknown or revoked token"
            if "{" in path:
                codes["404"] = "no such ID, or not the caller's"
            if path == "/jobs" and method == "post":
                codes |= {"413": "uploads or inputs over the limits", "503": "the queue is unreachable"}
            for code, text in codes.items():
                answers.setdefault(code, {"description": text, **problem})


@app.post("/jobs", status_code=202, response_model=schemas.JobOut, tags=["jobs"],
          openapi_extra={"requestBody": {"content": {
              "application/json": {"schema": {"$ref": "#/components/schemas/JobIn"}},
              "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
                  "files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}},
                  "truth": {"type": "array", "items": {"type": "string", "format": "binary"},
                            "description": "ground truth of the file with the same stem (cat.png for cat.jpg)"},
                  "pipeline": {"type": "string", "default": "auto", "description": "model name; empty = auto"},
                  "options": {"type": "string", "description": "JobOptions as JSON; empty = {}"}}}}}}})
async def submit(request: Request, owner: Owner) -> JSONResponse:
    """Submit a job: JSON with server-side paths (under the input roots) or URLs, or multipart uploads.
    Returns 202 with the job; poll ``GET /jobs/{id}``."""
    from worker.submit import QueueUnavailable, UnknownPipeline, submit_job

    s = get_settings()
    ctype = request.headers.get("content-type", "")
    try:
        if ctype.startswith("multipart/form-data"):
            uploaded, fields = await _uploaded_inputs(request, uuid.uuid4())
            # As the JSON body forbids unknown keys, a misnamed field must not pass silently. An empty value is
            # what a browser sends for a file input left empty.
            extra = sorted(k for k, v in fields.items() if k not in ("pipeline", "options") and v != "")
            if extra:
                raise HTTPException(422, f"form fields {', '.join(extra)}: expected files (files, truth) and the "
                                         "text fields pipeline and options only")
            body = schemas.JobIn(inputs=[i.path for i in uploaded] or ["<no files>"],
                                 pipeline=fields.get("pipeline") or "auto",  # an empty form field is unset
                                 options=json.loads(fields.get("options") or "{}"))
            if not uploaded:
                raise HTTPException(422, "multipart request has no files")
            inputs = uploaded
        else:
            raw = await request.body()
            if len(raw) > 10 * 1024 * 1024:
                raise HTTPException(413, "request body over 10 MiB: upload files instead of listing them")
            body = schemas.JobIn.model_validate_json(raw or b"{}")
            inputs = []
            for i in body.inputs:
                try:
                    path = jobs.check_input_path(i.path, s.input_roots)
                    truth = jobs.check_input_path(i.truth, s.input_roots) if i.truth else None
                except jobs.PathNotAllowed as exc:
                    raise HTTPException(422, str(exc)) from exc
                inputs.append(jobs.InputSpec(path=path, truth=truth))
        if len(inputs) > s.max_inputs_per_job:
            raise HTTPException(413, f"{len(inputs)} inputs exceed the limit of {s.max_inputs_per_job} per job")
        job_id = submit_job(inputs, body.pipeline, body.options.model_dump(exclude_none=True), owner.owner)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    except json.JSONDecodeError as exc:
        raise HTTPException(422, f"options: not valid JSON ({exc})") from exc
    except UnknownPipeline as exc:
        raise HTTPException(422, str(exc)) from exc
    except QueueUnavailable as exc:
        raise HTTPException(503, str(exc)) from exc
    with session_scope() as session:
        job = jobs.get_job(session, job_id)
        return JSONResponse(jsonable(schemas.JobOut.of(job).model_dump()), status_code=202,
                            headers={"Location": f"/jobs/{job_id}"})


# Queries --------------------------------------------------------------------------------------------------
def _json(model: Any) -> Response:
    """Serialize a pydantic model straight to a response (the route's response_model still documents it)."""
    return Response(model.model_dump_json(), media_type="application/json")


@app.get("/jobs", response_model=schemas.JobList, tags=["jobs"])
def list_jobs(owner: Owner, status_: Annotated[JobStatus | None, Query(alias="status")] = None,
              since: datetime | None = None, limit: Annotated[int, Query(ge=1, le=500)] = 50,
              offset: Annotated[int, Query(ge=0, le=schemas.MAX_OFFSET)] = 0) -> Response:
    if since is not None:
        since = schemas.as_utc(since)  # a time without an offset is UTC, as every time the API returns
    with engine().connect() as conn:
        rows, total = jobs.list_job_summaries(conn, owner=owner.scope, status=status_, since=since,
                                              limit=limit, offset=offset)
    # model_construct: the rows come from our own schema, validating them again would double the cost.
    return _json(schemas.JobList.model_construct(
        total=total, limit=limit, offset=offset, jobs=[schemas.JobOut.model_construct(**r) for r in rows]))


@app.get("/jobs/{job_id}", response_model=schemas.JobDetail, tags=["jobs"])
def get_job(job_id: uuid.UUID, owner: Owner) -> Response:
    with engine().connect() as conn:
        row = jobs.job_summary(conn, job_id, owner.scope, inputs=True)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return _json(schemas.JobDetail.model_construct(**row))


@app.post("/jobs/{job_id}/cancel", response_model=schemas.JobOut, tags=["jobs"])
def cancel(job_id: uuid.UUID, owner: Owner) -> schemas.JobOut:
    """Stop scheduling the job's remaining items; finished results are kept."""
    with session_scope() as session:
        _job_or_404(session, job_id, owner)
        job = jobs.cancel_job(session, job_id)
        out = schemas.JobOut.of(job)
    from worker.tasks import finalize_job

    try:
        finalize_job.delay(str(job_id))
    except Exception:  # noqa: BLE001 - aggregation happens anyway when running items finish
        pass
    return out


@app.get("/jobs/{job_id}/items", response_model=schemas.ItemList, tags=["results"])
def list_items(job_id: uuid.UUID, owner: Owner,
               status_: Annotated[ItemStatus | None, Query(alias="status")] = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               offset: Annotated[int, Query(ge=0, le=schemas.MAX_OFFSET)] = 0) -> schemas.ItemList:
    with session_scope() as session:
        _job_or_404(session, job_id, owner)
        rows, total = jobs.list_items(session, job_id, status=status_, limit=limit, offset=offset)
        return schemas.ItemList(total=total, limit=limit, offset=offset, items=[schemas.ItemOut.of(i) for i in rows])


@app.get("/jobs/{job_id}/items/{item_id}", response_model=schemas.ItemDetail, tags=["results"])
def get_item(job_id: uuid.UUID, item_id: uuid.UUID, owner: Owner) -> schemas.ItemDetail:
    with session_scope() as session:
        _job_or_404(session, job_id, owner)
        item = session.get(Item, item_id)
        if item is None or item.job_id != job_id:
            raise HTTPException(404, f"item {item_id} not found")
        rows = jobs.job_metrics(session, job_id, item_id)
        return schemas.ItemDetail(
            **schemas.ItemOut.of(item).model_dump(),
            metrics=[schemas.MetricOut.of(m) for m in rows],
            scores=[schemas.ScoreOut(**d) for d in jobs.score_summaries(rows)],
            instances=[schemas.InstanceOut.of(r) for r in jobs.item_instances(session, item_id)],
        )


@app.get("/jobs/{job_id}/metrics", response_model=schemas.JobMetrics, tags=["results"])
def job_metrics(job_id: uuid.UUID, owner: Owner) -> schemas.JobMetrics:
    """Per-class figures aggregated over the job (available once it has finished)."""
    with session_scope() as session:
        job = _job_or_404(session, job_id, owner)
        rows = jobs.job_metrics(session, job_id)
        return schemas.JobMetrics(job_id=job_id, status=job.status, classes=[schemas.MetricOut.of(m) for m in rows],
                                  scores=[schemas.ScoreOut(**d) for d in jobs.score_summaries(rows)])


@app.get("/jobs/{job_id}/items/{item_id}/artifacts/{kind}", tags=["results"],
         responses={200: {"content": {"application/octet-stream": {}}}})
def download(job_id: uuid.UUID, item_id: uuid.UUID, kind: str, owner: Owner) -> Any:
    """Download one output (class_raster, mask_png, overlay, geojson, dicom_seg, coco_json, mask_stack, ...)."""
    with session_scope() as session:
        _job_or_404(session, job_id, owner)
        item = session.get(Item, item_id)
        if item is None or item.job_id != job_id or kind not in (item.artifacts or {}):
            raise HTTPException(404, f"no {kind} artifact for item {item_id}")
        art = item.artifacts[kind]
    s = get_settings()
    store = ArtifactStore(s.artifacts, s.storage_options)
    filename = Path(art["uri"]).name
    local = store.local_path(art["uri"])
    if local is not None:
        if not local.is_file():
            raise HTTPException(410, f"{kind} artifact is missing from the store")
        return FileResponse(local, media_type=art["media_type"], filename=filename)
    fh = store.open(art["uri"])
    return StreamingResponse(iter(lambda: fh.read(1 << 20), b""), media_type=art["media_type"],
                             headers={"Content-Disposition": f"attachment; filename*=utf-8''{quote(filename)}"})


_include_optional_routers()
