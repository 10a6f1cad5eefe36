"""The HistoMIM encoder family: configuration, models, masking and the image processor."""

from .configuration_histomim import HistoMIMConfig
from .configuration_histomim_convnext import HistoMIMConvNextConfig
from .image_processing_histomim import ProcessorTransform, image_processor_classes, image_processor_for
from .masking import block_random_mask, random_masking
from .modeling_histomim import (
    HistoMIMForImageClassification,
    HistoMIMForPreTraining,
    HistoMIMForPreTrainingOutput,
    HistoMIMModel,
    HistoMIMPreTrainedModel,
)
from .modeling_histomim_convnext import HistoMIMConvNextForPreTraining, HistoMIMConvNextModel

__all__ = [
    "HistoMIMConfig",
    "HistoMIMModel",
    "HistoMIMForPreTraining",
    "HistoMIMForPreTrainingOutput",
    "HistoMIMForImageClassification",
    "HistoMIMPreTrainedModel",
    "image_processor_for",
    "image_processor_classes",
    "ProcessorTransform",
    "random_masking",
    "block_random_mask",
    "HistoMIMConvNextConfig",
    "HistoMIMConvNextModel",
    "HistoMIMConvNextForPreTraining",
]
