"""HistoMIMTokenizer configuration: a ViT encoder, a cosine codebook and the decoder of a visual tokenizer."""

from __future__ import annotations

from transformers import PretrainedConfig

from .configuration_histomim import HistoMIMConfig

TOKENIZER_TARGETS = ("teacher", "pixels")

# Saved tokenizers name their classes, so they load with trust_remote_code=True where histomim is absent.
TOKENIZER_AUTO_MAP = {
    "AutoConfig": "configuration_tokenizer.HistoMIMTokenizerConfig",
    "AutoModel": "modeling_tokenizer.HistoMIMTokenizer",
}


class HistoMIMTokenizerConfig(PretrainedConfig):
    r"""Configuration of a visual tokenizer for BEiT pretraining (`HistoMIMTokenizer`).

    A ViT encoder (`encoder_config`, a `HistoMIMConfig` or its dict) turns each patch into a vector that is
    projected to `codebook_dim`, l2-normalised and replaced by the nearest (cosine) of `codebook_size` codes;
    a decoder of `decoder_num_hidden_layers` blocks of the encoder's width reconstructs the `target` of each
    patch from the codes:

    - `"teacher"` (VQ-KD, BEiT v2): a frozen teacher encoder's patch features (`teacher_name_or_path`, any
      histomim or `AutoModel` encoder with the same patch grid), `target_dim` their width, cosine loss;
    - `"pixels"` (VQ-VAE): the patch's pixels, mean squared error.

    The codebook learns by exponential moving averages (`ema_decay`), not gradients; a code whose average
    assignment count falls under `dead_code_threshold` tokens is restarted at an encoder output of the
    batch. `commitment_weight` scales the loss pulling encoder outputs to their codes.
    """

    model_type = "histomim_tokenizer"
    sub_configs = {"encoder_config": HistoMIMConfig}

    def __init__(
        self,
        encoder_config: HistoMIMConfig | dict | None = None,
        codebook_size: int = 8192,
        codebook_dim: int = 32,
        decoder_num_hidden_layers: int = 1,
        target: str = "teacher",
        teacher_name_or_path: str | None = None,
        target_dim: int | None = None,
        ema_decay: float = 0.99,
        dead_code_threshold: float = 1.0,
        commitment_weight: float = 0.25,
        **kwargs,
    ):
        if encoder_config is None:
            encoder_config = HistoMIMConfig()
        elif isinstance(encoder_config, dict):
            encoder_config = HistoMIMConfig(**{k: v for k, v in encoder_config.items() if k != "model_type"})
        self.encoder_config = encoder_config
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.decoder_num_hidden_layers = decoder_num_hidden_layers
        self.target = target
        self.teacher_name_or_path = teacher_name_or_path
        # pixels: one value per pixel of a patch; a teacher's width is known once it is loaded
        self.target_dim = target_dim or (self.pixel_target_dim if target == "pixels" else None)
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.commitment_weight = commitment_weight
        kwargs.setdefault("auto_map", dict(TOKENIZER_AUTO_MAP))
        super().__init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        if self.target not in TOKENIZER_TARGETS:
            raise ValueError(f"target must be one of {TOKENIZER_TARGETS}, got {self.target!r}")
        if self.codebook_size < 2 or self.codebook_dim < 1:
            raise ValueError(f"need codebook_size >= 2 and codebook_dim >= 1, got {self.codebook_size} x {self.codebook_dim}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")

    def to_dict(self) -> dict:
        output = super().to_dict()
        # transformers takes any class named "*Tokenizer*" for a text tokenizer and records it in auto_map as a
        # [slow, fast] pair, which AutoConfig cannot load with trust_remote_code: keep plain class references
        output["auto_map"] = {
            auto_class: reference[0] if isinstance(reference, (list, tuple)) else reference
            for auto_class, reference in output.get("auto_map", {}).items()
        }
        return output

    @property
    def objective(self) -> str:
        """What `histomim pretrain --objective` calls training this model."""
        return "tokenizer"

    @property
    def pixel_target_dim(self) -> int:
        return self.encoder_config.patch_size**2 * self.encoder_config.num_channels

    # the encoder's input settings, so image processors and data pipelines read a tokenizer like an encoder
    @property
    def image_size(self) -> int:
        return self.encoder_config.image_size

    @property
    def patch_size(self) -> int:
        return self.encoder_config.patch_size

    @property
    def num_patches(self) -> int:
        return self.encoder_config.num_patches

    @property
    def normalization_mean(self) -> list[float]:
        return self.encoder_config.normalization_mean

    @property
    def normalization_std(self) -> list[float]:
        return self.encoder_config.normalization_std

    def mask_noise_shape(self, batch_size: int) -> None:
        """A tokenizer masks nothing: the pretraining loop draws no mask noise for it."""
        return None


__all__ = ["HistoMIMTokenizerConfig"]
