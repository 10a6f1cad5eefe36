"""HistoMIM ConvNeXt configuration: a convolutional encoder pretrained by masked pixel reconstruction (FCMAE)."""

from __future__ import annotations

from transformers import PretrainedConfig

from .configuration_histomim import IMAGENET_MEAN, IMAGENET_STD, per_channel
from .masking import masked_fraction

CONVNEXT_OBJECTIVES = ("fcmae",)

AUTO_MAP = {
    "AutoConfig": "configuration_histomim_convnext.HistoMIMConvNextConfig",
    "AutoModel": "modeling_histomim_convnext.HistoMIMConvNextModel",
    "AutoModelForPreTraining": "modeling_histomim_convnext.HistoMIMConvNextForPreTraining",
}


class HistoMIMConvNextConfig(PretrainedConfig):
    r"""Configuration of a HistoMIM ConvNeXt encoder and its masked-convolution pretraining (FCMAE).

    Encoder: `image_size`, `num_channels`, `stem_size` (the patchifying stem's kernel and stride), `depths`
    and `hidden_sizes` (blocks and width per stage; each later stage halves the resolution), `layer_norm_eps`,
    `drop_path_rate`, `layerscale_init` (ConvNeXt's per-channel residual scale; None disables it),
    `hidden_act`. The encoder's total stride, `patch_size` = stem_size x 2^(stages - 1), is also the mask
    and prediction unit: one masked patch is one position of the last feature map.

    Objective: `objective` ("fcmae"), `mask_ratio` in (0, 1) of patches hidden (random, as MAE), a light
    decoder (`decoder_hidden_size` wide, `decoder_num_hidden_layers` ConvNeXt blocks), `norm_pix_loss`.
    Histology metadata and pixel normalisation as in `HistoMIMConfig`.
    """

    model_type = "histomim_convnext"
    pooling = "mean"  # global average of the last feature map, then a LayerNorm (ConvNeXt's head input)

    def __init__(
        self,
        image_size: int = 224,
        num_channels: int = 3,
        stem_size: int = 4,
        depths: list[int] | tuple[int, ...] = (2, 2, 6, 2),
        hidden_sizes: list[int] | tuple[int, ...] = (40, 80, 160, 320),
        layer_norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = 1e-6,
        hidden_act: str = "gelu",
        objective: str = "fcmae",
        mask_ratio: float = 0.6,
        norm_pix_loss: bool = True,
        decoder_hidden_size: int = 512,
        decoder_num_hidden_layers: int = 1,
        initializer_range: float = 0.02,
        target_mpp: float | None = 0.5,
        magnification: float | None = 20.0,
        normalization_mean: float | list[float] | tuple[float, ...] = IMAGENET_MEAN,
        normalization_std: float | list[float] | tuple[float, ...] = IMAGENET_STD,
        **kwargs,
    ):
        self.image_size = image_size
        self.num_channels = num_channels
        self.stem_size = stem_size
        self.depths = [int(d) for d in depths]
        self.hidden_sizes = [int(h) for h in hidden_sizes]
        self.layer_norm_eps = layer_norm_eps
        self.drop_path_rate = drop_path_rate
        self.layerscale_init = layerscale_init
        self.hidden_act = hidden_act
        self.objective = objective
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.initializer_range = initializer_range
        self.target_mpp = target_mpp
        self.magnification = magnification
        self.normalization_mean = per_channel(normalization_mean, num_channels)
        self.normalization_std = per_channel(normalization_std, num_channels)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        """Reject settings that would only fail later, deep inside a forward pass."""
        if self.objective not in CONVNEXT_OBJECTIVES:
            raise ValueError(f"objective must be one of {CONVNEXT_OBJECTIVES} for a ConvNeXt encoder, got {self.objective!r}")
        if not self.depths or len(self.depths) != len(self.hidden_sizes):
            raise ValueError(f"depths {self.depths} and hidden_sizes {self.hidden_sizes} need one entry per stage")
        if not 0.0 < float(self.mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must lie in the open interval (0, 1), got {self.mask_ratio}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of the encoder's stride {self.patch_size} "
                f"(stem {self.stem_size} x 2^{len(self.depths) - 1}); e.g. --image-size {max(1, self.image_size // self.patch_size) * self.patch_size}"
            )
        if len(self.normalization_mean) != self.num_channels or len(self.normalization_std) != self.num_channels:
            raise ValueError(
                f"normalization_mean and normalization_std need one value or num_channels ({self.num_channels}) values"
            )

    @property
    def patch_size(self) -> int:
        """Pixels per side of one position of the last feature map: the mask and prediction unit."""
        return self.stem_size * 2 ** (len(self.depths) - 1)

    @property
    def mask_patch_size(self) -> int:
        return self.patch_size

    @property
    def hidden_size(self) -> int:
        return self.hidden_sizes[-1]

    @property
    def pooled_size(self) -> int:
        return self.hidden_sizes[-1]

    @property
    def num_hidden_layers(self) -> int:
        return sum(self.depths)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def mask_grid_size(self) -> int:
        return self.image_size // self.patch_size

    def mask_noise_shape(self, batch_size: int) -> tuple[int, int]:
        """(B, patches) of the `noise` that fixes a pretraining mask."""
        return batch_size, self.num_patches

    def realised_mask_ratio(self) -> float:
        """The fraction of patches each mask hides (`mask_ratio` rounded as MAE rounds it)."""
        return masked_fraction("mae", self.num_patches, self.mask_ratio)


__all__ = ["HistoMIMConvNextConfig"]
