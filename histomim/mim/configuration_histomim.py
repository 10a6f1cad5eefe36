"""HistoMIM configuration: a ViT encoder, its masked-image-modeling objective and histology metadata."""

from __future__ import annotations

from transformers import PretrainedConfig

from .masking import block_wise_noise_size, masked_fraction, num_masked_blocks

OBJECTIVES = ("mae", "simmim", "beit", "latent")
# Objectives that mask with BEiT's block-wise rectangles and a mask token, predicting no pixels.
BLOCK_WISE_OBJECTIVES = ("beit", "latent")
# Objectives that predict pixels, whose reconstructions can be shown (fcmae: the ConvNeXt encoder's).
PIXEL_OBJECTIVES = ("mae", "simmim", "fcmae")
# mask_ratio when none is given: MAE's 75%, BEiT's 40%, data2vec's 60% (SimMIM presets set their own).
DEFAULT_MASK_RATIOS = {"mae": 0.75, "simmim": 0.75, "beit": 0.4, "latent": 0.6}
POOLINGS = ("cls", "mean", "cls+mean")
POSITION_EMBEDDINGS = ("sincos", "learned")
MLP_TYPES = ("mlp", "swiglu")

# ImageNet statistics: the usual choice when starting from natural-image weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Every saved model names all its classes, so any Auto class loads it with trust_remote_code=True
# where histomim is not installed (the code files travel with the weights).
AUTO_MAP = {
    "AutoConfig": "configuration_histomim.HistoMIMConfig",
    "AutoModel": "modeling_histomim.HistoMIMModel",
    "AutoModelForPreTraining": "modeling_histomim.HistoMIMForPreTraining",
    "AutoModelForImageClassification": "modeling_histomim.HistoMIMForImageClassification",
    "AutoModelForSemanticSegmentation": "modeling_histomim.HistoMIMForSemanticSegmentation",
}


class HistoMIMConfig(PretrainedConfig):
    r"""Configuration of a HistoMIM ViT encoder and its pretraining objective.

    Encoder: `image_size`, `patch_size`, `num_channels`, `hidden_size`, `num_hidden_layers`,
    `num_attention_heads`, `intermediate_size` (defaults to `mlp_ratio * hidden_size`), `qkv_bias`,
    `hidden_act`, `layer_norm_eps`, `drop_path_rate`, `layerscale_init` (None disables LayerScale),
    `num_register_tokens`, `position_embedding` (`"sincos"` fixed 2-D or `"learned"`), `pooling`
    (`"cls"`, `"mean"` over patch tokens, or `"cls+mean"` concatenated), `mlp_type` (`"mlp"`: fc1 -> act ->
    fc2; `"swiglu"`: act(gate) * value with one packed `fc1` of width 2 x `intermediate_size`, the gate
    first, as in DINOv2's SwiGLU and timm's `SwiGLUPacked`; use it with `hidden_act="silu"`).

    Objective: `objective` (`"mae"` or `"simmim"`), `mask_ratio` in (0, 1), `mask_patch_size` (the
    masking granularity, a multiple of `patch_size`; unset, it follows the objective: whole ViT patches
    for MAE, 32 px blocks for SimMIM), MAE decoder sizes and `norm_pix_loss` (per-patch normalized targets).
    Both objectives mask whole `mask_patch_size` blocks; `realised_mask_ratio()` is the fraction of the
    image actually masked, which the block count can round away from `mask_ratio`.

    `"beit"` and `"latent"` mask BEiT-style rectangles of patches (`block_min_num_patches`,
    `block_min_aspect`; default `mask_ratio` 0.4 and 0.6) and replace them by a mask token. BEiT predicts
    the codes a frozen visual tokenizer (`tokenizer_name_or_path`, a `HistoMIMTokenizer` folder or Hub id;
    required) gives the patches, over its `codebook_size` codes (read from the tokenizer when unset).
    `"latent"` (data2vec) regresses an EMA teacher's average of its top `latent_top_k_layers` block outputs,
    each layer-normalised; the teacher's momentum follows a cosine from `teacher_momentum` to
    `teacher_momentum_end` over training.

    Histology metadata shown on model cards: `target_mpp` (microns per pixel of the training tiles),
    `magnification`. The pixel normalization the encoder was trained with, which the image processor
    applies: `normalization_mean`, `normalization_std` (one value per channel, or one for all; configs
    saved with the former names `image_mean`/`image_std` load into these).
    """

    model_type = "histomim"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = None,
        num_register_tokens: int = 0,
        position_embedding: str = "sincos",
        pooling: str = "cls",
        objective: str = "mae",
        mask_ratio: float | None = None,
        mask_patch_size: int | None = None,
        decoder_hidden_size: int = 512,
        decoder_num_hidden_layers: int = 8,
        decoder_num_attention_heads: int = 16,
        decoder_intermediate_size: int | None = None,
        norm_pix_loss: bool = True,
        initializer_range: float = 0.02,
        target_mpp: float | None = 0.5,
        magnification: float | None = 20.0,
        normalization_mean: float | list[float] | tuple[float, ...] = IMAGENET_MEAN,
        normalization_std: float | list[float] | tuple[float, ...] = IMAGENET_STD,
        tokenizer_name_or_path: str | None = None,
        codebook_size: int | None = None,
        block_min_num_patches: int = 16,
        block_min_aspect: float = 0.3,
        latent_top_k_layers: int = 8,
        teacher_momentum: float = 0.996,
        teacher_momentum_end: float = 1.0,
        mlp_type: str = "mlp",
        **kwargs,
    ):
        # Former names: transformers treats every `*_std` config field as an initialisation scale.
        normalization_mean = kwargs.pop("image_mean", normalization_mean)
        normalization_std = kwargs.pop("image_std", normalization_std)
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size or int(round(mlp_ratio * hidden_size))
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.drop_path_rate = drop_path_rate
        self.layerscale_init = layerscale_init
        self.num_register_tokens = num_register_tokens
        self.position_embedding = position_embedding
        self.pooling = pooling
        self.objective = objective
        self.mask_ratio = mask_ratio if mask_ratio is not None else DEFAULT_MASK_RATIOS.get(objective, 0.75)
        self.mask_patch_size = mask_patch_size  # None: derived from the objective (see the property)
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.decoder_num_attention_heads = decoder_num_attention_heads
        self.decoder_intermediate_size = decoder_intermediate_size or int(round(mlp_ratio * decoder_hidden_size))
        self.norm_pix_loss = norm_pix_loss
        self.initializer_range = initializer_range
        self.target_mpp = target_mpp
        self.magnification = magnification
        self.normalization_mean = per_channel(normalization_mean, num_channels)
        self.normalization_std = per_channel(normalization_std, num_channels)
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.codebook_size = codebook_size
        self.block_min_num_patches = block_min_num_patches
        self.block_min_aspect = block_min_aspect
        self.latent_top_k_layers = latent_top_k_layers
        self.teacher_momentum = teacher_momentum
        self.teacher_momentum_end = teacher_momentum_end
        self.mlp_type = mlp_type
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        """Reject settings that would only fail later, deep inside a forward pass."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {self.position_embedding!r}")
        if self.mlp_type not in MLP_TYPES:
            raise ValueError(f"mlp_type must be one of {MLP_TYPES}, got {self.mlp_type!r}")
        if not 0.0 < float(self.mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must lie in the open interval (0, 1), got {self.mask_ratio}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        if self.mask_patch_size % self.patch_size != 0 or self.image_size % self.mask_patch_size != 0:
            raise ValueError(
                f"mask_patch_size ({self.mask_patch_size}) must be a multiple of patch_size ({self.patch_size}) "
                f"and divide image_size ({self.image_size})"
            )
        for name, width, heads in (
            ("hidden_size", self.hidden_size, self.num_attention_heads),
            ("decoder_hidden_size", self.decoder_hidden_size, self.decoder_num_attention_heads),
        ):
            if width % heads != 0:
                raise ValueError(f"{name} ({width}) must be divisible by its number of attention heads ({heads})")
        if self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {self.num_register_tokens}")
        if len(self.normalization_mean) != self.num_channels or len(self.normalization_std) != self.num_channels:
            raise ValueError(
                f"normalization_mean and normalization_std need one value or num_channels ({self.num_channels}) values"
            )
        if not all(std > 0 for std in self.normalization_std):
            raise ValueError(f"normalization_std must be > 0 for every channel (it divides the pixels), got {self.normalization_std}")
        if self.objective == "beit" and not self.tokenizer_name_or_path:
            raise ValueError(
                "objective 'beit' predicts the codes of a visual tokenizer: set tokenizer_name_or_path to a trained "
                "HistoMIMTokenizer folder or Hub id (`histomim pretrain --objective beit --tokenizer PATH`; train one "
                "with `histomim pretrain --objective tokenizer`)"
            )
        if self.objective in BLOCK_WISE_OBJECTIVES and self.mask_patch_size != self.patch_size:
            raise ValueError(f"objective {self.objective!r} masks whole ViT patches: mask_patch_size must equal patch_size")
        if not 0.0 < self.block_min_aspect <= 1.0:
            raise ValueError(f"block_min_aspect must lie in (0, 1], got {self.block_min_aspect}")
        if not 0.0 <= self.teacher_momentum <= self.teacher_momentum_end <= 1.0:
            raise ValueError(
                f"need 0 <= teacher_momentum <= teacher_momentum_end <= 1, got {self.teacher_momentum} and "
                f"{self.teacher_momentum_end}"
            )

    @property
    def mask_patch_size(self) -> int:
        """The masking granularity in pixels: as set, else derived from the current objective, so that
        changing `objective` after construction never leaves a stale value."""
        if self._mask_patch_size is not None:
            return self._mask_patch_size
        # MAE masks whole ViT patches; SimMIM conventionally masks 32 px blocks.
        if self.objective == "simmim" and self.image_size % 32 == 0 and 32 % self.patch_size == 0:
            return 32
        return self.patch_size

    @mask_patch_size.setter
    def mask_patch_size(self, value: int | None) -> None:
        self._mask_patch_size = value

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["mask_patch_size"] = output.pop("_mask_patch_size", None)  # null: follows the objective
        return output

    def mask_grid_size(self) -> int:
        """Mask blocks per image side."""
        return self.image_size // self.mask_patch_size

    def mask_noise_shape(self, batch_size: int) -> tuple[int, int]:
        """(B, n) of the `noise` that fixes a pretraining mask: one value per `mask_patch_size` block, or for the
        block-wise objectives the uniforms of a fixed budget of rectangle attempts."""
        if self.objective in BLOCK_WISE_OBJECTIVES:
            return batch_size, block_wise_noise_size(self.num_patches)
        return batch_size, self.mask_grid_size() ** 2

    def realised_mask_ratio(self) -> float:
        """The fraction of patches each pretraining mask hides: `mask_ratio` rounded to whole blocks, by each
        objective's rule (e.g. SimMIM at 64 px with 32 px blocks and ratio 0.6 masks 2 of 4 blocks: 0.5).
        For the block-wise objectives, the target the rectangles fill up to (they may stop a few patches short)."""
        if self.objective in BLOCK_WISE_OBJECTIVES:
            return num_masked_blocks(self.num_patches, self.mask_ratio) / self.num_patches
        return masked_fraction(self.objective, self.mask_grid_size() ** 2, self.mask_ratio)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens, which sit before the patch tokens in every sequence."""
        return 1 + self.num_register_tokens

    @property
    def pooled_size(self) -> int:
        return 2 * self.hidden_size if self.pooling == "cls+mean" else self.hidden_size


def per_channel(value: float | list[float] | tuple[float, ...], num_channels: int) -> list[float]:
    """A scalar repeated for every channel, or the per-channel values as a list of floats."""
    if isinstance(value, (int, float)):
        return [float(value)] * num_channels
    return [float(v) for v in value]


__all__ = ["HistoMIMConfig"]
