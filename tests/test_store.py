"""Local artifact store: atomic puts and the cleanup of temp files left by a worker killed mid-copy."""

from __future__ import annotations

import os
import time
from pathlib import Path

from core.store import ArtifactStore


def test_put_is_whole_or_absent_and_stale_parts_are_removed(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    src = tmp_path / "mask.png"
    src.write_bytes(b"x" * 1000)
    art = store.put(src, "jobs/j1/items/i1/mask.png", "image/png")
    final = Path(art.uri)
    assert final.read_bytes() == b"x" * 1000 and art.bytes == 1000
    folder = final.parent
    assert [p.name for p in folder.iterdir()] == ["mask.png"]  # no temp file left behind

    stale, fresh = folder / ".part-abc123", folder / ".part-def456"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"copying")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    os.utime(final, (old, old))  # old final artifacts are never touched
    assert store.remove_stale_parts(max_age_s=3600) == 1
    assert not stale.exists() and fresh.exists() and final.read_bytes() == b"x" * 1000
    assert store.remove_stale_parts(max_age_s=3600) == 0


def test_object_stores_have_no_parts_to_clean(tmp_path: Path) -> None:
    store = ArtifactStore("memory://tileseg-test-store")
    assert store.remove_stale_parts(0) == 0
