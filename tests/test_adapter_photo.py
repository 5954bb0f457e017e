"""Photo adapter: real pet photos, every supported mode/format, EXIF orientation, sinks, COCO output, bad input."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from rasterio.windows import Window

from adapters.base import AdapterError, InputTooLarge, UnsupportedInput
from adapters.geotiff import GeoTiffFormat
from adapters.photo import PhotoFormat, blend_overlay
from pipelines.instances import Instance

PETS = Path(__file__).resolve().parents[2] / "shared" / "data" / "oxford_pets" / "images"
NAMES = ["background", "cat", "dog"]
COLORS = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]


@pytest.fixture
def fmt() -> PhotoFormat:
    return PhotoFormat()


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1024)


def _pet() -> Path:
    p = PETS / "Abyssinian_1.jpg"
    if not p.is_file():
        pytest.skip(f"real data absent: {p}")
    return p


def _open_one(fmt: PhotoFormat, path: Path, **kw):
    src = fmt.open(str(path), **kw)
    (item,) = list(src.items())
    return src, item


def test_real_pet_jpeg(fmt):
    p = _pet()
    assert fmt.sniff(str(p), _head(p)) and not GeoTiffFormat().sniff(str(p), _head(p))
    src, item = _open_one(fmt, p)
    with src:
        ref = np.asarray(Image.open(p).convert("RGB"))
        assert item.key == "" and not item.streamable
        assert (item.info.height, item.info.width, item.info.bands, item.info.dtype) == (*ref.shape[:2], 3, "uint8")
        px = item.read()
        assert px.shape == (3, *ref.shape[:2]) and px.dtype == np.uint8
        np.testing.assert_array_equal(px.transpose(1, 2, 0), ref)
        np.testing.assert_array_equal(item.read(Window(5, 7, 20, 10)), px[:, 7:17, 5:25])
        assert item.valid_mask() is None
        prev = item.preview(64)
        assert max(prev.shape[:2]) == 64 and prev.dtype == np.uint8


GRAD = np.stack([*np.meshgrid(np.arange(24) * 10, np.arange(16) * 15, indexing="xy"), np.full((16, 24), 77)],
                axis=-1).astype(np.uint8)  # (16, 24, 3)


@pytest.mark.parametrize(
    "name, make, expect",
    [
        ("gray.png", lambda: Image.fromarray(GRAD[..., 0]), lambda: np.repeat(GRAD[..., :1], 3, 2)),
        ("pal.png", lambda: Image.fromarray(GRAD).quantize(16), None),
        ("rgb.bmp", lambda: Image.fromarray(GRAD), lambda: GRAD),
        ("rgb.webp", lambda: Image.fromarray(GRAD), None),
        ("plain.tif", lambda: Image.fromarray(GRAD), lambda: GRAD),
        ("cmyk.jpg", lambda: Image.fromarray(GRAD).convert("CMYK"), None),
    ],
)
def test_modes_and_formats_become_rgb_uint8(tmp_path, fmt, name, make, expect):
    p = tmp_path / name
    im = make()
    im.save(p, **({"lossless": True} if name.endswith(".webp") else {}))
    assert fmt.sniff(str(p), _head(p))
    src, item = _open_one(fmt, p)
    with src:
        px = item.read()
    assert px.shape == (3, 16, 24) and px.dtype == np.uint8
    want = expect() if expect else np.asarray(Image.open(p).convert("RGB"))
    np.testing.assert_array_equal(px.transpose(1, 2, 0), want)


def test_16bit_png_scaled_full_range(tmp_path, fmt):
    arr = np.array([[0, 257, 65535], [1000, 30000, 65535]], np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(arr).save(p)
    src, item = _open_one(fmt, p)
    with src:
        px = item.read()
    np.testing.assert_array_equal(px[0], np.rint(arr / 257).astype(np.uint8))
    assert (px[0] == px[2]).all()


def test_rgba_transparency_is_nodata(tmp_path, fmt):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[:, :4, 3] = 0
    p = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(p)
    src, item = _open_one(fmt, p)
    with src:
        assert item.read().shape == (3, 10, 12)
        vm = item.valid_mask()
        assert not vm[:, :4].any() and vm[:, 4:].all()
        np.testing.assert_array_equal(item.valid_mask(Window(2, 0, 4, 3)), vm[:3, 2:6])


def test_multiframe_gif_uses_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (8, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    src, item = _open_one(fmt, p)
    with src:
        assert any("2 frames" in w for w in item.info.warnings)
        px = item.read()
    assert (px[0] > 200).all() and (px[2] < 50).all()


def test_multipage_tiff_is_one_item_per_page(tmp_path, fmt):
    """An image stack (here the U-Net paper's EM slices, as a microscope writes them) gives every page an
    item of its own; pages may differ in size and mode."""
    rng = np.random.default_rng(3)
    pages = [rng.integers(0, 255, (20, 30), np.uint8), rng.integers(0, 255, (12, 16), np.uint8),
             rng.integers(0, 255, (20, 30, 3), np.uint8)]
    ims = [Image.fromarray(a) for a in pages]
    p = tmp_path / "stack.tif"
    ims[0].save(p, save_all=True, append_images=ims[1:])
    assert fmt.sniff(str(p), _head(p))
    with fmt.open(str(p)) as src:
        items = list(src.items())
        assert [i.key for i in items] == ["page-0000", "page-0001", "page-0002"]
        assert [(i.info.height, i.info.width) for i in items] == [(20, 30), (12, 16), (20, 30)]
        assert [i.info.extra["page"] for i in items] == [0, 1, 2] and items[0].info.extra["pages"] == 3
        assert not any(i.info.warnings for i in items)
        # Pages decode in any order, each from its own page.
        np.testing.assert_array_equal(items[2].read().transpose(1, 2, 0), pages[2])
        np.testing.assert_array_equal(items[0].read()[1], pages[0])
        np.testing.assert_array_equal(src.item("page-0001").read()[0], pages[1])
        out = fmt.semantic_sink(items[1], tmp_path / "out", NAMES, COLORS)
        out.write(Window(0, 0, 16, 12), np.ones((12, 16), np.uint8), np.ones((12, 16), np.float32))
        names = {a.path.name for a in out.close()}
    assert names == {"stack_page-0001_mask.png", "stack_page-0001_overlay.png"}
    # A worker asks for one page: only that page's header is read into an item.
    with fmt.open(str(p)) as src:
        item = src.item("page-0002")
        assert item.key == "page-0002" and len(src._items) == 1
        np.testing.assert_array_equal(item.read().transpose(1, 2, 0), pages[2])


def test_real_em_stack_pages_match_the_slices(tmp_path, fmt):
    em = PETS.parents[1] / "isbi2012_em" / "images"
    if not em.is_dir():
        pytest.skip(f"real data absent: {em}")
    slices = [Image.open(em / f"{i:02d}.png") for i in range(4)]
    p = tmp_path / "train-volume.tif"
    slices[0].save(p, save_all=True, append_images=slices[1:])
    with fmt.open(str(p)) as src:
        items = list(src.items())
        assert len(items) == 4
        for it, sl in zip(items, slices, strict=True):
            np.testing.assert_array_equal(it.read()[0], np.asarray(sl))


def test_tiff_overviews_are_not_pages(tmp_path, fmt):
    """Reduced-resolution pages (GDAL's internal overviews, NewSubfileType 1) belong to the image."""
    import rasterio

    data = np.random.default_rng(0).integers(0, 255, (3, 64, 64), np.uint8)
    p = tmp_path / "ovr.tif"
    with rasterio.open(p, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8") as ds:
        ds.write(data)
    with rasterio.open(p, "r+") as ds:
        ds.build_overviews([2, 4])
    with Image.open(p) as im:
        assert im.n_frames == 3  # the file really has three pages
    src, item = _open_one(fmt, p)
    with src:
        assert item.key == "" and (item.info.height, item.info.width) == (64, 64) and not item.info.warnings
        np.testing.assert_array_equal(item.read(), data)


def _phone_photo() -> np.ndarray:
    """(40, 60, 3) uint8: smooth gradients (lossy codecs keep them) and a white block in the top-left corner,
    so a rotation shows."""
    y, x = np.mgrid[0:40, 0:60]
    a = np.stack([x * 4, y * 6, (x + y) * 2], axis=-1).astype(np.uint8)
    a[:10, :20] = 255
    return a


@pytest.mark.parametrize("suffix", [".heic", ".avif"])
def test_heic_and_avif_phone_photos_are_read_upright(tmp_path, fmt, suffix):
    """HEIC (iPhones' default since 2017) and AVIF, with EXIF orientation 6 as a phone held upright writes it:
    decoded upright, as JPEGs are. Both were refused as "not a readable image"."""
    from adapters.photo import _heif_opener

    assert _heif_opener()  # pillow-heif, from the test extra, writes the HEIC sample
    a = _phone_photo()
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / f"IMG_0001{suffix}"
    Image.fromarray(a).save(p, exif=exif.tobytes(), quality=95)
    assert fmt.sniff(str(p), _head(p))
    src, item = _open_one(fmt, p)
    with src:
        assert (item.info.height, item.info.width) == (60, 40)
        px = item.read().transpose(1, 2, 0).astype(int)
    upright = np.rot90(a, -1).astype(int)  # orientation 6: rotate 90 degrees clockwise to display
    assert np.abs(px - upright).mean() < 4
    assert (px[:20, -10:] > 230).all()  # the white block moved to the top-right corner


def test_heic_without_pillow_heif_names_what_to_install(tmp_path, fmt, monkeypatch):
    import adapters.photo as photo

    p = tmp_path / "IMG_0002.heic"
    assert photo._heif_opener()
    Image.fromarray(_phone_photo()).save(p)
    monkeypatch.setattr(photo, "_heif_opener", lambda: False)
    with pytest.raises(UnsupportedInput, match=r"IMG_0002.heic: a HEIC/HEIF photo, and pillow-heif is not installed"):
        fmt.open(str(p))


@pytest.mark.parametrize("orientation, rot", [(6, -90), (8, 90), (3, 180)])
def test_exif_orientation_applied(tmp_path, fmt, orientation, rot):
    # Stored image 40 wide x 20 high with a red left half; orientation 6 means "rotate 90 cw to display".
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif, quality=95)
    src, item = _open_one(fmt, p)
    want = np.asarray(Image.fromarray(arr).rotate(rot, expand=True))
    with src:
        assert (item.info.height, item.info.width) == want.shape[:2]
        assert item.info.extra["exif_orientation"] == orientation
        px = item.read().transpose(1, 2, 0).astype(int)
    assert px.shape == want.shape
    assert np.abs(px - want).mean() < 8  # JPEG noise only; a wrong rotation differs by ~128 on average


def test_semantic_sink_palette_mask_and_overlay(tmp_path, fmt):
    rgba = np.full((30, 50, 4), 100, np.uint8)
    rgba[..., 3] = 255
    rgba[25:, :, 3] = 0  # transparent rows -> no data
    p = tmp_path / "pic.png"
    Image.fromarray(rgba, "RGBA").save(p)
    classes = np.zeros((30, 50), np.uint8)
    classes[5:15, 10:40] = 1
    classes[15:30, 0:10] = 2
    src, item = _open_one(fmt, p)
    with src:
        sink = fmt.semantic_sink(item, tmp_path / "out", NAMES, COLORS)
        for r0 in (0, 16):  # two blocks
            win = Window(0, r0, 50, min(16, 30 - r0))
            sink.write(win, classes[r0 : r0 + win.height], np.ones((win.height, 50), np.float32))
        arts = {a.kind: a.path for a in sink.close()}
    assert set(arts) == {"mask_png", "overlay"} and arts["mask_png"].name == "pic_mask.png"
    m = Image.open(arts["mask_png"])
    assert m.mode == "P"
    got = np.asarray(m)
    want = classes.copy()
    want[25:] = 255
    np.testing.assert_array_equal(got, want)
    assert m.getpalette()[3:9] == [255, 0, 0, 0, 255, 0]
    ov = np.asarray(Image.open(arts["overlay"])).astype(int)
    assert ov.shape == (30, 50, 3)
    assert (ov[0, 0] == 100).all()  # background class: left transparent
    assert tuple(ov[10, 20]) == (178, 50, 50)  # cat: 50 % red
    assert tuple(ov[20, 5]) == (50, 178, 50)  # dog
    assert (ov[27, 5] == 100).all()  # no data: not painted


def test_hostile_and_long_file_names_give_writable_output_names(tmp_path, fmt):
    """A valid photo whose name has a newline, quotes and 245 characters is segmented like any other: its
    outputs get a plain stem (other scripts kept) that fits the 255-byte name limit with every suffix."""
    from adapters.base import MAX_STEM_BYTES, safe_stem

    names = ["a" * 245 + ".png", 'ünï cødé "x"\nb.png', "日本語の猫" * 15 + ".png"]
    stems = []
    for name in names:
        p = tmp_path / name
        Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(p, format="PNG")
        src, item = _open_one(fmt, p)
        with src:
            sink = fmt.semantic_sink(item, tmp_path / "out" / str(len(stems)), NAMES, COLORS)
            sink.write(Window(0, 0, 8, 8), np.zeros((8, 8), np.uint8), np.ones((8, 8), np.float32))
            arts = sink.close()
        assert {a.kind for a in arts} == {"mask_png", "overlay"} and all(a.path.is_file() for a in arts)
        stem = arts[0].path.name.rsplit("_", 1)[0]
        assert len(stem.encode()) <= MAX_STEM_BYTES and not set(stem) & set(" \n\"/\\")
        stems.append(stem)
    assert stems[1] == "ünï_cødé_x_b"
    assert stems[2].startswith("日本語の猫") and stems[0] != safe_stem("a" * 246)  # cut, but by a hash of all
    assert safe_stem("../..") == "item" and safe_stem("Abyssinian_1") == "Abyssinian_1"


def test_blend_overlay_rejects_shape_mismatch():
    with pytest.raises(ValueError):
        blend_overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8), COLORS)


def _instance(mask: np.ndarray, cid: int, score: float) -> Instance:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return Instance(cid, score, tuple(float(v) for v in mask_utils.toBbox(rle)), rle, int(mask.sum()))


def test_write_instances_coco_json_and_overlay(tmp_path, fmt):
    p = tmp_path / "two.png"
    Image.fromarray(np.full((60, 80, 3), 120, np.uint8)).save(p)
    a = np.zeros((60, 80), bool)
    a[10:30, 5:25] = True
    b = np.zeros((60, 80), bool)
    b[30:55, 40:75] = True
    src, item = _open_one(fmt, p)
    with src:
        arts = {x.kind: x.path for x in fmt.write_instances(item, [_instance(a, 1, 0.93), _instance(b, 2, 0.71)],
                                                             tmp_path / "o", NAMES, COLORS)}
    assert set(arts) == {"coco_json", "overlay"}
    doc = json.loads(arts["coco_json"].read_text())
    assert {c["id"]: c["name"] for c in doc["categories"]} == {0: "background", 1: "cat", 2: "dog"}
    anns = doc["annotations"]
    assert [(x["category_id"], x["score"], x["bbox"]) for x in anns] == [
        (1, 0.93, [5.0, 10.0, 20.0, 20.0]), (2, 0.71, [40.0, 30.0, 35.0, 25.0])]
    assert all(isinstance(x["segmentation"]["counts"], str) for x in anns)
    gt = COCO(str(arts["coco_json"]))  # valid COCO dataset; annotations alone are a valid results list
    res = gt.loadRes(anns)
    np.testing.assert_array_equal(res.annToMask(res.anns[1]).astype(bool), a)
    np.testing.assert_array_equal(mask_utils.decode(anns[1]["segmentation"]).astype(bool), b)
    ov = np.asarray(Image.open(arts["overlay"])).astype(int)
    assert ov.shape == (60, 80, 3)
    assert ov[20, 15, 0] > 150 and ov[20, 15, 1] < 120  # inside the cat: reddish
    assert ov[45, 60, 1] > 150 and ov[45, 60, 0] < 120  # inside the dog: greenish
    assert (ov[58, 2] == 120).all()  # far from both: untouched
    label = ov[0:10, 5:40]  # label box above the cat's box top edge (y=10)
    assert (np.abs(label - 120).sum(axis=-1) > 60).mean() > 0.3


# --------------------------------------------------------------------------------------------- bad input


def test_truncated_jpeg_fails_on_read(tmp_path, fmt):
    raw = _pet().read_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(raw[: len(raw) // 2])
    src, item = _open_one(fmt, p)  # header is intact
    with src, pytest.raises(AdapterError, match="cut.jpg"):
        item.read()


def test_truncated_png_fails(tmp_path, fmt):
    p = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
    p.write_bytes(p.read_bytes()[:3000])
    with pytest.raises(AdapterError, match="cut.png"):
        src, item = _open_one(fmt, p)
        item.read()


def test_text_file_named_jpg(tmp_path, fmt):
    p = tmp_path / "letter.jpg"
    p.write_text("Dear reader,\n" * 20)
    assert not fmt.sniff(str(p), _head(p))
    with pytest.raises(UnsupportedInput, match="letter.jpg"):
        fmt.open(str(p))


def test_empty_file(tmp_path, fmt):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(UnsupportedInput, match="empty"):
        fmt.open(str(p))


def _patch_png_size(data: bytes, width: int, height: int) -> bytes:
    # IHDR is the first chunk: 8-byte signature, 4-byte length, b"IHDR", 13 bytes of data, CRC.
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return data[:16] + bytes(ihdr) + crc + data[33:]


def test_png_bomb_refused_from_header(tmp_path, fmt):
    small = tmp_path / "s.png"
    Image.new("L", (8, 8)).save(small)
    p = tmp_path / "bomb.png"
    p.write_bytes(_patch_png_size(small.read_bytes(), 100_000, 100_000))
    assert fmt.sniff(str(p), _head(p))
    with pytest.raises(InputTooLarge, match="bomb.png"):
        fmt.open(str(p))


def test_max_pixels_limit(tmp_path, fmt):
    p = tmp_path / "m.png"
    Image.new("RGB", (40, 30)).save(p)
    with pytest.raises(InputTooLarge, match="40x30"):
        fmt.open(str(p), max_pixels=1000)
    src, _ = _open_one(fmt, p, max_pixels=1200)
    src.close()


def test_detect_routes_photos_and_plain_tiffs(tmp_path):
    pytest.importorskip("adapters.dicom")  # detect() walks every registered format
    from adapters import detect

    tif = tmp_path / "plain.tif"
    Image.fromarray(GRAD).save(tif)
    assert detect(str(tif)).name == "photo"
    assert detect(str(_pet())).name == "photo"
    txt = tmp_path / "x.jpg"
    txt.write_text("hello")
    with pytest.raises(UnsupportedInput):
        detect(str(txt))


def test_read_labels_returns_stored_values_not_display_colours(tmp_path, fmt):
    """Ground truth read as a photo became display RGB: a palette mask (VOC style, or this service's own
    mask_png) gave the red of each class colour, and a 16-bit label 300 gave 1. Labels are read as stored."""
    ids = np.array([[0, 1, 2, 2], [1, 1, 0, 2]], np.uint8)
    pal = Image.fromarray(ids, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    pal.save(tmp_path / "pal.png")
    wide = np.array([[0, 300], [65535, 7]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    grey_rgb = np.repeat(ids[..., None], 3, axis=2)
    Image.fromarray(grey_rgb).save(tmp_path / "grey_rgb.png")
    colour = grey_rgb.copy()
    colour[0, 0] = (10, 20, 30)
    Image.fromarray(colour).save(tmp_path / "colour.png")

    for name, expect in (("pal.png", ids), ("wide.png", wide), ("grey_rgb.png", ids)):
        src, item = _open_one(fmt, tmp_path / name)
        with src:
            got = item.read_labels()
        assert got.shape == expect.shape and np.array_equal(got, expect), name
    # As a photo the palette mask is colours: the first band of the red class is 255, not 1.
    src, item = _open_one(fmt, tmp_path / "pal.png")
    with src:
        assert item.read()[0, 0, 1] == 255
    src, item = _open_one(fmt, tmp_path / "colour.png")
    with src, pytest.raises(AdapterError, match="colour image cannot be ground truth"):
        item.read_labels()


def test_read_labels_of_a_label_stack_page(tmp_path, fmt):
    pages = [np.full((6, 5), v, np.uint16) for v in (1, 2, 3000)]
    Image.fromarray(pages[0]).save(tmp_path / "labels.tif", save_all=True,
                                   append_images=[Image.fromarray(p) for p in pages[1:]])
    with fmt.open(str(tmp_path / "labels.tif")) as src:
        assert [int(src.item(i.key).read_labels()[0, 0]) for i in src.items()] == [1, 2, 3000]


def test_mask_stack_needs_every_page(tmp_path, fmt):
    """The pages' masks of a TIFF stack become one multi-page TIFF in page order; with a page's mask missing (a
    failed item) none is written, since every later mask would lie on the wrong slice."""
    rgb = np.zeros((6, 5, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "s.tif", save_all=True, append_images=[Image.fromarray(rgb)] * 2)
    names, colors = ["a", "b"], [(0, 0, 0), (255, 0, 0)]
    with fmt.open(str(tmp_path / "s.tif")) as src:
        items = [src.item(i.key) for i in src.items()]
        files = []
        for n in range(len(items)):
            f = tmp_path / f"m{n}.png"
            Image.fromarray(np.full((6, 5), n % 2, np.uint8)).save(f)
            files.append(f)
        (art,) = fmt.finalize_group(items, files, tmp_path / "out", names, colors)
        with Image.open(art.path) as tif:
            assert tif.n_frames == 3
            tif.seek(1)
            assert int(np.asarray(tif)[0, 0]) == 1
        with pytest.raises(AdapterError, match="1 of 3 pages have no mask; no mask stack written"):
            fmt.finalize_group([items[0], items[2]], [files[0], files[2]], tmp_path / "out2", names, colors)
