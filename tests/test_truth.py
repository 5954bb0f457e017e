"""Reading ground truth for scoring (worker.truth.read_truth): label values as stored, the job's or
the model's truth map, and a warning for the pixels that fall out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from adapters.base import AdapterError, ItemInfo
from pipelines.evaluate import PET_CLASSES, PET_TRUTH
from pipelines.spec import ClassSpec, ModelSpec, TruthMap
from worker.truth import read_truth, truth_or_note

TRIMAP = np.array([[1, 1, 3, 2], [1, 3, 2, 2], [3, 2, 2, 2]], np.uint8)
CLASS_IDS = TRIMAP - 1  # pet 0, background 1, outline 2


def _spec(truth_map: TruthMap | None, classes: list[ClassSpec] = PET_CLASSES) -> ModelSpec:
    return ModelSpec(name="pets", kind="semantic", source="model.keras", classes=classes, truth_map=truth_map)


def _palette_png(path: Path, ids: np.ndarray) -> Path:
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    im.putpalette([230, 25, 75, 0, 0, 0, 255, 225, 25] + [0] * 759)  # the pets model's own mask colours
    im.save(path)
    return path


def test_the_models_truth_map_reads_its_own_datasets_convention(tmp_path: Path) -> None:
    Image.fromarray(TRIMAP).save(tmp_path / "trimap.png")
    classes, told = read_truth(str(tmp_path / "trimap.png"), {}, "", _spec(PET_TRUTH))
    assert classes.dtype == np.uint8 and np.array_equal(classes, CLASS_IDS)
    assert told["truth_map"]["from"] == "model pets" and "trimaps" in told["truth_map"]["reads"]
    assert "warnings" not in told


def test_a_jobs_truth_map_wins_and_palette_masks_give_their_indices(tmp_path: Path) -> None:
    """The service's own mask_png (a palette PNG of class ids) as truth: read as indices, not colours."""
    path = _palette_png(tmp_path / "mask.png", CLASS_IDS)
    options = {"truth_map": {"0": 0, "1": 1, "2": 2}}
    classes, told = read_truth(str(path), options, "", _spec(PET_TRUTH))
    assert np.array_equal(classes, CLASS_IDS)
    assert told == {"truth_map": {"from": "job", "values": options["truth_map"]}}
    # Without a map and with a model that has none, class ids are taken as they are.
    classes, told = read_truth(str(path), {}, "", _spec(None))
    assert np.array_equal(classes, CLASS_IDS) and told == {}


def test_pixels_the_map_does_not_cover_are_named_not_dropped_silently(tmp_path: Path) -> None:
    path = _palette_png(tmp_path / "mask.png", CLASS_IDS)  # class ids, but the model reads trimaps
    classes, told = read_truth(str(path), {}, "", _spec(PET_TRUTH))
    share = (CLASS_IDS == 0).mean()
    assert (classes[CLASS_IDS == 0] == 255).all()  # 0 is no trimap value: not scored
    ids, warning = told["warnings"]
    assert f"{share:.1%} of its pixels" in warning and f"0 ({share:.1%})" in warning
    assert "reads Oxford-IIIT Pet trimaps" in warning and "--truth-map" in warning
    assert "are all class ids of pets too" in ids and ids.endswith('{"0":0,"1":1,"2":2}')


def test_sixteen_bit_truth_is_not_wrapped_into_class_ids(tmp_path: Path) -> None:
    """A 16-bit label GeoTIFF: 256 used to become class 0 (a uint8 cast); it is not a class, so not scored."""
    values = np.array([[0, 1, 256], [257, 1, 0]], np.uint16)
    with rasterio.open(tmp_path / "labels.tif", "w", driver="GTiff", width=3, height=2, count=1,
                       dtype="uint16") as ds:
        ds.write(values, 1)
    classes = [ClassSpec(id=0, name="background"), ClassSpec(id=1, name="cell")]
    got, told = read_truth(str(tmp_path / "labels.tif"), {}, "", _spec(None, classes))
    assert got.tolist() == [[0, 1, 255], [255, 1, 0]]
    assert "256 (16.7%)" in told["warnings"][0] and "not class ids of pets (0-1" in told["warnings"][0]
    got, _ = read_truth(str(tmp_path / "labels.tif"), {"truth_map": {"256": 1, "257": 1, "0": 0}}, "",
                         _spec(None, classes))
    assert got.tolist() == [[0, 255, 1], [1, 255, 0]]


def test_spec_truth_map_must_name_its_classes() -> None:
    with pytest.raises(ValueError, match="class ids must be among"):
        _spec(TruthMap(values={"1": 7}))
    with pytest.raises(ValueError, match="non-negative integers"):
        TruthMap(values={"x": 0})


def _geotiff(path: Path, arr: np.ndarray, x0: float, y0: float, res: float, crs: str = "EPSG:32618") -> Path:
    from rasterio.transform import from_origin

    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[1], height=arr.shape[0], count=1,
                       dtype=arr.dtype, crs=crs, transform=from_origin(x0, y0, res, res)) as ds:
        ds.write(arr, 1)
    return path


def test_georeferenced_truth_on_another_grid_is_put_on_the_images(tmp_path: Path) -> None:
    """Labels rasterised for a larger area at 1 m, scoring a 0.5 m image: resampled onto the image's grid by
    georeference (nearest), the part of the image the labels do not cover is not scored, and the item says so.
    Before, the shapes differed and the item failed."""
    from adapters import open_input

    image = _geotiff(tmp_path / "image.tif", np.zeros((30, 40), np.uint8), 500000, 4000000, 0.5)
    with open_input(str(image))[1] as src:
        target = next(iter(src.items())).info
    # 1 m labels starting 5 m east of the image and 10 m further north; building (1) in their east half.
    labels = np.zeros((20, 30), np.uint8)
    labels[:, 15:] = 1
    truth = _geotiff(tmp_path / "labels.tif", labels, 500005, 4000010, 1.0)
    classes = [ClassSpec(id=0, name="background"), ClassSpec(id=1, name="building")]
    got, told = read_truth(str(truth), {}, "", _spec(None, classes), target)
    assert got.shape == (30, 40)
    # Image column c lies at x = 500000 + 0.5 (c + 0.5); the labels start at x = 500005 (c = 10), building
    # from 500020 (c = 40, beyond the image). Rows: the labels end at y = 3999990, image row 20.
    expect = np.full((30, 40), 255, np.uint8)
    expect[:20, 10:] = 0
    assert np.array_equal(got, expect)
    (warning,) = told["warnings"]
    assert "on another grid (30x20 px) than the image (40x30 px)" in warning
    assert f"{(expect == 255).mean():.1%} of the image has no truth" in warning
    # The same labels on the image's own grid: used as they are, no warning.
    same = _geotiff(tmp_path / "same.tif", expect, 500000, 4000000, 0.5)
    got, told = read_truth(str(same), {}, "", _spec(None, classes), target)
    assert np.array_equal(got, expect) and told == {}


def test_georeferenced_truth_in_another_crs(tmp_path: Path) -> None:
    from rasterio.warp import transform

    from adapters import open_input

    image = _geotiff(tmp_path / "image.tif", np.zeros((20, 20), np.uint8), 500000, 4000000, 1.0)
    with open_input(str(image))[1] as src:
        target = next(iter(src.items())).info
    # Lon/lat labels covering the image generously, all class 1.
    (lon,), (lat,) = transform("EPSG:32618", "EPSG:4326", [500010], [3999990])
    truth = _geotiff(tmp_path / "ll.tif", np.ones((50, 50), np.uint8), lon - 0.001, lat + 0.001, 0.00004,
                     crs="EPSG:4326")
    classes = [ClassSpec(id=0, name="background"), ClassSpec(id=1, name="building")]
    got, told = read_truth(str(truth), {}, "", _spec(None, classes), target)
    assert got.shape == (20, 20) and (got == 1).all() and "0.0% of the image has no truth" in told["warnings"][0]


DCMQI = Path(__file__).resolve().parents[2] / "shared" / "data" / "medical_labeled" / "ct_liver_spine_heart_dcmqi"


def _ct_item_info(name: str):
    from adapters import open_input

    if not (DCMQI / "dicom_seg" / "liver_seg.dcm").is_file():
        pytest.skip("real data absent: medical_labeled/ct_liver_spine_heart_dcmqi")
    with open_input(str(DCMQI / "dicom_ct" / name))[1] as src:
        return next(iter(src.items())).info


def test_a_dicom_seg_scores_the_slices_it_references(tmp_path: Path) -> None:
    """dcmqi's liver SEG (3 frames, one segment 'Liver') over its 3-slice CT: each slice gets its own frame,
    segment labels are matched to class names, pixels in no segment are background. It was refused as "a
    DICOM SEG object, not an image", failing every item."""
    info = _ct_item_info("01.dcm")
    classes = [ClassSpec(id=0, name="background"), ClassSpec(id=1, name="spleen"), ClassSpec(id=2, name="liver")]
    spec = ModelSpec(name="ct", kind="semantic", source="m.keras", classes=classes, background_class=0)
    got, told = read_truth(str(DCMQI / "dicom_seg" / "liver_seg.dcm"), {}, "", spec, info)
    assert got.shape == (512, 512) and set(np.unique(got).tolist()) == {0, 2}
    # The README's PNG labels were painted from the same masks (liver = 1; overlaps with later masks lost).
    png = np.asarray(Image.open(DCMQI / "png" / "labels" / "slice_01.png"))
    assert ((got == 2) == (png == 1)).mean() > 0.999
    assert told["truth_map"]["values"] == {"0": 0, "1": 2}
    (warning,) = told["warnings"]
    assert "has no segment for spleen" in warning and "those of liver are exact" in warning
    # A job's truth map reads segment numbers.
    got, told = read_truth(str(DCMQI / "dicom_seg" / "liver_seg.dcm"), {"truth_map": {"1": 1}}, "", spec, info)
    assert set(np.unique(got).tolist()) == {1, 255} and told["truth_map"]["from"] == "job"


def test_a_dicom_seg_of_other_images_is_refused_by_name(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    from adapters import AdapterError, open_input

    with open_input(get_testdata_file("CT_small.dcm"))[1] as src:
        info = next(iter(src.items())).info
    _ct_item_info("01.dcm")  # skips without the data
    spec = ModelSpec(name="ct", kind="semantic", source="m.keras", classes=[ClassSpec(id=0, name="background"),
                     ClassSpec(id=1, name="liver")], background_class=0)
    with pytest.raises(AdapterError, match="liver_seg.dcm: the SEG does not reference this image"):
        read_truth(str(DCMQI / "dicom_seg" / "liver_seg.dcm"), {}, "", spec, info)


def test_a_split_rasters_part_gets_its_rows_of_the_truth(tmp_path: Path) -> None:
    """Parts of a split raster: rows of the truth by a window on the same grid, by resampling onto the part's
    rows on another grid; either way equal to the whole's truth cut to those rows."""
    from adapters import open_input

    image = _geotiff(tmp_path / "image.tif", np.zeros((30, 40), np.uint8), 500000, 4000000, 0.5)
    with open_input(str(image))[1] as src:
        target = next(iter(src.items())).info
    classes = [ClassSpec(id=0, name="background"), ClassSpec(id=1, name="building")]
    labels = (np.indices((30, 40)).sum(axis=0) % 2).astype(np.uint8)
    same = _geotiff(tmp_path / "same.tif", labels, 500000, 4000000, 0.5)
    coarse = _geotiff(tmp_path / "coarse.tif", labels[::2, ::2], 499999, 4000001, 1.0)
    for truth in (same, coarse):
        whole, _ = read_truth(str(truth), {}, "", _spec(None, classes), target)
        part, _ = read_truth(str(truth), {}, "", _spec(None, classes), target, (7, 19))
        assert part.shape == (12, 40) and np.array_equal(part, whole[7:19]), truth.name


def test_class_ids_read_through_the_models_map_are_flagged(tmp_path: Path) -> None:
    """ct-organs reads TotalSegmentator ids (1 = spleen, 5 = liver); a mask of its own class ids (1 = liver)
    fits that map too, so it would be misread without a word. The item names the identity map to give."""
    from pipelines.domains import CT_CLASSES, CT_TRUTH

    spec = ModelSpec(name="ct-organs", kind="semantic", source="m.keras", classes=[c for c, _ in CT_CLASSES],
                     background_class=0, truth_map=CT_TRUTH)
    Image.fromarray(np.array([[0, 1], [5, 1]], np.uint8)).save(tmp_path / "ids.png")
    got, told = read_truth(str(tmp_path / "ids.png"), {}, "", spec)
    assert got.tolist() == [[0, 2], [1, 2]]  # read as TotalSegmentator ids, as the spec says
    (warning,) = told["warnings"]
    assert "values (0, 1, 5) are all class ids of ct-organs too" in warning
    assert warning.endswith('{"0":0,"1":1,"2":2,"3":3,"4":4,"5":5}')
    # A TotalSegmentator label holds ids past the classes (63 = inferior vena cava): no such doubt.
    Image.fromarray(np.array([[0, 1], [5, 63]], np.uint8)).save(tmp_path / "ts.png")
    assert "warnings" not in read_truth(str(tmp_path / "ts.png"), {}, "", spec)[1]


def test_a_label_at_another_resolution_is_scaled_to_its_photo(tmp_path: Path) -> None:
    """A mask exported at half size: same aspect, so scaled (nearest) with a warning; another aspect (a label
    of another photo) is an error that costs the item its scoring only (``truth_or_note``)."""
    labels = np.zeros((10, 16), np.uint8)
    labels[:, 8:] = 1
    Image.fromarray(labels).save(tmp_path / "half.png")
    target = ItemInfo(height=20, width=32, bands=3, dtype="uint8", modality="photo")
    classes = [ClassSpec(id=0, name="background"), ClassSpec(id=1, name="cat")]
    got, told = read_truth(str(tmp_path / "half.png"), {}, "", _spec(None, classes), target)
    assert got.shape == (20, 32) and (got[:, :16] == 0).all() and (got[:, 16:] == 1).all()
    assert "is 16x10 px, the image 32x20: scaled to the image" in told["warnings"][0]
    part, _ = read_truth(str(tmp_path / "half.png"), {}, "", _spec(None, classes), target, (5, 12))
    assert np.array_equal(part, got[5:12])
    other = ItemInfo(height=20, width=20, bands=3, dtype="uint8", modality="photo")
    with pytest.raises(AdapterError, match="it is 16x10 px and the image 20x20 px, with another aspect ratio"):
        read_truth(str(tmp_path / "half.png"), {}, "", _spec(None, classes), other)
    got, told = truth_or_note(str(tmp_path / "half.png"), {}, "", _spec(None, classes), other)
    assert got is None and "16x10 px and the image 20x20 px" in told["truth_unscored"]
    assert told["warnings"] == [f"ground truth half.png not scored: {told['truth_unscored']}"]


def test_a_dicom_seg_over_a_multiframe_image_scores_each_frame(tmp_path: Path) -> None:
    """A multi-frame CT (highdicom's legacy-converted enhanced CT of three CT_small slices) and a SEG with a
    liver on its middle frame only: each frame item gets its own frame of the SEG (by frame number)."""
    import copy

    import highdicom as hd
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.sr.codedict import codes

    from adapters import open_input

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    slices, series = [], hd.UID()
    for i in range(3):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = hd.UID(), series, i + 1
        x, y, z = map(float, base.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5 * i]
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        slices.append(ds)
    hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=slices, series_instance_uid=hd.UID(), series_number=9, sop_instance_uid=hd.UID(),
        instance_number=1).save_as(tmp_path / "ct.dcm")
    ct = pydicom.dcmread(tmp_path / "ct.dcm")
    mask = np.zeros((3, ct.Rows, ct.Columns), np.uint8)
    mask[1, 10:20, 10:30] = 1
    liver = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Liver", segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Liver, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    hd.seg.Segmentation(
        source_images=[ct], pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[liver], series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="t", manufacturer_model_name="t", software_versions="t",
        device_serial_number="1").save_as(tmp_path / "seg.dcm")
    spec = ModelSpec(name="ct", kind="semantic", source="m.keras", classes=[ClassSpec(id=0, name="background"),
                     ClassSpec(id=1, name="liver")], background_class=0)
    with open_input(str(tmp_path / "ct.dcm"))[1] as src:
        found = [(it.info.extra["frame"], int((read_truth(str(tmp_path / "seg.dcm"), {}, it.key, spec,
                                                              it.info)[0] == 1).sum())) for it in src.items()]
    assert found == [(0, 0), (1, 200), (2, 0)]


def test_a_series_reads_its_seg_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every slice of a series has the same SEG as truth: it is parsed once per worker process, not per slice."""
    import highdicom as hd

    from adapters import dicom

    info = _ct_item_info("01.dcm")
    calls = []
    real = hd.seg.segread
    monkeypatch.setattr(hd.seg, "segread", lambda p: calls.append(p) or real(p))
    dicom._segread.cache_clear()
    seg_path = DCMQI / "dicom_seg" / "liver_seg.dcm"
    first = dicom.segmentation_labels(seg_path, info)
    again = dicom.segmentation_labels(seg_path, info)
    assert len(calls) == 1 and np.array_equal(first.numbers, again.numbers)
