"""Model registry: specs found by name, models loaded once per process.

Built-in models live in ``pipelines/models/<name>/spec.json`` next to their weights. Users register their
own by dropping a folder with a ``spec.json`` (and a ``.keras`` file or SavedModel) into any directory
listed in ``TILESEG_MODEL_DIRS``; no code changes.

Loading imports TensorFlow, so it must happen in the worker process after fork (Celery prefork),
never in a parent: :func:`load` is called lazily from tasks and caches per process.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.spec import ModelSpec

__all__ = ["LoadedModel", "ModelNotFound", "builtin_dir", "default_for", "find_specs", "get_spec", "load"]

_BUILTIN = Path(__file__).parent / "models"


class ModelNotFound(LookupError):
    """No registered model has this name."""


def builtin_dir() -> Path:
    return _BUILTIN


def _search_dirs(extra: Iterable[str | Path] = ()) -> list[Path]:
    dirs = [Path(p) for p in extra]
    env = os.environ.get("TILESEG_MODEL_DIRS", "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs.append(_BUILTIN)
    return dirs


def find_specs(extra_dirs: Iterable[str | Path] = ()) -> dict[str, ModelSpec]:
    """Every spec under the search dirs, by name; earlier dirs win (users may shadow built-ins)."""
    specs: dict[str, ModelSpec] = {}
    for d in _search_dirs(extra_dirs):
        if not d.is_dir():
            continue
        for spec_file in sorted(d.glob("*/spec.json")) + sorted(d.glob("spec.json")):
            spec = ModelSpec.from_file(spec_file)
            specs.setdefault(spec.name, spec)
    return specs


def get_spec(name_or_path: str) -> ModelSpec:
    """The spec for a registered name, or for a path to a spec.json / model folder."""
    p = Path(name_or_path)
    if p.is_dir() and (p / "spec.json").is_file():
        return ModelSpec.from_file(p / "spec.json")
    if p.is_file() and p.name.endswith(".json"):
        return ModelSpec.from_file(p)
    specs = find_specs()
    if name_or_path not in specs:
        known = ", ".join(sorted(specs)) or "none"
        raise ModelNotFound(f"unknown model {name_or_path!r}; registered: {known}")
    return specs[name_or_path]


def default_for(input_kind: str) -> ModelSpec | None:
    """The registry's default model for an input kind (``photo``, ``geotiff``, ``dicom``)."""
    for spec in find_specs().values():
        if input_kind in spec.default_for:
            return spec
    return None


@dataclass
class LoadedModel:
    """A model ready to run.

    Semantic models: ``predict(x)`` takes ``(N, S, S, C) float32`` and returns ``(N, S, S, K) float32``
    class probabilities, with the spec's test-time augmentation applied; ``single`` is one plain forward
    pass (None: ``predict`` is one), through every ensemble member (``spec.members``) averaged; ``raw`` is
    the first Keras model (the spec's ``source``). Instance models: ``raw`` is the detection callable (see
    pipelines.instances) and ``foreground``, for specs with ``refine``, maps an ``(H, W, 3) uint8`` image to
    the refining model's ``(H, W) float32`` foreground probability.
    """

    spec: ModelSpec
    predict: Callable[[np.ndarray], np.ndarray]
    raw: Any = None
    single: Callable[[np.ndarray], np.ndarray] | None = None
    foreground: Callable[[np.ndarray], np.ndarray] | None = None

    def forward(self, tta: bool | None = None) -> Callable[[np.ndarray], np.ndarray]:
        """The batch predictor with flip TTA forced on (True), off (False) or as the spec says (None)."""
        if tta is None:
            return self.predict
        one = self.single or self.predict
        return flip_tta(one) if tta else one


def flip_tta(predict: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Test-time augmentation: mean of ``predict(x)`` and the un-flipped ``predict(flip_lr(x))``.

    Works on ``(N, S, S, C)`` batches -> ``(N, S, S, K)``; one model call on a doubled batch.
    """

    def tta(x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        y = predict(np.concatenate([x, x[:, :, ::-1]], axis=0))
        return 0.5 * (y[:n] + y[n:, :, ::-1])

    return tta


_cache: dict[tuple[str, str, str], LoadedModel] = {}
# Re-entrant: loading an instance model with `refine` loads its semantic model through load() too.
_lock = threading.RLock()


def _any_input_size(model: Any, spec: ModelSpec) -> Any:
    """``model`` itself when it takes any ``(H, W)``; else the same layers and weights re-wired on an
    ``(None, None, C)`` input, which works for fully convolutional models saved with a fixed input size.
    Raises ``ValueError`` for models that cannot (e.g. a Dense or Reshape layer fixes the size)."""
    import keras

    if tuple(model.input_shape[1:3]) == (None, None):
        return model
    try:
        clone = keras.models.clone_model(model, input_tensors=keras.Input((None, None, model.input_shape[-1])))
        clone.set_weights(model.get_weights())
        for edge in spec.tta_sizes:
            # A cheap check that every size really runs: the graph is built here, not on a worker's first item.
            out = clone.compute_output_shape((1, edge, edge, model.input_shape[-1]))
            if tuple(out[1:3]) != (edge, edge):
                raise ValueError(f"a {edge}x{edge} input gives a {out[1]}x{out[2]} output")
    except Exception as e:  # noqa: BLE001 - Keras raises many types for a graph that cannot re-wire
        raise ValueError(
            f"model {spec.name}: its spec's tta_sizes {spec.tta_sizes} need a model that takes any input size, "
            f"and this one is fixed at {model.input_shape[1]}x{model.input_shape[2]} ({e})"
        ) from e
    return clone


def _load_keras(path: str, spec: ModelSpec) -> Any:
    """A Keras model file ready to run: float32 weights (a file may store float16, pipelines.weights), and
    any input size when the spec's multi-scale TTA needs it."""
    import keras

    from pipelines.weights import cast_model

    model = cast_model(keras.saving.load_model(path, compile=False), "float32")
    return _any_input_size(model, spec) if spec.tta_sizes else model


def _load_semantic(spec: ModelSpec) -> LoadedModel:
    import tensorflow as tf

    if spec.source_format == "keras":
        models = [_load_keras(path, spec) for path in spec.resolve_sources()]
        model = models[0]
        if any(tuple(m.output_shape[-1:]) != tuple(model.output_shape[-1:]) for m in models):
            raise ValueError(f"model {spec.name}: its members do not all give {model.output_shape[-1]} classes")

        @tf.function(reduce_retracing=True)
        def _fn(x: tf.Tensor) -> tf.Tensor:
            if len(models) == 1:
                return model(x, training=False)
            return tf.add_n([m(x, training=False) for m in models]) / len(models)

    elif spec.source_format in ("savedmodel", "hub"):
        from pipelines.hub import load_hub

        obj = load_hub(spec.resolve_source())
        sig = obj.signatures["serving_default"] if hasattr(obj, "signatures") and obj.signatures else None

        def _fn(x: tf.Tensor) -> tf.Tensor:
            if sig is not None:
                out = sig(x)
                return next(iter(out.values()))
            return obj(x)

    else:  # pragma: no cover - guarded by the spec's Literal
        raise ValueError(spec.source_format)

    def predict(x: np.ndarray) -> np.ndarray:
        return np.asarray(_fn(tf.convert_to_tensor(x, dtype=tf.float32)), dtype=np.float32)

    raw = model if spec.source_format == "keras" else None
    served = flip_tta(predict) if spec.tta == "flip" else predict
    return LoadedModel(spec=spec, predict=served, raw=raw, single=predict)


def load(name_or_path: str | ModelSpec) -> LoadedModel:
    """Load (once per process) and return the model for a name, spec path or spec."""
    spec = name_or_path if isinstance(name_or_path, ModelSpec) else get_spec(name_or_path)
    # The whole spec is in the key: a copy with other settings (e.g. tta_sizes) is another model.
    key = (spec.name, str(spec.spec_path), spec.model_dump_json())
    with _lock:
        if key not in _cache:
            if spec.kind == "semantic":
                _cache[key] = _load_semantic(spec)
            else:
                from pipelines.instances import load_instance_model

                _cache[key] = load_instance_model(spec)
        return _cache[key]


def clear_cache() -> None:
    """Forget loaded models (tests; worker recycling does this by exiting)."""
    with _lock:
        _cache.clear()
