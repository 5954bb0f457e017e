"""Pretrained encoder weights: reading TensorFlow.js layers models (both packagings) and loading them into
the MobileNetV2 U-Net by layer name."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.pretrained import read_manifest, read_tfjs_weights, save_npz


def _quantize(a: np.ndarray) -> tuple[np.ndarray, float, float]:
    lo, hi = float(a.min()), float(a.max())
    scale = (hi - lo) / 255
    return np.round((a - lo) / scale).astype(np.uint8), lo, scale


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"conv/kernel": rng.normal(0, 0.3, (3, 3, 2, 8)).astype(np.float32),
            "bn/moving_variance": rng.uniform(0.5, 2.0, (8,)).astype(np.float32),
            "head/bias": rng.normal(0, 1, (8,)).astype(np.float32)}


def _manifest_and_blob(arrays: dict[str, np.ndarray]) -> tuple[list[dict], bytes]:
    entries, parts = [], []
    for name, a in arrays.items():
        e = {"name": name, "shape": list(a.shape), "dtype": "float32"}
        if name != "head/bias":  # one tensor stored unquantized, as converters do for some
            q, lo, scale = _quantize(a)
            e["quantization"] = {"min": lo, "scale": scale, "dtype": "uint8"}
            parts.append(q.tobytes())
        else:
            parts.append(a.tobytes())
        entries.append(e)
    return entries, b"".join(parts)


def _check(read: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> None:
    assert set(read) == set(arrays)
    for name, a in arrays.items():
        assert read[name].shape == a.shape and read[name].dtype == np.float32
        if name == "head/bias":
            np.testing.assert_array_equal(read[name], a)
        else:
            # Affine uint8: every value within half a quantization step, and the extremes exact.
            step = (a.max() - a.min()) / 255
            assert np.abs(read[name] - a).max() <= step / 2 + 1e-6
            assert read[name].min() == pytest.approx(a.min(), abs=1e-6)


def test_reads_model_json_with_two_bin_shards(tmp_path):
    arrays = _arrays()
    entries, blob = _manifest_and_blob(arrays)
    cut = len(blob) // 2
    (tmp_path / "group1-shard1of2.bin").write_bytes(blob[:cut])
    (tmp_path / "group1-shard2of2.bin").write_bytes(blob[cut:])
    manifest = [{"paths": ["group1-shard1of2.bin", "group1-shard2of2.bin"], "weights": entries}]
    (tmp_path / "model.json").write_text(json.dumps({"modelTopology": {}, "weightsManifest": manifest}))
    _check(read_tfjs_weights(tmp_path), arrays)


def _js_literal(entries: list[dict]) -> str:
    """The manifest as the minified JavaScript object literal that nsfwjs's model.min.js holds."""
    items = []
    for e in entries:
        s = f'{{name:"{e["name"]}",shape:[{",".join(map(str, e["shape"]))}],dtype:"{e["dtype"]}"'
        if "quantization" in e:
            q = e["quantization"]
            s += f',quantization:{{min:{q["min"]!r},scale:{q["scale"]!r},dtype:"{q["dtype"]}"}}'
        items.append(s + "}")
    return f'weightsManifest:[{{paths:["group1-shard1of1"],weights:[{",".join(items)}]}}]'


def test_reads_nsfwjs_style_javascript_modules(tmp_path):
    arrays = _arrays()
    entries, blob = _manifest_and_blob(arrays)
    wrapper = '!function(e){module.exports=e()}(function(){return %s});'
    (tmp_path / "model.min.js").write_text(
        wrapper % ('{modelTopology:{keras_version:"2.2.4",trainable:!1},' + _js_literal(entries) + "}"))
    (tmp_path / "group1-shard1of1.min.js").write_text(wrapper % f'"{base64.b64encode(blob).decode()}"')
    assert [w.name for w in read_manifest(tmp_path / "model.min.js")] == list(arrays)
    _check(read_tfjs_weights(tmp_path), arrays)


def test_truncated_shard_is_refused(tmp_path):
    entries, blob = _manifest_and_blob(_arrays())
    (tmp_path / "group1-shard1of1.bin").write_bytes(blob[:-5])
    (tmp_path / "model.json").write_text(json.dumps({"weightsManifest": [{"paths": [], "weights": entries}]}))
    with pytest.raises(ValueError, match="bytes"):
        read_tfjs_weights(tmp_path)


def test_npz_round_trip(tmp_path):
    arrays = _arrays()
    path = save_npz(arrays, tmp_path / "sub" / "w.npz")
    with np.load(path) as npz:
        for k, v in arrays.items():
            np.testing.assert_array_equal(npz[k], v)


# ------------------------------------------------------------------------------- MobileNetV2 U-Net

keras = pytest.importorskip("keras")


def _mnv2_weights() -> dict[str, np.ndarray]:
    """Weights of a Keras MobileNetV2 under the names a converted Keras 2 model carries (`layer/variable`; a
    depthwise conv's kernel is `depthwise_kernel` there, `kernel` in Keras 3)."""
    ref = keras.applications.MobileNetV2(input_shape=(64, 64, 3), include_top=False, weights=None, alpha=1.0)
    rng = np.random.default_rng(3)

    def draw(name: str, shape: tuple) -> np.ndarray:
        # A variance must be positive, or batch normalization divides by the root of a negative number.
        return (rng.uniform(0.5, 2.0, shape) if name == "moving_variance" else rng.normal(0, 0.1, shape))

    def keras2_name(layer, v) -> str:
        legacy = isinstance(layer, keras.layers.DepthwiseConv2D) and v.name == "kernel"
        return f"{layer.name}/{'depthwise_kernel' if legacy else v.name}"

    return {keras2_name(layer, v): draw(v.name, tuple(v.shape)).astype(np.float32)
            for layer in ref.layers for v in layer.weights}


def test_mobilenetv2_unet_loads_encoder_by_name_and_runs_any_multiple_of_16(tmp_path):
    from pipelines.unet import BN_MOMENTUM, MOBILENETV2_TAPS, UNetConfig, build_unet, load_encoder_weights

    model = build_unet(UNetConfig(input_size=64, base_filters=8, depth=4, dropout=0.1, encoder="mobilenetv2"))
    names = {layer.name for layer in model.layers}
    assert set(MOBILENETV2_TAPS) <= names
    assert "block_14_expand" not in names  # the encoder stops at stride 16
    weights = _mnv2_weights()
    filled = load_encoder_weights(model, weights)
    pretrained_layers = {k.rpartition("/")[0] for k in weights}
    with_weights = [layer for layer in model.layers if layer.weights and layer.name in pretrained_layers]
    assert filled == len(with_weights) == 80  # Conv1 .. block_13_expand_BN
    np.testing.assert_array_equal(np.asarray(model.get_layer("block_6_expand").kernel),
                                  weights["block_6_expand/kernel"])
    # Depthwise kernels too, whose variable Keras 2 named differently.
    np.testing.assert_array_equal(np.asarray(model.get_layer("block_6_depthwise").kernel),
                                  weights["block_6_depthwise/depthwise_kernel"])
    # The decoder is the project's own and keeps its initial values.
    assert not any(layer.name.startswith(("dec", "enc0")) for layer in with_weights)

    x = np.random.default_rng(1).random((2, 64, 64, 3), dtype=np.float32)
    y = np.asarray(model(x, training=False))
    assert y.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)

    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_allclose(np.asarray(loaded(x)), y, atol=1e-5)
    # The encoder's moving statistics follow a short fine-tune (Keras builds MobileNetV2 with 0.999).
    assert {layer.momentum for layer in loaded.layers
            if isinstance(layer, keras.layers.BatchNormalization)} == {BN_MOMENTUM}
    # Re-wired on an open input as the registry does: 48 px is a multiple of 16, not of 32.
    clone = keras.models.clone_model(loaded, input_tensors=keras.Input((None, None, 3)))
    clone.set_weights(loaded.get_weights())
    assert tuple(clone(np.zeros((1, 48, 80, 3), np.float32)).shape) == (1, 48, 80, 3)


def test_encoder_weights_that_do_not_fit_are_refused():
    from pipelines.unet import UNetConfig, build_unet, load_encoder_weights

    model = build_unet(UNetConfig(input_size=32, base_filters=4, depth=4, encoder="mobilenetv2"))
    weights = _mnv2_weights()
    bad = dict(weights, **{"Conv1/kernel": np.zeros((3, 3, 3, 16), np.float32)})
    with pytest.raises(ValueError, match="Conv1/kernel"):
        load_encoder_weights(model, bad)
    half = {k: v for k, v in weights.items() if k != "bn_Conv1/moving_variance"}
    with pytest.raises(ValueError, match="bn_Conv1/moving_variance"):
        load_encoder_weights(model, half)
    with pytest.raises(ValueError, match="depth 4"):
        UNetConfig(depth=3, encoder="mobilenetv2")


@pytest.mark.slow
def test_training_starts_from_pretrained_encoder(tmp_path):
    from pipelines.train import TrainConfig, train_unet
    from tests.test_train import make_pets_folder, pick_names

    weights = _mnv2_weights()
    npz = save_npz(weights, tmp_path / "enc.npz")
    root = make_pets_folder(tmp_path / "d", pick_names(4, 2))
    cfg = TrainConfig(data=str(root), out=str(tmp_path / "run"), epochs=1, size=32, base_filters=4, depth=4,
                      batch_size=4, encoder="mobilenetv2", encoder_weights=str(npz), learning_rate=1e-9,
                      warmup_epochs=0)
    last = keras.saving.load_model(Path(train_unet(cfg)).with_name("last.keras"), compile=False)
    # With a learning rate of 1e-9 the encoder's kernels are still the pretrained ones after an epoch.
    np.testing.assert_allclose(np.asarray(last.get_layer("block_3_expand").kernel),
                               weights["block_3_expand/kernel"], atol=1e-5)
