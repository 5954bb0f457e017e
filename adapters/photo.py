"""Photos (JPEG, PNG, non-geo TIFF, WebP, AVIF, HEIC/HEIF, BMP, GIF) through Pillow (HEIC with pillow-heif,
the ``heic`` extra).

A photo source has one item (key ``""``). Pixels are always ``(3, H, W) uint8`` RGB after EXIF orientation:
grayscale, palette, CMYK and RGBA inputs are converted, 16-bit inputs are scaled by 1/257 (full range, so
values keep their meaning), float inputs are min-max stretched. Fully transparent pixels (alpha == 0) are
reported by :meth:`PhotoItem.valid_mask` as no data. A multi-page TIFF (an image stack: microscopy, scanned
pages) has one item per page, keys ``page-0000``, ``page-0001``, ...; pages that are reduced-resolution copies
or transparency masks of another page (TIFF ``NewSubfileType``) are not items of their own. Animations (GIF,
WebP, APNG) use their first frame only; ``info.warnings`` says so.

Outputs: a palette PNG class mask (index = class id, 255 = no data), an RGB overlay PNG, and for instance
models a COCO JSON (``images``/``categories``/``annotations``; ``annotations`` alone is a valid COCO results
list for ``COCO.loadRes``) plus an overlay with coloured instances and ``class score`` labels.

The small rendering helpers here (:func:`blend_overlay`, :func:`background_ids`, :func:`palette_bytes`) are
reused by the GeoTIFF adapter for its preview overlay.
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFile, ImageFont, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils

from adapters.base import (
    DEFAULT_MAX_PIXELS,
    AdapterError,
    Artifact,
    Format,
    InputTooLarge,
    Item,
    ItemInfo,
    MaskSink,
    Source,
    UnsupportedInput,
    Window,
    page_key,
    page_number,
    safe_stem,
)

__all__ = [
    "PhotoFormat",
    "PhotoItem",
    "PhotoMaskSink",
    "PhotoSource",
    "background_ids",
    "blend_overlay",
    "output_stem",
    "palette_bytes",
    "to_rgb_uint8",
]

#: Class value meaning "no data" in every class mask this service writes.
NODATA_CLASS = 255

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
_GIF = (b"GIF87a", b"GIF89a")
_BMP = b"BM"
_TIFF = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_EXIF_ORIENTATION = 0x0112
_NEW_SUBFILE_TYPE = 254
#: NewSubfileType bits of a page that is not an image of its own: a reduced-resolution copy (an overview)
#: or a transparency mask of another page.
_NOT_AN_IMAGE = 0x1 | 0x4
#: Pillow errors that mean "this file is broken", as opposed to bugs in our code.
_PIL_ERRORS = (
    UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError
)


#: ISO base media file brands of still images: HEIF/HEIC (phone cameras since 2017) and AVIF.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})


def isobmff_brand(head: bytes) -> str | None:
    """``"avif"`` or ``"heif"`` when ``head`` (the file's first bytes) opens an ISO-BMFF ``ftyp`` box naming
    one of their brands, major or compatible (AVIF wins: AVIF files also list the generic ``mif1``); else None.
    """
    if head[4:8] != b"ftyp":
        return None
    size = int.from_bytes(head[:4], "big")
    end = min(max(size, 16), len(head), 256)
    brands = {head[8:12]} | {head[i : i + 4] for i in range(16, end - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "avif"
    if brands & _HEIF_BRANDS:
        return "heif"
    return None


@cache
def _heif_opener() -> bool:
    """Register pillow-heif's HEIC/HEIF opener with Pillow (once per process); False when not installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


# --------------------------------------------------------------------------------------------- rendering


def background_ids(class_names: Sequence[str]) -> set[int]:
    """Ids of classes named ``background`` (case-insensitive); overlays leave them transparent."""
    return {i for i, n in enumerate(class_names) if n.strip().lower() == "background"}


def palette_bytes(colors: Sequence[tuple[int, int, int]]) -> list[int]:
    """A 768-entry Pillow palette: index ``i`` -> ``colors[i]``, unused indices (and 255, no data) black."""
    pal = [0] * 768
    for i, c in enumerate(colors[:NODATA_CLASS]):
        pal[3 * i : 3 * i + 3] = [int(v) & 0xFF for v in c]
    return pal


def blend_overlay(
    rgb: np.ndarray,
    classes: np.ndarray,
    colors: Sequence[tuple[int, int, int]],
    *,
    skip: set[int] | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend class colours over an image.

    ``rgb`` ``(H, W, 3) uint8``, ``classes`` ``(H, W) uint8`` class ids; pixels whose class is in ``skip``,
    is 255 (no data) or has no colour are left as they are. Returns ``(H, W, 3) uint8``.
    """
    if rgb.shape[:2] != classes.shape:
        raise ValueError(f"image {rgb.shape[:2]} and classes {classes.shape} differ in size")
    lut = np.zeros((256, 3), np.float32)
    paint = np.zeros(256, bool)
    for i, c in enumerate(colors[:NODATA_CLASS]):
        lut[i] = c
        paint[i] = i not in (skip or set())
    sel = paint[classes]
    out = np.array(rgb, dtype=np.uint8, copy=True)
    # Only painted pixels are converted to float: on a camera photo most are background, and a full-size
    # float32 copy costs more than the blend itself.
    blended = (1.0 - alpha) * rgb[sel].astype(np.float32) + alpha * lut[classes[sel]]
    out[sel] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


def output_stem(item: Item) -> str:
    """File-name stem for an item's outputs: the source file's stem, plus the item key when it has one."""
    stem = Path(str(getattr(item, "path", "") or "item").rstrip("/")).stem or "item"
    # Keys may hold '/', ':' or '=' (series paths, row ranges of split rasters): keep file names plain.
    key = re.sub(r"[^A-Za-z0-9._-]+", "-", getattr(item, "key", "")).strip("-")
    return safe_stem(f"{stem}_{key}" if key else stem)


# --------------------------------------------------------------------------------------------- decoding


def to_rgb_uint8(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Any Pillow image as ``(H, W, 3) uint8`` RGB and an ``(H, W) bool`` alpha-valid mask (None if opaque).

    16-bit integer modes are scaled by 1/257 so that 65535 -> 255; float modes are min-max stretched.
    """
    alpha: np.ndarray | None = None
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = np.asarray(im.getchannel("A")) > 0
        if alpha.all():
            alpha = None
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im).astype(np.float64)
        if im.mode == "F":
            finite = arr[np.isfinite(arr)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            arr = (np.nan_to_num(arr, nan=lo) - lo) / max(hi - lo, 1e-12) * 255.0
        elif arr.max(initial=0) > 255:
            # 16-bit data: full-range scale keeps the meaning of values (a stretch would not).
            arr = arr / 257.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), alpha
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8), alpha


def _label_values(im: Image.Image, name: str) -> np.ndarray:
    """``(H, W)`` integer class values of a label image (see :meth:`PhotoItem.read_labels`)."""
    if im.mode in ("P", "PA"):
        return np.asarray(im.getchannel(0) if im.mode == "PA" else im)
    if im.mode in ("L", "LA", "1") or im.mode.startswith("I"):
        arr = np.asarray(im.getchannel(0) if im.mode == "LA" else im)
        return arr.astype(np.uint8) if arr.dtype == bool else arr
    if im.mode == "F":
        arr = np.asarray(im)
        if np.isfinite(arr).all() and np.array_equal(arr, np.rint(arr)):
            return arr.astype(np.int64)
        raise AdapterError(f"{name}: label image holds values that are not integers")
    if im.mode in ("RGB", "RGBA"):
        rgb = np.asarray(im)[..., :3]
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return rgb[..., 0]
    raise AdapterError(f"{name}: a {im.mode} colour image cannot be ground truth; save class values as a "
                       "greyscale, palette (indexed) or 16-bit image")


class PhotoItem(Item):
    """One image of a photo file (the photo, or one page of a TIFF stack); decoded on first use and cached
    (photos are small).

    ``image`` is the file opened by Pillow (header parsed, no pixels yet); None for a page of a stack, which
    opens the file again when it is decoded, so that pages neither share a file position nor hold one
    decoded page each until the whole stack is done.
    """

    streamable = False

    def __init__(self, path: str, image: Image.Image | None, info: ItemInfo, *, key: str = "",
                 page: int = 0) -> None:
        self.path = path
        self.key = key
        self.page = page
        self.group = None
        self.info = info
        self._image: Image.Image | None = image
        self._done = False
        self._rgb: np.ndarray | None = None
        self._alpha: np.ndarray | None = None
        self._lock = threading.Lock()

    def _decode(self) -> np.ndarray:
        with self._lock:
            if self._rgb is not None:
                return self._rgb
            name = Path(self.path).name
            if self._done:
                raise AdapterError(f"{name}: source already closed")
            if self.key:
                name = f"{name} [{self.key}]"
            try:
                if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone flipped Pillow's global: truncation would pass
                    raise AdapterError(f"{name}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; refusing to decode")
                if self._image is None:
                    self._image = _open_image(self.path)
                im = self._image
                im.seek(self.page)
                im.load()
                im = ImageOps.exif_transpose(im)
                rgb, alpha = to_rgb_uint8(im)
            except _PIL_ERRORS as e:
                raise AdapterError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from e
            finally:
                if self._image is not None:
                    self._image.close()
                self._image = None
                self._done = True
            if rgb.shape[:2] != (self.info.height, self.info.width):
                raise AdapterError(
                    f"{name}: decoded size {rgb.shape[1]}x{rgb.shape[0]} differs from the header's "
                    f"{self.info.width}x{self.info.height}"
                )
            self._rgb = np.ascontiguousarray(rgb.transpose(2, 0, 1))
            self._alpha = alpha
            return self._rgb

    def read_labels(self, window: Window | None = None) -> np.ndarray:
        """``(h, w)`` label values of ``window`` (whole image if None) as stored, EXIF orientation applied:
        palette indices of a ``P`` image (a VOC-style mask, or this service's own ``mask_png``), raw
        8/16/32-bit values, 0/1 for bilevel. Photo reading converts to display RGB, which would turn palette
        indices into colours and scale 16-bit values by 1/257. A colour image counts only when it is grey."""
        name = Path(self.path).name + (f" [{self.key}]" if self.key else "")
        if ImageFile.LOAD_TRUNCATED_IMAGES:  # a truncated label would pass, completed with zeros
            raise AdapterError(f"{name}: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; refusing to decode")
        try:
            with _open_image(self.path) as im:
                im.seek(self.page)
                im.load()
                labels = _label_values(ImageOps.exif_transpose(im), name)
        except _PIL_ERRORS as e:
            raise AdapterError(f"{name}: cannot decode label image ({type(e).__name__}: {e})") from e
        if window is None:
            return labels
        r0, r1, c0, c1 = _bounds(window, self.info)
        return labels[r0:r1, c0:c1]

    def read(self, window: Window | None = None) -> np.ndarray:
        """``(3, h, w) uint8`` RGB of ``window`` (whole image if None), EXIF orientation applied."""
        rgb = self._decode()
        if window is None:
            return rgb
        r0, r1, c0, c1 = _bounds(window, self.info)
        return rgb[:, r0:r1, c0:c1]

    def valid_mask(self, window: Window | None = None) -> np.ndarray | None:
        """``(h, w) bool``: False where the image is fully transparent; None for opaque images."""
        self._decode()
        if self._alpha is None:
            return None
        if window is None:
            return self._alpha
        r0, r1, c0, c1 = _bounds(window, self.info)
        return self._alpha[r0:r1, c0:c1]

    def preview(self, max_size: int = 1024) -> np.ndarray:
        """``(H, W, 3) uint8``, downscaled (Lanczos) so that the longer side is at most ``max_size``."""
        rgb = self._decode().transpose(1, 2, 0)
        h, w = rgb.shape[:2]
        scale = max_size / max(h, w)
        if scale >= 1:
            return np.ascontiguousarray(rgb)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))

    def close(self) -> None:
        with self._lock:
            if self._image is not None:
                self._image.close()
                self._image = None
            self._done = True


def _bounds(window: Window, info: ItemInfo) -> tuple[int, int, int, int]:
    r0, c0 = int(window.row_off), int(window.col_off)
    r1, c1 = r0 + int(window.height), c0 + int(window.width)
    if r0 < 0 or c0 < 0 or r1 > info.height or c1 > info.width or r1 <= r0 or c1 <= c0:
        raise ValueError(f"window {window} outside the {info.width}x{info.height} image")
    return r0, r1, c0, c1


class PhotoSource(Source):
    """An opened photo file: one item, or one per page of a TIFF stack."""

    format = "photo"

    def __init__(self, path: str, items: Sequence[PhotoItem]) -> None:
        self.path = path
        self._items = list(items)

    def items(self) -> Iterator[Item]:
        yield from self._items

    def close(self) -> None:
        for it in self._items:
            it.close()


class _PhotoStack(PhotoSource):
    """A multi-page TIFF: one item per image page, made when asked for (:meth:`item` makes only the one named,
    as a worker needs), from the header handle the source keeps open until closed."""

    def __init__(self, path: str, im: Image.Image, pages: Sequence[int], skipped: int, max_pixels: int) -> None:
        super().__init__(path, [])
        self._im, self._pages, self._skipped, self._max_pixels = im, list(pages), skipped, max_pixels

    def _page(self, n: int) -> PhotoItem:
        name = f"{Path(self.path).name} page {n}"
        try:
            self._im.seek(self._pages[n])
        except _PIL_ERRORS as e:
            raise AdapterError(f"{name}: unreadable ({type(e).__name__}: {e})") from e
        info = _page_info(self._im, name, self._max_pixels, {"page": n, "pages": len(self._pages)})
        if self._skipped:
            info.warnings.append(f"{self._skipped} reduced-resolution or mask pages are not separate items")
        item = PhotoItem(self.path, None, info, key=page_key(n), page=self._pages[n])
        item.group = f"pages:{self.path}"  # finalised together: one mask stack for the stack
        self._items.append(item)
        return item

    def items(self) -> Iterator[Item]:
        for n in range(len(self._pages)):
            yield self._page(n)

    def item(self, key: str) -> Item:
        n = page_number(key, len(self._pages))
        return self._page(n) if n is not None else super().item(key)

    def close(self) -> None:
        super().close()
        self._im.close()


def _open_image(path: str) -> Image.Image:
    """``Image.open`` (header only) with Pillow's decompression-bomb warning silenced: the caller enforces
    its own pixel limit on the declared size, and Pillow's hard limit (2x MAX_IMAGE_PIXELS) still applies."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _page_info(im: Image.Image, name: str, max_pixels: int, extra: dict[str, Any]) -> ItemInfo:
    """What the current frame of ``im`` will decode to: size after EXIF orientation, source mode."""
    w, h = im.size
    if w <= 0 or h <= 0:
        raise AdapterError(f"{name}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise InputTooLarge(f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}")
    warn: list[str] = []
    try:
        orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except _PIL_ERRORS:
        orientation = 1
        warn.append("unreadable EXIF block ignored")
    if orientation in (5, 6, 7, 8):  # transposed: width and height swap after exif_transpose
        w, h = h, w
    return ItemInfo(height=h, width=w, bands=3, dtype="uint8", modality="photo", warnings=warn,
                    extra={"file_format": im.format, "source_mode": im.mode, "exif_orientation": orientation,
                           **extra})


def _tiff_pages(im: Image.Image, name: str, n_frames: int) -> tuple[list[int], int]:
    """``(pages, skipped)``: indices of the TIFF's pages that are images of their own, and how many pages are
    reduced-resolution copies or masks of another (``NewSubfileType``; GDAL writes overviews this way)."""
    pages, skipped = [], 0
    for i in range(n_frames):
        try:
            im.seek(i)
            kind = int(im.tag_v2.get(_NEW_SUBFILE_TYPE, 0) or 0)
        except _PIL_ERRORS as e:
            raise AdapterError(f"{name}: page {i} of {n_frames} is unreadable ({type(e).__name__}: {e})") from e
        if kind & _NOT_AN_IMAGE and i > 0:
            skipped += 1
        else:
            pages.append(i)
    return pages, skipped


def _open_photo(path: str, max_pixels: int) -> PhotoSource:
    name = Path(path).name
    p = Path(path)
    if not p.is_file():
        raise UnsupportedInput(f"{name}: no such file")
    if p.stat().st_size == 0:
        raise UnsupportedInput(f"{name}: empty file")
    with open(path, "rb") as fh:
        if isobmff_brand(fh.read(256)) == "heif" and not _heif_opener():
            raise UnsupportedInput(f"{name}: a HEIC/HEIF photo, and pillow-heif is not installed "
                                   "(pip install 'tileseg[heic]')")
    try:
        im = _open_image(path)  # header only: no pixel buffer yet
    except Image.DecompressionBombError as e:
        raise InputTooLarge(f"{name}: declared size is too large ({e})") from e
    except UnidentifiedImageError as e:
        raise UnsupportedInput(f"{name}: not a readable image (JPEG, PNG, TIFF, WebP, AVIF, HEIC, BMP, GIF)") from e
    except _PIL_ERRORS as e:
        raise AdapterError(f"{name}: corrupt image header ({type(e).__name__}: {e})") from e
    try:
        try:
            n_frames = int(getattr(im, "n_frames", 1) or 1)
        except _PIL_ERRORS as e:
            raise AdapterError(f"{name}: corrupt frame list ({type(e).__name__}: {e})") from e
        if n_frames > 1 and im.format == "TIFF":
            pages, skipped = _tiff_pages(im, name, n_frames)
            if len(pages) > 1:
                return _PhotoStack(path, im, pages, skipped, max_pixels)
            im.seek(0)  # one image and its overviews: an ordinary photo
            return PhotoSource(path, [PhotoItem(path, im, _page_info(im, name, max_pixels, {"frames": 1}))])
        info = _page_info(im, name, max_pixels, {"frames": n_frames})
        if n_frames > 1:
            info.warnings.append(f"{n_frames} frames (an animation); only the first is processed")
    except BaseException:
        im.close()
        raise
    return PhotoSource(path, [PhotoItem(path, im, info)])


# --------------------------------------------------------------------------------------------- outputs


class PhotoMaskSink(MaskSink):
    """Collects the whole class mask in memory (photos are small), writes PNGs on close."""

    def __init__(
        self,
        item: Item,
        out_dir: Path,
        class_names: Sequence[str],
        colors: Sequence[tuple[int, int, int]],
    ) -> None:
        self.item = item
        self.out_dir = Path(out_dir)
        self.class_names = list(class_names)
        self.colors = [tuple(c) for c in colors]
        self.classes = np.full((item.info.height, item.info.width), NODATA_CLASS, np.uint8)
        self._closed = False

    def write(self, window: Window, classes: np.ndarray, confidence: np.ndarray) -> None:
        """Store ``classes`` ``(h, w) uint8`` at ``window``; nodata pixels of the item become 255."""
        r0, r1, c0, c1 = _bounds(window, self.item.info)
        if classes.shape != (r1 - r0, c1 - c0):
            raise ValueError(f"classes {classes.shape} do not match window {window}")
        block = classes.astype(np.uint8, copy=True)
        valid = self.item.valid_mask(window)
        if valid is not None:
            block[~valid] = NODATA_CLASS
        self.classes[r0:r1, c0:c1] = block

    def close(self) -> list[Artifact]:
        """Writes ``<stem>_mask.png`` (palette, index = class id) and ``<stem>_overlay.png``."""
        if self._closed:
            raise AdapterError("sink already closed")
        self._closed = True
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = output_stem(self.item)
        mask_path = self.out_dir / f"{stem}_mask.png"
        png = Image.fromarray(self.classes, mode="P")
        png.putpalette(palette_bytes(self.colors))
        png.save(mask_path, compress_level=6)  # optimize=True cost as much as the model
        overlay_path = self.out_dir / f"{stem}_overlay.png"
        rgb = self.item.read().transpose(1, 2, 0)
        ov = blend_overlay(rgb, self.classes, self.colors, skip=background_ids(self.class_names))
        Image.fromarray(ov).save(overlay_path, compress_level=3)
        return [
            Artifact("mask_png", mask_path, "image/png"),
            Artifact("overlay", overlay_path, "image/png"),
        ]


def _rle_json(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    elif not isinstance(counts, str):  # uncompressed list counts: compress them
        h, w = rle["size"]
        counts = mask_utils.frPyObjects({"size": [h, w], "counts": list(counts)}, h, w)["counts"].decode()
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


def _class_name(class_names: Sequence[str], cid: int) -> str:
    return class_names[cid] if 0 <= cid < len(class_names) else f"class_{cid}"


def _instance_colour(colors: Sequence[tuple[int, int, int]], cid: int, k: int) -> tuple[int, int, int]:
    # Same class, different instances: vary the brightness so touching objects stay distinguishable.
    base = np.array(colors[cid] if 0 <= cid < len(colors) else (255, 0, 0), np.float32)
    f = (0.75, 1.0, 0.55, 0.9)[k % 4]
    return tuple(int(v) for v in np.clip(base * f + (1 - f) * 64, 0, 255))


def write_photo_instances(
    item: Item,
    instances: Sequence[Any],
    out_dir: Path,
    class_names: Sequence[str],
    colors: Sequence[tuple[int, int, int]],
) -> list[Artifact]:
    """COCO JSON and an instance overlay PNG for one photo (see :meth:`PhotoFormat.write_instances`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(item)
    h, w = item.info.height, item.info.width
    used = sorted({int(i.class_id) for i in instances} | set(range(len(class_names))))
    annotations = []
    for k, inst in enumerate(instances, start=1):
        rle = _rle_json(inst.rle)
        if rle["size"] != [h, w]:
            raise AdapterError(f"{stem}: instance {k} mask is {rle['size']}, image is [{h}, {w}]")
        annotations.append(
            {
                "id": k,
                "image_id": 1,
                "category_id": int(inst.class_id),
                "score": round(float(inst.score), 5),
                "bbox": [round(float(v), 2) for v in inst.box],
                "area": int(inst.area),
                "iscrowd": 0,
                "segmentation": rle,
            }
        )
    file_name = Path(str(getattr(item, "path", stem))).name
    coco = {
        "images": [{"id": 1, "file_name": file_name, "width": w, "height": h}],
        "categories": [{"id": c, "name": _class_name(class_names, c)} for c in used],
        "annotations": annotations,
    }
    json_path = out_dir / f"{stem}_coco.json"
    json_path.write_text(json.dumps(coco))

    rgb = item.read().transpose(1, 2, 0).astype(np.float32)
    labels = []
    # Paint low scores first so the most confident instance ends up on top.
    order = sorted(range(len(instances)), key=lambda j: float(instances[j].score))
    for j in order:
        inst = instances[j]
        m = mask_utils.decode(annotations[j]["segmentation"]).astype(bool)
        col = _instance_colour(colors, int(inst.class_id), j)
        rgb[m] = 0.45 * rgb[m] + 0.55 * np.array(col, np.float32)
        labels.append((inst, col))
    canvas = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, min(h, w) // 30))
    for inst, col in labels:
        x, y, bw, bh = (float(v) for v in inst.box)
        draw.rectangle([x, y, x + bw, y + bh], outline=col, width=max(1, min(h, w) // 200))
        text = f"{_class_name(class_names, int(inst.class_id))} {float(inst.score):.2f}"
        tx, ty = x + 2, max(0.0, y - font.size - 4)
        box = draw.textbbox((tx, ty), text, font=font)
        draw.rectangle(box, fill=col)
        draw.text((tx, ty), text, fill=(0, 0, 0) if sum(col) > 380 else (255, 255, 255), font=font)
    overlay_path = out_dir / f"{stem}_instances.png"
    canvas.save(overlay_path)
    return [
        Artifact("coco_json", json_path, "application/json"),
        Artifact("overlay", overlay_path, "image/png"),
    ]


class PhotoFormat(Format):
    """JPEG, PNG, TIFF without georeferencing, WebP, AVIF, HEIC/HEIF (pillow-heif), BMP and GIF via Pillow."""

    name = "photo"

    def sniff(self, path: str, head: bytes) -> bool:
        """Magic bytes (HEIC/HEIF and AVIF by their ``ftyp`` brands); TIFFs only when the GeoTIFF adapter does
        not claim them (no CRS, 1-3 uint8 bands)."""
        if head.startswith((_JPEG, _PNG, _BMP) + _GIF):
            return True
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return True
        if isobmff_brand(head) is not None:
            return True
        if head.startswith(_TIFF):
            from adapters.geotiff import looks_geospatial  # lazy: geotiff imports this module

            return not looks_geospatial(path)
        return False

    def open(self, path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Source:
        """Reads the header only (size, EXIF orientation, frames); pixels are decoded on first read.

        Raises :class:`InputTooLarge` when the declared size exceeds ``max_pixels`` (or Pillow's own
        decompression-bomb limit), :class:`UnsupportedInput` for non-images and empty files, and
        :class:`AdapterError` for corrupt or truncated files (at open or at the first read).
        """
        return _open_photo(path, max_pixels)

    def semantic_sink(
        self, item: Item, out_dir: Path, class_names: Sequence[str], colors: Sequence[tuple[int, int, int]]
    ) -> MaskSink:
        return PhotoMaskSink(item, out_dir, class_names, colors)

    def finalize_group(
        self,
        items: Sequence[Item],
        mask_files: Sequence[Path],
        out_dir: Path,
        class_names: Sequence[str],
        colors: Sequence[tuple[int, int, int]],
    ) -> list[Artifact]:
        """For the pages of a TIFF stack: ``<stem>_masks.tif`` (kind ``mask_stack``), the class masks as a
        multi-page TIFF in page order (8-bit class ids, 255 = no data, deflate), page ``i`` for input page
        ``i``, so that it lies over the input stack in Fiji or napari as a label layer.

        Raises :class:`AdapterError` when pages are missing (failed items): a stack with a page left out would
        put every later mask on the wrong slice.
        """
        if len(items) != len(mask_files):
            raise AdapterError("finalize_group: items and mask_files differ in length")
        if not items:
            return []
        pages = sorted(zip((it.info.extra.get("page", 0) for it in items), mask_files, strict=True))
        total = int(items[0].info.extra.get("pages", len(items)))
        if [p for p, _ in pages] != list(range(total)):
            missing = total - len({p for p, _ in pages})
            raise AdapterError(f"{Path(items[0].path).name}: {missing} of {total} pages have no mask; "
                               "no mask stack written (each page's mask is kept)")
        frames = []
        for _, f in pages:
            with Image.open(f) as im:
                frames.append(Image.fromarray(np.asarray(im, dtype=np.uint8)))  # palette PNG -> plain class ids
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{safe_stem(Path(items[0].path).stem)}_masks.tif"
        frames[0].save(path, save_all=True, append_images=frames[1:], compression="tiff_adobe_deflate")
        return [Artifact("mask_stack", path, "image/tiff")]

    def write_instances(
        self,
        item: Item,
        instances: Sequence[Any],
        out_dir: Path,
        class_names: Sequence[str],
        colors: Sequence[tuple[int, int, int]],
    ) -> list[Artifact]:
        """``<stem>_coco.json`` (kind ``coco_json``) and ``<stem>_instances.png`` (kind ``overlay``).

        The JSON holds ``images`` (one, id 1), ``categories`` (every class name plus any id used) and
        ``annotations``: ``{id, image_id, category_id, score, bbox [x, y, w, h] px, area px,
        segmentation: {"size": [H, W], "counts": str}}``.
        """
        return write_photo_instances(item, instances, out_dir, class_names, colors)
