"""Masked image modeling pretraining of a HistoMIM encoder with Accelerate (MAE, SimMIM, BEiT, latent targets),
and the training of BEiT's visual tokenizer (``--objective tokenizer``) by the same loop.

    histomim pretrain                                            # the built-in demo (see below)
    accelerate launch -m histomim.cli pretrain --config histomim-vitb16 --data slides/ --epochs 100
    torchrun --nproc_per_node 8 scripts/pretrain.py --data tiles/manifest.parquet --mixed-precision bf16

The demo (``--demo``, or no flag at all) has the tiny preset learn MAE on tiles of the CMU-1 sample
slide with `DEMO_DEFAULTS` (112 px, 150 steps), in a minute or two on 2 CPU cores. The arguments
are `histomim.training.arguments.PretrainArguments`; the run's summary and card values come from
`histomim.run_report`.

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

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path, give_normal_permissions
from ..data.sources import prepare_tiles
from ..mim import (
    HistoMIMConfig,
    HistoMIMConvNextConfig,
    HistoMIMConvNextForPreTraining,
    HistoMIMForPreTraining,
    HistoMIMTokenizerConfig,
    image_processor_for,
    tokenizer_for_teacher,
)
from ..mim.configuration_histomim import DEFAULT_MASK_RATIOS, PIXEL_OBJECTIVES
from ..presets import config_source, preset_names
from ..run_report import card_info, print_loss_summary, public_summary, run_summary
from .arguments import PretrainArguments, trackers, with_demo_defaults
from .common import (
    ThroughputMeter,
    checkpoint_settings,
    derive_seed,
    jsonable,
    load_checkpoint,
    make_adamw,
    require_finite,
    resolve_checkpoint,
    save_checkpoint,
    seeded_generator,
    warmup_cosine_schedule,
)
from .float8 import convert_to_float8
from .init_from import initial_encoder_settings, load_initial_encoder

# model_type -> (config class, pretraining class): every encoder family trains through the same loop
MODEL_FAMILIES = {
    HistoMIMConfig.model_type: (HistoMIMConfig, HistoMIMForPreTraining),
    HistoMIMConvNextConfig.model_type: (HistoMIMConvNextConfig, HistoMIMConvNextForPreTraining),
}
VISUALIZATION_KEY = 0x5EED  # keys the fixed mask noise of the reconstruction grids
NUM_VISUALIZED = 6
CODEBOOK_METRICS = ("perplexity", "codebook_usage")
CODEBOOK_REPORT_TILES = 1024  # tiles over which a trained tokenizer's code usage is reported


@dataclass
class PretrainResult:
    """What `pretrain` returns on every process."""

    output_dir: Path
    model: HistoMIMForPreTraining  # unwrapped, trained (a HistoMIMTokenizer with --objective tokenizer)
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
    # resumes that changed a setting (--allow-config-change): {"step", "checkpoint", "changes": {name: [old, new]}}
    config_changes: list[dict] = field(default_factory=list)


# The settings a resumed run must share with its checkpoint to continue the same training, as flags.
RESUME_SETTINGS = {
    "mask_ratio": "--mask-ratio", "seed": "--seed", "batch_size": "--batch-size", "grad_accum": "--grad-accum",
    "objective": "--objective", "image_size": "--image-size",
}  # fmt: skip


def run_settings(args: PretrainArguments, config: HistoMIMConfig) -> dict[str, Any]:
    """The `RESUME_SETTINGS` of this run (effective values: the config's mask ratio, objective and image size)."""
    # a tokenizer's config has no mask ratio or objective: those are the arguments'
    settings = {"mask_ratio": getattr(config, "mask_ratio", args.mask_ratio),
                "objective": getattr(config, "objective", args.objective), "image_size": config.image_size}  # fmt: skip
    return {name: settings.get(name, getattr(args, name, None)) for name in RESUME_SETTINGS}


def settings_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, list]:
    """``{name: [checkpoint's value, this run's]}`` for every setting that differs (none for unrecorded ones)."""
    saved = saved or {}
    return {name: [saved[name], value] for name, value in current.items() if name in saved and saved[name] != value}


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


def load_model_config(args: PretrainArguments, tile_mpp: float | None) -> HistoMIMConfig:
    """The preset/folder/Hub config with the command line's overrides applied (and validated)."""
    try:
        settings, _ = HistoMIMConfig.get_config_dict(config_source(args.config))
    except OSError as error:
        raise FileNotFoundError(
            f"--config {args.config!r} is not a config folder, a preset ({', '.join(preset_names())}) "
            f"or a reachable Hub id: {error}"
        ) from error
    if settings.get("model_type") not in MODEL_FAMILIES:
        raise ValueError(
            f"--config {args.config!r} is a {settings.get('model_type')!r} config, not one of {', '.join(map(repr, MODEL_FAMILIES))}"
        )
    cnn = settings["model_type"] == HistoMIMConvNextConfig.model_type
    if args.objective is not None and (args.objective == "fcmae") != cnn:
        needs = "a ConvNeXt --config (e.g. histomim-convnext-atto)" if not cnn else "a ViT --config (e.g. histomim-vit-tiny16)"
        raise ValueError(f"--objective {args.objective} needs {needs}; --config {args.config!r} is a {settings['model_type']!r} model")
    if args.init_from and settings["model_type"] != HistoMIMConfig.model_type:
        raise ValueError(f"--init-from starts ViT encoders; --config {args.config!r} is a {settings['model_type']!r} model")
    if args.init_from:  # the encoder's architecture is the source's
        settings.update(initial_encoder_settings(args.init_from, settings))
    # a tokenizer's encoder is the config's ViT; its own settings come from the tokenizer flags (see build_model)
    objective = args.objective if args.objective != "tokenizer" else None
    if objective is not None and objective != settings.get("objective"):
        settings["objective"] = objective
        if objective in ("beit", "latent"):  # their own usual ratio, not the preset's (MAE's or SimMIM's)
            settings["mask_ratio"] = DEFAULT_MASK_RATIOS[objective]
    if args.mask_ratio is not None:
        settings["mask_ratio"] = args.mask_ratio
    if args.tokenizer is not None and args.tokenizer != settings.get("tokenizer_name_or_path"):
        settings["tokenizer_name_or_path"] = args.tokenizer
        settings["codebook_size"] = None  # read from the new tokenizer
    settings["image_size"] = args.image_size or settings.get("image_size", 224)
    # metadata for the card and the users: the resolution the encoder learned, known from the tiling or
    # --tile-mpp; a preset's value is what it was designed for, not what these tiles are
    settings["target_mpp"] = tile_mpp
    settings["magnification"] = round(10.0 / tile_mpp, 1) if tile_mpp else None  # 0.5 um/px ~ 20x
    config_class, _ = MODEL_FAMILIES[settings["model_type"]]
    return config_class.from_dict(settings)


def build_model(args: PretrainArguments, config: HistoMIMConfig | HistoMIMConvNextConfig, announce=print):
    """The model the run trains, with its training-only targets attached (BEiT's tokenizer, the latent objective's
    teacher, a tokenizer's teacher): a `HistoMIMForPreTraining` (or the ConvNeXt's), or a `HistoMIMTokenizer` with
    --objective tokenizer. `announce` prints what --init-from loaded."""
    if args.objective == "tokenizer":
        if args.init_from:
            raise ValueError("--init-from starts the encoder of a pretraining run; a tokenizer (--objective tokenizer) starts from --config")
        tokenizer_config = HistoMIMTokenizerConfig(
            encoder_config=config, codebook_size=args.codebook_size, codebook_dim=args.codebook_dim,
            target="teacher" if args.teacher else "pixels", teacher_name_or_path=args.teacher,
        )  # fmt: skip
        return tokenizer_for_teacher(tokenizer_config)
    model = MODEL_FAMILIES[config.model_type][1](config)
    if args.init_from:
        announce(load_initial_encoder(model.histomim, args.init_from))
    model.prepare_targets()  # after --init-from: the latent objective's teacher copies the loaded encoder
    return model


def has_pixel_reconstruction(config) -> bool:
    """Whether the objective predicts pixels, so that reconstruction grids can show its predictions."""
    return getattr(config, "objective", None) in PIXEL_OBJECTIVES


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


def training_inputs(args: PretrainArguments, accelerator) -> list[str]:
    """``--data``, or the sample slide for the demo (fetched once, by the main process first)."""
    if not args.demo:
        return list(args.data)
    from ..data.samples import sample_slide_path

    with accelerator.main_process_first():
        return [str(sample_slide_path())]


def tile_dir(args: PretrainArguments, image_size: int) -> Path:
    """Where slide inputs are tiled: ``--tile-dir``, or one folder per resolution and size in the output."""
    return Path(args.tile_dir or Path(args.output_dir) / "tiles" / f"{args.mpp:g}mpp-{image_size}px")


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
    if args.demo:
        accelerator.print(
            f"demo: {args.config} learns {args.objective or 'its objective'} on tiles of the CMU-1 sample slide for "
            f"{args.max_steps or args.epochs} {'steps' if args.max_steps else 'epochs'} (give --data to train on your tiles)"
        )
    output_dir = Path(args.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # 1. data: tiles of the slides (or the given tile source), augmented per (seed, epoch, index)
    image_size = args.image_size or load_model_config(args, None).image_size
    tiles = prepare_tiles(training_inputs(args, accelerator), tile_dir(args, image_size), args.mpp, image_size, accelerator)
    if tiles.mpp is None:  # pre-extracted tiles: only the user knows their resolution
        tiles.mpp = args.tile_mpp
    config = load_model_config(args, tiles.mpp)
    # with --augment-on-device the workers only decode; the loop augments whole batches on the device
    if args.augment_on_device:
        transform = device_augmentation_worker_transform(config.image_size)
    else:
        transform = pretrain_transform(config.image_size, config.normalization_mean, config.normalization_std, seed=args.seed)
    # a truncated tile image or corrupt slide region is named, counted and replaced, not the end of the run
    dataset = load_tile_dataset(tiles.source, transform=transform, skip_unreadable=True)
    if len(dataset) < args.batch_size * accelerator.num_processes:
        raise ValueError(
            f"{tiles.source}: {len(dataset)} tiles are fewer than one batch across processes "
            f"({args.batch_size} x {accelerator.num_processes}); lower --batch-size or add data"
        )
    dataloader = accelerator.prepare(make_dataloader(dataset, args, accelerator))

    # 2. model, optimizer (lr scaled by the global batch, as MAE) and warmup + cosine schedule
    set_seed(args.seed)  # the same initialisation on every process
    model = build_model(args, config, accelerator.print)
    config = model.config  # a tokenizer's own config, around the encoder's
    if args.float8:
        accelerator.print(f"float8: {convert_to_float8(model)} linears run their matmuls in float8")
    schedule = Schedule.for_run(args, len(dataloader), accelerator.num_processes)
    optimizer = make_adamw(model, schedule.lr, args.weight_decay, betas=(0.9, 0.95), device=accelerator.device)
    scheduler = warmup_cosine_schedule(optimizer, schedule.warmup_steps, schedule.total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # 3. resume: weights, optimizer, schedule and RNG from the checkpoint, the loop position from its JSON
    state = TrainingState()
    settings = run_settings(args, config)
    if args.resume_from_checkpoint:
        checkpoint = resolve_checkpoint(args.resume_from_checkpoint, checkpoints_dir)
        changes = settings_changes(checkpoint_settings(checkpoint), settings)  # before loading: sizes may differ
        if changes and not args.allow_config_change:
            described = ", ".join(f"{RESUME_SETTINGS[name]} {old} -> {new}" for name, (old, new) in changes.items())
            raise ValueError(
                f"{checkpoint} was saved with other settings than this run ({described}): resuming would not "
                "continue the same training. Resume with the checkpoint's settings, or pass --allow-config-change "
                "to resume anyway (recorded in the summary and model card)"
            )
        saved = load_checkpoint(accelerator, checkpoint)
        state = TrainingState(**{name: saved[name] for name in asdict(state) if name in saved})
        if changes:
            state.config_changes.append({"step": state.step, "checkpoint": checkpoint.name, "changes": changes})
            accelerator.print(f"warning: --allow-config-change: resuming {checkpoint} with changed settings {changes}")
        if saved.get("schedule") != asdict(schedule):
            accelerator.print(
                f"warning: {checkpoint} was saved with the schedule {saved.get('schedule')}, now {schedule}"
            )
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")

    # 4. train, with logging, reconstruction grids and checkpoints after optimizer steps
    if args.report_to != "none":
        accelerator.init_trackers(output_dir.name, config=tracker_config(args))
    reconstructs = has_pixel_reconstruction(config)
    # fixed tiles for the reconstruction grids and the saved model's loss of record
    visual_batch = visualization_batch(tiles.source, config) if accelerator.is_main_process else None
    progress = tqdm(total=schedule.total_steps, initial=state.step, desc="pretraining", unit="step",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    start = time.perf_counter()

    def checkpoint() -> None:
        # a diverged last update must not become `latest` (nor push a good checkpoint out of the limit)
        require_finite(local_weights(accelerator, model),
                       f"not saving the checkpoint of step {state.step} (its last update diverged; lower --base-lr or set "
                       "--max-grad-norm), `latest` stays on the previous one")  # fmt: skip
        elapsed = state.elapsed + time.perf_counter() - start
        training_state = {**asdict(state), "elapsed": elapsed, "schedule": asdict(schedule), "settings": settings}
        save_checkpoint(accelerator, checkpoints_dir, state.step, training_state, args.checkpoints_total_limit)

    throughput = ThroughputMeter()

    def after_step(metrics: dict[str, float], num_images: int) -> None:
        throughput.update(num_images)
        metrics["img_per_s"] = throughput.rate
        progress.update()
        progress.set_postfix({name: f"{value:.4g}" for name, value in metrics.items()})
        if args.report_to != "none":
            accelerator.log({f"train/{name}": value for name, value in metrics.items()}, step=state.step)
        if reconstructs and accelerator.is_main_process and args.reconstruction_steps and state.step % args.reconstruction_steps == 0:
            grid = output_dir / "reconstructions" / f"step_{state.step:06d}.png"
            save_reconstructions(accelerator, model, visual_batch, grid, state.step, args.seed)
            if args.report_to != "none":
                log_image(accelerator, "train/reconstruction", grid, state.step)
        if args.checkpointing_steps and state.step % args.checkpointing_steps == 0:
            checkpoint()

    model.train()
    while state.step < schedule.total_steps:
        train_one_epoch(accelerator, model, optimizer, scheduler, dataloader, dataset, state, args,
                        schedule.total_steps, after_step)  # fmt: skip
    progress.close()
    if dataset.skipped_unreadable:
        accelerator.print(f"{dataset.skipped_unreadable} unreadable tiles were skipped (each named in a warning above)")
    if args.checkpointing_steps and state.step % args.checkpointing_steps != 0:
        checkpoint()
    elapsed = state.elapsed + time.perf_counter() - start

    # 5. the model, its processor, card and plots, from the main process
    # (the state dict is gathered on every process, as FSDP needs; named as in the uncompiled model)
    state_dict = {name.removeprefix("_orig_mod."): value for name, value in accelerator.get_state_dict(model).items()}
    require_finite(state_dict, f"not saving the final model to {output_dir}: after step {state.step} (its last update "
                               "diverged; lower --base-lr or set --max-grad-norm)")  # fmt: skip
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    summary = run_summary(args, accelerator, unwrapped, tiles, len(dataset), state, schedule, elapsed)
    if accelerator.is_main_process and args.objective == "tokenizer":
        summary["codebook"] = codebook_report(accelerator, unwrapped, tiles.source)
    if accelerator.is_main_process:
        save_outputs(accelerator, output_dir, unwrapped, state_dict, visual_batch, summary, args)
        print_loss_summary(summary, output_dir)
        if args.push_to_hub:
            from ..hub import push_to_hub

            published = {"pretrain_summary.json": json.dumps(public_summary(summary), indent=1) + "\n"}
            url = push_to_hub(output_dir, summary["repo_id"], private=not args.public, replace_files=published)
            print(f"pushed to {url} ({'public' if args.public else 'private'})")
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

    unwrapped = accelerator.unwrap_model(model)
    config = unwrapped.config
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
            noise_shape = config.mask_noise_shape(len(pixel_values))  # None: the model masks nothing
            noise = torch.rand(noise_shape, generator=generator).to(accelerator.device) if noise_shape else None
            if device_augmentation:  # (B, 3, H, W) uint8 tiles -> augmented, normalised float32
                device_generator = torch.Generator(pixel_values.device).manual_seed(
                    derive_seed(args.seed, state.micro_step, accelerator.process_index, 2)
                )
                pixel_values = device_augmentation(pixel_values, device_generator)
            outputs = model(pixel_values=pixel_values, noise=noise)
            loss = outputs.loss
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
        unwrapped.after_optimizer_step(state.step, total_steps)  # the latent objective's EMA teacher update
        step_loss = accelerator.reduce(loss_sum / micro_batches, reduction="mean").item()
        if not math.isfinite(step_loss):
            raise FloatingPointError(
                f"loss is {step_loss} at step {state.step}; lower --base-lr or set --max-grad-norm"
            )
        state.losses.append(step_loss)
        num_images = micro_batches * len(pixel_values) * accelerator.num_processes
        loss_sum, micro_batches = 0.0, 0
        metrics = {"loss": step_loss, "lr": lr, "grad_norm": float(grad_norm)}
        # a tokenizer's codebook health on the last micro-batch (perplexity, fraction of codes used)
        metrics |= {name: float(getattr(outputs, name)) for name in CODEBOOK_METRICS if getattr(outputs, name, None) is not None}
        after_step(metrics, num_images)
        if state.step >= total_steps:
            return
    state.epoch += 1
    state.batches_in_epoch = 0


def local_weights(accelerator, model) -> dict[str, torch.Tensor]:
    """The weights this process holds, named as in the saved model (what `require_finite` checks before a save)."""
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    return {name: parameter.detach() for name, parameter in unwrapped.named_parameters()}


# -- outputs ---------------------------------------------------------------------------------------


def visualization_batch(source: str, config: HistoMIMConfig) -> torch.Tensor:
    """(N, C, H, W) tiles spread over the dataset, without augmentation: the same tiles in every grid."""
    from ..data.tiles import load_tile_dataset
    from ..data.transforms import eval_transform

    tiles = load_tile_dataset(source, transform=eval_transform(config.image_size, config.normalization_mean, config.normalization_std),
                              skip_unreadable=True)  # fmt: skip
    indices = np.linspace(0, len(tiles) - 1, min(NUM_VISUALIZED, len(tiles))).round().astype(int)
    return torch.stack([tiles[int(i)]["pixel_values"] for i in indices])


@torch.no_grad()
def fixed_mask_outputs(accelerator, model, pixel_values: torch.Tensor, seed: int):
    """The model's outputs in eval mode on ``pixel_values`` ``(N, C, H, W)`` with the fixed visualization masks."""
    shape = model.config.mask_noise_shape(len(pixel_values))  # None: the model masks nothing (a tokenizer)
    noise = None if shape is None else torch.rand(shape, generator=seeded_generator(seed, VISUALIZATION_KEY))
    was_training = model.training
    model.eval()
    with accelerator.autocast():
        outputs = model(pixel_values=pixel_values.to(accelerator.device),
                        noise=None if noise is None else noise.to(accelerator.device))  # fmt: skip
    model.train(was_training)
    return outputs


@torch.no_grad()
def saved_model_loss(accelerator, model, output_dir: Path, pixel_values: torch.Tensor, seed: int) -> float:
    """The loss of the weights as saved: the ``*.safetensors`` written, loaded into a copy of the trained model
    (which keeps the training-only targets, a tokenizer or teacher, that are not saved), on the fixed
    visualization tiles."""
    import copy

    from safetensors.torch import load_file

    saved = copy.deepcopy(model)
    weights = {}
    for shard in sorted(output_dir.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    missing, unexpected = saved.load_state_dict(weights, strict=False)
    missing = [name for name in missing if not name.startswith(("tokenizer.", "teacher."))]
    if missing or unexpected:
        raise RuntimeError(f"{output_dir}: the saved weights do not match the model (missing {missing}, unexpected {unexpected})")
    return float(fixed_mask_outputs(accelerator, saved, pixel_values, seed).loss)


@torch.no_grad()
def save_reconstructions(accelerator, model, pixel_values: torch.Tensor, path: Path, step: int, seed: int) -> Path:
    """Reconstruct the visualization tiles with fixed masks and save the grid (eval mode, then back)."""
    from .plots import save_reconstruction_grid

    model = accelerator.unwrap_model(model, keep_torch_compile=False)  # no recompilation for this batch
    config = model.config
    outputs = fixed_mask_outputs(accelerator, model, pixel_values, seed)
    values_per_patch = config.patch_size**2 * config.num_channels
    pixel_mask = model.unpatchify(outputs.mask.unsqueeze(-1).expand(-1, -1, values_per_patch))  # (B, C, H, W)
    # the figure's own error: the masked-patch loss of these tiles, in the space the model is trained in
    title = (f"{config.objective.upper()}, mask ratio {config.realised_mask_ratio():.2g}, step {step}, "
             f"loss on these masked patches {float(outputs.loss):.3f}")  # fmt: skip
    normalized = config.objective in ("mae", "fcmae") and config.norm_pix_loss
    return save_reconstruction_grid(
        pixel_values, outputs.reconstruction, pixel_mask, path, config.normalization_mean, config.normalization_std,
        title, normalized_prediction=model.unpatchify(outputs.logits, pixel_values.shape[-2:]) if normalized else None,
    )


@torch.no_grad()
def codebook_report(accelerator, tokenizer, source: str, max_tiles: int = CODEBOOK_REPORT_TILES) -> dict[str, Any]:
    """A trained tokenizer's codes over (up to `max_tiles`) unaugmented training tiles: the fraction of the
    codebook used, the perplexity of the code histogram, and how many tiles and tokens that counts."""
    from ..data.tiles import load_tile_dataset
    from ..data.transforms import eval_transform
    from ..mim.modeling_tokenizer import code_statistics

    config = tokenizer.config
    tiles = load_tile_dataset(source, transform=eval_transform(config.image_size, config.normalization_mean, config.normalization_std))
    count = min(len(tiles), max_tiles)
    indices = []
    for start in range(0, count, 64):
        batch = torch.stack([tiles[i]["pixel_values"] for i in range(start, min(start + 64, count))])
        with accelerator.autocast():
            indices.append(tokenizer.get_codebook_indices(batch.to(accelerator.device)).cpu())
    perplexity, usage = code_statistics(torch.cat(indices), config.codebook_size)
    return {"codebook_size": config.codebook_size, "codebook_dim": config.codebook_dim, "target": config.target,
            "usage": float(usage), "perplexity": float(perplexity), "tiles": count, "tokens": int(torch.cat(indices).numel())}  # fmt: skip


def log_image(accelerator, name: str, png: Path, step: int) -> None:
    """Send a PNG to every tracker that takes images (TensorBoard wants NHWC arrays, the others a list)."""
    from PIL import Image

    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: pixels[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({name: [pixels]}, step=step)


def save_outputs(
    accelerator, output_dir: Path, model, state_dict, visual_batch, summary: dict, args: PretrainArguments
) -> None:
    """save_pretrained + image processor + plots + summary JSON + model card, into ``output_dir``."""
    from ..hub import write_model_card
    from .plots import save_loss_curve

    model.save_pretrained(output_dir, state_dict=state_dict)  # without training-only tokenizer or teacher
    for weights in output_dir.glob("*.safetensors"):
        give_normal_permissions(weights)
    # the summary's loss of record is that of the file written, not of the last training step (taken before its update)
    summary["saved_model_loss"] = saved_model_loss(accelerator, model, output_dir, visual_batch, args.seed)
    summary["saved_model_loss_tiles"] = len(visual_batch)
    image_processor_for(model.config).save_pretrained(output_dir)
    if has_pixel_reconstruction(model.config):
        save_reconstructions(
            accelerator, model, visual_batch, output_dir / "reconstruction.png", summary["steps"], args.seed
        )
    losses = summary.pop("losses")
    save_loss_curve(range(1, len(losses) + 1), losses, output_dir / "loss_curve.png",
                    title=f"{model.config.objective.upper()} loss ({summary['model_name']})")  # fmt: skip
    with atomic_path(output_dir / "pretrain_summary.json") as partial:
        partial.write_text(json.dumps(jsonable({**summary, "losses": losses}), indent=1) + "\n")
    write_model_card(output_dir, card_info(summary))
    summary["losses"] = losses


def tracker_config(args: PretrainArguments) -> dict[str, Any]:
    """Run arguments as scalars (TensorBoard's hparams take no lists or None)."""
    flat = {}
    for key, value in asdict(args).items():
        if isinstance(value, list):
            value = ",".join(map(str, value))
        flat[key] = "none" if value is None else value
    return flat




__all__ = ["PretrainArguments", "PretrainResult", "pretrain", "load_model_config"]
