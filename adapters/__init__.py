"""Format adapters: one module per input/output format, all following :mod:`adapters.base`.

``detect(path)`` picks the format by content (magic bytes), never by trusting the file name alone.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from functools import cache

from adapters.base import (
    DEFAULT_MAX_PIXELS,
    AdapterError,
    Format,
    Source,
    UnsupportedInput,
)

#: Files that are never inputs of their own when a folder is walked.
SKIP_NAMES = frozenset({".DS_Store", "Thumbs.db", "DICOMDIR"})
#: World files (georeferencing of the image with the same stem), and ESRI's projection file.
_STEM_SIDECARS = frozenset({".wld", ".tfw", ".tifw", ".tiffw", ".pgw", ".pngw", ".jgw", ".jpgw", ".jpegw", ".j2w",
                            ".bpw", ".gfw", ".prj"})
#: Sidecars named after the whole file name: GDAL's PAM metadata, external overviews and masks.
_NAME_SIDECARS = (".aux.xml", ".ovr", ".msk")


def folder_inputs(names: Iterable[str]) -> list[str]:
    """The names of one folder's files that are inputs of their own, sorted.

    Left out: hidden files, :data:`SKIP_NAMES`, and the sidecars GDAL reads together with another file of the
    folder: ``X.aux.xml``, ``X.ovr`` and ``X.msk`` beside ``X``, and world files and ``.prj`` files that share
    a stem with another file (``scene.tfw`` beside ``scene.tif``). A sidecar without its raster stays an input
    (and is refused as not an image, so the user sees it).
    """
    names = sorted(n for n in names if not n.startswith(".") and n not in SKIP_NAMES)
    present = set(names)
    stems: dict[str, int] = {}
    for n in names:
        stem = os.path.splitext(n)[0]
        stems[stem] = stems.get(stem, 0) + 1

    def sidecar(n: str) -> bool:
        low = n.lower()
        for suffix in _NAME_SIDECARS:
            if low.endswith(suffix) and n[: -len(suffix)] in present:
                return True
        stem, ext = os.path.splitext(n)
        return ext.lower() in _STEM_SIDECARS and stems.get(stem, 0) > 1

    return [n for n in names if not sidecar(n)]


#: Module and class of each registered format, in sniffing order (most specific first).
FORMAT_CLASSES: dict[str, str] = {
    "dicom": "adapters.dicom:DicomFormat",
    "geotiff": "adapters.geotiff:GeoTiffFormat",
    "photo": "adapters.photo:PhotoFormat",
}


@cache
def get_format(name: str) -> Format:
    """The adapter instance for a format name (``dicom``, ``geotiff``, ``photo``)."""
    try:
        target = FORMAT_CLASSES[name]
    except KeyError:
        raise UnsupportedInput(f"unknown format {name!r}; known: {', '.join(FORMAT_CLASSES)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()


def detect(path: str) -> Format:
    """The format that reads ``path`` (a file, or a folder holding a DICOM series).

    Raises :class:`UnsupportedInput` with a readable message when nothing recognises it.
    """
    head = b""
    if os.path.isfile(path):
        if os.path.getsize(path) == 0:
            raise UnsupportedInput(f"{os.path.basename(path)}: empty file")
        with open(path, "rb") as f:
            head = f.read(1024)
    elif not os.path.isdir(path):
        raise UnsupportedInput(f"{path}: no such file or folder")
    for name in FORMAT_CLASSES:
        fmt = get_format(name)
        if fmt.sniff(path, head):
            return fmt
    raise UnsupportedInput(
        f"{os.path.basename(path.rstrip('/')) or path}: not a recognised image "
        "(GeoTIFF, DICOM, JPEG, PNG, TIFF, JPEG 2000, WebP, AVIF, HEIC, BMP)"
    )


def open_input(path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Format, Source]:
    """Detect and open ``path``; errors are :class:`AdapterError` with a clear message."""
    fmt = detect(path)
    return fmt, fmt.open(path, max_pixels=max_pixels)


__all__ = ["AdapterError", "FORMAT_CLASSES", "Format", "Source", "UnsupportedInput", "detect", "get_format",
           "open_input"]
