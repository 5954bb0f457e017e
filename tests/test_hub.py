"""load_hub: local SavedModels, the TFHUB_CACHE_DIR layout, and a fast clear error when offline."""

from __future__ import annotations

import hashlib
import shutil
import time

import numpy as np
import pytest

from pipelines import registry
from pipelines.hub import ModelUnavailable, _endpoint, _reachable, cache_dir, cached_path, load_hub
from pipelines.instances import Detector, coco_labels, detect_image
from tests.test_instances_blobmodel import blob_image, blob_model_dir

tf = pytest.importorskip("tensorflow")
hub = pytest.importorskip("tensorflow_hub")

REFERENCE = "https://www.kaggle.com/models/tensorflow/mask-rcnn-inception-resnet-v2/tensorFlow2/1024x1024/1"


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    d = tmp_path / "tfhub_cache"
    d.mkdir()
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(d))
    return d


def test_local_directory_loads_with_signature(tmp_path_factory):
    obj = load_hub(blob_model_dir(tmp_path_factory))
    assert "serving_default" in obj.signatures
    out = Detector(obj, "blob")(blob_image(40, 50, [("rect", 5, 5, 20, 20, (200, 30, 30))]))
    assert len(out.scores) == 1 and out.classes.tolist() == [1]


def test_cache_layout_is_tensorflow_hubs(empty_cache):
    from tensorflow_hub import compressed_module_resolver

    expected = empty_cache / hashlib.sha1(REFERENCE.encode()).hexdigest()
    assert cache_dir() == empty_cache
    assert cached_path(REFERENCE) == expected
    assert compressed_module_resolver._module_dir(REFERENCE) == str(expected)  # what hub.load will read


def test_cached_handle_loads_without_network(tmp_path_factory, empty_cache, monkeypatch):
    handle = "https://www.kaggle.com/models/tileseg/blobs/tensorFlow2/test/1"
    shutil.copytree(blob_model_dir(tmp_path_factory), cached_path(handle))

    def no_network(*a, **k):
        raise AssertionError("a cached model must not touch the network")

    monkeypatch.setattr("pipelines.hub._reachable", no_network)
    monkeypatch.setattr("socket.create_connection", no_network)
    obj = load_hub(handle)
    assert Detector(obj, handle)(np.zeros((16, 16, 3), np.uint8)).scores.size == 0


def test_reference_handle_offline_fails_fast_with_instructions(empty_cache):
    host, port = _endpoint(REFERENCE)
    if _reachable(host, port, timeout=2.0) is None:
        pytest.skip(f"{host} is reachable here; this test needs it offline")
    t0 = time.monotonic()
    with pytest.raises(ModelUnavailable) as err:
        load_hub(REFERENCE, connect_timeout=2.0)
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert REFERENCE in msg
    assert str(empty_cache / hashlib.sha1(REFERENCE.encode()).hexdigest()) in msg
    assert "TFHUB_CACHE_DIR" in msg and "source" in msg
    assert isinstance(err.value, RuntimeError)
    assert list(empty_cache.iterdir()) == []  # no half-written lock or temp folder left behind


def test_unresolvable_host_fails_fast(empty_cache):
    t0 = time.monotonic()
    with pytest.raises(ModelUnavailable, match="cannot be downloaded"):
        load_hub("https://tileseg-test.invalid/models/x/1", connect_timeout=1.0)  # .invalid never resolves
    assert time.monotonic() - t0 < 5


def test_hanging_network_is_cut_off_by_the_timeout(empty_cache, monkeypatch):
    def hang(*a, **k):  # a resolver or firewall that never answers
        time.sleep(3)
        raise OSError("gave up")

    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("pipelines.hub.socket.create_connection", hang)
    t0 = time.monotonic()
    with pytest.raises(ModelUnavailable, match="no answer from www.kaggle.com:443 within 0.5 s"):
        load_hub(REFERENCE, connect_timeout=0.5)
    assert time.monotonic() - t0 < 2


def test_bad_local_paths(tmp_path):
    with pytest.raises(ModelUnavailable, match="does not exist"):
        load_hub(tmp_path / "missing")
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ModelUnavailable, match="saved_model.pb"):
        load_hub(tmp_path / "notamodel")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(ModelUnavailable, match="cannot load"):
        load_hub(tmp_path / "broken")


def test_shipped_maskrcnn_spec(empty_cache, monkeypatch):
    spec = registry.get_spec("maskrcnn-coco")
    assert spec.kind == "instance" and spec.source_format == "hub" and spec.source == REFERENCE
    assert {c.id: c.name for c in spec.classes} == coco_labels()
    monkeypatch.setattr("pipelines.hub._reachable", lambda *a, **k: "offline (test)")
    registry.clear_cache()
    with pytest.raises(ModelUnavailable, match="offline"):
        registry.load(spec)


def test_registry_loads_instance_models_through_load_hub(tmp_path, tmp_path_factory, monkeypatch):
    d = tmp_path / "models" / "blobs"
    d.mkdir(parents=True)
    shutil.copytree(blob_model_dir(tmp_path_factory), d / "saved")
    (d / "spec.json").write_text(
        '{"name": "blobs", "kind": "instance", "source": "saved", "source_format": "savedmodel",'
        ' "classes": [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}], "score_threshold": 0.5}'
    )
    monkeypatch.setenv("TILESEG_MODEL_DIRS", str(tmp_path / "models"))
    registry.clear_cache()
    try:
        model = registry.load("blobs")
        assert isinstance(model.raw, Detector)
        found = detect_image(model, blob_image(64, 64, [("disk", 30, 30, 10, (30, 220, 30))]))
        assert [i.class_id for i in found] == [2]
    finally:
        registry.clear_cache()
