"""Survival heads on top of a fused embedding, and the conversions from their outputs to survival curves.

- :class:`CoxHead` maps an embedding ``(B, D)`` to a risk score ``(B,)`` (log hazard ratio, higher = worse);
  :class:`histomim.survival.curves.BreslowBaseline` turns risk scores into survival functions after training.
- :class:`DiscreteTimeHead` maps ``(B, D)`` to hazard logits ``(B, K)`` over ``K`` time bins (PORPOISE);
  :func:`hazards_to_survival` and :func:`discrete_risk` give the survival curve and a risk score.

Pure torch: this file ships with every saved fusion model (remote code).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CoxHead(nn.Module):
    """Linear Cox head: ``risk = w . dropout(x)``, no bias (a Cox model's baseline hazard absorbs it)."""

    def __init__(self, in_features: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.dropout(x)).squeeze(-1)  # (B, D) -> (B,)


class LinearRisk(nn.Linear):
    """A linear log-hazard term on the raw (standardized) genomic covariates, ``x . beta`` ``(B, G) -> (B,)``,
    added to the head's output beside the encoders: the model contains an elastic-net-Cox-like linear
    model, so that the network only has to learn what a linear model misses.

    Zero-initialized: an untrained path leaves the network's predictions unchanged. ``SurvivalEstimator``
    sets ``beta`` to a Coxnet fit and freezes it.
    """

    def __init__(self, in_features: int):
        super().__init__(in_features, 1, bias=False)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).squeeze(-1)  # (B, G) -> (B,)


class DiscreteTimeHead(nn.Module):
    """Discrete-time hazard head: one hazard logit per time bin."""

    def __init__(self, in_features: int, num_bins: int, dropout: float = 0.0):
        super().__init__()
        if num_bins < 2:
            raise ValueError(f"`num_bins` must be at least 2, got {num_bins}")
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, num_bins)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.dropout(x))  # (B, D) -> (B, K)


def hazards_to_survival(hazards: Tensor) -> Tensor:
    """``S_k = prod_{j<=k} (1 - h_j)``: probability of surviving through bin ``k``. ``(B, K) -> (B, K)``."""
    return torch.cumprod(1.0 - hazards, dim=-1)


def discrete_risk(hazards: Tensor) -> Tensor:
    """Risk score of a discrete-time model, ``-sum_k S_k`` (higher = worse), as in PORPOISE. ``(B, K) -> (B,)``."""
    return -hazards_to_survival(hazards).sum(dim=-1)


__all__ = ["CoxHead", "DiscreteTimeHead", "LinearRisk", "discrete_risk", "hazards_to_survival"]
