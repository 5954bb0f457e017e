"""The ``tileseg`` command line: submit and follow jobs, run workers and the API, manage the database.

Human tables by default; ``--json`` prints machine-readable output for scripts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import click

from core.settings import get_settings

__all__ = ["main"]


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def ensure_schema() -> None:
    """Embedded mode needs no setup step: bring the SQLite schema up to date automatically.

    With PostgreSQL, migrations are an explicit step (`tileseg db upgrade`, the compose `migrate` service).
    """
    if get_settings().db_url.startswith("sqlite"):
        from core.db import upgrade

        upgrade()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0.1.0", prog_name="tileseg")
def main() -> None:
    """tileseg: tiled semantic and instance segmentation over GeoTIFF, DICOM and photo batches."""
    import logging

    logging.basicConfig(level=os.environ.get("TILESEG_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# Database -------------------------------------------------------------------------------------------------
@main.group()
def db() -> None:
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default: head)."""
    from core.db import upgrade

    upgrade(revision)
    click.echo(f"database at {revision}: {_redact(get_settings().db_url)}")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url


# Tokens ---------------------------------------------------------------------------------------------------
@main.group()
def token() -> None:
    """API tokens (stored hashed; the value is shown once, at creation)."""


@token.command("create")
@click.argument("owner")
@click.option("--name", default="default", help="a label for the token")
@click.option("--admin", is_flag=True, help="may see every owner's jobs")
@click.option("--json", "as_json", is_flag=True)
def token_create(owner: str, name: str, admin: bool, as_json: bool) -> None:
    """Create a token for OWNER and print it."""
    from core.db import session_scope
    from core.tokens import create_token

    ensure_schema()
    with session_scope() as session:
        row, plain = create_token(session, owner, name, admin)
        tid = row.id
    if as_json:
        _echo_json({"id": str(tid), "owner": owner, "name": name, "admin": admin, "token": plain})
    else:
        click.echo(plain)
        click.echo(f"token id {tid} for {owner}{' (admin)' if admin else ''}; keep the value, it is not stored",
                   err=True)


@token.command("revoke")
@click.argument("token_id")
def token_revoke(token_id: str) -> None:
    """Revoke a token by its ID (see `tileseg token list`)."""
    from core.db import session_scope
    from core.tokens import revoke_token

    with session_scope() as session:
        if not revoke_token(session, _job_id(token_id)):
            raise click.ClickException(f"no active token {token_id}")
    click.echo(f"revoked {token_id}")


@token.command("list")
def token_list() -> None:
    """List tokens (IDs, owners, state; never the values)."""
    from core.db import session_scope
    from core.tokens import list_tokens

    ensure_schema()
    with session_scope() as session:
        for t in list_tokens(session):
            state = f"revoked {t.revoked_at:%Y-%m-%d}" if t.revoked_at else "active"
            click.echo(f"{t.id}  {t.owner:<16} {t.name:<16} {'admin' if t.is_admin else 'user ':<5}  {state}")


# Models ---------------------------------------------------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def models(as_json: bool) -> None:
    """List the registered models (built-in and from TILESEG_MODEL_DIRS)."""
    from pipelines.registry import find_specs

    specs = sorted(find_specs().values(), key=lambda s: s.name)
    rows = [{"name": s.name, "kind": s.kind, "source": s.source, "source_format": s.source_format,
             "classes": s.class_names, "input_size": s.input_size, "channels": s.channels, "mode": s.mode,
             "normalization": s.normalization.kind, "default_for": s.default_for,
             "truth_map": s.truth_map.model_dump() if s.truth_map else None} for s in specs]
    if as_json:
        _echo_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="registered models")
    for col in ("name", "kind", "input", "classes", "default for", "source"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["kind"], f"{r['input_size']}px x{r['channels']} {r['mode']} ({r['normalization']})",
                  ", ".join(r["classes"][:6]) + (" ..." if len(r["classes"]) > 6 else ""),
                  ", ".join(r["default_for"]) or "-", r["source"])
    Console().print(t)


# Jobs -----------------------------------------------------------------------------------------------------
def _parse_inputs(inputs: tuple[str, ...], truth: tuple[str, ...]) -> list:
    from core.jobs import InputSpec

    if truth and len(truth) != len(inputs):
        raise click.BadParameter("give one --truth per input, in the same order")
    out = []
    for n, p in enumerate(inputs):
        path = p if "://" in p else str(Path(p).expanduser().resolve())
        if "://" not in p and not any(c in p for c in "*?[") and not os.path.exists(path):
            raise click.BadParameter(f"{p}: no such file or folder")
        t = truth[n] if truth else None
        if t and "://" not in t:
            t = str(Path(t).expanduser().resolve())
            if not os.path.exists(t):  # caught here, before a job exists, like a missing input
                raise click.BadParameter(f"--truth {truth[n]}: no such file or folder")
        out.append(InputSpec(path=path, truth=t))
    return out


def _options(score_threshold: float | None, truth_map: str | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if score_threshold is not None:
        opts["score_threshold"] = score_threshold
    if truth_map:
        from core.jobs import check_truth_map

        try:
            mapping = json.loads(truth_map)
        except ValueError as exc:
            raise click.BadParameter(f"--truth-map is not valid JSON ({exc})") from exc
        try:
            opts["truth_map"] = check_truth_map(mapping)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc
    return opts


_job_options = [
    click.argument("inputs", nargs=-1, required=True),
    click.option("--pipeline", "-p", default="auto", show_default=True,
                 help="model name (see `tileseg models`) or 'auto' for each input kind's default"),
    click.option("--truth", multiple=True,
                 help="ground truth per input, in order: a label image (a folder of them for an input folder, "
                      "matched by name; a DICOM SEG for DICOM). Adds Dice/IoU, pixel accuracy and mean IoU"),
    click.option("--truth-map", help='JSON mapping of truth values to class ids, e.g. \'{"1":0,"2":1,"3":2}\'; '
                                     "default: the model's own (tileseg models --json), else class ids as stored"),
    click.option("--score-threshold", type=float, help="instance models: minimum score"),
    click.option("--json", "as_json", is_flag=True, help="machine-readable output"),
]


def job_options(f: Any) -> Any:
    for opt in reversed(_job_options):
        f = opt(f)
    return f


def _submit(inputs, pipeline, truth, truth_map, score_threshold) -> uuid.UUID:  # noqa: ANN001
    from worker.submit import QueueUnavailable, UnknownPipeline, submit_job

    ensure_schema()
    try:
        return submit_job(_parse_inputs(inputs, truth), pipeline, _options(score_threshold, truth_map))
    except (UnknownPipeline, QueueUnavailable) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@job_options
def submit(inputs, pipeline, truth, truth_map, score_threshold, as_json) -> None:  # noqa: ANN001
    """Submit INPUTS (files, folders, globs or URLs) as one job; prints the job ID."""
    job_id = _submit(inputs, pipeline, truth, truth_map, score_threshold)
    if as_json:
        _echo_json(_status_json(job_id))
    else:
        click.echo(str(job_id))


def _status_json(job_id: uuid.UUID) -> dict[str, Any]:
    from api.schemas import JobDetail
    from core import jobs
    from core.db import session_scope

    with session_scope() as session:
        job = jobs.get_job(session, job_id)
        if job is None:
            raise click.ClickException(f"job {job_id} not found")
        return JobDetail.of(job).model_dump(mode="json")


def _results_json(job_id: uuid.UUID) -> dict[str, Any]:
    from api.schemas import ItemOut, MetricOut
    from core import jobs
    from core.db import session_scope

    out = _status_json(job_id)
    with session_scope() as session:
        items, _ = jobs.list_items(session, job_id, limit=1_000_000)
        job_rows = jobs.job_metrics(session, job_id)
        out["classes"] = [MetricOut.of(m).model_dump() for m in job_rows]
        out["scores"] = jobs.score_summaries(job_rows)
        out["items"] = []
        for it in items:
            d = ItemOut.of(it).model_dump(mode="json")
            # The CLI reads the store directly, so give artifact locations rather than API URLs.
            d["artifacts"] = {k: v["uri"] for k, v in (it.artifacts or {}).items()}
            rows = jobs.job_metrics(session, job_id, it.id)
            d["metrics"] = [MetricOut.of(m).model_dump() for m in rows]
            d["scores"] = jobs.score_summaries(rows)
            d["instances"] = len(jobs.item_instances(session, it.id))
            out["items"].append(d)
    return out


def _job_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a job ID") from exc


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def status(job_id: str, as_json: bool) -> None:
    """Show a job's status and progress."""
    d = _status_json(_job_id(job_id))
    if as_json:
        _echo_json(d)
        return
    click.echo(f"job {d['id']}  {d['status']}  {d['items_done']}/{d['items_total']} items "
               f"({d['items_failed']} failed)  pipeline={d['pipeline']}")
    if d["error"]:
        click.echo(f"error: {d['error']}")


def _print_results(d: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[bold]job {d['id']}[/bold]  status [bold]{d['status']}[/bold]  "
              f"{d['items_total'] - d['items_failed']}/{d['items_total']} items ok, {d['items_failed']} failed")
    if d.get("error"):
        con.print(f"[red]{d['error']}[/red]")
    if d["classes"]:
        t = Table(title="per-class figures (whole job, per model)")
        for col in ("model", "class", "pixels", "fraction", "mean conf", "area", "instances", "mean score", "Dice",
                    "IoU"):
            t.add_column(col, justify="left" if col in ("model", "class") else "right")

        def f(v: Any, fmt: str = "{:.3f}") -> str:
            return "-" if v is None else fmt.format(v)

        for c in d["classes"]:
            area = "-" if c["area"] is None else f"{c['area']:.6g} {c['area_unit'] or ''}"
            t.add_row(c.get("model") or "-", c["class_name"], f"{c['pixel_count']:,}", f(c["fraction"]),
                      f(c["mean_confidence"]), area, f(c["instance_count"], "{}"), f(c["mean_score"]),
                      f(c["dice"]), f(c["iou"]))
        con.print(t)
    for sc in d.get("scores", []):
        acc, iou, dice = ("-" if sc[k] is None else f"{sc[k]:.4f}" for k in ("pixel_accuracy", "mean_iou", "mean_dice"))
        # One line, never wrapped, so scripts and people can grep it.
        click.echo(f"against the ground truth ({sc['model']}, {sc['scored_pixels']:,} scored pixels): "
                   f"pixel accuracy {acc}, mean IoU {iou}, mean Dice {dice}")
    t = Table(title="items")
    for col in ("#", "input", "model", "status", "top classes / error"):
        t.add_column(col, overflow="fold")
    for it in d["items"]:
        name = Path(it["source"]).name + (f" [{it['key']}]" if it["key"] else "")
        if it["error"]:
            detail = it["error"]
        else:
            top = sorted(it.get("metrics", []), key=lambda m: -(m["instance_count"] or m["pixel_count"] or 0))[:3]
            detail = ", ".join(
                f"{m['class_name']} {m['instance_count']}x" if m["instance_count"] is not None
                else f"{m['class_name']} {100 * (m['fraction'] or 0):.1f}%" for m in top)
            for sc in it.get("scores") or []:
                if sc["pixel_accuracy"] is not None:
                    detail += f"; vs truth: acc {sc['pixel_accuracy']:.3f}, mIoU {sc['mean_iou']:.3f}"
            if it["meta"].get("truth_unscored"):
                detail += "; truth not scored (see warnings)"
        t.add_row(str(it["seq"]), name, str(it["meta"].get("model", "-")), it["status"], detail)
    con.print(t)
    _print_warnings(d["items"])
    # Full paths, one per line and never wrapped or cut, so they can be copied.
    click.echo("outputs:")
    for it in d["items"]:
        if not it["artifacts"]:
            continue
        name = Path(it["source"]).name + (f" [{it['key']}]" if it["key"] else "")
        click.echo(f"  {it['seq']} {name}")
        for kind, uri in sorted(it["artifacts"].items()):
            click.echo(f"      {kind:<18} {uri}")


def _print_warnings(items: list[dict[str, Any]]) -> None:
    """Each distinct item warning once, with the items it concerns (a series repeats one per slice)."""
    by_text: dict[str, list[str]] = {}
    for it in items:
        name = f"{it['seq']} " + Path(it["source"]).name + (f" [{it['key']}]" if it["key"] else "")
        for w in it["meta"].get("warnings") or []:
            by_text.setdefault(w, []).append(name)
    if not by_text:
        return
    click.echo("warnings:")
    for text, names in by_text.items():
        where = names[0] if len(names) == 1 else f"{len(names)} items, {names[0]} ... {names[-1]}"
        click.echo(f"  {where}: {text}")


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
def results(job_id: str, as_json: bool) -> None:
    """Per-class figures and per-item outputs of a job."""
    d = _results_json(_job_id(job_id))
    _echo_json(d) if as_json else _print_results(d)


@main.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job (finished results are kept)."""
    from core import jobs
    from core.db import session_scope

    with session_scope() as session:
        job = jobs.cancel_job(session, _job_id(job_id))
        if job is None:
            raise click.ClickException(f"job {job_id} not found")
        click.echo(f"job {job_id}: {job.status}")


def _spawn_worker(job_id: uuid.UUID) -> subprocess.Popen:
    """A local worker for `run` in embedded mode: same tasks, same queue, separate process (so TensorFlow
    never loads in this process). Its log goes to the data directory, keeping stdout for results.

    One prefork child rather than the solo pool: the parent survives an item that kills the process working
    on it (a decoder's segfault, the OOM killer), so the item is restarted and failed as on shared workers
    instead of ending the run, and the task time limit applies (the solo pool cannot enforce it)."""
    logs = get_settings().data_path / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / f"worker-{job_id}.log", "ab")  # noqa: SIM115 - handed to the child process
    cmd = [sys.executable, "-m", "core.cli", "worker", "--pool", "prefork", "--concurrency", "1",
           "--loglevel", "WARNING"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)


@main.command()
@job_options
@click.option("--local-worker/--no-local-worker", default=None,
              help="start a worker for this run (default: yes in embedded mode, no with a broker URL)")
@click.option("--timeout", type=float, default=None, help="give up waiting after this many seconds")
def run(inputs, pipeline, truth, truth_map, score_threshold, as_json, local_worker, timeout) -> None:  # noqa: ANN001
    """Submit INPUTS and wait for the job with a progress bar, then print the results."""
    s = get_settings()
    job_id = _submit(inputs, pipeline, truth, truth_map, score_threshold)
    if not as_json:
        click.echo(f"job {job_id} submitted", err=True)
    worker = _spawn_worker(job_id) if (local_worker if local_worker is not None else s.embedded_queue) else None
    try:
        d = _wait(job_id, show=not as_json, timeout=timeout, worker=worker)
    except KeyboardInterrupt:
        _interrupted(job_id, local=worker is not None)
        sys.exit(130)
    finally:
        if worker is not None:
            _stop_worker(worker)
    full = _results_json(job_id)
    _echo_json(full) if as_json else _print_results(full)
    if d["status"] not in ("succeeded", "partial"):
        sys.exit(1)


def _interrupted(job_id: uuid.UUID, local: bool) -> None:
    """Ctrl-C during `run`. With this run's own worker nobody else would finish the job, so it is cancelled
    (finished items and their results are kept); with shared workers it goes on without us."""
    if not local:
        click.echo(f"\nstopped waiting; job {job_id} goes on on the workers (tileseg status {job_id}, "
                   f"tileseg cancel {job_id})", err=True)
        return
    from core import jobs
    from core.db import session_scope

    with session_scope() as session:
        before = jobs.get_job(session, job_id)
        done, total = before.items_done, before.items_total
        jobs.cancel_job(session, job_id)
    click.echo(f"\ninterrupted: job {job_id} cancelled with {done} of {total} items done; they keep their "
               f"results (tileseg results {job_id}). Stopping the local worker: it finishes the item at hand "
               "(Ctrl-C again to kill it now).", err=True)


def _stop_worker(worker: subprocess.Popen) -> None:
    """SIGTERM to the worker's main process (Celery's warm shutdown: its child finishes the task at hand),
    SIGKILL to its whole process group after 30 s or a second Ctrl-C. The worker runs in its own session, so
    it must never be left behind."""
    try:
        os.kill(worker.pid, signal.SIGTERM)
        worker.wait(30)
        os.killpg(worker.pid, signal.SIGKILL)  # a pool child the main process left behind, if any
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
    except ProcessLookupError:
        pass


def _wait(job_id: uuid.UUID, show: bool, timeout: float | None, worker: subprocess.Popen | None) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    t0 = time.monotonic()
    terminal = {"succeeded", "failed", "partial", "cancelled"}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not show, transient=False) as bar:
        task = bar.add_task("planning", total=None)
        while True:
            d = _status_json(job_id)
            if d["items_total"]:
                bar.update(task, total=d["items_total"], completed=d["items_done"],
                           description=f"{d['status']} ({d['items_failed']} failed)")
            if d["status"] in terminal and (d["finished_at"] or d["status"] == "cancelled"):
                return d
            if worker is not None and worker.poll() is not None:
                log = get_settings().data_path / "logs" / f"worker-{job_id}.log"
                raise click.ClickException(f"the local worker exited with code {worker.returncode} (its log: "
                                           f"{log}); job {job_id} stays {d['status']}: `tileseg worker` "
                                           f"finishes it, `tileseg cancel {job_id}` drops it")
            if timeout and time.monotonic() - t0 > timeout:
                raise click.ClickException(f"job {job_id} not finished after {timeout:.0f} s (still {d['status']})")
            time.sleep(0.5)


# Processes ------------------------------------------------------------------------------------------------
@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--concurrency", "-c", type=int, default=None, help="worker processes (default from settings)")
@click.option("--pool", default="prefork", show_default=True, help="prefork (recycles children) or solo")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(concurrency: int | None, pool: str, loglevel: str, celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker (any number, on any machine sharing the broker, database and store)."""
    # GDAL's block cache defaults to 5 % of RAM per process, which dominates a streaming worker's memory.
    os.environ.setdefault("GDAL_CACHEMAX", "256")
    ensure_schema()
    from worker.app import app

    s = get_settings()
    if s.worker_nice and hasattr(os, "nice"):
        os.nice(s.worker_nice)  # inherited by the prefork children
    argv = ["worker", f"--pool={pool}", f"--loglevel={loglevel}", "-Q", "tileseg",
            f"--concurrency={concurrency or s.worker_concurrency}", "--without-gossip", "--without-mingle",
            *celery_args]
    app.worker_main(argv)


@main.command()
@click.option("--host", default=None, help="bind address (default from settings)")
@click.option("--port", type=int, default=None)
@click.option("--workers", type=int, default=1, show_default=True, help="server processes")
def api(host: str | None, port: int | None, workers: int) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs)."""
    import uvicorn

    ensure_schema()
    s = get_settings()
    # No access log: at hundreds of polls a second, formatting it costs more CPU than answering.
    uvicorn.run("api.app:app", host=host or s.api_host, port=port or s.api_port, log_level="warning",
                access_log=False, workers=workers)


def _register_optional() -> None:
    """Commands that live in their own modules: training/evaluation, schedules and beat."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("core.cli_train") is not None:
        mod = importlib.import_module("core.cli_train")
        main.add_command(mod.train)
        main.add_command(mod.eval_command, "eval")
        if importlib.util.find_spec("core.cli_domains") is not None:
            dom = importlib.import_module("core.cli_domains")
            for cmd in (dom.buildings_command, dom.ct_organs_command):
                mod.train.add_command(cmd)
            mod.train.add_command(dom.export_command, "export-domain")
            mod.train.add_command(dom.card_command, "card")
        if importlib.util.find_spec("core.cli_maskrcnn") is not None:
            mr = importlib.import_module("core.cli_maskrcnn")
            mod.train.add_command(mr.maskrcnn, "maskrcnn")
    if importlib.util.find_spec("core.cli_schedules") is not None:
        mod = importlib.import_module("core.cli_schedules")
        for cmd in mod.COMMANDS:
            main.add_command(cmd)


_register_optional()

if __name__ == "__main__":
    main()
