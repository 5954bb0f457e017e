"""A tiny real detector exported as a SavedModel with the TF2 Object Detection API signature.

It finds bright blobs (max channel >= 128) as 8-connected components with TF ops only (label propagation
by 3x3 max pooling), so its outputs really depend on the input: class 1 when red dominates the blob,
class 2 when green does; score = mean brightness / 255; box = the component's pixel extent
(normalised, pixel-edge convention); box-relative ``mask_size`` masks sampled with crop_and_resize.
Other instance tests import :func:`blob_model_dir` / :func:`blob_image`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

MAX_DET = 20
MASK_SIZE = 33


class BlobDetector(tf.Module):
    def __init__(self, max_det: int = MAX_DET, mask_size: int = MASK_SIZE, threshold: float = 128.0):
        super().__init__()
        self.max_det = max_det
        self.mask_size = mask_size
        self.threshold = threshold

    @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8, name="input_tensor")])
    def detect(self, input_tensor):
        img = tf.cast(input_tensor[0], tf.float32)
        h, w = tf.shape(img)[0], tf.shape(img)[1]
        fg = tf.reduce_max(img, axis=-1) >= self.threshold
        ids = tf.reshape(tf.cast(tf.range(1, h * w + 1), tf.float32), [h, w])
        lab0 = tf.where(fg, ids, 0.0)

        def body(lab, _changed):
            grown = tf.nn.max_pool2d(lab[None, :, :, None], 3, 1, "SAME")[0, :, :, 0]
            grown = tf.where(fg, grown, 0.0)
            return grown, tf.reduce_any(tf.not_equal(grown, lab))

        lab, _ = tf.while_loop(lambda _l, c: c, body, [lab0, tf.constant(True)], maximum_iterations=4 * (h + w))

        flat = tf.reshape(lab, [-1])
        pix = tf.where(flat > 0)[:, 0]
        uniq, seg = tf.unique(tf.gather(flat, pix))
        k = tf.size(uniq)
        rows, cols = pix // tf.cast(w, tf.int64), pix % tf.cast(w, tf.int64)
        rmin = tf.math.unsorted_segment_min(rows, seg, k)
        rmax = tf.math.unsorted_segment_max(rows, seg, k)
        cmin = tf.math.unsorted_segment_min(cols, seg, k)
        cmax = tf.math.unsorted_segment_max(cols, seg, k)
        rgb = tf.gather(tf.reshape(img, [-1, 3]), pix)
        count = tf.math.unsorted_segment_sum(tf.ones_like(rgb[:, 0]), seg, k)
        mean_rgb = tf.math.unsorted_segment_sum(rgb, seg, k) / count[:, None]
        score = tf.reduce_max(mean_rgb, axis=1) / 255.0
        cls = tf.where(mean_rgb[:, 0] >= mean_rgb[:, 1], 1.0, 2.0)

        n = tf.minimum(k, self.max_det)
        order = tf.argsort(score, direction="DESCENDING")[:n]
        hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
        f = lambda t: tf.cast(tf.gather(t, order), tf.float32)  # noqa: E731
        boxes = tf.stack([f(rmin) / hf, f(cmin) / wf, (f(rmax) + 1) / hf, (f(cmax) + 1) / wf], axis=1)
        comp = tf.cast(tf.equal(lab[None], tf.gather(uniq, order)[:, None, None]), tf.float32)[..., None]
        masks = tf.image.crop_and_resize(comp, boxes, tf.range(n), [self.mask_size, self.mask_size])[..., 0]

        pad = self.max_det - n
        return {
            "detection_boxes": tf.pad(boxes, [[0, pad], [0, 0]])[None],
            "detection_classes": tf.pad(tf.gather(cls, order), [[0, pad]])[None],
            "detection_scores": tf.pad(tf.gather(score, order), [[0, pad]])[None],
            "num_detections": tf.cast(n, tf.float32)[None],
            "detection_masks": tf.pad(masks, [[0, pad], [0, 0], [0, 0]])[None],
        }


def export_blob_model(path: Path, **kwargs) -> Path:
    """Export :class:`BlobDetector` as a SavedModel at ``path`` (signature ``serving_default``)."""
    module = BlobDetector(**kwargs)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.detect.get_concrete_function()})
    return path


_exported: dict[str, Path] = {}


def blob_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One exported blob model per test session."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _exported:
        _exported[key] = export_blob_model(tmp_path_factory.mktemp("blob_model") / "saved")
    return _exported[key]


def blob_image(height: int, width: int, blobs: list[tuple]) -> np.ndarray:
    """``(H, W, 3) uint8`` dark image with blobs ``("rect", y0, x0, y1, x1, rgb)`` (end-exclusive) or
    ``("disk", cy, cx, r, rgb)``; returns the image (truth masks via :func:`blob_masks`)."""
    img = np.full((height, width, 3), 20, np.uint8)
    for m, b in zip(blob_masks(height, width, blobs), blobs, strict=True):
        img[m] = b[-1]
    return img


def blob_masks(height: int, width: int, blobs: list[tuple]) -> list[np.ndarray]:
    yy, xx = np.mgrid[:height, :width]
    out = []
    for b in blobs:
        if b[0] == "rect":
            _, y0, x0, y1, x1, _ = b
            out.append((yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1))
        else:
            _, cy, cx, r, _ = b
            out.append((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
    return out


@pytest.fixture(scope="module")
def signature(tmp_path_factory):
    return tf.saved_model.load(str(blob_model_dir(tmp_path_factory))).signatures["serving_default"]


def test_exported_signature_matches_od_api(signature):
    _, kwargs = signature.structured_input_signature
    assert list(kwargs) == ["input_tensor"]
    assert kwargs["input_tensor"].dtype == tf.uint8
    assert set(signature.structured_outputs) == {
        "detection_boxes", "detection_classes", "detection_scores", "num_detections", "detection_masks"}


def test_outputs_follow_the_image(signature):
    blobs = [("rect", 10, 10, 30, 40, (250, 30, 30)), ("disk", 60, 60, 10, (30, 160, 30))]
    out = signature(input_tensor=tf.constant(blob_image(96, 128, blobs)[None]))
    assert int(out["num_detections"][0]) == 2
    assert out["detection_masks"].shape == (1, MAX_DET, MASK_SIZE, MASK_SIZE)
    np.testing.assert_allclose(out["detection_scores"][0, :2], [250 / 255, 160 / 255], atol=1e-5)
    np.testing.assert_array_equal(out["detection_classes"][0, :2], [1, 2])
    np.testing.assert_allclose(out["detection_boxes"][0, 0], [10 / 96, 10 / 128, 30 / 96, 40 / 128], atol=1e-6)
    # a different image gives different outputs (nothing here is a constant)
    out2 = signature(input_tensor=tf.constant(blob_image(96, 128, blobs[1:])[None]))
    assert int(out2["num_detections"][0]) == 1
    assert int(out2["detection_classes"][0, 0]) == 2
