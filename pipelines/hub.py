"""Load SavedModels from TF Hub / Kaggle Models handles or local directories, offline-friendly.

``load_hub`` is ``tensorflow_hub.load`` plus two things the service needs: it fails fast with a readable
:class:`ModelUnavailable` (what to download, where to put it) when a handle is neither cached nor reachable,
instead of hanging on a dead network, and it tells the user the exact cache folder tensorflow_hub will look
in (``$TFHUB_CACHE_DIR/<sha1 of the handle>``), so an air-gapped site can copy a model in by hand.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["ModelUnavailable", "cache_dir", "cached_path", "is_remote", "load_hub"]

#: Seconds allowed for the name lookup + TCP connect of the reachability pre-check.
DEFAULT_CONNECT_TIMEOUT = 5.0


class ModelUnavailable(RuntimeError):
    """The model's weights are neither on disk nor downloadable from here."""


def is_remote(handle: str) -> bool:
    """True for http(s)/gs handles (resolved by tensorflow_hub), False for local paths."""
    return handle.startswith(("http://", "https://", "gs://"))


def cache_dir() -> Path:
    """The folder tensorflow_hub caches downloads in.

    ``$TFHUB_CACHE_DIR`` when set, else ``<system temp>/tfhub_modules`` (tensorflow_hub's own default with
    ``use_temp=True``, which is what its compressed-download resolver uses).
    """
    env = os.environ.get("TFHUB_CACHE_DIR", "")
    return Path(env) if env else Path(tempfile.gettempdir()) / "tfhub_modules"


def cached_path(handle: str) -> Path:
    """Where tensorflow_hub stores (or expects) the uncompressed SavedModel of ``handle``.

    tensorflow_hub names the folder by the SHA-1 of the handle string exactly as written (no normalisation),
    so copying an extracted SavedModel there makes ``load_hub(handle)`` work with no network.
    """
    return cache_dir() / hashlib.sha1(handle.encode("utf8")).hexdigest()


def _is_cached(handle: str) -> bool:
    p = cached_path(handle)
    return p.is_dir() and any(p.iterdir())


def _endpoint(handle: str) -> tuple[str, int] | None:
    """Host and port the download would first connect to (the proxy's when one is configured)."""
    parsed = urllib.parse.urlparse(handle)
    if parsed.scheme not in ("http", "https"):
        return None  # gs:// goes through TensorFlow's GCS filesystem; no cheap pre-check
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(parsed.hostname or ""):
        p = urllib.parse.urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


def _reachable(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to ``host:port`` opens within ``timeout`` s, else the reason.

    Runs in a daemon thread because ``getaddrinfo`` ignores socket timeouts and can block for minutes on a
    broken resolver; we stop waiting after ``timeout`` and let the thread die on its own.
    """
    result: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as e:
            result.append(f"{type(e).__name__}: {e}")

    t = threading.Thread(target=probe, daemon=True, name=f"hub-probe-{host}")
    t.start()
    t.join(timeout + 0.5)
    if not result:
        return f"no answer from {host}:{port} within {timeout:g} s"
    return result[0]


def _download_hint(handle: str) -> str:
    dest = cached_path(handle)
    return (
        f"Download it where there is network (e.g. `TFHUB_CACHE_DIR={cache_dir()} python -c "
        f"\"import tensorflow_hub as hub; hub.load('{handle}')\"`), or fetch "
        f"{handle}?tf-hub-format=compressed (a .tar.gz) and extract it so that {dest}/saved_model.pb exists "
        f"(the folder name is the SHA-1 of the handle; set TFHUB_CACHE_DIR to choose the cache root), or "
        f"extract it anywhere and put that directory in the model spec's `source`."
    )


def load_hub(handle_or_path: str | os.PathLike[str], *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> Any:
    """Load a SavedModel with ``tensorflow_hub.load`` from a handle/URL or a local directory.

    Local directories must hold ``saved_model.pb``. Remote handles are served from the tensorflow_hub cache
    (``$TFHUB_CACHE_DIR``) when present; otherwise the host is probed for ``connect_timeout`` seconds before
    downloading, so an offline machine fails in seconds rather than hanging.

    Returns the loaded trackable object (callable; ``.signatures["serving_default"]`` when exported so).
    Raises :class:`ModelUnavailable` naming what to download and where to put it.
    """
    src = os.fspath(handle_or_path)
    if src.startswith("file://"):
        src = urllib.parse.urlparse(src).path
    import tensorflow_hub as hub

    if not is_remote(src):
        p = Path(src).expanduser()
        if not p.is_dir():
            raise ModelUnavailable(f"model directory {p} does not exist")
        if not (p / "saved_model.pb").is_file() and not (p / "saved_model.pbtxt").is_file():
            raise ModelUnavailable(f"{p} is not a SavedModel directory (no saved_model.pb)")
        try:
            return hub.load(str(p))
        except Exception as e:  # corrupt protobuf, missing variables ...
            raise ModelUnavailable(f"cannot load SavedModel {p}: {e}") from e

    if _is_cached(src):
        try:
            return hub.load(src)
        except Exception as e:
            raise ModelUnavailable(
                f"cached copy of {src} in {cached_path(src)} cannot be loaded ({e}); delete that folder and "
                f"download again. {_download_hint(src)}"
            ) from e

    endpoint = _endpoint(src)
    if endpoint is not None:
        reason = _reachable(*endpoint, timeout=connect_timeout)
        if reason is not None:
            raise ModelUnavailable(
                f"model {src} is not cached in {cache_dir()} and cannot be downloaded ({reason}). "
                + _download_hint(src)
            )
    try:
        return hub.load(src)
    except Exception as e:  # HTTP errors, truncated archives, GCS auth ...
        raise ModelUnavailable(f"downloading {src} failed: {e}. {_download_hint(src)}") from e
