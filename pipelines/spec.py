"""Model specs: everything the service must know to feed a model and read its output.

A spec lives next to the weights as ``spec.json`` (see ``pipelines/models/*/spec.json``) or in a user's
model directory; ``pipelines.registry`` finds and loads them by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ClassSpec", "MaskRefinement", "ModelSpec", "Normalization", "TruthMap"]


class ClassSpec(BaseModel):
    """One output class: its id in the model output, a name and an RGB colour for overlays."""

    model_config = ConfigDict(extra="forbid")

    id: int = Field(ge=0, le=255)
    name: str
    color: tuple[int, int, int] = (255, 0, 0)


class Normalization(BaseModel):
    """How raw input values become model input (float32).

    - ``scale``: ``(x - offset) / scale`` per band with fixed numbers (e.g. uint8 photos: scale 255).
    - ``percentile``: per-band stretch between the ``low``/``high`` percentiles of the item, then [0, 1].
    - ``window``: CT-style window ``center``/``width`` in the input's units (HU), clipped to [0, 1].
    - ``fixed``: clip to ``[low, high]`` then map to [0, 1].
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["scale", "percentile", "window", "fixed"] = "scale"
    offset: float = 0.0
    scale: float = 255.0
    low: float = 2.0
    high: float = 98.0
    center: float = 40.0
    width: float = 400.0


class MaskRefinement(BaseModel):
    """Instance masks blended with a semantic model's foreground (a two-model ensemble).

    For each detection, the semantic model segments the detection's box grown by 10 % on every side (cut
    out of the image, so the object fills the frame as in that model's training photos), with its own
    mode, normalisation and TTA. Its foreground probability (the sum of the ``foreground`` classes) is
    averaged with the detection's mask probability reframed onto the image: ``(1 - weight) * mask + weight
    * foreground``, thresholded at 0.5. Pixels outside the box keep mask probability 0, so a detection
    never grows past its box; where the semantic model is sure there is no foreground, the mask shrinks.
    Class, score and box stay the detector's. Mask R-CNN's 28x28 box-relative masks are coarse at the
    contour; a full-resolution semantic model sharpens them there.
    """

    model_config = ConfigDict(extra="forbid")

    #: Semantic model: registered name, or a folder / spec.json (relative paths: next to this spec).
    model: str
    #: Its class names that count as foreground (summed).
    foreground: list[str] = Field(min_length=1)
    weight: float = Field(default=0.5, gt=0.0, lt=1.0)


class TruthMap(BaseModel):
    """How the ground truth of this model's own data stores its classes (Oxford trimaps write pet /
    background / outline as 1 / 2 / 3, SpaceNet building masks 0 / 255), used to score a job whose
    submission gives no ``truth_map`` of its own.

    ``values`` maps a stored value (a decimal string, as in JSON) to a class id, 255 meaning "not scored".
    Values not listed become class ``others``, or are not scored when it is None (and the item says so).
    """

    model_config = ConfigDict(extra="forbid")

    values: dict[str, int]
    others: int | None = None
    #: What truth this reads, for people: shown with the item's figures.
    reads: str = ""

    @model_validator(mode="after")
    def _check(self) -> TruthMap:
        if any(not k.isdigit() for k in self.values):
            raise ValueError("truth_map values: keys must be non-negative integers written as strings")
        return self

    def as_ints(self) -> dict[int, int]:
        return {int(k): v for k, v in self.values.items()}


class ModelSpec(BaseModel):
    """A registered model.

    Shapes: the model takes ``(N, input_size, input_size, channels) float32`` (semantic) or
    ``(1, H, W, 3) uint8`` (instance, TF2 Object Detection API signature) and, for semantic models,
    returns ``(N, input_size, input_size, len(classes))`` softmax probabilities.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    kind: Literal["semantic", "instance"]
    #: Where the weights are: a path relative to the spec file, an absolute path, or a TF Hub handle.
    source: str
    #: Format of ``source``: a Keras 3 ``.keras`` file, a SavedModel directory, or a TF Hub handle/URL.
    source_format: Literal["keras", "savedmodel", "hub"] = "keras"
    #: Semantic Keras models: more ``.keras`` files (paths as for ``source``) with the same classes, input and
    #: normalization, whose probabilities are averaged with those of ``source`` in every view: an ensemble,
    #: e.g. of training runs with different seeds. Each member costs one more model run per view.
    members: list[str] = []
    description: str = ""
    classes: list[ClassSpec]
    #: Index of the "nothing here" class (used for nodata pixels and for area fractions).
    background_class: int | None = None
    channels: int = 3
    #: 1-based band indices to read from multi-band rasters, in model order (None = first ``channels``).
    bands: list[int] | None = None
    normalization: Normalization = Normalization()
    #: Model input edge in pixels (square). Tiles are this size.
    input_size: int = Field(default=256, ge=8, le=4096)
    #: ``resize``: whole image resized to input_size (photos, as the reference does);
    #: ``tile``: sliding windows at native resolution, blended.
    mode: Literal["resize", "tile"] = "tile"
    overlap: int = Field(default=32, ge=0)
    batch_size: int = Field(default=8, ge=1, le=1024)
    blend: Literal["gaussian", "cosine", "constant"] = "gaussian"
    #: Test-time augmentation the service applies (twice the model compute). Semantic models: ``flip``
    #: averages the probabilities with those of the left-right mirrored input. Instance models: ``flip``
    #: runs the detector on the mirrored image too and fuses the two sets of detections
    #: (:func:`pipelines.instances.fuse_detections`).
    tta: Literal["none", "flip"] = "none"
    #: Semantic models in ``resize`` mode: more input edges (pixels) the photo is also resized to. The
    #: probabilities at ``input_size`` and at each of these sizes (each with the flip when ``tta`` is ``flip``)
    #: are averaged: multi-scale test-time augmentation, at the cost of one more model run per size. The
    #: model must accept any input size (a fully convolutional model saved with no fixed input shape).
    tta_sizes: list[int] = []
    #: Semantic models in ``resize`` mode: how an image is shrunk to the input sizes. ``antialias`` averages
    #: what each input pixel covers (:func:`pipelines.semantic.resize_photo`), so a photo many times the
    #: input size does not alias; ``bilinear`` samples two pixels per axis
    #: (:func:`pipelines.semantic.resize_bilinear`). Serve with the filter the model was trained with: a
    #: model trained on bilinear-halved slices loses its thin structures to the softer filter. Enlarging is
    #: bilinear either way.
    resize_filter: Literal["antialias", "bilinear"] = "antialias"
    #: Instance models with ``tta`` ``flip``: zoom-out views, each the image padded by this fraction of its
    #: height and width on every side (and its mirror); fused with the flip views for detections covering
    #: at least ``tta_zoom_min_area`` of the image only (:class:`pipelines.instances.Detector`).
    tta_zoom_out: list[float] = []
    tta_zoom_min_area: float = Field(default=0.25, ge=0.0, le=1.0)
    #: Instance models: the longest side, in pixels, of a view given to the detector's graph. A larger view
    #: is first shrunk to it with an antialiased filter (:func:`pipelines.semantic.resize_photo`): detector
    #: graphs resize by point sampling, which turns a large photo's fine detail into aliasing. Set it to the
    #: graph's input size times the largest downscale its training saw (320 for the 256 px Model Garden
    #: exports trained here, whose parser scaled photos by 0.8-1.25); within that range the graph's own
    #: resize is what the model learned from. None: views go in as they are.
    detector_size: int | None = Field(default=None, ge=8, le=8192)
    #: Ground resolution the model was trained at, metres per pixel (rasters at other resolutions are
    #: resampled before inference and results returned on the input grid). None: use native pixels.
    ground_resolution_m: float | None = None
    #: Input kinds this model is the default for (``photo``, ``geotiff``, ``dicom``).
    default_for: list[str] = []
    #: Instance models: score threshold and max detections.
    score_threshold: float = 0.5
    max_detections: int = 100
    #: Instance models: sharpen masks with a semantic model's foreground (see :class:`MaskRefinement`).
    refine: MaskRefinement | None = None
    #: Semantic models: how ground truth made for this model's data stores classes (see :class:`TruthMap`).
    truth_map: TruthMap | None = None
    #: Path of the spec file itself, set by the loader.
    spec_path: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        ids = [c.id for c in self.classes]
        if len(set(ids)) != len(ids):
            raise ValueError("class ids must be unique")
        if self.overlap * 2 >= self.input_size:
            raise ValueError("overlap must be less than half the input size")
        if self.bands is not None and len(self.bands) != self.channels:
            raise ValueError("bands must list exactly `channels` band indices")
        if self.refine is not None and self.kind != "instance":
            raise ValueError("refine applies to instance models only")
        if self.tta_zoom_out and (self.kind != "instance" or self.tta != "flip"):
            raise ValueError("tta_zoom_out applies to instance models with tta 'flip'")
        if any(not 0.0 < f <= 1.0 for f in self.tta_zoom_out):
            raise ValueError("tta_zoom_out fractions must be in (0, 1]")
        if self.members and (self.kind != "semantic" or self.source_format != "keras"):
            raise ValueError("members applies to semantic models in the keras format only")
        if self.tta_sizes and self.kind != "semantic":
            raise ValueError("tta_sizes applies to semantic models only")
        if any(not 8 <= t <= 4096 for t in self.tta_sizes) or len(set(self.tta_sizes)) != len(self.tta_sizes):
            raise ValueError("tta_sizes must be distinct input edges between 8 and 4096 pixels")
        if self.truth_map is not None:
            targets = [*self.truth_map.values.values(), self.truth_map.others]
            if any(t is not None and t != 255 and t not in ids for t in targets):
                raise ValueError(f"truth_map: class ids must be among the classes {sorted(ids)} (or 255)")
        return self

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def colors(self) -> list[tuple[int, int, int]]:
        return [c.color for c in self.classes]

    def names_by_id(self) -> list[str]:
        """Class names indexed by class id (ids may be sparse, e.g. COCO's 1..90)."""
        out = [f"class_{i}" for i in range(max(c.id for c in self.classes) + 1)]
        for c in self.classes:
            out[c.id] = c.name
        return out

    def colors_by_id(self) -> list[tuple[int, int, int]]:
        """Overlay colours indexed by class id."""
        out = [(128, 128, 128)] * (max(c.id for c in self.classes) + 1)
        for c in self.classes:
            out[c.id] = c.color
        return out

    def resolve_source(self, source: str | None = None) -> str:
        """Absolute location of the weights: ``source`` (default: the spec's own) with a relative path
        taken as next to the spec file."""
        source = self.source if source is None else source
        if self.source_format == "hub" and "://" in source:
            return source
        p = Path(source).expanduser()
        if not p.is_absolute() and self.spec_path is not None:
            p = self.spec_path.parent / p
        return str(p)

    def resolve_sources(self) -> list[str]:
        """Absolute locations of ``source`` and then of every ensemble member."""
        return [self.resolve_source(s) for s in [self.source, *self.members]]

    @classmethod
    def from_file(cls, path: str | Path) -> ModelSpec:
        path = Path(path)
        data = json.loads(path.read_text())
        data["spec_path"] = path.resolve()
        return cls.model_validate(data)

    def to_file(self, path: str | Path) -> None:
        data = self.model_dump(mode="json", exclude={"spec_path"})
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
