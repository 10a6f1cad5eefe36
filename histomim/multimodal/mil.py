"""Histology encoders for multiple-instance learning (MIL) over the tiles of a slide.

- :class:`ABMIL` aggregates precomputed tile features ``(B, N, D)`` with gated attention (Ilse et
  al. 2018), honouring a padding mask for bags of different sizes and sampling at most
  ``max_tiles`` tiles per bag while training.
- :class:`TileEncoderMIL` runs tile pixels ``(B, N, 3, H, W)`` through an image encoder (a
  :class:`~histomim.mim.modeling_histomim.HistoMIMModel`) first, end to end, for bags small enough to
  backpropagate through; :func:`histomim.lora.add_lora` then makes only LoRA adapters (and chosen heads)
  trainable with PEFT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn


class MILOutput(NamedTuple):
    """What a MIL encoder returns for a batch of bags."""

    pooled: Tensor  # (B, H) bag embedding
    tokens: Tensor  # (B, n, H) tile embeddings (a random subset of tiles when sampled in training)
    token_mask: Tensor  # (B, n) True for real tiles, False for padding
    attention: Tensor  # (B, n) attention weights over tiles, zero on padding, summing to 1 per non-empty bag


def pad_bags(bags: Sequence[Tensor | None], item_shape: int | tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Bags of tiles ``[(N_i, *item_shape) or None]`` (features: ``item_shape = D``; pixels: ``(C, H, W)``) ->
    padded bags ``(B, N, *item_shape)`` and mask ``(B, N)`` (True = real tile)."""
    item_shape = (item_shape,) if isinstance(item_shape, int) else tuple(item_shape)
    longest = max([1, *(len(b) for b in bags if b is not None)])
    features = torch.zeros(len(bags), longest, *item_shape)
    mask = torch.zeros(len(bags), longest, dtype=torch.bool)
    for row, bag in enumerate(bags):
        if bag is not None:
            features[row, : len(bag)], mask[row, : len(bag)] = bag, True
    return features, mask


def sample_tiles(
    features: Tensor, mask: Tensor, max_tiles: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Keep at most ``max_tiles`` real tiles per bag, drawn uniformly without replacement.

    ``features (B, N, D)``, ``mask (B, N)`` -> ``(B, n, D)``, ``(B, n)`` with ``n = min(N, max_tiles)``;
    bags with fewer real tiles keep all of them and stay padded.
    """
    batch, num_tiles = mask.shape
    if num_tiles <= max_tiles:
        return features, mask
    # 1. a random score per tile; padding scores above every real tile so it sorts last
    scores = torch.rand(batch, num_tiles, generator=generator, device=mask.device)  # (B, N) in [0, 1)
    scores = scores.masked_fill(~mask, 2.0)
    # 2. the max_tiles lowest scores are a uniform sample of the real tiles
    keep = scores.argsort(dim=1)[:, :max_tiles]  # (B, n)
    kept_features = features.gather(1, keep.unsqueeze(-1).expand(-1, -1, features.shape[-1]))  # (B, n, D)
    return kept_features, mask.gather(1, keep)


class GatedAttentionPooling(nn.Module):
    """Gated attention pooling: ``a_n = softmax_n(w . (tanh(V h_n) * sigmoid(U h_n)))``, ``z = sum_n a_n h_n``.

    Padded tokens get zero weight; a bag with no real token pools to zeros instead of NaN.
    """

    def __init__(self, in_features: int, attention_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        self.attention_tanh = nn.Sequential(nn.Linear(in_features, attention_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attention_gate = nn.Sequential(nn.Linear(in_features, attention_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_score = nn.Linear(attention_dim, 1)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``tokens (B, N, D)``, ``mask (B, N)`` -> pooled ``(B, D)``, attention ``(B, N)``."""
        scores = self.attention_score(self.attention_tanh(tokens) * self.attention_gate(tokens)).squeeze(-1)  # (B, N)
        if mask is None:
            attention = scores.softmax(dim=-1)  # (B, N)
        else:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            attention = scores.softmax(dim=-1) * mask  # (B, N); an all-padding row becomes all zeros
        pooled = torch.einsum("bn,bnd->bd", attention, tokens)  # (B, D)
        return pooled, attention


class ABMIL(nn.Module):
    """Attention-based MIL over precomputed tile features: ``(B, N, D)`` -> bag embedding ``(B, H)``.

    Args:
        feature_dim: width ``D`` of the tile features.
        hidden_size: width ``H`` of the tile and bag embeddings.
        attention_dim: width of the gated attention network.
        max_tiles: while training, bags larger than this are randomly subsampled (a regularizer and
            a memory bound); evaluation always sees every tile.
    """

    def __init__(
        self,
        feature_dim: int,
        hidden_size: int = 128,
        attention_dim: int = 128,
        dropout: float = 0.0,
        max_tiles: int | None = None,
    ):
        super().__init__()
        if max_tiles is not None and max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1 or None, got {max_tiles}")
        self.feature_dim = feature_dim
        self.max_tiles = max_tiles
        self.tile_embedding = nn.Sequential(nn.Linear(feature_dim, hidden_size), nn.ReLU(), nn.Dropout(dropout))
        self.pooling = GatedAttentionPooling(hidden_size, attention_dim, dropout)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> MILOutput:
        """``features (B, N, D)``, ``mask (B, N)`` bool (True = real tile; None = no padding)."""
        if features.ndim != 3 or features.shape[-1] != self.feature_dim:
            raise ValueError(
                f"tile features must have shape (B, N, {self.feature_dim}), got {tuple(features.shape)}"
            )
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        mask = mask.bool()
        if mask.shape != features.shape[:2]:
            raise ValueError(f"tile mask must have shape {tuple(features.shape[:2])}, got {tuple(mask.shape)}")
        if self.training and self.max_tiles is not None:
            features, mask = sample_tiles(features, mask, self.max_tiles)  # (B, n, D), (B, n)
        # Padding may hold anything (even NaN); zero it so it cannot leak through 0 * NaN.
        features = features.masked_fill(~mask.unsqueeze(-1), 0.0)
        tokens = self.tile_embedding(features)  # (B, n, H)
        pooled, attention = self.pooling(tokens, mask)  # (B, H), (B, n)
        return MILOutput(pooled, tokens, mask, attention)


class TileEncoderMIL(nn.Module):
    """End-to-end MIL: tile pixels ``(B, N, C, H, W)`` -> image encoder -> :class:`ABMIL`.

    ``encoder`` is any module mapping ``pixel_values (T, C, H, W)`` to an output with
    ``pooler_output (T, D)``, e.g. :class:`~histomim.mim.modeling_histomim.HistoMIMModel`. Every
    tile of every bag goes through the encoder with gradients, so keep bags small (or sample them
    with ``max_tiles``) and train the encoder through LoRA adapters (:func:`histomim.lora.add_lora`).
    """

    def __init__(self, encoder: nn.Module, mil: ABMIL):
        super().__init__()
        self.encoder = encoder
        self.mil = mil

    def forward(self, pixel_values: Tensor, mask: Tensor | None = None) -> MILOutput:
        """``pixel_values (B, N, C, H, W)``, ``mask (B, N)`` bool (True = real tile; None = no padding)."""
        if pixel_values.ndim != 5:
            raise ValueError(f"tile pixels must have shape (B, N, C, H, W), got {tuple(pixel_values.shape)}")
        batch, num_tiles = pixel_values.shape[:2]
        if mask is None:
            mask = torch.ones(batch, num_tiles, dtype=torch.bool, device=pixel_values.device)
        mask = mask.bool()
        if self.training and self.mil.max_tiles is not None:
            # sample before encoding: the encoder is the expensive part
            flat, mask = sample_tiles(pixel_values.flatten(2), mask, self.mil.max_tiles)  # (B, n, C*H*W), (B, n)
            pixel_values = flat.view(batch, -1, *pixel_values.shape[2:])  # (B, n, C, H, W)
        # encode the real tiles only, then put their features back in their bag slots
        real = self.encoder(pixel_values=pixel_values[mask]).pooler_output  # (T, D)
        features = real.new_zeros(*mask.shape, real.shape[-1]).masked_scatter(mask.unsqueeze(-1), real)  # (B, n, D)
        return self.mil(features, mask)


__all__ = ["ABMIL", "GatedAttentionPooling", "MILOutput", "TileEncoderMIL", "pad_bags", "sample_tiles"]
