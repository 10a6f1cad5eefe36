"""The arguments of a pretraining run (`PretrainArguments`) and how they are read.

Every field is a flag of ``histomim pretrain`` / ``scripts/pretrain.py``; a JSON or YAML file with the
same keys is read with `parse_pretrain_arguments` (as transformers' ``run_mae.py`` reads its files):

    histomim pretrain --config histomim-vitb16 --data tiles/ --epochs 100
    histomim pretrain run.yaml

Without ``--data`` the demo runs, but only when asked (``--demo``) or when no flag is given at all:
training settings without data are an error rather than a silent demo.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from transformers.hf_argparser import HfArg, HfArgumentParser

DEFAULT_PRESET = "histomim-vit-tiny16"
DEFAULT_OUTPUT_DIR = "outputs/histomim-tiny-demo"
# The demo: the tiny preset on the sample slide, sized to finish in a minute or two on 2 CPU cores
# with a clearly falling loss (a higher base lr than MAE's 1.5e-4, which assumes a batch of 4096).
DEMO_DEFAULTS = {"image_size": 112, "max_steps": 150, "base_lr": 1.5e-3}
DEFAULT_EPOCHS = 100
MAE_BASE_LR = 1.5e-4
# Accelerate's trackers (accelerate.utils.LoggerType) -> the package each needs
TRACKERS = {
    "tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "comet_ml": "comet_ml", "aim": "aim",
    "mlflow": "mlflow", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
}  # fmt: skip
RUN_FILE_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass
class PretrainArguments:
    """Everything a pretraining run needs; every field is a ``--flag`` of ``histomim pretrain``."""

    config: str = HfArg(
        default=DEFAULT_PRESET,
        help="Model config: a preset in hub_configs/ (histomim-vit-tiny16, histomim-vits16, histomim-vitb16, "
        "histomim-vitl16, histomim-vitb16-simmim, histomim-convnext-atto), a config folder or a Hub id (default: histomim-vit-tiny16).",
    )
    data: list[str] = HfArg(
        default_factory=list,
        help="Training tiles: slide files or folders of slides (tiled first at --mpp into --tile-dir), or one tile "
        "source that load_tile_dataset reads (image folder, saved dataset, parquet, tile manifest or tile_slides "
        "folder, Hub dataset id). Required unless --demo, or no flag at all is given (then the demo runs).",
    )
    demo: bool = HfArg(
        default=False,
        help="Run the built-in demo: the CMU-1 sample slide instead of --data; unset flags take the demo's values "
        "(image size 112, 150 steps, base lr 1.5e-3). `histomim pretrain` without any flag is the demo too.",
    )
    init_from: str | None = HfArg(
        default=None,
        help="Start the encoder from existing weights instead of a random init: a saved histomim model (folder or "
        "Hub id) or a timm-layout ViT such as UNI, Virchow, H-optimus or DINOv2 (a .safetensors file, or a folder "
        "or Hub repo holding model.safetensors). The encoder's architecture comes from these weights; --config "
        "gives the objective, its decoder and, for timm weights, the number of attention heads. A Hub id becomes "
        "the card's base_model (default: random init).",
    )
    output_dir: str = HfArg(
        default=DEFAULT_OUTPUT_DIR, help=f"Where the model, plots and checkpoints go (default: {DEFAULT_OUTPUT_DIR})."
    )
    objective: Literal["mae", "simmim", "beit", "latent", "tokenizer", "fcmae"] | None = HfArg(
        default=None,
        help="Pretraining objective (default: the config's): mae, simmim, beit (predicts the codes of --tokenizer), "
        "latent (regresses an EMA teacher's features), tokenizer (trains a visual tokenizer for beit, distilling "
        "--teacher, or reconstructing pixels without one), or fcmae (a ConvNeXt --config only, e.g. "
        "histomim-convnext-atto). See docs/mim_family.md.",
    )
    tokenizer: str | None = HfArg(
        default=None,
        help="With --objective beit: the trained visual tokenizer (folder or Hub id) whose codes are the targets.",
    )
    teacher: str | None = HfArg(
        default=None,
        help="With --objective tokenizer: the frozen encoder (histomim or any AutoModel folder or Hub id, same patch "
        "size) whose patch features the tokenizer learns to reconstruct (VQ-KD); without it, pixels (VQ-VAE).",
    )
    codebook_size: int = HfArg(
        default=8192, help="With --objective tokenizer: number of codes (default: 8192; use fewer for small data)."
    )
    codebook_dim: int = HfArg(default=32, help="With --objective tokenizer: width of each code (default: 32).")
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
    tile_mpp: float | None = HfArg(
        default=None,
        help="Resolution (um/px) of pre-extracted tiles given as --data (image folder, dataset, parquet), recorded in "
        "the config and on the card (default: taken from a tile_slides folder, otherwise unknown).",
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
    allow_config_change: bool = HfArg(
        default=False,
        help="With --resume-from-checkpoint: resume even if the mask ratio, seed, batch size, gradient accumulation, "
        "objective or image size differ from the checkpoint's (default: refused, as the run would not continue the "
        "same training); the changes are recorded in pretrain_summary.json and on the model card.",
    )
    reconstruction_steps: int = HfArg(
        default=500,
        help="Save a PNG grid of original / masked / reconstruction every N steps and at the end; 0: only at the "
        "end (default: 500).",
    )
    report_to: str = HfArg(
        default="none",
        help="Accelerate trackers for loss, lr, grad norm, img/s and the reconstruction grids, comma-separated: "
        f"{', '.join(TRACKERS)}, 'all' (those installed) or 'none'; they log to <output-dir>/logs (default: none).",
    )
    push_to_hub: bool = HfArg(default=False, help="Upload the trained model to the Hugging Face Hub at the end.")
    hub_model_id: str | None = HfArg(
        default=None, help="Repository for --push-to-hub, e.g. org/histomim-vitb (default: the output folder's name)."
    )
    public: bool = HfArg(
        default=False, help="With --push-to-hub, create the repository public (default: private, as is safest for "
        "models trained on patient-derived data)."
    )
    card_list_slides: bool = HfArg(
        default=False,
        help="Name the training slides on the model card (default: counts only; slide names are often accession "
        "numbers).",
    )
    license: str = HfArg(
        default="apache-2.0",
        help="License of the published model, for the card: a Hub license id or 'other' (default: apache-2.0).",
    )
    license_name: str | None = HfArg(default=None, help="With --license other: the license's short name.")
    license_link: str | None = HfArg(default=None, help="With --license other: where the license text is (URL or LICENSE file).")
    dataset_ids: list[str] = HfArg(
        default_factory=list,
        help="Hub dataset ids the model was trained on, for the card's `datasets` metadata (default: a Hub dataset "
        "given as --data).",
    )
    gated_prompt: str | None = HfArg(
        default=None,
        help="Gate access on the Hub: the text users accept before downloading (card `extra_gated_prompt`; "
        "default: not gated).",
    )
    gated_fields: list[str] = HfArg(
        default_factory=list,
        help="With --gated-prompt: the text fields users fill in (card `extra_gated_fields`), e.g. Affiliation.",
    )

    @property
    def is_demo(self) -> bool:
        return self.demo or not self.data



# -- checks and defaults --------------------------------------------------------------------------


def with_demo_defaults(args: PretrainArguments) -> PretrainArguments:
    """Check the arguments and fill unset fields: the demo's settings for the demo, the general defaults otherwise.

    Raises:
        ValueError: training settings without --data or --demo (they would silently train the demo), or an
            out-of-range value, naming the flag.
    """
    if not args.data and not args.demo:
        given = [name for name in TRAINING_FIELDS if getattr(args, name) != FIELD_DEFAULTS[name]]
        if given:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
            raise ValueError(f"--data is required with {flags} (or add --demo to run the demo with these settings)")
    if args.data and args.demo:
        raise ValueError("--demo trains on the sample slide: give --data or --demo, not both")
    trackers(args.report_to)
    for flag, objective in (("teacher", "tokenizer"), ("tokenizer", "beit")):
        if getattr(args, flag) is not None and args.objective != objective:
            raise ValueError(f"--{flag} is used by --objective {objective} only, not with --objective {args.objective}")
    args = replace(args, demo=args.is_demo)  # recorded, and calling this again changes nothing
    demo = DEMO_DEFAULTS if args.demo else {}
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




# Fields that change what is trained; without --data they need --demo. The others (where outputs go,
# resources, logging, checkpoints, publishing) apply to the demo as to any run.
RUN_FIELDS = {
    "output_dir", "cpu", "num_workers", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
    "allow_config_change",
    "reconstruction_steps", "report_to", "push_to_hub", "hub_model_id", "public", "card_list_slides", "license",
    "license_name", "license_link", "dataset_ids", "gated_prompt", "gated_fields", "data", "demo",
}  # fmt: skip
FIELD_DEFAULTS = {
    field.name: field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    for field in dataclasses.fields(PretrainArguments)
}
TRAINING_FIELDS = tuple(name for name in FIELD_DEFAULTS if name not in RUN_FIELDS)


def trackers(report_to: str) -> list[str] | str | None:
    """``--report-to`` as Accelerate's ``log_with``; an unknown or uninstalled tracker is an error, not silence."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    if names in ([], ["none"]):
        return None
    if names == ["all"]:
        return "all"
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"--report-to {name!r} is not a tracker: choose from {', '.join(TRACKERS)}, all or none")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ImportError(f"--report-to {name} needs the {TRACKERS[name]} package: pip install {TRACKERS[name]}")
    return names


def parse_pretrain_arguments(argv: list[str] | None = None, prog: str | None = None, **parser_kwargs) -> PretrainArguments:
    """Flags, or one JSON/YAML run file with the same keys, -> checked `PretrainArguments` with defaults filled.

    ``parser_kwargs`` go to the ``argparse`` parser (description, formatter_class). Bad values exit with
    argparse's usage message naming the flag.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(PretrainArguments, prog=prog, **parser_kwargs)
    if len(argv) == 1 and argv[0].lower().endswith(RUN_FILE_SUFFIXES):
        run_file = Path(argv[0])
        if not run_file.is_file():
            parser.error(f"run file {run_file} does not exist")
        read = parser.parse_json_file if run_file.suffix.lower() == ".json" else parser.parse_yaml_file
        try:
            (args,) = read(run_file, allow_extra_keys=False)
        except ValueError as error:  # unknown keys, named by transformers
            parser.error(f"{run_file}: {error}")
    else:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        return with_demo_defaults(args)
    except (ValueError, ImportError) as error:
        parser.error(str(error))


__all__ = ["PretrainArguments", "parse_pretrain_arguments", "with_demo_defaults", "trackers", "DEMO_DEFAULTS"]
