"""tileseg's own Mask R-CNN: Model Garden config, pets input with multi-pet augmentation, training, export.

Training needs ``tf-models-official`` (the ``[train]`` extra); the exported SavedModel does not: it runs
through :mod:`pipelines.instances` with plain TensorFlow, like any TF2 Object Detection API export.

- Data (pure numpy, no Model Garden): one instance per oxford_pets photo, mask from the trimap
  (pet + outline, as :func:`pipelines.instance_eval.pet_mask`), box from the mask. Several pets per image
  come from a *mosaic* (2-4 photos letterboxed into the cells of a square canvas) and *copy-paste* (a pet cut
  out by its mask and pasted, scaled, over another image, occluding what it covers).
- Model Garden: a Mask R-CNN task config (MobileNetV2 or ResNet-18 + FPN, backbone from scratch), its own
  train ``Parser`` (resize/jitter/flip, RPN anchor labels, box-cropped mask targets) fed from the numpy
  samples, a plain ``tf.function`` training loop with ``tf_keras`` optimizers (the Model Garden is Keras 2;
  ``tf.keras`` here is Keras 3 and must not be mixed in), checkpoints every few hundred steps (resumable).
- Export: a ``tf.Module`` whose ``serving_default`` takes ``input_tensor`` ``uint8 [1, H, W, 3]`` and returns
  the OD API dict (normalised boxes on the *original* image, float classes, scores, num_detections,
  box-relative ``detection_masks``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from adapters.base import AdapterError

__all__ = [
    "CLASSES",
    "MaskRCNNConfig",
    "PetInstance",
    "SampleGenerator",
    "boxes_from_masks",
    "build_task_config",
    "copy_paste",
    "evaluate_class_agnostic",
    "evaluate_model_folder",
    "evaluate_mosaics",
    "export_run",
    "export_saved_model",
    "letterbox",
    "load_pets",
    "mosaic",
    "recalibrate_batchnorm",
    "restore_model",
    "serving_preprocess",
    "train_maskrcnn",
    "training_pets",
    "write_model_folder",
    "write_training_curve",
]

log = logging.getLogger(__name__)

#: Model output ids (0 is the Model Garden's background class) and names; match ``PET_CATEGORIES``.
CLASSES: dict[int, str] = {1: "cat", 2: "dog"}
CLASS_COLORS: dict[int, tuple[int, int, int]] = {1: (242, 140, 60), 2: (60, 140, 242)}


# --------------------------------------------------------------------------------------------- config


#: Smallest scale of the training parser's jitter: the graph learned from photos point-sampled down by up to
#: 1 / AUG_SCALE_MIN, so the service hands it views at most that much larger than its input (detector_size).
AUG_SCALE_MIN = 0.8


@dataclass
class MaskRCNNConfig:
    """Everything a training run needs; saved as ``config.json`` in the run folder."""

    data_dir: str
    out: str
    #: ``pets``: ``data_dir`` laid out like oxford_pets (cat, dog). ``buildings``: ``data_dir`` is the shared
    #: data root (``spacenet1_rio_buildings``, ``satellite_labeled``); one class, building.
    dataset: Literal["pets", "buildings"] = "pets"
    backbone: Literal["mobilenetv2", "resnet18"] = "mobilenetv2"
    #: Square training/serving canvas (px). Pets fill most of a 256 px photo.
    size: int = 256
    steps: int = 3000
    batch_size: int = 4
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 1e-4
    val_fraction: float = 0.15
    seed: int = 0
    #: Probability a sample is a 2-4 pet mosaic; then probability one more pet is copy-pasted on it.
    mosaic_prob: float = 0.5
    copy_paste_prob: float = 0.3
    max_instances: int = 8
    #: FPN levels and anchors: base anchor = anchor_size * 2**level, so 3 * (8..64) = 24..192 px (x sqrt 2).
    min_level: int = 3
    max_level: int = 6
    anchor_size: float = 3.0
    num_scales: int = 2
    #: Width of FPN / heads; small to keep CPU steps and the SavedModel small.
    fpn_filters: int = 128
    head_filters: int = 128
    fc_dims: int = 512
    #: Proposals kept per image in training / at test time, ROIs sampled per image, mask targets per image,
    #: detections per call. Pets: one to four per image; buildings: up to ~100 per 256 px crop.
    num_proposals: int = 200
    test_num_proposals: int = 100
    num_sampled_rois: int = 128
    num_sampled_masks: int = 32
    max_detections: int = 20
    checkpoint_every: int = 250
    log_every: int = 20
    resume: bool = False
    #: pets: more training folders laid out like oxford_pets (e.g. ``train pseudo-label --instance-model``
    #: output); every listed name is used except those in ``data_dir``'s validation split.
    extra_train: list[str] = field(default_factory=list)
    #: Start a new run from an exported model folder's weights (``saved_model/`` written by
    #: :func:`export_saved_model` with the same architecture settings); a fresh optimizer and schedule.
    init_from: str | None = None

    def run_dir(self) -> Path:
        return Path(self.out)

    @property
    def classes(self) -> dict[int, str]:
        if self.dataset == "buildings":
            from pipelines.building_instances import BUILDING_INSTANCE_CLASSES

            return BUILDING_INSTANCE_CLASSES
        return CLASSES

    @classmethod
    def for_buildings(cls, data_dir: str, out: str, **kw: Any) -> MaskRCNNConfig:
        """Defaults sized to buildings at 0.5 m: 8-40 px houses, dozens per crop. FPN levels 2-5 with
        base anchors 3 * (4..32) = 12..96 px, more proposals, ROIs, mask targets and detections."""
        base = dict(dataset="buildings", min_level=2, max_level=5, anchor_size=3.0, max_instances=100,
                    num_proposals=500, test_num_proposals=300, num_sampled_rois=256, num_sampled_masks=64,
                    max_detections=100, mosaic_prob=0.0, copy_paste_prob=0.0)
        return cls(data_dir=data_dir, out=out, **{**base, **kw})


def build_task_config(cfg: MaskRCNNConfig) -> Any:
    """The Model Garden ``MaskRCNNTask`` config for ``cfg`` (needs ``tf-models-official``).

    Defaults that do not work out of the box are set explicitly: ``num_classes`` (background + cat + dog),
    ``input_size``, ``use_sync_bn=False`` (one CPU replica), and anchors sized to pets, not COCO objects.
    """
    from official.vision.configs import backbones, common, decoders
    from official.vision.configs import maskrcnn as mcfg

    if cfg.backbone == "mobilenetv2":
        backbone = backbones.Backbone(type="mobilenet", mobilenet=backbones.MobileNet(model_id="MobileNetV2"))
    elif cfg.backbone == "resnet18":
        backbone = backbones.Backbone(type="resnet", resnet=backbones.ResNet(model_id=18))
    else:
        raise ValueError(f"unknown backbone {cfg.backbone!r}; use mobilenetv2 or resnet18")
    model = mcfg.MaskRCNN(
        num_classes=len(cfg.classes) + 1,
        input_size=[cfg.size, cfg.size, 3],
        min_level=cfg.min_level,
        max_level=cfg.max_level,
        anchor=mcfg.Anchor(num_scales=cfg.num_scales, aspect_ratios=[0.5, 1.0, 2.0], anchor_size=cfg.anchor_size),
        include_mask=True,
        backbone=backbone,
        decoder=decoders.Decoder(type="fpn", fpn=decoders.FPN(num_filters=cfg.fpn_filters)),
        rpn_head=mcfg.RPNHead(num_convs=1, num_filters=cfg.fpn_filters),
        detection_head=mcfg.DetectionHead(num_convs=0, num_filters=cfg.head_filters, num_fcs=2,
                                          fc_dims=cfg.fc_dims),
        # Few objects per image: far fewer proposals and sampled ROIs than COCO needs (and much faster).
        roi_generator=mcfg.ROIGenerator(pre_nms_top_k=max(1000, 2 * cfg.num_proposals),
                                        num_proposals=cfg.num_proposals,
                                        test_pre_nms_top_k=max(500, 2 * cfg.test_num_proposals),
                                        test_num_proposals=cfg.test_num_proposals),
        roi_sampler=mcfg.ROISampler(num_sampled_rois=cfg.num_sampled_rois, foreground_fraction=0.25),
        mask_head=mcfg.MaskHead(num_convs=2, num_filters=cfg.head_filters),
        mask_sampler=mcfg.MaskSampler(num_sampled_masks=cfg.num_sampled_masks),
        detection_generator=mcfg.DetectionGenerator(pre_nms_top_k=max(500, 2 * cfg.test_num_proposals),
                                                    max_num_detections=cfg.max_detections,
                                                    pre_nms_score_threshold=0.01),
        norm_activation=common.NormActivation(norm_momentum=0.99, norm_epsilon=1e-3, use_sync_bn=False,
                                              activation="relu"),
    )
    return mcfg.MaskRCNNTask(model=model, losses=mcfg.Losses(l2_weight_decay=cfg.weight_decay))


# --------------------------------------------------------------------------------------------- data


@dataclass
class PetInstance:
    """One labelled photo: ``image`` ``(H, W, 3) uint8``, ``mask`` ``(H, W) bool``, ``class_id`` 1 cat / 2 dog."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    class_id: int


def load_pets(data_dir: str | Path, names: Sequence[str]) -> list[PetInstance]:
    """Decode the listed oxford_pets samples (photos whose trimap is missing are skipped).

    Raises :class:`AdapterError` naming the file when a photo or trimap cannot be read or sizes differ.
    """
    from PIL import Image

    from pipelines.instance_eval import list_pet_samples, pet_mask

    out = []
    for s in list_pet_samples(data_dir, names):
        try:
            with Image.open(s.image) as im:
                image = np.asarray(im.convert("RGB"))
            with Image.open(s.trimap) as tm:
                trimap = np.asarray(tm)
        except (OSError, ValueError) as e:
            raise AdapterError(f"{s.image}: cannot read photo/trimap: {e}") from e
        if trimap.shape != image.shape[:2]:
            raise AdapterError(f"{s.trimap}: size {trimap.shape} differs from the photo's {image.shape[:2]}")
        mask = pet_mask(trimap)
        if mask.any():
            out.append(PetInstance(s.name, image, mask, s.category_id))
    return out


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight pixel boxes of ``masks`` ``(N, H, W) bool`` -> ``(N, 4) float32`` ``ymin, xmin, ymax, xmax``.

    Max edges are exclusive (a mask covering rows 3..5 gives ymin 3, ymax 6), so ``ymax - ymin`` is the
    height in pixels, as COCO's ``toBbox`` counts it. Empty masks give an all-zero box.
    """
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        if rows.size:
            boxes[i] = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
    return boxes


def _resize(image: np.ndarray, mask: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    img = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    # Masks are resized bilinearly then thresholded so thin parts survive downscaling symmetrically.
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.BILINEAR)) >= 128
    return img, m


def letterbox(image: np.ndarray, mask: np.ndarray, height: int, width: int, *, scale: float = 1.0,
              rng: np.random.Generator | None = None, fill: Sequence[int] = (124, 116, 104)
              ) -> tuple[np.ndarray, np.ndarray]:
    """Fit a photo and its mask into a ``(height, width)`` cell, aspect kept, ``scale`` <= 1 of the fit.

    Returns ``(height, width, 3) uint8`` and ``(height, width) bool``; the photo sits at a random offset
    (``rng``) or top-left, the rest is ``fill`` (the ImageNet mean colour, i.e. zero after normalisation).
    """
    h0, w0 = mask.shape
    s = min(height / h0, width / w0) * scale
    h, w = max(1, min(height, round(h0 * s))), max(1, min(width, round(w0 * s)))
    img, m = _resize(image, mask, h, w)
    oy = int(rng.integers(0, height - h + 1)) if rng is not None else 0
    ox = int(rng.integers(0, width - w + 1)) if rng is not None else 0
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = np.asarray(fill, np.uint8)
    cmask = np.zeros((height, width), bool)
    canvas[oy:oy + h, ox:ox + w] = img
    cmask[oy:oy + h, ox:ox + w] = m
    return canvas, cmask


def _cells(k: int, size: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """``k`` (2-4) non-overlapping ``(y, x, h, w)`` cells tiling a ``size`` square, split point jittered."""
    cy = int(size * rng.uniform(0.35, 0.65))
    cx = int(size * rng.uniform(0.35, 0.65))
    if k == 2:
        if rng.random() < 0.5:
            return [(0, 0, size, cx), (0, cx, size, size - cx)]
        return [(0, 0, cy, size), (cy, 0, size - cy, size)]
    if k == 3:
        return [(0, 0, size, cx), (0, cx, cy, size - cx), (cy, cx, size - cy, size - cx)]
    return [(0, 0, cy, cx), (0, cx, cy, size - cx), (cy, 0, size - cy, cx), (cy, cx, size - cy, size - cx)]


def mosaic(pets: Sequence[PetInstance], size: int, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2-4 pets letterboxed into the cells of one ``size`` square canvas.

    Returns ``image`` ``(size, size, 3) uint8``, ``masks`` ``(N, size, size) bool`` (one per pet, disjoint)
    and ``classes`` ``(N,) int64``.
    """
    if not 2 <= len(pets) <= 4:
        raise ValueError(f"a mosaic takes 2-4 pets, got {len(pets)}")
    image = np.empty((size, size, 3), np.uint8)
    masks = np.zeros((len(pets), size, size), bool)
    for i, (pet, (y, x, h, w)) in enumerate(zip(pets, _cells(len(pets), size, rng), strict=True)):
        cell, m = letterbox(pet.image, pet.mask, h, w, scale=rng.uniform(0.75, 1.0), rng=rng)
        image[y:y + h, x:x + w] = cell
        masks[i, y:y + h, x:x + w] = m
    return image, masks, np.array([p.class_id for p in pets], np.int64)


def copy_paste(image: np.ndarray, masks: np.ndarray, classes: np.ndarray, pet: PetInstance,
               rng: np.random.Generator, *, min_visible: float = 0.3
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paste ``pet`` (cut out by its mask, scaled to 35-65% of the canvas) onto ``image`` at a random place.

    The pasted pet occludes what it covers: earlier masks lose those pixels, and an instance left with
    less than ``min_visible`` of its area is dropped (its pixels stay in the photo, unlabelled, as a COCO
    crowd of one would be). Inputs: ``(H, W, 3) uint8``, ``(N, H, W) bool``, ``(N,) int64``; same outputs
    with the pasted pet appended last.
    """
    hh, ww = image.shape[:2]
    ys, xs = np.nonzero(pet.mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop, cmask = pet.image[y0:y1, x0:x1], pet.mask[y0:y1, x0:x1]
    s = rng.uniform(0.35, 0.65) * min(hh, ww) / max(crop.shape[:2])
    h, w = max(1, min(hh, round(crop.shape[0] * s))), max(1, min(ww, round(crop.shape[1] * s)))
    crop, cmask = _resize(crop, cmask, h, w)
    oy, ox = int(rng.integers(0, hh - h + 1)), int(rng.integers(0, ww - w + 1))
    pasted = np.zeros((hh, ww), bool)
    pasted[oy:oy + h, ox:ox + w] = cmask
    out = image.copy()
    out[oy:oy + h, ox:ox + w][cmask] = crop[cmask]
    before = masks.sum(axis=(1, 2))
    masks = masks & ~pasted
    keep = masks.sum(axis=(1, 2)) >= min_visible * np.maximum(before, 1)
    return (out, np.concatenate([masks[keep], pasted[None]]),
            np.concatenate([classes[keep], [pet.class_id]]).astype(np.int64))


class SampleGenerator:
    """Endless random training samples: single photos, mosaics of 2-4 pets, with optional copy-paste.

    Each sample is ``image (H, W, 3) uint8``, ``masks (N, H, W) bool``, ``classes (N,) int64`` with
    ``1 <= N <= max_instances``; single photos keep their own size (the Model Garden parser resizes them).
    """

    def __init__(self, pets: Sequence[PetInstance], size: int, *, mosaic_prob: float = 0.5,
                 copy_paste_prob: float = 0.3, max_instances: int = 8, seed: int = 0):
        if not pets:
            raise ValueError("no training pets")
        self.pets, self.size = list(pets), size
        self.mosaic_prob, self.copy_paste_prob, self.max_instances = mosaic_prob, copy_paste_prob, max_instances
        self.rng = np.random.default_rng(seed)

    def _pick(self, k: int) -> list[PetInstance]:
        return [self.pets[i] for i in self.rng.choice(len(self.pets), size=k, replace=len(self.pets) < k)]

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = self.rng
        if rng.random() < self.mosaic_prob:
            image, masks, classes = mosaic(self._pick(int(rng.integers(2, 5))), self.size, rng)
        else:
            pet = self._pick(1)[0]
            image, masks, classes = pet.image, pet.mask[None], np.array([pet.class_id], np.int64)
        if rng.random() < self.copy_paste_prob and len(classes) < self.max_instances:
            image, masks, classes = copy_paste(image, masks, classes, self._pick(1)[0], rng)
        return image, masks, classes

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Dicts in the Model Garden decoder's layout (boxes normalised), ready for ``Parser``."""
        while True:
            image, masks, classes = self.sample()
            h, w = masks.shape[1:]
            boxes = boxes_from_masks(masks) / np.array([h, w, h, w], np.float32)
            yield {
                "image": image,
                "groundtruth_boxes": boxes,
                "groundtruth_classes": classes,
                "groundtruth_instance_masks": masks.astype(np.float32),
                "groundtruth_is_crowd": np.zeros(len(classes), bool),
            }


def training_pets(cfg: MaskRCNNConfig) -> list[PetInstance]:
    """The pets a run trains on: ``data_dir``'s training split plus every ``extra_train`` folder's listed
    photos, minus any name in ``data_dir``'s validation split (so an extra folder cannot leak it)."""
    from pipelines.train import list_names

    train_names, val_names = _split(cfg.data_dir, cfg.val_fraction)
    pets = load_pets(cfg.data_dir, train_names)
    if not pets:
        raise AdapterError(f"{cfg.data_dir}: no training photos with trimaps")
    held_out = set(val_names)
    for extra in cfg.extra_train:
        more = load_pets(extra, [n for n in list_names(extra) if n not in held_out])
        log.info("%s: %d more training pets", extra, len(more))
        pets += more
    log.info("training on %d pets (%d held out)", len(pets), len(val_names))
    return pets


def _samples(cfg: MaskRCNNConfig, split: str = "train") -> Iterator[dict[str, np.ndarray]]:
    """The training sample stream of ``cfg.dataset`` (decoder-layout dicts, see :class:`SampleGenerator`)."""
    if cfg.dataset == "buildings":
        from pipelines.building_instances import BuildingCropGenerator, load_building_scenes

        scenes = load_building_scenes(split, cfg.data_dir)
        log.info("training on %d scenes with %d buildings", len(scenes), sum(s.count for s in scenes))
        return iter(BuildingCropGenerator(scenes, cfg.size, max_instances=cfg.max_instances, seed=cfg.seed))
    pets = training_pets(cfg)
    return iter(SampleGenerator(pets, cfg.size, mosaic_prob=cfg.mosaic_prob, copy_paste_prob=cfg.copy_paste_prob,
                                max_instances=cfg.max_instances, seed=cfg.seed))


def _dataset(cfg: MaskRCNNConfig, samples: Iterator[dict[str, np.ndarray]], task_config: Any):
    """``tf.data`` of ``(images (B, S, S, 3) float32, labels)`` through the Model Garden's train parser."""
    import tensorflow as tf
    from official.vision.dataloaders import maskrcnn_input

    m = task_config.model
    parser = maskrcnn_input.Parser(
        output_size=[cfg.size, cfg.size], min_level=m.min_level, max_level=m.max_level,
        num_scales=m.anchor.num_scales, aspect_ratios=m.anchor.aspect_ratios, anchor_size=m.anchor.anchor_size,
        aug_rand_hflip=True, aug_scale_min=AUG_SCALE_MIN, aug_scale_max=1.25, max_num_instances=cfg.max_instances,
        include_mask=True, mask_crop_size=112, dtype="float32",
    )
    sig = {
        "image": tf.TensorSpec([None, None, 3], tf.uint8),
        "groundtruth_boxes": tf.TensorSpec([None, 4], tf.float32),
        "groundtruth_classes": tf.TensorSpec([None], tf.int64),
        "groundtruth_instance_masks": tf.TensorSpec([None, None, None], tf.float32),
        "groundtruth_is_crowd": tf.TensorSpec([None], tf.bool),
    }
    ds = tf.data.Dataset.from_generator(lambda: samples, output_signature=sig)
    ds = ds.map(parser._parse_train_data, num_parallel_calls=1)
    return ds.batch(cfg.batch_size, drop_remainder=True).prefetch(2)


# --------------------------------------------------------------------------------------------- training


def _lr_schedule(cfg: MaskRCNNConfig):
    import tf_keras

    class WarmupCosine(tf_keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            import tensorflow as tf

            step = tf.cast(step, tf.float32)
            warm = cfg.learning_rate * (step + 1) / max(cfg.warmup_steps, 1)
            t = tf.clip_by_value((step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1), 0.0, 1.0)
            cos = cfg.learning_rate * (0.02 + 0.98 * 0.5 * (1 + tf.cos(math.pi * t)))
            return tf.where(step < cfg.warmup_steps, warm, cos)

        def get_config(self):
            return {}

    return WarmupCosine()


def _split(data_dir: str | Path, val_fraction: float) -> tuple[list[str], list[str]]:
    from pipelines.train import list_names, split_names

    return split_names(list_names(data_dir), val_fraction)


def train_maskrcnn(cfg: MaskRCNNConfig) -> Path:
    """Train (or resume) a Mask R-CNN on ``cfg.data_dir``'s training split; returns the run folder.

    The run folder gets ``config.json``, ``ckpt/`` (model + optimizer + step, every ``checkpoint_every``
    steps and at the end) and ``history.csv`` (step, seconds, learning rate and each loss, every
    ``log_every`` steps). Validation names (:func:`pipelines.train.split_names`) are never trained on.
    """
    import tensorflow as tf
    import tf_keras
    from official.vision.tasks.maskrcnn import MaskRCNNTask

    out = cfg.run_dir()
    if (out / "ckpt").is_dir() and not cfg.resume:
        raise FileExistsError(f"{out} already has checkpoints; pass resume=True (--resume) or another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    tf.random.set_seed(cfg.seed)

    samples = _samples(cfg)

    task_config = build_task_config(cfg)
    task = MaskRCNNTask(task_config)
    model = task.build_model()
    schedule = _lr_schedule(cfg)
    optimizer = tf_keras.optimizers.Adam(learning_rate=schedule, clipnorm=10.0)
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var)
    manager = tf.train.CheckpointManager(ckpt, str(out / "ckpt"), max_to_keep=2)
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint)
        log.info("resumed from %s at step %d", manager.latest_checkpoint, int(step_var.numpy()))
    elif cfg.init_from:
        n = load_exported_weights(model, cfg.init_from)
        log.info("initialised %d variables from %s", n, cfg.init_from)

    @tf.function
    def train_step(images, labels):
        with tf.GradientTape() as tape:
            outputs = model(images, image_shape=labels["image_info"][:, 1, :], anchor_boxes=labels["anchor_boxes"],
                            gt_boxes=labels["gt_boxes"], gt_classes=labels["gt_classes"],
                            gt_masks=labels["gt_masks"], training=True)
            outputs = tf.nest.map_structure(lambda x: tf.cast(x, tf.float32), outputs)
            losses = task.build_losses(outputs=outputs, labels=labels, aux_losses=model.losses)
        grads = tape.gradient(losses["total_loss"], model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        step_var.assign_add(1)
        return losses

    hist_path = out / "history.csv"
    new_file = not hist_path.exists()
    keys = ["total_loss", "rpn_score_loss", "rpn_box_loss", "frcnn_cls_loss", "frcnn_box_loss", "mask_loss"]
    t0, acc, n_acc = time.monotonic(), dict.fromkeys(keys, 0.0), 0
    with hist_path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new_file:
            writer.writerow(["step", "seconds", "lr", *keys])
        for images, labels in _dataset(cfg, samples, task_config):
            step = int(step_var.numpy())
            if step >= cfg.steps:
                break
            losses = train_step(images, labels)
            loss = float(losses["total_loss"])
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}")
            for k in keys:
                acc[k] += float(losses[k])
            n_acc += 1
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                lr = float(schedule(step))
                row = [round(acc[k] / n_acc, 5) for k in keys]
                writer.writerow([step, round(time.monotonic() - t0, 1), f"{lr:.6f}", *row])
                f.flush()
                log.info("step %d  %.1fs  lr %.2e  %s", step, time.monotonic() - t0, lr,
                         "  ".join(f"{k} {v:.4f}" for k, v in zip(keys, row, strict=True)))
                acc, n_acc = dict.fromkeys(keys, 0.0), 0
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                manager.save(checkpoint_number=step)
    return out


class IncompatibleWeights(ValueError):
    """An exported model's variables do not fit the model built from the run's settings."""


def load_exported_weights(model: Any, folder: str | Path) -> int:
    """Copy the weights of an exported SavedModel (a model folder with ``saved_model/``, or the SavedModel
    directory itself) into ``model``, built with the same architecture settings; returns the variable count.

    The export tracks ``model.variables`` as a list (see :func:`_serving_module`), so variable ``i`` of the
    SavedModel is ``model.variables[i]``; every shape is checked before anything is assigned.
    """
    import tensorflow as tf

    folder = Path(folder)
    saved = folder / "saved_model" if (folder / "saved_model").is_dir() else folder
    if not (saved / "saved_model.pb").is_file():
        raise FileNotFoundError(f"{folder} holds no exported SavedModel (saved_model.pb)")
    reader = tf.train.load_checkpoint(str(saved / "variables" / "variables"))
    shapes = reader.get_variable_to_shape_map()
    keys = [f"weights/{i}/.ATTRIBUTES/VARIABLE_VALUE" for i in range(len(model.variables))]
    stored = sum(1 for k in shapes if k.startswith("weights/") and k.endswith("/.ATTRIBUTES/VARIABLE_VALUE"))
    if stored != len(keys):
        raise IncompatibleWeights(
            f"{saved} has {stored} variables, the model {len(keys)}: different architecture settings")
    for key, var in zip(keys, model.variables, strict=True):
        if tuple(shapes[key]) != tuple(var.shape):
            raise IncompatibleWeights(
                f"{saved}: {key} has shape {shapes[key]}, the model's {var.name} {tuple(var.shape)}")
    for key, var in zip(keys, model.variables, strict=True):
        var.assign(reader.get_tensor(key))
    return len(keys)


def restore_model(run_dir: str | Path) -> tuple[Any, MaskRCNNConfig]:
    """Rebuild the model of a run folder and load its latest checkpoint (inference only)."""
    import tensorflow as tf
    from official.vision.tasks.maskrcnn import MaskRCNNTask

    run_dir = Path(run_dir)
    cfg = MaskRCNNConfig(**json.loads((run_dir / "config.json").read_text()))
    model = MaskRCNNTask(build_task_config(cfg)).build_model()
    latest = tf.train.latest_checkpoint(str(run_dir / "ckpt"))
    if latest is None:
        raise FileNotFoundError(f"{run_dir}/ckpt has no checkpoint")
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    return model, cfg


def recalibrate_batchnorm(model: Any, cfg: MaskRCNNConfig, *, batches: int = 20, seed: int = 1) -> int:
    """Replace the BatchNorm moving statistics by their exact mean over ``batches`` training batches.

    Why: trained from scratch at batch 4, the moving averages lag the fast-changing weights so badly that
    inference-mode outputs are useless (classifier foreground probability ~0.003 where training mode gives
    ~0.8 on the same photos). Cumulative averaging over single training photos (the deployment case, no
    mosaics) fixes that ("precise BN"). Only moving statistics change. Returns the number of BN layers.
    """
    import tf_keras

    bns = [m for m in model.submodules if isinstance(m, tf_keras.layers.BatchNormalization)]
    calib = MaskRCNNConfig(**{**asdict(cfg), "mosaic_prob": 0.0, "copy_paste_prob": 0.0, "seed": seed})
    from official.vision.tasks.maskrcnn import MaskRCNNTask  # noqa: F401  (registers the Model Garden parts)

    it = iter(_dataset(calib, _samples(calib), build_task_config(calib)))
    old = [b.momentum for b in bns]
    try:
        for k in range(batches):
            for b in bns:
                b.momentum = k / (k + 1.0)  # running mean of per-batch statistics
            images, labels = next(it)
            model(images, image_shape=labels["image_info"][:, 1, :], anchor_boxes=labels["anchor_boxes"],
                  gt_boxes=labels["gt_boxes"], gt_classes=labels["gt_classes"], gt_masks=labels["gt_masks"],
                  training=True)
    finally:
        for b, m in zip(bns, old, strict=True):
            b.momentum = m
    return len(bns)


# --------------------------------------------------------------------------------------------- export


def _detector_size(cfg: MaskRCNNConfig) -> int:
    """The spec's ``detector_size``: the input size times the largest downscale the training parser used."""
    return round(cfg.size / AUG_SCALE_MIN)


def serving_preprocess(image: Any, size: int) -> tuple[Any, Any]:
    """The exported graph's input step: ``(H, W, 3) uint8`` -> normalised ``(size, size, 3) float32`` canvas
    and the parser's ``image_info`` ``(4, 2)``.

    uint8 goes in exactly as the training parser (``maskrcnn_input.Parser``) gets it: ``normalize_image``
    scales integer images to [0, 1] before subtracting the [0, 1]-range ImageNet mean. Casting to float
    first would feed 255x the trained range (an early export did, and every model looked untrained).
    """
    from official.vision.ops import preprocess_ops

    x = preprocess_ops.normalize_image(image)
    return preprocess_ops.resize_and_crop_image(x, [size, size], padded_size=[size, size], aug_scale_min=1.0,
                                                aug_scale_max=1.0)


def _serving_module(model: Any, cfg: MaskRCNNConfig) -> Any:
    import tensorflow as tf
    from official.vision.ops import anchor

    size = cfg.size
    anchors = anchor.build_anchor_generator(
        min_level=cfg.min_level, max_level=cfg.max_level, num_scales=cfg.num_scales,
        aspect_ratios=[0.5, 1.0, 2.0], anchor_size=cfg.anchor_size)(image_size=(size, size))

    class ODExport(tf.Module):
        def __init__(self):
            super().__init__()
            # Track the variables, not the tf_keras model: saving a tracked Keras 2 model re-traces its
            # call() for Keras' own SavedModel metadata, in training mode, which needs ground truth.
            self.weights = list(model.variables)

        @tf.function(input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8, name="input_tensor")])
        def serve(self, input_tensor):
            image, info = serving_preprocess(input_tensor[0], size)
            out = model.call(
                images=image[None], image_shape=info[1:2, :],
                anchor_boxes={k: v[None] for k, v in anchors.items()}, training=False)
            # Boxes come back in the resized image's pixels: undo the scale (info[2]), then normalise by the
            # original size (info[0]). info[1] is the padded canvas, not the resized image.
            boxes = out["detection_boxes"] / tf.tile(info[2:3, :], [1, 2])
            boxes = boxes / tf.tile(info[0:1, :], [1, 2])
            return {
                "detection_boxes": tf.clip_by_value(boxes, 0.0, 1.0),
                "detection_classes": tf.cast(out["detection_classes"], tf.float32),
                "detection_scores": out["detection_scores"],
                "num_detections": tf.cast(out["num_detections"], tf.float32),
                "detection_masks": out["detection_masks"],
            }

    return ODExport()


def export_saved_model(model: Any, cfg: MaskRCNNConfig, export_dir: str | Path) -> Path:
    """Write an OD API style SavedModel (``serving_default``: ``input_tensor`` uint8 ``[1, H, W, 3]``).

    Outputs: ``detection_boxes [1, N, 4]`` normalised ymin, xmin, ymax, xmax on the input image,
    ``detection_classes [1, N]`` float ids (1 cat, 2 dog), ``detection_scores [1, N]``,
    ``num_detections [1]`` float, ``detection_masks [1, N, 28, 28]`` box-relative probabilities.
    """
    import tensorflow as tf

    export_dir = Path(export_dir)
    module = _serving_module(model, cfg)
    tf.saved_model.save(module, str(export_dir),
                        signatures={"serving_default": module.serve.get_concrete_function()})
    return export_dir


def write_model_folder(folder: str | Path, cfg: MaskRCNNConfig, *, name: str = "maskrcnn-pets",
                       description: str = "", score_threshold: float = 0.5) -> Path:
    """Write ``spec.json`` for an exported SavedModel in ``folder/saved_model`` (kind instance)."""
    from pipelines.spec import ClassSpec, ModelSpec

    folder = Path(folder)
    if cfg.dataset == "buildings":
        # Tiles at the training canvas and native 0.5 m: the detector sees what it was trained on, and
        # scenes larger than one tile go through the tiled path with seam merging.
        from pipelines.domains import BUILDINGS_RES_M

        spec = ModelSpec(
            name=name, kind="instance", source="saved_model", source_format="savedmodel",
            description=description or (
                f"tileseg's own Mask R-CNN for building footprints ({cfg.backbone} + FPN, Model Garden), "
                f"trained from scratch on SpaceNet tiles at {BUILDINGS_RES_M} m, {cfg.size} px tiles; "
                "see MODEL_CARD.md."),
            classes=[ClassSpec(id=1, name="building", color=(255, 215, 0))],
            channels=3, input_size=cfg.size, detector_size=_detector_size(cfg), mode="tile", overlap=cfg.size // 4,
            batch_size=1, ground_resolution_m=BUILDINGS_RES_M, score_threshold=score_threshold,
            max_detections=cfg.max_detections,
        )
        spec.to_file(folder / "spec.json")
        return folder / "spec.json"
    spec = ModelSpec(
        name=name, kind="instance", source="saved_model", source_format="savedmodel",
        description=description or (
            f"tileseg's own Mask R-CNN ({cfg.backbone} + FPN, Model Garden), trained from scratch on the "
            f"oxford_pets training split at {cfg.size} px; see MODEL_CARD.md."),
        classes=[ClassSpec(id=i, name=n, color=CLASS_COLORS[i]) for i, n in CLASSES.items()],
        # A photo is detected whole up to the largest tile a spec allows: a pet fills its photo, and tiles
        # would cut it apart. The graph's own resize is point sampling, so larger photos are shrunk with an
        # antialiased filter first (detector_size).
        channels=3, input_size=4096, detector_size=_detector_size(cfg), mode="tile", overlap=128, batch_size=1,
        score_threshold=score_threshold, max_detections=20,
    )
    spec.to_file(folder / "spec.json")
    return folder / "spec.json"


# --------------------------------------------------------------------------------------------- reporting


def write_training_curve(history_csv: str | Path, png: str | Path) -> None:
    """Plot the total loss and its parts against the step from a run's ``history.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history_csv, newline="") as f:
        # A resumed run appends; keep the last row written for each step.
        rows = {int(r["step"]): r for r in csv.DictReader(f) if r.get("step", "").strip().isdigit()}
    if not rows:
        return
    steps = sorted(rows)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    a.plot(steps, [float(rows[s]["total_loss"]) for s in steps], label="total")
    a.set(xlabel="step", ylabel="loss", title="total training loss")
    a.grid(alpha=0.3)
    for key in ("rpn_score_loss", "rpn_box_loss", "frcnn_cls_loss", "frcnn_box_loss", "mask_loss"):
        b.plot(steps, [float(rows[s][key]) for s in steps], label=key)
    b.set(xlabel="step", yscale="log", title="loss parts")
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def evaluate_model_folder(folder: str | Path, data_dir: str | Path, *, val_fraction: float = 0.15,
                          limit: int | None = None) -> dict[str, Any]:
    """COCO mask/box AP of the exported model in ``folder`` on ``data_dir``'s held-out split.

    The split is :func:`pipelines.train.split_names` (the names training never saw). Runs with plain
    TensorFlow through :func:`pipelines.instances.load_instance_model`.
    """
    from pipelines.instance_eval import evaluate_folder
    from pipelines.instances import load_instance_model
    from pipelines.spec import ModelSpec

    _, val_names = _split(data_dir, val_fraction)
    model = load_instance_model(ModelSpec.from_file(Path(folder) / "spec.json"))
    t0 = time.monotonic()
    metrics = evaluate_folder(model, data_dir, names=val_names, limit=limit)
    return {**metrics.to_json(), "split": "val", "val_fraction": val_fraction,
            "seconds": round(time.monotonic() - t0, 1)}


def evaluate_class_agnostic(folder: str | Path, data_dir: str | Path, *, val_fraction: float = 0.15
                            ) -> dict[str, Any]:
    """COCO AP on the held-out split with cat and dog merged into one ``pet`` category.

    Separates "finds and segments the pet" from "tells cats from dogs" (per-class AP needs both).
    """
    from pipelines.instance_eval import CocoEvaluator
    from pipelines.instances import detect_image, load_instance_model
    from pipelines.spec import ModelSpec

    _, val_names = _split(data_dir, val_fraction)
    model = load_instance_model(ModelSpec.from_file(Path(folder) / "spec.json"))
    ev = CocoEvaluator({1: "pet"})
    for pet in load_pets(data_dir, val_names):
        found = detect_image(model, pet.image, score_threshold=0.05)
        ev.add(*pet.mask.shape, [(1, pet.mask)], found, category_map={1: 1, 2: 1}, file_name=pet.name)
    return {**ev.result().to_json(), "split": "val, cat+dog as one class"}


def evaluate_mosaics(folder: str | Path, data_dir: str | Path, *, val_fraction: float = 0.15, count: int = 30,
                     size: int = 256, seed: int = 0) -> dict[str, Any]:
    """COCO mask/box AP on ``count`` mosaics of 2-4 *held-out* pets (several instances per image).

    The held-out photos have one pet each; this measures whether the model separates several.
    """
    from pipelines.instance_eval import PET_CATEGORIES, CocoEvaluator, category_map_by_name
    from pipelines.instances import class_name_map, detect_image, load_instance_model
    from pipelines.spec import ModelSpec

    _, val_names = _split(data_dir, val_fraction)
    pets = load_pets(data_dir, val_names)
    model = load_instance_model(ModelSpec.from_file(Path(folder) / "spec.json"))
    cmap = category_map_by_name(class_name_map(model.spec), PET_CATEGORIES)
    ev, rng = CocoEvaluator(PET_CATEGORIES), np.random.default_rng(seed)
    for i in range(count):
        chosen = [pets[j] for j in rng.choice(len(pets), size=int(rng.integers(2, 5)), replace=False)]
        image, masks, classes = mosaic(chosen, size, rng)
        found = detect_image(model, image, score_threshold=0.05)
        ev.add(size, size, list(zip(classes.tolist(), masks, strict=True)), found, category_map=cmap,
               file_name=f"mosaic_{i}")
    return {**ev.result().to_json(), "split": "val mosaics of 2-4 pets", "seed": seed}


def export_run(run_dir: str | Path, folder: str | Path, *, name: str = "maskrcnn-pets",
               evaluate: bool = True, bn_batches: int = 20) -> dict[str, Any]:
    """Export a run's latest checkpoint as a model folder: ``saved_model/``, ``spec.json``,
    ``training_curve.png`` and (``evaluate``) ``metrics.json`` with held-out COCO AP. Returns the metrics.

    BatchNorm statistics are recalibrated on ``bn_batches`` training batches first
    (:func:`recalibrate_batchnorm`; 0 skips it)."""
    import tensorflow as tf

    run_dir, folder = Path(run_dir), Path(folder)
    model, cfg = restore_model(run_dir)
    step = int(tf.train.load_variable(tf.train.latest_checkpoint(str(run_dir / "ckpt")),
                                      "step/.ATTRIBUTES/VARIABLE_VALUE"))
    if bn_batches:
        recalibrate_batchnorm(model, cfg, batches=bn_batches)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "saved_model").exists():
        import shutil

        shutil.rmtree(folder / "saved_model")
    export_saved_model(model, cfg, folder / "saved_model")
    write_model_folder(folder, cfg, name=name)
    if (run_dir / "history.csv").is_file():
        write_training_curve(run_dir / "history.csv", folder / "training_curve.png")
    report: dict[str, Any] = {"model": name, "steps": step, "backbone": cfg.backbone, "size": cfg.size,
                              "batch_size": cfg.batch_size, "bn_recalibration_batches": bn_batches}
    if evaluate and cfg.dataset == "buildings":
        from pipelines.building_instances import evaluate_building_scenes, load_building_scenes
        from pipelines.instances import load_instance_model
        from pipelines.spec import ModelSpec

        loaded = load_instance_model(ModelSpec.from_file(folder / "spec.json"))
        for split in ("val", "test"):
            report[split] = evaluate_building_scenes(loaded, load_building_scenes(split, cfg.data_dir))
        (folder / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    elif evaluate:
        report["val"] = evaluate_model_folder(folder, cfg.data_dir, val_fraction=cfg.val_fraction)
        report["val_class_agnostic"] = evaluate_class_agnostic(folder, cfg.data_dir,
                                                               val_fraction=cfg.val_fraction)
        report["val_mosaics"] = evaluate_mosaics(folder, cfg.data_dir, val_fraction=cfg.val_fraction,
                                                 size=cfg.size)
        (folder / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
