"""What a pretraining run reports: the run summary (``pretrain_summary.json``), the values the model
card template names, its published (redacted) form, and the closing line printed after training.

`histomim.hub` renders and uploads; this module decides what is said.
"""

from __future__ import annotations

import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .data.sources import TileData
from .mim.configuration_histomim import PIXEL_OBJECTIVES
from .mim.modeling_histomim import TRAINING_ONLY_PREFIXES
from .training.common import hardware_summary, jsonable, loss_summary

# Config values recorded in pretrain_summary.json and shown on the model card.
CARD_CONFIG_KEYS = (
    "image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "pooling", "pooled_size",
    "objective", "mask_ratio", "norm_pix_loss", "decoder_hidden_size", "decoder_num_hidden_layers", "target_mpp",
    "model_type", "depths", "hidden_sizes",
)  # fmt: skip
# A visual tokenizer's own settings, recorded beside its encoder's.
TOKENIZER_CONFIG_KEYS = ("codebook_size", "codebook_dim", "target", "teacher_name_or_path", "decoder_num_hidden_layers")
# What the summary and the card call each objective.
OBJECTIVE_NAMES = {
    "mae": "masked autoencoding (MAE)",
    "simmim": "SimMIM",
    "beit": "BEiT (masked prediction of visual tokens)",
    "latent": "latent-feature regression to an EMA teacher (data2vec)",
    "tokenizer": "a visual tokenizer",
    "fcmae": "masked convolutional autoencoding (FCMAE)",
}


def summary_config(config) -> dict[str, Any]:
    """The config values of the summary: the encoder's `CARD_CONFIG_KEYS`, plus a tokenizer's own settings (its
    `objective` is "tokenizer"), BEiT's tokenizer or the latent objective's teacher settings."""
    encoder = getattr(config, "encoder_config", config)
    values = {name: getattr(encoder, name, None) for name in CARD_CONFIG_KEYS}  # None: not this family's
    values["objective"] = config.objective
    if config.objective == "tokenizer":
        values |= {f"tokenizer_{name}": getattr(config, name) for name in TOKENIZER_CONFIG_KEYS}
        values["mask_ratio"] = None  # a tokenizer masks nothing
    elif config.objective == "beit":
        values |= {"tokenizer_name_or_path": config.tokenizer_name_or_path, "codebook_size": config.codebook_size}
    elif config.objective == "latent":
        values |= {name: getattr(config, name) for name in ("latent_top_k_layers", "teacher_momentum", "teacher_momentum_end")}
    return values


def objective_name(config: dict[str, Any]) -> str:
    """The objective as the card says it, with a tokenizer's target."""
    name = OBJECTIVE_NAMES[config["objective"]]
    if config["objective"] == "tokenizer":
        size = f"{config['tokenizer_codebook_size']} x {config['tokenizer_codebook_dim']} cosine codebook"
        if config["tokenizer_target"] == "teacher":
            return f"{name} (VQ-KD: a {size} distilling the patch features of `{Path(config['tokenizer_teacher_name_or_path']).name}`)"
        return f"{name} (VQ-VAE: a {size} reconstructing pixels)"
    return name


def run_summary(
    args, accelerator, model, tiles: TileData, num_tiles: int, state, schedule, elapsed: float
) -> dict[str, Any]:
    """Everything worth knowing about the run, for pretrain_summary.json and the model card.

    ``args``: the `PretrainArguments`; ``model``: the unwrapped `HistoMIMForPreTraining`; ``state`` and
    ``schedule``: the loop's `TrainingState` and `Schedule`.
    """
    import platform

    import torch
    import transformers

    from . import __version__

    losses = loss_summary(state.losses)
    encoder_parameters = sum(p.numel() for p in model.histomim.parameters())
    return {
        "model_name": Path(args.output_dir).name,
        "repo_id": args.hub_model_id or Path(args.output_dir).name,
        "preset": Path(args.config).name,  # a preset name, or the config folder's name
        "demo": args.demo,
        "config": summary_config(model.config),
        "encoder_parameters": encoder_parameters,
        # what is published: a tokenizer or EMA teacher used for the targets is not part of the model
        "total_parameters": sum(
            p.numel() for name, p in model.named_parameters() if not name.startswith(TRAINING_ONLY_PREFIXES)
        ),
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
        **losses,  # training losses, each taken before its step's update
        "losses": list(state.losses),
        "config_changes": list(state.config_changes),  # resumes with --allow-config-change
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
    mpp = data["mpp"]  # known only from the tiling (or the data); a preset's target is no measurement
    list_slides = args["card_list_slides"]
    return {
        "model_name": summary["repo_id"] if "/" in summary["repo_id"] else summary["model_name"],
        "repo_id": summary["repo_id"] if "/" in summary["repo_id"] else f"<user>/{summary['repo_id']}",
        "preset": summary["preset"],
        **config,
        "objective_name": objective_name(config),
        **card_architecture(config),
        "mpp_text": f"{mpp:g} um/px (about {10 / mpp:g}x)" if mpp else "unknown resolution",
        "encoder_parameters": f"{summary['encoder_parameters'] / 1e6:.1f}M",
        "total_parameters": f"{summary['total_parameters'] / 1e6:.1f}M",
        "sources": [Path(p).name for p in data["inputs"]] if list_slides else [],
        "num_sources": len(data["inputs"]),
        "slides": data["slides"] if list_slides else [],
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
        "saved_model_loss": f"{summary['saved_model_loss']:.4f}",
        "saved_model_loss_tiles": summary["saved_model_loss_tiles"],
        "config_changes": [
            f"at step {c['step']} ({c['checkpoint']}): "
            + ", ".join(f"{name} {old} -> {new}" for name, (old, new) in c["changes"].items())
            for c in summary["config_changes"]
        ],
        "loss_window": summary["window"],
        "hardware": summary["hardware"],
        "duration": format_duration(summary["elapsed_seconds"]),
        "histomim_version": summary["versions"]["histomim"],
        "torch_version": summary["versions"]["torch"],
        "transformers_version": summary["versions"]["transformers"],
        "license": args["license"],
        "license_name": args["license_name"],
        "license_link": args["license_link"],
        "datasets": card_datasets(args),
        **card_base_model(args),
        "gated_prompt": args["gated_prompt"],
        "gated_fields": args["gated_fields"],
        "has_reconstruction": config["objective"] in PIXEL_OBJECTIVES,
        "codebook": summary.get("codebook"),
    }


def card_architecture(config: dict[str, Any]) -> dict[str, str]:
    """How the card names the encoder: its kind and its shape."""
    if config.get("model_type") == "histomim_convnext":
        return {"architecture_name": "ConvNeXt", "encoder_text": (
            f"ConvNeXt, {len(config['depths'])} stages of {', '.join(map(str, config['depths']))} blocks, widths "
            f"{', '.join(map(str, config['hidden_sizes']))}, stride {config['patch_size']} px (the masked patch)")}  # fmt: skip
    return {"architecture_name": "Vision Transformer", "encoder_text": (
        f"ViT, {config['num_hidden_layers']} blocks, width {config['hidden_size']}, {config['num_attention_heads']} "
        f"heads, patch {config['patch_size']} px")}  # fmt: skip


def card_base_model(args: dict[str, Any]) -> dict[str, Any]:
    """``--init-from`` for the card: a Hub id is the ``base_model`` metadata; a local source is named by its
    file or folder name only (no local paths on a published card)."""
    source = args.get("init_from")
    if not source:
        return {"base_model": None, "init_from": None}
    hub = is_hub_id(source)
    return {"base_model": source if hub else None, "init_from": source if hub else Path(source).name}


def card_datasets(args: dict[str, Any]) -> list[str]:
    """Hub dataset ids for the card: given with --dataset-ids, or a Hub id given as --data."""
    if args["dataset_ids"]:
        return list(args["dataset_ids"])
    return [source for source in args["data"] if is_hub_id(source)]


def is_hub_id(source: str) -> bool:
    """``org/name`` that is not a local path."""
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and not Path(source).exists()


def public_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary as published: no absolute paths anywhere, slide names only with --card-list-slides."""
    public = redact_paths(jsonable(summary))
    if not summary["args"]["card_list_slides"]:
        data = public["data"]
        data["slides"] = len(summary["data"]["slides"])
        data["failed_slides"] = len(summary["data"]["failed_slides"])
        data["inputs"] = len(summary["data"]["inputs"])
        data["source"] = None
        public["args"]["data"] = len(summary["args"]["data"])
    return public


ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?[\\/](?:[^\s'\":,;]+[\\/])+([^\s'\":,;]*)")


def redact_paths(value: Any) -> Any:
    """Every absolute path inside strings of a JSON-like value -> its last component."""
    if isinstance(value, str):
        return ABSOLUTE_PATH.sub(lambda match: match.group(1), value)
    if isinstance(value, dict):
        return {key: redact_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact_paths(item) for item in value]
    return value


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s"


def print_loss_summary(summary: dict[str, Any], output_dir: Path) -> None:
    first, last, window = summary["first_mean"], summary["last_mean"], summary["window"]
    print(
        f"\nloss: {summary['first_loss']:.4f} at step 1 -> {summary['last_loss']:.4f} at step {summary['steps']} "
        f"(mean of the first / last {window} steps: {first:.4f} -> {last:.4f}, {summary['relative_change']:+.1%}); "
        f"the saved weights, reloaded: {summary['saved_model_loss']:.4f} on {summary['saved_model_loss_tiles']} fixed tiles\n"
        f"model, card and plots saved to {output_dir} in {format_duration(summary['elapsed_seconds'])}",
        file=sys.stdout,
        flush=True,
    )


__all__ = ["run_summary", "card_info", "public_summary", "redact_paths", "print_loss_summary", "format_duration"]
