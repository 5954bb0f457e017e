"""Artifact store: a local directory by default, any fsspec URL (``s3://bucket/prefix``) when configured,
so workers on different machines share inputs and outputs.

Keys are deterministic (``jobs/<job>/<item>/<file>``): a task that runs twice overwrites the same object,
and local writes go to a temporary name first and are renamed, so no half-written file is ever final.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
from fsspec.core import url_to_fs

__all__ = ["ArtifactStore", "StoredArtifact", "fetch_input", "is_url"]


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class StoredArtifact:
    uri: str
    sha256: str
    bytes: int
    media_type: str

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "sha256": self.sha256, "bytes": self.bytes, "media_type": self.media_type}


class ArtifactStore:
    """Put and get artifact files under one root URL."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self._root_path = url_to_fs(self.root, **self.storage_options)
        self.local = not is_url(self.root)
        self._ready = False
        if self.local:
            Path(self._root_path).mkdir(parents=True, exist_ok=True)
            self._ready = True

    def _ensure_root(self) -> None:
        # Creates the bucket on first use (S3/MinIO), so a fresh stack needs no manual step.
        if not self._ready:
            if not self.fs.exists(self._root_path):
                self.fs.makedirs(self._root_path, exist_ok=True)
            self._ready = True

    def uri(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put(self, local: Path, key: str, media_type: str = "application/octet-stream") -> StoredArtifact:
        """Upload ``local`` to ``key`` atomically (rename on local disk; S3 PUTs are atomic)."""
        size = local.stat().st_size
        digest = _sha256(local)
        if self.local:
            dest = Path(self._root_path) / key
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
            os.close(fd)
            shutil.copyfile(local, tmp)
            os.replace(tmp, dest)
        else:
            self._ensure_root()
            self.fs.put_file(str(local), f"{self._root_path}/{key}")
        return StoredArtifact(uri=self.uri(key), sha256=digest, bytes=size, media_type=media_type)

    def open(self, uri: str) -> BinaryIO:
        """Open a stored artifact for reading (``uri`` as returned by :meth:`put`)."""
        return fsspec.open(uri, "rb", **self.storage_options).open()

    def local_path(self, uri: str) -> Path | None:
        """The file on disk for a local store (lets the API stream it without a copy)."""
        if not self.local:
            return None
        return Path(uri)

    def remove_stale_parts(self, max_age_s: float = 6 * 3600) -> int:
        """Delete ``.part-*`` temp files older than ``max_age_s`` (left by a worker killed mid-copy) and
        return how many. Local stores only: object-store PUTs leave no partial objects. Final artifacts are
        never touched (they are renamed into place whole)."""
        if not self.local:
            return 0
        cutoff = time.time() - max_age_s
        removed = 0
        for dirpath, _dirs, files in os.walk(self._root_path):
            for name in files:
                if not name.startswith(".part-"):
                    continue
                path = os.path.join(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(path).st_mtime < cutoff:
                        os.unlink(path)
                        removed += 1
        return removed

    def delete_prefix(self, key_prefix: str) -> None:
        path = f"{self._root_path}/{key_prefix}"
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)


@contextlib.contextmanager
def fetch_input(path: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """A local path for an input that may be an object-store URL (downloaded to a temp dir, removed after).

    Folders (DICOM series) are downloaded whole.
    """
    if not is_url(path):
        yield path.removeprefix("file://")
        return
    fs, p = url_to_fs(path, **(storage_options or {}))
    with tempfile.TemporaryDirectory(prefix="tileseg-in-") as tmp:
        name = os.path.basename(p.rstrip("/")) or "input"
        dest = os.path.join(tmp, name)
        if fs.isdir(p):
            fs.get(p.rstrip("/") + "/", dest + "/", recursive=True)
        else:
            fs.get_file(p, dest)
        yield dest
