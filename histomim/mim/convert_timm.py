"""Import timm-layout ViT checkpoints (UNI, Virchow, H-optimus, DINOv2, ...) into `HistoMIMModel`.

Most pathology foundation models are published as timm `VisionTransformer` state dicts, and DINOv2's own
checkpoints use nearly the same names. This adapter maps them onto histomim's encoder so that continued,
domain-adaptive pretraining (`histomim pretrain --init-from`) can start from them:

    patch_embed.proj.{weight,bias}                  -> embeddings.patch_embed.{weight,bias}
    cls_token, pos_embed                            -> embeddings.cls_token, embeddings.position_embeddings
    reg_token (timm) | register_tokens (DINOv2)     -> embeddings.register_tokens
    blocks.N.{norm1,attn.qkv,attn.proj,norm2}       -> blocks.N.{same}
    blocks.N.ls1.gamma, blocks.N.ls2.gamma          -> blocks.N.{ls1,ls2}.gamma (LayerScale)
    blocks.N.mlp.{fc1,fc2}                          -> blocks.N.mlp.{fc1,fc2}: GELU MLP, or packed SwiGLU
    blocks.N.mlp.{w12,w3} (DINOv2)                  -> blocks.N.mlp.{fc1,fc2}: packed SwiGLU
    blocks.N.mlp.{fc1_g,fc1_x,fc2} (timm SwiGLU)    -> blocks.N.mlp.fc1 = [fc1_g; fc1_x], fc2
    norm.{weight,bias}                              -> norm.{weight,bias}

Position embeddings: timm either embeds the prefix tokens too (`pos_embed` of 1 + R + L rows, added after
the CLS/register tokens are prepended) or not (`no_embed_class`: L rows, added to the patches only, as in
DINOv2-with-registers models). histomim embeds CLS and patches and no register token, so a CLS or register
position row is folded into its token (a constant plus a constant), which computes exactly the same thing.

The weights say everything but the number of attention heads, which `num_attention_heads` gives. Keys the
adapter does not know (e.g. a classifier `head`, `fc_norm`, q/k norms) and keys an encoder needs but the
state dict lacks are errors that list them; nothing is dropped silently. The one key dropped by design is
DINOv2's `mask_token` (its iBOT objective's; an encoder never uses it).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .configuration_histomim import HistoMIMConfig
from .modeling_histomim import HistoMIMModel, resize_position_embedding

# Keys of timm/DINOv2 checkpoints that belong to no encoder computation.
DROPPED_KEYS = ("mask_token",)
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
# histomim block parameter -> the same in timm (identical names)
SAME_BLOCK_NAMES = (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "ls1.gamma", "ls2.gamma",
)  # fmt: skip
# mlp parameter names per layout: timm plain / timm SwiGLUPacked share fc1, fc2
MLP_LAYOUTS = {
    "fc": ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"),
    "w12": ("mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias"),
    "split": (
        "mlp.fc1_g.weight", "mlp.fc1_g.bias", "mlp.fc1_x.weight", "mlp.fc1_x.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    ),
}  # fmt: skip
TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.safetensors")


def load_timm_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A timm-layout state dict from a `.safetensors` file or a folder holding `model.safetensors`
    (the layout of timm's Hub repos). Pickled checkpoints (`.bin`, `.pth`) are refused: convert them first."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        found = [path / name for name in TIMM_WEIGHT_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds no {' or '.join(TIMM_WEIGHT_FILES)} (timm-layout weights)")
        path = found[0]
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors weights are read (pickle checkpoints can run code when loaded)")
    if not path.is_file():
        raise FileNotFoundError(f"no timm-layout weights at {path}")
    return load_file(str(path))


def is_timm_vit_state_dict(state: dict) -> bool:
    """Whether a state dict has timm's ViT names (rather than histomim's or transformers')."""
    return "patch_embed.proj.weight" in state


def mlp_layout(state: dict) -> str:
    """Which MLP naming the blocks use: `fc` (GELU MLP or packed SwiGLU), `w12` (DINOv2) or `split` (timm SwiGLU)."""
    for layout, names in MLP_LAYOUTS.items():
        if f"blocks.0.{names[0]}" in state:
            return layout
    found = sorted(key for key in state if key.startswith("blocks.0.mlp."))
    raise KeyError(f"unknown MLP layout in block 0: {found or 'no blocks.0.mlp.* keys'}")


def timm_vit_settings(state: dict, num_attention_heads: int, swiglu: bool | None = None) -> dict:
    """The HistoMIMConfig encoder settings a timm-layout state dict implies (everything its shapes say).

    `swiglu`: whether an `fc1`/`fc2` MLP is a packed SwiGLU (timm's `SwiGLUPacked`, Virchow) rather than a
    GELU MLP; the shapes cannot tell. Default: False for `fc` names; `w12` and split names are always SwiGLU.
    """
    if not is_timm_vit_state_dict(state):
        raise KeyError(f"not a timm-layout ViT: no patch_embed.proj.weight among {sorted(state)[:8]} ...")
    proj = state["patch_embed.proj.weight"]  # (D, C, p, p)
    hidden_size, num_channels, patch_size = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = 1 + max(int(match.group(1)) for key in state if (match := BLOCK_KEY.match(key)))
    layout = mlp_layout(state)
    gated = layout != "fc" or bool(swiglu)
    fc2_in = state[f"blocks.0.{MLP_LAYOUTS[layout][-2]}"].shape[1]  # the (gated) hidden width
    registers = register_tokens(state)
    num_registers = 0 if registers is None else registers.shape[1]
    grid = round((state["pos_embed"].shape[1] - position_prefix_rows(state, num_registers)) ** 0.5)
    return dict(
        image_size=grid * patch_size,
        patch_size=patch_size,
        num_channels=num_channels,
        hidden_size=hidden_size,
        num_hidden_layers=depth,
        num_attention_heads=num_attention_heads,
        intermediate_size=fc2_in,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        hidden_act="silu" if gated else "gelu",
        mlp_type="swiglu" if gated else "mlp",
        num_register_tokens=num_registers,
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in state else None,
        position_embedding="learned",
    )


def register_tokens(state: dict) -> torch.Tensor | None:
    """(1, R, D) register tokens under timm's (`reg_token`) or DINOv2's (`register_tokens`) name, or None."""
    return state.get("reg_token", state.get("register_tokens"))


def position_prefix_rows(state: dict, num_registers: int) -> int:
    """How many prefix tokens timm's `pos_embed` covers: 0 (`no_embed_class`), 1 (CLS) or 1 + registers,
    whichever leaves a square patch grid."""
    num_rows = state["pos_embed"].shape[1]
    fits = [n for n in dict.fromkeys((0, 1, 1 + num_registers)) if round((num_rows - n) ** 0.5) ** 2 == num_rows - n]
    if len(fits) != 1:
        raise ValueError(
            f"pos_embed has {num_rows} rows: cannot tell its prefix rows (0, CLS, or CLS + {num_registers} registers) "
            "from a square patch grid"
        )
    return fits[0]


def split_position_embedding(state: dict, num_registers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm's `pos_embed` -> (1, 1, D) CLS row, (1, R, D) register rows, (1, L, D) patch rows; zeros for the
    prefix tokens timm gives no position (`no_embed_class`, or registers added after the position embedding)."""
    pos_embed = state["pos_embed"]  # (1, [1 [+ R]] + L, D)
    num_prefix = position_prefix_rows(state, num_registers)
    zeros = pos_embed.new_zeros(1, 1 + num_registers, pos_embed.shape[-1])  # (1, 1 + R, D)
    prefix = torch.cat([pos_embed[:, :num_prefix], zeros[:, num_prefix:]], dim=1)  # (1, 1 + R, D)
    return prefix[:, :1], prefix[:, 1:], pos_embed[:, num_prefix:]


def convert_timm_vit_state_dict(state: dict, config: HistoMIMConfig) -> dict[str, torch.Tensor]:
    """A timm-layout ViT state dict -> `HistoMIMModel` parameters for `config`.

    Patch position embeddings are resized (bicubic) when `config.image_size` differs from the checkpoint's
    grid. Raises KeyError listing any key that is neither mapped nor in `DROPPED_KEYS`, and any missing one.
    """
    state = dict(state)
    used = set(DROPPED_KEYS)

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise KeyError(f"timm checkpoint lacks {key!r}, which a {config_summary(config)} encoder needs")
        used.add(key)
        return state[key]

    cls_position, register_positions, patch_positions = split_position_embedding(state, config.num_register_tokens)
    used.add("pos_embed")
    grid = config.image_size // config.patch_size
    patch_positions = resize_position_embedding(patch_positions, (grid, grid))
    out = {
        "embeddings.patch_embed.weight": take("patch_embed.proj.weight"),
        "embeddings.patch_embed.bias": take("patch_embed.proj.bias"),
        "embeddings.cls_token": take("cls_token") + cls_position,
        "embeddings.position_embeddings": torch.cat([torch.zeros_like(cls_position), patch_positions], dim=1),
        "norm.weight": take("norm.weight"),
        "norm.bias": take("norm.bias"),
    }
    if config.num_register_tokens:
        name = "reg_token" if "reg_token" in state else "register_tokens"
        out["embeddings.register_tokens"] = take(name) + register_positions

    layout = mlp_layout(state)
    block_names = [name for name in SAME_BLOCK_NAMES if config.layerscale_init is not None or not name.startswith("ls")]
    if not config.qkv_bias:
        block_names.remove("attn.qkv.bias")
    for i in range(config.num_hidden_layers):
        prefix = f"blocks.{i}."
        out.update({prefix + name: take(prefix + name) for name in block_names})
        if layout == "split":  # histomim packs the gate first, as DINOv2's w12
            fc1_g_w, fc1_g_b, fc1_x_w, fc1_x_b, fc2_w, fc2_b = (take(prefix + name) for name in MLP_LAYOUTS["split"])
            fc1_w, fc1_b = torch.cat([fc1_g_w, fc1_x_w]), torch.cat([fc1_g_b, fc1_x_b])
        else:
            fc1_w, fc1_b, fc2_w, fc2_b = (take(prefix + name) for name in MLP_LAYOUTS[layout])
        out.update({prefix + "mlp.fc1.weight": fc1_w, prefix + "mlp.fc1.bias": fc1_b,
                    prefix + "mlp.fc2.weight": fc2_w, prefix + "mlp.fc2.bias": fc2_b})  # fmt: skip

    unknown = sorted(set(state) - used)
    if unknown:
        raise KeyError(f"timm checkpoint keys with no place in a {config_summary(config)} encoder: {unknown}")
    return out


def config_summary(config: HistoMIMConfig) -> str:
    return (f"{config.num_hidden_layers}-block, {config.hidden_size}-wide ({config.mlp_type}, "
            f"{config.num_register_tokens} registers, layer-scale {'on' if config.layerscale_init is not None else 'off'})")  # fmt: skip


def from_timm_vit(
    state_or_path: dict | str | Path, num_attention_heads: int, swiglu: bool | None = None, **config_overrides
) -> HistoMIMModel:
    """A `HistoMIMModel` with the weights of a timm-layout ViT (a state dict, `.safetensors` file or folder).

    `num_attention_heads`: the checkpoint's heads (not recorded in its weights: ViT-L/UNI 16, ViT-H/Virchow 16,
    ViT-g/H-optimus 24). `swiglu`: an `fc1`/`fc2` MLP is a packed SwiGLU (Virchow). `config_overrides` apply
    to the config (e.g. `pooling="cls+mean"`, `image_size=224` to resize the position embeddings, the
    normalization the model was trained with). Its outputs equal the timm model's (eval mode).
    """
    state = load_timm_state_dict(state_or_path) if isinstance(state_or_path, (str, Path)) else state_or_path
    config = HistoMIMConfig(**{**timm_vit_settings(state, num_attention_heads, swiglu), **config_overrides})
    model = HistoMIMModel(config)
    model.load_state_dict(convert_timm_vit_state_dict(state, config), strict=True)
    return model.eval()


__all__ = [
    "from_timm_vit", "convert_timm_vit_state_dict", "timm_vit_settings", "load_timm_state_dict",
    "is_timm_vit_state_dict",
]
