"""Fusion operators: combine per-modality embeddings into one patient embedding ``(B, H)``.

Every operator takes the list of :class:`ModalityEmbedding` (one per modality, in config order)
and a **modality mask** ``(B, M)`` bool, True where the patient has that modality. Any modality
may be missing for any patient, at training and test time:

- :class:`ConcatFusion` and :class:`BilinearFusion` replace a missing modality's embedding with a
  learned "missing" embedding of that modality;
- :class:`CoAttentionFusion` replaces missing query tokens with learned ones, and masks missing
  context tokens out of the attention (a learned null token keeps an all-missing context defined).

:func:`drop_modalities` randomly hides present modalities during training so the model learns
to cope with the missing-modality patterns it will meet at test time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .mil import GatedAttentionPooling


class ModalityEmbedding(NamedTuple):
    """One modality's encoding of a batch of patients."""

    pooled: Tensor  # (B, H) one vector per patient
    tokens: Tensor  # (B, T, H) token sequence (pathways, tiles, or the pooled vector as one token)
    token_mask: Tensor  # (B, T) True for real tokens


def drop_modalities(
    modality_mask: Tensor, probability: float, generator: torch.Generator | None = None
) -> Tensor:
    """Hide each present modality with ``probability``; a patient never loses all of them.

    ``(B, M)`` bool -> ``(B, M)`` bool. Patients whose every modality would be hidden keep their mask.
    """
    if probability <= 0.0:
        return modality_mask
    keep = torch.rand(modality_mask.shape, generator=generator, device=modality_mask.device) >= probability
    dropped = modality_mask & keep  # (B, M)
    nothing_left = ~dropped.any(dim=1, keepdim=True)  # (B, 1)
    return torch.where(nothing_left, modality_mask, dropped)


def fill_missing(pooled: Tensor, modality_mask: Tensor, missing_embedding: Tensor) -> Tensor:
    """Replace missing modalities' embeddings: ``(B, M, H)``, ``(B, M)``, ``(M, H)`` -> ``(B, M, H)``."""
    return torch.where(modality_mask.unsqueeze(-1), pooled, missing_embedding.unsqueeze(0).to(pooled.dtype))


class ConcatFusion(nn.Module):
    """Concatenate the modality embeddings (missing ones replaced by learned embeddings), then an MLP."""

    def __init__(self, num_modalities: int, hidden_size: int, dropout: float = 0.0):
        super().__init__()
        self.missing_embedding = nn.Parameter(torch.zeros(num_modalities, hidden_size))  # (M, H)
        self.mlp = nn.Sequential(nn.Linear(num_modalities * hidden_size, hidden_size), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, embeddings: Sequence[ModalityEmbedding], modality_mask: Tensor) -> Tensor:
        pooled = torch.stack([e.pooled for e in embeddings], dim=1)  # (B, M, H)
        pooled = fill_missing(pooled, modality_mask, self.missing_embedding)
        return self.mlp(pooled.flatten(1))  # (B, M*H) -> (B, H)


class BilinearFusion(nn.Module):
    """Gated Kronecker-product fusion (Pathomic Fusion, PORPOISE), for two or more modalities.

    Each modality's embedding ``e_m`` is reduced to ``h_m = ReLU(W_m e_m)`` ``(B, d)`` and gated by
    ``sigmoid(Bilinear(e_m, mean of the other modalities))``, so every modality decides how much
    of itself to pass given the others. A constant 1 is appended to each gated vector before the
    Kronecker product ``o_1 (x) o_2 (x) ...`` ``(B, (d+1)^M)``, which therefore keeps every unimodal
    and every cross-modal interaction term. ``d = gate_dim`` keeps the product small.
    """

    def __init__(self, num_modalities: int, hidden_size: int, gate_dim: int = 16, dropout: float = 0.0):
        super().__init__()
        if num_modalities < 2:
            raise ValueError(f"bilinear fusion needs at least two modalities, got {num_modalities}")
        self.missing_embedding = nn.Parameter(torch.zeros(num_modalities, hidden_size))  # (M, H)
        self.reductions = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden_size, gate_dim), nn.ReLU()) for _ in range(num_modalities)
        )
        self.gates = nn.ModuleList(nn.Bilinear(hidden_size, hidden_size, gate_dim) for _ in range(num_modalities))
        self.mlp = nn.Sequential(
            nn.Dropout(dropout), nn.Linear((gate_dim + 1) ** num_modalities, hidden_size), nn.ReLU(), nn.Dropout(dropout)
        )

    def forward(self, embeddings: Sequence[ModalityEmbedding], modality_mask: Tensor) -> Tensor:
        pooled = torch.stack([e.pooled for e in embeddings], dim=1)  # (B, M, H)
        pooled = fill_missing(pooled, modality_mask, self.missing_embedding)
        num_modalities = pooled.shape[1]
        others_mean = (pooled.sum(dim=1, keepdim=True) - pooled) / (num_modalities - 1)  # (B, M, H)

        product = pooled.new_ones(pooled.shape[0], 1)  # (B, 1)
        for m, (reduce, gate) in enumerate(zip(self.reductions, self.gates)):
            gated = torch.sigmoid(gate(pooled[:, m], others_mean[:, m])) * reduce(pooled[:, m])  # (B, d)
            gated = nn.functional.pad(gated, (0, 1), value=1.0)  # (B, d + 1)
            product = (product.unsqueeze(-1) * gated.unsqueeze(1)).flatten(1)  # (B, (d+1)^(m+1))
        return self.mlp(product)  # (B, H)


class CoAttentionFusion(nn.Module):
    """Genomic-guided co-attention (MCAT): the query modality's tokens attend over every other token.

    With genomic pathway tokens as queries and histology tiles (plus the radiology token) as
    context, each pathway gathers the tiles relevant to it. The attended tokens and the query
    tokens are each pooled with gated attention and the two vectors are merged by an MLP.

    Missing query modality: its tokens are replaced by learned tokens (which then act as learned
    queries over the context). Missing context modalities: their tokens are masked out of the
    attention; a learned null token is always attendable, so a patient with no context at all
    still gets a defined output.
    """

    def __init__(
        self,
        num_modalities: int,
        query_index: int,
        num_query_tokens: int,
        hidden_size: int,
        num_heads: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_heads})")
        self.query_index = query_index
        self.missing_query_tokens = nn.Parameter(torch.zeros(num_query_tokens, hidden_size))  # (P, H)
        self.null_token = nn.Parameter(torch.zeros(1, 1, hidden_size))  # (1, 1, H)
        self.co_attention = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout, batch_first=True)
        self.attended_norm = nn.LayerNorm(hidden_size)
        self.attended_pooling = GatedAttentionPooling(hidden_size, hidden_size, dropout)
        self.query_pooling = GatedAttentionPooling(hidden_size, hidden_size, dropout)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden_size, hidden_size), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, embeddings: Sequence[ModalityEmbedding], modality_mask: Tensor) -> Tensor:
        query_present = modality_mask[:, self.query_index, None, None]  # (B, 1, 1)
        queries = torch.where(query_present, embeddings[self.query_index].tokens, self.missing_query_tokens)  # (B, P, H)

        # context: a null token, then every token of every other modality that the patient has
        batch = modality_mask.shape[0]
        context = [self.null_token.expand(batch, -1, -1)]  # [(B, 1, H), (B, T_m, H), ...]
        context_mask = [modality_mask.new_ones(batch, 1)]  # [(B, 1), (B, T_m), ...]
        for m, embedding in enumerate(embeddings):
            if m != self.query_index:
                context.append(embedding.tokens)
                context_mask.append(embedding.token_mask & modality_mask[:, m, None])
        context, context_mask = torch.cat(context, dim=1), torch.cat(context_mask, dim=1)  # (B, T, H), (B, T)

        attended, _ = self.co_attention(queries, context, context, key_padding_mask=~context_mask)  # (B, P, H)
        attended = self.attended_norm(attended + queries)
        attended_pooled, _ = self.attended_pooling(attended)  # (B, H)
        query_pooled, _ = self.query_pooling(queries)  # (B, H)
        return self.mlp(torch.cat([query_pooled, attended_pooled], dim=-1))  # (B, 2H) -> (B, H)


__all__ = [
    "BilinearFusion",
    "CoAttentionFusion",
    "ConcatFusion",
    "ModalityEmbedding",
    "drop_modalities",
    "fill_missing",
]
