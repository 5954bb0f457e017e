"""``tileseg train pseudo-label --instance-model`` and instance ``eval --tta`` with the shipped models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

from core.cli import main  # noqa: E402
from tests.test_train import make_pets_folder, pick_names  # noqa: E402

UNLABELED = Path(__file__).resolve().parents[2] / "shared" / "data" / "oxford_pets_unlabeled"


def test_instance_pseudo_labels_from_the_shipped_teachers(tmp_path):
    if not (UNLABELED / "annotations" / "trainval.txt").is_file():
        pytest.skip("oxford_pets_unlabeled not available")
    lines = [ln for ln in (UNLABELED / "annotations" / "trainval.txt").read_text().splitlines()
             if ln.split()[0] in ("Maine_Coon_1", "pomeranian_100", "havanese_10", "german_shorthaired_10")]
    src = tmp_path / "u"
    (src / "images").mkdir(parents=True)
    (src / "annotations").mkdir()
    for ln in lines:
        n = ln.split()[0]
        (src / "images" / f"{n}.jpg").symlink_to(UNLABELED / "images" / f"{n}.jpg")
    (src / "images" / "broken_1.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (src / "annotations" / "trainval.txt").write_text("".join(f"{ln}\n" for ln in [*lines, "broken_1 1 2 1"]))
    out = tmp_path / "inst"
    res = CliRunner().invoke(main, ["train", "pseudo-label", "--model", "unet-pets", "--instance-model",
                                    "maskrcnn-pets", "--data", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output.strip().splitlines()[-1])
    assert info["skipped"]["unreadable"] == 1
    assert info["images"] + sum(info["skipped"].values()) == len(lines) + 1
    assert info["images"] >= 2  # four photos of one clear pet each; both teachers agreed on all four (2026-11-26)
    kept = (out / "annotations" / "trainval.txt").read_text().splitlines()
    assert set(kept) <= set(lines) and len(kept) == info["images"]
    for ln in kept:
        t = np.asarray(Image.open(out / "trimaps" / f"{ln.split()[0]}.png"))
        assert set(np.unique(t)) == {1, 2}
        assert 0.05 < (t == 1).mean() < 0.95


def test_instance_eval_reports_and_overrides_tta(tmp_path):
    root = make_pets_folder(tmp_path / "d", pick_names(0, 2))
    runs = {}
    for flag in ("--tta", "--no-tta", None):
        args = ["eval", "--model", "maskrcnn-pets", "--data", str(root), "--json"] + ([flag] if flag else [])
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        runs[flag] = json.loads(res.output)
    assert runs["--tta"]["tta"] is True and runs["--no-tta"]["tta"] is False
    spec = json.loads((Path(__file__).resolve().parents[1] / "pipelines/models/maskrcnn-pets/spec.json").read_text())
    assert runs[None]["tta"] is (spec.get("tta") == "flip")
    assert runs[None]["mask_ap"] == runs["--tta" if runs[None]["tta"] else "--no-tta"]["mask_ap"]
