"""The image processor saved next to every HistoMIM model: a ViT processor configured from the model's config.

transformers ships ViT's processor with two backends: torchvision (`ViTImageProcessor`, the fast one,
batched tensor ops) and PIL (`ViTImageProcessorPil`). The torchvision one is chosen where torchvision
imports, the PIL one elsewhere; both save the same `preprocessor_config.json`, so
`AutoImageProcessor.from_pretrained` works everywhere, histomim installed or not.

The processor is the one preprocessing of histomim: feature extraction (`histomim.features`) and the
model card's snippet both go through it, so a tile gives the same features either way.
"""

from __future__ import annotations

import torch
from transformers.utils import is_torchvision_available

from .configuration_histomim import HistoMIMConfig


def image_processor_classes() -> dict[str, type]:
    """The ViT processor class of each backend installed here: {"pil": ..., "torchvision": ...}."""
    from transformers import ViTImageProcessorPil

    classes = {"pil": ViTImageProcessorPil}
    if is_torchvision_available():
        # imported from its module: without torchvision the top-level name falls back to the PIL class
        from transformers.models.vit.image_processing_vit import ViTImageProcessor

        classes["torchvision"] = ViTImageProcessor
    return classes


def image_processor_for(config: HistoMIMConfig, image_size: int | None = None, backend: str | None = None):
    """A ViT image processor resizing to `image_size` (default `config.image_size`) and normalizing with the
    config's `normalization_mean`/`normalization_std`; the torchvision backend where installed, unless
    `backend` ("pil" or "torchvision") says otherwise."""
    classes = image_processor_classes()
    backend = backend or ("torchvision" if "torchvision" in classes else "pil")
    if backend not in classes:
        raise ValueError(f"image processor backend {backend!r} is not available here; available: {sorted(classes)}")
    size = image_size or config.image_size
    return classes[backend](
        do_resize=True,
        size={"height": size, "width": size},
        resample=3,  # bicubic, as tiles are usually downsampled
        do_rescale=True,
        do_normalize=True,
        image_mean=config.normalization_mean,
        image_std=config.normalization_std,
    )


class ProcessorTransform:
    """PIL image -> (C, H, W) float tensor through an image processor: a dataset `transform` (picklable, so
    it also runs in DataLoader workers)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(image, return_tensors="pt")["pixel_values"][0]


__all__ = ["image_processor_for", "image_processor_classes", "ProcessorTransform"]
