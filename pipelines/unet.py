"""Keras 3 U-Net builder (Ronneberger et al. 2015, as the reference notebook lays it out).

Encoder blocks (two 3x3 convs, then 2x2 max-pool), a bottleneck, decoder blocks (2x2 transposed conv,
concatenation with the matching encoder output over the skip connection, two 3x3 convs) and a 1x1 conv
with softmax over the classes. Only stock Keras layers are used, so a saved ``.keras`` file loads with
``keras.saving.load_model(path, compile=False)`` and no custom objects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import keras
from keras import layers

__all__ = ["UNetConfig", "build_unet"]

Norm = Literal["batch", "group", "none"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a U-Net.

    ``input_size`` may be ``None`` for a fully convolutional model that accepts any ``(H, W)`` divisible
    by ``2 ** depth``. Filters at level ``i`` are ``base_filters * 2 ** i``; the bottleneck has
    ``base_filters * 2 ** depth``.
    """

    input_size: int | None = 128
    channels: int = 3
    num_classes: int = 3
    base_filters: int = 16
    depth: int = 4
    norm: Norm = "batch"
    #: Dropout rate applied after the bottleneck and the two deepest encoder blocks (0 disables).
    dropout: float = 0.0
    name: str = "unet"

    def __post_init__(self) -> None:
        if self.depth < 1 or self.depth > 7:
            raise ValueError(f"depth must be in 1..7, got {self.depth}")
        if self.base_filters < 1:
            raise ValueError(f"base_filters must be positive, got {self.base_filters}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in ("batch", "group", "none"):
            raise ValueError(f"norm must be batch, group or none, got {self.norm!r}")
        if self.input_size is not None and self.input_size % (2**self.depth):
            raise ValueError(f"input_size {self.input_size} must be divisible by 2**depth = {2**self.depth}")
        if self.num_classes < 2:
            raise ValueError("num_classes must be at least 2 (softmax output)")

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(x: keras.KerasTensor, kind: Norm, name: str) -> keras.KerasTensor:
    if kind == "batch":
        return layers.BatchNormalization(name=f"{name}_bn")(x)
    if kind == "group":
        # Groups of 8 channels (or fewer when the layer is narrow): batch-size independent.
        groups = max(1, x.shape[-1] // 8)
        return layers.GroupNormalization(groups=groups, name=f"{name}_gn")(x)
    return x


def _conv_block(x: keras.KerasTensor, filters: int, norm: Norm, name: str) -> keras.KerasTensor:
    for i in (1, 2):
        # No bias when a normalization layer follows: its offset makes the bias redundant.
        x = layers.Conv2D(
            filters, 3, padding="same", use_bias=norm == "none", kernel_initializer="he_normal",
            name=f"{name}_conv{i}",
        )(x)
        x = _norm(x, norm, f"{name}_{i}")
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def build_unet(config: UNetConfig | None = None, **overrides) -> keras.Model:
    """Build an (uncompiled) U-Net.

    Input ``(N, S, S, channels) float32`` in [0, 1]; output ``(N, S, S, num_classes) float32`` softmax
    probabilities. Pass a :class:`UNetConfig` or its fields as keyword arguments.
    """
    cfg = config or UNetConfig()
    if overrides:
        cfg = UNetConfig(**{**cfg.to_dict(), **overrides})
    size = cfg.input_size
    inputs = keras.Input((size, size, cfg.channels), name="image")
    x = inputs
    skips = []
    for level in range(cfg.depth):
        x = _conv_block(x, cfg.base_filters * 2**level, cfg.norm, f"enc{level}")
        if cfg.dropout and level >= cfg.depth - 2:
            x = layers.SpatialDropout2D(cfg.dropout, name=f"enc{level}_drop")(x)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    x = _conv_block(x, cfg.base_filters * 2**cfg.depth, cfg.norm, "bottleneck")
    if cfg.dropout:
        x = layers.SpatialDropout2D(cfg.dropout, name="bottleneck_drop")(x)
    for level in reversed(range(cfg.depth)):
        filters = cfg.base_filters * 2**level
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = _conv_block(x, filters, cfg.norm, f"dec{level}")
    # Softmax in float32 even under a mixed-precision policy, so probabilities sum to 1 exactly enough.
    outputs = layers.Conv2D(cfg.num_classes, 1, activation="softmax", dtype="float32", name="probs")(x)
    return keras.Model(inputs, outputs, name=cfg.name)
