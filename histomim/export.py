"""Checkpoint adapters between histomim and transformers' ViT family.

- `to_vit(model)`: a plain `transformers.ViTModel` (model_type "vit") with the same weights, for tools that
  only know ViT (Phikon-style pipelines) and should load it without remote code.
- `from_vit_mae(path)`: a `HistoMIMForPreTraining` initialised from a transformers `ViTMAEForPreTraining`
  checkpoint, for continued (domain-adaptive) pretraining from natural-image MAE weights.
- `from_vit_simmim(model)`, `from_beit(model)`: SimMIM and BEiT pretraining models with the weights of
  transformers' `ViTForMaskedImageModeling` and `BeitForMaskedImageModeling` (the benchmark's references).

Both directions share one table of hyperparameter names and one of parameter names, so they cannot
drift apart.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .mim.configuration_histomim import HistoMIMConfig
from .mim.modeling_histomim import HistoMIMForPreTraining, HistoMIMModel

# transformers renamed ViT's parameters in 5.x; both layouts are supported. histomim name -> transformers name.
HF_LAYOUTS = {
    "legacy": {  # e.g. encoder.layer.0.attention.attention.query.weight
        "layers": "encoder.layer.",
        "norm1": "layernorm_before", "norm2": "layernorm_after",
        "q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value",
        "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
    },
    "current": {  # e.g. layers.0.attention.q_proj.weight
        "layers": "layers.",
        "norm1": "layernorm_before", "norm2": "layernorm_after",
        "q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
        "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    },
}
RENAMED = ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2")

# histomim encoder parameter -> transformers ViT parameter, outside the blocks
HF_ENCODER_NAMES = {
    "embeddings.cls_token": "embeddings.cls_token",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.patch_embed.weight": "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embed.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}

# encoder hyperparameters that histomim's and transformers' ViT configs name alike
VIT_ENCODER_FIELDS = (
    "image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "qkv_bias", "hidden_act", "layer_norm_eps",
)


def vit_encoder_settings(config) -> dict:
    """The encoder hyperparameters of a histomim or transformers ViT-family config, to build the other's."""
    return {name: getattr(config, name) for name in VIT_ENCODER_FIELDS}


def hf_layout(state_keys) -> dict:
    """The naming layout of a transformers ViT-family state dict."""
    return HF_LAYOUTS["current" if any(".q_proj." in key for key in state_keys) else "legacy"]


def hf_blocks_to_histomim(state: dict, layout: dict, src: str, dst: str, depth: int) -> dict:
    """Map `depth` transformers ViT layers under prefix `src` to histomim blocks under `dst` (q, k, v fused)."""
    out = {}
    for i in range(depth):
        s, d = f"{src}{i}.", f"{dst}{i}."
        for kind in ("weight", "bias"):
            for name in RENAMED:
                out[f"{d}{name}.{kind}"] = state[f"{s}{layout[name]}.{kind}"]
            if f"{s}{layout['q']}.{kind}" in state:  # the qkv bias is optional
                out[f"{d}attn.qkv.{kind}"] = torch.cat([state[f"{s}{layout[n]}.{kind}"] for n in "qkv"], dim=0)
    return out


def histomim_blocks_to_hf(state: dict, layout: dict, src: str, dst: str, depth: int) -> dict:
    """Inverse of `hf_blocks_to_histomim`: split qkv, rename the rest."""
    out = {}
    for i in range(depth):
        s, d = f"{src}{i}.", f"{dst}{i}."
        for kind in ("weight", "bias"):
            for name in RENAMED:
                out[f"{d}{layout[name]}.{kind}"] = state[f"{s}{name}.{kind}"]
            if f"{s}attn.qkv.{kind}" in state:
                for n, part in zip("qkv", state[f"{s}attn.qkv.{kind}"].chunk(3, dim=0)):
                    out[f"{d}{layout[n]}.{kind}"] = part
    return out


def hf_encoder_to_histomim(state: dict, layout: dict, src: str, dst: str, depth: int) -> dict:
    """A transformers ViT encoder under prefix `src` (e.g. "vit.") -> histomim encoder parameters under `dst`."""
    mapped = {dst + ours: state[src + theirs] for ours, theirs in HF_ENCODER_NAMES.items()}
    return {**mapped, **hf_blocks_to_histomim(state, layout, src + layout["layers"], dst + "blocks.", depth)}


def histomim_encoder_to_hf(state: dict, layout: dict, depth: int) -> dict:
    """Inverse of `hf_encoder_to_histomim` for a bare encoder (no prefixes), as `transformers.ViTModel` names it."""
    mapped = {theirs: state[ours] for ours, theirs in HF_ENCODER_NAMES.items()}
    return {**mapped, **histomim_blocks_to_hf(state, layout, "blocks.", layout["layers"], depth)}


def to_vit(model) -> "transformers.ViTModel":  # noqa: F821
    """Export a histomim encoder (or a model containing one) as a plain `transformers.ViTModel`.

    The ViT has no pooling layer: take `last_hidden_state[:, 0]` (CLS) as the tile embedding. Register
    tokens and LayerScale have no ViT equivalent and are refused rather than silently dropped.
    """
    from transformers import ViTConfig, ViTModel

    encoder: HistoMIMModel = model if isinstance(model, HistoMIMModel) else model.histomim
    config: HistoMIMConfig = encoder.config
    if config.num_register_tokens or config.layerscale_init is not None:
        raise ValueError("to_vit: register tokens and LayerScale have no transformers ViT equivalent")

    vit_config = ViTConfig(**vit_encoder_settings(config), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    vit = ViTModel(vit_config, add_pooling_layer=False)
    mapped = histomim_encoder_to_hf(encoder.state_dict(), hf_layout(vit.state_dict()), config.num_hidden_layers)
    missing, unexpected = vit.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"to_vit: weight mapping incomplete (missing {missing}, unexpected {unexpected})")
    return vit.eval()


def from_vit_mae(path_or_model, **config_overrides) -> HistoMIMForPreTraining:
    """Build a `HistoMIMForPreTraining` (MAE) from a transformers `ViTMAEForPreTraining` directory or model.

    The encoder, decoder and fixed position embeddings are copied exactly, so with the same noise the
    two models compute the same loss. `config_overrides` (e.g. `mask_ratio`, `norm_pix_loss`) apply on top.
    """
    from transformers import ViTMAEForPreTraining

    if isinstance(path_or_model, (str, Path)):
        if not Path(path_or_model).is_dir():
            raise FileNotFoundError(f"from_vit_mae: no checkpoint directory at {path_or_model}")
        source = ViTMAEForPreTraining.from_pretrained(path_or_model)
    else:
        source = path_or_model
    src = source.config
    if src.model_type != "vit_mae":
        raise ValueError(f"from_vit_mae expects a vit_mae checkpoint, got model_type {src.model_type!r}")

    settings = dict(
        **vit_encoder_settings(src),
        decoder_hidden_size=src.decoder_hidden_size, decoder_num_hidden_layers=src.decoder_num_hidden_layers,
        decoder_num_attention_heads=src.decoder_num_attention_heads,
        decoder_intermediate_size=src.decoder_intermediate_size, mask_ratio=src.mask_ratio,
        norm_pix_loss=src.norm_pix_loss, initializer_range=src.initializer_range,
        objective="mae", position_embedding="sincos", pooling="cls",
    )
    settings.update(config_overrides)
    model = HistoMIMForPreTraining(HistoMIMConfig(**settings))

    state = source.state_dict()
    layout = hf_layout(state)
    mapped = {
        **hf_encoder_to_histomim(state, layout, "vit.", "histomim.", src.num_hidden_layers),
        "decoder.embed.weight": state["decoder.decoder_embed.weight"],
        "decoder.embed.bias": state["decoder.decoder_embed.bias"],
        "decoder.mask_token": state["decoder.mask_token"],
        "decoder.position_embeddings": state["decoder.decoder_pos_embed"],
        "decoder.norm.weight": state["decoder.decoder_norm.weight"],
        "decoder.norm.bias": state["decoder.decoder_norm.bias"],
        "decoder.pred.weight": state["decoder.decoder_pred.weight"],
        "decoder.pred.bias": state["decoder.decoder_pred.bias"],
        **hf_blocks_to_histomim(state, layout, "decoder.decoder_layers.", "decoder.blocks.", src.decoder_num_hidden_layers),
    }
    model.load_state_dict(mapped, strict=True)
    return model


def from_vit_simmim(model, **config_overrides) -> HistoMIMForPreTraining:
    """Build a SimMIM `HistoMIMForPreTraining` from a transformers `ViTForMaskedImageModeling` with the same
    weights (used to check that both compute the same loss for the same mask)."""
    src = model.config
    if src.encoder_stride != src.patch_size:
        raise ValueError("from_vit_simmim: encoder_stride must equal patch_size (one prediction per patch)")
    settings = dict(
        **vit_encoder_settings(src),
        objective="simmim", position_embedding="learned", pooling="cls", norm_pix_loss=False,
    )
    settings.update(config_overrides)
    ours = HistoMIMForPreTraining(HistoMIMConfig(**settings))

    state = model.state_dict()
    layout = hf_layout(state)
    patch, channels, dim = src.patch_size, src.num_channels, src.hidden_size
    # 1x1 conv + PixelShuffle orders outputs (channel, row, col); histomim patches are (row, col, channel)
    head_weight = state["decoder.0.weight"].view(channels, patch, patch, dim).permute(1, 2, 0, 3).reshape(-1, dim)
    head_bias = state["decoder.0.bias"].view(channels, patch, patch).permute(1, 2, 0).reshape(-1)
    mapped = {
        **hf_encoder_to_histomim(state, layout, "vit.", "histomim.", src.num_hidden_layers),
        "histomim.embeddings.mask_token": state["vit.embeddings.mask_token"],
        "simmim_head.weight": head_weight,
        "simmim_head.bias": head_bias,
    }
    ours.load_state_dict(mapped, strict=True)
    return ours


def from_beit(model, **config_overrides) -> HistoMIMForPreTraining:
    """Build a BEiT `HistoMIMForPreTraining` from a transformers `BeitForMaskedImageModeling` with the same
    weights (used to check that both compute the same loss for the same mask and codes).

    histomim's ViT has BEiT's shape when BEiT uses absolute position embeddings, no relative position bias,
    no layer scale and mean pooling (so that the MIM head's norm is the only final norm); BEiT's key has no
    bias, which becomes zeros in histomim's fused qkv bias. `config_overrides` must name the tokenizer
    (`tokenizer_name_or_path`) unless the caller passes `labels`.
    """
    src = model.config
    if src.use_relative_position_bias or src.use_shared_relative_position_bias or not src.use_absolute_position_embeddings:
        raise ValueError("from_beit: only BEiT with absolute position embeddings and no relative position bias maps to histomim")
    if src.layer_scale_init_value or not src.use_mean_pooling:
        raise ValueError("from_beit: set layer_scale_init_value=0 and use_mean_pooling=True (one final norm)")
    settings = dict(
        **{name: getattr(src, name) for name in VIT_ENCODER_FIELDS if name != "qkv_bias"}, qkv_bias=True,
        objective="beit", position_embedding="learned", pooling="cls", codebook_size=src.vocab_size,
    )
    settings.update(config_overrides)
    ours = HistoMIMForPreTraining(HistoMIMConfig(**settings))
    state = dict(model.state_dict())
    layout = hf_layout(state)
    for i in range(src.num_hidden_layers):  # BEiT's key projection has no bias
        state[f"beit.{layout['layers']}{i}.{layout['k']}.bias"] = torch.zeros(src.hidden_size)
    state["beit.layernorm.weight"], state["beit.layernorm.bias"] = state["layernorm.weight"], state["layernorm.bias"]
    mapped = {
        **hf_encoder_to_histomim(state, layout, "beit.", "histomim.", src.num_hidden_layers),
        "histomim.embeddings.mask_token": state["beit.embeddings.mask_token"],
        "beit_head.weight": state["lm_head.weight"],
        "beit_head.bias": state["lm_head.bias"],
    }
    ours.load_state_dict(mapped, strict=True)
    return ours


# histomim ConvNeXt parameter names -> transformers ConvNextModel's (regex, replacement), applied in order
CONVNEXT_RENAMES = (
    (r"^stem\.0\.", "embeddings.patch_embeddings."), (r"^stem\.1\.", "embeddings.layernorm."),
    (r"^stages\.(\d+)\.downsample\.", r"encoder.stages.\1.downsampling_layer."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"encoder.stages.\1.layers.\2."),
    (r"\.gamma$", ".layer_scale_parameter"), (r"\.norm\.", ".layernorm."), (r"\.fc1\.", ".pwconv1."),
    (r"\.fc2\.", ".pwconv2."), (r"^norm\.", "layernorm."),
)  # fmt: skip


def histomim_convnext_to_hf(state: dict) -> dict:
    """A bare histomim ConvNeXt encoder's state dict in transformers' `ConvNextModel` names."""
    import re

    renamed = {}
    for name, value in state.items():
        for pattern, replacement in CONVNEXT_RENAMES:
            name = re.sub(pattern, replacement, name)
        renamed[name] = value
    return renamed


def to_convnext(model) -> "transformers.ConvNextModel":  # noqa: F821
    """Export a histomim ConvNeXt encoder (or a model containing one) as a plain `transformers.ConvNextModel`
    with the same weights: without a mask both compute the same feature maps and pooled output."""
    from transformers import ConvNextConfig, ConvNextModel

    from .mim.modeling_histomim_convnext import HistoMIMConvNextModel

    encoder = model if isinstance(model, HistoMIMConvNextModel) else model.histomim
    config = encoder.config
    reference = ConvNextModel(ConvNextConfig(
        num_channels=config.num_channels, patch_size=config.stem_size, num_stages=len(config.depths),
        hidden_sizes=config.hidden_sizes, depths=config.depths, hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps, image_size=config.image_size, drop_path_rate=config.drop_path_rate,
        layer_scale_init_value=config.layerscale_init or 0.0,
    ))  # fmt: skip
    missing, unexpected = reference.load_state_dict(histomim_convnext_to_hf(encoder.state_dict()), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"to_convnext: weight mapping incomplete (missing {missing}, unexpected {unexpected})")
    return reference.eval()


__all__ = [
    "to_vit", "to_convnext", "histomim_convnext_to_hf", "from_vit_mae", "from_vit_simmim", "from_beit", "vit_encoder_settings",
    "hf_encoder_to_histomim", "histomim_encoder_to_hf", "hf_blocks_to_histomim", "histomim_blocks_to_hf",
]
