"""Radiology encoders: small 2-D/3-D CNNs over scans ``(B, C, H, W)`` / ``(B, C, D, H, W)`` -> ``(B, hidden_size)``.

Pure torch: this file ships with every saved fusion model (remote code). Reading DICOM/NIfTI files into
those tensors is :func:`histomim.data.radiology.load_scan`'s job.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from torch import Tensor, nn


class ConvStage(nn.Sequential):
    """``Conv(3, stride 2) -> GroupNorm -> ReLU``: halves every spatial size."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        super().__init__(
            conv(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False),
            # GroupNorm, not BatchNorm: survival batches are small and modalities go missing per patient
            nn.GroupNorm(math.gcd(8, out_channels), out_channels),
            nn.ReLU(inplace=True),
        )


class RadiologyEncoder(nn.Module):
    """Small CNN for slices ``(B, C, H, W)`` or volumes ``(B, C, D, H, W)`` -> embedding ``(B, hidden_size)``."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64),
        hidden_size: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        widths = [in_channels, *channels]
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.stages = nn.Sequential(*(ConvStage(spatial_dims, i, o) for i, o in itertools.pairwise(widths)))
        self.projection = nn.Sequential(nn.Linear(widths[-1], hidden_size), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != self.spatial_dims + 2 or images.shape[1] != self.in_channels:
            layout = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, D, H, W)"
            raise ValueError(
                f"radiology images must have shape {layout} with C={self.in_channels}, got {tuple(images.shape)}"
            )
        features = self.stages(images)  # (B, C', *spatial / 2^S)
        pooled = features.flatten(2).mean(dim=-1)  # (B, C') global average pool
        return self.projection(pooled)  # (B, H)


__all__ = ["ConvStage", "RadiologyEncoder"]
