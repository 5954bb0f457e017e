"""GeoTIFF (and other georeferenced rasters GDAL reads) through rasterio, window by window.

Reads never decode more than the requested window; :class:`GeoTiffMaskSink` streams blocks to a tiled,
deflate-compressed GTiff and turns it into a Cloud-Optimized GeoTIFF on close, so memory does not grow with
the raster. Everything geographic (rasters, polygons) is written in the source CRS, whatever it is (WKT is
kept for CRSs without an EPSG code).

Areas: ``pixel_area`` is in m² for projected CRSs (determinant of the transform times the CRS's linear unit
factor squared). For geographic CRSs (degrees) it is None with a warning, and polygon areas in m² are
computed on a sphere of the mean Earth radius (error well under 1 % for mapping purposes). Web Mercator
"metres" are not ground metres (scale 1/cos²(latitude)); such rasters get a warning.

Polygons come from :func:`rasterio.features.shapes` over the finished class raster read in chunks of
``polygon_chunk`` pixels (default 2048) with each chunk's window transform: objects crossing a chunk edge
are split there (rasters up to one chunk are polygonized whole; the sink's own 512-pixel write blocks never
split polygons).
"""

from __future__ import annotations

import json
import os
import re
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.features import shapes
from rasterio.windows import transform as window_transform

from adapters.base import (
    DEFAULT_MAX_PIXELS,
    AdapterError,
    Artifact,
    Format,
    InputTooLarge,
    Item,
    ItemInfo,
    MaskSink,
    RegionItem,
    Source,
    UnsupportedInput,
    Window,
    page_key,
    page_number,
)
from adapters.photo import NODATA_CLASS, background_ids, blend_overlay, output_stem

try:  # GDAL errors raised by rasterio's C layer are not RasterioError subclasses.
    from rasterio._err import CPLE_BaseError
except ImportError:  # pragma: no cover - private module moved
    CPLE_BaseError = RasterioError  # type: ignore[misc,assignment]

__all__ = [
    "GeoTiffFormat",
    "GeoTiffItem",
    "GeoTiffMaskSink",
    "GeoTiffSource",
    "looks_geospatial",
    "polygon_area",
    "reproject_labels",
    "rle_crop",
    "same_grid",
    "write_geotiff_instances",
]

_TIFF = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: JPEG 2000: the JP2 container (Sentinel-2, SPOT and Pleiades deliveries) and a bare codestream.
_JP2 = (b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")
_PNG_JPEG = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
#: Sidecar files that georeference a PNG or JPEG exported from a GIS: world files and GDAL's .aux.xml.
_GEO_SIDECARS = (".wld", ".pgw", ".pngw", ".jgw", ".jpgw", ".jpegw")
_GDAL_ERRORS = (RasterioError, CPLE_BaseError)
_EARTH_RADIUS_M = 6_371_008.8


class _NoGeoWarnings:
    """Context manager silencing rasterio's NotGeoreferencedWarning (we report that in info.warnings)."""

    def __enter__(self) -> None:
        self._cw = warnings.catch_warnings()
        self._cw.__enter__()
        warnings.simplefilter("ignore", NotGeoreferencedWarning)

    def __exit__(self, *exc: object) -> None:
        self._cw.__exit__(*exc)


def _err(path: str, what: str, e: BaseException) -> AdapterError:
    # rasterio's "Read failed. See previous exception" hides GDAL's actual message in __cause__.
    detail = f"{e} ({e.__cause__})" if e.__cause__ is not None else str(e)
    return AdapterError(f"{Path(path).name}: {what}: {detail}")


def has_geo_sidecar(path: str) -> bool:
    """Whether a world file (``.wld``, ``.pgw``, ``.jgw`` ...) or GDAL's ``.aux.xml`` lies beside ``path``."""
    stem, _ = os.path.splitext(path)
    return os.path.isfile(path + ".aux.xml") or any(
        os.path.isfile(stem + ext) or os.path.isfile(stem + ext.upper()) for ext in _GEO_SIDECARS
    )


def looks_geospatial(path: str) -> bool:
    """True if rasterio opens ``path`` and it needs the GeoTIFF adapter rather than the photo one.

    That is: it has a CRS, a non-identity transform, GCPs or RPCs, more than 3 non-alpha bands, or a
    dtype other than uint8. Unreadable files give False (the photo adapter then reports the error).
    """
    try:
        with _NoGeoWarnings(), rasterio.open(path) as ds:
            if ds.crs is not None or not ds.transform.is_identity or ds.gcps[0] or ds.rpcs is not None:
                return True
            colour_bands = [ci for ci in ds.colorinterp if ci != ColorInterp.alpha]
            return len(colour_bands) > 3 or any(dt != "uint8" for dt in ds.dtypes)
    except (*_GDAL_ERRORS, OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------- reading


def _crs_info(
    crs: CRS | None, transform: Affine
) -> tuple[float | None, str | None, list[str], dict[str, Any]]:
    """``(pixel_area, area_unit, warnings, extra)`` for a CRS and pixel transform."""
    warn: list[str] = []
    extra: dict[str, Any] = {}
    if crs is None:
        warn.append("raster has no CRS: processed in pixel space, no geographic outputs")
        return None, None, warn, extra
    extra["epsg"] = crs.to_epsg(confidence_threshold=100)  # exact match only, never a guess
    det = abs(transform.a * transform.e - transform.b * transform.d)
    if crs.is_geographic:
        warn.append(
            "geographic CRS (degrees): pixel area varies with latitude, so pixel_area is not set; "
            "polygon areas in m² are computed on a sphere"
        )
        return None, None, warn, extra
    try:
        unit, factor = crs.linear_units_factor
    except _GDAL_ERRORS:
        warn.append("projected CRS with unknown linear units: areas are not reported in m²")
        return None, None, warn, extra
    extra["linear_units"] = unit
    if re.search(r"\+proj=merc\b", crs.to_proj4() or ""):
        warn.append("Mercator CRS: map areas exceed ground areas by 1/cos²(latitude)")
    return det * factor * factor, "m2", warn, extra


class GeoTiffItem(Item):
    """The raster of a GeoTIFF (key ``""``), or one page of a multi-page TIFF (key ``page-NNNN``); thread-safe
    windowed reads through one rasterio dataset.

    ``dataset_name`` is what GDAL opens the dataset by (``GTIFF_DIR:2:path`` for a page); after
    :meth:`release` the dataset is opened again on the next read, so a stack of thousands of pages does not
    hold a file handle per page.
    """

    streamable = True

    def __init__(self, path: str, ds: rasterio.DatasetReader, *, key: str = "",
                 dataset_name: str | None = None) -> None:
        self.path = path
        self.key = key
        self.group = None
        self._dataset: rasterio.DatasetReader | None = ds
        self._dataset_name = dataset_name or path
        self._lock = threading.RLock()
        crs = ds.crs
        geo = crs is not None or not ds.transform.is_identity
        area, unit, warn, extra = _crs_info(crs, ds.transform)
        if len(set(ds.dtypes)) > 1:
            warn.append(f"bands have different dtypes {sorted(set(ds.dtypes))}; read as {ds.dtypes[0]}")
        if crs is not None and (ds.transform.b or ds.transform.d):
            warn.append("rotated/sheared transform: outputs keep it, some viewers may not")
        extra.update(
            nodata=ds.nodata,
            band_descriptions=list(ds.descriptions),
            colorinterp=[ci.name for ci in ds.colorinterp],
            block_shape=list(ds.block_shapes[0]),
            overviews=ds.overviews(1),
            driver=ds.driver,
            compression=ds.compression.value if ds.compression else None,
        )
        self.info = ItemInfo(
            height=ds.height,
            width=ds.width,
            bands=ds.count,
            dtype=ds.dtypes[0],
            modality="geotiff",
            crs_wkt=crs.to_wkt() if crs is not None else None,
            transform=tuple(ds.transform)[:6] if geo else None,  # type: ignore[arg-type]
            pixel_area=area,
            area_unit=unit,
            warnings=warn,
            extra=extra,
        )
        flags = ds.mask_flag_enums
        self._has_mask = not all(f == [MaskFlags.all_valid] for f in flags)

    @property
    def _ds(self) -> rasterio.DatasetReader:
        with self._lock:
            if self._dataset is None:
                try:
                    with _NoGeoWarnings():
                        self._dataset = rasterio.open(self._dataset_name)
                except _GDAL_ERRORS as e:
                    raise _err(self.path, f"cannot open {self.key or 'the raster'} again", e) from e
            return self._dataset

    def release(self) -> None:
        """Close the dataset; the next read opens it again."""
        with self._lock:
            if self._dataset is not None:
                self._dataset.close()
                self._dataset = None

    @property
    def crs(self) -> CRS | None:
        return self._ds.crs

    @property
    def transform(self) -> Affine:
        return self._ds.transform

    def _clip(self, window: Window | None) -> tuple[Window, Window, tuple[int, int]]:
        """``(requested, inside, (h, w))``: the part of ``window`` inside the raster and the full size."""
        if window is None:
            window = Window(0, 0, self.info.width, self.info.height)
        c0, r0 = int(window.col_off), int(window.row_off)
        w, h = int(window.width), int(window.height)
        if w <= 0 or h <= 0:
            raise ValueError(f"empty window {window}")
        ic0, ir0 = max(c0, 0), max(r0, 0)
        ic1, ir1 = min(c0 + w, self.info.width), min(r0 + h, self.info.height)
        inside = Window(ic0, ir0, max(0, ic1 - ic0), max(0, ir1 - ir0))
        return Window(c0, r0, w, h), inside, (h, w)

    def read(self, window: Window | None = None, bands: Sequence[int] | None = None) -> np.ndarray:
        """``(C, h, w)`` pixels of ``window`` in the native dtype (raw DNs).

        ``bands`` are 1-based band indices (default: all). Parts of the window outside the raster are
        filled with nodata (or 0) and reported invalid by :meth:`valid_mask`.
        """
        req, inside, (h, w) = self._clip(window)
        idx = list(bands) if bands is not None else list(range(1, self.info.bands + 1))
        if any(b < 1 or b > self.info.bands for b in idx):
            raise AdapterError(f"{Path(self.path).name}: bands {idx} not in 1..{self.info.bands}")
        try:
            with self._lock:
                if inside.width == w and inside.height == h:
                    return self._ds.read(idx, window=inside)
                fill = self._ds.nodata if self._ds.nodata is not None else 0
                out = np.full((len(idx), h, w), fill, dtype=self._ds.dtypes[0])
                if inside.width and inside.height:
                    r, c = int(inside.row_off - req.row_off), int(inside.col_off - req.col_off)
                    out[:, r : r + int(inside.height), c : c + int(inside.width)] = self._ds.read(
                        idx, window=inside
                    )
                return out
        except _GDAL_ERRORS as e:
            raise _err(self.path, f"read failed at window {_wstr(req)} (corrupt or truncated?)", e) from e

    def valid_mask(self, window: Window | None = None) -> np.ndarray | None:
        """``(h, w) bool``, False at nodata, internal-mask/alpha-masked and out-of-raster pixels.

        None when the raster has neither nodata nor masks and the window lies inside it. A pixel is valid
        when any band is valid (GDAL's dataset mask).
        """
        req, inside, (h, w) = self._clip(window)
        full = inside.width == w and inside.height == h
        if not self._has_mask and full:
            return None
        out = np.zeros((h, w), bool)
        if inside.width and inside.height:
            r, c = int(inside.row_off - req.row_off), int(inside.col_off - req.col_off)
            sub = out[r : r + int(inside.height), c : c + int(inside.width)]
            if self._has_mask:
                try:
                    with self._lock:
                        sub[...] = self._ds.dataset_mask(window=inside) > 0
                except _GDAL_ERRORS as e:
                    raise _err(self.path, f"mask read failed at window {_wstr(req)}", e) from e
            else:
                sub[...] = True
        return out

    def preview_bands(self) -> list[int]:
        """1-based bands shown in previews: the red/green/blue bands if tagged, else 1-3, else band 1."""
        ci = list(self._ds.colorinterp)
        try:
            return [ci.index(c) + 1 for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)]
        except ValueError:
            return [1, 2, 3] if self.info.bands >= 3 else [1]

    def preview(self, max_size: int = 1024) -> np.ndarray:
        """``(H', W', 3) uint8``: a decimated read (overviews used when present) stretched per band
        between the 2nd and 98th percentiles of valid pixels; nodata shows black."""
        h, w = preview_shape(self.info.height, self.info.width, max_size)
        bands = self.preview_bands()
        try:
            with self._lock:
                data = self._ds.read(bands, out_shape=(len(bands), h, w), resampling=Resampling.nearest)
                valid = (
                    self._ds.dataset_mask(out_shape=(h, w), resampling=Resampling.nearest) > 0
                    if self._has_mask
                    else np.ones((h, w), bool)
                )
        except _GDAL_ERRORS as e:
            raise _err(self.path, "preview read failed", e) from e
        return stretch_to_uint8(data, valid)

    def close(self) -> None:
        self.release()


def preview_shape(height: int, width: int, max_size: int) -> tuple[int, int]:
    """``(h, w)`` with the longer side at most ``max_size`` (never upscaled, never 0)."""
    scale = min(1.0, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def stretch_to_uint8(data: np.ndarray, valid: np.ndarray, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """``(B, H, W)`` any dtype (B = 1 or 3) -> ``(H, W, 3) uint8`` stretched per band between the
    ``low``/``high`` percentiles of the pixels where ``valid`` ``(H, W) bool``; invalid pixels are 0."""
    ok = valid & np.all(np.isfinite(data), axis=0) if data.dtype.kind == "f" else valid
    planes = []
    for band in data.astype(np.float64):
        vals = band[ok]
        lo, hi = np.percentile(vals, [low, high]) if vals.size else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1.0
        planes.append(np.clip((np.nan_to_num(band, nan=lo) - lo) / (hi - lo) * 255.0, 0, 255))
    out = np.rint(np.stack(planes * (3 // len(planes)), axis=-1)).astype(np.uint8)
    out[~ok] = 0
    return out


def _wstr(w: Window) -> str:
    return f"(col {int(w.col_off)}, row {int(w.row_off)}, {int(w.width)}x{int(w.height)})"


def tiff_pages(ds: rasterio.DatasetReader) -> list[str]:
    """GDAL names (``GTIFF_DIR:N:path``) of the pages of a multi-page TIFF, in file order; ``[]`` for a file
    with one image. GDAL lists only full-resolution pages: overviews and masks stay with their page."""
    if ds.driver != "GTiff":
        return []
    pages = [s for s in ds.subdatasets if s.startswith("GTIFF_DIR:")]
    return sorted(pages, key=lambda s: int(s.split(":", 2)[1]))


class GeoTiffSource(Source):
    """An opened raster file: one item, or one per page of a multi-page TIFF (keys ``page-0000``, ...).

    Pages are opened when asked for: :meth:`items` opens each in turn (planning), :meth:`item` only the one
    named, so a worker processing page 1999 of a stack does not open the 1999 before it (opening a page walks
    the file's chain of pages, so opening them all cost 29 s for 2,000 pages, at every item).
    """

    format = "geotiff"

    def __init__(self, path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.path = path
        self._name = Path(path).name
        self._max_pixels = max_pixels
        self._opened: list[GeoTiffItem] = []
        if not os.path.isfile(path):
            raise UnsupportedInput(f"{self._name}: no such file")
        if os.path.getsize(path) == 0:
            raise UnsupportedInput(f"{self._name}: empty file")
        try:
            with _NoGeoWarnings():
                ds = rasterio.open(path)  # reads the header and IFDs only: no pixel buffer
        except _GDAL_ERRORS as e:
            raise _err(path, "cannot open as a raster (corrupt, truncated or not a TIFF)", e) from e
        try:
            self._pages = tiff_pages(ds)
            if len(self._pages) <= 1:
                self._pages = []
                _check_size(ds, self._name, max_pixels)
                self._opened = [GeoTiffItem(path, ds)]
                return
        except BaseException:
            ds.close()
            raise
        ds.close()

    def _page(self, n: int) -> GeoTiffItem:
        sub = self._pages[n]
        try:
            with _NoGeoWarnings():
                page = rasterio.open(sub)
        except _GDAL_ERRORS as e:
            raise _err(self.path, f"page {n} of {len(self._pages)} cannot be opened", e) from e
        try:
            _check_size(page, f"{self._name} page {n}", self._max_pixels)
            item = GeoTiffItem(self.path, page, key=page_key(n), dataset_name=sub)
        except BaseException:
            page.close()
            raise
        item.info.extra.update(page=n, pages=len(self._pages))
        item.release()
        self._opened.append(item)
        return item

    def items(self) -> Iterator[Item]:
        if not self._pages:
            yield from self._opened
            return
        for n in range(len(self._pages)):
            yield self._page(n)

    def item(self, key: str) -> Item:
        n = page_number(key, len(self._pages))
        return self._page(n) if n is not None else super().item(key)

    def close(self) -> None:
        for it in self._opened:
            it.close()


def _check_size(ds: rasterio.DatasetReader, name: str, max_pixels: int) -> None:
    if ds.width * ds.height > max_pixels:
        raise InputTooLarge(
            f"{name}: {ds.width}x{ds.height} = {ds.width * ds.height:,} pixels exceeds the limit of {max_pixels:,}"
        )
    if ds.count < 1:
        raise AdapterError(f"{name}: raster has no bands")


# --------------------------------------------------------------------------------------------- geometry


def polygon_area(rings: Sequence[Sequence[Sequence[float]]], *, geographic: bool = False) -> float:
    """Area of a GeoJSON polygon (exterior ring then holes): map units² by the shoelace formula, or m² on
    a sphere of the mean Earth radius when ``geographic`` (coordinates in degrees lon/lat)."""
    total = 0.0
    for k, ring in enumerate(rings):
        pts = np.asarray(ring, np.float64)
        if len(pts) < 3:
            continue
        x, y = pts[:, 0], pts[:, 1]
        if geographic:
            lam, phi = np.radians(x), np.radians(y)
            a = abs(np.sum((np.roll(lam, -1) - lam) * (2 + np.sin(phi) + np.sin(np.roll(phi, -1))))) / 2
            a *= _EARTH_RADIUS_M**2
        else:
            a = abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2
        total += a if k == 0 else -a
    return float(total)


class _GeoJsonWriter:
    """Streams features to a GeoJSON FeatureCollection in the source CRS (one feature in memory at a time)."""

    def __init__(self, path: Path, crs: CRS) -> None:
        self.path = path
        self.count = 0
        self._f = open(path, "w")  # noqa: SIM115 - closed in close()
        head: dict[str, Any] = {"type": "FeatureCollection", "crs_wkt": crs.to_wkt()}
        epsg = crs.to_epsg(confidence_threshold=100)
        if epsg is not None:
            # GeoJSON 2008 "crs" member: GDAL/QGIS read it; RFC 7946 would force WGS 84.
            head["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"}}
        self._f.write(json.dumps(head)[:-1] + ', "features": [\n')

    def add(self, geometry: dict[str, Any], properties: dict[str, Any]) -> None:
        if self.count:
            self._f.write(",\n")
        self._f.write(json.dumps({"type": "Feature", "properties": properties, "geometry": geometry}))
        self.count += 1

    def close(self) -> None:
        self._f.write("\n]}\n")
        self._f.close()


def geojson_to_gpkg(geojson: Path, gpkg: Path, crs: CRS, layer: str) -> bool:
    """Copy a GeoJSON written by :class:`_GeoJsonWriter` into a GeoPackage layer (via pyogrio/OGR), in the
    same CRS (taken from the raster, since GeoJSON readers assume WGS 84). False when there are no
    features (an empty GeoPackage layer needs a geometry type we cannot know)."""
    import pyogrio

    meta, _fids, geometry, field_data = pyogrio.raw.read(str(geojson))
    if len(geometry) == 0:
        return False
    pyogrio.raw.write(str(gpkg), geometry, field_data, meta["fields"], crs=crs.to_wkt(),
                      geometry_type=meta["geometry_type"], driver="GPKG", layer=layer, promote_to_multi=True)
    return True


def _area_props(rings: list, crs: CRS, unit_factor: float | None) -> dict[str, float | None]:
    if crs.is_geographic:
        return {"area": polygon_area(rings), "area_m2": polygon_area(rings, geographic=True)}
    a = polygon_area(rings)
    return {"area": a, "area_m2": a * unit_factor**2 if unit_factor is not None else None}


def _unit_factor(crs: CRS) -> float | None:
    if crs.is_geographic:
        return None
    try:
        return float(crs.linear_units_factor[1])
    except _GDAL_ERRORS:
        return None


# --------------------------------------------------------------------------------------------- sinks


def _tile_size(width: int, height: int) -> int:
    return 512 if min(width, height) >= 512 else 256


def _raster_profile(item: Item, dtype: str, nodata: float | None) -> dict[str, Any]:
    info = item.info
    b = _tile_size(info.width, info.height)
    prof: dict[str, Any] = dict(
        driver="GTiff",
        width=info.width,
        height=info.height,
        count=1,
        dtype=dtype,
        tiled=True,
        blockxsize=b,
        blockysize=b,
        compress="deflate",
        BIGTIFF="IF_SAFER",
    )
    if nodata is not None:
        prof["nodata"] = nodata
    if info.crs_wkt:
        prof["crs"] = CRS.from_wkt(info.crs_wkt)
    if info.transform:
        prof["transform"] = Affine(*info.transform)
    return prof


def _to_cog(tmp: Path, final: Path, resampling: str) -> None:
    """Rewrite ``tmp`` as a COG at ``final`` (deflate, 512 tiles, overviews); fall back to internal
    overviews on the plain GTiff when the COG driver is missing or fails."""
    try:
        with _NoGeoWarnings():
            rasterio.shutil.copy(
                str(tmp), str(final), driver="COG", compress="DEFLATE", blocksize=512,
                overview_resampling=resampling.upper(), BIGTIFF="IF_SAFER",
            )
        tmp.unlink()
        return
    except _GDAL_ERRORS:
        final.unlink(missing_ok=True)
    with _NoGeoWarnings(), rasterio.open(tmp, "r+") as ds:
        factors = [f for f in (2, 4, 8, 16, 32, 64) if max(ds.width, ds.height) // f >= 256]
        if factors:
            ds.build_overviews(factors, Resampling[resampling])
    tmp.replace(final)


class GeoTiffMaskSink(MaskSink):
    """Streams class (and confidence) blocks to tiled GTiffs; on close: COGs, GeoJSON polygons, overlay.

    Memory: one block plus GDAL's block cache while writing; one ``polygon_chunk``² chunk while
    polygonizing. ``class_counts`` ``(256,) int64`` holds per-class valid pixel counts (255 = no data).
    """

    def __init__(
        self,
        item: Item,
        out_dir: Path,
        class_names: Sequence[str],
        colors: Sequence[tuple[int, int, int]],
        *,
        confidence: bool = True,
        polygons: bool = True,
        skip_classes: Iterable[int] | None = None,
        polygon_chunk: int = 2048,
        overlay_size: int = 1024,
        overlay: bool = True,
    ) -> None:
        self.item = item
        self.overlay = overlay
        self.out_dir = Path(out_dir)
        self.class_names = list(class_names)
        self.colors = [tuple(c) for c in colors]
        self.skip = set(skip_classes) if skip_classes is not None else background_ids(self.class_names)
        self.polygon_chunk = polygon_chunk
        self.overlay_size = overlay_size
        self.polygons = polygons
        self.class_counts = np.zeros(256, np.int64)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stem = output_stem(item)
        self._tmp_cls = self.out_dir / f".{self.stem}_classes.partial.tif"
        self._tmp_conf = self.out_dir / f".{self.stem}_confidence.partial.tif" if confidence else None
        self._closed = False
        try:
            with _NoGeoWarnings():
                self._cls = rasterio.open(self._tmp_cls, "w", **_raster_profile(item, "uint8", NODATA_CLASS))
                self._conf = (
                    rasterio.open(self._tmp_conf, "w", **_raster_profile(item, "uint8", 0))
                    if self._tmp_conf
                    else None
                )
        except _GDAL_ERRORS as e:
            raise AdapterError(f"{self.stem}: cannot create output rasters in {self.out_dir}: {e}") from e

    def write(self, window: Window, classes: np.ndarray, confidence: np.ndarray) -> None:
        """Write one finished block: ``classes`` ``(h, w) uint8``, ``confidence`` ``(h, w) float32`` in
        [0, 1] (stored as uint8 1..255, 0 = no data). Item nodata pixels become class 255."""
        info = self.item.info
        c0, r0, w, h = int(window.col_off), int(window.row_off), int(window.width), int(window.height)
        if c0 < 0 or r0 < 0 or c0 + w > info.width or r0 + h > info.height:
            raise ValueError(f"window {_wstr(window)} outside the {info.width}x{info.height} raster")
        if classes.shape != (h, w) or confidence.shape != (h, w):
            raise ValueError(f"block shapes {classes.shape}/{confidence.shape} do not match window {(h, w)}")
        cls = classes.astype(np.uint8, copy=True)
        valid = self.item.valid_mask(window)
        if valid is not None:
            cls[~valid] = NODATA_CLASS
        self.class_counts += np.bincount(cls.ravel(), minlength=256)
        self._cls.write(cls, 1, window=window)
        if self._conf is not None:
            conf = np.clip(np.rint(np.nan_to_num(confidence, nan=0.0) * 255.0), 1, 255).astype(np.uint8)
            conf[cls == NODATA_CLASS] = 0
            self._conf.write(conf, 1, window=window)

    def class_areas(self) -> dict[int, float]:
        """Area of each predicted class in ``info.area_unit`` (m²), or in pixels when there is no scale."""
        px = self.item.info.pixel_area or 1.0
        return {int(c): float(n) * px for c, n in enumerate(self.class_counts[:NODATA_CLASS]) if n}

    def close(self) -> list[Artifact]:
        """Finalise: ``<stem>_classes.tif`` (COG), ``<stem>_confidence.tif`` (COG),
        ``<stem>_polygons.geojson`` (rasters with a CRS only) and ``<stem>_overlay.png``."""
        if self._closed:
            raise AdapterError(f"{self.stem}: sink already closed")
        self._closed = True
        try:
            self._cls.close()
            if self._conf is not None:
                self._conf.close()
            arts: list[Artifact] = []
            cls_path = self.out_dir / f"{self.stem}_classes.tif"
            _to_cog(self._tmp_cls, cls_path, "nearest")
            arts.append(Artifact("class_raster", cls_path, "image/tiff; application=geotiff"))
            if self._tmp_conf is not None:
                conf_path = self.out_dir / f"{self.stem}_confidence.tif"
                _to_cog(self._tmp_conf, conf_path, "average")
                arts.append(Artifact("confidence", conf_path, "image/tiff; application=geotiff"))
            crs = CRS.from_wkt(self.item.info.crs_wkt) if self.item.info.crs_wkt else None
            if self.polygons and crs is not None:
                gj = self.out_dir / f"{self.stem}_polygons.geojson"
                polygonize_classes(cls_path, gj, self.class_names, skip=self.skip, chunk=self.polygon_chunk)
                arts.append(Artifact("geojson", gj, "application/geo+json"))
                gpkg = self.out_dir / f"{self.stem}_polygons.gpkg"
                if geojson_to_gpkg(gj, gpkg, crs, "polygons"):
                    arts.append(Artifact("gpkg", gpkg, "application/geopackage+sqlite3"))
            if self.overlay:
                ov = self.out_dir / f"{self.stem}_overlay.png"
                write_raster_overlay(self.item, cls_path, ov, self.colors, self.skip, self.overlay_size)
                arts.append(Artifact("overlay", ov, "image/png"))
            return arts
        except _GDAL_ERRORS as e:
            raise AdapterError(f"{self.stem}: writing outputs failed: {e}") from e


def polygonize_classes(
    class_raster: Path,
    out_path: Path,
    class_names: Sequence[str],
    *,
    skip: set[int] | None = None,
    chunk: int = 2048,
) -> int:
    """Polygons of each class of a single-band uint8 class raster as GeoJSON in the raster's CRS.

    Properties: ``class_id``, ``class_name``, ``area`` (map units²), ``area_m2`` (None when the unit is
    unknown). Pixels equal to nodata (255) or in ``skip`` never become polygons. Reads ``chunk``²
    windows so memory stays bounded; polygons that reach a chunk edge inside the raster are held back and
    merged with their neighbours across the edge (shapely union in pixel coordinates, where the shared
    edges are exact), so a region crossing a chunk edge is still one feature. Returns the number of features.
    """
    import shapely
    from shapely.affinity import affine_transform
    from shapely.geometry import mapping, shape

    skip = set(skip or ()) | {NODATA_CLASS}
    with _NoGeoWarnings(), rasterio.open(class_raster) as ds:
        if ds.crs is None:
            raise AdapterError(f"{Path(class_raster).name}: no CRS, cannot write polygons")
        factor = _unit_factor(ds.crs)
        t = ds.transform
        to_map = [t.a, t.b, t.d, t.e, t.c, t.f]
        writer = _GeoJsonWriter(out_path, ds.crs)
        pending: dict[int, list[Any]] = {}

        def write(geom_px: Any, cid: int) -> None:
            g = mapping(affine_transform(geom_px, to_map))
            props = {"class_id": cid, "class_name": _name(class_names, cid)}
            props.update(_area_props(g["coordinates"], ds.crs, factor))
            writer.add(g, props)

        try:
            for r0 in range(0, ds.height, chunk):
                for c0 in range(0, ds.width, chunk):
                    win = Window(c0, r0, min(chunk, ds.width - c0), min(chunk, ds.height - r0))
                    data = ds.read(1, window=win)
                    keep = ~np.isin(data, list(skip))
                    if not keep.any():
                        continue
                    r1, c1 = r0 + win.height, c0 + win.width
                    for geom, value in shapes(data, mask=keep, connectivity=4,
                                              transform=rasterio.Affine.translation(c0, r0)):
                        poly = shape(geom)
                        x0, y0, x1, y1 = poly.bounds
                        at_seam = ((x0 == c0 and c0 > 0) or (y0 == r0 and r0 > 0)
                                   or (x1 == c1 and c1 < ds.width) or (y1 == r1 and r1 < ds.height))
                        if at_seam:
                            pending.setdefault(int(value), []).append(poly)
                        else:
                            write(poly, int(value))
            for cid, polys in sorted(pending.items()):
                merged = shapely.union_all(polys)
                for part in getattr(merged, "geoms", [merged]):
                    if isinstance(part, shapely.Polygon) and not part.is_empty:
                        write(part, cid)
        finally:
            writer.close()
        return writer.count


def _name(class_names: Sequence[str], cid: int) -> str:
    return class_names[cid] if 0 <= cid < len(class_names) else f"class_{cid}"


def write_raster_overlay(
    item: Item,
    class_raster: Path,
    out_path: Path,
    colors: Sequence[tuple[int, int, int]],
    skip: set[int],
    max_size: int = 1024,
) -> None:
    """A decimated ``(H', W', 3)`` preview of ``item`` blended with its class raster, saved as PNG."""
    rgb = item.preview(max_size)
    h, w = rgb.shape[:2]
    with _NoGeoWarnings(), rasterio.open(class_raster) as ds:
        cls = ds.read(1, out_shape=(h, w), resampling=Resampling.nearest)
    Image.fromarray(blend_overlay(rgb, cls, colors, skip=skip)).save(out_path)


# --------------------------------------------------------------------------------------------- instances


def _counts_from_string(s: str | bytes) -> list[int]:
    """Decode pycocotools' compressed RLE string (LEB128-like, 6 bits per char, delta-coded)."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        x = k = 0
        more = True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_crop(rle: dict[str, Any]) -> tuple[np.ndarray, int, int] | None:
    """Decode a COCO RLE (``{"size": [H, W], "counts": str | bytes | list}``) into its tight bounding crop.

    Returns ``(mask (h, w) bool, row0, col0)`` or None for an empty mask. Memory is the crop, never
    ``H * W`` (full-scene instance masks of large rasters would not fit).
    """
    h, _ = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = np.asarray(
        _counts_from_string(counts) if isinstance(counts, (str, bytes)) else list(counts), np.int64
    )
    ends = np.cumsum(runs)
    starts = ends - runs
    ones = (np.arange(len(runs)) % 2 == 1) & (runs > 0)  # runs alternate 0s, 1s, starting with 0s
    s, e = starts[ones], ends[ones]
    if s.size == 0:
        return None
    # Split each run of ones into per-column segments (column-major order).
    segs: list[tuple[int, int, int]] = []
    for a, b in zip(s.tolist(), e.tolist(), strict=True):
        while a < b:
            col, row = divmod(a, h)
            stop = min(b, (col + 1) * h)
            segs.append((col, row, row + stop - a))
            a = stop
    seg = np.asarray(segs, np.int64)
    c0, c1 = int(seg[:, 0].min()), int(seg[:, 0].max()) + 1
    r0, r1 = int(seg[:, 1].min()), int(seg[:, 2].max())
    out = np.zeros((r1 - r0, c1 - c0), bool)
    for col, ra, rb in segs:
        out[ra - r0 : rb - r0, col - c0] = True
    return out, r0, c0


def write_geotiff_instances(
    item: Item,
    instances: Sequence[Any],
    out_dir: Path,
    class_names: Sequence[str],
) -> list[Artifact]:
    """Instance outputs of a raster (see :meth:`GeoTiffFormat.write_instances`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(item)
    info = item.info
    n = len(instances)
    id_dtype = "uint16" if n < 65535 else "uint32"
    tmp_ids = out_dir / f".{stem}_instances.partial.tif"
    tmp_cls = out_dir / f".{stem}_instance_classes.partial.tif"
    crs = CRS.from_wkt(info.crs_wkt) if info.crs_wkt else None
    gj: _GeoJsonWriter | None = None
    gj_path = out_dir / f"{stem}_instances.geojson"
    if crs is not None:
        gj = _GeoJsonWriter(gj_path, crs)
    factor = _unit_factor(crs) if crs is not None else None
    transform = Affine(*info.transform) if info.transform else Affine.identity()
    try:
        with _NoGeoWarnings(), rasterio.open(tmp_ids, "w+", **_raster_profile(item, id_dtype, None)) as ids, \
                rasterio.open(tmp_cls, "w+", **_raster_profile(item, "uint8", NODATA_CLASS)) as cls:
            # Highest score first: where instances overlap, the more confident one keeps the pixel.
            for k in sorted(range(n), key=lambda j: -float(instances[j].score)):
                inst = instances[k]
                size = [int(v) for v in inst.rle["size"]]
                if size != [info.height, info.width]:
                    raise AdapterError(f"{stem}: instance {k + 1} mask is {size}, raster is "
                                       f"[{info.height}, {info.width}]")
                crop = rle_crop(inst.rle)
                if crop is None:
                    continue
                m, r0, c0 = crop
                win = Window(c0, r0, m.shape[1], m.shape[0])
                valid = item.valid_mask(win)
                if valid is not None:
                    m = m & valid
                cur = ids.read(1, window=win)
                put = m & (cur == 0)
                cur[put] = k + 1
                ids.write(cur, 1, window=win)
                cc = cls.read(1, window=win)
                cc[put] = int(inst.class_id)
                cls.write(cc, 1, window=win)
                if gj is not None and m.any():
                    polys = [g["coordinates"] for g, v in shapes(m.astype(np.uint8), mask=m, connectivity=8,
                                                                 transform=window_transform(win, transform))]
                    geom = ({"type": "Polygon", "coordinates": polys[0]} if len(polys) == 1
                            else {"type": "MultiPolygon", "coordinates": polys})
                    area = [_area_props(p, crs, factor) for p in polys]
                    gj.add(geom, {
                        "instance_id": k + 1,
                        "class_id": int(inst.class_id),
                        "class_name": _name(class_names, int(inst.class_id)),
                        "score": round(float(inst.score), 5),
                        "pixels": int(m.sum()),
                        "area": sum(a["area"] for a in area),
                        "area_m2": (sum(a["area_m2"] for a in area)
                                    if all(a["area_m2"] is not None for a in area) else None),
                    })
    except _GDAL_ERRORS as e:
        raise AdapterError(f"{stem}: writing instance outputs failed: {e}") from e
    finally:
        if gj is not None:
            gj.close()
    ids_path = out_dir / f"{stem}_instances.tif"
    cls_path = out_dir / f"{stem}_instance_classes.tif"
    _to_cog(tmp_ids, ids_path, "nearest")
    _to_cog(tmp_cls, cls_path, "nearest")
    arts = [
        Artifact("instance_raster", ids_path, "image/tiff; application=geotiff"),
        Artifact("class_raster", cls_path, "image/tiff; application=geotiff"),
    ]
    if gj is not None:
        arts.append(Artifact("geojson", gj_path, "application/geo+json"))
        gpkg = out_dir / f"{stem}_instances.gpkg"
        if geojson_to_gpkg(gj_path, gpkg, crs, "instances"):
            arts.append(Artifact("gpkg", gpkg, "application/geopackage+sqlite3"))
    return arts


# --------------------------------------------------------------------------------------------- format


class GeoTiffFormat(Format):
    """GeoTIFFs, other georeferenced or non-photo TIFFs (many bands, 16-bit, float), JPEG 2000, and PNG/JPEG
    georeferenced by a world file, via rasterio. Outputs are GeoTIFFs whatever the input."""

    name = "geotiff"

    def __init__(self, *, confidence: bool = True, polygons: bool = True, polygon_chunk: int = 2048) -> None:
        self.confidence = confidence
        self.polygons = polygons
        self.polygon_chunk = polygon_chunk

    def sniff(self, path: str, head: bytes) -> bool:
        """JPEG 2000 (any); TIFF when :func:`looks_geospatial` (plain 8-bit RGB/gray TIFFs go to the photo
        adapter); PNG or JPEG only with a world file or ``.aux.xml`` beside it that georeferences it."""
        if head.startswith(_JP2):
            return True  # GDAL decodes JPEG 2000 where Pillow's decoder fails on GDAL-written files
        if head.startswith(_TIFF):
            return looks_geospatial(path)
        if head.startswith(_PNG_JPEG) and has_geo_sidecar(path):
            return looks_geospatial(path)
        return False

    def open(self, path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Source:
        """Opens the header only; :class:`InputTooLarge` when width * height > ``max_pixels``,
        :class:`AdapterError` naming the file for corrupt/unreadable rasters."""
        return GeoTiffSource(path, max_pixels=max_pixels)

    def semantic_sink(
        self, item: Item, out_dir: Path, class_names: Sequence[str], colors: Sequence[tuple[int, int, int]]
    ) -> MaskSink:
        # A part of a split raster writes its strip only; polygons and the overlay are made once for the
        # whole raster in finalize_group, so nothing is cut at part borders.
        part = isinstance(item, RegionItem)
        return GeoTiffMaskSink(
            item, out_dir, class_names, colors,
            confidence=self.confidence, polygons=self.polygons and not part, polygon_chunk=self.polygon_chunk,
            overlay=not part,
        )

    def finalize_group(
        self,
        items: Sequence[Item],
        mask_files: Sequence[Path],
        out_dir: Path,
        class_names: Sequence[str],
        colors: Sequence[tuple[int, int, int]],
    ) -> list[Artifact]:
        """Mosaic the parts of a split raster into whole-raster outputs (kinds ``full_class_raster``,
        ``full_geojson``, ``full_overlay``), streaming block by block; polygons are traced on the mosaic
        so buildings on part borders stay whole."""
        parts = [(it, Path(f)) for it, f in zip(items, mask_files, strict=True) if isinstance(it, RegionItem)]
        if not parts:
            return []
        base = parts[0][0].base
        sink = GeoTiffMaskSink(base, out_dir, class_names, colors, confidence=False, polygons=self.polygons,
                               polygon_chunk=self.polygon_chunk)
        for it, path in parts:
            with _NoGeoWarnings(), rasterio.open(path) as ds:
                for _, win in ds.block_windows(1):
                    cls = ds.read(1, window=win)
                    full = Window(win.col_off, win.row_off + it.start, win.width, win.height)
                    sink.write(full, cls, np.zeros(cls.shape, np.float32))
        return [Artifact(f"full_{a.kind}", a.path, a.media_type) for a in sink.close()]

    def write_instances(
        self,
        item: Item,
        instances: Sequence[Any],
        out_dir: Path,
        class_names: Sequence[str],
        colors: Sequence[tuple[int, int, int]],
    ) -> list[Artifact]:
        """``<stem>_instances.tif`` (kind ``instance_raster``; uint16/uint32 ids 1..N in input order, 0 =
        none), ``<stem>_instance_classes.tif`` (``class_raster``; 255 = none) in the source CRS, and
        ``<stem>_instances.geojson`` (``geojson``; one feature per instance with ``instance_id``,
        ``class_id``, ``class_name``, ``score``, ``pixels``, ``area``, ``area_m2``) when the raster has a
        CRS. Overlapping pixels go to the higher score; nodata pixels are never assigned."""
        return write_geotiff_instances(item, instances, out_dir, class_names)


def same_grid(a: ItemInfo, b: ItemInfo, tol: float = 1e-6) -> bool:
    """True when two items lie on one pixel grid: the same size, and, when both are georeferenced, the same
    CRS and corners (to ``tol`` of a pixel). Without georeference on either side, the size decides."""
    if (a.height, a.width) != (b.height, b.width) or a.transform is None or b.transform is None:
        return (a.height, a.width) == (b.height, b.width)
    if a.crs_wkt and b.crs_wkt and CRS.from_wkt(a.crs_wkt) != CRS.from_wkt(b.crs_wkt):
        return False
    ta, tb = Affine(*a.transform), Affine(*b.transform)
    corners = [(0, 0), (a.width, 0), (0, a.height), (a.width, a.height)]
    size = max(abs(ta.a), abs(ta.e), 1e-12)
    return all(abs(x1 - x2) <= tol * size and abs(y1 - y2) <= tol * size
               for (x1, y1), (x2, y2) in ((ta @ c, tb @ c) for c in corners))


def reproject_labels(labels: np.ndarray, src: ItemInfo, dst: ItemInfo, fill: int = NODATA_CLASS) -> np.ndarray:
    """Class ids ``(H, W) uint8`` on ``src``'s georeferenced grid, resampled (nearest, so no invented
    classes) onto ``dst``'s ``(H', W')`` grid, in any CRS; pixels of ``dst`` outside ``src`` get ``fill``.
    For ground truth rasterised on another extent or resolution than the image it scores."""
    from rasterio.warp import reproject

    if src.transform is None or dst.transform is None or not src.crs_wkt or not dst.crs_wkt:
        raise AdapterError("labels and image must both be georeferenced to be put on one grid")
    out = np.full((dst.height, dst.width), fill, np.uint8)
    reproject(np.ascontiguousarray(labels, np.uint8), out, src_transform=Affine(*src.transform),
              src_crs=CRS.from_wkt(src.crs_wkt), dst_transform=Affine(*dst.transform),
              dst_crs=CRS.from_wkt(dst.crs_wkt), src_nodata=fill, dst_nodata=fill,
              resampling=Resampling.nearest)
    return out
