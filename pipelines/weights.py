"""Storage dtype of Keras model weights: float16 on disk, float32 in memory.

A U-Net's ``model.keras`` in float32 is about 4 bytes per parameter (17.7 MB for the 4.37 M-parameter
``unet-pets``). Stored in float16 it is half that, and every committed weights file stays in git history, so
exported models may be written in float16 (:func:`cast_model` before saving). The registry computes in
float32 whatever the file holds (:func:`cast_model` back after loading): the probabilities of a float16-stored
U-Net differ from the float32 ones by about 1e-4.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: Largest finite float16; a weight beyond it (a BatchNorm moving variance can be large) cannot be stored.
FLOAT16_MAX = float(np.finfo(np.float16).max)


def weight_dtypes(model: Any) -> set[str]:
    """The dtypes of ``model``'s variables, e.g. ``{"float32"}``."""
    return {str(np.dtype(v.dtype)) for v in model.weights}


def stored_as(name: str, array: np.ndarray, dtype: str) -> np.ndarray:
    """``array`` (the weight ``name``) in ``dtype``; floating arrays only, others unchanged. Raises
    ``ValueError`` when a float16 copy would overflow."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        return array
    if dtype == "float16":
        peak = float(np.abs(array).max()) if array.size else 0.0
        if not np.isfinite(peak) or peak > FLOAT16_MAX:
            raise ValueError(f"{name}: a weight of magnitude {peak:g} does not fit in float16")
    return array.astype(dtype)


def cast_model(model: Any, dtype: str) -> Any:
    """A copy of the Keras ``model`` whose layers with weights keep them (and compute) in ``dtype``.

    ``dtype`` is ``"float16"`` (to save compactly) or ``"float32"`` (to run). Layers without weights keep
    their own dtype policy. Returns ``model`` itself when every weight already has ``dtype``. Raises
    ``ValueError`` when a weight does not fit in float16.
    """
    import keras

    if dtype not in ("float16", "float32"):
        raise ValueError(f"weights are stored as float16 or float32, not {dtype!r}")
    if weight_dtypes(model) == {dtype}:
        return model
    weights = [stored_as(v.path, w, dtype) for v, w in zip(model.weights, model.get_weights(), strict=True)]

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        if layer.weights:
            config["dtype"] = dtype
        return layer.__class__.from_config(config)

    out = keras.models.clone_model(model, clone_function=clone)
    out.set_weights(weights)
    return out


def convert_file(src: str | Path, dst: str | Path, dtype: str) -> Path:
    """Write the Keras model file ``src`` again as ``dst`` with its weights stored in ``dtype``."""
    import keras

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cast_model(keras.saving.load_model(src, compile=False), dtype).save(dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.weights",
                                description="store a Keras model file's weights in another dtype")
    p.add_argument("src", help="a .keras file")
    p.add_argument("dst", help="the .keras file to write")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    a = p.parse_args(argv)
    print(convert_file(a.src, a.dst, a.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
