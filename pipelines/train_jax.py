"""U-Net training on the JAX backend of Keras 3, for accelerator hosts that have JAX but no TensorFlow.

The model (:func:`pipelines.unet.build_unet`), the loss (:class:`pipelines.losses.DiceCELoss`), the Adam
optimizer and the augmentation recipe are those of :mod:`pipelines.train`; only the engine differs. The whole
training set sits on the accelerator as padded ``uint8`` canvases, and each step crops, resizes, flips and
colour-jitters its batch there inside one jitted function, so a small U-Net is not starved by a host-side
input pipeline. The learning-rate schedule follows a wall-clock budget (``--budget-s``) instead of an epoch
count, because accelerator time is what is rationed.

Photos without labels (``pack --unlabeled``) train through a mean-teacher consistency term (``--ema`` and
``--consistency``; CutMix-Seg, French et al., BMVC 2020): an exponential moving average of the model labels an
augmented batch of photos, two photos of that batch are mixed by a CutMix rectangle, and the model must give
the teacher's confident labels on the mixed photo. Unlike a fixed pseudo-label folder made once, the targets
improve as training does.

Three commands (and ``weights``, which writes a registered model's weights for ``fit --init`` to start
from)::

    # on the TensorFlow host: photos and label PNGs as encoded bytes in one .npz (no pickle)
    python -m pipelines.train_jax pack --data ../shared/data/oxford_pets \\
        --unlabeled ../shared/data/oxford_pets_unlabeled --out .gpu/pets.npz
    # on the JAX host
    KERAS_BACKEND=jax python -m pipelines.train_jax fit --pack .gpu/pets.npz --out OUT --size 192 \\
        --base-filters 24 --ema 0.999 --consistency 1.0 --budget-s 400
    # back on the TensorFlow host: a registry model folder
    python -m pipelines.train_jax export --run OUT --out runs/unet-export

``fit`` writes ``OUT/weights.npz`` (every variable by its Keras path, loadable into a model built here with
:func:`load_weights_npz` whatever the Keras versions on either side; the moving average when ``--ema`` is on,
and then the last step's own weights as ``OUT/weights_student.npz``), ``OUT/history.csv`` (columns of
:func:`pipelines.train.write_training_curve`) and ``OUT/run.json`` (configuration, timings, device). The
validation split is the one of :func:`pipelines.train.is_validation`; ``fit`` only logs scores on it and keeps
the last step's weights.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "FitConfig",
    "PackedData",
    "crop_coords",
    "consistency_targets",
    "cutmix",
    "cutmix_mask",
    "ema_decay",
    "load_pack",
    "load_weights_npz",
    "lowres",
    "lowres_matrix",
    "lr_at",
    "pack_folders",
    "save_weights_npz",
]

#: Split codes stored in a pack: labelled training, extra (pseudo-labelled) training, validation, and
#: unlabelled photos (no label bytes; used only by the consistency term of ``fit``).
TRAIN, EXTRA, VAL, UNLABELED = 0, 1, 2, 3
# pipelines.losses.IGNORE; not imported from there because that imports keras, and ``fit`` must choose the
# Keras backend before keras is first imported.
_IGNORE = 255


# --------------------------------------------------------------------------------------------- packing


def pack_folders(
    data: str | Path,
    out: str | Path,
    extra_train: list[str | Path] | None = None,
    val_fraction: float = 0.15,
    unlabeled: list[str | Path] | None = None,
) -> dict:
    """Write the training/validation split of ``data``, every name of ``extra_train`` and every photo of
    ``unlabeled`` (folders laid out like ``oxford_pets_unlabeled``: images/ and annotations/*.txt) to ``out``.

    Files are stored as their encoded bytes (JPEG/PNG), so a pack of the pets folders is about 15 MB. Arrays:
    ``blob`` uint8, ``img_off``/``lab_off`` int64 offsets ``(N + 1,)`` into it, ``split`` uint8 ``(N,)``
    (0 train, 1 extra train, 2 validation, 3 unlabelled: no label bytes) and ``names`` (unicode). Returns
    counts per split and ``skipped``: ``{name: reason}`` for photos or labels that do not decode (truncated,
    not an image), which are left out here rather than failing the run on the training host.
    """
    from pipelines.train import list_names, load_pairs, split_names

    names = list_names(data)
    train, val = split_names(names, val_fraction)
    entries: list[tuple[str, Path, Path, int]] = []
    for group, code in ((train, TRAIN), (val, VAL)):
        pairs, _ = load_pairs(data, group)
        entries += [(n, i, m, code) for n, i, m in pairs]
    val_set = set(val)
    for extra in extra_train or []:
        pairs, _ = load_pairs(extra)
        # A name of the validation split never trains, whichever folder lists it.
        entries += [(n, i, m, EXTRA) for n, i, m in pairs if n not in val_set]
    for folder in unlabeled or []:
        pairs, _ = load_pairs(folder, require_mask=False)
        # Validation photos stay unseen, even without their labels.
        entries += [(n, i, None, UNLABELED) for n, i, _ in pairs if n not in val_set]
    skipped = {n: err for n, i, m, _ in entries if (err := _undecodable(i, m))}
    entries = [e for e in entries if e[0] not in skipped]
    blob, img_off, lab_off = bytearray(), [0], [0]
    for _, img, lab, _ in entries:
        blob += img.read_bytes()
        img_off.append(len(blob))
        if lab is not None:
            blob += lab.read_bytes()
        lab_off.append(len(blob))
    # Offsets: image k is blob[lab_off[k]:img_off[k+1]], its label blob[img_off[k+1]:lab_off[k+1]].
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        blob=np.frombuffer(bytes(blob), np.uint8),
        img_off=np.asarray(img_off, np.int64),
        lab_off=np.asarray(lab_off, np.int64),
        split=np.asarray([e[3] for e in entries], np.uint8),
        names=np.asarray([e[0] for e in entries]),
        val_fraction=np.float64(val_fraction),
    )
    codes = [e[3] for e in entries]
    return {"train": codes.count(TRAIN), "extra": codes.count(EXTRA), "val": codes.count(VAL),
            "unlabeled": codes.count(UNLABELED), "skipped": skipped}


def _undecodable(image: Path, label: Path | None) -> str | None:
    """Why ``image`` (or ``label``) would not decode in :func:`load_pack`, or None when both do."""
    from PIL import Image

    for path in (image, label):
        if path is None:
            continue
        try:
            with Image.open(path) as im:
                im.load()  # decodes every byte: a truncated file fails here, not on the GPU host
        except (OSError, SyntaxError, ValueError) as e:
            return f"{path.name}: {e}"
    return None


@dataclass
class PackedData:
    """Decoded pack: ``images (N, C, C, 3) uint8`` and ``labels (N, C, C) uint8`` top-left aligned on a
    ``C x C`` canvas, ``hw (N, 2) int32`` the real sizes, ``split (N,) uint8``. Labels are class ids
    (trimap value - ``label_offset``), 255 where unknown or outside the photo."""

    images: np.ndarray
    labels: np.ndarray
    hw: np.ndarray
    split: np.ndarray
    names: list[str]


def load_pack(path: str | Path, label_offset: int = 1, max_side: int = 512) -> PackedData:
    """Decode a pack written by :func:`pack_folders`. Photos longer than ``max_side`` are shrunk to it."""
    from PIL import Image

    z = np.load(path, allow_pickle=False)
    blob, img_off, lab_off = z["blob"], z["img_off"], z["lab_off"]
    ims, labs = [], []
    for k in range(len(z["split"])):
        img = Image.open(io.BytesIO(blob[lab_off[k] : img_off[k + 1]].tobytes())).convert("RGB")
        lab_bytes = blob[img_off[k + 1] : lab_off[k + 1]].tobytes()
        # An unlabelled photo has no label bytes: every pixel is unknown (trimap 0 -> ignored).
        lab = Image.open(io.BytesIO(lab_bytes)) if lab_bytes else Image.new("L", img.size, 0)
        if lab.size != img.size:
            lab = lab.resize(img.size, Image.NEAREST)
        if max(img.size) > max_side:
            s = max_side / max(img.size)
            size = (max(1, round(img.width * s)), max(1, round(img.height * s)))
            img, lab = img.resize(size, Image.BILINEAR), lab.resize(size, Image.NEAREST)
        ims.append(np.asarray(img, np.uint8))
        lab = np.asarray(lab).astype(np.int32)
        if lab.ndim == 3:
            lab = lab[..., 0]
        lab = lab - label_offset
        labs.append(np.where(lab < 0, _IGNORE, lab).astype(np.uint8))
    c = max(max(i.shape[:2]) for i in ims)
    images = np.zeros((len(ims), c, c, 3), np.uint8)
    labels = np.full((len(ims), c, c), _IGNORE, np.uint8)
    hw = np.zeros((len(ims), 2), np.int32)
    for k, (i, m) in enumerate(zip(ims, labs, strict=True)):
        images[k, : i.shape[0], : i.shape[1]] = i
        labels[k, : m.shape[0], : m.shape[1]] = m
        hw[k] = i.shape[:2]
    return PackedData(images, labels, hw, z["split"].copy(), [str(n) for n in z["names"]])


# --------------------------------------------------------------------------------------------- numeric core


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.02) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor * peak`` at ``total`` steps
    (the schedule of :mod:`pipelines.train`, per step instead of per epoch)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def crop_coords(xp, oy, ox, ch, cw, size: int, flip):
    """Source coordinates of a ``size x size`` resample of the crop ``[oy, oy+ch) x [ox, ox+cw)``.

    Half-pixel centres, as ``tf.image.resize``: output pixel ``i`` samples source row
    ``oy + (i + 0.5) * ch / size - 0.5``, clamped to the crop. ``flip`` mirrors the columns. ``xp`` is
    ``numpy`` or ``jax.numpy``; arguments are scalars. Returns float ``(size,)`` rows and columns.
    """
    i = xp.arange(size, dtype=xp.float32) + 0.5
    ys = xp.clip(oy + i * ch / size - 0.5, oy, oy + ch - 1)
    xs = xp.clip(ox + i * cw / size - 0.5, ox, ox + cw - 1)
    xs = xp.where(flip, xs[::-1], xs)
    return ys, xs


def _bilinear(xp, img, ys, xs):
    """``img (H, W, C)`` sampled at the grid ``ys x xs`` -> ``(len(ys), len(xs), C) float32``."""
    y0 = xp.floor(ys).astype(xp.int32)
    x0 = xp.floor(xs).astype(xp.int32)
    y1 = xp.minimum(y0 + 1, img.shape[0] - 1)
    x1 = xp.minimum(x0 + 1, img.shape[1] - 1)
    wy = (ys - y0)[:, None, None]
    wx = (xs - x0)[None, :, None]
    f = img.astype(xp.float32)
    top = f[y0][:, x0] * (1 - wx) + f[y0][:, x1] * wx
    bot = f[y1][:, x0] * (1 - wx) + f[y1][:, x1] * wx
    return top * (1 - wy) + bot * wy


def _nearest(xp, lab, ys, xs):
    """``lab (H, W)`` at the grid, nearest neighbour (``floor(x + 0.5)``, as the half-pixel rule)."""
    yi = xp.floor(ys + 0.5).astype(xp.int32)
    xi = xp.floor(xs + 0.5).astype(xp.int32)
    return lab[yi][:, xi]


# --------------------------------------------------------------------------------------------- JAX engine


@dataclass
class FitConfig:
    """Everything a ``fit`` run depends on (written to ``OUT/run.json``)."""

    pack: str
    out: str
    size: int = 192
    base_filters: int = 24
    depth: int = 4
    norm: str = "batch"
    dropout: float = 0.1
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.03
    dice_weight: float = 1.0
    #: Probability that a training crop gets a rectangle (10-50 % of its area) of the next crop in the batch
    #: pasted in, photo and label together (CutMix); 0 turns it off.
    cutmix: float = 0.0
    #: ``mixed_bfloat16`` computes convolutions in bfloat16 with float32 weights (about twice the steps per
    #: second on Hopper GPUs); the exported weights are float32 either way.
    precision: str = "float32"
    #: Decay of an exponential moving average of every variable (weights and batch-norm statistics), updated
    #: each step; 0 turns it off. When on, the average is what is validated, exported and used as teacher.
    ema: float = 0.0
    #: Weight of the mean-teacher consistency loss on photos without labels (CutMix-Seg, French et al. 2020):
    #: the EMA teacher labels a batch, two photos are mixed by a CutMix rectangle and the student must give
    #: the mixed teacher labels. 0 turns it off; needs ``ema``. Ramped up linearly over ``consistency_rampup``
    #: of the steps, while the teacher is still poor.
    consistency: float = 0.0
    #: A teacher pixel is a target only where its top probability is at least this; others are ignored.
    consistency_threshold: float = 0.9
    consistency_rampup: float = 0.2
    #: Probability that a training crop (and a student's consistency crop, after the teacher labelled the sharp
    #: one) goes through 40-100 % of its edge and back (:func:`lowres`), so the model also segments photos
    #: that lack detail. 0 turns it off.
    lowres: float = 0.0
    budget_s: float = 400.0
    seed: int = 0
    evals: int = 40
    label_offset: int = 1
    num_classes: int = 3
    #: Start from these weights (a ``.npz`` by Keras variable path, from ``fit`` or ``weights``) instead of a
    #: random initialisation; the moving average starts from them too, so the teacher is good from step 1.
    init: str = ""
    #: Dtype the ``weights*.npz`` files are written in. ``float16`` halves them (8.8 MB for the 24-filter
    #: U-Net), under the 15 MB a file may have to leave the project's GPU host; ``export`` reads either.
    save_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.precision not in ("float32", "mixed_bfloat16"):
            raise ValueError(f"precision must be float32 or mixed_bfloat16, not {self.precision!r}")
        if not 0 <= self.lowres <= 1:
            raise ValueError(f"lowres is a probability in [0, 1], not {self.lowres}")
        if self.save_dtype not in ("float32", "float16"):
            raise ValueError(f"save_dtype must be float32 or float16, not {self.save_dtype!r}")
        if self.init and not Path(self.init).is_file():
            raise ValueError(f"init: no weights file {self.init}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema must be in [0, 1), not {self.ema}")
        if self.consistency > 0 and self.ema <= 0:
            raise ValueError("consistency needs a teacher: set ema (e.g. 0.999)")


def _augment_fn(size: int):
    import jax
    import jax.numpy as jnp

    def one(key, img, lab, hw):
        k = jax.random.split(key, 9)
        h, w = hw[0].astype(jnp.float32), hw[1].astype(jnp.float32)
        u = lambda kk, lo=0.0, hi=1.0: jax.random.uniform(kk, (), jnp.float32, lo, hi)  # noqa: E731
        scale, log_ar = u(k[0], 0.55, 1.0), u(k[1], -0.25, 0.25)
        ch = jnp.minimum(h, jnp.round(h * scale * jnp.exp(log_ar / 2)))
        cw = jnp.minimum(w, jnp.round(w * scale * jnp.exp(-log_ar / 2)))
        oy = jnp.floor(u(k[2]) * (h - ch + 1))
        ox = jnp.floor(u(k[3]) * (w - cw + 1))
        ys, xs = crop_coords(jnp, oy, ox, ch, cw, size, u(k[4]) < 0.5)
        x = _bilinear(jnp, img, ys, xs) / 255.0
        y = _nearest(jnp, lab, ys, xs)
        # Colour jitter with tf.image's ranges: brightness, contrast, saturation, hue (YIQ rotation).
        x = x + u(k[5], -0.15, 0.15)
        mean = x.mean(axis=(0, 1), keepdims=True)
        x = (x - mean) * u(k[6], 0.7, 1.3) + mean
        grey = x @ jnp.asarray([0.299, 0.587, 0.114], jnp.float32)
        x = grey[..., None] + (x - grey[..., None]) * u(k[7], 0.6, 1.4)
        theta = u(k[8], -0.04, 0.04) * 2 * jnp.pi
        to_yiq = jnp.asarray([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        c, s = jnp.cos(theta), jnp.sin(theta)
        rot = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        rot = rot.at[1, 1].set(c).at[1, 2].set(-s).at[2, 1].set(s).at[2, 2].set(c)
        m = jnp.linalg.inv(to_yiq) @ rot @ to_yiq
        x = x @ m.T
        return jnp.clip(x, 0.0, 1.0), y

    return jax.vmap(one)


def cutmix_mask(key, n: int, size: int, p: float):
    """``(n, size, size) bool``: per item, with probability ``p``, a random rectangle of 10-50 % of the area
    (aspect ratio within e^±0.5), True inside. JAX."""
    import jax
    import jax.numpy as jnp

    k = jax.random.split(key, 4)
    apply = jax.random.uniform(k[0], (n,)) < p
    area = jax.random.uniform(k[1], (n,), jnp.float32, 0.1, 0.5)
    ar = jnp.exp(jax.random.uniform(k[2], (n,), jnp.float32, -0.5, 0.5))
    half_h = jnp.sqrt(area * ar) * size / 2
    half_w = jnp.sqrt(area / ar) * size / 2
    centre = jax.random.uniform(k[3], (n, 2), jnp.float32) * size
    grid = jnp.arange(size, dtype=jnp.float32) + 0.5
    return ((jnp.abs(grid[None, :, None] - centre[:, 0, None, None]) < half_h[:, None, None])
            & (jnp.abs(grid[None, None, :] - centre[:, 1, None, None]) < half_w[:, None, None])
            & apply[:, None, None])


def _paste_next(inside, a):
    """Where ``inside (N, S, S)``, ``a (N, S, S, ...)`` takes the values of the next item (order rolled by one)."""
    import jax.numpy as jnp

    m = inside.reshape(inside.shape + (1,) * (a.ndim - 3))
    return jnp.where(m, jnp.roll(a, 1, axis=0), a)


def cutmix(key, x, y, p: float):
    """CutMix inside a batch: with probability ``p`` per item, a random rectangle of the next item (batch
    order rolled by one) replaces the same rectangle of ``x (N, S, S, C)`` and ``y (N, S, S)``. JAX arrays;
    returns ``(x, y)``."""
    inside = cutmix_mask(key, x.shape[0], x.shape[1], p)
    return _paste_next(inside, x), _paste_next(inside, y)


def lowres_matrix(size: int, fraction):
    """``(size, size)`` matrix ``A`` such that ``A @ x`` (per axis) is ``x`` resized to
    ``m = round(size * fraction)`` samples with an antialiased bilinear (triangle) filter and bilinearly back:
    what ``tf.image.resize(..., antialias=True)`` down and ``tf.image.resize`` up do, as in
    :func:`pipelines.train.lowres_resample`. ``fraction`` may be a traced scalar in (0, 1]; the shape is
    static, so it runs inside a jitted step."""
    import jax.numpy as jnp

    m = jnp.clip(jnp.round(size * fraction), 1, size)
    scale = m / size  # the rate the resize really uses, as TensorFlow's
    j = jnp.arange(size, dtype=jnp.float32)
    i = jnp.arange(size, dtype=jnp.float32)
    # Down: output sample j (valid for j < m) averages the input around (j + 0.5) / scale - 0.5 with a
    # triangle of half-width 1 / scale input pixels, normalised over the input.
    centre = (j + 0.5) / scale - 0.5
    down = jnp.maximum(0.0, 1.0 - jnp.abs(i[None, :] - centre[:, None]) * scale)
    down = down / jnp.maximum(down.sum(1, keepdims=True), 1e-12)
    down = jnp.where((j < m)[:, None], down, 0.0)
    # Up: output pixel i takes the two valid small samples around (i + 0.5) * scale - 0.5 (clamped).
    pos = jnp.clip((i + 0.5) * scale - 0.5, 0.0, m - 1)
    up = jnp.maximum(0.0, 1.0 - jnp.abs(pos[:, None] - j[None, :]))
    up = jnp.where((j < m)[None, :], up, 0.0)
    return up @ down


def lowres(key, x, p: float, lo: float = 0.4, hi: float = 1.0):
    """With probability ``p`` per item, ``x (N, S, S, C)`` resampled through a random ``lo``-``hi`` fraction of
    its edge and back (:func:`lowres_matrix`): photos that lack detail, as small, upscaled or soft photos do.
    Labels are not touched. JAX arrays."""
    import jax
    import jax.numpy as jnp

    kp, kf = jax.random.split(key)
    n, size = x.shape[0], x.shape[1]
    frac = jax.random.uniform(kf, (n,), jnp.float32, lo, hi)
    a = jax.vmap(lambda f: lowres_matrix(size, f))(frac)
    soft = jnp.einsum("nia,nabc,njb->nijc", a, x.astype(jnp.float32), a).astype(x.dtype)
    pick = jax.random.uniform(kp, (n,)) < p
    return jnp.where(pick[:, None, None, None], soft, x)


def consistency_targets(probs, threshold: float):
    """Teacher softmax ``probs (..., K)`` -> hard targets ``(...) uint8``: the top class where its probability
    is at least ``threshold``, 255 (ignored by the loss) elsewhere. JAX arrays."""
    import jax.numpy as jnp

    top = probs.argmax(-1).astype(jnp.uint8)
    return jnp.where(probs.max(-1) >= threshold, top, jnp.uint8(_IGNORE))


def ema_decay(decay: float, step):
    """The decay used at ``step`` (0-based): ``min(decay, (1 + step) / (10 + step))``, so the average forgets
    the random initialisation quickly (the rule of TensorFlow's ExponentialMovingAverage ``num_updates``)."""
    import jax.numpy as jnp

    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def _val_arrays(data: PackedData, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Validation photos resized to ``size`` (bilinear) and labels (nearest), as the 128x128 report."""
    from PIL import Image

    idx = np.flatnonzero(data.split == VAL)
    xs, ys = [], []
    for k in idx:
        h, w = data.hw[k]
        xs.append(np.asarray(Image.fromarray(data.images[k, :h, :w]).resize((size, size), Image.BILINEAR)))
        ys.append(np.asarray(Image.fromarray(data.labels[k, :h, :w]).resize((size, size), Image.NEAREST)))
    return np.stack(xs).astype(np.float32) / 255.0, np.stack(ys)


def fit(cfg: FitConfig) -> dict:
    """Train a U-Net on a pack within ``cfg.budget_s`` seconds of stepping; see the module docstring."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import jax.numpy as jnp
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"fit needs the JAX backend of Keras; KERAS_BACKEND is {keras.backend.backend()!r}")
    from pipelines.losses import DiceCELoss
    from pipelines.metrics import confusion_matrix, scores
    from pipelines.unet import UNetConfig, build_unet

    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_pack(cfg.pack, cfg.label_offset)
    train_idx = np.flatnonzero((data.split == TRAIN) | (data.split == EXTRA))
    # Consistency photos: every photo that may train, labelled or not (never a validation photo).
    pool_idx = np.flatnonzero(data.split != VAL)
    val_x, val_y = _val_arrays(data, cfg.size)
    keras.utils.set_random_seed(cfg.seed)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(cfg.precision)
    try:
        # The softmax layer is float32 whatever the policy (build_unet), so the loss sees float32 probabilities.
        model = build_unet(UNetConfig(input_size=cfg.size, num_classes=cfg.num_classes,
                                      base_filters=cfg.base_filters, depth=cfg.depth, norm=cfg.norm,
                                      dropout=cfg.dropout))
    finally:
        keras.config.set_dtype_policy(previous_policy)
    if cfg.init:
        load_weights_npz(model, cfg.init)
    opt = keras.optimizers.Adam(cfg.learning_rate, weight_decay=cfg.weight_decay or None)
    opt.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    opt.build(model.trainable_variables)
    lr_slot = [i for i, v in enumerate(opt.variables) if v.path.endswith("learning_rate")]
    if len(lr_slot) != 1:
        raise RuntimeError("cannot find the optimizer's learning-rate variable")
    lr_slot = lr_slot[0]
    loss_obj = DiceCELoss(num_classes=cfg.num_classes, dice_weight=cfg.dice_weight)
    augment = _augment_fn(cfg.size)

    images = jax.device_put(data.images)
    labels = jax.device_put(data.labels)
    hws = jax.device_put(data.hw)

    def loss_fn(tv, ntv, x, y, n_sup, w_u):
        # One forward pass over the labelled crops and, after them, the mixed consistency crops, so batch
        # normalisation sees both.
        probs, ntv = model.stateless_call(tv, ntv, x, training=True)
        loss = loss_obj(y[:n_sup, ..., None], probs[:n_sup])
        if x.shape[0] > n_sup:
            loss = loss + w_u * loss_obj(y[n_sup:, ..., None], probs[n_sup:])
        return loss, ntv

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    @jax.jit
    def train_step(state, idx, uidx, key, lr, w_u, step):
        tv, ntv, ov, etv, entv = state
        key, mix_key, u_key, umix_key = jax.random.split(key, 4)
        x, y = augment(jax.random.split(key, idx.shape[0]), images[idx], labels[idx], hws[idx])
        if cfg.cutmix > 0:
            x, y = cutmix(mix_key, x, y, cfg.cutmix)
        if cfg.lowres > 0:
            x = lowres(jax.random.fold_in(mix_key, 1), x, cfg.lowres)
        n_sup = x.shape[0]
        if cfg.consistency > 0:
            xu, _ = augment(jax.random.split(u_key, uidx.shape[0]), images[uidx], labels[uidx], hws[uidx])
            teacher, _ = model.stateless_call(etv, entv, xu, training=False)
            # Every consistency crop is mixed: the rectangle is the perturbation the student must see through.
            inside = cutmix_mask(umix_key, xu.shape[0], xu.shape[1], 1.0)
            yu = consistency_targets(_paste_next(inside, jax.lax.stop_gradient(teacher)),
                                     cfg.consistency_threshold)
            # The teacher saw the sharp photos; the student may see them soft.
            xs = _paste_next(inside, xu)
            if cfg.lowres > 0:
                xs = lowres(jax.random.fold_in(umix_key, 1), xs, cfg.lowres)
            x = jnp.concatenate([x, xs])
            y = jnp.concatenate([y, yu])
        (loss, ntv), grads = grad_fn(tv, ntv, x, y, n_sup, w_u)
        ov = list(ov)
        ov[lr_slot] = lr.astype(ov[lr_slot].dtype)
        tv, ov = opt.stateless_apply(ov, grads, tv)
        if cfg.ema > 0:
            d = ema_decay(cfg.ema, step)
            etv = [d * e + (1 - d) * v for e, v in zip(etv, tv, strict=True)]
            entv = [d * e + (1 - d) * v if jnp.issubdtype(v.dtype, jnp.floating) else v
                    for e, v in zip(entv, ntv, strict=True)]
        return (tv, ntv, ov, etv, entv), loss

    @jax.jit
    def predict(tv, ntv, x):
        probs, _ = model.stateless_call(tv, ntv, x, training=False)
        return probs

    tv0 = [v.value for v in model.trainable_variables]
    ntv0 = [v.value for v in model.non_trainable_variables]
    # The average starts as a copy of the initial variables (its decay rule forgets them within ~100 steps).
    state = (tv0, ntv0, [v.value for v in opt.variables], [jnp.array(v) for v in tv0], [jnp.array(v) for v in ntv0])
    rng = np.random.default_rng(cfg.seed)
    key = jax.random.PRNGKey(cfg.seed)
    streams: dict[str, list[int]] = {"sup": [], "pool": []}

    def draw(stream: str, pool: np.ndarray) -> np.ndarray:
        if len(streams[stream]) < cfg.batch_size:
            streams[stream] = streams[stream] + list(rng.permutation(pool))
        b, streams[stream] = streams[stream][: cfg.batch_size], streams[stream][cfg.batch_size :]
        return np.asarray(b, np.int32)

    no_pool = np.zeros(1, np.int32)

    def step_args() -> tuple[np.ndarray, np.ndarray]:
        return draw("sup", train_idx), (draw("pool", pool_idx) if cfg.consistency > 0 else no_pool)

    def served(st) -> tuple[list, list]:
        """The variables that are validated and exported: the average when there is one."""
        return (st[3], st[4]) if cfg.ema > 0 else (st[0], st[1])

    def evaluate(variables) -> tuple[float, float, float]:
        cm = np.zeros((cfg.num_classes,) * 2, np.int64)
        vloss = []
        for s in range(0, len(val_x), 32):
            p = predict(variables[0], variables[1], jnp.asarray(val_x[s : s + 32]))
            vloss.append(float(loss_obj(jnp.asarray(val_y[s : s + 32, ..., None]), p)) * len(p))
            cm += confusion_matrix(val_y[s : s + 32], np.asarray(p.argmax(-1)), cfg.num_classes)
        report = scores(cm)
        return report["pixel_accuracy"], report["mean_iou"], sum(vloss) / len(val_x)

    # Calibrate: compile, then time steps at the warm-up's first learning rate to size the schedule.
    t0 = time.time()
    key, sub = jax.random.split(key)
    cal_lr = jnp.float32(cfg.learning_rate / 100)
    state, loss = train_step(state, *step_args(), sub, cal_lr, jnp.float32(0), jnp.float32(0))
    loss.block_until_ready()
    compile_s = time.time() - t0
    t0 = time.time()
    n_cal = 10
    for _ in range(n_cal):
        key, sub = jax.random.split(key)
        state, loss = train_step(state, *step_args(), sub, cal_lr, jnp.float32(0), jnp.float32(0))
    loss.block_until_ready()
    step_s = (time.time() - t0) / n_cal
    total = max(20, int((cfg.budget_s - (time.time() - t_start)) / step_s))
    warmup = max(1, int(cfg.warmup_frac * total))
    eval_every = max(1, total // cfg.evals)
    steps_per_epoch = len(train_idx) / cfg.batch_size
    print(f"compile {compile_s:.1f}s, {step_s * 1000:.1f} ms/step, {total} steps "
          f"({total / steps_per_epoch:.0f} epochs of {len(train_idx)} photos)", flush=True)

    hist = out / "history.csv"
    fields = ["epoch", "step", "learning_rate", "loss", "val_loss", "val_mean_iou", "val_masked_pixel_accuracy",
              "elapsed_s"]
    with open(hist, "w", newline="") as f:
        csv.writer(f).writerow(fields)
    losses: list[float] = []
    t_train = time.time()
    for step in range(total):
        key, sub = jax.random.split(key)
        lr = lr_at(step, total, cfg.learning_rate, warmup)
        w_u = cfg.consistency * min(1.0, (step + 1) / max(1.0, cfg.consistency_rampup * total))
        state, loss = train_step(state, *step_args(), sub, jnp.float32(lr), jnp.float32(w_u), jnp.float32(step))
        losses.append(loss)
        if (step + 1) % eval_every == 0 or step + 1 == total:
            tr_loss = float(np.mean([float(v) for v in losses]))
            losses = []
            acc, miou, vloss = evaluate(served(state))
            row = [int(round((step + 1) / steps_per_epoch)), step + 1, lr, tr_loss, vloss, miou, acc,
                   round(time.time() - t_start, 1)]
            with open(hist, "a", newline="") as f:
                csv.writer(f).writerow(row)
            print(f"step {step + 1}/{total} lr {lr:.2e} loss {tr_loss:.4f} val_loss {vloss:.4f} "
                  f"val_acc {acc:.4f} val_miou {miou:.4f} {time.time() - t_start:.0f}s", flush=True)
    train_s = time.time() - t_train

    def save(variables, path: Path) -> None:
        for v, val in zip(model.trainable_variables, variables[0], strict=True):
            v.assign(val)
        for v, val in zip(model.non_trainable_variables, variables[1], strict=True):
            v.assign(val)
        save_weights_npz(model, path, cfg.save_dtype)

    student = {}
    if cfg.ema > 0:
        # Kept for comparison; weights.npz (what export reads) is the average.
        save((state[0], state[1]), out / "weights_student.npz")
        s_acc, s_miou, _ = evaluate((state[0], state[1]))
        student = {"student_val": {"pixel_accuracy": s_acc, "mean_iou": s_miou, "size": cfg.size}}
    save(served(state), out / "weights.npz")
    acc, miou, _ = evaluate(served(state))
    report = {
        "config": asdict(cfg),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "keras": keras.__version__,
        "steps": total,
        "epochs": total / steps_per_epoch,
        "train_images": int(len(train_idx)),
        "val_images": int(len(val_x)),
        "compile_s": compile_s,
        "step_ms": step_s * 1000,
        "train_s": train_s,
        "wall_s": time.time() - t_start,
        "final_val": {"pixel_accuracy": acc, "mean_iou": miou, "size": cfg.size},
        "pool_images": int(len(pool_idx)) if cfg.consistency > 0 else 0,
        **student,
    }
    (out / "run.json").write_text(json.dumps(report, indent=2))
    return report


def save_weights_npz(model, path: str | Path, dtype: str = "float32") -> None:
    """Write every variable of the Keras ``model`` to ``path`` (``.npz``, no pickle) by its Keras path, in
    ``dtype`` (``float32`` or ``float16``). Raises ``ValueError`` when a weight does not fit in float16."""
    from pipelines.weights import stored_as

    np.savez(path, **{v.path: stored_as(v.path, np.asarray(v.value), dtype) for v in model.weights})


def load_weights_npz(model, path: str | Path) -> None:
    """Assign the variables of ``weights.npz`` (written by ``fit`` or :func:`save_weights_npz`, float32 or
    float16) to ``model`` by Keras path, cast to each variable's dtype.

    Raises ``ValueError`` when a variable is missing or has another shape: the model must be built with the
    run's architecture (``run.json``'s config).
    """
    z = np.load(path, allow_pickle=False)
    for v in model.weights:
        if v.path not in z.files:
            raise ValueError(f"{path}: no weights for {v.path}")
        arr = z[v.path]
        if tuple(arr.shape) != tuple(v.shape):
            raise ValueError(f"{path}: {v.path} has shape {arr.shape}, the model wants {tuple(v.shape)}")
        v.assign(arr.astype(np.dtype(v.dtype)))


def model_weights(name_or_path: str, out: str | Path, dtype: str = "float32") -> Path:
    """Write the weights of a registered Keras model (name, folder, spec.json or ``.keras`` file) as a
    ``.npz`` that ``fit --init`` starts from. Returns ``out``."""
    import keras

    from pipelines.evaluate import resolve_model
    from pipelines.weights import cast_model

    spec = resolve_model(name_or_path)
    if spec.source_format != "keras":
        raise ValueError(f"{name_or_path}: only Keras model files have weights by variable path")
    model = cast_model(keras.saving.load_model(spec.resolve_source(), compile=False), "float32")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights_npz(model, out, dtype)
    return out


def export_run(run_dir: str | Path, export_dir: str | Path, description: str = "", tta: str | None = "flip",
               student: bool = False, weights_dtype: str = "float32"):
    """Turn a ``fit`` output folder into a registry model folder (``model.keras`` + ``spec.json``).

    Builds the run's architecture (``run.json``) on the local Keras backend, loads ``weights.npz`` (with
    ``student``: ``weights_student.npz``, the last step's own weights of an ``--ema`` run), writes
    the model through :func:`pipelines.evaluate.export_model` with ``input_size`` = the run's size and its
    weights in ``weights_dtype`` (``float16``: half the bytes), sets the
    spec's ``tta`` and plots ``history.csv`` to ``training_curve.png``. Returns the
    :class:`~pipelines.spec.ModelSpec`.
    """
    import tempfile

    from pipelines.evaluate import export_model
    from pipelines.spec import ModelSpec
    from pipelines.train import write_training_curve
    from pipelines.unet import UNetConfig, build_unet

    run_dir = Path(run_dir)
    c = json.loads((run_dir / "run.json").read_text())["config"]
    model = build_unet(UNetConfig(input_size=c["size"], num_classes=c["num_classes"], base_filters=c["base_filters"],
                                  depth=c["depth"], norm=c["norm"], dropout=c["dropout"]))
    load_weights_npz(model, run_dir / ("weights_student.npz" if student else "weights.npz"))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.keras"
        model.save(ckpt)
        spec = export_model(ckpt, export_dir, input_size=c["size"], description=description,
                            weights_dtype=weights_dtype)
    if tta:
        spec_path = Path(export_dir) / "spec.json"
        raw = json.loads(spec_path.read_text())
        raw["tta"] = tta
        spec_path.write_text(json.dumps(raw, indent=2) + "\n")
        spec = ModelSpec.from_file(spec_path)
    if (run_dir / "history.csv").is_file():
        write_training_curve(run_dir / "history.csv", Path(export_dir) / "training_curve.png",
                             val_title=f"validation ({c['size']}x{c['size']}, one pass)")
    return spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.train_jax", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="pack a labelled folder (and extra training folders) into one .npz")
    pk.add_argument("--data", required=True)
    pk.add_argument("--extra-train", action="append", default=[])
    pk.add_argument("--unlabeled", action="append", default=[],
                    help="folder of photos without labels (images/, annotations/*.txt), for the consistency term")
    pk.add_argument("--val-fraction", type=float, default=0.15)
    pk.add_argument("--out", required=True)
    ft = sub.add_parser("fit", help="train on a pack with the JAX backend")
    for f, default in asdict(FitConfig(pack="", out="")).items():
        flag = "--" + f.replace("_", "-")
        if f in ("pack", "out"):
            ft.add_argument(flag, required=True)
        else:
            ft.add_argument(flag, type=type(default), default=default)
    ex = sub.add_parser("export", help="make a registry model folder from a fit output folder")
    ex.add_argument("--run", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--description", default="")
    ex.add_argument("--student", action="store_true",
                    help="export the last step's own weights of an --ema run instead of the moving average")
    ex.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                    help="storage dtype of model.keras (float16: half the bytes; served in float32)")
    wt = sub.add_parser("weights", help="a registered Keras model's weights as a .npz for fit --init")
    wt.add_argument("--model", required=True, help="registered name, model folder, spec.json or .keras file")
    wt.add_argument("--out", required=True)
    wt.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    a = p.parse_args(argv)
    if a.cmd == "weights":
        print(model_weights(a.model, a.out, a.dtype))
        return 0
    if a.cmd == "export":
        print(export_run(a.run, a.out, a.description, student=a.student, weights_dtype=a.dtype).name)
        return 0
    if a.cmd == "pack":
        print(json.dumps(pack_folders(a.data, a.out, a.extra_train, a.val_fraction, a.unlabeled)))
        return 0
    cfg = FitConfig(**{k: v for k, v in vars(a).items() if k != "cmd"})
    print(json.dumps(fit(cfg)["final_val"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
