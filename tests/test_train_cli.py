"""``tileseg train unet`` through the main CLI group: a tiny real run that reports its epochs."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("tensorflow")

from click.testing import CliRunner  # noqa: E402

from core.cli import main  # noqa: E402
from tests.test_train import make_pets_folder, pick_names  # noqa: E402


@pytest.fixture
def restore_pipelines_level():
    logger = logging.getLogger("pipelines")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.mark.slow
def test_train_unet_logs_progress_under_main_group(tmp_path, caplog, restore_pipelines_level):
    # The main group configures the root logger at WARNING first; the epoch lines must still get through.
    root = make_pets_folder(tmp_path / "d", pick_names(4, 2))
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [
        "train", "unet", "--data", str(root), "--out", str(out), "--epochs", "1", "--size", "32",
        "--base-filters", "4", "--depth", "2", "--batch-size", "4",
    ])
    assert res.exit_code == 0, res.output
    assert f"best checkpoint: {out / 'best.keras'}" in res.output
    messages = [r.getMessage() for r in caplog.records if r.name == "pipelines.train"]
    assert any(m.startswith("train 4 images, val 2 images") for m in messages), messages
    assert any(m.startswith("epoch 1/1 ") and "val_mean_iou=" in m for m in messages), messages


def test_train_unet_refuses_encoder_weights_that_do_not_fit(tmp_path):
    """A weights file of another network is a clear error before any epoch, not a traceback or a silent
    random encoder."""
    import numpy as np

    root = make_pets_folder(tmp_path / "d", pick_names(4, 2))
    npz = tmp_path / "enc.npz"
    np.savez(npz, **{"Conv1/kernel": np.zeros((3, 3, 3, 16), np.float32)})  # MobileNetV2's Conv1 has 32 filters
    res = CliRunner().invoke(main, [
        "train", "unet", "--data", str(root), "--out", str(tmp_path / "run"), "--epochs", "1", "--size", "32",
        "--base-filters", "4", "--batch-size", "4", "--encoder", "mobilenetv2", "--encoder-weights", str(npz),
    ])
    assert res.exit_code != 0
    assert "Conv1/kernel" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run" / "last.keras").exists()
    res = CliRunner().invoke(main, [
        "train", "unet", "--data", str(root), "--out", str(tmp_path / "run2"), "--epochs", "1", "--size", "32",
        "--depth", "3", "--encoder", "mobilenetv2",
    ])
    assert res.exit_code != 0 and "depth 4" in res.output
