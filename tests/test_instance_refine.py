"""Instance mask refinement with a semantic model (spec ``refine``): the blend, the cut-out the semantic
model sees, spec validation and loading, and a SavedModel detector refined by a real Keras model."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from pipelines.instances import InstanceModelError, blend_foreground, detect_image, detect_item, rle_decode
from pipelines.spec import ModelSpec

RED, GREEN = (240, 40, 40), (40, 200, 40)


def test_blend_averages_inside_the_box_and_never_grows_past_it():
    rgb = np.zeros((40, 50, 3), np.uint8)
    crop = np.full((10, 20), 0.6, np.float32)  # reframed mask at rows 5..14, cols 10..29
    box = (10.0, 5.0, 30.0, 15.0)
    ones = blend_foreground(crop, 5, 10, box, rgb, lambda c: np.ones(c.shape[:2], np.float32), 0.5)
    np.testing.assert_allclose(ones, 0.8)
    zeros = blend_foreground(crop, 5, 10, box, rgb, lambda c: np.zeros(c.shape[:2], np.float32), 0.5)
    np.testing.assert_allclose(zeros, 0.3)
    assert not (zeros > 0.5).any()  # the semantic model says "nothing here": the mask disappears


def test_semantic_model_sees_the_grown_box_and_its_answer_lands_on_the_right_pixels():
    rgb = np.zeros((60, 80, 3), np.uint8)
    rgb[20:30, 30:45, 0] = 255  # a red square inside the detection box
    seen = []

    def redness(cut: np.ndarray) -> np.ndarray:
        seen.append(cut.shape)
        return (cut[..., 0] > 128).astype(np.float32)

    box = (25.0, 15.0, 55.0, 35.0)  # x0, y0, x1, y1
    crop = np.full((20, 30), 0.4, np.float32)  # weak detector mask over the box (rows 15..34, cols 25..54)
    out = blend_foreground(crop, 15, 25, box, rgb, redness, 0.5)
    # the box grown by 10 % of its side on each edge: rows 13..37 (24+), cols 22..58
    assert seen == [(24, 36, 3)]
    expect = np.zeros((20, 30), bool)
    expect[20 - 15 : 30 - 15, 30 - 25 : 45 - 25] = True
    np.testing.assert_array_equal(out > 0.5, expect)
    # clipped at the image border
    seen.clear()
    blend_foreground(np.zeros((10, 10), np.float32), 0, 0, (0.0, 0.0, 10.0, 10.0), rgb, redness, 0.5)
    assert seen == [(11, 11, 3)]


def test_spec_validation():
    base = dict(name="m", kind="instance", source="x", source_format="savedmodel",
                classes=[{"id": 1, "name": "pet"}])
    spec = ModelSpec(**base, refine={"model": "unet-pets", "foreground": ["pet", "outline"]})
    assert spec.refine.weight == 0.5
    with pytest.raises(ValidationError, match="instance models only"):
        ModelSpec(**{**base, "kind": "semantic"}, refine={"model": "u", "foreground": ["pet"]})
    for bad in ({"model": "u", "foreground": []}, {"model": "u", "foreground": ["pet"], "weight": 1.0},
                {"model": "u", "foreground": ["pet"], "extra": 1}):
        with pytest.raises(ValidationError):
            ModelSpec(**base, refine=bad)


tf = pytest.importorskip("tensorflow")


def _redness_model(folder) -> None:
    """A real Keras semantic model (1x1 conv + softmax) whose class `thing` is 'red dominates'."""
    import keras

    from pipelines.evaluate import export_model

    inp = keras.Input((64, 64, 3))
    conv = keras.layers.Conv2D(2, 1, activation="softmax")
    model = keras.Model(inp, conv(inp))
    conv.set_weights([np.array([[[[20.0, 0.0], [-20.0, 0.0], [0.0, 0.0]]]], np.float32),
                      np.array([-5.0, 0.0], np.float32)])
    model.save(folder / "ckpt.keras")
    export_model(folder / "ckpt.keras", folder, name="redness", input_size=64, class_names=["thing", "other"],
                 mode="resize", default_for=[])


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    from pipelines import registry
    from tests.test_instances_blobmodel import blob_model_dir

    root = tmp_path_factory.mktemp("refine")
    (root / "redness").mkdir()
    _redness_model(root / "redness")
    (root / "blobs").mkdir()
    spec = ModelSpec(name="blobs-refined", kind="instance", source=str(blob_model_dir(tmp_path_factory)),
                     source_format="savedmodel", classes=[{"id": 1, "name": "red"}, {"id": 2, "name": "green"}],
                     input_size=128, overlap=32, score_threshold=0.3,
                     refine={"model": "../redness", "foreground": ["thing"]})
    spec.to_file(root / "blobs" / "spec.json")
    registry.clear_cache()
    yield registry.load(str(root / "blobs" / "spec.json")), root
    registry.clear_cache()


def test_detector_refined_by_a_semantic_model(refined):
    from tests.test_instances import ArrayItem, _match
    from tests.test_instances_blobmodel import blob_image, blob_masks

    model, _ = refined
    assert model.foreground is not None
    blobs = [("rect", 10, 10, 50, 60, RED), ("disk", 80, 100, 16, GREEN)]
    img = blob_image(120, 140, blobs)
    plain = detect_image(model, img, refine=False)
    assert sorted(i.class_id for i in plain) == [1, 2]
    found = detect_image(model, img)
    # the semantic model calls the green blob "other": its mask averages below 0.5 and the instance goes;
    # the red one keeps its class, score and shape
    assert [i.class_id for i in found] == [1]
    red_plain = next(i for i in plain if i.class_id == 1)
    assert found[0].score == pytest.approx(red_plain.score) and found[0].box == pytest.approx(red_plain.box)
    assert _match(found, blob_masks(120, 140, blobs)[:1])[0] > 0.9
    # the tiled path refines each tile's detections the same way
    item = ArrayItem(np.moveaxis(blob_image(200, 260, [("rect", 100, 90, 150, 200, RED),
                                                       ("disk", 40, 40, 15, GREEN)]), -1, 0))
    tiled = detect_item(item, model)
    assert [i.class_id for i in tiled] == [1]
    m = rle_decode(tiled[0].rle).astype(bool)
    truth = blob_masks(200, 260, [("rect", 100, 90, 150, 200, RED)])[0]
    assert (m & truth).sum() / (m | truth).sum() > 0.9
    assert sorted(i.class_id for i in detect_item(item, model, refine=False)) == [1, 2]


def test_refining_model_errors_are_clear(refined, tmp_path):
    from pipelines.instances import load_instance_model

    model, root = refined
    base = model.spec.model_dump(exclude={"spec_path", "refine"})
    (tmp_path / "redness").symlink_to(root / "redness")
    (tmp_path / "blobs").symlink_to(root / "blobs")
    for refine, msg in (({"model": "../redness", "foreground": ["pet"]}, "has no class"),
                        ({"model": "no-such-model", "foreground": ["thing"]}, "not found"),
                        ({"model": "../blobs", "foreground": ["red"]}, "not a semantic model")):
        d = tmp_path / msg.replace(" ", "_")
        d.mkdir()
        ModelSpec(**base, refine=refine).to_file(d / "spec.json")
        with pytest.raises(InstanceModelError, match=msg):
            load_instance_model(ModelSpec.from_file(d / "spec.json"))
