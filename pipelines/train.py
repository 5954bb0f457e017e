"""Training pipeline for semantic U-Nets on folders laid out like ``oxford_pets``.

Layout read (any folder, not only pets)::

    DIR/images/NAME.jpg|png    RGB photo
    DIR/trimaps/NAME.png       8-bit single-channel label map; class id = value - label_offset
    DIR/annotations/*.txt      one NAME per line (first token; '#' lines ignored)

Label values below ``label_offset`` (e.g. 0 in a pseudo-label trimap) mean "unknown" and are ignored by the
loss and the metrics. Internally those pixels carry :data:`IGNORE` (255).

The validation split is a pure function of the image name (:func:`is_validation`), so training, ``tileseg
eval --split val`` and any later run agree on it regardless of file order or seed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np

from adapters.base import AdapterError
from pipelines.losses import IGNORE, DiceCELoss, masked_pixel_accuracy

__all__ = [
    "IGNORE",
    "DiceCELoss",
    "TrainConfig",
    "is_validation",
    "list_names",
    "load_pairs",
    "lowres_resample",
    "make_dataset",
    "masked_pixel_accuracy",
    "pseudo_label",
    "pseudo_label_instances",
    "split_names",
    "train_unet",
    "write_training_curve",
]

log = logging.getLogger(__name__)

_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


# --------------------------------------------------------------------------------------------- folders


def list_names(data_dir: str | Path) -> list[str]:
    """Image names listed in ``DIR/annotations/*.txt`` (first token per line), de-duplicated, in order.

    Raises :class:`AdapterError` when the folder has no annotation list.
    """
    data_dir = Path(data_dir)
    if not any((data_dir / "annotations").glob("*.txt")):
        raise AdapterError(f"{data_dir}: no annotations/*.txt listing image names")
    return list(_annotation_lines(data_dir))


def _find_image(data_dir: Path, name: str) -> Path | None:
    for ext in _IMAGE_EXTS:
        p = data_dir / "images" / f"{name}{ext}"
        if p.is_file():
            return p
    return None


def load_pairs(
    data_dir: str | Path, names: Sequence[str] | None = None, require_mask: bool = True
) -> tuple[list[tuple[str, Path, Path | None]], int]:
    """``(name, image_path, trimap_path)`` for each listed name whose files exist, and the missing count.

    With ``require_mask=False`` (unlabeled folders) the trimap path is ``None`` when absent.
    """
    data_dir = Path(data_dir)
    names = list_names(data_dir) if names is None else list(names)
    pairs, missing = [], 0
    for name in names:
        img = _find_image(data_dir, name)
        mask = data_dir / "trimaps" / f"{name}.png"
        if img is None or (require_mask and not mask.is_file()):
            missing += 1
            continue
        pairs.append((name, img, mask if mask.is_file() else None))
    return pairs, missing


def is_validation(name: str, val_fraction: float = 0.15) -> bool:
    """Whether image ``name`` belongs to the held-out split.

    Stable across runs, machines and file orders: the first 8 bytes of SHA-1 of the name, as a fraction
    of 2**64, compared with ``val_fraction``.
    """
    h = int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def split_names(names: Sequence[str], val_fraction: float = 0.15) -> tuple[list[str], list[str]]:
    """``(train, val)`` name lists, order preserved (see :func:`is_validation`)."""
    train = [n for n in names if not is_validation(n, val_fraction)]
    val = [n for n in names if is_validation(n, val_fraction)]
    return train, val


# --------------------------------------------------------------------------------------------- tf.data


def _decode(image_path, mask_path, label_offset: int):
    import tensorflow as tf

    img = tf.io.decode_image(tf.io.read_file(image_path), channels=3, expand_animations=False)
    img = tf.image.convert_image_dtype(img, tf.float32)  # uint8 -> [0, 1]
    m = tf.io.decode_png(tf.io.read_file(mask_path), channels=1)
    m = tf.cast(m, tf.int32) - label_offset
    m = tf.where(m < 0, IGNORE, m)
    return img, tf.cast(m, tf.uint8)


#: Edge fractions a ``lowres`` crop is resampled through: 0.4 takes a 192 px crop down to 77 px.
LOWRES_RANGE = (0.4, 1.0)


def lowres_resample(img, fraction):
    """``(S, S, C) float32`` -> the same size, through an antialiased bilinear resize to
    ``round(S * fraction)`` px and bilinear back: the detail a photo that was ``fraction`` as large (or
    upscaled from that) lacks. ``fraction`` is a scalar in (0, 1]."""
    import tensorflow as tf

    size = tf.shape(img)[:2]
    small = tf.maximum(1, tf.cast(tf.round(tf.cast(size, tf.float32) * fraction), tf.int32))
    down = tf.image.resize(img, small, method="bilinear", antialias=True)
    return tf.image.resize(down, size, method="bilinear", antialias=False)


def _augment(img, mask, size: int, seed_pair, lowres: float = 0.0):
    """Random scale/crop, horizontal flip, colour jitter and, with probability ``lowres``, a resample through
    a lower resolution (:func:`lowres_resample`, the label untouched).

    Returns image ``(size, size, 3) float32`` and label ``(size, size, 1) uint8``.
    """
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed_pair, num=8)
    shape = tf.shape(img)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    # Side fraction in [0.55, 1] and aspect jitter: crops from half the pet to the whole photo.
    scale = tf.random.stateless_uniform([], seeds[0], 0.55, 1.0)
    log_ar = tf.random.stateless_uniform([], seeds[1], -0.25, 0.25)
    ch = tf.minimum(h, tf.round(h * scale * tf.exp(log_ar / 2)))
    cw = tf.minimum(w, tf.round(w * scale * tf.exp(-log_ar / 2)))
    oy = tf.floor(tf.random.stateless_uniform([], seeds[2], 0.0, 1.0) * (h - ch + 1))
    ox = tf.floor(tf.random.stateless_uniform([], seeds[3], 0.0, 1.0) * (w - cw + 1))
    oy, ox, ch, cw = (tf.cast(v, tf.int32) for v in (oy, ox, ch, cw))
    img = img[oy : oy + ch, ox : ox + cw]
    mask = mask[oy : oy + ch, ox : ox + cw]
    img = tf.image.resize(img, (size, size), method="bilinear", antialias=False)
    mask = tf.image.resize(mask, (size, size), method="nearest")
    flip = tf.random.stateless_uniform([], seeds[4]) < 0.5
    img = tf.cond(flip, lambda: tf.image.flip_left_right(img), lambda: img)
    mask = tf.cond(flip, lambda: tf.image.flip_left_right(mask), lambda: mask)
    img = tf.image.stateless_random_brightness(img, 0.15, seeds[5])
    img = tf.image.stateless_random_contrast(img, 0.7, 1.3, seeds[6])
    img = tf.image.stateless_random_saturation(img, 0.6, 1.4, seeds[7])
    img = tf.image.stateless_random_hue(img, 0.04, seeds[0] + 1)
    if lowres > 0:
        # A stream of its own, so the draws above stay those of runs without it.
        lr_seeds = tf.random.experimental.stateless_split(tf.reverse(seed_pair, [0]), num=2)
        fraction = tf.random.stateless_uniform([], lr_seeds[0], *LOWRES_RANGE)
        img = tf.cond(tf.random.stateless_uniform([], lr_seeds[1]) < lowres,
                      lambda: lowres_resample(img, fraction), lambda: img)
    return tf.clip_by_value(img, 0.0, 1.0), mask


def _resize_eval(img, mask, size: int):
    import tensorflow as tf

    img = tf.image.resize(img, (size, size), method="bilinear", antialias=False)
    mask = tf.image.resize(mask, (size, size), method="nearest")
    return tf.clip_by_value(img, 0.0, 1.0), mask


def make_dataset(
    pairs: Sequence[tuple[str, Path, Path | None]],
    size: int = 128,
    batch_size: int = 16,
    augment: bool = False,
    seed: int = 0,
    label_offset: int = 1,
    shuffle: bool | None = None,
    lowres: float = 0.0,
):
    """A ``tf.data.Dataset`` of ``(image (B,size,size,3) float32 in [0,1], label (B,size,size,1) uint8)``.

    Files are decoded in parallel once and cached in memory at their own size (the photos here are at
    most 256 px), then cropped/resized per epoch. Labels are class ids, :data:`IGNORE` where unknown.
    """
    import tensorflow as tf

    if not pairs:
        raise AdapterError("no image/label pairs to build a dataset from")
    imgs = [str(p[1]) for p in pairs]
    masks = [str(p[2]) for p in pairs]
    ds = tf.data.Dataset.from_tensor_slices((imgs, masks))
    ds = ds.map(lambda i, m: _decode(i, m, label_offset), num_parallel_calls=tf.data.AUTOTUNE).cache()
    if shuffle if shuffle is not None else augment:
        ds = ds.shuffle(len(pairs), seed=seed, reshuffle_each_iteration=True)
    if augment:
        # Stateless per-element seeds from a counter: reproducible given `seed`, different every epoch.
        counter = tf.data.Dataset.counter(start=seed * 1_000_003)
        ds = tf.data.Dataset.zip((ds, counter)).map(
            lambda pair, c: _augment(pair[0], pair[1], size, tf.stack([tf.cast(seed, tf.int64), c]), lowres),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    else:
        ds = ds.map(lambda i, m: _resize_eval(i, m, size), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _custom_objects() -> dict:
    return {"DiceCELoss": DiceCELoss, "masked_pixel_accuracy": masked_pixel_accuracy}


# --------------------------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Everything a training run depends on (written to ``OUT/config.json``)."""

    data: str
    out: str
    epochs: int = 150
    size: int = 128
    base_filters: int = 16
    depth: int = 4
    norm: str = "batch"
    dropout: float = 0.1
    batch_size: int = 16
    val_fraction: float = 0.15
    seed: int = 0
    learning_rate: float = 2e-3
    warmup_epochs: int = 3
    dice_weight: float = 1.0
    patience: int = 40
    label_offset: int = 1
    class_names: list[str] = field(default_factory=lambda: ["pet", "background", "outline"])
    #: Extra folders laid out like ``data`` (e.g. pseudo-labels); all their names are used for training.
    extra_train: list[str] = field(default_factory=list)
    #: Start from these weights (a .keras file of the same architecture) instead of random init.
    init_from: str | None = None
    resume: bool = False
    #: Probability that a training crop goes through a lower resolution (a random 40-100 % of its edge) and
    #: back (:func:`lowres_resample`), so the model also segments photos that were small, upscaled or soft.
    lowres: float = 0.0
    #: ``conv`` (the reference's encoder) or ``mobilenetv2`` (:class:`pipelines.unet.UNetConfig`).
    encoder: str = "conv"
    #: An ``.npz`` of ``layer/variable`` arrays to start the encoder from (``python -m pipelines.pretrained``).
    encoder_weights: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.lowres <= 1.0:
            raise ValueError(f"lowres is a probability in [0, 1], not {self.lowres}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, not {self.warmup_epochs}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _cosine_lr(cfg: TrainConfig) -> Callable[[int, float], float]:
    def schedule(epoch: int, _lr: float = 0.0) -> float:
        if epoch < cfg.warmup_epochs:
            return cfg.learning_rate * (epoch + 1) / cfg.warmup_epochs
        t = (epoch - cfg.warmup_epochs) / max(1, cfg.epochs - cfg.warmup_epochs)
        return float(cfg.learning_rate * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))))

    return schedule


def _make_callbacks(cfg: TrainConfig, out: Path, state: dict):
    class _Checkpoint(keras.callbacks.Callback):
        """Saves ``last.keras`` (with optimizer) every epoch and ``best.keras`` on a new best val mean IoU;
        ``state.json`` remembers the epoch and the best score so ``--resume`` continues where it stopped."""

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            score = float(logs.get("val_mean_iou", -1.0))
            if score > state.get("best", -1.0):
                state.update(best=score, best_epoch=epoch + 1)
                self.model.save(out / "best.keras")
            self.model.save(out / "last.keras")
            state["epoch"] = epoch + 1
            (out / "state.json").write_text(json.dumps(state, indent=2))

    class _Log(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.time()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            msg = " ".join(f"{k}={v:.4f}" for k, v in sorted(logs.items()))
            log.info("epoch %d/%d %.1fs %s", epoch + 1, cfg.epochs, time.time() - self._t, msg)

    return [
        keras.callbacks.LearningRateScheduler(_cosine_lr(cfg)),
        keras.callbacks.CSVLogger(str(out / "history.csv"), append=True),
        keras.callbacks.TensorBoard(log_dir=str(out / "tensorboard"), profile_batch=0, write_graph=False),
        _Checkpoint(),
        keras.callbacks.EarlyStopping(monitor="val_mean_iou", mode="max", patience=cfg.patience),
        _Log(),
    ]


def _compile(model, cfg: TrainConfig) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss=DiceCELoss(num_classes=cfg.num_classes, dice_weight=cfg.dice_weight),
        metrics=[
            masked_pixel_accuracy,
            keras.metrics.MeanIoU(
                num_classes=cfg.num_classes, sparse_y_true=True, sparse_y_pred=False,
                ignore_class=IGNORE, name="mean_iou",
            ),
        ],
    )


def train_unet(cfg: TrainConfig) -> Path:
    """Train (or resume) a U-Net; returns the path of the best checkpoint (``OUT/best.keras``).

    Writes into ``cfg.out``: ``config.json``, ``split.json`` (train/val names), ``history.csv``,
    ``tensorboard/``, ``last.keras`` + ``state.json`` (resume), ``best.keras`` (best val mean IoU) and
    ``training_curve.png``. Raises :class:`AdapterError` for unusable data folders and ``FileExistsError``
    when ``out`` already holds a run and ``resume`` is false.
    """
    import tensorflow as tf

    from pipelines.unet import UNetConfig, build_unet

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "state.json"
    if state_file.exists() and not cfg.resume:
        raise FileExistsError(f"{out} already holds a training run; pass --resume or another --out")

    names = list_names(cfg.data)
    train_names, val_names = split_names(names, cfg.val_fraction)
    train_pairs, miss_t = load_pairs(cfg.data, train_names)
    val_pairs, miss_v = load_pairs(cfg.data, val_names)
    for extra in cfg.extra_train:
        extra_pairs, miss_e = load_pairs(extra)
        train_pairs += extra_pairs
        miss_t += miss_e
    if miss_t or miss_v:
        log.warning("skipped %d listed names with missing image or trimap", miss_t + miss_v)
    if not train_pairs or not val_pairs:
        raise AdapterError(
            f"{cfg.data}: need both training and validation images (val_fraction={cfg.val_fraction})"
        )
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    (out / "split.json").write_text(
        json.dumps({"val_fraction": cfg.val_fraction, "train": [p[0] for p in train_pairs],
                    "val": [p[0] for p in val_pairs]}, indent=1)
    )
    log.info("train %d images, val %d images", len(train_pairs), len(val_pairs))

    keras.utils.set_random_seed(cfg.seed)
    train_ds = make_dataset(train_pairs, cfg.size, cfg.batch_size, augment=True, seed=cfg.seed,
                            label_offset=cfg.label_offset, lowres=cfg.lowres)
    val_ds = make_dataset(val_pairs, cfg.size, cfg.batch_size, augment=False, label_offset=cfg.label_offset)

    state: dict = {}
    initial_epoch = 0
    if cfg.resume and state_file.exists():
        state = json.loads(state_file.read_text())
        initial_epoch = int(state.get("epoch", 0))
        model = keras.saving.load_model(out / "last.keras", custom_objects=_custom_objects())
        log.info("resuming from epoch %d (best val mean IoU %.4f)", initial_epoch, state.get("best", -1))
    else:
        model = build_unet(UNetConfig(input_size=cfg.size, num_classes=cfg.num_classes,
                                      base_filters=cfg.base_filters, depth=cfg.depth, norm=cfg.norm,
                                      dropout=cfg.dropout, encoder=cfg.encoder))
        if cfg.encoder_weights:
            import numpy as np

            from pipelines.unet import load_encoder_weights

            with np.load(cfg.encoder_weights) as npz:
                filled = load_encoder_weights(model, dict(npz))
            if not filled:
                raise AdapterError(f"{cfg.encoder_weights}: no layer of the {cfg.encoder} encoder is in this file")
            log.info("encoder: %d layers from %s", filled, cfg.encoder_weights)
        if cfg.init_from:
            src = keras.saving.load_model(cfg.init_from, compile=False)
            model.set_weights(src.get_weights())
        _compile(model, cfg)
    if initial_epoch < cfg.epochs:
        tf.get_logger().setLevel("ERROR")
        model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, initial_epoch=initial_epoch,
                  callbacks=_make_callbacks(cfg, out, state), verbose=0, shuffle=False)
    write_training_curve(out / "history.csv", out / "training_curve.png", f"validation ({cfg.size}x{cfg.size})")
    return out / "best.keras"


# --------------------------------------------------------------------------------------------- outputs


def write_training_curve(history_csv: str | Path, png: str | Path, val_title: str = "validation (128x128)") -> None:
    """Plot loss and validation mean IoU / pixel accuracy per epoch from a Keras CSVLogger file (or the same
    columns written by :mod:`pipelines.train_jax`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("epoch", "").strip().isdigit()]
    if not rows:
        return
    # A resumed run appends; keep the last row written for each epoch.
    by_epoch = {int(r["epoch"]): r for r in rows}
    ep = sorted(by_epoch)
    x = [e + 1 for e in ep]

    def col(key: str) -> list[float]:
        return [float(by_epoch[e].get(key) or "nan") for e in ep]

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    a.plot(x, col("loss"), label="train")
    a.plot(x, col("val_loss"), label="val")
    a.set(xlabel="epoch", ylabel="loss (CE + Dice)", title="loss")
    a.legend()
    b.plot(x, col("mean_iou"), label="train mean IoU")
    b.plot(x, col("val_mean_iou"), label="val mean IoU")
    b.plot(x, col("val_masked_pixel_accuracy"), label="val pixel acc")
    b.set(xlabel="epoch", ylim=(0, 1), title=val_title)
    b.grid(alpha=0.3)
    b.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def pseudo_label(
    predict: Callable[[np.ndarray], np.ndarray],
    unlabeled_dir: str | Path,
    out_dir: str | Path,
    threshold: float = 0.9,
    label_offset: int = 1,
) -> dict:
    """Write pseudo-label trimaps for an unlabeled folder (self-training).

    ``predict`` maps an ``(H, W, 3) uint8`` photo to ``(H, W, K) float32`` probabilities at the photo's size
    (see :func:`pipelines.evaluate.make_predictor`). Pixels whose top probability is below ``threshold`` are
    written as 0 (ignored by training). ``out_dir`` gets the oxford_pets layout with links to the photos.
    Returns counts: images and the fraction of pixels kept.
    """
    from PIL import Image

    out = _pets_layout(out_dir)
    pairs, _ = load_pairs(unlabeled_dir, require_mask=False)
    kept, total, done = 0, 0, []
    for name, img_path, _mask in pairs:
        try:
            rgb = np.asarray(Image.open(img_path).convert("RGB"))
        except OSError as e:
            log.warning("%s: unreadable photo skipped (%s)", img_path, e)
            continue
        probs = predict(rgb)
        label = probs.argmax(-1).astype(np.uint8) + label_offset
        confident = probs.max(-1) >= threshold
        label[~confident] = 0
        kept += int(confident.sum())
        total += confident.size
        Image.fromarray(label).save(out / "trimaps" / f"{name}.png")
        _link_photo(out, img_path)
        done.append(name)
    _write_list(out, done, _annotation_lines(unlabeled_dir))
    return {"images": len(done), "kept_fraction": kept / max(total, 1), "threshold": threshold}


def _pets_layout(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    for sub in ("images", "trimaps", "annotations"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    return out


def _link_photo(out: Path, img_path: Path) -> None:
    link = out / "images" / img_path.name
    if not link.exists():
        link.symlink_to(img_path.resolve())


def _annotation_lines(data_dir: str | Path) -> dict[str, str]:
    """``NAME -> `` its whole annotation line (e.g. oxford_pets' ``NAME CLASS-ID SPECIES BREED-ID``)."""
    lines: dict[str, str] = {}
    for lst in sorted((Path(data_dir) / "annotations").glob("*.txt")):
        for line in lst.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.setdefault(line.split()[0], line)
    return lines


def _write_list(out: Path, names: Sequence[str], lines: dict[str, str]) -> None:
    # The source's own lines are kept so labels that exist without masks (oxford_pets' species) carry over.
    (out / "annotations" / "trainval.txt").write_text("".join(f"{lines.get(n, n)}\n" for n in names))


def pseudo_label_instances(
    predict: Callable[[np.ndarray], np.ndarray],
    detect: Callable[[np.ndarray], np.ndarray | None],
    unlabeled_dir: str | Path,
    out_dir: str | Path,
    *,
    background_index: int,
    min_agreement: float = 0.7,
    box_margin: float = 0.1,
) -> dict:
    """Write one-object instance pseudo-labels for an unlabeled folder (``train maskrcnn --extra-train``).

    Two different models must agree: ``predict`` maps an ``(H, W, 3) uint8`` photo to ``(H, W, K) float32``
    semantic probabilities (foreground = argmax is not ``background_index``); ``detect`` maps it to the
    ``(H, W) bool`` mask of an instance model's best detection, or ``None``. The label is the semantic
    foreground inside the detection's box grown by ``box_margin`` of its size on each side (the semantic
    model draws finer edges than a 28x28 mask head; the box drops stray blobs). Photos whose two masks
    overlap with IoU below ``min_agreement`` are left out and counted. Trimaps get 1 (object) and 2
    (background); the source's annotation lines (species, breed) are copied, so classes stay the real ones.
    """
    from PIL import Image

    out = _pets_layout(out_dir)
    pairs, _ = load_pairs(unlabeled_dir, require_mask=False)
    done: list[str] = []
    skipped = {"unreadable": 0, "no_detection": 0, "disagree": 0}
    agreement: list[float] = []
    for name, img_path, _mask in pairs:
        try:
            rgb = np.asarray(Image.open(img_path).convert("RGB"))
        except OSError as e:
            log.warning("%s: unreadable photo skipped (%s)", img_path, e)
            skipped["unreadable"] += 1
            continue
        found = detect(rgb)
        if found is None or not found.any():
            skipped["no_detection"] += 1
            continue
        fg = predict(rgb).argmax(-1) != background_index
        iou = float((fg & found).sum() / max((fg | found).sum(), 1))
        if iou < min_agreement:
            skipped["disagree"] += 1
            continue
        rows, cols = np.flatnonzero(found.any(1)), np.flatnonzero(found.any(0))
        dy = int(box_margin * (rows[-1] - rows[0] + 1))
        dx = int(box_margin * (cols[-1] - cols[0] + 1))
        inside = np.zeros_like(fg)
        inside[max(rows[0] - dy, 0): rows[-1] + dy + 1, max(cols[0] - dx, 0): cols[-1] + dx + 1] = True
        Image.fromarray(np.where(fg & inside, 1, 2).astype(np.uint8)).save(out / "trimaps" / f"{name}.png")
        _link_photo(out, img_path)
        done.append(name)
        agreement.append(iou)
    _write_list(out, done, _annotation_lines(unlabeled_dir))
    return {"images": len(done), "skipped": skipped, "min_agreement": min_agreement,
            "mean_agreement": float(np.mean(agreement)) if agreement else None}
