"""HistoMIMTokenizer: a visual tokenizer (VQ-KD as in BEiT v2, or a pixel VQ-VAE) whose codes are BEiT's targets.

Read top to bottom: `CosineCodebook` (nearest code by cosine, EMA updates, dead-code restarts) ->
`HistoMIMTokenizerDecoder` (codes -> teacher features or pixels per patch) -> `HistoMIMTokenizer`
(encoder -> codebook -> decoder, and `get_codebook_indices` for BEiT).

Imports of sibling files are relative on purpose: a saved tokenizer carries these files and loads with
`trust_remote_code=True` where histomim itself is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_tokenizer import HistoMIMTokenizerConfig
from .modeling_histomim import (
    HistoMIMModel,
    init_block_module,
    make_blocks,
    patchify,
    resize_position_embedding,
    sincos_2d_position_embedding,
)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over the processes of a distributed run in place (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


class CosineCodebook(nn.Module):
    """`codebook_size` l2-normalised codes of `dim` values; a vector's code is the most cosine-similar one.

    The codes are buffers, not parameters: they follow an exponential moving average of the (normalised)
    encoder outputs assigned to them (`ema_decay`), summed over processes, so every process keeps the same
    codebook. A code whose average count of assigned tokens per step (`cluster_size`) falls below
    `dead_code_threshold` is restarted at a random encoder output of the batch; all codes start that way
    (their counts start at zero), which initialises the codebook from the data.
    """

    def __init__(self, codebook_size: int, dim: int, ema_decay: float, dead_code_threshold: float):
        super().__init__()
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.register_buffer("embedding", torch.zeros(codebook_size, dim))  # (K, d), unit rows
        self.register_buffer("cluster_size", torch.zeros(codebook_size))  # (K,) EMA of assignments per step
        self.register_buffer("embed_sum", torch.zeros(codebook_size, dim))  # (K, d) EMA of assigned vectors

    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, d) unit vectors -> (N,) index of the most similar code (ties: the lowest index)."""
        return (vectors @ self.embedding.t()).argmax(dim=-1)

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, d) encoder outputs -> straight-through codes (B, L, d), indices (B, L), commitment loss.

        In training mode the codebook also takes one EMA step (and restarts dead codes) on this batch.
        """
        latent = F.normalize(latent.float(), dim=-1)  # (B, L, d)
        flat = latent.reshape(-1, latent.shape[-1])  # (N, d)
        indices = self.nearest(flat)  # (N,)
        quantized = self.embedding[indices].view_as(latent)  # (B, L, d)
        if self.training:
            self.ema_update(flat.detach(), indices)
        commitment = F.mse_loss(latent, quantized.detach())
        # straight-through: the decoder's gradient reaches the encoder as if quantization were the identity
        quantized = latent + (quantized - latent).detach()
        return quantized, indices.view(latent.shape[:-1]), commitment

    @torch.no_grad()
    def ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        """One EMA step of the counts and sums of the assigned vectors, then new codes and restarts."""
        codebook_size = self.embedding.shape[0]
        # 1. this batch's assignment counts and vector sums, over all processes
        counts = all_reduce_sum(torch.bincount(indices, minlength=codebook_size).to(flat.dtype))  # (K,)
        sums = all_reduce_sum(torch.zeros_like(self.embed_sum).index_add_(0, indices, flat))  # (K, d)
        # 2. moving averages; a code is the direction of its averaged assigned vectors
        self.cluster_size.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
        self.embed_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
        assigned = self.embed_sum.norm(dim=-1) > 0
        self.embedding[assigned] = F.normalize(self.embed_sum[assigned], dim=-1)
        # 3. dead codes restart at random encoder outputs of this batch (the same on every process: rank 0's),
        # counted at the threshold: a restarted code that gets no token in the next step restarts again
        dead = self.cluster_size < self.dead_code_threshold  # (K,), equal on every process
        num_dead = int(dead.sum())
        if num_dead:
            restart = flat[torch.randint(len(flat), (num_dead,), device=flat.device)]  # (n, d)
            if dist.is_available() and dist.is_initialized():
                dist.broadcast(restart, src=0)
            self.embedding[dead] = restart
            self.cluster_size[dead] = self.dead_code_threshold
            self.embed_sum[dead] = restart * self.dead_code_threshold


class HistoMIMTokenizerDecoder(nn.Module):
    """Codes of the patches (B, L, d) -> the target of every patch (B, L, target_dim), through a few blocks."""

    def __init__(self, config: HistoMIMTokenizerConfig):
        super().__init__()
        encoder = config.encoder_config
        self.embed = nn.Linear(config.codebook_dim, encoder.hidden_size)
        self.position_embeddings = nn.Parameter(torch.zeros(1, encoder.num_patches, encoder.hidden_size), requires_grad=False)
        self.blocks = make_blocks(
            encoder, config.decoder_num_hidden_layers, encoder.hidden_size, encoder.num_attention_heads,
            encoder.intermediate_size, 0.0,
        )
        self.norm = nn.LayerNorm(encoder.hidden_size, eps=encoder.layer_norm_eps)
        self.pred = nn.Linear(encoder.hidden_size, config.target_dim)

    def forward(self, codes: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        hidden_states = self.embed(codes) + resize_position_embedding(self.position_embeddings, grid_hw)  # (B, L, D)
        for block in self.blocks:
            hidden_states, _ = block(hidden_states)
        return self.pred(self.norm(hidden_states))  # (B, L, target_dim)


@dataclass
class HistoMIMTokenizerOutput(ModelOutput):
    """
    loss: reconstruction loss + commitment_weight x commitment loss.
    reconstruction_loss: cosine distance to the teacher's patch features (VQ-KD) or pixel MSE (VQ-VAE).
    commitment_loss: mean squared distance of the normalised encoder outputs to their codes.
    logits: (B, L, target_dim) the decoder's reconstruction of each patch's target.
    codebook_indices: (B, L) the code of every patch.
    perplexity: exp(entropy) of the batch's code histogram (as many codes as are used evenly).
    codebook_usage: fraction of the codebook this batch uses.
    """

    loss: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None
    commitment_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    codebook_indices: torch.Tensor | None = None
    perplexity: torch.Tensor | None = None
    codebook_usage: torch.Tensor | None = None


def code_statistics(indices: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Code indices of any shape -> (perplexity, fraction of the codebook used) of their histogram."""
    counts = torch.bincount(indices.flatten(), minlength=codebook_size).float()  # (K,)
    probs = counts / counts.sum()
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
    return entropy.exp(), (counts > 0).float().mean()


class HistoMIMTokenizer(PreTrainedModel):
    """ViT encoder -> projection to the codebook's width -> `CosineCodebook` -> decoder of the target.

    The teacher of VQ-KD (a frozen encoder, `teacher_name_or_path`) is needed for training only: attach it with
    `prepare_targets()` (loads it) or `set_teacher(model)`; it is never saved with the tokenizer.
    """

    config_class = HistoMIMTokenizerConfig
    base_model_prefix = "histomim"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["HistoMIMEmbeddings", "HistoMIMBlock"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # the teacher is attached for training; published tokenizers and checkpoints without it load cleanly
    _keys_to_ignore_on_load_unexpected = [r"^teacher\."]

    def __init__(self, config: HistoMIMTokenizerConfig):
        super().__init__(config)
        if config.target_dim is None:
            raise ValueError(
                "HistoMIMTokenizerConfig.target_dim is unset: give the teacher's feature width (its hidden_size), "
                "or build the tokenizer with histomim.mim.tokenizer_for_teacher"
            )
        encoder = config.encoder_config
        self.histomim = HistoMIMModel(encoder)
        # BEiT v2's task layer: encoder width -> codebook width
        self.quant_proj = nn.Sequential(
            nn.Linear(encoder.hidden_size, encoder.hidden_size), nn.Tanh(), nn.Linear(encoder.hidden_size, config.codebook_dim)
        )
        self.quantizer = CosineCodebook(config.codebook_size, config.codebook_dim, config.ema_decay, config.dead_code_threshold)
        self.decoder = HistoMIMTokenizerDecoder(config)
        self.teacher = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Xavier linears and unit norms as the encoder; random unit codes; fixed sin-cos decoder positions."""
        if init_block_module(module):
            return
        if isinstance(module, CosineCodebook):
            init.copy_(module.embedding, F.normalize(torch.randn_like(module.embedding), dim=-1))
            init.zeros_(module.cluster_size)
            init.zeros_(module.embed_sum)
        elif isinstance(module, HistoMIMTokenizerDecoder):
            encoder = self.config.encoder_config
            grid = encoder.image_size // encoder.patch_size
            init.copy_(module.position_embeddings, sincos_2d_position_embedding(grid, encoder.hidden_size)[None, 1:])

    # -- the teacher (training only) -------------------------------------------------------------

    def prepare_targets(self) -> None:
        """Load the frozen teacher named by `config.teacher_name_or_path` (VQ-KD); pixels need nothing."""
        if self.config.target == "pixels" or self.teacher is not None:
            return
        if not self.config.teacher_name_or_path:
            raise ValueError("a tokenizer with target 'teacher' needs teacher_name_or_path (--teacher PATH)")
        self.set_teacher(load_teacher(self.config.teacher_name_or_path))

    def set_teacher(self, teacher: nn.Module) -> None:
        """Freeze `teacher` and use its patch features as targets; its grid and width must match."""
        width = teacher.config.hidden_size
        if width != self.config.target_dim:
            raise ValueError(f"the teacher's features are {width} wide, the tokenizer's target_dim is {self.config.target_dim}")
        teacher_patch = getattr(teacher.config, "patch_size", None)
        if teacher_patch not in (None, self.config.patch_size):
            raise ValueError(
                f"the teacher's patch_size {teacher_patch} differs from the tokenizer's {self.config.patch_size}: "
                "their patch features would not correspond"
            )
        self.teacher = teacher.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: no stochastic depth or dropout in its targets
        return self

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        """Saves the tokenizer without its teacher (a training tool, loaded again from its path)."""
        state_dict = state_dict if state_dict is not None else self.state_dict()
        state_dict = {name: value for name, value in state_dict.items() if not name.startswith("teacher.")}
        return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)

    @torch.no_grad()
    def teacher_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, target_dim) the teacher's last patch tokens (prefix tokens dropped)."""
        if self.teacher is None:
            raise ValueError("no teacher attached: call prepare_targets() (or set_teacher) before training the tokenizer")
        num_patches = (pixel_values.shape[-2] // self.config.patch_size) * (pixel_values.shape[-1] // self.config.patch_size)
        tokens = self.teacher(pixel_values=pixel_values).last_hidden_state  # (B, P + L, Dt)
        if tokens.ndim != 3 or tokens.shape[1] < num_patches:
            raise ValueError(f"the teacher returned {tuple(tokens.shape)}, not (batch, tokens >= {num_patches}, width)")
        return tokens[:, -num_patches:].float()

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Nothing: the codebook takes its EMA steps in the forward passes (the pretraining loop calls this
        after every optimizer step of every model it trains)."""

    # -- tokenizing and training ---------------------------------------------------------------

    def encode(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False):
        """(B, C, H, W) -> straight-through codes (B, L, d), indices (B, L), commitment loss."""
        tokens = self.histomim(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding).last_hidden_state
        patches = tokens[:, self.config.encoder_config.num_prefix_tokens :]  # (B, L, D)
        return self.quantizer(self.quant_proj(patches))

    @torch.no_grad()
    def get_codebook_indices(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> (B, L) long, the code of every patch; always in eval mode, so deterministic and
        without touching the codebook."""
        was_training = self.training
        self.eval()
        try:
            return self.encode(pixel_values, interpolate_pos_encoding)[1]
        finally:
            self.train(was_training)

    def forward(
        self,
        pixel_values: torch.Tensor,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> HistoMIMTokenizerOutput | tuple:
        r"""
        pixel_values: (B, C, H, W) normalized images.
        noise: ignored (a tokenizer masks nothing); accepted so that the pretraining loop drives every model alike.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        grid_hw = (pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[-1] // self.config.patch_size)
        codes, indices, commitment = self.encode(pixel_values, interpolate_pos_encoding)
        logits = self.decoder(codes.to(self.decoder.embed.weight.dtype), grid_hw).float()  # (B, L, target_dim)
        if self.config.target == "teacher":
            target = self.teacher_features(pixel_values)  # (B, L, Dt)
            reconstruction = 1 - F.cosine_similarity(logits, target, dim=-1).mean()
        else:
            reconstruction = F.mse_loss(logits, patchify(pixel_values.float(), self.config.patch_size))
        loss = reconstruction + self.config.commitment_weight * commitment
        perplexity, usage = code_statistics(indices, self.config.codebook_size)
        output = HistoMIMTokenizerOutput(
            loss=loss, reconstruction_loss=reconstruction.detach(), commitment_loss=commitment.detach(), logits=logits,
            codebook_indices=indices, perplexity=perplexity, codebook_usage=usage,
        )
        return output if return_dict else output.to_tuple()


def load_teacher(name_or_path: str) -> nn.Module:
    """A frozen encoder from a folder or Hub id: any `AutoModel` whose output has `last_hidden_state`."""
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(name_or_path).requires_grad_(False).eval()
    except (OSError, ValueError) as error:
        raise ValueError(f"teacher {name_or_path!r} does not load with AutoModel.from_pretrained: {error}") from error


def tokenizer_for_teacher(config: HistoMIMTokenizerConfig) -> HistoMIMTokenizer:
    """A new tokenizer whose decoder is as wide as its teacher's features (read from the teacher's config), the
    teacher loaded and attached."""
    if config.target == "teacher" and config.target_dim is None:
        from transformers import AutoConfig

        if not config.teacher_name_or_path:
            raise ValueError("a tokenizer with target 'teacher' needs teacher_name_or_path (--teacher PATH)")
        config.target_dim = AutoConfig.from_pretrained(config.teacher_name_or_path).hidden_size
    tokenizer = HistoMIMTokenizer(config)
    tokenizer.prepare_targets()
    return tokenizer


__all__ = ["HistoMIMTokenizer", "HistoMIMTokenizerOutput", "CosineCodebook", "code_statistics", "tokenizer_for_teacher"]
