"""Job state transitions and input-path safety, against the real SQLite and PostgreSQL databases."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import update

from core import jobs
from core.models import Item, ItemStatus, JobStatus
from tests.conftest import reset_all


def _setup_db(url: str | None = None) -> None:
    from core.db import upgrade

    upgrade()


def _planned(n: int) -> list[jobs.PlannedItem]:
    return [jobs.PlannedItem(source=f"/x/{i}.png", key="", group=None, format="photo", truth=None, meta={})
            for i in range(n)]


def _exercise_counters() -> None:
    from core.db import session_scope

    with session_scope() as s:
        job = jobs.create_job(s, [jobs.InputSpec("/x")], "auto")
        job_id = job.id
    with session_scope() as s:
        rows = jobs.record_plan(s, job_id, _planned(3))
        ids = [r.id for r in rows]
    with session_scope() as s:
        assert jobs.record_plan(s, job_id, _planned(3)) == []  # planning twice adds nothing
    with session_scope() as s:
        assert jobs.start_item(s, ids[0])
        assert not jobs.finish_item(s, ids[0], job_id, ItemStatus.succeeded)
        # A redelivered task finishing the same item again is not counted twice.
        assert not jobs.finish_item(s, ids[0], job_id, ItemStatus.succeeded)
        assert not jobs.start_item(s, ids[0])
        # Started while still running = its worker died mid-item: a restart. A transient retry puts the item
        # back to pending first, so it is not one.
        assert jobs.start_item(s, ids[1]) == jobs.Started(0)
        assert jobs.start_item(s, ids[1]) == jobs.Started(1)
        s.execute(update(Item).where(Item.id == ids[1]).values(status=ItemStatus.pending))
        assert jobs.start_item(s, ids[1]) == jobs.Started(1)
        assert not jobs.finish_item(s, ids[1], job_id, ItemStatus.failed, error="bad file")
        assert jobs.finish_item(s, ids[2], job_id, ItemStatus.succeeded)  # the last one completes the job
    with session_scope() as s:
        job = jobs.get_job(s, job_id)
        assert (job.items_total, job.items_done, job.items_failed) == (3, 3, 1)
        assert job.status == JobStatus.running


def test_counters_sqlite(ts_env: dict[str, str]) -> None:
    _setup_db()
    _exercise_counters()


@pytest.mark.services
def test_counters_postgres(ts_env: dict[str, str], pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILESEG_DATABASE_URL", pg_url)
    reset_all()
    _setup_db()
    _exercise_counters()


def test_cancel_keeps_finished(ts_env: dict[str, str]) -> None:
    from core.db import session_scope

    _setup_db()
    with session_scope() as s:
        job_id = jobs.create_job(s, [jobs.InputSpec("/x")]).id
    with session_scope() as s:
        ids = [r.id for r in jobs.record_plan(s, job_id, _planned(4))]
    with session_scope() as s:
        jobs.start_item(s, ids[0])
        jobs.finish_item(s, ids[0], job_id, ItemStatus.succeeded)
        jobs.start_item(s, ids[1])
    with session_scope() as s:
        job = jobs.cancel_job(s, job_id)
        assert job.status == JobStatus.cancelled
    with session_scope() as s:
        items, total = jobs.list_items(s, job_id)
        assert [i.status for i in items] == ["succeeded", "running", "cancelled", "cancelled"]
        # The running item may still finish and is counted then.
        assert jobs.finish_item(s, ids[1], job_id, ItemStatus.succeeded)


def test_cancel_while_planning_leaves_nothing_pending(ts_env: dict[str, str]) -> None:
    """A job cancelled while its inputs were being expanded (before the plan was recorded): the items are
    recorded cancelled, unreadable ones failed, and the counters say every item is done."""
    from core.db import session_scope

    _setup_db()
    with session_scope() as s:
        job_id = jobs.create_job(s, [jobs.InputSpec("/x")]).id
    with session_scope() as s:
        jobs.cancel_job(s, job_id)
    planned = _planned(3)
    planned[1] = jobs.PlannedItem(source="/x/bad.png", key="", group=None, format=None, truth=None, meta={},
                                  error="unreadable")
    with session_scope() as s:
        rows = jobs.record_plan(s, job_id, planned)
        assert [r.status for r in rows] == ["cancelled", "failed", "cancelled"]
    with session_scope() as s:
        job = jobs.get_job(s, job_id)
        assert job.status == JobStatus.cancelled
        assert (job.items_total, job.items_done, job.items_failed) == (3, 3, 1)


def test_input_paths_must_stay_inside_roots(tmp_path: Path) -> None:
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(b"x")
    outside = tmp_path / "secret.txt"
    outside.write_text("no")
    os.symlink(outside, root / "link.txt")
    roots = [root]
    assert jobs.check_input_path(str(root / "sub" / "a.png"), roots) == str((root / "sub" / "a.png").resolve())
    assert jobs.check_input_path("sub/a.png", roots) == str((root / "sub" / "a.png").resolve())
    for bad in [str(outside), "../secret.txt", str(root / "sub" / ".." / ".." / "secret.txt"), str(root / "link.txt"),
                "/etc/passwd", "sub/\x00a.png"]:
        with pytest.raises(jobs.PathNotAllowed):
            jobs.check_input_path(bad, roots)
    with pytest.raises(jobs.PathNotAllowed, match="disabled"):
        jobs.check_input_path(str(root / "sub" / "a.png"), [])


def test_job_summaries_count_past_the_last_page(ts_env: dict[str, str]) -> None:
    from core.db import engine, session_scope

    _setup_db()
    with session_scope() as s:
        for owner in ("a", "a", "b"):
            jobs.create_job(s, [jobs.InputSpec("/x")], "auto", owner=owner)
    with engine().connect() as conn:
        rows, total = jobs.list_job_summaries(conn, owner="a", limit=1)
        assert len(rows) == 1 and total == 2 and rows[0]["owner"] == "a"
        assert jobs.list_job_summaries(conn, owner="a", offset=5) == ([], 2)  # total from the fallback COUNT
        assert jobs.list_job_summaries(conn, status="running", offset=0) == ([], 0)
        assert jobs.list_job_summaries(conn)[1] == 3


def test_a_truth_folder_pairs_with_an_input_folder_by_name(tmp_path: Path) -> None:
    """`images/` + `labels/`: each input gets the label with its relative path and stem, any extension,
    the same extension first; an input without one is segmented unscored, with a note."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    for p in ("a.png", "b.jpg", "c.png", "sub/d.png"):
        (images / p).parent.mkdir(parents=True, exist_ok=True)
        (images / p).write_bytes(b"x")
    for p in ("a.png", "b.png", "c.jpg", "c.png", "sub/d.tif", "sub/c.png"):
        (labels / p).parent.mkdir(parents=True, exist_ok=True)
        (labels / p).write_bytes(b"x")
    root, truth = str(images), str(labels)
    assert jobs.truth_for(str(images / "a.png"), root, truth) == (str(labels / "a.png"), None)
    assert jobs.truth_for(str(images / "b.jpg"), root, truth) == (str(labels / "b.png"), None)
    assert jobs.truth_for(str(images / "c.png"), root, truth) == (str(labels / "c.png"), None)
    assert jobs.truth_for(str(images / "sub" / "d.png"), root, truth) == (str(labels / "sub" / "d.tif"), None)
    (images / "e.png").write_bytes(b"x")
    none, note = jobs.truth_for(str(images / "e.png"), root, truth)
    assert none is None and note == "no truth file named e.* in labels/: not scored"
    # A single file input with a truth folder: paired by its name; a truth file serves as given.
    assert jobs.truth_for(str(images / "a.png"), str(images / "a.png"), truth) == (str(labels / "a.png"), None)
    assert jobs.truth_for(str(images / "a.png"), root, str(labels / "c.png")) == (str(labels / "c.png"), None)
    # A DICOM series folder submitted as one source keeps the truth as given.
    assert jobs.truth_for(root, root, truth) == (truth, None)


def test_sidecars_go_with_their_raster_when_a_folder_is_walked(tmp_path: Path) -> None:
    """A GIS delivery: each raster with its world file, projection, PAM metadata and external overviews.
    Only the rasters are inputs; before, every sidecar became a failed item ("not a recognised image") and
    the job ended `partial`. A sidecar without its raster stays an input, so the user hears of it."""
    from core import schedules

    names = ["scene.tif", "scene.tfw", "scene.prj", "scene.tif.aux.xml", "scene.tif.ovr", "scene.tif.msk",
             "export.png", "export.PGW", "export.png.aux.xml", "lonely.tfw", "notes.txt", ".hidden.tif", "Thumbs.db"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    walked = [Path(p).name for p in jobs._walk(str(tmp_path))]
    assert walked == ["export.png", "lonely.tfw", "notes.txt", "scene.tif"]
    units = [Path(u[0]).name for u in schedules._units(str(tmp_path))]
    assert sorted(units) == walked


def test_an_input_that_cannot_be_listed_fails_alone(tmp_path: Path) -> None:
    """A URL nobody can list (unknown scheme, unreachable host) became an exception in planning: the plan
    task failed, and the job stayed `queued` for ever, its good inputs with it. Now that input is a failed
    item naming it (credentials removed) and the others are planned."""
    from PIL import Image

    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    planned = jobs.expand_inputs([{"path": "nosuchscheme://alice:s3cret@host/scene.tif"}, {"path": str(good)}],
                                 max_pixels=10**8, storage_options={})
    assert [p.error is None for p in planned] == [False, True]
    bad = planned[0]
    assert bad.source == "nosuchscheme://alice:s3cret@host/scene.tif"
    assert bad.error.startswith("nosuchscheme://host/scene.tif: cannot be listed (ValueError: ")
    assert "s3cret" not in bad.error
    assert planned[1].source == str(good) and planned[1].format == "photo"


def test_truth_maps_are_checked_before_a_job_exists(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from core.cli import main

    assert jobs.check_truth_map({"1": 0, "02": 1, "3": 255}) == {"1": 0, "2": 1, "3": 255}
    for bad, fragment in (({"pet": 0}, "key 'pet'"), ({"1": 256}, "class id 256"), ({"1": True}, "class id True"),
                          ({"1": 1.5}, "class id 1.5"), ([1, 2], "JSON object")):
        with pytest.raises(ValueError, match=fragment):
            jobs.check_truth_map(bad)
    img = tmp_path / "a.png"
    img.write_bytes(b"not read: the option fails first")
    for arg, fragment in (('{"pet": 0}', "key 'pet'"), ("{1: 0}", "not valid JSON")):
        res = CliRunner().invoke(main, ["submit", str(img), "--truth-map", arg])
        assert res.exit_code == 2 and fragment in res.output, res.output
    # A missing truth file is refused before a job exists (it used to fail every item of the job).
    res = CliRunner().invoke(main, ["submit", str(img), "--truth", str(tmp_path / "nope.png")])
    assert res.exit_code == 2 and "nope.png: no such file or folder" in res.output, res.output


def test_score_summaries_come_from_the_stored_confusion_per_model() -> None:
    from core.models import ClassMetric

    cm = [[8, 2], [1, 9]]  # rows = truth
    rows = [ClassMetric(model="m", class_id=c, class_name=str(c), sums={"confusion": cm}) for c in (0, 1)]
    rows.append(ClassMetric(model="counts-only", class_id=0, class_name="x", sums={}))
    (s,) = jobs.score_summaries(rows)
    assert s["model"] == "m" and s["scored_pixels"] == 20
    assert s["pixel_accuracy"] == pytest.approx(17 / 20)
    assert s["mean_iou"] == pytest.approx((8 / 11 + 9 / 12) / 2)
    assert s["mean_dice"] == pytest.approx((16 / 19 + 18 / 21) / 2)
