"""``tileseg train maskrcnn``: train tileseg's own Mask R-CNN (TensorFlow Model Garden) and export it.

Needs the ``[train]`` extra (``tf-models-official``); TensorFlow is imported inside the command only, so
``tileseg --help`` stays fast. The exported model runs through the instance runtime with plain TensorFlow.
"""

from __future__ import annotations

import json
import logging

import click

__all__ = ["maskrcnn"]


@click.command("maskrcnn")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="pets: a folder laid out like oxford_pets (images/, trimaps/, annotations/*.txt); "
                   "buildings: the shared data root (spacenet1_rio_buildings/, satellite_labeled/).")
@click.option("--dataset", default="pets", show_default=True, type=click.Choice(["pets", "buildings"]),
              help="buildings: one class, FPN levels 2-5 and anchors sized to 0.5 m houses, Rio tiles split "
                   "as the buildings-rgb model's (img53, img64 held out).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Run folder (config.json, ckpt/, history.csv); put it under runs/.")
@click.option("--steps", default=3000, show_default=True, type=click.IntRange(1), help="Total training steps.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
@click.option("--size", default=256, show_default=True, type=click.IntRange(64),
              help="Square training/serving canvas (px); a multiple of 2**max_level (64).")
@click.option("--backbone", default="mobilenetv2", show_default=True,
              type=click.Choice(["mobilenetv2", "resnet18"]), help="Trained from scratch (no downloads).")
@click.option("--lr", "learning_rate", default=1e-3, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Adam peak learning rate (linear warm-up, cosine decay).")
@click.option("--val-fraction", default=0.15, show_default=True, type=click.FloatRange(0.01, 0.9),
              help="Held-out share (the same names as `train unet` holds out).")
@click.option("--mosaic-prob", default=0.5, show_default=True, type=click.FloatRange(0, 1),
              help="pets: share of samples that are 2-4 pet mosaics.")
@click.option("--copy-paste-prob", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="pets: chance one more pet is cut out and pasted onto a sample.")
@click.option("--checkpoint-every", default=250, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--extra-train", "extra_train", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="pets: more training folders, e.g. from `train pseudo-label --instance-model` (their "
                   "annotation lines give the species); names in --data's validation split are never used.")
@click.option("--init-from", "init_from", type=click.Path(exists=True, file_okay=False),
              help="Start from an exported model folder's weights (e.g. pipelines/models/maskrcnn-pets) with a "
                   "fresh optimizer and learning-rate schedule; the architecture options must match.")
@click.option("--export", "export_dir", type=click.Path(file_okay=False),
              help="After training, write saved_model/, spec.json, metrics.json, training_curve.png here.")
@click.option("--name", default=None, help="Model name for --export [default: maskrcnn-<dataset>].")
@click.option("--no-eval", is_flag=True, help="With --export: skip the held-out COCO evaluation.")
def maskrcnn(export_dir: str | None, name: str | None, no_eval: bool, size: int, dataset: str, **kw) -> None:
    """Train a Mask R-CNN (Model Garden, backbone from scratch) on the pets' or the buildings' training split.

    With --resume and --steps no higher than the checkpoint's step, only exports.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("pipelines.maskrcnn").setLevel(logging.INFO)
    if size % 64:
        raise click.BadParameter("must be a multiple of 64 (the coarsest FPN level's stride)", param_hint="--size")
    try:
        from pipelines.maskrcnn import IncompatibleWeights, MaskRCNNConfig, export_run, train_maskrcnn
    except ImportError as e:  # pragma: no cover - depends on the install
        raise click.ClickException(f"{e}; install the training extra: pip install 'tileseg[train]'") from e
    from adapters.base import AdapterError

    kw["extra_train"] = list(kw["extra_train"])
    if dataset == "buildings":
        if kw.pop("extra_train"):
            raise click.BadParameter("only for --dataset pets", param_hint="--extra-train")
        kw.pop("mosaic_prob"), kw.pop("copy_paste_prob")
        cfg = MaskRCNNConfig.for_buildings(size=size, **kw)
    else:
        cfg = MaskRCNNConfig(size=size, **kw)
    name = name or f"maskrcnn-{dataset}"
    try:
        run = train_maskrcnn(cfg)
        click.echo(f"run folder: {run}")
        if export_dir:
            report = export_run(run, export_dir, name=name, evaluate=not no_eval)
            click.echo(json.dumps(report, indent=2))
    except (AdapterError, FileExistsError, FileNotFoundError, FloatingPointError, IncompatibleWeights) as e:
        raise click.ClickException(str(e)) from e


command = maskrcnn
