"""Masked image modeling pretraining (MAE or SimMIM) of a HistoMIM encoder with Accelerate.

    python scripts/pretrain.py                                   # the built-in demo (see below)
    accelerate launch scripts/pretrain.py --config histomim-vitb16 --data slides/ --epochs 100
    torchrun --nproc_per_node 8 scripts/pretrain.py --data tiles/manifest.parquet --mixed-precision bf16

With no ``--data`` it runs the built-in demo: the tiny preset learns MAE on tiles of the CMU-1
sample slide with `DEMO_DEFAULTS` (112 px, 150 steps), in a minute or two on 2 CPU cores.

One training step is a pure function of the training state and ``(seed, step)``: the data order
comes from the seeded sampler of Accelerate, the augmentation from ``(seed, epoch, index)``
(`histomim.data.transforms`), and the mask noise and any stochastic depth from
``(seed, micro_step, rank)``. Together with the atomic checkpoints of `histomim.training.common`,
resuming at step k gives the same loss at step k + 1 as an uninterrupted run.

Output folder::

    config.json  model.safetensors  *.py  preprocessor_config.json  README.md   the model (HistoMIMForPreTraining)
    reconstruction.png  loss_curve.png  pretrain_summary.json                  what the run did
    reconstructions/step_<k>.png  checkpoints/  tiles/  logs/                   training state
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers.hf_argparser import HfArg

from ..mim import HistoMIMConfig, HistoMIMForPreTraining, image_processor_for
from ..presets import config_source, preset_names
from .common import (
    ThroughputMeter,
    derive_seed,
    hardware_summary,
    jsonable,
    load_checkpoint,
    loss_summary,
    make_adamw,
    resolve_checkpoint,
    save_checkpoint,
    seeded_generator,
    warmup_cosine_schedule,
)
from .float8 import convert_to_float8

DEFAULT_PRESET = "histomim-vit-tiny16"
DEFAULT_OUTPUT_DIR = "outputs/histomim-tiny-demo"
# Without --data: the tiny preset on the sample slide, sized to finish in a minute or two on 2 CPU cores
# with a clearly falling loss (a higher base lr than MAE's 1.5e-4, which assumes a batch of 4096).
DEMO_DEFAULTS = {"image_size": 112, "max_steps": 150, "base_lr": 1.5e-3}
DEFAULT_EPOCHS = 100
MAE_BASE_LR = 1.5e-4
VISUALIZATION_KEY = 0x5EED  # keys the fixed mask noise of the reconstruction grids
NUM_VISUALIZED = 6
# Config values recorded in pretrain_summary.json and shown on the model card.
CARD_CONFIG_KEYS = (
    "image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "pooling", "pooled_size",
    "objective", "mask_ratio", "norm_pix_loss", "decoder_hidden_size", "decoder_num_hidden_layers", "target_mpp",
)  # fmt: skip


@dataclass
class PretrainArguments:
    """Everything a pretraining run needs; every field is a ``--flag`` of scripts/pretrain.py."""

    config: str = HfArg(
        default=DEFAULT_PRESET,
        help="Model config: a preset in hub_configs/ (histomim-vit-tiny16, histomim-vits16, histomim-vitb16, "
        "histomim-vitl16, histomim-vitb16-simmim), a config folder or a Hub id (default: histomim-vit-tiny16).",
    )
    data: list[str] = HfArg(
        default_factory=list,
        help="Training tiles: slide files or folders of slides (tiled first at --mpp into --tile-dir), or one tile "
        "source that load_tile_dataset reads (image folder, saved dataset, parquet, tile manifest or tile_slides "
        "folder, Hub dataset id). Default: the demo, on the CMU-1 sample slide; unset flags then take the demo's "
        "values (image size 112, 150 steps, base lr 1.5e-3).",
    )
    output_dir: str = HfArg(
        default=DEFAULT_OUTPUT_DIR, help=f"Where the model, plots and checkpoints go (default: {DEFAULT_OUTPUT_DIR})."
    )
    objective: Literal["mae", "simmim"] | None = HfArg(
        default=None, help="Pretraining objective (default: the config's)."
    )
    mask_ratio: float | None = HfArg(default=None, help="Share of patches masked, in (0, 1) (default: the config's).")
    image_size: int | None = HfArg(
        default=None,
        help="Training image size in px, also the tile size when slides are tiled (default: the config's; 112 for "
        "the demo).",
    )
    mpp: float = HfArg(
        default=0.5, help="Resolution (um/px) at which slides are tiled; 0.5 is about 20x (default: 0.5)."
    )
    tile_dir: str | None = HfArg(
        default=None, help="Where slides are tiled, reused when rerun (default: <output-dir>/tiles/<mpp>mpp-<size>px)."
    )
    stain: str = HfArg(default="H&E", help="Stain of the training slides, for the model card (default: H&E).")
    epochs: int | None = HfArg(
        default=None, help=f"Passes over the tiles (default: {DEFAULT_EPOCHS}; ignored with --max-steps)."
    )
    max_steps: int | None = HfArg(
        default=None,
        help="Optimizer steps to train for; overrides --epochs (default: from --epochs; 150 for the demo).",
    )
    batch_size: int = HfArg(default=32, help="Tiles per device per micro-batch (default: 32).")
    grad_accum: int = HfArg(default=1, help="Micro-batches accumulated per optimizer step (default: 1).")
    base_lr: float | None = HfArg(
        default=None,
        help=f"Base learning rate; lr = base_lr x global batch / 256 (default: {MAE_BASE_LR} as MAE; 1.5e-3 for the "
        "demo).",
    )
    weight_decay: float = HfArg(
        default=0.05, help="AdamW weight decay, not on norms, biases, tokens and position embeddings (default: 0.05)."
    )
    warmup_steps: int | None = HfArg(
        default=None, help="Linear warmup steps before the cosine decay (default: 5%% of the steps)."
    )
    max_grad_norm: float | None = HfArg(
        default=None, help="Clip gradients to this global norm (default: no clipping; the norm is logged either way)."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = HfArg(
        default=None, help="Mixed precision (default: from `accelerate config` / accelerate launch, else no)."
    )
    compile: bool = HfArg(default=False, help="torch.compile the model (inductor).")
    float8: bool = HfArg(
        default=False,
        help="Run the transformer linears' matmuls in float8 with torchao (Ada/Hopper GPUs; use with --compile "
        "and bf16). Faster on large batches, not bit-exact; saved weights are ordinary full-precision weights.",
    )
    cpu: bool = HfArg(default=False, help="Train on CPU even if a GPU is available.")
    num_workers: int | None = HfArg(
        default=None,
        help="DataLoader processes per device (default: 0 on CPU, where loading and training share the cores; "
        "otherwise up to 8, as the CPU cores per device allow).",
    )
    augment_on_device: bool = HfArg(
        default=False,
        help="Run the whole augmentation (random resized crop, flips, rotations, HED stain and colour jitter, "
        "normalisation) batched on the accelerator; DataLoader workers only decode tiles to uint8. Frees the CPU "
        "workers when the GPU outruns them (see docs/performance.md).",
    )
    seed: int = HfArg(default=0, help="Seed of the initialisation, data order, augmentation and masks (default: 0).")
    checkpointing_steps: int = HfArg(
        default=500, help="Save a resumable checkpoint every N steps and at the end; 0: never (default: 500)."
    )
    checkpoints_total_limit: int | None = HfArg(default=2, help="Keep only the newest N checkpoints (default: 2).")
    resume_from_checkpoint: str | None = HfArg(
        default=None,
        help="Resume from a checkpoint folder, a checkpoints folder (its newest) or 'latest' (the newest in "
        "<output-dir>/checkpoints).",
    )
    reconstruction_steps: int = HfArg(
        default=500,
        help="Save a PNG grid of original / masked / reconstruction every N steps and at the end; 0: only at the "
        "end (default: 500).",
    )
    report_to: Literal["none", "tensorboard", "trackio", "all"] = HfArg(
        default="none",
        help="Accelerate tracker for loss, lr, grad norm and img/s, logging to <output-dir>/logs (default: none).",
    )
    push_to_hub: bool = HfArg(default=False, help="Upload the trained model to the Hugging Face Hub at the end.")
    hub_model_id: str | None = HfArg(
        default=None, help="Repository for --push-to-hub, e.g. org/histomim-vitb (default: the output folder's name)."
    )
    hub_private_repo: bool = HfArg(default=False, help="Create the Hub repository as private.")
    license: str = HfArg(
        default="apache-2.0", help="License of the published model, for the card (default: apache-2.0)."
    )

    @property
    def is_demo(self) -> bool:
        return not self.data


@dataclass
class PretrainResult:
    """What `pretrain` returns on every process."""

    output_dir: Path
    model: HistoMIMForPreTraining  # unwrapped, trained
    losses: list[float]  # mean loss of every optimizer step, all processes
    summary: dict[str, Any]  # also saved as pretrain_summary.json


@dataclass
class TrainingState:
    """The loop's position; saved with every checkpoint as training_state.json."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches done, over all epochs
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` done (this process)
    losses: list[float] = field(default_factory=list)  # per optimizer step
    elapsed: float = 0.0  # training seconds before this (resumed) run


@dataclass(frozen=True)
class Schedule:
    """The optimization schedule that follows from the arguments, the data and the number of processes."""

    steps_per_epoch: int
    total_steps: int
    global_batch_size: int  # per device x processes x accumulation
    lr: float  # base_lr x global_batch_size / 256, as MAE
    warmup_steps: int

    @classmethod
    def for_run(cls, args: PretrainArguments, batches_per_epoch: int, num_processes: int) -> Schedule:
        steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum)  # a short last accumulation still steps
        total_steps = args.max_steps or args.epochs * steps_per_epoch
        global_batch_size = args.batch_size * num_processes * args.grad_accum
        warmup_steps = args.warmup_steps if args.warmup_steps is not None else max(1, round(0.05 * total_steps))
        lr = args.base_lr * global_batch_size / 256
        return cls(steps_per_epoch, total_steps, global_batch_size, lr, warmup_steps)


# -- setup -----------------------------------------------------------------------------------------


def with_demo_defaults(args: PretrainArguments) -> PretrainArguments:
    """Fill unset fields: the demo's settings without --data, the general defaults otherwise."""
    demo = DEMO_DEFAULTS if args.is_demo else {}
    args = replace(args, **{name: value for name, value in demo.items() if getattr(args, name) is None})
    if args.base_lr is None:
        args = replace(args, base_lr=MAE_BASE_LR)
    if args.epochs is None and args.max_steps is None:
        args = replace(args, epochs=DEFAULT_EPOCHS)
    for name in ("batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "epochs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def load_model_config(args: PretrainArguments, tile_mpp: float | None) -> HistoMIMConfig:
    """The preset/folder/Hub config with the command line's overrides applied (and validated)."""
    try:
        settings, _ = HistoMIMConfig.get_config_dict(config_source(args.config))
    except OSError as error:
        raise FileNotFoundError(
            f"--config {args.config!r} is not a config folder, a preset ({', '.join(preset_names())}) "
            f"or a reachable Hub id: {error}"
        ) from error
    if settings.get("model_type") != HistoMIMConfig.model_type:
        raise ValueError(
            f"--config {args.config!r} is a {settings.get('model_type')!r} config, not {HistoMIMConfig.model_type!r}"
        )
    if args.objective is not None and args.objective != settings.get("objective"):
        settings["objective"] = args.objective
    if args.mask_ratio is not None:
        settings["mask_ratio"] = args.mask_ratio
    settings["image_size"] = args.image_size or settings.get("image_size", 224)
    if tile_mpp is not None:  # metadata for the card and the users: the resolution the encoder learned
        settings["target_mpp"] = tile_mpp
        settings["magnification"] = round(10.0 / tile_mpp, 1)  # 0.5 um/px ~ 20x
    return HistoMIMConfig.from_dict(settings)


def make_accelerator(args: PretrainArguments):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    output_dir = Path(args.output_dir)
    return Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum,
        log_with=trackers(args.report_to),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # the same shuffled order on every process, a pure function of (seed, epoch); pinned batches are
        # copied to the GPU asynchronously (non_blocking) so the copy overlaps the previous step
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, non_blocking=True),
        # the schedule is stepped once per optimizer update, by the loop
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if args.compile else None,
    )


def trackers(report_to: str) -> list[str] | str | None:
    """Validate ``--report-to``; a missing tracker package is an error rather than silence."""
    if report_to == "none":
        return None
    if report_to == "all":
        return "all"
    if importlib.util.find_spec(report_to) is None:
        raise ImportError(f"--report-to {report_to} needs the {report_to} package: pip install {report_to}")
    return [report_to]


@dataclass
class TileData:
    """Where the training tiles come from, for loading and for the model card."""

    source: str  # what load_tile_dataset reads
    inputs: list[str]  # what the user gave (or the sample slide)
    mpp: float | None  # um/px of the tiles, when known
    tile_size: int | None
    slides: list[str]  # slide ids, when known
    failed_slides: list[str]  # "path: reason" of slides that could not be tiled


def prepare_tiles(args: PretrainArguments, accelerator, image_size: int) -> TileData:
    """Resolve ``--data``: tile slide inputs (on the main process, reused when rerun) or pass a tile source on.

    A slide that cannot be read or has no tissue is reported with its path and left out; the run
    stops only if no slide gave tiles.
    """
    from ..data.slides import PLAIN_IMAGE_EXTENSIONS, SLIDE_EXTENSIONS

    whole_slide_extensions = tuple(e for e in SLIDE_EXTENSIONS if e not in PLAIN_IMAGE_EXTENSIONS)
    if args.is_demo:
        from ..data.samples import sample_slide_path

        with accelerator.main_process_first():  # the first call may download it
            inputs = [str(sample_slide_path())]
    else:
        inputs = list(args.data)
    slide_inputs = [p for p in inputs if is_slide_input(Path(p), whole_slide_extensions)]
    if not slide_inputs:
        if len(inputs) > 1:
            raise ValueError(f"--data takes slide files/folders or a single tile source, got {inputs}")
        return TileData(source=inputs[0], inputs=inputs, **describe_tiles(Path(inputs[0])))
    if len(slide_inputs) != len(inputs):
        others = [p for p in inputs if p not in slide_inputs]
        raise ValueError(
            f"--data mixes slides with other tile sources {others}; tile the slides with scripts/tile_slides.py first"
        )

    from ..data.tiling import find_slides, tile_slides

    tile_dir = Path(args.tile_dir or Path(args.output_dir) / "tiles" / f"{args.mpp:g}mpp-{image_size}px")
    if accelerator.is_main_process:  # tile_slides reports each failed slide by path and goes on
        slides = find_slides(slide_inputs, whole_slide_extensions)
        report = tile_slides(slides, tile_dir, mpp=args.mpp, tile_size=image_size)
        if report.manifest.empty:
            failures = "; ".join(error["message"] for error in report.errors) or "no tissue found"
            raise ValueError(f"no tiles from {', '.join(slide_inputs)}: {failures}")
    accelerator.wait_for_everyone()
    return TileData(source=str(tile_dir), inputs=inputs, **describe_tiles(tile_dir))


def describe_tiles(source: Path) -> dict[str, Any]:
    """Resolution, tile size, slides and failed slides of a `tile_slides` folder; unknown for other sources."""
    if not (source / "tiling_config.json").is_file():
        return {"mpp": None, "tile_size": None, "slides": [], "failed_slides": []}
    import pandas as pd

    tiling = json.loads((source / "tiling_config.json").read_text())
    errors_file = source / "errors.json"
    errors = json.loads(errors_file.read_text()) if errors_file.is_file() else []
    return {
        "mpp": tiling["mpp"],
        "tile_size": tiling["tile_size"],
        "slides": sorted(pd.read_parquet(source / "manifest.parquet", columns=["slide_id"])["slide_id"].unique()),
        "failed_slides": [error["message"] for error in errors],
    }


def is_slide_input(path: Path, whole_slide_extensions: tuple[str, ...]) -> bool:
    """A whole-slide file, or a folder holding any (and not itself a tile dataset)."""
    if path.is_file():
        return path.suffix.lower() in whole_slide_extensions
    if not path.is_dir() or (path / "manifest.parquet").exists() or (path / "state.json").exists():
        return False
    return any(p.suffix.lower() in whole_slide_extensions for p in path.rglob("*") if p.is_file())


def make_dataloader(dataset, args: PretrainArguments, accelerator) -> torch.utils.data.DataLoader:
    """Shuffled, whole batches only (as MAE); Accelerate turns the shuffle into its seeded sampler."""
    on_cpu = accelerator.device.type == "cpu"
    num_workers = args.num_workers
    if num_workers is None:  # on CPU, workers only compete with the training threads for the same cores
        num_workers = 0 if on_cpu else min(8, (os.cpu_count() or 1) // accelerator.num_processes)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=not on_cpu,
    )


def seed_micro_step(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """Make every random draw of a micro-step a function of ``(seed, micro_step, rank)``.

    Reseeds the global RNG (stochastic depth draws from it) and returns the generator for the mask
    noise. Whatever else consumed random numbers since the last step (DataLoader iterators, plots,
    a restart) then no longer matters, which is what makes resuming exact.
    """
    torch.manual_seed(derive_seed(seed, micro_step, rank, 0))
    return seeded_generator(seed, micro_step, rank, 1)


# -- the loop --------------------------------------------------------------------------------------


def pretrain(args: PretrainArguments) -> PretrainResult:
    """Train a HistoMIM encoder with its MIM objective and save it to ``args.output_dir``.

    Call on every process (``accelerate launch`` / ``torchrun`` start one per device).
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from ..data.tiles import load_tile_dataset
    from ..data.transforms import device_augmentation_worker_transform, pretrain_transform

    args = with_demo_defaults(args)
    accelerator = make_accelerator(args)
    output_dir = Path(args.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # 1. data: tiles of the slides (or the given tile source), augmented per (seed, epoch, index)
    image_size = args.image_size or load_model_config(args, None).image_size
    tiles = prepare_tiles(args, accelerator, image_size)
    config = load_model_config(args, tiles.mpp)
    # with --augment-on-device the workers only decode; the loop augments whole batches on the device
    if args.augment_on_device:
        transform = device_augmentation_worker_transform(config.image_size)
    else:
        transform = pretrain_transform(config.image_size, config.normalization_mean, config.normalization_std, seed=args.seed)
    dataset = load_tile_dataset(tiles.source, transform=transform)
    if len(dataset) < args.batch_size * accelerator.num_processes:
        raise ValueError(
            f"{tiles.source}: {len(dataset)} tiles are fewer than one batch across processes "
            f"({args.batch_size} x {accelerator.num_processes}); lower --batch-size or add data"
        )
    dataloader = accelerator.prepare(make_dataloader(dataset, args, accelerator))

    # 2. model, optimizer (lr scaled by the global batch, as MAE) and warmup + cosine schedule
    set_seed(args.seed)  # the same initialisation on every process
    model = HistoMIMForPreTraining(config)
    if args.float8:
        accelerator.print(f"float8: {convert_to_float8(model)} linears run their matmuls in float8")
    schedule = Schedule.for_run(args, len(dataloader), accelerator.num_processes)
    optimizer = make_adamw(model, schedule.lr, args.weight_decay, betas=(0.9, 0.95), device=accelerator.device)
    scheduler = warmup_cosine_schedule(optimizer, schedule.warmup_steps, schedule.total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # 3. resume: weights, optimizer, schedule and RNG from the checkpoint, the loop position from its JSON
    state = TrainingState()
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, checkpoints_dir)
        saved = load_checkpoint(accelerator, checkpoint)
        state = TrainingState(**{name: saved[name] for name in asdict(state)})
        if saved.get("schedule") != asdict(schedule):
            accelerator.print(
                f"warning: {checkpoint} was saved with the schedule {saved.get('schedule')}, now {schedule}"
            )
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")

    # 4. train, with logging, reconstruction grids and checkpoints after optimizer steps
    if args.report_to != "none":
        accelerator.init_trackers(output_dir.name, config=tracker_config(args))
    visual_batch = visualization_batch(tiles.source, config) if accelerator.is_main_process else None
    progress = tqdm(total=schedule.total_steps, initial=state.step, desc="pretraining", unit="step",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    start = time.perf_counter()

    def checkpoint() -> None:
        elapsed = state.elapsed + time.perf_counter() - start
        training_state = {**asdict(state), "elapsed": elapsed, "schedule": asdict(schedule)}
        save_checkpoint(accelerator, checkpoints_dir, state.step, training_state, args.checkpoints_total_limit)

    throughput = ThroughputMeter()

    def after_step(metrics: dict[str, float], num_images: int) -> None:
        throughput.update(num_images)
        metrics["img_per_s"] = throughput.rate
        progress.update()
        progress.set_postfix({name: f"{value:.4g}" for name, value in metrics.items()})
        if args.report_to != "none":
            accelerator.log({f"train/{name}": value for name, value in metrics.items()}, step=state.step)
        if accelerator.is_main_process and args.reconstruction_steps and state.step % args.reconstruction_steps == 0:
            grid = output_dir / "reconstructions" / f"step_{state.step:06d}.png"
            save_reconstructions(accelerator, model, visual_batch, grid, state.step, args.seed)
        if args.checkpointing_steps and state.step % args.checkpointing_steps == 0:
            checkpoint()

    model.train()
    while state.step < schedule.total_steps:
        train_one_epoch(accelerator, model, optimizer, scheduler, dataloader, dataset, state, args,
                        schedule.total_steps, after_step)  # fmt: skip
    progress.close()
    if args.checkpointing_steps and state.step % args.checkpointing_steps != 0:
        checkpoint()
    elapsed = state.elapsed + time.perf_counter() - start

    # 5. the model, its processor, card and plots, from the main process
    # (the state dict is gathered on every process, as FSDP needs; named as in the uncompiled model)
    state_dict = {name.removeprefix("_orig_mod."): value for name, value in accelerator.get_state_dict(model).items()}
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    summary = run_summary(args, accelerator, unwrapped, tiles, len(dataset), state, schedule, elapsed)
    if accelerator.is_main_process:
        save_outputs(accelerator, output_dir, unwrapped, state_dict, visual_batch, summary, args)
        print_loss_summary(summary, output_dir)
        if args.push_to_hub:
            from ..hub import push_to_hub

            print(f"pushed to {push_to_hub(output_dir, summary['repo_id'], private=args.hub_private_repo)}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return PretrainResult(output_dir=output_dir, model=unwrapped, losses=list(state.losses), summary=summary)


def train_one_epoch(
    accelerator, model, optimizer, scheduler, dataloader, dataset, state: TrainingState, args: PretrainArguments,
    total_steps: int, after_step,
) -> None:  # fmt: skip
    """Train on the rest of epoch ``state.epoch`` (from ``state.batches_in_epoch`` on), updating ``state``.

    Calls ``after_step(metrics, num_images)`` after every optimizer step; returns early at ``total_steps``.
    """
    from ..data.transforms import DeviceAugmentation

    config = accelerator.unwrap_model(model).config
    device_augmentation = (
        DeviceAugmentation(config.image_size, config.normalization_mean, config.normalization_std) if args.augment_on_device else None
    )
    dataset.set_epoch(state.epoch)  # the augmentation; the loader sets its sampler's epoch
    dataloader.set_epoch(state.epoch)
    done = state.batches_in_epoch
    batches = accelerator.skip_first_batches(dataloader, done) if done else dataloader
    loss_sum, micro_batches = 0.0, 0
    for batch in batches:
        pixel_values = batch["pixel_values"]  # (B, C, H, W)
        with accelerator.accumulate(model):
            generator = seed_micro_step(args.seed, state.micro_step, accelerator.process_index)
            noise = torch.rand(config.mask_noise_shape(len(pixel_values)), generator=generator)  # (B, blocks)
            if device_augmentation:  # (B, 3, H, W) uint8 tiles -> augmented, normalised float32
                device_generator = torch.Generator(pixel_values.device).manual_seed(
                    derive_seed(args.seed, state.micro_step, accelerator.process_index, 2)
                )
                pixel_values = device_augmentation(pixel_values, device_generator)
            loss = model(pixel_values=pixel_values, noise=noise.to(accelerator.device)).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
                lr = scheduler.get_last_lr()[0]  # the lr of this update
            optimizer.step()  # skipped while accumulating
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        state.micro_step += 1
        state.batches_in_epoch += 1
        loss_sum, micro_batches = loss_sum + loss.detach(), micro_batches + 1
        if not accelerator.sync_gradients:
            continue

        # an optimizer step is done: its loss is the mean over micro-batches and processes
        state.step += 1
        step_loss = accelerator.reduce(loss_sum / micro_batches, reduction="mean").item()
        if not math.isfinite(step_loss):
            raise FloatingPointError(
                f"loss is {step_loss} at step {state.step}; lower --base-lr or set --max-grad-norm"
            )
        state.losses.append(step_loss)
        num_images = micro_batches * len(pixel_values) * accelerator.num_processes
        loss_sum, micro_batches = 0.0, 0
        after_step({"loss": step_loss, "lr": lr, "grad_norm": float(grad_norm)}, num_images)
        if state.step >= total_steps:
            return
    state.epoch += 1
    state.batches_in_epoch = 0


# -- outputs ---------------------------------------------------------------------------------------


def visualization_batch(source: str, config: HistoMIMConfig) -> torch.Tensor:
    """(N, C, H, W) tiles spread over the dataset, without augmentation: the same tiles in every grid."""
    from ..data.tiles import load_tile_dataset
    from ..data.transforms import eval_transform

    tiles = load_tile_dataset(source, transform=eval_transform(config.image_size, config.normalization_mean, config.normalization_std))
    indices = np.linspace(0, len(tiles) - 1, min(NUM_VISUALIZED, len(tiles))).round().astype(int)
    return torch.stack([tiles[int(i)]["pixel_values"] for i in indices])


@torch.no_grad()
def save_reconstructions(accelerator, model, pixel_values: torch.Tensor, path: Path, step: int, seed: int) -> Path:
    """Reconstruct the visualization tiles with fixed masks and save the grid (eval mode, then back)."""
    from .plots import save_reconstruction_grid

    model = accelerator.unwrap_model(model, keep_torch_compile=False)  # no recompilation for this batch
    config = model.config
    noise = torch.rand(config.mask_noise_shape(len(pixel_values)), generator=seeded_generator(seed, VISUALIZATION_KEY))
    was_training = model.training
    model.eval()
    with accelerator.autocast():
        outputs = model(pixel_values=pixel_values.to(accelerator.device), noise=noise.to(accelerator.device))
    model.train(was_training)
    values_per_patch = config.patch_size**2 * config.num_channels
    pixel_mask = model.unpatchify(outputs.mask.unsqueeze(-1).expand(-1, -1, values_per_patch))  # (B, C, H, W)
    title = f"{config.objective.upper()}, mask ratio {config.realised_mask_ratio():.2g}, step {step}"
    return save_reconstruction_grid(
        pixel_values, outputs.reconstruction, pixel_mask, path, config.normalization_mean, config.normalization_std, title
    )


def save_outputs(
    accelerator, output_dir: Path, model, state_dict, visual_batch, summary: dict, args: PretrainArguments
) -> None:
    """save_pretrained + image processor + plots + summary JSON + model card, into ``output_dir``."""
    from ..hub import write_model_card
    from .plots import save_loss_curve

    model.save_pretrained(output_dir, state_dict=state_dict)
    image_processor_for(model.config).save_pretrained(output_dir)
    save_reconstructions(
        accelerator, model, visual_batch, output_dir / "reconstruction.png", summary["steps"], args.seed
    )
    losses = summary.pop("losses")
    save_loss_curve(range(1, len(losses) + 1), losses, output_dir / "loss_curve.png",
                    title=f"{model.config.objective.upper()} loss ({summary['model_name']})")  # fmt: skip
    (output_dir / "pretrain_summary.json").write_text(
        json.dumps(jsonable({**summary, "losses": losses}), indent=1) + "\n"
    )
    write_model_card(output_dir, card_info(summary))
    summary["losses"] = losses


def run_summary(
    args: PretrainArguments, accelerator, model: HistoMIMForPreTraining, tiles: TileData, num_tiles: int,
    state: TrainingState, schedule: Schedule, elapsed: float,
) -> dict[str, Any]:  # fmt: skip
    """Everything worth knowing about the run, for pretrain_summary.json and the model card."""
    import transformers

    from .. import __version__

    losses = loss_summary(state.losses)
    encoder_parameters = sum(p.numel() for p in model.histomim.parameters())
    return {
        "model_name": Path(args.output_dir).name,
        "repo_id": args.hub_model_id or Path(args.output_dir).name,
        "preset": Path(args.config).name,  # a preset name, or the config folder's name
        "config": {name: getattr(model.config, name) for name in CARD_CONFIG_KEYS},
        "encoder_parameters": encoder_parameters,
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "data": {
            "inputs": tiles.inputs,
            "source": tiles.source,
            "slides": tiles.slides,
            "failed_slides": tiles.failed_slides,
            "num_tiles": num_tiles,
            "mpp": tiles.mpp,
            "tile_size": tiles.tile_size,
            "stain": args.stain,
        },  # fmt: skip
        "steps": state.step,
        "epochs": state.step / schedule.steps_per_epoch,
        **asdict(schedule),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "hardware": hardware_summary(accelerator),
        "elapsed_seconds": elapsed,
        **losses,
        "losses": list(state.losses),
        "versions": {
            "histomim": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "args": asdict(args),
    }


def card_info(summary: dict[str, Any]) -> dict[str, Any]:
    """The values the model card template names, from a run summary."""
    args, config, data = summary["args"], summary["config"], summary["data"]
    mpp = data["mpp"] or config["target_mpp"]
    return {
        "model_name": summary["model_name"],
        "repo_id": summary["repo_id"] if "/" in summary["repo_id"] else f"<user>/{summary['repo_id']}",
        "preset": summary["preset"],
        **config,
        "objective_name": {"mae": "masked autoencoding (MAE)", "simmim": "SimMIM"}[config["objective"]],
        "mpp_text": f"{mpp:g} um/px (about {10 / mpp:g}x)" if mpp else "unknown resolution",
        "encoder_parameters": f"{summary['encoder_parameters'] / 1e6:.1f}M",
        "total_parameters": f"{summary['total_parameters'] / 1e6:.1f}M",
        "sources": [Path(p).name for p in data["inputs"]],
        "slides": data["slides"],
        "num_slides": len(data["slides"]) or None,
        "num_tiles": data["num_tiles"],
        "tile_size": data["tile_size"] or config["image_size"],
        "stain": data["stain"],
        "steps": summary["steps"],
        "epochs_text": f"{summary['epochs']:.1f}",
        "global_batch_size": summary["global_batch_size"],
        "num_processes": summary["num_processes"],
        "batch_size": args["batch_size"],
        "grad_accum": args["grad_accum"],
        "weight_decay": args["weight_decay"],
        "lr": f"{summary['lr']:.3g}",
        "base_lr": f"{args['base_lr']:.3g}",
        "warmup_steps": summary["warmup_steps"],
        "mixed_precision": (summary["mixed_precision"] if summary["mixed_precision"] != "no" else "float32")
        + (", float8 matmuls in the transformer blocks (torchao)" if args["float8"] else ""),
        "first_loss": f"{summary['first_loss']:.4f}",
        "final_loss": f"{summary['last_loss']:.4f}",
        "final_loss_mean": f"{summary['last_mean']:.4f}",
        "loss_window": summary["window"],
        "hardware": summary["hardware"],
        "duration": format_duration(summary["elapsed_seconds"]),
        "histomim_version": summary["versions"]["histomim"],
        "torch_version": summary["versions"]["torch"],
        "transformers_version": summary["versions"]["transformers"],
        "license": args["license"],
    }


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s"


def tracker_config(args: PretrainArguments) -> dict[str, Any]:
    """Run arguments as scalars (TensorBoard's hparams take no lists or None)."""
    flat = {}
    for key, value in asdict(args).items():
        if isinstance(value, list):
            value = ",".join(map(str, value))
        flat[key] = "none" if value is None else value
    return flat


def print_loss_summary(summary: dict[str, Any], output_dir: Path) -> None:
    first, last, window = summary["first_mean"], summary["last_mean"], summary["window"]
    print(
        f"\nloss: {summary['first_loss']:.4f} at step 1 -> {summary['last_loss']:.4f} at step {summary['steps']} "
        f"(mean of the first / last {window} steps: {first:.4f} -> {last:.4f}, {summary['relative_change']:+.1%})\n"
        f"model, card and plots saved to {output_dir} in {format_duration(summary['elapsed_seconds'])}",
        file=sys.stdout,
        flush=True,
    )


__all__ = ["PretrainArguments", "PretrainResult", "pretrain", "load_model_config"]
