"""U-Net builder: shapes, configurability, and a save/load round trip without custom objects."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from pipelines.unet import UNetConfig, build_unet  # noqa: E402


def _layer_types(model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


def test_default_shapes_and_softmax():
    model = build_unet(input_size=64, base_filters=4, depth=3)
    x = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    y = np.asarray(model(x, training=False))
    assert y.shape == (2, 64, 64, 3)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)
    assert (y >= 0).all()


def test_depth_sets_levels_and_skips():
    for depth in (1, 2, 4):
        model = build_unet(input_size=32, base_filters=4, depth=depth)
        names = [layer.name for layer in model.layers]
        assert sum(n.endswith("_pool") for n in names) == depth
        assert sum(n.endswith("_concat") for n in names) == depth
        assert model.get_layer("bottleneck_conv1").filters == 4 * 2**depth


def test_width_scales_params_quadratically():
    small = build_unet(input_size=32, base_filters=8, depth=3).count_params()
    big = build_unet(input_size=32, base_filters=16, depth=3).count_params()
    # 3x3 convs dominate, their weights grow with filters^2 (the first layer and biases grow linearly).
    assert 3.6 < big / small < 4.0


def test_norm_options():
    bn = build_unet(input_size=32, base_filters=8, depth=2, norm="batch")
    gn = build_unet(input_size=32, base_filters=8, depth=2, norm="group")
    plain = build_unet(input_size=32, base_filters=8, depth=2, norm="none")
    assert "BatchNormalization" in _layer_types(bn)
    assert "GroupNormalization" in _layer_types(gn) and "BatchNormalization" not in _layer_types(gn)
    assert not {"BatchNormalization", "GroupNormalization"} & set(_layer_types(plain))
    # Without normalization the convs carry their own bias.
    assert plain.get_layer("enc0_conv1").use_bias and not bn.get_layer("enc0_conv1").use_bias


def test_dropout_option():
    assert "SpatialDropout2D" not in _layer_types(build_unet(input_size=32, base_filters=4, depth=3))
    drop = build_unet(input_size=32, base_filters=4, depth=3, dropout=0.3)
    drops = [layer for layer in drop.layers if type(layer).__name__ == "SpatialDropout2D"]
    assert len(drops) == 3 and all(layer.rate == 0.3 for layer in drops)


def test_fully_convolutional_when_size_is_none():
    model = build_unet(UNetConfig(input_size=None, base_filters=4, depth=2, num_classes=5))
    y = model(np.zeros((1, 32, 48, 3), np.float32))
    assert tuple(y.shape) == (1, 32, 48, 5)


@pytest.mark.parametrize(
    "kw",
    [{"input_size": 100, "depth": 4}, {"depth": 0}, {"dropout": 1.0}, {"norm": "layer"}, {"num_classes": 1}],
)
def test_invalid_configs_raise(kw):
    with pytest.raises(ValueError):
        UNetConfig(**kw)


def test_save_load_roundtrip_without_custom_objects(tmp_path):
    model = build_unet(input_size=32, base_filters=4, depth=2, dropout=0.1)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    x = np.random.default_rng(1).random((1, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)
