"""Pretrained encoder weights from a TensorFlow.js *layers* model, read without TensorFlow.js.

Model weights cannot be downloaded at run time here, but package registries are reachable at install time,
and some npm packages carry Keras models converted to TensorFlow.js. `nsfwjs` (MIT) carries a Keras 2.2.4
MobileNetV2 (alpha 1.0, 224 px) whose blocks 0-10 were frozen at the Keras ImageNet weights while its top was
fine-tuned; its weights are uint8-quantized per tensor. This module reads such a model's weights manifest and
binary shards into ``{"layer/variable": float32 array}`` and writes them as an ``.npz`` that
:func:`pipelines.unet.build_unet` loads into a matching encoder by layer name.

Two on-disk shapes are read: the converter's own (``model.json`` + ``*.bin`` shards) and the packaging
nsfwjs uses (``model.min.js`` + ``group1-shardNofM.min.js``: JavaScript modules that hold the JSON as an
object literal and each shard as a base64 string).

Usage::

    npm pack nsfwjs@4.3.0 && tar xzf nsfwjs-4.3.0.tgz
    python -m pipelines.pretrained package/dist/models/mobilenet_v2 --out mobilenet_v2.npz
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["TfjsWeight", "dequantize", "read_manifest", "read_tfjs_weights", "save_npz"]

_DTYPES = {"float32": np.float32, "int32": np.int32, "uint8": np.uint8, "uint16": np.uint16,
           "float16": np.float16}


@dataclass(frozen=True)
class TfjsWeight:
    """One entry of a TensorFlow.js weights manifest: where its bytes are and how to decode them."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    #: Storage dtype when quantized (``uint8``, ``uint16`` or ``float16``), else ``None``.
    quant_dtype: str | None = None
    quant_min: float | None = None
    quant_scale: float | None = None

    @property
    def nbytes(self) -> int:
        stored = self.quant_dtype or self.dtype
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(_DTYPES[stored]).itemsize


def dequantize(raw: np.ndarray, w: TfjsWeight) -> np.ndarray:
    """Stored values -> ``float32`` of ``w.shape``. Affine uint8/uint16: ``q * scale + min`` (the
    TensorFlow.js converter's scheme); float16 is widened; unquantized values are reinterpreted."""
    if w.quant_dtype in ("uint8", "uint16"):
        if w.quant_scale is None or w.quant_min is None:
            raise ValueError(f"{w.name}: affine quantization without min/scale")
        values = raw.astype(np.float32) * np.float32(w.quant_scale) + np.float32(w.quant_min)
    else:
        values = raw.astype(np.float32)
    return values.reshape(w.shape)


def _weights_of(manifest: list[dict]) -> list[TfjsWeight]:
    out = []
    for group in manifest:
        for e in group["weights"]:
            q = e.get("quantization") or {}
            out.append(TfjsWeight(name=e["name"], shape=tuple(int(s) for s in e["shape"]), dtype=e["dtype"],
                                  quant_dtype=q.get("dtype"), quant_min=q.get("min"), quant_scale=q.get("scale")))
    return out


# The manifest inside a model.min.js object literal: `weightsManifest:[{paths:[...],weights:[...]}]`.
_JS_ENTRY = re.compile(
    r'\{name:"(?P<name>[^"]+)",shape:\[(?P<shape>[0-9,]*)\],dtype:"(?P<dtype>\w+)"'
    r'(?:,quantization:\{(?P<q>[^}]*)\})?\}'
)
_JS_NUM = re.compile(r'(\w+):(?:"(\w+)"|([-+0-9.eE]+))')


def read_manifest(model_file: str | Path) -> list[TfjsWeight]:
    """The weight entries of ``model.json`` or of a ``model.min.js`` module, in storage order."""
    text = Path(model_file).read_text(encoding="utf-8")
    if Path(model_file).suffix == ".json":
        return _weights_of(json.loads(text)["weightsManifest"])
    start = text.find("weightsManifest:")
    if start < 0:
        raise ValueError(f"{model_file}: no weightsManifest in this module")
    out = []
    for m in _JS_ENTRY.finditer(text, start):
        q = {k: (s if s else float(n)) for k, s, n in _JS_NUM.findall(m.group("q") or "")}
        out.append(TfjsWeight(name=m.group("name"), shape=tuple(int(s) for s in m.group("shape").split(",") if s),
                              dtype=m.group("dtype"), quant_dtype=q.get("dtype"), quant_min=q.get("min"),
                              quant_scale=q.get("scale")))
    if not out:
        raise ValueError(f"{model_file}: weightsManifest lists no weights this reader understands")
    return out


def _shard_bytes(path: Path) -> bytes:
    if path.suffix == ".bin":
        return path.read_bytes()
    # A shard module holds one long base64 string literal.
    literals = re.findall(r'"([A-Za-z0-9+/=]{64,})"', path.read_text(encoding="ascii"))
    if len(literals) != 1:
        raise ValueError(f"{path}: expected one base64 string, found {len(literals)}")
    return base64.b64decode(literals[0])


def _shard_key(path: Path) -> tuple[int, str]:
    m = re.search(r"shard(\d+)of\d+", path.name)
    return (int(m.group(1)) if m else 0, path.name)


def read_tfjs_weights(model_dir: str | Path) -> dict[str, np.ndarray]:
    """``{"layer/variable": float32 array}`` of the TensorFlow.js model in ``model_dir``.

    Raises ``ValueError`` when the shards hold fewer or more bytes than the manifest describes (a
    truncated or mismatched download), so a half-read encoder never reaches training.
    """
    d = Path(model_dir)
    model_file = d / "model.json" if (d / "model.json").exists() else d / "model.min.js"
    entries = read_manifest(model_file)
    shards = sorted([p for p in d.iterdir() if re.search(r"shard\d+of\d+", p.name)], key=_shard_key)
    if not shards:
        raise ValueError(f"{d}: no weight shards (group1-shard1ofN.bin or .min.js)")
    blob = b"".join(_shard_bytes(p) for p in shards)
    need = sum(w.nbytes for w in entries)
    if len(blob) != need:
        raise ValueError(f"{d}: shards hold {len(blob)} bytes, the manifest describes {need}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for w in entries:
        stored = np.dtype(_DTYPES[w.quant_dtype or w.dtype])
        raw = np.frombuffer(blob, dtype=stored, count=w.nbytes // stored.itemsize, offset=offset)
        out[w.name] = dequantize(raw, w)
        offset += w.nbytes
    return out


def save_npz(weights: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write ``weights`` as a compressed ``.npz`` (keys are the ``layer/variable`` names)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **weights)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="Folder with model.json or model.min.js and its weight shards.")
    p.add_argument("--out", required=True, help="The .npz to write.")
    a = p.parse_args(argv)
    try:
        w = read_tfjs_weights(a.model_dir)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_npz(w, a.out)
    n = sum(v.size for v in w.values())
    print(f"{len(w)} tensors, {n:,} values -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
