"""``tileseg eval`` on the domain layouts: SpaceNet Rio building tiles (GeoTIFF through the adapter, tiled and
resampled by the runner) and TotalSegmentator CT slices (DICOM, JPEG 2000), scored on the held-out split with
the shipped domain models."""

from __future__ import annotations

import json

from click.testing import CliRunner

from core.cli import main
from tests.conftest import shared


def _eval(*args: str) -> dict:
    res = CliRunner().invoke(main, ["eval", *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output[res.output.index("{"):])


def test_eval_buildings_on_held_out_rio_tiles():
    folder = shared("spacenet1_rio_buildings")
    report = _eval("--model", "buildings-rgb", "--data", str(folder), "--split", "test")
    assert report["layout"] == "buildings" and report["names"] == ["img53", "img64"]
    per = {c["name"]: c for c in report["per_class"]}
    # The model card's held-out figure is building Dice 0.596; far above what an empty or all-building
    # answer would score, well below a perfect one.
    assert 0.45 < per["building"]["dice"] < 0.8
    assert set(report["per_image"]) == {"img53", "img64"}


def test_eval_ct_organs_on_held_out_slices():
    folder = shared("medical_ct_totalsegmentator")
    report = _eval("--model", "ct-organs", "--data", str(folder), "--split", "test")
    assert report["names"] == ["slice_17", "slice_18", "slice_19", "slice_20"]
    per = {c["name"]: c for c in report["per_class"]}
    assert per["liver"]["dice"] > 0.9 and per["spleen"]["dice"] > 0.8


def test_eval_refuses_unknown_layouts_and_a_test_split_on_pets(tmp_path):
    res = CliRunner().invoke(main, ["eval", "--model", "buildings-rgb", "--data", str(tmp_path)])
    assert res.exit_code != 0 and "not a known layout" in res.output
    pets = shared("oxford_pets")
    res = CliRunner().invoke(main, ["eval", "--model", "unet-pets", "--data", str(pets), "--split", "test"])
    assert res.exit_code != 0 and "no test split" in res.output


def test_eval_ct_names_bad_slices_and_scores_the_rest(tmp_path):
    """A truncated DICOM and a slice without its label file are named in ``errors``; the good slice scores
    exactly as it does alone. A folder of bad slices only is refused with the first reason."""
    src = shared("medical_ct_totalsegmentator")
    for sub in ("dicom_ct", "png/labels"):
        (tmp_path / "ok" / sub).mkdir(parents=True)
        (tmp_path / "mixed" / sub).mkdir(parents=True)
    for folder in ("ok", "mixed"):
        (tmp_path / folder / "dicom_ct" / "slice_17.dcm").symlink_to(src / "dicom_ct" / "slice_17.dcm")
        (tmp_path / folder / "png/labels" / "slice_17.png").symlink_to(src / "png/labels" / "slice_17.png")
    raw = (src / "dicom_ct" / "slice_18.dcm").read_bytes()
    (tmp_path / "mixed" / "dicom_ct" / "a_cut.dcm").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "mixed" / "png/labels" / "a_cut.png").symlink_to(src / "png/labels" / "slice_18.png")
    (tmp_path / "mixed" / "dicom_ct" / "b_unlabelled.dcm").symlink_to(src / "dicom_ct" / "slice_19.dcm")

    alone = _eval("--model", "ct-organs", "--data", str(tmp_path / "ok"))
    mixed = _eval("--model", "ct-organs", "--data", str(tmp_path / "mixed"))
    assert mixed["names"] == ["a_cut", "b_unlabelled", "slice_17"] and mixed["images"] == 1
    assert [e["name"] for e in mixed["errors"]] == ["a_cut", "b_unlabelled"]
    assert "no such label file" in mixed["errors"][1]["error"]
    assert mixed["confusion"] == alone["confusion"] and set(mixed["per_image"]) == {"slice_17"}

    (tmp_path / "mixed" / "dicom_ct" / "slice_17.dcm").unlink()
    res = CliRunner().invoke(main, ["eval", "--model", "ct-organs", "--data", str(tmp_path / "mixed")])
    assert res.exit_code != 0 and "none of the 2 images could be scored" in res.output
