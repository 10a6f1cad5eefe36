"""The image processor saved next to every HistoMIM model: a ViT processor configured from the model's config.

A plain (PIL-backed) ViT image processor keeps `AutoImageProcessor.from_pretrained` working everywhere,
histomim installed or not, and needs no torchvision.
"""

from __future__ import annotations

from .configuration_histomim import HistoMIMConfig


def image_processor_for(config: HistoMIMConfig):
    """A `ViTImageProcessor` resizing to `config.image_size` and normalizing with the config's mean/std."""
    try:  # transformers >= 5 splits processors by backend; the PIL one needs no torchvision
        from transformers import ViTImageProcessorPil as processor_class
    except ImportError:
        from transformers import ViTImageProcessor as processor_class

    return processor_class(
        do_resize=True,
        size={"height": config.image_size, "width": config.image_size},
        resample=3,  # bicubic, as tiles are usually downsampled
        do_rescale=True,
        do_normalize=True,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )


__all__ = ["image_processor_for"]
