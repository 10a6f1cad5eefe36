"""The HistoMIM encoder family: configuration, models, masking and the image processor."""

from .configuration_histomim import HistoMIMConfig
from .configuration_tokenizer import HistoMIMTokenizerConfig
from .configuration_histomim_convnext import HistoMIMConvNextConfig
from .image_processing_histomim import ProcessorTransform, image_processor_classes, image_processor_for
from .masking import block_random_mask, block_wise_masking, random_masking
from .modeling_histomim import (
    HistoMIMForImageClassification,
    HistoMIMForPreTraining,
    HistoMIMForPreTrainingOutput,
    HistoMIMForSemanticSegmentation,
    HistoMIMModel,
    HistoMIMPreTrainedModel,
)
from .modeling_tokenizer import HistoMIMTokenizer, HistoMIMTokenizerOutput, tokenizer_for_teacher
from .modeling_histomim_convnext import HistoMIMConvNextForPreTraining, HistoMIMConvNextModel

__all__ = [
    "HistoMIMConfig",
    "HistoMIMModel",
    "HistoMIMForPreTraining",
    "HistoMIMForPreTrainingOutput",
    "HistoMIMForImageClassification",
    "HistoMIMForSemanticSegmentation",
    "HistoMIMPreTrainedModel",
    "image_processor_for",
    "image_processor_classes",
    "ProcessorTransform",
    "random_masking",
    "block_random_mask",
    "block_wise_masking",
    "HistoMIMTokenizerConfig",
    "HistoMIMTokenizer",
    "HistoMIMTokenizerOutput",
    "tokenizer_for_teacher",
    "HistoMIMConvNextConfig",
    "HistoMIMConvNextModel",
    "HistoMIMConvNextForPreTraining",
]
