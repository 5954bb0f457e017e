"""``tileseg train buildings`` and ``tileseg train ct-organs``: train, export and evaluate the domain models.

Register with the ``train`` group of :mod:`core.cli_train` (``train.add_command(buildings_command)``...), or
run directly: ``python -m core.cli_domains buildings --out runs/buildings-r1 --export pipelines/models/buildings-rgb``.
TensorFlow is imported inside the commands only.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from pathlib import Path

import click

__all__ = ["buildings_command", "card_command", "ct_organs_command", "export_command", "domains", "write_model_card"]


def _common(f):
    for opt in reversed([
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder (checkpoints, logs)."),
        click.option("--export", "export_dir", type=click.Path(file_okay=False),
                     help="Write model.keras + spec.json + metrics.json + training_curve.png here."),
        click.option("--data-root", type=click.Path(exists=True, file_okay=False),
                     help="Folder holding spacenet1_rio_buildings/, satellite_labeled/, "
                          "medical_ct_totalsegmentator/ (default ../shared/data)."),
        click.option("--epochs", type=click.IntRange(1)),
        click.option("--steps", type=click.IntRange(1), help="Batches per epoch."),
        click.option("--batch-size", type=click.IntRange(1)),
        click.option("--base-filters", type=click.IntRange(1)),
        click.option("--depth", type=click.IntRange(1, 7)),
        click.option("--norm", type=click.Choice(["batch", "group", "none"])),
        click.option("--lr", "learning_rate", type=click.FloatRange(0, min_open=True)),
        click.option("--init-from", type=click.Path(exists=True, dir_okay=False),
                     help="Start from these weights (same architecture), e.g. to continue a run."),
        click.option("--seed", default=0, show_default=True, type=int),
    ]):
        f = opt(f)
    return f


def _run(kind: str, out: str, export_dir: str | None, data_root: str | None, defaults: dict, **kw) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from adapters.base import AdapterError
    from pipelines import domains as d

    opts = {**defaults, **{k: v for k, v in kw.items() if v is not None}}
    if "steps" in opts:
        opts["steps_per_epoch"] = opts.pop("steps")
    cfg = d.DomainTrainConfig(out=out, **opts)
    t0 = time.time()
    try:
        if kind == "buildings":
            train, val = d.building_samples("train", data_root), d.building_samples("val", data_root)
        else:
            train, val = d.ct_samples("train", cfg.crop, data_root), d.ct_samples("val", cfg.crop, data_root)
        best = d.train_domain(train, val, cfg)
    except (AdapterError, FileExistsError) as e:
        raise click.ClickException(str(e)) from e
    minutes = (time.time() - t0) / 60
    click.echo(f"best checkpoint: {best} ({minutes:.1f} min)")
    if export_dir:
        _export(kind, out, export_dir, data_root, minutes, "python -m core.cli_domains " + " ".join(sys.argv[1:]))


def _export(kind: str, run_dir: str, export_dir: str, data_root: str | None, minutes: float, command: str) -> None:
    """Export ``run_dir/best.keras`` as a registry folder, evaluate it on the held-out images, write the card."""
    from pipelines import domains as d

    cfg = json.loads(Path(run_dir, "config.json").read_text())
    spec = d.buildings_spec() if kind == "buildings" else d.ct_spec(cfg["crop"])
    d.export(Path(run_dir, "best.keras"), spec, export_dir)
    report = d.evaluate_buildings(export_dir, data_root=data_root) if kind == "buildings" \
        else d.evaluate_ct(export_dir, data_root=data_root)
    report["split"] = {k: list(v) for k, v in (d.RIO_SPLIT if kind == "buildings" else d.CT_SPLIT).items()}
    report["training"] = {"minutes": round(minutes, 1), "config": cfg,
                          "hardware": f"{platform.processor() or platform.machine()} CPU",
                          "date": time.strftime("%Y-%m-%d")}
    Path(export_dir, "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    curve = Path(run_dir, "training_curve.png")
    if curve.is_file():
        Path(export_dir, "training_curve.png").write_bytes(curve.read_bytes())
    write_model_card(export_dir, kind, command)
    for c in report["per_class"]:
        click.echo(f"{c['name']:>12}: dice {c['dice']}, iou {c['iou']}")


@click.command("export")
@click.option("--kind", required=True, type=click.Choice(["buildings", "ct"]))
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A finished training run folder (best.keras, config.json, state.json).")
@click.option("--export", "export_dir", required=True, type=click.Path(file_okay=False))
@click.option("--data-root", type=click.Path(exists=True, file_okay=False))
@click.option("--command", "command", required=True, help="The training command to quote in the card.")
def export_command(kind: str, run_dir: str, export_dir: str, data_root: str | None, command: str) -> None:
    """Export, evaluate and document a finished training run (what --export does after training)."""
    state = json.loads(Path(run_dir, "state.json").read_text())
    _export(kind, run_dir, export_dir, data_root, float(state.get("train_seconds", 0)) / 60, command)

_DATA_TEXT = {
    "buildings": """\
- **SpaceNet 1, Rio de Janeiro** (`spacenet1_rio_buildings`): 11 WorldView-2 RGB tiles, 0.5 m, building
  masks rasterized from the SpaceNet footprints. Imagery (c) DigitalGlobe/Maxar; **CC BY-SA 4.0**.
- **SpaceNet 4, Atlanta** (`satellite_labeled/spacenet4_atlanta_buildings`): one 900x900 panchromatic tile at
  0.5 m (fed as grey RGB) with 43 footprints rasterized from the SpaceNet GeoJSON. **CC BY-SA 4.0**.
- **NRCan Quebec** (`satellite_labeled/nrcan_quebec_buildings`): two 512x512 aerial RGB tiles at 0.30 m and
  0.15 m, resampled to 0.5 m (area average) with majority labels. MIT-licensed test fixtures of
  NRCan geo-deep-learning; upstream origin unconfirmed.

Input: RGB (or 1-band panchromatic, replicated), per-item 2-98 % percentile stretch per band (works across
sensors and bit depths), 0.5 m ground resolution (other resolutions are resampled to 0.5 m and the output is
returned on the input grid by `pipelines.domains.segment_at_model_resolution`), 256 px tiles, overlap 32.
""",
    "ct": """\
- **TotalSegmentator example CT** (`medical_ct_totalsegmentator`): 20 contiguous axial slices (512x512,
  0.98 mm pixels, 2 mm spacing, JPEG 2000) of one contrast-enhanced upper-abdominal CT. Files **Apache-2.0**
  (TotalSegmentator repository). **The labels are model output (TotalSegmentator `total --fast`), i.e.
  pseudo-labels, not manual annotation**: the figures below measure agreement with that model, not accuracy
  against ground truth.
- Classes: background, liver, spleen, stomach, aorta, vertebra (T11 + T12 merged). Kidneys do not appear
  in these slices; every other structure is background.

Input: 1 channel, HU window centre 40 / width 400 clipped to [0, 1], the whole slice resized to 256x256
(mode `resize`; probabilities scaled back to the slice grid). Read through the DICOM adapter (Modality LUT).
""",
}


_LIMITS = {
    "buildings": """\
- 11 small tiles (about 2 km² in all), mostly one city (Rio outskirts) and one sensor: expect much lower
  quality on other regions, seasons, off-nadir views and roof types. Two test tiles are a small sample.
- SpaceNet labels are themselves imperfect (offsets, merged clusters, missed small structures).
- Touching buildings merge in the class raster, so polygons are not building instances.
""",
    "ct": """\
- One patient, one scanner, one contrast phase, 20 slices: no evidence at all about other patients.
- The held-out block neighbours the training slices (2 mm apart, and the `--fast` 3 mm labels repeat
  on neighbouring slices), so the figures are optimistic even as agreement with TotalSegmentator.
- Structures absent from the training slices (kidneys, lumbar vertebrae, lungs...) are background to it.
""",
}


def write_model_card(model_dir: str | Path, kind: str, command: str) -> Path:
    """Render ``MODEL_CARD.md`` in ``model_dir`` from its ``spec.json`` and ``metrics.json``."""
    model_dir = Path(model_dir)
    spec = json.loads((model_dir / "spec.json").read_text())
    m = json.loads((model_dir / "metrics.json").read_text())
    tr = m["training"]
    cfg = tr["config"]
    rows = "\n".join(
        f"| {c['name']} | {c['dice']:.3f} | {c['iou']:.3f} | {c['support']:,} |"
        if c["dice"] is not None else f"| {c['name']} | n/a | n/a | {c['support']:,} |"
        for c in m["per_class"]
    )
    per_image = "\n".join(
        f"| {name} | " + " | ".join(
            "n/a" if v["dice"] is None else f"{v['dice']:.3f}" for k, v in figs.items() if k != "background"
        ) + " |"
        for name, figs in m["per_image"].items()
    )
    fg = [c["name"] for c in m["per_class"] if c["name"] != "background"]
    split = m["split"]
    size_mb = (model_dir / "model.keras").stat().st_size / 1e6
    text = f"""# {spec['name']}

{spec['description']}.

**Demonstration-grade model trained on very little data. Not for clinical, diagnostic, survey or mapping use.**

## Data and license
{_DATA_TEXT[kind]}
## Split (whole images; the held-out images are never seen in training)
- train: {', '.join(split['train'])}{' + Atlanta pan tile + 2 Quebec tiles' if kind == 'buildings' else ''}
- validation (checkpoint selection only): {', '.join(split['val'])}
- **held-out test**: {', '.join(split['test'])}
{'- `samples/geotiff/rio_img64.tif` (the README demo sample) is img64: held out.' if kind == 'buildings' else
 '- the test block is the inferior end of the stack; slice 16 (validation) is its neighbour.'}

## Held-out results
Computed by `pipelines.domains.evaluate_{'buildings' if kind == 'buildings' else 'ct'}`: each test image read
through the {'GeoTIFF' if kind == 'buildings' else 'DICOM'} adapter and segmented by the service's runner
(`pipelines.semantic`) at its full resolution; confusion over all pixels of the test images
(`pipelines.metrics`){', pixels outside the image footprint ignored' if kind == 'buildings' else ''}.

| class | Dice | IoU | truth pixels |
| --- | --- | --- | --- |
{rows}

Pixel accuracy {m['pixel_accuracy']:.3f}, mean IoU {m['mean_iou']:.3f}.

Dice per held-out image:

| image | {' | '.join(fg)} |
| --- | {' | '.join('---' for _ in fg)} |
{per_image}

## Limitations
{_LIMITS[kind]}
## Model and training
- Keras 3 U-Net (`pipelines.unet.build_unet`): depth {cfg['depth']}, base filters {cfg['base_filters']},
  {cfg.get('norm', 'batch')} normalization, dropout {cfg['dropout']}; softmax over {len(spec['classes'])} classes;
  `model.keras` {size_mb:.1f} MB.
- Loss cross-entropy + soft Dice (`pipelines.train.DiceCELoss`), Adam, lr {cfg['learning_rate']} with warm-up
  and cosine decay, {cfg['epochs']} epochs x {cfg['steps_per_epoch']} batches of {cfg['batch_size']}
  {cfg['crop']}x{cfg['crop']} {'random crops (rot90/flip, brightness/contrast jitter, '
  + str(cfg['grey_prob']) + ' grey)' if kind == 'buildings' else 'slices (random shift up to '
  + str(cfg['max_shift']) + ' px, brightness/contrast jitter, no flips: anatomy has a side)'}; best
  validation mean IoU checkpoint kept. Training curve: `training_curve.png`.
- Command: `{command}`
- Training time: {tr['minutes']} min on a shared 2-core {tr['hardware']} (no GPU), {tr['date']}.
"""
    path = model_dir / "MODEL_CARD.md"
    path.write_text(text)
    return path


@click.command("card")
@click.option("--model-dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--kind", required=True, type=click.Choice(["buildings", "ct"]))
@click.option("--command", "command", required=True, help="The training command to quote in the card.")
def card_command(model_dir: str, kind: str, command: str) -> None:
    """(Re)write MODEL_CARD.md from spec.json and metrics.json."""
    click.echo(write_model_card(model_dir, kind, command))


@click.command("buildings")
@_common
def buildings_command(**kw) -> None:
    """Train the buildings-rgb U-Net (Rio tiles img53/img64 held out, img56 validation)."""
    _run("buildings", defaults=dict(crop=128, epochs=30, steps_per_epoch=16, batch_size=8, base_filters=16,
                                    depth=3, rotate=True, grey_prob=0.15), **kw)


@click.command("ct-organs")
@_common
def ct_organs_command(**kw) -> None:
    """Train the ct-organs U-Net at 256x256 (slices 17-20 held out, 15-16 validation)."""
    _run("ct", defaults=dict(crop=256, epochs=60, steps_per_epoch=4, batch_size=4, base_filters=12, depth=4,
                             rotate=False, max_shift=12,
                             class_names=["background", "liver", "spleen", "stomach", "aorta", "vertebra"]),
         **kw)


domains = click.Group("domains", help="Train the domain models.",
                      commands={"buildings": buildings_command, "ct-organs": ct_organs_command,
                                "card": card_command, "export": export_command})

if __name__ == "__main__":
    domains()
