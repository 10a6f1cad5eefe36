"""histomim: masked image modeling for histopathology on the Hugging Face stack.

Importing histomim registers its models with the transformers Auto classes, so
`AutoModel.from_pretrained(path_or_repo)` returns a `HistoMIMModel` for a saved histomim encoder.
Heavy optional packages (datasets, scikit-survival, slide readers) are imported where they are used.
"""

from .multimodal import HistoFusionConfig, HistoFusionForSurvival
from .mim import (
    HistoMIMConfig,
    HistoMIMConvNextConfig,
    HistoMIMConvNextForPreTraining,
    HistoMIMConvNextModel,
    HistoMIMForImageClassification,
    HistoMIMForPreTraining,
    HistoMIMForSemanticSegmentation,
    HistoMIMModel,
    HistoMIMTokenizer,
    HistoMIMTokenizerConfig,
    image_processor_classes,
    image_processor_for,
)

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageClassification,
        AutoModelForPreTraining,
        AutoModelForSemanticSegmentation,
    )

    AutoConfig.register("histomim", HistoMIMConfig, exist_ok=True)
    AutoModel.register(HistoMIMConfig, HistoMIMModel, exist_ok=True)
    AutoModelForPreTraining.register(HistoMIMConfig, HistoMIMForPreTraining, exist_ok=True)
    AutoModelForImageClassification.register(HistoMIMConfig, HistoMIMForImageClassification, exist_ok=True)
    AutoModelForSemanticSegmentation.register(HistoMIMConfig, HistoMIMForSemanticSegmentation, exist_ok=True)
    AutoImageProcessor.register(HistoMIMConfig, image_processor_classes=image_processor_classes(), exist_ok=True)
    AutoConfig.register("histomim_tokenizer", HistoMIMTokenizerConfig, exist_ok=True)
    AutoModel.register(HistoMIMTokenizerConfig, HistoMIMTokenizer, exist_ok=True)
    AutoImageProcessor.register(HistoMIMTokenizerConfig, image_processor_classes=image_processor_classes(), exist_ok=True)
    AutoConfig.register("histomim_convnext", HistoMIMConvNextConfig, exist_ok=True)
    AutoModel.register(HistoMIMConvNextConfig, HistoMIMConvNextModel, exist_ok=True)
    AutoModelForPreTraining.register(HistoMIMConvNextConfig, HistoMIMConvNextForPreTraining, exist_ok=True)
    AutoImageProcessor.register(HistoMIMConvNextConfig, image_processor_classes=image_processor_classes(), exist_ok=True)
    AutoConfig.register("histofusion", HistoFusionConfig, exist_ok=True)
    AutoModel.register(HistoFusionConfig, HistoFusionForSurvival, exist_ok=True)

    # Saved models carry their code, so they also load with trust_remote_code=True without histomim.
    HistoMIMConfig.register_for_auto_class("AutoConfig")
    HistoMIMModel.register_for_auto_class("AutoModel")
    HistoMIMForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    HistoMIMForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    HistoMIMTokenizerConfig.register_for_auto_class("AutoConfig")
    HistoMIMTokenizer.register_for_auto_class("AutoModel")
    HistoMIMForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
    HistoMIMConvNextConfig.register_for_auto_class("AutoConfig")
    HistoMIMConvNextModel.register_for_auto_class("AutoModel")
    HistoMIMConvNextForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    HistoFusionConfig.register_for_auto_class("AutoConfig")
    HistoFusionForSurvival.register_for_auto_class("AutoModel")


_register_auto_classes()

__all__ = [
    "HistoMIMConfig",
    "HistoMIMModel",
    "HistoMIMForPreTraining",
    "HistoMIMForImageClassification",
    "HistoMIMForSemanticSegmentation",
    "image_processor_for",
    "HistoMIMTokenizerConfig",
    "HistoMIMTokenizer",
    "HistoMIMConvNextConfig",
    "HistoMIMConvNextModel",
    "HistoMIMConvNextForPreTraining",
    "HistoFusionConfig",
    "HistoFusionForSurvival",
]
