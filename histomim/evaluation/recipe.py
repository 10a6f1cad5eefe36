"""The nucleus recipe: pretrain the nano preset on every unlabelled H&E image at hand on a CPU, then measure the
nucleus-type probes of every checkpoint against the random-init twin over repeated splits (docs/evaluation.md).

    python scripts/nucleus_recipe.py --output-dir outputs/nano-nuclei          # the recipe, reported nuclei
    python scripts/nucleus_recipe.py --output-dir outputs/nano-nuclei --pool tune --skip-pretraining
    python scripts/nucleus_recipe.py --objective simmim --output-dir outputs/nano-simmim   # another objective
    python scripts/nucleus_recipe.py --table outputs/nano-*/learning_curve_report_mean-last.json  # side by side
    python scripts/nucleus_recipe.py --select outputs/nano-*/    # choose run and features on the tuning pool

1. tiles (`recipe_tiles`): the three unlabelled cellseg H&E images (not the labelled patches) cut into 48 and
   64 px tiles at half-tile stride, and the CMU-1 sample slide's tissue tiles at 0.25 and 0.5 um/px (64 px);
   the pretraining crop (scale 0.2-1) brings them to the 32 px of the nucleus crops;
2. `histomim pretrain --config histomim-vit-nano-nuclei --data <tiles>` with a checkpoint every
   ``--checkpointing-steps`` (``--objective beit`` first trains a pixel tokenizer, `train_tokenizer`;
   ``--objective fcmae`` trains the ConvNeXt preset histomim-convnext-nano-nuclei instead);
3. `learning_curve` on one pool of the 125 labelled nuclei (`recipe_nuclei`: ``--crop-size`` px centred on each
   nucleus, brought to the model's 32 px): linear probe and kNN on ``--pooling``/``--layer`` features over
   ``--split-seeds`` stratified splits, step 0 being the twin.

The nuclei are cut once into two disjoint pools (`nucleus_pools`, stratified, seed 0): ``tune`` (50 nuclei),
on which the recipe's settings were chosen, and ``report`` (75 nuclei), on which the figures are reported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .embeddings import POOLINGS

PRESET = "histomim-vit-nano-nuclei"
# the ConvNeXt of the same size for FCMAE: 32 px, a 1 px stem and 3 stages (stride 4), so its mask unit and
# its last feature map (8 x 8) are the ViT's 4 px patches and token grid
CNN_PRESET = "histomim-convnext-nano-nuclei"
OBJECTIVES = ("mae", "simmim", "latent", "beit", "fcmae")
# the recipe's defaults, chosen on the tuning pool (docs/evaluation.md says how); never on the reported nuclei
RECIPE = {"objective": "mae", "tiles": "grid", "max_steps": 5000, "checkpointing_steps": 1000, "batch_size": 64, "base_lr": 1.5e-3,
          "pooling": "mean", "layer": 2, "crop_size": 32}  # fmt: skip
POOLS = ("tune", "report")
# the probed features `select_recipe` tries on every run: (pooling, index of hidden_states or None: the final output)
FEATURE_CANDIDATES = (("mean", 1), ("mean", 2), ("mean", 3), ("mean", None), ("cls+mean", 2))
# the nucleus crops `select_recipe` tries: the bare nucleus at the model's 32 px, or 64 px of context around it brought
# to 32 px by the image processor, the scale at which the pretraining crop shows the 48-64 px tiles
CROP_CANDIDATES = (32, 64)
# the crop of every report and selection written before --crop-size existed, which they do not record
EARLIER_CROP_SIZE = 32
SELECTION_RULE = ("on the tuning pool, at each run's final checkpoint: among the (run, features) whose linear-probe "
                  "and kNN paired differences to the twin are both positive, the largest linear-probe difference")
POOL_SEED, TUNE_FRACTION = 0, 0.4  # the fixed partition of the nuclei into the tuning and the reported pool
TILE_SIZES = (48, 64)
# (um/px, tile px) of the CMU-1 sample slide's tissue tiles: 0.25 um/px (the slide's 0.5 upsampled x2) is about
# the scale of the 40x nucleus patches; 0.5 um/px adds context at half that magnification
SLIDE_RESOLUTIONS = ((0.25, 64), (0.5, 64))
# ``--tiles nuclei``: tiles centred on detected nuclei, a little larger than the 32 px nucleus crops so that the
# pretraining crop (area 0.2-1, about 31 px on average) frames them at about the crops' scale
TILE_CHOICES, NUCLEUS_TILE_SIZE = ("grid", "nuclei"), 40


def cut_tiles(images: list[Path], out_dir: Path, sizes=TILE_SIZES) -> int:
    """Every ``size`` px tile at half-tile stride of each image, as PNGs; returns how many (reused if present)."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    for path in images:
        with Image.open(path) as image:
            image = image.convert("RGB")
            for size in sizes:
                for top in range(0, image.height - size + 1, size // 2):
                    for left in range(0, image.width - size + 1, size // 2):
                        target = out_dir / f"{path.stem}_{size}_{left}_{top}.png"
                        if not target.exists():
                            image.crop((left, top, left + size, top + size)).save(target)
                        count += 1
    return count


def cut_slide_tiles(slide_path: Path, out_dir: Path, resolutions=SLIDE_RESOLUTIONS, min_tissue: float = 0.5) -> int:
    """The non-overlapping tissue tiles of a slide at each (mpp, tile px) of ``resolutions`` (`tile_manifest`
    on `detect_tissue`, read by `read_tile`), as PNGs; returns how many (reused if present)."""
    from ..data.slides import open_slide
    from ..data.tiles import read_tile
    from ..data.tiling import tile_manifest
    from ..data.tissue import detect_tissue

    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    with open_slide(slide_path) as slide:
        tissue = detect_tissue(slide)
        for mpp, size in resolutions:
            manifest = tile_manifest(slide, tissue, mpp=mpp, tile_size=size, min_tissue=min_tissue)
            for row in manifest.to_dict("records"):
                target = out_dir / f"{slide.slide_id}_{mpp:g}mpp_{size}_{row['x']}_{row['y']}.png"
                if not target.exists():
                    read_tile(row).save(target)
                count += 1
    return count


def recipe_tiles(out_dir: Path) -> int:
    """All the unlabelled H&E tiles of the recipe in ``out_dir`` (see the module docstring); returns how many."""
    from ..data.samples import sample_slide_path, sample_unlabelled_he_dir

    return cut_tiles(sorted(sample_unlabelled_he_dir().glob("*.png")), out_dir) + cut_slide_tiles(sample_slide_path(), out_dir)


def recipe_nucleus_tiles(out_dir: Path, size: int = NUCLEUS_TILE_SIZE, region: int = 256) -> int:
    """``--tiles nuclei``: ``size`` px tiles centred on the nuclei `find_nuclei` detects (no labels) in the same
    unlabelled images as `recipe_tiles`: the three cellseg images at their scale, and the CMU-1 slide's tissue
    read at 0.25 um/px in ``region`` px squares; returns how many (reused if present)."""
    from PIL import Image

    from ..data.nuclei import cut_nucleus_tiles
    from ..data.samples import sample_slide_path, sample_unlabelled_he_dir
    from ..data.slides import open_slide
    from ..data.tiles import read_tile
    from ..data.tiling import tile_manifest
    from ..data.tissue import detect_tissue

    count = 0
    for path in sorted(sample_unlabelled_he_dir().glob("*.png")):
        with Image.open(path) as image:
            count += cut_nucleus_tiles(image.convert("RGB"), out_dir, path.stem, size)
    with open_slide(sample_slide_path()) as slide:
        manifest = tile_manifest(slide, detect_tissue(slide), mpp=0.25, tile_size=region, min_tissue=0.5)
        for row in manifest.to_dict("records"):
            count += cut_nucleus_tiles(read_tile(row), out_dir, f"{slide.slide_id}_0.25mpp_{row['x']}_{row['y']}", size)
    return count


def nucleus_pools(data, tune_fraction: float = TUNE_FRACTION, seed: int = POOL_SEED) -> dict:
    """{"tune": ..., "report": ...}: a fixed stratified partition of labelled images into two disjoint pools, so
    that settings chosen on one are reported on nuclei they never saw."""
    from .data import LabelledImages, split_images

    split = split_images(data, "stratified", 1 - tune_fraction, seed)  # train: the tuning pool
    pools = {}
    for name, indices in (("tune", split.train), ("report", split.test)):
        pools[name] = LabelledImages([data.images[i] for i in indices], data.labels[indices], data.class_names,
                                     data.groups[indices], f"{data.description}, {name} pool ({len(indices)} of "
                                     f"{len(data)}: stratified, seed {seed})")  # fmt: skip
    return pools


def recipe_nuclei(pool: str, crop_size: int = RECIPE["crop_size"]):
    """One pool (`nucleus_pools`) of the sample's labelled nuclei as ``crop_size`` px crops centred on each nucleus.
    The pools hold the same nuclei whatever the crop size: the partition depends on the labels only."""
    from ..data.samples import sample_nuclei_pairs
    from .data import nucleus_crops

    return nucleus_pools(nucleus_crops(sample_nuclei_pairs(), crop_size=crop_size))[pool]


def feature_name(pooling: str, layer: int | None) -> str:
    """The ``--select-features`` spelling of a candidate: ``mean/2``, ``mean/last``."""
    return f"{pooling}/{'last' if layer is None else layer}"


def feature_choice(value: str) -> tuple[str, int | None]:
    """``--select-features`` item ``POOLING/LAYER`` (e.g. ``mean/2``, ``mean/last``) -> (pooling, layer or None)."""
    pooling, _, layer = value.partition("/")
    if pooling not in POOLINGS or not layer:
        raise argparse.ArgumentTypeError(f"--select-features takes POOLING/LAYER such as mean/2 or cls+mean/last, not {value!r}")
    return pooling, layer_choice(layer)


def train_tokenizer(tiles: Path, output_dir: Path, args) -> Path:
    """The pixel tokenizer (VQ-VAE, ``--codebook-size`` codes) that BEiT's targets come from, trained on the same
    tiles with the same batch and seed for ``--tokenizer-steps``; reused if ``output_dir`` holds one."""
    from ..training.arguments import parse_pretrain_arguments
    from ..training.pretrain import pretrain

    if not (output_dir / "config.json").exists():
        pretrain(parse_pretrain_arguments([
            "--objective", "tokenizer", "--config", PRESET, "--data", str(tiles), "--output-dir", str(output_dir),
            "--max-steps", str(args.tokenizer_steps), "--batch-size", str(args.batch_size), "--base-lr",
            str(args.base_lr), "--codebook-size", str(args.codebook_size), "--reconstruction-steps", "0",
            "--seed", str(args.seed), "--cpu"]))  # fmt: skip
    return output_dir


def preset_for(objective: str) -> str:
    """The recipe's model for an objective: the ViT nano preset, or its ConvNeXt counterpart for FCMAE."""
    return CNN_PRESET if objective == "fcmae" else PRESET


def layer_choice(value: str) -> int | None:
    """``--layer``: an index of ``hidden_states``, or ``last`` (None: the final normalised output)."""
    if value == "last":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layer takes an integer index of hidden_states or 'last', not {value!r}") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/nano-nuclei"), help="the pretraining run")
    parser.add_argument("--objective", choices=OBJECTIVES, default=RECIPE["objective"],
                        help="pretraining objective (default: %(default)s); each keeps its usual mask ratio; fcmae "
                        f"trains the ConvNeXt of the same size ({CNN_PRESET})")  # fmt: skip
    parser.add_argument("--config", default=None,
                        help=f"the model to pretrain: a preset or config folder (default: {PRESET}, {CNN_PRESET} with "
                        "--objective fcmae)")  # fmt: skip
    parser.add_argument("--tiles", choices=TILE_CHOICES, default=RECIPE["tiles"],
                        help="pretraining tiles: 'grid' (48/64 px tiles over the images and the slide's tissue) or "
                        f"'nuclei' ({NUCLEUS_TILE_SIZE} px tiles centred on nuclei detected without labels, "
                        "histomim.data.nuclei) (default: %(default)s)")  # fmt: skip
    parser.add_argument("--mask-ratio", type=float, default=None,
                        help="override the objective's mask ratio (MAE/SimMIM 0.5 in the preset, BEiT 0.4, latent 0.6, "
                        "FCMAE 0.6)")  # fmt: skip
    parser.add_argument("--max-steps", type=int, default=RECIPE["max_steps"], help="pretraining steps (default: %(default)s)")
    parser.add_argument("--checkpointing-steps", type=int, default=RECIPE["checkpointing_steps"],
                        help="a probed checkpoint every N steps (default: %(default)s)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=RECIPE["batch_size"], help="pretraining batch (default: %(default)s)")
    parser.add_argument("--base-lr", type=float, default=RECIPE["base_lr"],
                        help="pretraining base lr, x batch/256 (default: %(default)s)")  # fmt: skip
    parser.add_argument("--tokenizer-steps", type=int, default=100,
                        help="with --objective beit: steps of the pixel tokenizer trained first (default: %(default)s)")  # fmt: skip
    parser.add_argument("--codebook-size", type=int, default=512,
                        help="with --objective beit: the tokenizer's codes (default: %(default)s)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="pretraining seed (default: %(default)s)")
    parser.add_argument("--pool", choices=POOLS, default="report",
                        help="the nuclei to evaluate on: 'tune' (choose settings here) or 'report' (default: %(default)s)")  # fmt: skip
    parser.add_argument("--split-seeds", type=int, default=20,
                        help="stratified 70/30 splits of the pool, seeds 0..N-1, every encoder on the same ones (default: %(default)s)")  # fmt: skip
    parser.add_argument("--pooling", choices=POOLINGS, default=RECIPE["pooling"],
                        help="probe features: CLS, mean of the patch tokens or both (default: %(default)s)")  # fmt: skip
    parser.add_argument("--layer", type=layer_choice, default=RECIPE["layer"],
                        help="probe features from hidden_states[LAYER] (0: patch embedding, 1..4: the blocks, before the "
                        "final norm; the ConvNeXt: 0 the stem, 1..3 its stages), or 'last': the final normalised "
                        "output (default: %(default)s)")  # fmt: skip
    parser.add_argument("--crop-size", type=int, default=RECIPE["crop_size"],
                        help="nucleus crops of this many px centred on each nucleus, brought to the model's 32 px by its "
                        "image processor: 32 is the bare nucleus, 64 adds the tissue around it at the scale the "
                        "pretraining crop shows the tiles (default: %(default)s)")  # fmt: skip
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted pretraining run from its newest checkpoint (same schedule)")  # fmt: skip
    parser.add_argument("--skip-pretraining", action="store_true", help="only evaluate the checkpoints already in --output-dir")
    parser.add_argument("--figure", type=Path, default=None,
                        help="learning-curve PNG (default: <output-dir>/learning_curve_<pool>_<features>.png)")  # fmt: skip
    parser.add_argument("--table", type=Path, nargs="+", default=None, metavar="JSON",
                        help="print the side-by-side table of these learning_curve_*.json reports and exit")  # fmt: skip
    parser.add_argument("--select", type=Path, nargs="+", default=None, metavar="RUN",
                        help="probe the final checkpoint of each finished RUN with every candidate feature on the "
                        "tuning pool, print the table and the choice of the recipe's rule, write "
                        "recipe_selection.json beside the first run, and exit")  # fmt: skip
    parser.add_argument("--select-features", type=feature_choice, nargs="+", default=list(FEATURE_CANDIDATES),
                        metavar="POOLING/LAYER",
                        help="with --select: the candidate features, e.g. mean/2 mean/last cls+mean/2 (default: "
                        f"{' '.join(feature_name(*feature) for feature in FEATURE_CANDIDATES)})")  # fmt: skip
    parser.add_argument("--select-crop-sizes", type=int, nargs="+", default=list(CROP_CANDIDATES), metavar="PX",
                        help="with --select: the candidate nucleus crop sizes (default: %(default)s)")  # fmt: skip
    parser.add_argument("--table-step", type=int, default=None,
                        help="with --table: compare the runs at this checkpoint (default: each run's last)")  # fmt: skip
    return parser.parse_args(argv)


def probe_settings(pooling: str, layer: int | None):
    """The recipe's probes: linear and cosine kNN (k=10) on ``pooling`` features of ``hidden_states[layer]``."""
    from .harness import EvaluationSettings

    return EvaluationSettings(pooling=pooling, layer=layer, protocols=("linear", "knn"), knn_k=10)


def select_recipe(runs: list[Path], nuclei_by_crop: dict, split_seeds, features=FEATURE_CANDIDATES) -> dict:
    """Every run's final checkpoint probed with every candidate feature on each ``{crop size: nuclei}`` (crops of
    the tuning pool), beside its random-init twin on the same splits, and the one `SELECTION_RULE` picks (None if
    none qualifies)."""
    from transformers import AutoConfig

    from .learning_curve import checkpoint_steps, learning_curve

    rows = []
    for run in runs:
        config = AutoConfig.from_pretrained(str(run))
        if not checkpoint_steps(run):
            raise ValueError(f"--select {run}: no finished checkpoint in {run}/checkpoints")
        last = checkpoint_steps(run)[-1][0]
        for crop_size, nuclei in nuclei_by_crop.items():
            for pooling, layer in features:
                if pooling == "cls+mean" and config.model_type == "histomim_convnext":
                    continue  # feature maps have no CLS token
                settings = probe_settings(pooling, layer)
                twin, point = learning_curve(run, nuclei, settings, split_seeds, config=config, steps=[last])
                rows.append({"run": str(run), "objective": config.objective, "mask_ratio": config.mask_ratio,
                             "features": settings.features, "crop_size": crop_size, "step": last,
                             "summary": point["summary"], "twin": twin["summary"]})  # fmt: skip
    return {"rule": SELECTION_RULE, "data": {crop: nuclei.description for crop, nuclei in nuclei_by_crop.items()},
            "split_seeds": list(split_seeds), "rows": rows, "chosen": chosen_by_rule(rows)}  # fmt: skip


def chosen_by_rule(rows: list[dict]) -> dict | None:
    """`SELECTION_RULE` over `select_recipe` rows: both paired differences positive, then the largest linear one."""
    eligible = [row for row in rows if all(row["summary"][p]["difference_mean"] > 0 for p in ("linear", "knn"))]
    return max(eligible, key=lambda row: row["summary"]["linear"]["difference_mean"], default=None)


def selection_table(selection: dict) -> str:
    """The markdown table of `select_recipe`'s rows (run, objective, features), the chosen one in bold."""
    lines = [f"| run {TABLE_HEADER}", separator(f"| run {TABLE_HEADER}")]
    for row in selection["rows"]:
        name = probed_name(row["objective"], row["mask_ratio"], row["features"], row.get("crop_size"))
        run = Path(row["run"]).name
        lines.append(f"| {'**' + run + '**' if row is selection['chosen'] else run} " + table_cells(name, row))
    return "\n".join(lines)


def probed_name(objective: str, mask_ratio: float, features: str, crop_size: int | None) -> str:
    """What a table row probed, e.g. ``mae (0.5), mean/layer2, 64 px`` (reports without a crop: `EARLIER_CROP_SIZE`)."""
    return f"{objective} ({mask_ratio}), {features}, {crop_size or EARLIER_CROP_SIZE} px"


# a row: both protocols, each as score, twin, paired difference, splits won and the corrected t-test's p
TABLE_HEADER = ("| objective (mask ratio), features, crop | steps | linear probe | random init | paired difference | splits won | "
                "p | kNN | random init | paired difference | splits won | p |")  # fmt: skip


def separator(header: str) -> str:
    """The markdown line under ``header``: one ``|---`` per column."""
    return "|---" * (header.count("|") - 1) + "|"


def table_cells(name: str, point: dict) -> str:
    """``| name | steps |`` and, for the linear probe then kNN, ``mean ± std | twin | difference | won | p |``."""
    cells = [name, str(point["step"])]
    for protocol in ("linear", "knn"):
        summary, twin = point["summary"][protocol], point["twin"][protocol]
        p_value = summary.get("p_value")  # absent from reports written before it was computed
        cells += [f"{summary['mean']:.3f} ± {summary['std']:.3f}", f"{twin['mean']:.3f} ± {twin['std']:.3f}",
                  f"{summary['difference_mean']:+.3f} ± {summary['difference_std']:.3f}",
                  f"{round(summary['won'] * summary['splits'])}/{summary['splits']}",
                  "—" if p_value is None else f"{p_value:.3f}"]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def objectives_table(reports: list[Path], step: int | None = None) -> str:
    """A markdown table of each recipe run (its JSON report, named by its pretraining folder) at checkpoint ``step`` (default: its last) beside its
    random-init twin, summarised again from the per-split scores (so older reports get their p-values too)."""
    from .learning_curve import curve_point

    lines = [f"| run {TABLE_HEADER}", separator(f"| run {TABLE_HEADER}")]
    for path in reports:
        report = json.loads(Path(path).read_text())
        points = {point["step"]: point for point in report["points"]}
        if step is not None and step not in points:
            raise ValueError(f"{path}: no checkpoint at step {step}; it has steps {sorted(points)}")
        chosen = points[report["points"][-1]["step"] if step is None else step]
        test_fraction, twin_scores = report["settings"]["test_size"], report["points"][0]["scores"]
        point = {**curve_point(chosen["step"], chosen["scores"], twin_scores, test_fraction),
                 "twin": curve_point(0, twin_scores, twin_scores, test_fraction)["summary"]}  # fmt: skip
        features = probe_settings(report["settings"]["pooling"], report["settings"]["layer"]).features
        name = probed_name(report["objective"], report["mask_ratio"], features, report.get("crop_size"))
        run = report.get("pretraining", {}).get("output_dir") or Path(path).parent  # reports copied elsewhere keep their run
        lines.append(f"| {Path(run).name} " + table_cells(name, point))
    return "\n".join(lines)


def main(argv=None) -> int:
    from ..presets import config_source
    from ..training.arguments import parse_pretrain_arguments
    from ..training.pretrain import load_model_config, pretrain
    from .harness import save_report
    from .learning_curve import learning_curve, save_learning_curve_plot

    args = parse_args(argv)
    if args.table:
        print(objectives_table(args.table, args.table_step))
        return 0
    if args.select:  # always on the tuning pool: the reported nuclei never choose anything
        nuclei_by_crop = {crop: recipe_nuclei("tune", crop) for crop in args.select_crop_sizes}
        selection = select_recipe(args.select, nuclei_by_crop, range(args.split_seeds), features=args.select_features)
        save_report(selection, args.select[0].parent / "recipe_selection.json")
        chosen = selection["chosen"]
        print(f"{selection_table(selection)}\n\nrule: {SELECTION_RULE}")
        print(f"chosen: {chosen['run']} with {chosen['features']} features of {chosen['crop_size']} px crops" if chosen
              else "chosen: none qualifies")  # fmt: skip
        return 0
    # shared by the runs of every objective
    tiles = args.output_dir.parent / ("recipe_tiles" if args.tiles == "grid" else "recipe_nucleus_tiles")
    preset = args.config or preset_for(args.objective)
    count = recipe_tiles(tiles) if args.tiles == "grid" else recipe_nucleus_tiles(tiles)
    print(f"{count} unlabelled H&E tiles ({args.tiles}) in {tiles}")
    flags = ["--config", preset, "--objective", args.objective, "--data", str(tiles), "--output-dir", str(args.output_dir),
             "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size), "--base-lr", str(args.base_lr),
             "--checkpointing-steps", str(args.checkpointing_steps), "--checkpoints-total-limit", "1000",
             "--reconstruction-steps", "0", "--seed", str(args.seed), "--cpu"]  # fmt: skip
    flags += ["--mask-ratio", str(args.mask_ratio)] if args.mask_ratio is not None else []
    flags += ["--resume-from-checkpoint", "latest"] if args.resume else []
    if args.objective == "beit":
        flags += ["--tokenizer", str(train_tokenizer(tiles, args.output_dir.parent / f"{args.output_dir.name}-tokenizer", args))]
    pretrain_args = parse_pretrain_arguments(flags)
    if not args.skip_pretraining:
        pretrain(pretrain_args)
    config = load_model_config(pretrain_args, None)

    nuclei = recipe_nuclei(args.pool, args.crop_size)
    settings = probe_settings(args.pooling, args.layer)
    points = learning_curve(args.output_dir, nuclei, settings, split_seeds=range(args.split_seeds), config=config)
    # e.g. learning_curve_report_mean-last (the crops of the earlier rounds), learning_curve_report_mean-last_64px
    crop = "" if args.crop_size == EARLIER_CROP_SIZE else f"_{args.crop_size}px"
    name = f"learning_curve_{args.pool}_{settings.features.replace('/', '-')}{crop}"
    figure = args.figure or args.output_dir / f"{name}.png"
    title = (f"{Path(preset).name}, {config.objective.upper()} mask {config.mask_ratio}: nucleus type, {args.pool} pool "
             f"({len(nuclei)} nuclei), {settings.features} features of {args.crop_size} px crops, {args.split_seeds} splits")  # fmt: skip
    save_learning_curve_plot(points, figure, title=title)
    report = {"preset": config_source(preset), "objective": config.objective, "mask_ratio": config.mask_ratio, "tiles": args.tiles,
              "crop_size": args.crop_size,
              "pretraining": vars(pretrain_args), "data": nuclei.description, "settings": vars(settings),
              "split_seeds": list(range(args.split_seeds)), "points": points}  # fmt: skip
    save_report(report, args.output_dir / f"{name}.json")
    twin = points[0]["summary"]
    print(f"{nuclei.description}; {settings.features} features; {args.split_seeds} stratified 70/30 splits")
    print(f"{'step':>6}  {'linear bal.acc':<16}{'paired diff':<16}{'won':<8}{'kNN bal.acc':<16}{'paired diff':<16}won")
    for point in points:
        cells = "".join(f"{s['mean']:.3f} ± {s['std']:.3f}   {s['difference_mean']:+.3f} ± {s['difference_std']:.3f}  "
                        f"{s['won']:<8.2f}" for s in (point["summary"][p] for p in ("linear", "knn")))  # fmt: skip
        print(f"{point['step']:>6}  {cells}")
    print(f"random init (step 0): linear {twin['linear']['mean']:.3f}, kNN {twin['knn']['mean']:.3f}; figure: {figure}")
    return 0


__all__ = ["cut_tiles", "cut_slide_tiles", "recipe_tiles", "recipe_nucleus_tiles", "nucleus_pools", "recipe_nuclei", "train_tokenizer", "preset_for", "probe_settings",
           "select_recipe", "chosen_by_rule", "selection_table", "objectives_table", "main"]
