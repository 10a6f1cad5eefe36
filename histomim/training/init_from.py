"""`--init-from`: start pretraining from an existing encoder instead of a random initialisation.

The source is a saved histomim model (a folder or a Hub id: an encoder, or a pretraining checkpoint whose
objective head is left behind) or a timm-layout ViT (UNI, Virchow, H-optimus, DINOv2: a `.safetensors` file,
or a folder / Hub repo holding `model.safetensors`, mapped by `histomim.mim.convert_timm`). The encoder's
architecture comes from the source; the objective, its decoder or head and the number of attention heads of
a timm source (not recorded in its weights) come from `--config`.

    histomim pretrain --config histomim-vitl16 --init-from MahmoodLab/UNI --data tiles/
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..mim import HistoMIMConfig, HistoMIMModel
from ..mim.convert_timm import convert_timm_vit_state_dict, load_timm_state_dict, timm_vit_settings
from ..mim.modeling_histomim import resize_position_embedding

# HistoMIMConfig fields that define the encoder (and its input normalisation), taken from a histomim source
ENCODER_FIELDS = (
    "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "mlp_ratio", "qkv_bias", "hidden_act", "layer_norm_eps", "layerscale_init", "num_register_tokens",
    "position_embedding", "pooling", "mlp_type", "image_size", "normalization_mean", "normalization_std",
)  # fmt: skip
# what the new model may have that an encoder source never has: SimMIM's mask token (kept at its init)
NOT_IN_SOURCE = {"embeddings.mask_token"}


def local_source(source: str) -> Path:
    """The source as a local file or folder: as given, or the Hub repo's snapshot (config and safetensors
    only; from the local cache under HF_HUB_OFFLINE=1)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as error:  # invalid id, not found, offline without a cached copy
        raise FileNotFoundError(f"--init-from {source!r} is neither a local file or folder nor a reachable Hub repo: {error}") from error


def source_kind(path: Path) -> str:
    """`histomim` (a saved histomim model) or `timm` (timm-layout ViT weights)."""
    config_file = path / "config.json"
    if path.is_dir() and config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == HistoMIMConfig.model_type:
        return "histomim"
    if path.suffix == ".safetensors" or (path.is_dir() and (path / "model.safetensors").is_file()):
        return "timm"
    raise ValueError(
        f"--init-from {path}: neither a histomim model (config.json with model_type 'histomim') nor timm-layout "
        "weights (a .safetensors file or a folder with model.safetensors)"
    )


def timm_weight_shapes(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as meta tensors: their shapes, without reading gigabytes of weights."""
    from safetensors import safe_open

    file = path / "model.safetensors" if path.is_dir() else path
    with safe_open(str(file), framework="pt") as weights:
        return {name: torch.empty(weights.get_slice(name).get_shape(), device="meta") for name in weights.keys()}


def timm_is_swiglu(path: Path, preset: dict) -> bool:
    """Whether `fc1`/`fc2` MLPs are packed SwiGLU (Virchow): said by timm's config.json (`model_args.mlp_layer`,
    e.g. "timm.layers.SwiGLUPacked") or by `--config` (`mlp_type: swiglu`); the shapes cannot tell."""
    config_file = path / "config.json" if path.is_dir() else path.with_name("config.json")
    model_args = json.loads(config_file.read_text()).get("model_args", {}) if config_file.is_file() else {}
    return "swiglu" in str(model_args.get("mlp_layer", "")).lower() or preset.get("mlp_type") == "swiglu"


def initial_encoder_settings(source: str, preset: dict) -> dict:
    """The encoder fields of the HistoMIMConfig that `source` implies; `preset` is the `--config` dict."""
    path = local_source(source)
    if source_kind(path) == "histomim":
        settings, _ = HistoMIMConfig.get_config_dict(str(path))
        return {name: settings[name] for name in ENCODER_FIELDS if name in settings}
    heads = preset.get("num_attention_heads")
    return timm_vit_settings(timm_weight_shapes(path), heads, swiglu=timm_is_swiglu(path, preset))


def load_initial_encoder(encoder: HistoMIMModel, source: str) -> str:
    """Copy the source's encoder weights into `encoder` (built from `initial_encoder_settings`); patch position
    embeddings are resized to the encoder's image size. Returns a line saying what was loaded."""
    path = local_source(source)
    if source_kind(path) == "histomim":
        state = HistoMIMModel.from_pretrained(str(path)).state_dict()
        grid = encoder.config.image_size // encoder.config.patch_size
        positions = state["embeddings.position_embeddings"]  # (1, 1 + L, D)
        state["embeddings.position_embeddings"] = torch.cat(
            [positions[:, :1], resize_position_embedding(positions[:, 1:], (grid, grid))], dim=1
        )
    else:
        state = convert_timm_vit_state_dict(load_timm_state_dict(path), encoder.config)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if set(missing) - NOT_IN_SOURCE or unexpected:
        raise RuntimeError(f"--init-from {source}: weights do not fit the encoder (missing {missing}, unexpected {unexpected})")
    return f"init-from: the encoder starts from {source} ({len(state)} tensors)"


__all__ = ["initial_encoder_settings", "load_initial_encoder", "local_source"]
