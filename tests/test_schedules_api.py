"""Schedules through the HTTP API and the CLI (in-process, embedded stack, no worker)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient


@pytest.fixture
def clients(tiny_models: Path) -> tuple[TestClient, TestClient]:
    from core.db import session_scope, upgrade

    upgrade()
    from api.app import app
    from core.tokens import create_token

    with session_scope() as s:
        _, alice = create_token(s, "alice")
        _, bob = create_token(s, "bob")
    return (
        TestClient(app, headers={"Authorization": f"Bearer {alice}"}),
        TestClient(app, headers={"Authorization": f"Bearer {bob}"}),
    )


def test_schedule_crud_trigger_and_runs(clients: tuple[TestClient, TestClient], photo_dir: Path) -> None:
    alice, bob = clients
    r = alice.post(
        "/schedules",
        json={
            "name": "nightly",
            "cron": "0 2 * * *",
            "timezone": "Europe/Berlin",
            "location": str(photo_dir),
            "pipeline": "tiny-photo",
            "settle_seconds": 0,
        },
    )
    assert r.status_code == 201, r.text
    s = r.json()
    assert r.headers["location"] == f"/schedules/{s['id']}"
    assert (s["owner"], s["enabled"], s["location"]) == ("alice", True, str(photo_dir.resolve()))
    assert s["next_run_at"].endswith(("00:00Z", "+00:00")) and s["next_run_at"][11:13] in ("00", "01")

    assert [x["id"] for x in alice.get("/schedules").json()] == [s["id"]]
    assert bob.get("/schedules").json() == []
    for method, path in (
        ("get", ""),
        ("post", "/pause"),
        ("post", "/trigger"),
        ("get", "/runs"),
        ("delete", ""),
        ("patch", ""),
    ):
        kw = {"json": {"cron": "0 3 * * *"}} if method == "patch" else {}
        assert getattr(bob, method)(f"/schedules/{s['id']}{path}", **kw).status_code == 404

    run = alice.post(f"/schedules/{s['id']}/trigger")
    assert run.status_code == 201, run.text
    run = run.json()
    assert (run["outcome"], run["new_files"], run["job_status"]) == ("submitted", 3, "queued")
    job = alice.get(f"/jobs/{run['job_id']}").json()  # an ordinary job of the schedule's owner
    assert job["owner"] == "alice" and job["pipeline"] == "tiny-photo" and len(job["inputs"]) == 3
    assert alice.post(f"/schedules/{s['id']}/trigger").json()["outcome"] == "nothing_new"
    runs = alice.get(f"/schedules/{s['id']}/runs").json()
    assert runs["total"] == 2 and [x["outcome"] for x in runs["runs"]] == ["nothing_new", "submitted"]
    assert runs["runs"][1]["job_id"] == run["job_id"]

    assert alice.post(f"/schedules/{s['id']}/pause").json()["next_run_at"] is None
    assert alice.post(f"/schedules/{s['id']}/resume").json()["enabled"] is True
    changed = alice.patch(f"/schedules/{s['id']}", json={"cron": "30 4 * * 1", "timezone": "UTC"})
    assert changed.status_code == 200 and changed.json()["cron"] == "30 4 * * 1"
    assert alice.delete(f"/schedules/{s['id']}").status_code == 204
    assert alice.get(f"/schedules/{s['id']}").status_code == 404
    assert alice.get(f"/jobs/{run['job_id']}").status_code == 200  # its jobs stay


@pytest.mark.parametrize(
    ("change", "status", "fragment"),
    [
        ({"cron": "61 * * * *"}, 422, "cron"),
        ({"cron": "every night"}, 422, "cron"),
        ({"timezone": "Mars/Olympus"}, 422, "IANA time zone"),
        ({"location": "/etc"}, 422, "outside the allowed input roots"),
        ({"location": "../../etc"}, 422, "outside the allowed input roots"),
        ({"pipeline": "nope"}, 422, "unknown pipeline"),
        ({"settle_seconds": -1}, 422, "settle_seconds"),
        ({"options": {"colour": "red"}}, 422, "colour"),
        ({"name": "taken"}, 409, "already exists"),
    ],
)
def test_bad_schedules_are_readable_errors(
    clients: tuple[TestClient, TestClient], photo_dir: Path, change: dict, status: int, fragment: str
) -> None:
    alice, _ = clients
    base = {"name": "ok", "cron": "0 2 * * *", "location": str(photo_dir)}
    assert alice.post("/schedules", json={**base, "name": "taken"}).status_code == 201
    r = alice.post("/schedules", json={**base, **change})
    assert r.status_code == status, r.text
    assert fragment in r.json()["detail"]


def test_cli_schedule_commands(tiny_models: Path, photo_dir: Path) -> None:
    from core.cli import main

    cli = CliRunner()

    def run(*args: str) -> str:
        res = cli.invoke(main, list(args), catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    sid = run(
        "schedule",
        "create",
        "photos",
        str(photo_dir),
        "--cron",
        "0 2 * * *",
        "--tz",
        "Europe/Berlin",
        "--settle",
        "0",
        "--owner",
        "alice",
    ).strip()
    listed = json.loads(run("schedule", "list", "--json"))
    assert [(x["id"], x["timezone"], x["owner"]) for x in listed] == [(sid, "Europe/Berlin", "alice")]
    out = json.loads(run("schedule", "trigger", "photos", "--json"))
    assert (out["outcome"], out["new_files"]) == ("submitted", 3)
    assert "nothing_new" in run("schedule", "trigger", sid)
    runs = json.loads(run("schedule", "runs", "photos", "--json"))
    assert runs["total"] == 2 and runs["runs"][1]["job_status"] == "queued"
    assert "paused" in run("schedule", "pause", "photos")
    assert "enabled" in run("schedule", "resume", sid)
    bad = cli.invoke(main, ["schedule", "create", "x", str(photo_dir), "--cron", "* *"])
    assert bad.exit_code != 0 and "2 fields" in bad.output
    assert "deleted photos" in run("schedule", "delete", "photos")
    missing = cli.invoke(main, ["schedule", "runs", "photos"])
    assert missing.exit_code != 0 and "no schedule 'photos'" in missing.output
