"""HistoMIM: a ViT encoder for histology with MAE and SimMIM pretraining, as transformers models.

Read top to bottom: position embeddings -> patch embedding -> attention/MLP/block -> encoder ->
`HistoMIMModel` (what `AutoModel` returns; never masks unless asked) -> MAE decoder ->
`HistoMIMForPreTraining` (masking + objective) -> `HistoMIMForImageClassification` ->
`HistoMIMForSemanticSegmentation`.

Imports of sibling files are relative on purpose: a saved model carries these files and loads with
`trust_remote_code=True` where histomim itself is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput, SemanticSegmenterOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit.modeling_vit import eager_attention_forward
from transformers.utils import ModelOutput

from .configuration_histomim import BLOCK_WISE_OBJECTIVES, HistoMIMConfig
from .masking import block_random_mask, block_wise_masking, random_block_masking


# --------------------------------------------------------------------------- position embeddings


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) positions -> (N, dim) as [sin | cos] over dim/2 geometric frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    angles = positions.double()[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_position_embedding(grid_size: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding for a square patch grid, with a zero row for the CLS token.

    Layout per patch: [sin_w | cos_w | sin_h | cos_h] (column first), the layout of the original MAE
    weights, so embeddings imported from facebookresearch/mae or transformers' ViTMAE are identical.

    Returns: (1 + grid_size**2, dim) float32
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embeddings need a hidden size divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    patch_embed = torch.cat([sincos_1d(cols.flatten(), dim // 2), sincos_1d(rows.flatten(), dim // 2)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), patch_embed]).float()  # (1 + L, D)


def resize_position_embedding(patch_pos: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize (1, L, D) patch position embeddings of a square grid to `grid_hw` (as ViT does)."""
    old = int(math.sqrt(patch_pos.shape[1]))
    if (old, old) == grid_hw:
        return patch_pos
    dim = patch_pos.shape[-1]
    grid = patch_pos.reshape(1, old, old, dim).permute(0, 3, 1, 2)  # (1, D, old, old)
    grid = F.interpolate(grid.float(), size=grid_hw, mode="bicubic", align_corners=False).to(patch_pos.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, grid_hw[0] * grid_hw[1], dim)  # (1, h*w, D)


# --------------------------------------------------------------------------- pixels <-> patches


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patch pixels ordered (row, col, channel) as in MAE."""
    batch, channels, height, width = pixel_values.shape
    h, w = height // patch_size, width // patch_size
    x = pixel_values.reshape(batch, channels, h, patch_size, w, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, h * w, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, image_hw: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W); the inverse of `patchify`."""
    batch = patches.shape[0]
    h, w = image_hw[0] // patch_size, image_hw[1] // patch_size
    x = patches.reshape(batch, h, w, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, h * patch_size, w * patch_size)


# --------------------------------------------------------------------------- building blocks


class HistoMIMPatchEmbeddings(nn.Module):
    """The p x p / p patch conv, computed as one matmul over flattened patches, optionally of the visible
    patches only (MAE embeds nothing it then drops).

    A module that is called, not a weight read by its parent: its hooks run, so `get_input_embeddings()`
    (which returns it) works with `enable_input_require_grads()` and accelerate's offloading hooks.
    The parameters keep `nn.Conv2d`'s layout and names, so checkpoints and the ViT export are unchanged.
    """

    def __init__(self, config: HistoMIMConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.weight = nn.Parameter(torch.empty(config.hidden_size, config.num_channels, config.patch_size, config.patch_size))
        self.bias = nn.Parameter(torch.empty(config.hidden_size))

    def forward(self, pixel_values: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) pixels, optional (B, K) visible patch indices -> (B, K|L, D) patch embeddings."""
        patch_pixels = patchify(pixel_values.to(self.weight.dtype), self.patch_size)  # (B, L, p*p*C)
        if ids_keep is not None:
            patch_pixels = gather_tokens(patch_pixels, ids_keep)  # (B, K, p*p*C)
        # the conv weight flattened in patchify's (row, col, channel) order
        return F.linear(patch_pixels, self.weight.permute(0, 2, 3, 1).flatten(1), self.bias)  # (B, K|L, D)


class HistoMIMEmbeddings(nn.Module):
    """Patch embedding + CLS/register tokens + position embeddings (+ a mask token where one is used).

    Position embeddings cover CLS and patches; register tokens carry none (as in DINOv2 with registers).
    """

    def __init__(self, config: HistoMIMConfig, use_mask_token: bool = False):
        super().__init__()
        self.config = config
        self.patch_size = config.patch_size
        self.patch_embed = HistoMIMPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, config.hidden_size))
            if config.num_register_tokens
            else None
        )
        # Only SimMIM pretraining replaces masked patch embeddings by a learned token (as ViT's `use_mask_token`);
        # any other model would carry an unused parameter, which DistributedDataParallel rejects.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if use_mask_token else None
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, 1 + config.num_patches, config.hidden_size),
            requires_grad=config.position_embedding == "learned",
        )

    def check_pixel_values(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> None:
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}")
        channels, height, width = pixel_values.shape[1:]
        if channels != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {channels} channels but the model expects num_channels={self.config.num_channels}"
            )
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"pixel_values size {height}x{width} is not divisible by patch_size={self.patch_size}"
            )
        if not interpolate_pos_encoding and (height, width) != (self.config.image_size,) * 2:
            raise ValueError(
                f"pixel_values size {height}x{width} differs from image_size={self.config.image_size}; "
                "pass interpolate_pos_encoding=True to run at another size"
            )

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        batch, _, height, width = pixel_values.shape
        grid_hw = (height // self.patch_size, width // self.patch_size)
        position = self.position_embeddings
        patch_position = resize_position_embedding(position[:, 1:], grid_hw) if interpolate_pos_encoding else position[:, 1:]

        if ids_keep is None and bool_masked_pos is not None and self.mask_token is None:
            ids_keep = visible_indices(bool_masked_pos)
        # MAE: the encoder only sees the visible patches, so only those are embedded
        patches = self.patch_embed(pixel_values, ids_keep)  # (B, K|L, D)
        if ids_keep is not None:
            patch_position = gather_tokens(patch_position.expand(batch, -1, -1), ids_keep)  # (B, K, D)

        if bool_masked_pos is not None and self.mask_token is not None:
            # SimMIM: masked patches become the mask token, before position embeddings are added
            masked = bool_masked_pos.unsqueeze(-1).to(patches.dtype)  # (B, L, 1)
            patches = patches * (1 - masked) + self.mask_token.to(patches.dtype) * masked
        patches = patches + patch_position  # (B, K|L, D)

        prefix = [(self.cls_token + position[:, :1]).expand(batch, -1, -1)]  # (B, 1, D)
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(batch, -1, -1))  # (B, R, D)
        return torch.cat(prefix + [patches], dim=1)  # (B, 1 + R + K, D)


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, L, k) tokens, (B, K) indices -> (B, K, k) the indexed tokens of each sample."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def visible_indices(bool_masked_pos: torch.Tensor) -> torch.Tensor:
    """(B, L) bool mask -> (B, K) indices of visible patches in image order; K must be equal across the batch."""
    num_visible = (~bool_masked_pos).sum(dim=1)
    if not torch.all(num_visible == num_visible[0]):
        raise ValueError("bool_masked_pos must mask the same number of patches in every sample for an MAE encoder")
    order = torch.argsort(bool_masked_pos.to(torch.int8), dim=1, stable=True)  # visible first, in image order
    return order[:, : int(num_visible[0])]


class HistoMIMAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection, computed by the attention function that
    `config._attn_implementation` names in transformers' registry (eager, sdpa, flex, flash, ...)."""

    is_causal = False  # read by transformers' attention functions: every token sees every token

    def __init__(self, config: HistoMIMConfig, dim: int, num_heads: int):
        super().__init__()
        self.config = config
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, D) -> (B, N, D) and, with `output_attentions`, the (B, heads, N, N) attention weights."""
        batch, length, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, head_dim)
        # fused kernels never materialise the weights, so a call that asks for them computes eagerly
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        context, weights = attention(self, query, key, value, None, dropout=0.0, scaling=self.scaling)
        return self.proj(context.reshape(batch, length, dim)), weights  # context: (B, N, heads, head_dim)


class HistoMIMMLP(nn.Module):
    def __init__(self, config: HistoMIMConfig, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class HistoMIMSwiGLU(nn.Module):
    """Gated MLP: fc2(act(gate) * value), gate and value from one packed fc1 (gate first), as DINOv2's
    `SwiGLUFFN` (`w12`, `w3`) and timm's `SwiGLUPacked`."""

    def __init__(self, config: HistoMIMConfig, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden_dim)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(hidden_states).chunk(2, dim=-1)  # 2 x (B, N, hidden_dim)
        return self.fc2(self.act(gate) * value)


class LayerScale(nn.Module):
    """Per-channel residual scaling (CaiT); the identity when `layerscale_init` is None."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability `drop_prob` while training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        return hidden_states * hidden_states.new_empty(shape).bernoulli_(keep) / keep


class HistoMIMBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: HistoMIMConfig, dim: int, num_heads: int, mlp_dim: int, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = HistoMIMAttention(config, dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = (HistoMIMSwiGLU if config.mlp_type == "swiglu" else HistoMIMMLP)(config, dim, mlp_dim)
        use_layerscale = config.layerscale_init is not None
        self.ls1 = LayerScale(dim, config.layerscale_init) if use_layerscale else nn.Identity()
        self.ls2 = LayerScale(dim, config.layerscale_init) if use_layerscale else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, D) -> (B, N, D), plus the attention weights when asked (else None)."""
        attended, weights = self.attn(self.norm1(hidden_states), output_attentions)
        hidden_states = hidden_states + self.drop_path(self.ls1(attended))
        return hidden_states + self.drop_path(self.ls2(self.mlp(self.norm2(hidden_states)))), weights


def make_blocks(config: HistoMIMConfig, depth: int, dim: int, num_heads: int, mlp_dim: int, drop_path_rate: float):
    """`depth` blocks with stochastic depth rising linearly from 0 to `drop_path_rate`."""
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # no tensor op: builds on any device
    return nn.ModuleList(HistoMIMBlock(config, dim, num_heads, mlp_dim, rate) for rate in rates)


# --------------------------------------------------------------------------- pretrained-model base


def init_block_module(module: nn.Module) -> bool:
    """MAE's initialisation of the modules every transformer block is made of: xavier-uniform linears, unit
    LayerNorms, LayerScale at its init value. Returns whether ``module`` was one of them (the encoder and the
    tokenizer initialise the rest themselves)."""
    if isinstance(module, nn.Linear):
        init.xavier_uniform_(module.weight)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, LayerScale):
        init.constant_(module.gamma, module.init_value)
    else:
        return False
    return True


class HistoMIMPreTrainedModel(PreTrainedModel):
    config_class = HistoMIMConfig
    base_model_prefix = "histomim"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["HistoMIMEmbeddings", "HistoMIMBlock"]
    # attention goes through transformers' attention-function registry, as in its ViT
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # a pretraining checkpoint's objective head and SimMIM mask token: loading an encoder or a classifier from
    # one leaves them behind, on purpose (the pretraining model itself has them, so never finds them unexpected)
    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^simmim_head\.", r"embeddings\.mask_token$"]
    # BEiT's and the latent objective's heads, and their training-only target models (tokenizer, EMA teacher)
    _keys_to_ignore_on_load_unexpected += [r"^beit_head\.", r"^latent_head\.", r"^tokenizer\.", r"^teacher\."]

    def get_input_embeddings(self) -> nn.Module:
        """The patch embedding (the module every forward calls first on the pixels)."""
        return self.base_model.embeddings.patch_embed

    def _init_weights(self, module: nn.Module) -> None:
        """MAE initialisation: xavier-uniform linears, N(0, 0.02) tokens, fixed sin-cos positions."""
        std = self.config.initializer_range
        if init_block_module(module):
            return
        if isinstance(module, HistoMIMEmbeddings):
            weight = module.patch_embed.weight
            init.xavier_uniform_(weight.view(weight.shape[0], -1))  # like a Linear over flattened patches
            init.zeros_(module.patch_embed.bias)
            for token in (module.cls_token, module.register_tokens, module.mask_token):
                if token is not None:
                    init.normal_(token, std=std)
            if self.config.position_embedding == "sincos":
                grid = self.config.image_size // self.config.patch_size
                init.copy_(module.position_embeddings, sincos_2d_position_embedding(grid, self.config.hidden_size)[None])
            else:
                init.trunc_normal_(module.position_embeddings, std=std)
        elif isinstance(module, HistoMIMDecoder):
            init.normal_(module.mask_token, std=std)
            grid = self.config.image_size // self.config.patch_size
            init.copy_(module.position_embeddings, sincos_2d_position_embedding(grid, self.config.decoder_hidden_size)[None])


@dataclass
class HistoMIMForPreTrainingOutput(ModelOutput):
    """
    loss: the objective's loss on masked patches only.
    logits: (B, L, p*p*C) per-patch predictions in target space (normalized per patch when norm_pix_loss).
    reconstruction: (B, C, H, W) predicted image in the input's pixel space (visible patches are predicted too).
    mask: (B, L) float, 1 = masked, in image order; `model.unpatchify` turns (B, L, k) patch tensors into images.
    ids_restore: (B, L) MAE's unshuffle permutation (None for SimMIM).
    hidden_states: with `output_hidden_states`, the encoder's input and every block's output (B, N, D);
        N counts only the visible tokens for MAE.
    attentions: with `output_attentions`, the encoder's per-block attention weights (B, heads, N, N).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    ids_restore: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


# --------------------------------------------------------------------------- the encoder (AutoModel)


class HistoMIMModel(HistoMIMPreTrainedModel):
    """ViT encoder. Sees the whole image unless the caller passes `bool_masked_pos`: an encoder built with
    `use_mask_token=True` (SimMIM pretraining's) replaces masked patches by its mask token, any other drops them."""

    def __init__(self, config: HistoMIMConfig, use_mask_token: bool = False):
        super().__init__(config)
        self.embeddings = HistoMIMEmbeddings(config, use_mask_token)
        self.blocks = make_blocks(
            config, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.intermediate_size, config.drop_path_rate,
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def pool(self, sequence: torch.Tensor) -> torch.Tensor:
        """(B, N, D) normalized tokens -> (B, D) or (B, 2D) per `config.pooling`."""
        cls = sequence[:, 0]  # (B, D)
        mean = sequence[:, self.config.num_prefix_tokens :].mean(dim=1)  # (B, D)
        return {"cls": cls, "mean": mean, "cls+mean": torch.cat([cls, mean], dim=-1)}[self.config.pooling]

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        pixel_values: (B, C, H, W) normalized images.
        bool_masked_pos: optional (B, L) bool, True = masked patch.
        ids_keep: optional (B, K) indices of visible patches (encoders without a mask token); avoids the host
            sync of deriving them from `bool_masked_pos`.
        output_attentions: return each block's (B, heads, N, N) attention weights; those blocks then compute
            attention eagerly, whatever `attn_implementation` says, since fused kernels never form the weights.
        """
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        hidden_states = self.embeddings(pixel_values, bool_masked_pos, ids_keep, interpolate_pos_encoding)  # (B, N, D)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for block in self.blocks:
            # hidden states go in positionally: reentrant checkpointing only tracks gradients through positionals
            hidden_states, weights = block(hidden_states, output_attentions=output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)
        sequence = self.norm(hidden_states)  # (B, N, D)
        pooled = self.pool(sequence)

        output = BaseModelOutputWithPooling(
            last_hidden_state=sequence, pooler_output=pooled, hidden_states=all_hidden_states, attentions=all_attentions
        )
        return output if return_dict else output.to_tuple()


# --------------------------------------------------------------------------- MAE decoder


class HistoMIMDecoder(nn.Module):
    """MAE's lightweight decoder: visible tokens + mask tokens in image order -> pixels per patch."""

    def __init__(self, config: HistoMIMConfig):
        super().__init__()
        dim = config.decoder_hidden_size
        self.num_prefix_tokens = config.num_prefix_tokens
        self.embed = nn.Linear(config.hidden_size, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + config.num_patches, dim), requires_grad=False)
        self.blocks = make_blocks(
            config, config.decoder_num_hidden_layers, dim, config.decoder_num_attention_heads,
            config.decoder_intermediate_size, 0.0,
        )
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.pred = nn.Linear(dim, config.patch_size**2 * config.num_channels)

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """latent: (B, P + K, D) encoder output; ids_keep: (B, K). Returns (B, L, p*p*C)."""
        tokens = self.embed(latent)  # (B, P + K, Dd)
        cls, visible = tokens[:, :1], tokens[:, self.num_prefix_tokens :]  # register tokens stop here
        batch, dim = tokens.shape[0], tokens.shape[-1]
        num_patches = grid_hw[0] * grid_hw[1]

        # scatter the visible tokens into a full grid of mask tokens (= MAE's concat + unshuffle)
        full = self.mask_token.to(visible.dtype).expand(batch, num_patches, dim)
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, dim), visible)  # (B, L, Dd)

        position = self.position_embeddings
        hidden_states = torch.cat([cls + position[:, :1], full + resize_position_embedding(position[:, 1:], grid_hw)], dim=1)
        for block in self.blocks:
            hidden_states, _ = block(hidden_states)
        return self.pred(self.norm(hidden_states))[:, 1:]  # (B, L, p*p*C)


# --------------------------------------------------------------------------- pretraining (AutoModelForPreTraining)


def masked_patch_mse(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's loss: mean squared error per patch, averaged over masked patches only.

    logits, target: (B, L, p*p*C) predicted and true patch pixels; mask: (B, L) float, 1 = masked.
    norm_pix_loss: targets normalised per patch (mean 0, variance 1).
    Returns the loss and the prediction in input pixel space (B, L, p*p*C), for the reconstruction image.
    """
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
        pixels = logits * (var + 1e-6) ** 0.5 + mean  # back to input space
    else:
        pixels = logits
    per_patch = ((logits - target) ** 2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum(), pixels


class PatchPixelsMixin:
    """Pixels <-> per-patch vectors at the config's patch size: the pixel targets of every pretraining model."""

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return patchify(pixel_values, self.config.patch_size)

    def unpatchify(self, patches: torch.Tensor, image_hw: tuple[int, int] | None = None) -> torch.Tensor:
        image_hw = image_hw or (self.config.image_size, self.config.image_size)
        return unpatchify(patches, self.config.patch_size, image_hw, self.config.num_channels)


class HistoMIMForPreTraining(PatchPixelsMixin, HistoMIMPreTrainedModel):
    """The encoder plus the configured objective.

    - `mae`: random masking (argsort of noise) of whole `mask_patch_size` blocks (single ViT patches by
      default), encoder on visible patches only, decoder with mask tokens, MSE on masked patches, optional
      per-patch normalized targets.
    - `simmim`: block masking at `mask_patch_size`, mask token in the encoder, a linear head predicting
      raw pixels, L1 on masked pixels.
    - `beit`: BEiT's block-wise masking, mask token, a linear head over the codebook of a frozen visual
      tokenizer (`config.tokenizer_name_or_path`), cross-entropy on masked patches against its codes.
    - `latent` (data2vec): block-wise masking, mask token, a linear head regressing an EMA teacher's
      average of its top `latent_top_k_layers` block outputs (each layer-normalised), MSE on masked patches.
      The teacher sees the whole image and is updated by `after_optimizer_step` only.

    The tokenizer and the teacher are training tools: `prepare_targets()` attaches them (the pretraining
    loop calls it), training checkpoints hold them, `save_pretrained` leaves them out of the published model.
    """

    def __init__(self, config: HistoMIMConfig):
        super().__init__(config)
        self.histomim = HistoMIMModel(config, use_mask_token=config.objective in ("simmim",) + BLOCK_WISE_OBJECTIVES)
        self.tokenizer = None  # beit: the frozen visual tokenizer, attached by prepare_targets
        self.teacher = None  # latent: the EMA teacher, attached by prepare_targets
        if config.objective == "mae":
            self.decoder = HistoMIMDecoder(config)
        elif config.objective == "beit":
            self.beit_head = nn.Linear(config.hidden_size, beit_codebook_size(config))
        elif config.objective == "latent":
            self.latent_head = nn.Linear(config.hidden_size, config.hidden_size)
        else:
            # SimMIM's 1x1 conv + pixel shuffle is a per-token linear map to the patch's pixels
            self.simmim_head = nn.Linear(config.hidden_size, config.patch_size**2 * config.num_channels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> HistoMIMForPreTrainingOutput | tuple:
        r"""
        noise: optional noise that fixes the mask, `config.mask_noise_shape(B)`: one value per `mask_patch_size`
            block, or the uniforms of the block-wise rectangles. The same noise always gives the same mask.
        bool_masked_pos: optional explicit (B, L) mask (True = masked) instead of sampling one.
        labels: BEiT only, optional (B, L) codebook indices of the patches instead of the tokenizer's.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self.histomim.embeddings.check_pixel_values(pixel_values, interpolate_pos_encoding)
        height, width = pixel_values.shape[-2:]
        grid_hw = (height // self.config.patch_size, width // self.config.patch_size)
        encoder_options = dict(
            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        if self.config.objective == "beit":
            output = self._forward_beit(pixel_values, noise, bool_masked_pos, grid_hw, encoder_options, labels)
        else:
            forward = {"mae": self._forward_mae, "simmim": self._forward_simmim, "latent": self._forward_latent}
            output = forward[self.config.objective](pixel_values, noise, bool_masked_pos, grid_hw, encoder_options)
        return output if return_dict else output.to_tuple()

    # -- training-only targets: BEiT's tokenizer, the latent objective's EMA teacher -------------------

    def prepare_targets(self) -> None:
        """Attach what the objective's targets come from: BEiT's frozen tokenizer (loaded from
        `config.tokenizer_name_or_path`) or the latent objective's teacher (a copy of the current encoder).
        Nothing for MAE and SimMIM. Call before `accelerate.prepare`, so that checkpoints hold them."""
        if self.config.objective == "beit" and self.tokenizer is None:
            self.tokenizer = load_frozen_tokenizer(self.config)
        elif self.config.objective == "latent" and self.teacher is None:
            self.teacher = HistoMIMModel(self.config).to(self.histomim.embeddings.cls_token.device)
            self.reset_teacher()

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """Make the teacher a copy of the student encoder (without its mask token)."""
        student = {name: value for name, value in self.histomim.state_dict().items() if name != "embeddings.mask_token"}
        self.teacher.load_state_dict(student)
        self.teacher.requires_grad_(False).eval()

    def teacher_momentum(self, step: int, total_steps: int) -> float:
        """The EMA momentum after optimizer step `step` of `total_steps`: a cosine from `teacher_momentum` to
        `teacher_momentum_end` (as BYOL, DINO and data2vec)."""
        start, end = self.config.teacher_momentum, self.config.teacher_momentum_end
        return end - (end - start) * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1))) / 2

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """The latent objective's EMA update of the teacher, teacher = m * teacher + (1 - m) * student;
        nothing for the other objectives. Called by the pretraining loop after every optimizer step."""
        if self.config.objective != "latent":
            return
        momentum = self.teacher_momentum(step, total_steps)
        student = dict(self.histomim.named_parameters())
        for name, teacher_value in self.teacher.named_parameters():
            teacher_value.mul_(momentum).add_(student[name].detach(), alpha=1 - momentum)

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.tokenizer, self.teacher):
            if frozen is not None:
                frozen.eval()  # targets come without stochastic depth
        return self

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        """Saves the model without its tokenizer or teacher: those belong to training checkpoints only."""
        state_dict = state_dict if state_dict is not None else self.state_dict()
        state_dict = {name: value for name, value in state_dict.items() if not name.startswith(TRAINING_ONLY_PREFIXES)}
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

    def sample_block_wise_mask(self, pixel_values: torch.Tensor, noise: torch.Tensor | None, grid_hw) -> torch.Tensor:
        """(B, L) bool BEiT block-wise mask of the batch, fixed by `noise` when given."""
        return block_wise_masking(
            pixel_values.shape[0], grid_hw, self.config.mask_ratio, self.config.block_min_num_patches,
            self.config.block_min_aspect, noise=noise, device=pixel_values.device,
        )

    def _forward_mae(self, pixel_values, noise, bool_masked_pos, grid_hw, encoder_options):
        if bool_masked_pos is None:
            ids_keep, mask, ids_restore = random_block_masking(
                pixel_values.shape[0], grid_hw, self.config.mask_patch_size // self.config.patch_size,
                self.config.mask_ratio, noise, device=pixel_values.device,
            )
        else:
            ids_keep, mask, ids_restore = visible_indices(bool_masked_pos), bool_masked_pos.float(), None

        encoded = self.histomim(pixel_values, ids_keep=ids_keep, **encoder_options)
        logits = self.decoder(encoded.last_hidden_state, ids_keep, grid_hw).float()  # (B, L, p*p*C)

        loss, pixels = masked_patch_mse(logits, self.patchify(pixel_values.float()), mask, self.config.norm_pix_loss)
        return HistoMIMForPreTrainingOutput(
            loss=loss, logits=logits, reconstruction=self.unpatchify(pixels, pixel_values.shape[-2:]),
            mask=mask, ids_restore=ids_restore, hidden_states=encoded.hidden_states, attentions=encoded.attentions,
        )

    def _forward_simmim(self, pixel_values, noise, bool_masked_pos, grid_hw, encoder_options):
        if bool_masked_pos is None:
            if grid_hw[0] != grid_hw[1]:
                raise ValueError("SimMIM mask sampling needs square images; pass bool_masked_pos for other shapes")
            bool_masked_pos = block_random_mask(
                pixel_values.shape[0], grid_hw[0], self.config.mask_patch_size, self.config.patch_size,
                self.config.mask_ratio, noise, device=pixel_values.device,
            )
        encoded = self.histomim(pixel_values, bool_masked_pos=bool_masked_pos, **encoder_options)
        patch_tokens = encoded.last_hidden_state[:, self.config.num_prefix_tokens :]  # (B, L, D)
        logits = self.simmim_head(patch_tokens).float()  # (B, L, p*p*C)

        mask = bool_masked_pos.float()  # (B, L)
        target = self.patchify(pixel_values.float())
        per_pixel = (logits - target).abs()  # (B, L, p*p*C)
        # mean over masked pixels, as SimMIM: sum / (masked pixels per channel) / channels
        loss = (per_pixel * mask.unsqueeze(-1)).sum() / (mask.sum() * self.config.patch_size**2 + 1e-5) / self.config.num_channels
        return HistoMIMForPreTrainingOutput(
            loss=loss, logits=logits, reconstruction=self.unpatchify(logits, pixel_values.shape[-2:]),
            mask=mask, hidden_states=encoded.hidden_states, attentions=encoded.attentions,
        )


    def _forward_beit(self, pixel_values, noise, bool_masked_pos, grid_hw, encoder_options, labels):
        if bool_masked_pos is None:
            bool_masked_pos = self.sample_block_wise_mask(pixel_values, noise, grid_hw)
        if labels is None:
            if self.tokenizer is None:
                raise ValueError("BEiT targets come from a tokenizer: call prepare_targets() first, or pass labels")
            labels = self.tokenizer.get_codebook_indices(pixel_values)  # (B, L)
        encoded = self.histomim(pixel_values, bool_masked_pos=bool_masked_pos, **encoder_options)
        patch_tokens = encoded.last_hidden_state[:, self.config.num_prefix_tokens :]  # (B, L, D)
        logits = self.beit_head(patch_tokens).float()  # (B, L, K)
        loss = F.cross_entropy(logits[bool_masked_pos], labels[bool_masked_pos])  # masked patches only
        return HistoMIMForPreTrainingOutput(
            loss=loss, logits=logits, mask=bool_masked_pos.float(), hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
        )

    def _forward_latent(self, pixel_values, noise, bool_masked_pos, grid_hw, encoder_options):
        if self.teacher is None:
            raise ValueError("the latent objective's targets come from its EMA teacher: call prepare_targets() first")
        if bool_masked_pos is None:
            bool_masked_pos = self.sample_block_wise_mask(pixel_values, noise, grid_hw)
        target = self.latent_targets(pixel_values, encoder_options["interpolate_pos_encoding"])  # (B, L, D)
        encoded = self.histomim(pixel_values, bool_masked_pos=bool_masked_pos, **encoder_options)
        patch_tokens = encoded.last_hidden_state[:, self.config.num_prefix_tokens :]  # (B, L, D)
        logits = self.latent_head(patch_tokens).float()  # (B, L, D)
        mask = bool_masked_pos.float()  # (B, L)
        per_patch = ((logits - target) ** 2).mean(dim=-1)  # (B, L)
        loss = (per_patch * mask).sum() / mask.sum()  # masked patches only
        return HistoMIMForPreTrainingOutput(
            loss=loss, logits=logits, mask=mask, hidden_states=encoded.hidden_states, attentions=encoded.attentions,
        )

    @torch.no_grad()
    def latent_targets(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """The teacher's view of the whole image: the mean of its top `latent_top_k_layers` block outputs at the
        patch positions, each layer-normalised (no affine), as data2vec. Returns (B, L, D) float32."""
        hidden_states = self.teacher(
            pixel_values, output_hidden_states=True, interpolate_pos_encoding=interpolate_pos_encoding
        ).hidden_states  # embeddings + one per block, each (B, P + L, D)
        top = hidden_states[1:][-self.config.latent_top_k_layers :]
        patches = [F.layer_norm(layer[:, self.config.num_prefix_tokens :].float(), layer.shape[-1:]) for layer in top]
        return torch.stack(patches).mean(dim=0)


# Submodules of HistoMIMForPreTraining that only training needs; never part of a published model.
TRAINING_ONLY_PREFIXES = ("tokenizer.", "teacher.")


def beit_codebook_size(config: HistoMIMConfig) -> int:
    """BEiT's number of classes: `config.codebook_size`, else read from its tokenizer's config (and recorded)."""
    if config.codebook_size is None:
        from transformers import AutoConfig

        try:
            tokenizer_config = AutoConfig.from_pretrained(config.tokenizer_name_or_path)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"tokenizer_name_or_path {config.tokenizer_name_or_path!r} is not a tokenizer folder or reachable Hub id: {error}"
            ) from error
        config.codebook_size = tokenizer_config.codebook_size
    return config.codebook_size


def load_frozen_tokenizer(config: HistoMIMConfig) -> nn.Module:
    """BEiT's visual tokenizer from `config.tokenizer_name_or_path`, frozen, checked against the config:
    the same patch grid, codebook size and pixel normalisation."""
    from transformers import AutoModel

    source = config.tokenizer_name_or_path
    try:
        tokenizer = AutoModel.from_pretrained(source)  # histomim registers the tokenizer's Auto classes
    except (OSError, ValueError) as error:
        raise ValueError(f"tokenizer_name_or_path {source!r} does not load: {error}") from error
    if not hasattr(tokenizer, "get_codebook_indices"):
        raise ValueError(f"tokenizer_name_or_path {source!r} is a {type(tokenizer).__name__}, not a visual tokenizer")
    mine = (config.image_size, config.patch_size, config.codebook_size, list(config.normalization_mean), list(config.normalization_std))
    theirs = tokenizer.config
    theirs = (theirs.image_size, theirs.patch_size, theirs.codebook_size, list(theirs.normalization_mean), list(theirs.normalization_std))
    if mine != theirs:
        raise ValueError(
            f"tokenizer {source!r} has (image_size, patch_size, codebook_size, normalization mean, std) = {theirs}, "
            f"the BEiT config {mine}: its codes would not be targets for these patches"
        )
    return tokenizer.requires_grad_(False).eval()


# --------------------------------------------------------------------------- classification


class HistoMIMForImageClassification(HistoMIMPreTrainedModel):
    """A linear classifier on the pooled output (`config.pooling`)."""

    def __init__(self, config: HistoMIMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.histomim = HistoMIMModel(config)
        self.classifier = nn.Linear(config.pooled_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        encoded = self.histomim(
            pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        logits = self.classifier(encoded.pooler_output)  # (B, num_labels)
        loss = self.classification_loss(logits, labels) if labels is not None else None
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions
        )
        return output if return_dict else output.to_tuple()

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Regression / single-label / multi-label, inferred as transformers' classifiers do."""
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.float().squeeze(-1))
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels.float())


# --------------------------------------------------------------------------- semantic segmentation


class HistoMIMSegmentationDecoder(nn.Module):
    """Patch-token feature maps of one or more encoder layers -> per-pixel class logits.

    Each chosen layer's patch tokens get their own LayerNorm and become a (D, h, w) map; the maps are
    concatenated, fused by a 1x1 conv, then upsampled 2x per stage with a 3x3 conv each (SETR's
    progressive upsampling) until the patch grid is back at pixel resolution; a 1x1 conv classifies.
    """

    def __init__(self, config: HistoMIMConfig, num_layers: int, channels: int):
        super().__init__()
        self.num_prefix_tokens = config.num_prefix_tokens
        self.norms = nn.ModuleList(nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) for _ in range(num_layers))
        self.fuse = nn.Sequential(nn.Conv2d(num_layers * config.hidden_size, channels, 1), nn.GroupNorm(1, channels), nn.GELU())
        # one 2x stage per factor of two in the patch size; any rest is closed by interpolation in forward
        num_stages = max(int(math.log2(config.patch_size)), 0)
        self.upsample = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(1, channels), nn.GELU())
            for _ in range(num_stages)
        )
        self.classifier = nn.Conv2d(channels, config.num_labels, 1)

    def forward(self, layer_tokens: list[torch.Tensor], grid_hw: tuple[int, int], image_hw: tuple[int, int]) -> torch.Tensor:
        """layer_tokens: per chosen layer (B, P + L, D) -> (B, num_labels, H, W) logits."""
        maps = []
        for norm, tokens in zip(self.norms, layer_tokens):
            patches = norm(tokens[:, self.num_prefix_tokens :])  # (B, L, D)
            maps.append(patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid_hw))  # (B, D, h, w)
        hidden = self.fuse(torch.cat(maps, dim=1))  # (B, C, h, w)
        for stage in self.upsample:
            hidden = stage(F.interpolate(hidden, scale_factor=2, mode="bilinear", align_corners=False))  # (B, C, 2h, 2w)
        if hidden.shape[-2:] != image_hw:
            hidden = F.interpolate(hidden, size=image_hw, mode="bilinear", align_corners=False)  # (B, C, H, W)
        return self.classifier(hidden)  # (B, num_labels, H, W)


class HistoMIMForSemanticSegmentation(HistoMIMPreTrainedModel):
    """The encoder plus a light convolutional decoder (`HistoMIMSegmentationDecoder`) to per-pixel logits.

    Settings read from the config (written back into it, so a saved model states them):
    - `segmentation_out_indices`: encoder layers whose patch tokens feed the decoder, as indices into
      `hidden_states` (0 = embeddings, k = output of block k, negative from the end); default: the last block.
    - `segmentation_decoder_channels`: the decoder's width (default 64).
    - `semantic_loss_ignore_index`: the label that is left out of the loss (default 255, as in transformers).
    `labels` (B, H, W) give a cross-entropy loss; logits are (B, num_labels, H, W), at the input's resolution.
    """

    def __init__(self, config: HistoMIMConfig):
        super().__init__(config)
        config.segmentation_out_indices = list(getattr(config, "segmentation_out_indices", None) or [config.num_hidden_layers])
        config.segmentation_decoder_channels = int(getattr(config, "segmentation_decoder_channels", None) or 64)
        config.semantic_loss_ignore_index = int(getattr(config, "semantic_loss_ignore_index", 255))
        for index in config.segmentation_out_indices:
            if not -(config.num_hidden_layers + 1) <= index <= config.num_hidden_layers:
                raise ValueError(
                    f"segmentation_out_indices: {index} is not a layer of an encoder with {config.num_hidden_layers} "
                    f"blocks (0..{config.num_hidden_layers}, or negative from the end)"
                )
        if config.num_labels < 2:
            raise ValueError(f"semantic segmentation needs num_labels >= 2 (background included), got {config.num_labels}")
        self.num_labels = config.num_labels
        self.histomim = HistoMIMModel(config)
        self.decoder = HistoMIMSegmentationDecoder(
            config, len(config.segmentation_out_indices), config.segmentation_decoder_channels
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """The decoder's convolutions (kaiming, as PyTorch's default) and GroupNorms, and its LayerNorms (the encoder's
        rules). Only the decoder's modules get here: the encoder is a sub-model (a `PreTrainedModel`), which
        transformers initialises with HistoMIMModel's own `_init_weights` (MAE init, xavier patch embedding), and
        weights loaded by `from_pretrained` are never re-initialised (tests/test_segmentation.py checks both)."""
        super()._init_weights(module)
        if isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        r"""
        labels: optional (B, H, W) class ids; `config.semantic_loss_ignore_index` marks pixels without a label.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        encoded = self.histomim(
            pixel_values, output_hidden_states=True, output_attentions=output_attentions,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        height, width = pixel_values.shape[-2:]
        grid_hw = (height // self.config.patch_size, width // self.config.patch_size)
        layer_tokens = [encoded.hidden_states[index] for index in self.config.segmentation_out_indices]
        logits = self.decoder(layer_tokens, grid_hw, (height, width))  # (B, num_labels, H, W)

        loss = None
        if labels is not None:
            if labels.shape[-2:] != logits.shape[-2:]:
                logits_for_loss = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            else:
                logits_for_loss = logits
            loss = F.cross_entropy(
                logits_for_loss.float(), labels.long(), ignore_index=self.config.semantic_loss_ignore_index
            )
        output = SemanticSegmenterOutput(
            loss=loss, logits=logits,
            hidden_states=encoded.hidden_states if output_hidden_states else None, attentions=encoded.attentions,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "HistoMIMPreTrainedModel",
    "HistoMIMModel",
    "HistoMIMForPreTraining",
    "HistoMIMForImageClassification",
    "HistoMIMForSemanticSegmentation",
    "HistoMIMForPreTrainingOutput",
    "patchify",
    "unpatchify",
    "sincos_2d_position_embedding",
]
