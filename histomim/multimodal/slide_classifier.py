"""Slide-level classification with the ABMIL of the survival models, as a scikit-learn classifier.

    classifier = SlideClassifier(epochs=100).fit(train_files, train_labels)   # one feature file per slide
    classifier.predict_proba(test_files)                                      # (n_slides, n_classes)
    classifier.predict_attention(test_files)                                  # per slide, (N_i,) over its tiles

A slide is a bag of tile features: a feature file (`histomim extract` safetensors, CLAM/TRIDENT h5, .npy;
read by `histomim.features.load_tile_features`), a list of files (a patient's slides, pooled as one bag)
or an (N, D) array. `ABMIL` (gated attention) pools the bag and a linear layer gives the class logits;
training is full-batch AdamW on the cross-entropy. `predict_attention` gives the tile weights that
`histomim.slide_maps` draws over the slide and writes to QuPath GeoJSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted
from torch import nn

from .mil import ABMIL, pad_bags


class ABMILClassifier(nn.Module):
    """``(B, N, D)`` tile features -> ``(B, C)`` logits and ``(B, N)`` attention."""

    def __init__(self, feature_dim: int, num_classes: int, hidden_size: int, attention_dim: int, dropout: float,
                 max_tiles: int | None):  # fmt: skip
        super().__init__()
        self.mil = ABMIL(feature_dim, hidden_size, attention_dim, dropout, max_tiles)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bag = self.mil(features, mask)
        return self.classifier(bag.pooled), bag.attention  # (B, C), (B, n)


def load_bag(bag, index: int) -> torch.Tensor:
    """(N, D) float32 tile features of one slide; a missing or unreadable file is named with its position."""
    from ..features import load_tile_features

    if isinstance(bag, (str, Path)):
        bag = [bag]
    if isinstance(bag, (list, tuple)) and bag and isinstance(bag[0], (str, Path)):
        try:
            return torch.cat([load_tile_features(path) for path in bag])
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"slide {index}: {error}") from None
    features = torch.as_tensor(np.asarray(bag), dtype=torch.float32)
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"slide {index}: tile features must be a non-empty (N, D) array, got shape {tuple(features.shape)}")
    return features


class SlideClassifier(ClassifierMixin, BaseEstimator):
    """ABMIL slide classifier with scikit-learn's interface: ``fit``, ``predict_proba``, ``predict``, ``score``,
    ``get_params``/``set_params`` (so ``clone``, ``cross_val_score`` and grid searches work).

    Args:
        hidden_size, attention_dim, dropout, max_tiles: the `ABMIL` (max_tiles subsamples bags in training).
        epochs, learning_rate, weight_decay: full-batch AdamW.
        random_state: seeds initialisation and tile sampling (the global RNG is left alone).
    """

    def __init__(self, hidden_size: int = 64, attention_dim: int = 64, dropout: float = 0.1, max_tiles: int | None = None,
                 epochs: int = 100, learning_rate: float = 1e-3, weight_decay: float = 1e-4, random_state: int = 0,
                 device: str = "cpu"):  # fmt: skip
        self.hidden_size = hidden_size
        self.attention_dim = attention_dim
        self.dropout = dropout
        self.max_tiles = max_tiles
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.random_state = random_state
        self.device = device

    def _bags(self, X) -> tuple[torch.Tensor, torch.Tensor]:
        bags = [load_bag(bag, i) for i, bag in enumerate(X)]
        dims = {bag.shape[1] for bag in bags}
        expected = getattr(self, "feature_dim_", None)
        if len(dims) > 1 or (expected is not None and dims != {expected}):
            raise ValueError(f"tile features of the slides have widths {sorted(dims)}"
                             + (f"; the classifier was fitted on {expected}" if expected is not None else ""))  # fmt: skip
        features, mask = pad_bags(bags, dims.pop())  # (B, N, D), (B, N)
        return features.to(self.device), mask.to(self.device)

    def fit(self, X: Sequence, y) -> SlideClassifier:
        """Fit on slides ``X`` (feature files or arrays, see the module) and their labels ``y`` (any hashable values)."""
        y = np.asarray(y)
        if len(y) != len(X):
            raise ValueError(f"{len(X)} slides but {len(y)} labels")
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"need at least two classes, got {self.classes_.tolist()}")
        self.feature_dim_ = None
        features, mask = self._bags(X)
        self.feature_dim_ = features.shape[-1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            self.model_ = ABMILClassifier(self.feature_dim_, len(self.classes_), self.hidden_size, self.attention_dim,
                                          self.dropout, self.max_tiles).to(self.device)  # fmt: skip
            optimizer = torch.optim.AdamW(self.model_.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
            labels = torch.as_tensor(codes, device=self.device)
            self.loss_history_ = []
            self.model_.train()
            for _ in range(self.epochs):
                logits, _ = self.model_(features, mask)
                loss = nn.functional.cross_entropy(logits, labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                self.loss_history_.append(loss.item())
        self.model_.eval()
        return self

    @torch.no_grad()
    def _forward(self, X) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_is_fitted(self, "model_")
        features, mask = self._bags(X)
        logits, attention = self.model_.eval()(features, mask)
        return logits, attention, mask

    def predict_proba(self, X) -> np.ndarray:
        """(n_slides, n_classes) class probabilities, columns in the order of ``classes_``."""
        return self._forward(X)[0].softmax(-1).cpu().double().numpy()

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def predict_attention(self, X) -> list[np.ndarray]:
        """Per slide, the attention over its tiles (N_i,), in file order, summing to 1."""
        _, attention, mask = self._forward(X)
        return [attention[i][mask[i]].cpu().double().numpy() for i in range(len(mask))]

    def score(self, X, y) -> float:
        """Balanced accuracy of ``predict(X)`` (slide datasets are rarely balanced)."""
        from sklearn.metrics import balanced_accuracy_score

        return float(balanced_accuracy_score(np.asarray(y), self.predict(X)))


__all__ = ["SlideClassifier", "ABMILClassifier", "load_bag"]
