"""COCO mask/box AP on known ground truth and detections; the oxford_pets folder evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.instance_eval import (
    PET_CATEGORIES,
    CocoEvaluator,
    category_map_by_name,
    evaluate_folder,
    list_pet_samples,
    pet_mask,
)
from pipelines.instances import Instance, _rle_from_crop, coco_labels, load_instance_model
from pipelines.spec import ModelSpec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rect(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def _inst(mask: np.ndarray, cid: int, score: float, box=None) -> Instance:
    ys, xs = np.nonzero(mask)
    if box is None:
        box = (float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1))
    return Instance(cid, score, box, _rle_from_crop(mask, 0, 0, *mask.shape), int(mask.sum()))


SCENES = [  # (H, W, [(category, (y0, x0, y1, x1))])
    (64, 80, [(1, (5, 5, 30, 40)), (2, (35, 45, 60, 78))]),
    (50, 50, [(2, (10, 10, 40, 30))]),
    (70, 60, [(1, (0, 0, 20, 20)), (1, (30, 25, 65, 58))]),
]


def _evaluate(make_predictions) -> dict:
    ev = CocoEvaluator(PET_CATEGORIES)
    for h, w, objs in SCENES:
        gt = [(c, _rect(h, w, *r)) for c, r in objs]
        ev.add(h, w, gt, make_predictions(h, w, gt))
    return ev.result().to_json()


def test_perfect_predictions_score_one():
    res = _evaluate(lambda h, w, gt: [_inst(m, c, 0.9) for c, m in gt])
    for key in ("mask_ap", "mask_ap50", "mask_ap75", "box_ap", "box_ap50", "box_ap75"):
        assert res[key] == pytest.approx(1.0), key
    assert (res["images"], res["gt_instances"], res["detections"]) == (3, 5, 5)


def test_shifted_prediction_scores_lower():
    def shifted(h, w, gt):
        out = [_inst(m, c, 0.9) for c, m in gt]
        c, m = gt[0]
        moved = np.roll(m, 6, axis=1)  # IoU with the truth drops to about 0.7
        out[0] = _inst(moved, c, 0.9)
        return out

    res = _evaluate(shifted)
    assert res["mask_ap50"] == pytest.approx(1.0)  # still a match at IoU 0.5
    assert res["mask_ap75"] < 0.9 and res["mask_ap"] < 0.9
    assert res["box_ap"] < 0.9


def test_wrong_class_and_false_positives_lower_ap():
    res_cls = _evaluate(lambda h, w, gt: [_inst(m, 3 - c, 0.9) for c, m in gt])
    assert res_cls["mask_ap"] == pytest.approx(0.0)

    def with_fp(h, w, gt):
        fp = _inst(_rect(h, w, h - 8, w - 8, h, w), gt[0][0], 0.99)  # confident, wrong place
        return [fp] + [_inst(m, c, 0.5) for c, m in gt]

    assert _evaluate(with_fp)["mask_ap"] < 0.95


def test_no_detections_and_no_ground_truth():
    assert _evaluate(lambda h, w, gt: [])["mask_ap"] == 0.0
    ev = CocoEvaluator(PET_CATEGORIES)
    ev.add(10, 10, [], [])
    out = ev.result().to_json()
    assert out["mask_ap"] is None and out["box_ap"] is None
    json.dumps(out)  # NaN-free


def test_category_map_by_name():
    assert category_map_by_name(coco_labels(), PET_CATEGORIES) == {17: 1, 18: 2}
    assert category_map_by_name({1: "Cat", 2: "dog", 3: "bird"}, PET_CATEGORIES) == {1: 1, 2: 2}


def test_pet_mask():
    tri = np.array([[1, 2, 3], [2, 2, 1]], np.uint8)
    np.testing.assert_array_equal(pet_mask(tri), [[True, False, True], [False, False, True]])
    np.testing.assert_array_equal(pet_mask(tri, include_outline=False), [[True, False, False], [False, False, True]])


@pytest.fixture
def pets() -> Path:
    d = DATA / "oxford_pets"
    if not (d / "images").is_dir():
        pytest.skip("../shared/data/oxford_pets not available")
    return d


def test_list_pet_samples_species(pets):
    samples = list_pet_samples(pets, ["Abyssinian_100", "american_bulldog_100", "no_such_pet"])
    assert [(s.name, s.category_id) for s in samples] == [("Abyssinian_100", 1), ("american_bulldog_100", 2)]
    all_ = list_pet_samples(pets)
    # the list file's species agree with the capitalisation rule (242 cats; the README's total line
    # says 135, contradicting its own breed table)
    assert len(all_) == 377 and sum(s.category_id == 1 for s in all_) == 242
    assert all((s.category_id == 1) == s.name[0].isupper() for s in all_)


def test_evaluate_folder_end_to_end(pets, tmp_path, tmp_path_factory):
    """The whole path on real photos with the tiny blob detector relabelled cat/dog: numbers, not quality."""
    from tests.test_instances_blobmodel import blob_model_dir

    spec = ModelSpec(name="blob-pets", kind="instance", source=str(blob_model_dir(tmp_path_factory)),
                     source_format="savedmodel", classes=[{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}])
    spec.to_file(tmp_path / "spec.json")
    model = load_instance_model(ModelSpec.from_file(tmp_path / "spec.json"))
    res = evaluate_folder(model, pets, names=["Abyssinian_100", "american_bulldog_100", "Bengal_100"])
    assert (res.images, res.gt_instances) == (3, 3)
    assert res.detections > 0
    assert 0.0 <= res.mask_ap <= 1.0 and 0.0 <= res.box_ap50 <= 1.0
    with pytest.raises(ValueError, match="cat or dog"):
        evaluate_folder(load_instance_model(ModelSpec.model_validate(
            {**spec.model_dump(), "classes": [{"id": 1, "name": "red"}]})), pets)


def test_evaluate_folder_names_bad_photos_and_scores_the_rest(pets, tmp_path, tmp_path_factory):
    """A truncated photo and a trimap of another size are named in ``errors``; the good photos are scored
    exactly as in a folder without the bad ones."""
    from PIL import Image

    from tests.test_instances_blobmodel import blob_model_dir
    from tests.test_train import make_pets_folder

    spec = ModelSpec(name="blob-pets", kind="instance", source=str(blob_model_dir(tmp_path_factory)),
                     source_format="savedmodel", classes=[{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}])
    model = load_instance_model(spec)
    good = ["Abyssinian_100", "american_bulldog_100"]
    clean = make_pets_folder(tmp_path / "clean", good)
    mixed = make_pets_folder(tmp_path / "mixed", good)
    raw = (pets / "images" / "Bengal_100.jpg").read_bytes()
    (mixed / "images" / "cut_cat_1.jpg").write_bytes(raw[: len(raw) // 3])
    Image.open(pets / "trimaps" / "Bengal_100.png").save(mixed / "trimaps" / "cut_cat_1.png")
    (mixed / "images" / "small_cat_2.jpg").symlink_to(pets / "images" / "Bengal_100.jpg")
    Image.fromarray(np.full((20, 30), 1, np.uint8)).save(mixed / "trimaps" / "small_cat_2.png")
    names = [*good, "cut_cat_1", "small_cat_2"]
    res = evaluate_folder(model, mixed, names=names)
    ref = evaluate_folder(model, clean, names=good)
    assert (res.images, res.gt_instances) == (2, 2)
    assert [e["name"] for e in res.errors] == ["cut_cat_1", "small_cat_2"]
    assert "unreadable image" in res.errors[0]["error"] and "sizes differ" in res.errors[1]["error"]
    assert (res.mask_ap, res.box_ap, res.detections) == (ref.mask_ap, ref.box_ap, ref.detections)
    assert ref.errors == [] and res.to_json()["errors"] == res.errors
    with pytest.raises(ValueError, match="none of the 2 photos"):
        evaluate_folder(model, mixed, names=["cut_cat_1", "small_cat_2"])
