"""PNG figures that training runs leave behind: MIM reconstruction grids and loss curves.

Drawn with `histomim.plotting` (a Figure on an Agg canvas, imported on first use; atomic PNGs).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..plotting import new_figure, save_png


def to_display(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, C, H, W) normalized images -> (B, H, W, C) float RGB in [0, 1]."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    images = (pixels.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    return images.permute(0, 2, 3, 1).numpy()


def save_reconstruction_grid(
    pixel_values: torch.Tensor,
    reconstruction: torch.Tensor,
    pixel_mask: torch.Tensor,
    path: str | Path,
    mean: Sequence[float],
    std: Sequence[float],
    title: str | None = None,
    normalized_prediction: torch.Tensor | None = None,
) -> Path:
    """One row per image: original | masked input | reconstruction | reconstruction with visible patches pasted in.

    With ``normalized_prediction`` (a model trained on per-patch normalized targets, MAE's norm_pix_loss)
    the reconstruction can only be shown by borrowing each patch's mean and std from the ground truth,
    which makes it look better than the model is: its columns say so, and the prediction itself is shown
    first, without any ground-truth statistics.

    Args:
        pixel_values: (B, C, H, W) normalized inputs.
        reconstruction: (B, C, H, W) model output in the same normalized space.
        pixel_mask: (B, 1, H, W) or (B, C, H, W), 1 where the patch was masked.
        normalized_prediction: (B, C, H, W) the raw prediction in per-patch normalized space.
    """
    mask = pixel_mask.detach().float().cpu()
    pixels, reconstruction = pixel_values.detach().float().cpu(), reconstruction.detach().float().cpu()
    columns = {
        "original": pixels,
        "masked": pixels * (1 - mask) + mask * _grey(pixels, mean, std),
        "reconstruction": reconstruction,
        "reconstruction + visible": pixels * (1 - mask) + reconstruction * mask,
    }
    if normalized_prediction is not None:
        prediction = normalized_prediction.detach().float().cpu()
        columns = {
            "original": columns["original"],
            "masked": columns["masked"],
            "prediction (per-patch\nnormalized, as trained)": prediction,
            "with ground-truth\npatch mean/std": columns["reconstruction"],
            "with ground-truth\nmean/std + visible": columns["reconstruction + visible"],
        }
    images = {name: to_display(value, mean, std) for name, value in columns.items()}  # each (B, H, W, C)
    rows = pixels.shape[0]
    figure = new_figure(figsize=(2.2 * len(columns), 2.2 * rows))
    axes = figure.subplots(rows, len(columns), squeeze=False)
    for row in range(rows):
        for col, (name, batch) in enumerate(images.items()):
            axis = axes[row, col]
            axis.imshow(batch[row])
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name, fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save_png(figure, path)


def _grey(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Mid-grey in the normalized space of ``pixels``: masked patches show as flat grey, as in the MAE paper."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((0.5 - mean_t) / std_t).expand_as(pixels)


def save_loss_curve(
    steps: Sequence[int],
    losses: Sequence[float],
    path: str | Path,
    title: str = "training loss",
    ylabel: str = "loss",
    smoothing: int | None = None,
) -> Path:
    """Raw loss per step plus a moving average (window ``smoothing``, default ~5% of the run)."""
    if len(steps) != len(losses) or not len(steps):
        raise ValueError(f"need as many steps as losses and at least one of each, got {len(steps)} and {len(losses)}")
    steps_a, losses_a = np.asarray(steps), np.asarray(losses, dtype=np.float64)
    figure = new_figure(figsize=(6, 3.5))
    axis = figure.subplots()
    axis.plot(steps_a, losses_a, color="tab:blue", alpha=0.35, linewidth=1, label="per step")
    window = smoothing or max(1, len(losses_a) // 20)
    if window > 1 and len(losses_a) > window:
        smooth = np.convolve(losses_a, np.ones(window) / window, mode="valid")  # (N - window + 1,)
        axis.plot(steps_a[window - 1 :], smooth, color="tab:blue", linewidth=2, label=f"mean of {window}")
    axis.set_xlabel("step")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return save_png(figure, path)
