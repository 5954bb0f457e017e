"""Keras 3 U-Net builder (Ronneberger et al. 2015, as the reference notebook lays it out).

Encoder blocks (two 3x3 convs, then 2x2 max-pool), a bottleneck, decoder blocks (2x2 transposed conv,
concatenation with the matching encoder output over the skip connection, two 3x3 convs) and a 1x1 conv
with softmax over the classes. Only stock Keras layers are used, so a saved ``.keras`` file loads with
``keras.saving.load_model(path, compile=False)`` and no custom objects.

The encoder is either the reference's conv blocks or a MobileNetV2 (``UNetConfig(encoder="mobilenetv2")``)
that :func:`load_encoder_weights` starts from pretrained weights; the decoder is the same for both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import keras
from keras import layers

__all__ = ["BN_MOMENTUM", "MOBILENETV2_TAPS", "UNetConfig", "build_unet", "load_encoder_weights"]

Norm = Literal["batch", "group", "none"]
Encoder = Literal["conv", "mobilenetv2"]

#: Batch-normalization momentum of the MobileNetV2 encoder (Keras's own default for BatchNormalization).
BN_MOMENTUM = 0.99

#: MobileNetV2 layers whose outputs feed the decoder, at strides 2, 4, 8 and 16 (the bottleneck). The
#: encoder stops at stride 16 so that any input divisible by 16 runs, as with the plain U-Net of depth 4.
MOBILENETV2_TAPS = ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "block_13_expand_relu")


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
    #: ``conv``: the reference's encoder of conv blocks. ``mobilenetv2``: a MobileNetV2 (alpha 1.0) encoder
    #: up to stride 16 with the same Keras layer names as ``keras.applications.MobileNetV2``, so pretrained
    #: weights load by name (:func:`load_encoder_weights`); ``depth`` must be 4 and the decoder's filters
    #: are ``base_filters * 2 ** level`` as for ``conv``. Input stays RGB in [0, 1].
    encoder: Encoder = "conv"

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
        if self.encoder not in ("conv", "mobilenetv2"):
            raise ValueError(f"encoder must be conv or mobilenetv2, got {self.encoder!r}")
        if self.encoder == "mobilenetv2" and (self.depth != 4 or self.channels != 3):
            raise ValueError("the mobilenetv2 encoder has depth 4 and takes 3 channels (RGB)")

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
    if cfg.encoder == "mobilenetv2":
        skips, x = _mobilenetv2_encoder(inputs, cfg)
    else:
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


def _mobilenetv2_encoder(inputs: keras.KerasTensor, cfg: UNetConfig):
    """Skips at strides 1, 2, 4, 8 and the stride-16 bottleneck of a MobileNetV2 encoder on ``inputs``.

    The MobileNetV2 layers are built into the same functional graph (not a nested model), so the saved
    model is flat, loads without custom objects and re-wires to other input sizes like the plain U-Net.
    MobileNetV2 has no stride-1 features, so a small conv block on the image gives the full-resolution skip
    that draws the outline band.
    """
    # [0, 1] -> [-1, 1], the range the ImageNet MobileNetV2 weights expect.
    x = layers.Rescaling(2.0, offset=-1.0, name="mnv2_scale")(inputs)
    base = keras.applications.MobileNetV2(input_tensor=x, include_top=False, weights=None, alpha=1.0)
    for layer in base.layers:
        if isinstance(layer, layers.BatchNormalization):
            # Keras builds these with momentum 0.999, made for ImageNet's millions of steps: over a fine-tune
            # of a few hundred steps the moving statistics would stay those of the pretrained weights and
            # inference would normalize with the wrong ones.
            layer.momentum = BN_MOMENTUM
    taps = [base.get_layer(n).output for n in MOBILENETV2_TAPS]
    full = _conv_block(inputs, cfg.base_filters, cfg.norm, "enc0")
    return [full, *taps[:-1]], taps[-1]


#: Variable names that Keras 2 (and TensorFlow.js models converted from it) used for what Keras 3 names
#: otherwise: a depthwise conv's kernel was ``depthwise_kernel``.
_LEGACY_VARIABLE_NAMES = {"kernel": ("kernel", "depthwise_kernel")}


def load_encoder_weights(model: keras.Model, weights: dict) -> int:
    """Copy ``{"layer/variable": array}`` (e.g. :func:`pipelines.pretrained.read_tfjs_weights`) into the
    layers of ``model`` with those names; returns how many layers were filled.

    Every layer of ``model`` that ``weights`` names is filled whole, or ``ValueError`` is raised (a missing
    variable or a shape mismatch): an encoder half loaded would train without anyone noticing.
    """
    by_layer: dict[str, set[str]] = {}
    for key in weights:
        layer_name, _, var = key.rpartition("/")
        by_layer.setdefault(layer_name, set()).add(var)
    filled = 0
    for layer in model.layers:
        if layer.name not in by_layer or not layer.weights:
            continue
        keys = []
        for v in layer.weights:
            found = [n for n in _LEGACY_VARIABLE_NAMES.get(v.name, (v.name,)) if n in by_layer[layer.name]]
            if not found:
                raise ValueError(f"pretrained weights lack {layer.name}/{v.name} (have {sorted(by_layer[layer.name])})")
            keys.append(f"{layer.name}/{found[0]}")
        for v, k in zip(layer.weights, keys, strict=True):
            if tuple(v.shape) != tuple(weights[k].shape):
                raise ValueError(f"{k}: pretrained shape {weights[k].shape}, model shape {tuple(v.shape)}")
        for v, k in zip(layer.weights, keys, strict=True):
            v.assign(weights[k])
        filled += 1
    return filled
