"""HistoMIM ConvNeXt: a convolutional encoder for histology, pretrained by masked pixel reconstruction (FCMAE).

Read top to bottom: ConvNeXt block -> stem and stages -> `HistoMIMConvNextModel` (what `AutoModel` returns;
feature maps per stage for dense tasks, a pooled vector for tiles; never masks unless asked) -> FCMAE decoder
-> `HistoMIMConvNextForPreTraining`.

Masking a CNN (the FCMAE / SparK idea): a convolution mixes neighbouring positions, so a masked region would
leak into its visible neighbours and the task would become trivial. Here the mask, one entry per
`patch_size` x `patch_size` patch, is upsampled to every stage's resolution and masked positions are set to
zero after the stem, after every downsampling and after every block. A visible position then only ever reads
zeros from masked ones, whatever their pixels were: dense emulation of FCMAE's sparse convolutions. The stem
and downsampling kernels never straddle a patch border, since every stride divides `patch_size`.

Imports of sibling files are relative on purpose: a saved model carries these files and loads with
`trust_remote_code=True` where histomim itself is not installed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention

from .configuration_histomim_convnext import HistoMIMConvNextConfig
from .masking import random_masking
from .modeling_histomim import DropPath, HistoMIMForPreTrainingOutput, PatchPixelsMixin, masked_patch_mse


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) feature map."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class HistoMIMConvNextBlock(GradientCheckpointingLayer):
    """ConvNeXt block: x + gamma * fc2(act(fc1(norm(dwconv7x7(x))))), zeroed at masked positions."""

    def __init__(self, config: HistoMIMConvNextConfig, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(4 * dim, dim)
        self.init_value = config.layerscale_init
        self.gamma = nn.Parameter(torch.full((dim,), config.layerscale_init)) if config.layerscale_init is not None else None
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden_states: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W), optional (B, 1, H, W) visible-position mask (1 = visible) -> (B, C, H, W)."""
        x = self.dwconv(hidden_states).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = self.fc2(self.act(self.fc1(self.norm(x))))
        if self.gamma is not None:
            x = x * self.gamma
        hidden_states = hidden_states + self.drop_path(x.permute(0, 3, 1, 2))
        return hidden_states if visible is None else hidden_states * visible


class HistoMIMConvNextStage(nn.Module):
    """Downsampling (none in the first stage: the stem did it) then `depth` blocks."""

    def __init__(self, config: HistoMIMConvNextConfig, in_dim: int, dim: int, depth: int, drop_paths: list[float], first: bool):
        super().__init__()
        self.downsample = None if first else nn.Sequential(
            ChannelsFirstLayerNorm(in_dim, eps=config.layer_norm_eps), nn.Conv2d(in_dim, dim, kernel_size=2, stride=2)
        )
        self.blocks = nn.ModuleList(HistoMIMConvNextBlock(config, dim, rate) for rate in drop_paths)

    def forward(self, hidden_states: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        if self.downsample is not None:
            hidden_states = self.downsample(hidden_states)  # (B, C', H/2, W/2)
            if visible is not None:
                hidden_states = hidden_states * visible
        for block in self.blocks:
            hidden_states = block(hidden_states, visible)
        return hidden_states


class HistoMIMConvNextPreTrainedModel(PreTrainedModel):
    config_class = HistoMIMConvNextConfig
    base_model_prefix = "histomim"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["HistoMIMConvNextBlock"]
    # a pretraining checkpoint's decoder: an encoder loaded from one leaves it behind, on purpose
    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def _init_weights(self, module: nn.Module) -> None:
        """ConvNeXt initialisation: N(0, 0.02) convs and linears (ConvNeXt's truncation at +-2 never bites at this
        std), zero biases, LayerScale at its init value."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, HistoMIMConvNextBlock) and module.gamma is not None:
            init.constant_(module.gamma, module.init_value)
        elif isinstance(module, HistoMIMConvNextDecoder):
            init.normal_(module.mask_token, std=std)


def visible_map(bool_masked_pos: torch.Tensor, grid_hw: tuple[int, int], scale: int) -> torch.Tensor:
    """(B, L) patch mask (True = masked) -> (B, 1, h*scale, w*scale) float map, 1 at visible positions."""
    visible = (~bool_masked_pos.bool()).float().view(-1, 1, *grid_hw)  # (B, 1, h, w)
    return visible.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


class HistoMIMConvNextModel(HistoMIMConvNextPreTrainedModel):
    """ConvNeXt encoder. Sees the whole image unless the caller passes `bool_masked_pos` (FCMAE pretraining).

    Outputs: `last_hidden_state` (B, C, H/patch_size, W/patch_size), the last stage's feature map;
    `pooler_output` (B, C), LayerNorm of its average over (visible) positions; with `output_hidden_states`,
    the stem's and every stage's feature map, at strides stem_size x (1, 1, 2, 4, ...): the pyramid that
    dense (segmentation, detection) heads take.
    """

    def __init__(self, config: HistoMIMConvNextConfig):
        super().__init__(config)
        dims = config.hidden_sizes
        self.stem = nn.Sequential(
            nn.Conv2d(config.num_channels, dims[0], kernel_size=config.stem_size, stride=config.stem_size),
            ChannelsFirstLayerNorm(dims[0], eps=config.layer_norm_eps),
        )
        total = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # rising linearly
        self.stages = nn.ModuleList()
        for index, depth in enumerate(config.depths):
            start = sum(config.depths[:index])
            self.stages.append(HistoMIMConvNextStage(
                config, dims[max(index - 1, 0)], dims[index], depth, rates[start : start + depth], first=index == 0,
            ))  # fmt: skip
        self.norm = nn.LayerNorm(dims[-1], eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.stem

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.config.num_channels}, height, width), got shape {tuple(pixel_values.shape)}"
            )
        height, width = pixel_values.shape[-2:]
        if height % self.config.patch_size or width % self.config.patch_size:
            raise ValueError(
                f"pixel_values size {height}x{width} is not a multiple of the encoder's stride {self.config.patch_size}"
            )

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,  # interpolate_pos_encoding and the like: a CNN runs at any multiple of its stride anyway
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        r"""
        pixel_values: (B, C, H, W) normalized images.
        bool_masked_pos: optional (B, L) bool over the (H/patch_size, W/patch_size) patch grid, True = masked;
            masked positions are zero at every stage and left out of the pooled output.
        """
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self.check_pixel_values(pixel_values)
        patch = self.config.patch_size
        grid_hw = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)

        def visible_at(stride: int) -> torch.Tensor | None:
            """(B, 1, H/stride, W/stride) visible map, or None without a mask."""
            return None if bool_masked_pos is None else visible_map(bool_masked_pos, grid_hw, patch // stride).to(pixel_values.dtype)

        stride = self.config.stem_size
        if bool_masked_pos is not None:
            pixel_values = pixel_values * visible_at(1)
        hidden_states = self.stem(pixel_values)  # (B, C0, H/4, W/4)
        visible = visible_at(stride)
        if visible is not None:
            hidden_states = hidden_states * visible  # the stem's LayerNorm bias would mark masked positions
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for index, stage in enumerate(self.stages):
            if index > 0:
                stride *= 2
                visible = visible_at(stride)
            hidden_states = stage(hidden_states, visible)  # (B, Ci, H/stride, W/stride)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)

        if visible is None:
            pooled = hidden_states.mean(dim=(-2, -1))  # (B, C)
        else:  # average over visible positions only
            pooled = (hidden_states * visible).sum(dim=(-2, -1)) / visible.sum(dim=(-2, -1)).clamp(min=1)
        output = BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=hidden_states, pooler_output=self.norm(pooled), hidden_states=all_hidden_states
        )
        return output if return_dict else output.to_tuple()


class HistoMIMConvNextDecoder(nn.Module):
    """FCMAE's light decoder: 1x1 projection, a mask token at masked positions, ConvNeXt blocks, 1x1 conv to
    the pixels of each patch."""

    def __init__(self, config: HistoMIMConvNextConfig):
        super().__init__()
        dim = config.decoder_hidden_size
        self.embed = nn.Conv2d(config.hidden_sizes[-1], dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.blocks = nn.ModuleList(HistoMIMConvNextBlock(config, dim) for _ in range(config.decoder_num_hidden_layers))
        self.pred = nn.Conv2d(dim, config.patch_size**2 * config.num_channels, kernel_size=1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features: (B, C, h, w) last feature map; mask: (B, L) float, 1 = masked. Returns (B, L, p*p*C)."""
        x = self.embed(features)  # (B, Dd, h, w)
        masked = mask.view(x.shape[0], 1, *x.shape[-2:]).to(x.dtype)  # (B, 1, h, w)
        x = x * (1 - masked) + self.mask_token.to(x.dtype) * masked
        for block in self.blocks:
            x = block(x)
        return self.pred(x).flatten(2).transpose(1, 2)  # (B, L, p*p*C), patches in row-major order


class HistoMIMConvNextForPreTraining(PatchPixelsMixin, HistoMIMConvNextPreTrainedModel):
    """FCMAE: random masking of whole patches, the masked encoder, the decoder, MSE on masked patches only
    (per-patch normalized targets with `norm_pix_loss`). Outputs as `HistoMIMForPreTraining`'s."""

    def __init__(self, config: HistoMIMConvNextConfig):
        super().__init__(config)
        self.histomim = HistoMIMConvNextModel(config)
        self.decoder = HistoMIMConvNextDecoder(config)
        self.post_init()

    # the pretraining loop's interface (shared with the ViT and the tokenizer): FCMAE's targets are the
    # pixels, so there is nothing to attach before training and nothing to update after a step
    def prepare_targets(self) -> None:
        """Nothing: the targets are the input pixels."""

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Nothing: no teacher or codebook to update."""

    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> HistoMIMForPreTrainingOutput | tuple:
        r"""
        noise: optional (B, L) noise that fixes the mask (`config.mask_noise_shape(B)`); the same noise always
            gives the same mask.
        bool_masked_pos: optional explicit (B, L) mask (True = masked) instead of sampling one.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self.histomim.check_pixel_values(pixel_values)
        patch = self.config.patch_size
        num_patches = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
        if bool_masked_pos is None:
            _, mask, ids_restore = random_masking(
                pixel_values.shape[0], num_patches, self.config.mask_ratio, noise, device=pixel_values.device
            )  # mask: (B, L) float, 1 = masked
        else:
            mask, ids_restore = bool_masked_pos.float(), None

        encoded = self.histomim(pixel_values, bool_masked_pos=mask.bool(), output_hidden_states=output_hidden_states)
        logits = self.decoder(encoded.last_hidden_state, mask).float()  # (B, L, p*p*C)
        loss, pixels = masked_patch_mse(logits, self.patchify(pixel_values.float()), mask, self.config.norm_pix_loss)
        output = HistoMIMForPreTrainingOutput(
            loss=loss, logits=logits, reconstruction=self.unpatchify(pixels, pixel_values.shape[-2:]), mask=mask,
            ids_restore=ids_restore, hidden_states=encoded.hidden_states,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "HistoMIMConvNextPreTrainedModel",
    "HistoMIMConvNextModel",
    "HistoMIMConvNextForPreTraining",
]
