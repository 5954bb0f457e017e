"""HTTP API contract: validation, 404s, pagination, health — in-process against the embedded stack."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def client(tiny_models: Path) -> TestClient:
    from core.db import upgrade

    upgrade()
    from api.app import app
    from core.db import session_scope
    from core.tokens import create_token

    with session_scope() as s:
        _, token = create_token(s, "alice")
    return TestClient(app, headers={"Authorization": f"Bearer {token}"})


def test_health_ok(client: TestClient) -> None:
    r = TestClient(client.app).get("/health")  # no token needed
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "database": "ok", "broker": "ok"}


def test_submit_and_query(client: TestClient, photo_dir: Path) -> None:
    r = client.post("/jobs", json={"inputs": [str(photo_dir)], "pipeline": "tiny-photo"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued" and job["pipeline"] == "tiny-photo"
    got = client.get(f"/jobs/{job['id']}").json()
    assert got["inputs"] == [{"path": str(photo_dir.resolve()), "truth": None}]
    # No worker runs in this test: the job waits in the queue, and its (empty) results are queryable.
    assert client.get(f"/jobs/{job['id']}/items").json()["total"] == 0
    assert client.get(f"/jobs/{job['id']}/metrics").json()["classes"] == []


def test_list_filters_and_pagination(client: TestClient, photo_dir: Path) -> None:
    ids = [client.post("/jobs", json={"inputs": [str(photo_dir)]}).json()["id"] for _ in range(5)]
    page = client.get("/jobs", params={"limit": 2, "offset": 0}).json()
    assert page["total"] == 5 and len(page["jobs"]) == 2
    assert page["jobs"][0]["id"] == ids[-1]  # newest first
    rest = client.get("/jobs", params={"limit": 10, "offset": 2}).json()["jobs"]
    assert [j["id"] for j in page["jobs"] + rest] == ids[::-1]
    assert client.get("/jobs", params={"status": "succeeded"}).json()["total"] == 0
    assert client.get("/jobs", params={"status": "queued"}).json()["total"] == 5
    assert client.get("/jobs", params={"since": "2999-01-01T00:00:00Z"}).json()["total"] == 0
    r = client.get("/jobs", params={"status": "bogus"})
    assert r.status_code == 422 and "status" in r.json()["detail"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"inputs": ["x.png"], "pipeline": "no-such-model"}, "unknown pipeline"),
        ({"inputs": []}, "inputs"),
        ({"pipeline": "auto"}, "inputs"),
        ({"inputs": ["x.png"], "options": {"score_threshold": 3}}, "score_threshold"),
        ({"inputs": ["x.png"], "options": {"colour": "red"}}, "colour"),
        ({"inputs": ["/etc/passwd"]}, "outside the allowed input roots"),
        ({"inputs": ["../../etc/passwd"]}, "outside the allowed input roots"),
        # A truth map is checked at submission; a bad entry used to fail every scored item in the worker.
        ({"inputs": ["x.png"], "options": {"truth_map": {"pet": 0}}}, "truth_map"),
        ({"inputs": ["x.png"], "options": {"truth_map": {"1": 300}}}, "truth_map"),
        ({"inputs": ["x.png"], "options": {"truth_map": {"1": True}}}, "truth_map"),
        ({"inputs": [""]}, "inputs"),
    ],
)
def test_submit_validation(client: TestClient, body: dict, fragment: str) -> None:
    r = client.post("/jobs", json=body)
    assert r.status_code == 422, r.text
    assert fragment in r.json()["detail"]


def test_malformed_json_is_422(client: TestClient) -> None:
    r = client.post("/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_hostile_numbers_are_422_not_500(client: TestClient, photo_dir: Path) -> None:
    """Found by schemathesis against the OpenAPI document: an offset past 64 bits reached SQLite, and a
    non-finite number in multipart options made the 422 itself fail to render; both were 500s."""
    for url in ("/jobs?offset=2105633519191716528128", f"/jobs/{uuid.uuid4()}/items?offset=3289009407216413835264",
                f"/schedules/{uuid.uuid4()}/runs?offset=99999999999999999999"):
        r = client.get(url)
        assert r.status_code == 422 and "offset" in r.json()["detail"], (url, r.text)
    f = sorted(photo_dir.iterdir())[0]
    for options in ("-Infinity", "NaN", '{"score_threshold": Infinity}'):
        r = client.post("/jobs", files=[("files", (f.name, f.read_bytes(), "image/jpeg"))], data={"options": options})
        assert r.status_code == 422, (options, r.text)
        assert "options" in r.json()["detail"]


def test_times_carry_their_utc_offset_and_since_honours_one(client: TestClient, photo_dir: Path) -> None:
    """Times are RFC 3339 with the offset (embedded mode sent naive times, which strict clients reject and
    browsers read as local time); a `since` given in another zone means that instant."""
    from datetime import datetime, timedelta, timezone

    job = client.post("/jobs", json={"inputs": [str(photo_dir)]}).json()
    created = datetime.fromisoformat(job["created_at"])
    assert created.utcoffset() == timedelta(0)
    listed = client.get("/jobs").json()["jobs"]
    assert all(datetime.fromisoformat(j["created_at"]).utcoffset() == timedelta(0) for j in listed)
    plus2 = timezone(timedelta(hours=2))
    for delta, present in ((-60, True), (60, False)):
        since = (created + timedelta(seconds=delta)).astimezone(plus2).isoformat()
        ids = [j["id"] for j in client.get("/jobs", params={"since": since}).json()["jobs"]]
        assert (job["id"] in ids) is present, (since, ids)


def test_unknown_ids_are_404(client: TestClient) -> None:
    jid, iid = uuid.uuid4(), uuid.uuid4()
    for method, url in [("get", f"/jobs/{jid}"), ("get", f"/jobs/{jid}/items"), ("get", f"/jobs/{jid}/metrics"),
                        ("get", f"/jobs/{jid}/items/{iid}"), ("get", f"/jobs/{jid}/items/{iid}/artifacts/overlay"),
                        ("post", f"/jobs/{jid}/cancel")]:
        r = getattr(client, method)(url)
        assert r.status_code == 404, (url, r.status_code)
    assert client.get("/jobs/not-a-uuid").status_code == 422


def test_upload_size_limit(client: TestClient, monkeypatch: pytest.MonkeyPatch, photo_dir: Path) -> None:
    from tests.conftest import reset_all

    monkeypatch.setenv("TILESEG_MAX_UPLOAD_BYTES", "1000")
    reset_all()
    f = next(photo_dir.glob("*.jpg"))
    r = client.post("/jobs", files=[("files", (f.name, f.read_bytes(), "image/jpeg"))])
    assert r.status_code == 413


def test_upload_names_are_not_trusted(client: TestClient, photo_dir: Path, ts_env: dict[str, str]) -> None:
    f = next(photo_dir.glob("*.jpg"))
    r = client.post("/jobs", files=[("files", ("../../../evil name.jpg", f.read_bytes(), "image/jpeg"))],
                    data={"pipeline": "tiny-photo"})
    assert r.status_code == 202, r.text
    job = client.get(f"/jobs/{r.json()['id']}").json()
    stored = Path(job["inputs"][0]["path"])
    uploads = Path(ts_env["TILESEG_DATA_DIR"]).resolve() / "artifacts" / "uploads"
    assert stored.resolve().is_relative_to(uploads)
    assert ".." not in stored.name and " " not in stored.name
    assert stored.read_bytes() == f.read_bytes()


def test_models_and_openapi(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/models").json()}
    assert {"tiny-photo", "tiny-geo", "tiny-ct"} <= models.keys()
    assert models["unet-pets"]["truth_map"]["values"] == {"1": 0, "2": 1, "3": 2}  # how it reads trimaps
    assert models["tiny-photo"]["truth_map"] is None
    spec = client.get("/openapi.json").json()
    assert "/jobs/{job_id}/items/{item_id}/artifacts/{kind}" in spec["paths"]
    # Every $ref resolves inside the document: client generators and schemathesis stop at one that does not
    # (POST /jobs pointed at a "#/$defs/InputIn" that only existed inside its own body schema).
    refs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            refs.extend([node["$ref"]] if isinstance(node.get("$ref"), str) else [])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in spec["components"]["schemas"], ref
    body = spec["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobIn"}
    assert {"InputIn", "JobOptions"} <= spec["components"]["schemas"].keys()
    # 422s are documented as they are sent: a readable `detail` sentence plus the structured `errors`.
    problem = spec["components"]["schemas"]["HTTPValidationError"]["properties"]
    assert problem["detail"]["type"] == "string" and problem["errors"]["type"] == "array"
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert "422" in codes and ("401" in codes) == (path != "/health" and not path.startswith("/ui"))
            assert ("404" in codes) == ("{" in path), (method, path, codes)
    r = client.get("/jobs?limit=0")
    assert r.status_code == 422 and isinstance(r.json()["detail"], str) and isinstance(r.json()["errors"], list)


def test_access_control(client: TestClient, photo_dir: Path) -> None:
    """401 without or with a bad token on every route but /health; others' jobs are 404; admins see all."""
    from core.db import session_scope
    from core.tokens import create_token, revoke_token

    job_id = client.post("/jobs", json={"inputs": [str(photo_dir)]}).json()["id"]
    item = uuid.uuid4()
    routes = [("get", "/jobs"), ("post", "/jobs"), ("get", f"/jobs/{job_id}"), ("get", f"/jobs/{job_id}/items"),
              ("get", f"/jobs/{job_id}/items/{item}"), ("get", f"/jobs/{job_id}/metrics"),
              ("get", f"/jobs/{job_id}/items/{item}/artifacts/overlay"), ("post", f"/jobs/{job_id}/cancel"),
              ("get", "/models")]
    anon = TestClient(client.app)
    for method, url in routes:
        assert getattr(anon, method)(url).status_code == 401, url
        r = getattr(anon, method)(url, headers={"Authorization": "Bearer tsk_wrong"})
        assert r.status_code == 401, url
    with session_scope() as s:
        bob_row, bob = create_token(s, "bob")
        _, admin = create_token(s, "root", admin=True)
    as_bob = TestClient(client.app, headers={"Authorization": f"Bearer {bob}"})
    for method, url in routes[2:-1]:
        assert getattr(as_bob, method)(url).status_code == 404, url
    assert as_bob.get("/jobs").json()["total"] == 0
    as_admin = TestClient(client.app, headers={"Authorization": f"Bearer {admin}"})
    assert as_admin.get(f"/jobs/{job_id}").json()["owner"] == "alice"
    assert as_admin.get("/jobs").json()["total"] == 1
    with session_scope() as s:
        assert revoke_token(s, bob_row.id)
    # Verified tokens are trusted for a few seconds (api.auth.TOKEN_CACHE_SECONDS); after that, revoked.
    from api.auth import clear_token_cache

    clear_token_cache()
    assert as_bob.get("/jobs").status_code == 401


def test_method_not_allowed_names_every_method_of_the_path(client: TestClient) -> None:
    """Starlette answered from the first route of the path: `OPTIONS /jobs` said `Allow: POST` (schemathesis)."""
    for url, allow in (("/jobs", "GET, POST"), (f"/schedules/{uuid.uuid4()}", "DELETE, GET, PATCH"),
                       (f"/jobs/{uuid.uuid4()}/cancel", "POST")):
        r = client.options(url)
        assert r.status_code == 405 and r.headers["allow"] == allow, (url, r.headers)
    assert client.delete("/jobs").headers["allow"] == "GET, POST"


def test_status_filters_are_checked_and_an_empty_form_pipeline_is_auto(client: TestClient, photo_dir: Path) -> None:
    f = sorted(photo_dir.iterdir())[0]
    r = client.post("/jobs", files=[("files", (f.name, f.read_bytes(), "image/jpeg"))],
                    data={"pipeline": "", "options": ""})  # what an HTML form sends for untouched fields
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["pipeline"] == "auto"
    # A misspelt item status used to answer an empty list, which reads as "no failures".
    r = client.get(f"/jobs/{job['id']}/items", params={"status": "failure"})
    assert r.status_code == 422 and "status" in r.json()["detail"]
    assert client.get(f"/jobs/{job['id']}/items", params={"status": "failed"}).json()["total"] == 0
    spec = client.get("/openapi.json").json()
    params = {p["name"]: p for p in spec["paths"]["/jobs/{job_id}/items"]["get"]["parameters"]}
    assert "ItemStatus" in str(params["status"]["schema"])  # the allowed values are in the schema
    assert "pending" in spec["components"]["schemas"]["ItemStatus"]["enum"]


def test_truth_map_is_stored_with_the_job(client: TestClient, photo_dir: Path) -> None:
    body = {"inputs": [str(photo_dir)], "options": {"truth_map": {"1": 0, "2": 1, "3": 255}}}
    r = client.post("/jobs", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["options"]["truth_map"] == {"1": 0, "2": 1, "3": 255}


def test_uploads_carry_their_truth_by_file_stem(client: TestClient, photo_dir: Path) -> None:
    import io

    import numpy as np
    from PIL import Image

    photos = sorted(photo_dir.iterdir())[:2]
    buf = io.BytesIO()
    Image.fromarray(np.ones((4, 4), np.uint8)).save(buf, format="PNG")
    label = buf.getvalue()
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    r = client.post("/jobs", files=[*files, ("truth", (f"{photos[1].stem}.png", label, "image/png"))])
    assert r.status_code == 202, r.text
    inputs = client.get(f"/jobs/{r.json()['id']}").json()["inputs"]
    assert len(inputs) == 2 and inputs[0]["truth"] is None
    assert inputs[1]["truth"].endswith(f"{photos[1].stem}.png") and inputs[1]["truth"] != inputs[1]["path"]
    # One photo, one truth: paired whatever the names; a truth that names no upload is refused, not dropped.
    r = client.post("/jobs", files=[files[0], ("truth", ("mask.png", label, "image/png"))])
    assert r.status_code == 202 and client.get(f"/jobs/{r.json()['id']}").json()["inputs"][0]["truth"]
    r = client.post("/jobs", files=[*files, ("truth", ("nothing.png", label, "image/png"))])
    assert r.status_code == 422 and "nothing match no uploaded file" in r.json()["detail"]
    # A truth sent as text, or a misnamed field, is refused rather than ignored (schemathesis).
    for data in ({"truth": "{}"}, {"pipline": "unet-pets"}):
        r = client.post("/jobs", files=files, data=data)
        assert r.status_code == 422 and next(iter(data)) in r.json()["detail"], r.text
