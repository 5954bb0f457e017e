"""Segmentation loss and metric written with ``keras.ops`` only, so they run on any Keras 3 backend.

:mod:`pipelines.train` (TensorFlow, ``model.fit``) and :mod:`pipelines.train_jax` (JAX on an accelerator host
without TensorFlow) train with the same objective. Both are registered serializable under ``tileseg>``.
"""

from __future__ import annotations

import keras
from keras import ops

__all__ = ["IGNORE", "DiceCELoss", "masked_pixel_accuracy"]

#: Label value for pixels the loss and metrics skip (unknown / low-confidence pseudo-label).
IGNORE = 255


@keras.saving.register_keras_serializable(package="tileseg")
class DiceCELoss(keras.losses.Loss):
    """Cross-entropy plus ``dice_weight`` x (1 - mean soft Dice over classes), skipping IGNORE pixels.

    ``y_true`` ``(N, H, W, 1)`` integer class ids, ``y_pred`` ``(N, H, W, K)`` softmax probabilities. The
    Dice term is computed over the whole batch (per class), which is stable for classes as thin as the
    pets' outline band.
    """

    def __init__(self, num_classes: int = 3, dice_weight: float = 1.0, name: str = "dice_ce", **kw):
        super().__init__(name=name, **kw)
        self.num_classes = num_classes
        self.dice_weight = dice_weight

    def call(self, y_true, y_pred):
        y = ops.cast(ops.squeeze(y_true, -1), "int32")
        valid = ops.cast(ops.not_equal(y, IGNORE), "float32")
        y = ops.where(y == IGNORE, 0, y)
        onehot = ops.one_hot(y, self.num_classes) * valid[..., None]
        p = ops.clip(y_pred, 1e-7, 1.0)
        n_valid = ops.maximum(ops.sum(valid), 1.0)
        ce = -ops.sum(onehot * ops.log(p)) / n_valid
        if not self.dice_weight:
            return ce
        pv = y_pred * valid[..., None]
        inter = ops.sum(pv * onehot, axis=(0, 1, 2))
        denom = ops.sum(pv, axis=(0, 1, 2)) + ops.sum(onehot, axis=(0, 1, 2))
        dice = (2.0 * inter + 1.0) / (denom + 1.0)
        return ce + self.dice_weight * (1.0 - ops.mean(dice))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "dice_weight": self.dice_weight}


@keras.saving.register_keras_serializable(package="tileseg")
def masked_pixel_accuracy(y_true, y_pred):
    """Fraction of non-IGNORE pixels whose argmax equals the label (a Keras metric function)."""
    y = ops.cast(ops.squeeze(y_true, -1), "int32")
    valid = ops.cast(ops.not_equal(y, IGNORE), "float32")
    hit = ops.cast(ops.equal(ops.cast(ops.argmax(y_pred, -1), "int32"), y), "float32") * valid
    return ops.sum(hit) / ops.maximum(ops.sum(valid), 1.0)
