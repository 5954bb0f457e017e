"""The web pages (/ui) in-process: login/logout, redirects, access control, every page, escaping, images,
submission through the API's own code. Jobs are written straight into the database (no worker, no TF)."""

from __future__ import annotations

import io
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

HOSTILE = '<img src=x onerror="alert(1)">'


@dataclass
class World:
    alice: str
    bob: str
    admin: str
    job_id: uuid.UUID
    ok_item: uuid.UUID
    bad_item: uuid.UUID
    photo: Path


def _palette_mask(classes: np.ndarray, colours: list[tuple[int, int, int]], path: Path) -> None:
    im = Image.fromarray(classes.astype(np.uint8), mode="P")
    pal = [0] * 768
    for i, c in enumerate(colours):
        pal[3 * i:3 * i + 3] = c
    im.putpalette(pal)
    im.save(path)


@pytest.fixture
def model_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ts_env: dict[str, str]) -> Path:
    """Registered specs like ``tiny_models``' (names, classes, colours) without weights: the pages only read
    specs, and building Keras models would cost seconds per test."""
    from tests.conftest import reset_all

    models = tmp_path / "models"
    for name, kind in (("tiny-photo", "photo"), ("tiny-geo", "geotiff"), ("tiny-ct", "dicom")):
        (models / name).mkdir(parents=True)
        spec = {"name": name, "kind": "semantic", "source": "model.keras", "source_format": "keras",
                "classes": [{"id": i, "name": n, "color": [40 * i, 200 - 40 * i, 90]}
                            for i, n in enumerate(["background", "thing", "other"])],
                "background_class": 0, "input_size": 32, "overlap": 4, "mode": "resize",
                "default_for": [kind]}
        (models / name / "spec.json").write_text(json.dumps(spec))
    monkeypatch.setenv("TILESEG_MODEL_DIRS", str(models))
    reset_all()
    return models


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file per module, copied into each test's data dir (migrating costs ~1 s)."""
    from core.db import upgrade

    path = tmp_path_factory.mktemp("schema") / "tileseg.sqlite"
    upgrade(url=f"sqlite:///{path}")
    return path


@pytest.fixture
def world(model_specs: Path, migrated_db: Path, tmp_path: Path) -> World:
    """Alice's finished job: one succeeded photo item (real source file, mask and overlay in the store,
    per-item and job metrics) and one failed item whose source name and error are hostile HTML; tokens for
    alice, bob and an admin."""
    import shutil

    from core.db import session_scope
    from core.models import ClassMetric, Item, Job, JobStatus, utcnow
    from core.settings import get_settings
    from core.store import ArtifactStore
    from core.tokens import create_token

    get_settings().ensure_dirs()
    shutil.copyfile(migrated_db, get_settings().data_path / "tileseg.sqlite")
    rng = np.random.default_rng(0)
    photo = tmp_path / "cat.png"
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(photo)
    classes = np.zeros((30, 40), np.uint8)
    classes[5:20, 10:30] = 1
    classes[25:, :] = 2
    mask = tmp_path / "cat_mask.png"
    _palette_mask(classes, [(0, 0, 0), (200, 160, 90), (80, 120, 90)], mask)
    overlay = tmp_path / "cat_overlay.png"
    Image.fromarray(np.full((30, 40, 3), 77, np.uint8)).save(overlay)
    store = ArtifactStore(get_settings().artifacts)
    job_id, ok_id, bad_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    arts = {"mask_png": store.put(mask, f"jobs/{job_id}/{ok_id}/cat_mask.png", "image/png").to_json(),
            "overlay": store.put(overlay, f"jobs/{job_id}/{ok_id}/cat_overlay.png", "image/png").to_json()}
    with session_scope() as s:
        _, alice = create_token(s, "alice")
        _, bob = create_token(s, "bob")
        _, admin = create_token(s, "root", admin=True)
        now = utcnow()
        s.add(Job(id=job_id, owner="alice", pipeline="tiny-photo", options={},
                  inputs=[{"path": str(tmp_path)}], status=JobStatus.partial, items_total=2, items_done=2,
                  items_failed=1, planned=True, created_at=now, started_at=now, finished_at=now))
        s.flush()
        s.add(Item(id=ok_id, job_id=job_id, seq=0, source=str(photo), key="", format="photo",
                   status="succeeded", artifacts=arts, finished_at=now,
                   meta={"height": 30, "width": 40, "bands": 3, "dtype": "uint8", "modality": "photo",
                         "model": "tiny-photo", "warnings": []}))
        s.add(Item(id=bad_id, job_id=job_id, seq=1, source=str(tmp_path / f"{HOSTILE}.jpg"), key="",
                   format=None, status="failed", error=f"{HOSTILE}.jpg: not a recognised image", meta={},
                   finished_at=now))
        s.flush()
        counts = np.bincount(classes.ravel(), minlength=3)
        names = ["background", "thing", HOSTILE]
        for item in (ok_id, None):
            for c in range(3):
                s.add(ClassMetric(job_id=job_id, item_id=item, class_id=c, class_name=names[c],
                                  pixel_count=int(counts[c]), fraction=float(counts[c] / counts.sum()),
                                  mean_confidence=0.5, dice=None, iou=None))
    return World(alice, bob, admin, job_id, ok_id, bad_id, photo)


def client_for(token: str | None) -> TestClient:
    from api.app import app

    c = TestClient(app, follow_redirects=False)
    if token:
        c.cookies.set("tileseg_token", token)
    return c


def login(token: str) -> TestClient:
    c = client_for(None)
    r = c.post("/ui/login", data={"token": token, "next": "/ui/jobs"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs", r.text
    return c


# Login, logout, redirects -----------------------------------------------------------------------------------
def test_login_sets_strict_httponly_cookie_and_logout_clears_it(world: World) -> None:
    c = client_for(None)
    page = c.get("/ui/login")
    assert page.status_code == 200 and 'name="token"' in page.text
    assert 'name="viewport"' in page.text
    r = c.post("/ui/login", data={"token": world.alice, "next": "/ui/jobs?status=partial"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs?status=partial"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"tileseg_token={world.alice}")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    jobs = c.get("/ui/jobs")
    assert jobs.status_code == 200 and str(world.job_id)[:8] in jobs.text and "alice" in jobs.text
    # The JSON API accepts the same cookie (the live-progress script relies on it).
    assert c.get(f"/jobs/{world.job_id}").json()["status"] == "partial"

    out = c.post("/ui/logout")
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    assert 'tileseg_token=""' in out.headers["set-cookie"] and "Max-Age=0" in out.headers["set-cookie"]
    r = c.get("/ui/jobs")
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")


def test_bad_token_is_refused(world: World) -> None:
    c = client_for(None)
    r = c.post("/ui/login", data={"token": "tsk_not-a-real-token", "next": "/ui/jobs"})
    assert r.status_code == 401 and "unknown or revoked" in r.text and "set-cookie" not in r.headers
    r = client_for("tsk_forged").get("/ui/jobs")
    assert r.status_code == 303 and "/ui/login" in r.headers["location"]


@pytest.mark.parametrize("path", ["/ui/jobs", "/ui/submit", "/ui/jobs/{job}", "/ui/jobs/{job}/items/{item}",
                                  "/ui/jobs/{job}/items/{item}/source.png"])
def test_logged_out_pages_redirect_to_login_with_next(world: World, path: str) -> None:
    path = path.format(job=world.job_id, item=world.ok_item)
    r = client_for(None).get(path, params={"page": 1} if path == "/ui/jobs" else None)
    assert r.status_code == 303
    loc = r.headers["location"]
    assert loc.startswith("/ui/login?next=")
    from urllib.parse import parse_qs, urlsplit

    nxt = parse_qs(urlsplit(loc).query)["next"][0]
    assert nxt.startswith(path)


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/ui/jobs", "/\\evil.example",
                                    "/jobs", "javascript:alert(1)"])
def test_login_never_redirects_off_site(world: World, target: str) -> None:
    r = client_for(None).post("/ui/login", data={"token": world.alice, "next": target})
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"


def test_cross_site_post_is_refused(world: World) -> None:
    c = login(world.alice)
    r = c.post("/ui/logout", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert c.post("/ui/logout", headers={"Origin": "http://testserver.evil.example"}).status_code == 403
    proxied = c.post("/ui/logout",
                     headers={"Origin": "https://tiles.example", "X-Forwarded-Host": "tiles.example"})
    assert proxied.status_code == 303
    r = c.post("/ui/logout", headers={"Origin": "http://testserver"})
    assert r.status_code == 303


def test_auth_off_needs_no_login(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import reset_all

    monkeypatch.setenv("TILESEG_AUTH", "false")
    reset_all()
    c = client_for(None)
    assert c.get("/ui/login").headers["location"] == "/ui/jobs"
    page = c.get("/ui/jobs")
    assert page.status_code == 200 and "Sign out" not in page.text


# Access control --------------------------------------------------------------------------------------------
def test_other_owners_get_404_everywhere(world: World) -> None:
    bob = login(world.bob)
    listing = bob.get("/ui/jobs")
    assert listing.status_code == 200 and str(world.job_id)[:8] not in listing.text
    j, i = world.job_id, world.ok_item
    for path in (f"/ui/jobs/{j}", f"/ui/jobs/{j}/items/{i}", f"/ui/jobs/{j}/items/{i}/source.png",
                 f"/ui/jobs/{j}/items/{i}/mask.png", f"/ui/jobs/{j}/items/{i}/overlay.png",
                 f"/jobs/{j}/items/{i}/artifacts/overlay"):
        r = bob.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert "cat" not in r.text
    assert bob.post(f"/ui/jobs/{j}/cancel").status_code == 404
    # Unknown and malformed IDs look the same as foreign ones.
    assert bob.get(f"/ui/jobs/{uuid.uuid4()}").status_code == 404
    assert bob.get("/ui/jobs/not-a-uuid").status_code == 404
    # An item of another job is not reachable through this job's URL.
    assert login(world.alice).get(f"/ui/jobs/{uuid.uuid4()}/items/{i}").status_code == 404
    # Admins see everyone's jobs.
    admin = login(world.admin)
    assert str(world.job_id)[:8] in admin.get("/ui/jobs").text
    assert admin.get(f"/ui/jobs/{j}").status_code == 200


# Pages ----------------------------------------------------------------------------------------------
def test_job_list_filter_newest_first_and_pagination(world: World) -> None:
    from core.db import session_scope
    from core.models import Job

    with session_scope() as s:
        for n in range(25):
            s.add(Job(id=uuid.UUID(int=n + 1), owner="alice", pipeline="auto", options={}, inputs=[],
                      status="queued", created_at=__import__("datetime").datetime(2030, 1, 1, 0, n)))
    c = login(world.alice)
    first = c.get("/ui/jobs")
    ids = re.findall(r'href="/ui/jobs/([0-9a-f-]{36})"', first.text)
    assert len(ids) == 20
    assert ids[0] == str(uuid.UUID(int=25)) and ids[1] == str(uuid.UUID(int=24))  # newest first
    assert "26 jobs" in first.text and "page 1 of 2" in first.text
    assert 'rel="next" href="/ui/jobs?page=2"' in first.text
    second = c.get("/ui/jobs", params={"page": 2})
    ids2 = re.findall(r'href="/ui/jobs/([0-9a-f-]{36})"', second.text)
    assert len(ids2) == 6 and str(world.job_id) in ids2 and not set(ids) & set(ids2)
    partial = c.get("/ui/jobs", params={"status": "partial"})
    assert re.findall(r'href="/ui/jobs/([0-9a-f-]{36})"', partial.text) == [str(world.job_id)]
    assert 'aria-current="page">partial' in partial.text
    assert "No succeeded jobs" in c.get("/ui/jobs", params={"status": "succeeded"}).text
    assert c.get("/ui/jobs", params={"status": "bogus"}).status_code == 422


def test_job_page_metrics_chart_items_and_downloads(world: World) -> None:
    c = login(world.alice)
    r = c.get(f"/ui/jobs/{world.job_id}")
    assert r.status_code == 200
    html = r.text
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]
    assert "data-poll" not in html  # finished: no live polling
    # Metrics table and an SVG bar chart whose bar widths follow the pixel shares.
    assert "<svg" in html and "Share of pixels" in html
    widths = [float(w) for w in re.findall(r'width="([\d.]+)" height="22" fill', html)]
    from api.web import bar_chart

    assert bar_chart("t", []).plot_width == 256
    assert len(widths) == 3
    counts = np.array([30 * 40 - 15 * 20 - 5 * 40, 15 * 20, 5 * 40])
    np.testing.assert_allclose(np.array(widths) / 256, counts / counts.sum(), atol=1e-3)
    assert 'fill="#28a05a"' in html  # tiny-photo's colour for class 1 (spec colours: 40*i, 200-40*i, 90)
    assert "58.3 %" in html and "25.0 %" in html and ">300<" in html
    # Item cards: thumbnail layers, artifact links, the failed item's error.
    base = f"/ui/jobs/{world.job_id}/items/{world.ok_item}"
    assert f'src="{base}/source.png?size=256"' in html and f'src="{base}/mask.png?size=256"' in html
    assert f'href="/jobs/{world.job_id}/items/{world.ok_item}/artifacts/mask_png"' in html
    assert f'href="/jobs/{world.job_id}/items/{world.ok_item}/artifacts/overlay"' in html
    assert "not a recognised image" in html and 'class="opacity-slider"' in html


def test_running_job_page_polls_the_api(world: World) -> None:
    from core.db import session_scope
    from core.models import Job

    with session_scope() as s:
        s.get(Job, world.job_id).status = "running"
    html = login(world.alice).get(f"/ui/jobs/{world.job_id}").text
    assert f'data-poll="/jobs/{world.job_id}"' in html
    assert 'http-equiv="refresh"' in html  # no-script fallback
    assert 'action="/ui/jobs/' in html and "/cancel" in html


def test_item_page(world: World) -> None:
    c = login(world.alice)
    r = c.get(f"/ui/jobs/{world.job_id}/items/{world.ok_item}")
    assert r.status_code == 200
    html = r.text
    assert "cat.png" in html and "40 × 30 px" in html and "tiny-photo" in html
    assert f"/ui/jobs/{world.job_id}/items/{world.ok_item}/mask.png?size=1024" in html
    assert 'id="opacity-item"' in html and "Downloads" in html and "image/png" in html
    assert html.count("<svg") == 1


def test_failed_item_page_and_hostile_names_are_escaped(world: World) -> None:
    c = login(world.alice)
    j = f"/ui/jobs/{world.job_id}"
    pages = [c.get(u).text for u in (j, f"{j}/items/{world.bad_item}", f"{j}/items/{world.ok_item}")]
    for html in pages:
        assert HOSTILE not in html
        assert "<img src=x" not in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in pages[1]  # shown, as text
    assert "&lt;img src=x" in pages[0]  # in the item list and as a class name in the chart/table


def test_submit_page_lists_pipelines(world: World) -> None:
    html = login(world.alice).get("/ui/submit").text
    for name in ("auto", "tiny-photo", "tiny-geo", "tiny-ct"):
        assert f'value="{name}"' in html
    assert 'enctype="multipart/form-data"' in html and 'name="paths"' in html


def test_static_files(world: World) -> None:
    c = client_for(None)
    css = c.get("/ui/static/app.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert "@media" in css.text
    assert c.get("/ui/static/app.js").headers["content-type"].startswith("text/javascript")
    assert c.get("/ui/static/..%2Fweb.py").status_code == 404
    assert c.get("/ui/static/nope.css").status_code == 404


# Images ---------------------------------------------------------------------------------------------
def _png(r: object) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(r.content)))


def test_source_mask_and_overlay_images(world: World) -> None:
    c = login(world.alice)
    base = f"/ui/jobs/{world.job_id}/items/{world.ok_item}"
    src = _png(c.get(f"{base}/source.png", params={"size": 512}))
    np.testing.assert_array_equal(src, np.asarray(Image.open(world.photo)))  # never upscaled
    mask = _png(c.get(f"{base}/mask.png", params={"size": 512}))
    assert mask.shape == (30, 40, 4)
    assert (mask[0, 0] == 0).all()  # background: transparent
    assert tuple(mask[10, 15]) == (40, 160, 90, 255)  # class 1, the model spec's colour
    assert tuple(mask[27, 5]) == (80, 120, 90, 255)
    small = _png(c.get(f"{base}/mask.png", params={"size": 20}))
    assert small.shape == (15, 20, 4)
    assert _png(c.get(f"{base}/source.png", params={"size": 20})).shape == (15, 20, 3)
    ov = _png(c.get(f"{base}/overlay.png", params={"size": 20}))
    assert ov.shape == (15, 20, 3) and (ov == 77).all()
    assert c.get(f"{base}/bogus.png").status_code == 404
    assert c.get(f"{base}/mask.png", params={"size": 99999}).status_code == 422


def test_missing_source_is_a_clear_error(world: World) -> None:
    world.photo.unlink()
    r = login(world.alice).get(f"/ui/jobs/{world.job_id}/items/{world.ok_item}/source.png")
    assert r.status_code == 422 and "cat.png" in r.json()["detail"]


def test_colour_mask_and_thumb_shape() -> None:
    from api.web import colour_mask, thumb_shape

    assert thumb_shape(30, 40, 20) == (15, 20)
    assert thumb_shape(30, 40, 1000) == (30, 40)
    assert thumb_shape(1, 5000, 100) == (1, 100)
    cls = np.array([[0, 1], [2, 255]], np.uint8)
    rgba = colour_mask(cls, [(1, 2, 3), (4, 5, 6)], transparent={0})
    assert rgba.dtype == np.uint8 and rgba.shape == (2, 2, 4)
    assert tuple(rgba[0, 1]) == (4, 5, 6, 255)
    assert rgba[0, 0, 3] == 0 and rgba[1, 0, 3] == 0 and rgba[1, 1, 3] == 0  # background, no colour, no data
    up = colour_mask(cls, [(1, 2, 3), (4, 5, 6)], transparent=set(), shape=(4, 4))
    assert tuple(up[0, 0]) == (1, 2, 3, 255) and tuple(up[0, 3]) == (4, 5, 6, 255)  # nearest, no blending
    with pytest.raises(ValueError, match="must be"):
        colour_mask(np.zeros((2, 2, 2)), [], set())


def test_bar_chart_geometry() -> None:
    from api.web import bar_chart

    ch = bar_chart("t", [("a", 0.5, (255, 0, 0)), ("b", float("nan"), (0, 255, 0)), ("c", 1.0, (0, 0, 255))],
                   max_value=1.0)
    assert [b.width for b in ch.bars] == [ch.plot_width / 2, 0.0, ch.plot_width]
    assert [b.text for b in ch.bars] == ["50.0%", "–", "100.0%"] and ch.bars[0].colour == "#ff0000"
    assert ch.bars[1].y > ch.bars[0].y and ch.height > ch.bars[2].y + ch.bar_height
    auto = bar_chart("t", [("a", 2.0, (0, 0, 0)), ("b", 8.0, (0, 0, 0))], fmt="{:.0f}")
    assert auto.bars[1].width == auto.plot_width and auto.bars[0].width == auto.plot_width / 4


# Submission -----------------------------------------------------------------------------------------
def test_submit_paths_creates_a_job(world: World, photo_dir: Path) -> None:
    c = login(world.alice)
    r = c.post("/ui/submit/paths", data={"paths": f"{photo_dir}\n\n", "pipeline": "tiny-photo",
                                         "options": '{"score_threshold": 0.4}'})
    assert r.status_code == 303, r.text
    job_id = r.headers["location"].rsplit("/", 1)[-1]
    job = c.get(f"/jobs/{job_id}").json()
    assert job["owner"] == "alice" and job["pipeline"] == "tiny-photo" and job["status"] == "queued"
    assert job["inputs"] == [{"path": str(photo_dir.resolve()), "truth": None}]
    assert job["options"] == {"score_threshold": 0.4}
    page = c.get(r.headers["location"])
    assert page.status_code == 200 and f'data-poll="/jobs/{job_id}"' in page.text


@pytest.mark.parametrize(("form", "fragment"), [
    ({"paths": "/etc/passwd"}, "outside the allowed input roots"),
    ({"paths": "x.png", "pipeline": "no-such-model"}, "unknown pipeline"),
    ({"paths": "x.png", "options": "{nope"}, "not valid JSON"),
    ({"paths": "x.png", "options": '{"colour": "red"}'}, "colour"),
    ({"paths": "   \n"}, "at least one path"),
])
def test_submit_paths_errors_rerender_the_form(world: World, form: dict, fragment: str) -> None:
    r = login(world.alice).post("/ui/submit/paths", data=form)
    assert r.status_code == 422
    assert fragment in r.text and 'id="submit-error"' in r.text
    assert 'name="paths"' in r.text  # the form comes back with what was typed


def test_submit_upload_uses_the_api_upload_path(world: World) -> None:
    c = login(world.alice)
    data = world.photo.read_bytes()
    r = c.post("/ui/submit/upload", data={"pipeline": "auto", "options": ""},
               files=[("files", (f"{HOSTILE}.png", data, "image/png")),
                      ("files", ("b.png", data, "image/png"))])
    assert r.status_code == 303, r.text
    job = c.get(f"/jobs/{r.headers['location'].rsplit('/', 1)[-1]}").json()
    paths = [i["path"] for i in job["inputs"]]
    assert len(paths) == 2 and all("/uploads/" in p for p in paths)
    assert "<" not in paths[0] and Path(paths[1]).read_bytes() == data  # stored under a safe name
    bad = c.post("/ui/submit/upload", data={"pipeline": "nope"},
                 files=[("files", ("a.png", data, "image/png"))])
    assert bad.status_code == 422 and "unknown pipeline" in bad.text
    assert c.post("/ui/submit/upload", data={"pipeline": "auto"}).status_code == 415
    # The optional truth input: a label pairs with the photo of the same stem; left empty, the browser's
    # empty part is no input and no truth.
    r = c.post("/ui/submit/upload", data={"pipeline": "auto"},
               files=[("files", ("cat.png", data, "image/png")), ("files", ("dog.png", data, "image/png")),
                      ("truth", ("dog.png", data, "image/png")), ("truth", ("", b"", "application/octet-stream"))])
    assert r.status_code == 303, r.text
    inputs = c.get(f"/jobs/{r.headers['location'].rsplit('/', 1)[-1]}").json()["inputs"]
    assert [i["truth"] is not None for i in inputs] == [False, True]
    assert 'name="truth" type="file"' in c.get("/ui/submit").text


def test_cancel_from_the_page(world: World, photo_dir: Path) -> None:
    c = login(world.alice)
    loc = c.post("/ui/submit/paths", data={"paths": str(photo_dir)}).headers["location"]
    r = c.post(f"{loc}/cancel")
    assert r.status_code == 303 and r.headers["location"] == loc
    assert c.get(loc.replace("/ui", "")).json()["status"] == "cancelled"


def test_class_raster_mask_and_overlay_only_items(world: World, tmp_path: Path) -> None:
    """GeoTIFF results have a class raster instead of a PNG mask; instance results only an overlay."""
    import rasterio

    from core.db import session_scope
    from core.models import Item
    from core.settings import get_settings
    from core.store import ArtifactStore

    classes = np.zeros((60, 80), np.uint8)
    classes[:, 40:] = 2
    classes[0, 0] = 255  # no data
    tif = tmp_path / "scene_classes.tif"
    with rasterio.open(tif, "w", driver="GTiff", height=60, width=80, count=1, dtype="uint8") as ds:
        ds.write(classes, 1)
    store = ArtifactStore(get_settings().artifacts)
    art = store.put(tif, f"jobs/{world.job_id}/{world.ok_item}/scene_classes.tif", "image/tiff").to_json()
    with session_scope() as s:
        item = s.get(Item, world.ok_item)
        overlay = item.artifacts["overlay"]
        item.artifacts = {"class_raster": art}
        item.meta = {**item.meta, "height": 60, "width": 80, "model": "tiny-geo"}
    c = login(world.alice)
    base = f"/ui/jobs/{world.job_id}/items/{world.ok_item}"
    mask = _png(c.get(f"{base}/mask.png", params={"size": 40}))
    assert mask.shape == (30, 40, 4)  # decimated read
    assert (mask[:, :20, 3] == 0).all()  # background
    assert (mask[:, 20:] == (80, 120, 90, 255)).all()
    assert c.get(f"{base}/overlay.png").status_code == 404
    html = c.get(base).text
    assert f"{base}/mask.png?size=1024" in html and "class_raster" in html

    with session_scope() as s:
        s.get(Item, world.ok_item).artifacts = {"overlay": overlay}
    html = c.get(base).text
    assert f"{base}/overlay.png?size=1024" in html and "mask.png" not in html
    assert c.get(f"{base}/mask.png").status_code == 404


def test_scored_jobs_show_pixel_accuracy_and_mean_iou(world: World) -> None:
    """With ground truth, the job and item pages (and GET /jobs/{id}/metrics) lead with the job's pixel
    accuracy and mean IoU, from the confusion matrix the rows store; unscored jobs show no such line."""
    from sqlalchemy import select

    from core.db import session_scope
    from core.models import ClassMetric, Item

    c = login(world.alice)
    assert "Against the ground truth" not in c.get(f"/ui/jobs/{world.job_id}").text
    cm = [[700, 0, 0], [100, 200, 0], [0, 0, 200]]  # 1,100 of 1,200 pixels right
    with session_scope() as s:
        for r in s.scalars(select(ClassMetric).where(ClassMetric.job_id == world.job_id)):
            r.sums = {**(r.sums or {}), "confusion": cm}
    for url in (f"/ui/jobs/{world.job_id}", f"/ui/jobs/{world.job_id}/items/{world.ok_item}"):
        html = c.get(url).text
        assert "Against the ground truth" in html and "pixel accuracy <strong>0.9167</strong>" in html, url
        assert f"mean IoU <strong>{(700 / 800 + 200 / 300 + 1) / 3:.4f}</strong>" in html and "1,200 scored" in html
    # Each item card on the job page carries its own scores (the item's rows here hold the same matrix).
    html = c.get(f"/ui/jobs/{world.job_id}").text
    assert html.count('class="small item-scores"') == 1 and "acc 0.917 · mIoU 0.847" in html
    with session_scope() as s:
        it = s.get(Item, world.ok_item)
        it.meta = {**(it.meta or {}), "truth_unscored": "it is 90x40 px and the image 50x40 px"}
    assert 'title="it is 90x40 px and the image 50x40 px">truth not scored<' in c.get(f"/ui/jobs/{world.job_id}").text
    api = client_for(None)
    body = api.get(f"/jobs/{world.job_id}/metrics", headers={"Authorization": f"Bearer {world.alice}"}).json()
    assert body["scores"] == [{"model": None, "pixel_accuracy": pytest.approx(1100 / 1200),
                               "mean_iou": pytest.approx((700 / 800 + 200 / 300 + 1) / 3),
                               "mean_dice": pytest.approx((1400 / 1500 + 400 / 500 + 1) / 3), "scored_pixels": 1200}]
