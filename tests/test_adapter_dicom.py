"""DICOM adapter: real CT series (JPEG 2000, blank UIDs), pydicom's test files, bad input, DICOM SEG round trips."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut
from rasterio.windows import Window

from adapters.base import AdapterError, InputTooLarge
from adapters.dicom import NODATA, DicomFormat, DicomItem

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOTALSEG = DATA / "medical_ct_totalsegmentator"
LABELED = DATA / "medical_labeled" / "ct_liver_spine_heart_dcmqi"

NAMES = ["background", "liver", "spleen", "aorta"]
COLORS = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)]


def pyd_file(name: str) -> Path:
    p = get_testdata_file(name, download=False)
    if p is None:
        pytest.skip(f"pydicom test file {name} not installed")
    return Path(p)


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def open_items(path: Path | str, **kw) -> list[DicomItem]:
    return list(DicomFormat().open(str(path), **kw).items())


def write_masks(fmt, items, masks, out_dir: Path) -> list[Path]:
    """Push ``masks[i]`` through the item's sink in two blocks, as the tiled engine would."""
    files = []
    for it, m in zip(items, masks, strict=True):
        sink = fmt.semantic_sink(it, out_dir, NAMES, COLORS)
        h = m.shape[0] // 2
        sink.write(Window(0, 0, m.shape[1], h), m[:h], np.ones(m[:h].shape, np.float32))
        sink.write(Window(0, h, m.shape[1], m.shape[0] - h), m[h:], np.ones(m[h:].shape, np.float32))
        arts = sink.close()
        assert [a.kind for a in arts] == ["mask_png", "overlay"]
        files.append(arts[0].path)
    return files


def seg_pixels(seg_path: Path, items: list[DicomItem]) -> np.ndarray:
    seg = hd.seg.segread(seg_path)
    uids = [it.info.extra["seg_source_sop_instance_uid"] for it in items]
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, skip_overlap_checks=True
    )


# ------------------------------------------------------------------------------------------------ sniffing


def test_sniff(tmp_path):
    fmt = DicomFormat()
    ct = pyd_file("CT_small.dcm")
    assert fmt.sniff(str(ct), ct.read_bytes()[:1024])
    png = tmp_path / "x.png"
    Image.new("L", (4, 4)).save(png)
    assert not fmt.sniff(str(png), png.read_bytes()[:1024])
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "README.txt").write_text("notes")
    assert not fmt.sniff(str(folder), b"")
    shutil.copy(ct, folder / "IM0001")  # no extension: found by its magic bytes
    assert fmt.sniff(str(folder), b"")


# ---------------------------------------------------------------------------------------- real CT series


def test_totalseg_series_sorted_grouped_and_in_hu():
    items = open_items(need(TOTALSEG / "dicom_ct"))
    assert [it.key for it in items] == [f"slice-{i:04d}" for i in range(20)]
    assert len({it.group for it in items}) == 1 and items[0].group.startswith("geometry:")
    pos = [it.info.extra["slice_position"] for it in items]
    assert np.allclose(np.diff(pos), 2.0)  # ascending along the slice normal, 2 mm apart
    assert [it.info.extra["instance_number"] for it in items] == list(range(286, 266, -1))
    info = items[0].info
    assert info.modality == "CT" and info.bands == 1 and (info.height, info.width) == (512, 512)
    assert info.pixel_area == pytest.approx(0.9765625**2) and info.area_unit == "mm2"
    assert info.extra["spacing_between_slices"] == pytest.approx(2.0)
    assert info.extra["series_description"] == "CT Body 3.0"
    assert any("SeriesInstanceUID is empty" in w for w in info.warnings)

    # HU check against the README's PNGs, windowed L40/W400 from the same DICOMs.
    first = items[-1]  # slice_01 is the most superior, so last in ascending order
    assert first.info.extra["file"] == "slice_01.dcm"
    hu = first.read()
    assert hu.shape == (1, 512, 512) and hu.dtype == np.float32
    assert hu.min() == -1024.0 and 1000 < hu.max() < 3000
    png = np.asarray(Image.open(TOTALSEG / "png/images/slice_01.png")).astype(np.float32)
    windowed = np.clip((hu[0] + 160.0) / 400.0 * 255.0, 0, 255)
    assert np.abs(windowed - png).max() <= 1.0

    win = Window(100, 50, 64, 32)
    assert np.array_equal(first.read(win), hu[:, 50:82, 100:164])
    with pytest.raises(AdapterError, match="outside"):
        first.read(Window(500, 0, 64, 64))


def test_labeled_series_uses_series_uid():
    items = open_items(need(LABELED / "dicom_ct"))
    assert len(items) == 3 and items[0].group.startswith("series:1.2.392")
    # z = -128.69 (03.dcm) first, ascending to -126.69 (01.dcm)
    assert [it.info.extra["file"] for it in items] == ["03.dcm", "02.dcm", "01.dcm"]
    assert items[0].info.pixel_area == pytest.approx(0.810547**2, rel=1e-5)
    assert not any("empty" in w for w in items[0].info.warnings)


def test_preview_uses_window_and_resizes():
    it = open_items(need(TOTALSEG / "dicom_ct"))[0]
    p = it.preview()
    assert p.shape == (512, 512, 3) and p.dtype == np.uint8
    assert np.array_equal(p[..., 0], p[..., 2])
    assert p.min() == 0 and p.max() == 255  # air below and bone above any soft-tissue window
    assert it.preview(max_size=128).shape == (128, 128, 3)


# ------------------------------------------------------------------------------------- pydicom test files


def test_ct_small_modality_lut():
    path = pyd_file("CT_small.dcm")
    (it,) = open_items(path)
    assert it.key == "" and it.group is not None
    ds = pydicom.dcmread(path)
    expect = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    assert float(ds.RescaleIntercept) != 0 or float(ds.RescaleSlope) != 1
    assert np.array_equal(it.read()[0], expect)
    assert it.info.extra["sop_instance_uid"] == ds.SOPInstanceUID


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"])
def test_mr_transfer_syntaxes_decode_the_same(name):
    ref = open_items(pyd_file("MR_small.dcm"))[0].read()
    (it,) = open_items(pyd_file(name))
    assert it.info.modality == "MR"
    assert np.array_equal(it.read(), ref)


def test_jpeg_lossless_ct_decodes_to_the_same_hu(tmp_path):
    """JPEG Lossless, Process 14 (1.2.840.10008.1.2.4.70), the compression most PACS exports use: GDCM re-encodes
    CT_small.dcm with it here, and the adapter must read the same Hounsfield units. Without python-gdcm no
    installed plugin decoded it ("cannot be decoded by the installed handlers")."""
    import gdcm

    src, dst = pyd_file("CT_small.dcm"), tmp_path / "ct_lossless.dcm"
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    assert pydicom.dcmread(dst).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    (it,) = open_items(str(dst))
    assert np.array_equal(it.read(), open_items(str(src))[0].read())
    (rgb,) = open_items(pyd_file("SC_rgb_jpeg_gdcm.dcm"))  # pydicom's own JPEG Lossless sample, RGB
    assert rgb.read().shape == (3, rgb.info.height, rgb.info.width)


def test_ybr_full_422_uncompressed_is_not_called_truncated():
    """Uncompressed YBR_FULL_422 holds 2 bytes per pixel (chroma shared by pixel pairs); the length check
    expected 3 and refused the file as truncated."""
    path = pyd_file("SC_ybr_full_422_uncompressed.dcm")
    (it,) = open_items(path)
    assert np.array_equal(it.read().transpose(1, 2, 0), pydicom.dcmread(path).pixel_array.astype(np.float32))


def test_monochrome1_inverted():
    path = pyd_file("dicomdirtests/77654033/CR1/6154")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    (it,) = open_items(path)
    raw = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    got = it.read()[0]
    # Inverted within the stored range: raw + inverted is constant, and order is reversed.
    total = got + raw
    assert np.allclose(total, total.flat[0])
    assert np.argmax(got) == np.argmin(raw)
    prev = it.preview()[..., 0].astype(int)
    assert prev.flat[np.argmax(raw)] <= prev.flat[np.argmin(raw)]


def test_rgb_single_frame():
    path = pyd_file("SC_rgb_small_odd.dcm")
    (it,) = open_items(path)
    assert it.info.bands == 3
    arr = it.read()
    assert arr.shape == (3, 3, 3) and arr.dtype == np.float32
    assert np.array_equal(arr, np.moveaxis(pydicom.dcmread(path).pixel_array, -1, 0).astype(np.float32))
    assert it.preview().shape == (3, 3, 3)


def test_multiframe_ybr_jpeg():
    path = pyd_file("examples_ybr_color.dcm")
    items = open_items(path)
    assert [it.key for it in items[:2]] == ["frame-0000", "frame-0001"] and len(items) == 30
    assert len({it.group for it in items}) == 1
    ds = pydicom.dcmread(path)
    full = ds.pixel_array  # (30, H, W, 3) RGB after YBR conversion
    got = items[7].read()
    assert got.shape == (3, 240, 320)
    assert np.array_equal(got, np.moveaxis(full[7], -1, 0).astype(np.float32))


def test_multiframe_rtdose_frames():
    items = open_items(pyd_file("rtdose.dcm"))
    assert len(items) == 15
    ds = pydicom.dcmread(pyd_file("rtdose.dcm"))
    assert np.array_equal(items[3].read()[0], ds.pixel_array[3].astype(np.float32))


def test_deflated_transfer_syntax():
    (it,) = open_items(pyd_file("image_dfl.dcm"))
    assert it.read().shape == (1, 512, 512)


# ---------------------------------------------------------------------------------------------- bad input


def test_truncated_file(tmp_path):
    data = pyd_file("CT_small.dcm").read_bytes()
    half = tmp_path / "half.dcm"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="half.dcm: truncated"):
        DicomFormat().open(str(half))
    head_only = tmp_path / "head.dcm"
    head_only.write_bytes(data[:400])
    with pytest.raises(AdapterError, match="head.dcm: no pixel data"):
        DicomFormat().open(str(head_only))


def test_pydicom_truncated_example():
    with pytest.raises(AdapterError, match="MR_truncated.dcm"):
        DicomFormat().open(str(pyd_file("MR_truncated.dcm")))


def test_text_named_dcm(tmp_path):
    p = tmp_path / "notes.dcm"
    p.write_text("this is not a DICOM file\n" * 20)
    fmt = DicomFormat()
    assert fmt.sniff(str(p), p.read_bytes()[:1024])
    with pytest.raises(AdapterError, match="notes.dcm: not a DICOM file"):
        fmt.open(str(p))


def test_no_pixel_data(tmp_path):
    ds = pydicom.dcmread(pyd_file("CT_small.dcm"))
    del ds.PixelData
    p = tmp_path / "nopix.dcm"
    ds.save_as(p)
    with pytest.raises(AdapterError, match="nopix.dcm: no pixel data"):
        DicomFormat().open(str(p))


def test_unsupported_transfer_syntax_real_file():
    # 12-bit JPEG Extended (process 4) needs pylibjpeg-libjpeg (GPL); neither GDCM's nor Pillow's plugin in
    # pydicom takes 12-bit samples. The item fails with the reason; nothing else is affected.
    (it,) = open_items(pyd_file("JPEG-lossy.dcm"))
    with pytest.raises(AdapterError, match=r"JPEG-lossy.dcm: cannot decode .*JPEG Extended.*12-bit"):
        it.read()


def test_unsupported_transfer_syntax_faked(tmp_path):
    ds = pydicom.dcmread(pyd_file("CT_small.dcm"))
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists in pydicom
    p = tmp_path / "mpeg.dcm"
    ds.save_as(p)
    with pytest.raises(AdapterError, match=r"mpeg.dcm: transfer syntax .*1\.2\.840\.10008\.1\.2\.4\.100"):
        DicomFormat().open(str(p))


def test_decoder_failure_is_adapter_error():
    # 12-bit JPEG Extended: a plugin is installed but cannot decode it -> fails at read, with the syntax named.
    try:
        (it,) = open_items(pyd_file("JPEG-lossy.dcm"))
    except AdapterError as exc:
        assert "JPEG Extended" in str(exc)
        return
    with pytest.raises(AdapterError, match="JPEG Extended"):
        it.read()


def test_bomb_guard(tmp_path):
    with pytest.raises(InputTooLarge):
        DicomFormat().open(str(pyd_file("CT_small.dcm")), max_pixels=100)
    ds = pydicom.dcmread(pyd_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 60000
    ds.NumberOfFrames = 1000
    p = tmp_path / "bomb.dcm"
    ds.save_as(p)
    with pytest.raises(InputTooLarge, match="bomb.dcm"):
        DicomFormat().open(str(p))


def test_folder_with_bad_file_keeps_the_rest(tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    for f in sorted((need(LABELED / "dicom_ct")).glob("*.dcm")):
        shutil.copy(f, folder / f.name)
    data = (folder / "02.dcm").read_bytes()
    (folder / "02.dcm").write_bytes(data[: len(data) // 3])
    (folder / "README.txt").write_text("hello")
    shutil.copy(need(LABELED / "dicom_seg" / "liver_seg.dcm"), folder / "seg.dcm")  # outputs are not inputs
    src = DicomFormat().open(str(folder))
    items = list(src.items())
    good = [it for it in items if isinstance(it, DicomItem)]
    bad = [it for it in items if not isinstance(it, DicomItem)]
    assert len(good) == 2 and len(bad) == 1 and bad[0].key == "02.dcm"
    with pytest.raises(AdapterError, match="02.dcm: truncated"):
        bad[0].read()
    assert all(it.read().shape == (1, 512, 512) for it in good)
    assert any("seg.dcm: skipped" in w for w in src.warnings)


def test_a_lone_segmentation_or_structure_set_is_refused_not_segmented(tmp_path):
    """A DICOM SEG has frames of pixel data, but they are labels; opened alone it is refused, as in a folder."""
    seg = need(LABELED / "dicom_seg" / "liver_seg.dcm")
    with pytest.raises(AdapterError, match="liver_seg.dcm: a DICOM SEG object, not an image to segment"):
        DicomFormat().open(str(seg))
    rt = need(LABELED.parent / "ct_phantom_rtstruct_rtutils" / "rt.dcm")
    with pytest.raises(AdapterError, match="rt.dcm: a DICOM RTSTRUCT object"):
        DicomFormat().open(str(rt))


def test_folder_without_images(tmp_path):
    (tmp_path / "README.txt").write_text("nothing here")
    with pytest.raises(AdapterError, match="no DICOM images"):
        DicomFormat().open(str(tmp_path))
    (tmp_path / "a.dcm").write_text("nope")
    (item,) = open_items(tmp_path)  # a bad .dcm fails as its own item
    with pytest.raises(AdapterError, match="a.dcm: not a DICOM file"):
        item.read()


def test_detect_picks_dicom():
    from adapters import detect

    assert detect(str(need(TOTALSEG / "dicom_ct"))).name == "dicom"
    assert detect(str(pyd_file("CT_small.dcm"))).name == "dicom"


# -------------------------------------------------------------------------------------------------- outputs


def test_sink_writes_palette_mask_and_overlay(tmp_path):
    fmt = DicomFormat()
    (it,) = open_items(pyd_file("CT_small.dcm"))
    sink = fmt.semantic_sink(it, tmp_path, NAMES, COLORS)
    block = np.full((64, 128), 2, np.uint8)
    sink.write(Window(0, 0, 128, 64), block, np.ones((64, 128), np.float32))
    mask_art, overlay_art = sink.close()
    img = Image.open(mask_art.path)
    assert img.mode == "P" and img.size == (128, 128)
    arr = np.asarray(img)
    assert (arr[:64] == 2).all() and (arr[64:] == NODATA).all()
    assert tuple(img.getpalette()[6:9]) == COLORS[2]
    ov = np.asarray(Image.open(overlay_art.path))
    base = it.preview()
    assert ov.shape == (128, 128, 3)
    assert np.array_equal(ov[64:], base[64:])  # nodata is not painted
    assert (ov[:64, :, 1].astype(int) >= base[:64, :, 1]).all() and (ov[:64, :, 1] > base[:64, :, 1]).any()


def test_seg_round_trip_totalseg_series(tmp_path):
    fmt = DicomFormat()
    items = open_items(need(TOTALSEG / "dicom_ct"))
    rng = np.random.default_rng(0)
    masks = []
    for k in range(20):
        m = np.zeros((512, 512), np.uint8)
        if k % 4 != 3:  # every 4th slice stays empty: its frames are omitted
            m[100 + k : 180 + k, 120:200] = 1
            m[300:340, 250 + 2 * k : 300 + 2 * k] = 3
        if k < 5:
            m[rng.integers(0, 512, 200), rng.integers(0, 512, 200)] = 2
        masks.append(m)
    masks[0][:4, :4] = NODATA  # never written: not a segment
    files = write_masks(fmt, items, masks, tmp_path)
    (art,) = fmt.finalize_group(items, files, tmp_path, NAMES, COLORS)
    assert art.kind == "dicom_seg" and art.media_type == "application/dicom"
    seg = hd.seg.segread(art.path)
    assert seg.number_of_segments == 3
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "spleen", "aorta"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Liver"
    # BINARY: one frame per (non-empty slice, segment)
    expected_frames = sum(len(set(np.unique(m)) - {0, NODATA}) for m in masks)
    assert seg.NumberOfFrames == expected_frames
    got = seg_pixels(art.path, items)
    want = np.stack([np.where(m == NODATA, 0, m) for m in masks])
    assert np.array_equal(got, want)
    # blank source UIDs: generated deterministically, and reported
    assert any("generated UIDs" in w for w in items[0].info.warnings)
    ref_uids = [it.info.extra["seg_source_sop_instance_uid"] for it in items]
    again = open_items(TOTALSEG / "dicom_ct")
    fmt.finalize_group(again, files, tmp_path / "again", NAMES, COLORS)
    assert [it.info.extra["seg_source_sop_instance_uid"] for it in again] == ref_uids
    assert len(set(ref_uids)) == 20
    assert seg.StudyInstanceUID and seg.FrameOfReferenceUID == items[0].dataset.FrameOfReferenceUID


def test_seg_labelmap_round_trip(tmp_path):
    fmt = DicomFormat(segmentation_type="LABELMAP")
    items = open_items(need(TOTALSEG / "dicom_ct"))[:4]
    masks = [np.zeros((512, 512), np.uint8) for _ in items]
    masks[1][10:50, 10:50] = 1
    masks[2][60:90, 10:50] = 2
    files = write_masks(fmt, items, masks, tmp_path)
    (art,) = fmt.finalize_group(items, files, tmp_path, NAMES, COLORS)
    seg = hd.seg.segread(art.path)
    assert seg.SegmentationType == "LABELMAP"
    assert np.array_equal(seg_pixels(art.path, items), np.stack(masks))


def test_seg_matches_reference_dcmqi_seg(tmp_path):
    """Rebuild the liver SEG of medical_labeled from its own pixels and compare structure and pixels."""
    ref_path = need(LABELED / "dicom_seg" / "liver_seg.dcm")
    items = open_items(LABELED / "dicom_ct")
    ref = hd.seg.segread(ref_path)
    uids = [it.dataset.SOPInstanceUID for it in items]
    ref_px = ref.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, ignore_spatial_locations=True
    )
    names = ["background", "liver"]
    colors = [(0, 0, 0), (200, 100, 80)]
    fmt = DicomFormat()
    files = []
    for it, m in zip(items, ref_px, strict=True):
        sink = fmt.semantic_sink(it, tmp_path, names, colors)
        sink.write(Window(0, 0, 512, 512), m.astype(np.uint8), np.ones((512, 512), np.float32))
        files.append(sink.close()[0].path)
    (art,) = fmt.finalize_group(items, files, tmp_path, names, colors)
    ours = pydicom.dcmread(art.path)
    refds = pydicom.dcmread(ref_path)
    assert ours.SOPClassUID == refds.SOPClassUID and ours.Modality == "SEG"
    assert ours.StudyInstanceUID == refds.StudyInstanceUID
    assert ours.FrameOfReferenceUID == refds.FrameOfReferenceUID
    assert int(ours.NumberOfFrames) == int(refds.NumberOfFrames) == 3
    ref_series = refds.ReferencedSeriesSequence[0]
    our_series = ours.ReferencedSeriesSequence[0]
    assert our_series.SeriesInstanceUID == ref_series.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in our_series.ReferencedInstanceSequence} == {
        r.ReferencedSOPInstanceUID for r in ref_series.ReferencedInstanceSequence
    }
    shared = ours.SharedFunctionalGroupsSequence[0]
    for ours_f in ours.PerFrameFunctionalGroupsSequence:
        src = ours_f.DerivationImageSequence[0].SourceImageSequence[0]
        assert src.ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        seg_id = ours_f.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        assert seg_id[0].ReferencedSegmentNumber == 1

    def positions(ds):
        frames = ds.PerFrameFunctionalGroupsSequence
        return sorted(float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in frames)

    assert np.allclose(positions(ours), positions(refds), atol=1e-3)
    assert np.allclose(
        [float(x) for x in shared.PixelMeasuresSequence[0].PixelSpacing],
        [float(x) for x in refds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing],
    )
    assert ours.SegmentSequence[0].SegmentLabel == "liver"
    assert np.array_equal(seg_pixels(art.path, items), ref_px)
    assert not any("generated" in w for w in items[0].info.warnings)


def test_single_slice_seg_and_all_empty(tmp_path):
    fmt = DicomFormat()
    (it,) = open_items(pyd_file("CT_small.dcm"))
    m = np.zeros((128, 128), np.uint8)
    files = write_masks(fmt, [it], [m], tmp_path)
    (art,) = fmt.finalize_group([it], files, tmp_path, NAMES, COLORS)
    seg = hd.seg.segread(art.path)
    assert seg.number_of_segments == 3
    assert not seg_pixels(art.path, [it]).any()
    # only a background class: nothing to encode
    assert fmt.finalize_group([it], files, tmp_path, ["background"], [(0, 0, 0)]) == []


@pytest.mark.parametrize("name", ["SC_rgb_small_odd.dcm", "dicomdirtests/77654033/CR1/6154", "MR_small.dcm"])
def test_single_image_seg_readable(tmp_path, name):
    fmt = DicomFormat()
    (it,) = open_items(pyd_file(name))
    m = np.zeros((it.info.height, it.info.width), np.uint8)
    m[:2, :2] = 2
    (art,) = fmt.finalize_group([it], write_masks(fmt, [it], [m], tmp_path), tmp_path, NAMES, COLORS)
    seg = hd.seg.segread(art.path)
    px = seg.get_pixels_by_source_instance(
        [it.info.extra["seg_source_sop_instance_uid"]], combine_segments=True, ignore_spatial_locations=True
    )
    assert np.array_equal(px[0], m)


def test_legacy_multiframe_seg_fails_cleanly(tmp_path):
    fmt = DicomFormat()
    items = open_items(pyd_file("rtdose.dcm"))
    files = write_masks(fmt, items, [np.ones((10, 10), np.uint8)] * len(items), tmp_path)
    with pytest.raises(AdapterError, match="rtdose.dcm: cannot write DICOM SEG for a legacy multi-frame"):
        fmt.finalize_group(items, files, tmp_path, NAMES, COLORS)


def test_seg_rejects_foreign_class_ids(tmp_path):
    fmt = DicomFormat()
    (it,) = open_items(pyd_file("CT_small.dcm"))
    p = tmp_path / "bad.png"
    Image.fromarray(np.full((128, 128), 9, np.uint8), mode="L").save(p)
    with pytest.raises(AdapterError, match="class ids"):
        fmt.finalize_group([it], [p], tmp_path, NAMES, COLORS)


def test_write_instances_one_segment_per_class(tmp_path):
    from pycocotools import mask as mask_utils

    from pipelines.instances import Instance

    def inst(cid: int, r0: int, c0: int, size: int) -> Instance:
        m = np.zeros((128, 128), np.uint8, order="F")
        m[r0 : r0 + size, c0 : c0 + size] = 1
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        return Instance(cid, 0.9, (c0, r0, size, size), rle, int(m.sum()))

    fmt = DicomFormat()
    (it,) = open_items(pyd_file("CT_small.dcm"))
    instances = [inst(1, 10, 10, 20), inst(1, 20, 20, 20), inst(3, 80, 80, 30)]
    arts = fmt.write_instances(it, instances, tmp_path, NAMES, COLORS)
    assert [a.kind for a in arts] == ["dicom_seg", "overlay"]
    seg = hd.seg.segread(arts[0].path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "aorta"]
    px = seg.get_pixels_by_source_instance(source_sop_instance_uids=[it.dataset.SOPInstanceUID])[0]
    liver = np.zeros((128, 128), bool)
    liver[10:30, 10:30] = liver[20:40, 20:40] = True
    assert np.array_equal(px[..., 0].astype(bool), liver)
    assert int(px[..., 1].sum()) == 900
    ov = np.asarray(Image.open(arts[1].path))
    assert ov.shape == (128, 128, 3) and tuple(ov[10, 10]) == COLORS[1]  # outline pixel in class colour
    # no instances: overlay only
    assert [a.kind for a in fmt.write_instances(it, [], tmp_path / "none", NAMES, COLORS)] == ["overlay"]


def test_header_only_open_is_cheap():
    # opening must not decode pixels: a folder of JPEG 2000 slices opens without touching the codec
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pydicom would warn on odd headers; real data must be clean
        items = open_items(need(TOTALSEG / "dicom_ct"))
    assert all(it._cache.get((str(it.path), None)) is None for it in items)
