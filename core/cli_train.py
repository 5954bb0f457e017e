"""``tileseg train unet`` and ``tileseg eval``: click commands the main CLI group registers.

TensorFlow is imported inside the commands only, so ``tileseg --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

__all__ = ["eval_command", "train"]

train = click.Group("train", help="Train models.")


@train.command("unet")
@click.option("--data", "data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder laid out like oxford_pets (images/, trimaps/, annotations/*.txt).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Run folder (checkpoints, logs).")
@click.option("--epochs", default=150, show_default=True, type=click.IntRange(1))
@click.option("--size", default=128, show_default=True, type=click.IntRange(16),
              help="Training input edge (px).")
@click.option("--base-filters", default=16, show_default=True, type=click.IntRange(1))
@click.option("--depth", default=4, show_default=True, type=click.IntRange(1, 7))
@click.option("--norm", default="batch", show_default=True, type=click.Choice(["batch", "group", "none"]))
@click.option("--dropout", default=0.1, show_default=True, type=click.FloatRange(0, 0.9))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--val-fraction", default=0.15, show_default=True, type=click.FloatRange(0.01, 0.9))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--lr", "learning_rate", default=2e-3, show_default=True,
              type=click.FloatRange(0, min_open=True))
@click.option("--warmup-epochs", default=3, show_default=True, type=click.IntRange(0),
              help="Epochs of linear learning-rate warm-up before the cosine decay.")
@click.option("--dice-weight", default=1.0, show_default=True, type=click.FloatRange(0))
@click.option("--lowres", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Probability that a training crop is resampled through 40-100 % of its edge and back, "
                   "so the model also learns soft, upscaled or small photos.")
@click.option("--patience", default=40, show_default=True, type=click.IntRange(1),
              help="Early stopping: epochs without a better val mean IoU.")
@click.option("--extra-train", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="More training folders (e.g. pseudo-labels); trimap value 0 = ignored pixel.")
@click.option("--init-from", type=click.Path(exists=True, dir_okay=False), help="Start from these weights.")
@click.option("--encoder", default="conv", show_default=True, type=click.Choice(["conv", "mobilenetv2"]),
              help="conv: the reference U-Net's encoder; mobilenetv2: a MobileNetV2 encoder (stride 16).")
@click.option("--encoder-weights", type=click.Path(exists=True, dir_okay=False),
              help="Pretrained encoder weights (.npz from `python -m pipelines.pretrained`).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--export", "export_dir", type=click.Path(file_okay=False),
              help="After training, write model.keras + spec.json + metrics here (a registry model folder).")
@click.option("--name", default="unet-pets", show_default=True, help="Model name for --export.")
def train_unet_command(export_dir: str | None, name: str, **kw) -> None:
    """Train a semantic U-Net on DIR with a deterministic held-out validation split."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Under the main `tileseg` group the root logger is already configured at WARNING, which makes the
    # basicConfig above a no-op; the per-epoch progress lines must still reach the console.
    logging.getLogger("pipelines").setLevel(logging.INFO)
    from adapters.base import AdapterError
    from pipelines.train import TrainConfig, train_unet

    kw["extra_train"] = list(kw["extra_train"])
    cfg = TrainConfig(**kw)
    try:
        best = train_unet(cfg)
    except (AdapterError, FileExistsError, ValueError) as e:  # ValueError: an encoder that does not fit
        raise click.ClickException(str(e)) from e
    click.echo(f"best checkpoint: {best}")
    if export_dir:
        from pipelines.evaluate import export_model

        spec = export_model(best, export_dir, name=name, input_size=cfg.size, class_names=cfg.class_names)
        click.echo(f"exported {spec.name} to {export_dir}")


@train.command("pseudo-label")
@click.option("--model", "model", required=True, help="Teacher: registered name, model folder or .keras file.")
@click.option("--data", "data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Unlabeled folder (images/, annotations/*.txt).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Where to write the pseudo-labeled folder (use it with train unet --extra-train).")
@click.option("--threshold", default=0.9, show_default=True, type=click.FloatRange(0, 1),
              help="Pixels whose top probability is lower are left unlabeled (ignored in training).")
@click.option("--tta/--no-tta", default=True, show_default=True,
              help="Average with the flipped image, and at the spec's tta_sizes in resize mode.")
@click.option("--mode", type=click.Choice(["resize", "tile"]), default=None)
@click.option("--instance-model", default=None,
              help="Write one-object instance labels for `train maskrcnn --extra-train` instead: the semantic "
                   "teacher's foreground where this instance model's best detection agrees with it.")
@click.option("--min-agreement", default=0.7, show_default=True, type=click.FloatRange(0, 1),
              help="With --instance-model: least mask IoU between the two teachers; other photos are left out.")
def pseudo_label_command(model: str, data: str, out: str, threshold: float, tta: bool, mode: str | None,
                         instance_model: str | None, min_agreement: float) -> None:
    """Self-training: label an unlabeled folder with a teacher model's confident pixels.

    The annotation lines of DATA (e.g. oxford_pets' species and breed) are copied to OUT.
    """
    from adapters.base import AdapterError
    from pipelines.evaluate import make_predictor, resolve_model
    from pipelines.registry import ModelNotFound, load
    from pipelines.train import pseudo_label, pseudo_label_instances

    try:
        teacher = load(resolve_model(model))
        predictor = make_predictor(teacher, mode=mode, tta=tta)
        if instance_model:
            from pipelines.instances import InstanceModelError, detect_image, rle_decode

            if teacher.spec.background_class is None:
                raise click.ClickException(f"{model}: its spec names no background_class, so no foreground")
            detector = load(resolve_model(instance_model))

            def best_mask(rgb):
                # The detector's own mask: a refined one would already contain the semantic teacher.
                found = detect_image(detector, rgb, score_threshold=0.0, max_detections=1, refine=False)
                return rle_decode(found[0].rle).astype(bool) if found else None

            try:
                info = pseudo_label_instances(predictor, best_mask, data, out, min_agreement=min_agreement,
                                              background_index=teacher.spec.background_class)
            except InstanceModelError as e:
                raise click.ClickException(str(e)) from e
        else:
            info = pseudo_label(predictor, data, out, threshold=threshold)
    except (AdapterError, ModelNotFound) as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(info))


@click.command("eval")
@click.option("--model", "model", required=True, help="Registered model name, model folder or spec.json.")
@click.option("--data", "data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder laid out like oxford_pets.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--split", type=click.Choice(["val", "test", "all"]), default="all", show_default=True,
              help="'val': only the deterministic held-out names (as in training).")
@click.option("--val-fraction", default=0.15, show_default=True, type=click.FloatRange(0.01, 0.9))
@click.option("--mode", type=click.Choice(["resize", "tile"]), default=None,
              help="Inference mode (default: the model spec's).")
@click.option("--tta/--no-tta", default=None,
              help="Test-time augmentation: the flip, plus the spec's tta_sizes (semantic, resize mode) or "
                   "tta_zoom_out views (instance) [default: as the model spec says; --no-tta: one pass].")
@click.option("--label-offset", default=1, show_default=True, type=int,
              help="class id = trimap value - offset.")
@click.option("--refine/--no-refine", default=None,
              help="Instance models: blend masks with the spec's semantic model [default: as the spec's "
                   "`refine` says].")
@click.option("--square", type=click.IntRange(8, 4096), default=None,
              help="Semantic models on oxford_pets folders: resize each photo and trimap to N x N first (the "
                   "protocol of notebooks that score at e.g. 128x128) [default: each trimap's own size].")
@click.option("--through", type=click.IntRange(8, 4096), default=None,
              help="Semantic models on oxford_pets folders: resize each photo to N x N and back to its own size "
                   "before predicting, scored against the untouched trimap: how much a photo that lost detail "
                   "(small, upscaled, soft) costs.")
@click.option("--tta-sizes", "tta_sizes", default=None, metavar="EDGES",
              help="Semantic models in resize mode: the multi-scale sizes to use instead of the spec's, e.g. "
                   "'144,240,288' ('none': the input size only) [default: the spec's tta_sizes].")
@click.option("--baseline", "baseline", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Semantic models on oxford_pets folders: a JSON report of an earlier eval of the same images "
                   "(--json > FILE); adds the paired 95 % bootstrap interval of this model's difference to it.")
def eval_command(model: str, data: str, as_json: bool, split: str, val_fraction: float, mode: str | None,
                 tta: bool | None, label_offset: int, refine: bool | None, square: int | None,
                 through: int | None, tta_sizes: str | None, baseline: str | None) -> None:
    """Score a model on a labeled folder.

    Layouts: oxford_pets (images/, trimaps/, annotations/); spacenet1_rio_buildings (images/*.tif,
    masks/*.tif 0/255); medical_ct_totalsegmentator (dicom_ct/*.dcm, png/labels/*.png). Semantic models:
    pixel accuracy, mean IoU, per-class Dice and IoU. Instance models: COCO mask AP, AP50, AP75 and box AP
    (pycocotools). --split test/val on the two domain layouts: the tiles/slices the shipped domain models
    hold out (test) or validated on (val); all: every image in the folder. Semantic models on oxford_pets
    folders also report a 95 % bootstrap interval over images and each image's scores (--json), worst first.
    """
    from adapters.base import AdapterError
    from pipelines.evaluate import evaluate_folder, resolve_model
    from pipelines.registry import ModelNotFound

    try:
        spec = resolve_model(model)
    except (ModelNotFound, ValueError) as e:
        raise click.ClickException(str(e)) from e
    sizes = _parse_sizes(tta_sizes)
    layout = _layout(Path(data))
    for value, hint in ((sizes, "--tta-sizes"), (baseline, "--baseline")):
        if value is not None and (layout != "pets" or spec.kind != "semantic"):
            raise click.BadParameter("applies to semantic models on oxford_pets folders only", param_hint=hint)
    base_report = None
    if baseline is not None:
        try:
            base_report = json.loads(Path(baseline).read_text())
        except (OSError, ValueError) as e:
            raise click.BadParameter(f"{baseline}: not a JSON report ({e})", param_hint="--baseline") from e
    if layout != "pets":
        if square or through:
            raise click.BadParameter("applies to oxford_pets folders only",
                                     param_hint="--square" if square else "--through")
        _eval_domain(spec, Path(data), layout, split, as_json)
        return
    if split == "test":
        raise click.BadParameter("oxford_pets folders have no test split here: use val or all",
                                 param_hint="--split")
    if spec.kind == "instance":
        if square or through:
            raise click.BadParameter("scores instance models at the photos' own size only",
                                     param_hint="--square" if square else "--through")
        _eval_instances(spec, data, as_json, split, val_fraction, tta, refine)
        return
    try:
        report = evaluate_folder(model, data, split=split, val_fraction=val_fraction, mode=mode, tta=tta,
                                 label_offset=label_offset, square=square, through=through, tta_sizes=sizes)
    except (AdapterError, ModelNotFound, ValueError) as e:
        raise click.ClickException(str(e)) from e
    _warn_unscored(report.get("missing", []), report.get("errors", []))
    if base_report is not None:
        from pipelines.evaluate import compare_reports

        try:
            report["versus_baseline"] = {"baseline": str(baseline), **compare_reports(base_report, report)}
        except ValueError as e:
            raise click.ClickException(f"--baseline {baseline}: {e}") from e
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    at = f"  at {square}x{square}" if square else ""
    at += f"  photos through {through}x{through}" if through else ""
    click.echo(f"model {report['model']}  mode {report['mode']}  split {report['split']}  "
               f"images {report['images']}  pixels {report['pixels']}{at}")
    click.echo(f"pixel accuracy {report['pixel_accuracy']:.4f}   mean IoU {report['mean_iou']:.4f}")
    ci = report["intervals"]
    if ci["pixel_accuracy"][0] is not None:
        click.echo(f"{ci['level']:.0%} bootstrap interval over {ci['items']} images: pixel accuracy "
                   f"{ci['pixel_accuracy'][0]:.4f}-{ci['pixel_accuracy'][1]:.4f}   mean IoU "
                   f"{ci['mean_iou'][0]:.4f}-{ci['mean_iou'][1]:.4f}")
    click.echo(f"{'class':<14}{'dice':>8}{'iou':>8}")
    for cname, s in report["per_class"].items():
        click.echo(f"{cname:<14}{s['dice']:>8.4f}{s['iou']:>8.4f}")
    worst = [r for r in report["per_image"] if r["pixel_accuracy"] is not None][:5]
    if worst:
        click.echo("lowest pixel accuracy: " + ", ".join(f"{r['name']} {r['pixel_accuracy']:.3f}" for r in worst))
    vs = report.get("versus_baseline")
    if vs:
        parts = []
        for key, label in (("pixel_accuracy", "pixel accuracy"), ("mean_iou", "mean IoU")):
            d, (lo, hi) = vs[key]["difference"], vs[key]["interval"]
            if d is not None and lo is not None:
                parts.append(f"{label} {d:+.4f} ({lo:+.4f} to {hi:+.4f})")
        click.echo(f"versus {vs['baseline_model']} ({vs['baseline']}), paired {vs['level']:.0%} interval: "
                   + "   ".join(parts))


def _warn_unscored(missing: list[str], errors: list[dict[str, str]]) -> None:
    """Name on stderr what was listed but not scored (the JSON report holds every name)."""
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        click.echo(f"warning: skipped {len(missing)} listed names with missing files: "
                   f"{', '.join(missing[:5])}{more}", err=True)
    for e in errors[:10]:
        click.echo(f"warning: not scored: {e['error']}", err=True)
    if len(errors) > 10:
        click.echo(f"warning: {len(errors) - 10} more images not scored (see --json)", err=True)


def _parse_sizes(text: str | None) -> list[int] | None:
    """``--tta-sizes``: None (the spec's), ``[]`` for 'none', else the comma-separated edges."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return []
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        sizes = []
    if not sizes:
        raise click.BadParameter(f"{text!r}: give edges in pixels like 144,240 or 'none'", param_hint="--tta-sizes")
    return sizes  # ranges and repeats are checked like a spec file's (pipelines.spec.ModelSpec)


def _layout(folder: Path) -> str:
    if (folder / "trimaps").is_dir() or (folder / "annotations").is_dir():
        return "pets"
    if (folder / "images").is_dir() and (folder / "masks").is_dir():
        return "buildings"
    if (folder / "dicom_ct").is_dir():
        return "ct"
    raise click.BadParameter(f"{folder}: not a known layout (oxford_pets: images/ + trimaps/; buildings: "
                             "images/ + masks/; CT: dicom_ct/ + png/labels/). Any folder of images with one of "
                             "labels is scored through the service: tileseg run IMAGES/ --truth LABELS/ "
                             "(pixel accuracy, mean IoU and per-class Dice/IoU per item and job)", param_hint="--data")


def _eval_domain(spec, folder: Path, layout: str, split: str, as_json: bool) -> None:  # noqa: ANN001
    from adapters.base import AdapterError
    from pipelines import domains

    if layout == "buildings":
        names = (sorted(p.stem for p in (folder / "images").glob("*.tif")) if split == "all"
                 else list(domains.RIO_SPLIT[split]))
    else:
        names = (sorted(p.stem for p in (folder / "dicom_ct").glob("*.dcm")) if split == "all"
                 else list(domains.CT_SPLIT[split]))
    try:
        if spec.kind == "instance":
            if layout != "buildings":
                raise click.ClickException("instance models are evaluated on buildings or pets folders")
            from pipelines.building_instances import evaluate_building_scenes, scenes_from_folder
            from pipelines.registry import load

            metrics = evaluate_building_scenes(load(spec), scenes_from_folder(folder, names))
            report = {"model": spec.name, "kind": "instance", "layout": layout, "split": split,
                      "names": names, **metrics}
        elif layout == "buildings":
            report = {"model": spec.name, "layout": layout, "split": split, "names": names,
                      **domains.evaluate_buildings(spec.name if spec.spec_path is None else spec.spec_path.parent,
                                                   names, folder=folder)}
        else:
            report = {"model": spec.name, "layout": layout, "split": split, "names": names,
                      **domains.evaluate_ct(spec.name if spec.spec_path is None else spec.spec_path.parent,
                                            names, folder=folder)}
    except (AdapterError, ValueError, RuntimeError) as e:
        raise click.ClickException(str(e)) from e
    _warn_unscored([], report.get("errors", []))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"model {spec.name}  layout {layout}  split {split}  images {report.get('images', len(names))} "
               f"of {len(names)} listed")
    if spec.kind == "instance":
        for k in ("mask_ap", "mask_ap50", "mask_ap75", "box_ap", "box_ap50", "box_ap75"):
            v = report.get(k)
            click.echo(f"{k:<12}{'-' if v is None else f'{v:.4f}'}")
        return
    click.echo(f"pixel accuracy {report['pixel_accuracy']:.4f}   mean IoU {report['mean_iou']:.4f}")
    click.echo(f"{'class':<14}{'dice':>8}{'iou':>8}")
    for c in report["per_class"]:
        dice, iou = ("-" if c[k] is None else f"{c[k]:.4f}" for k in ("dice", "iou"))
        click.echo(f"{c['name']:<14}{dice:>8}{iou:>8}")


def _eval_instances(spec, data: str, as_json: bool, split: str, val_fraction: float,  # noqa: ANN001
                    tta: bool | None, refine: bool | None) -> None:
    from pipelines.instance_eval import evaluate_folder as evaluate_instances
    from pipelines.registry import load
    from pipelines.train import is_validation, list_names

    names = list_names(data)
    if split == "val":
        names = [n for n in names if is_validation(n, val_fraction)]
    try:
        metrics = evaluate_instances(load(spec), data, names=names, tta=tta, refine=refine)
    except (ValueError, RuntimeError) as e:
        raise click.ClickException(str(e)) from e
    report = {"model": spec.name, "kind": "instance", "split": split, "listed": len(names),
              "tta": spec.tta == "flip" if tta is None else tta,
              "refine": None if spec.refine is None or refine is False else spec.refine.model_dump(),
              **metrics.to_json()}
    _warn_unscored([], metrics.errors)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"model {spec.name}  split {split}  images {metrics.images} of {len(names)} listed")
    for k, v in metrics.to_json().items():
        if k != "errors":
            click.echo(f"{k:<12}{'-' if v is None else f'{v:.4f}'}")


if __name__ == "__main__":  # ``python -m core.cli_train unet ...`` before the main CLI registers these
    sys.exit(train())
