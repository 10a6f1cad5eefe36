"""LoRA fine-tuning: PEFT adapters on the attention projections of a model (e.g. the HistoMIM ViT inside a
fusion model), everything else frozen except the modules named as trainable.

A training-time tool shared by fine-tuning (`histomim.training.finetune`) and the survival estimator, not
part of the saved models: the model files ship as remote code and stay free of peft.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def add_lora(
    model: nn.Module,
    r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] = ("qkv",),
    trainable_modules: Sequence[str] = (),
) -> peft.PeftModel:  # noqa: F821 (peft is optional; imported below)
    """Wrap ``model`` with PEFT LoRA adapters on its attention projections.

    Only the adapters and the modules named in ``trainable_modules`` (PEFT ``modules_to_save``,
    e.g. the MIL aggregator and the survival head) train; every other weight is frozen and left
    unchanged. Save with ``peft_model.save_pretrained(dir)`` (adapter only, PEFT format), reload
    with ``PeftModel.from_pretrained(base_model, dir)``, and fold the adapters into the weights
    with ``peft_model.merge_and_unload()``.

    Args:
        target_modules: names of the ``nn.Linear`` layers to adapt; in a HistoMIM ViT ``"qkv"``
            (fused attention input) and ``"proj"`` (attention output).
    """
    try:  # peft is an optional dependency
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise ImportError("LoRA adapters need peft: pip install peft") from error

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [name for name in (*target_modules, *trainable_modules) if name.rsplit(".", 1)[-1] not in names]
    if absent:
        raise ValueError(f"add_lora: the model has no modules named {absent}")
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        modules_to_save=list(trainable_modules) or None,
    )
    return get_peft_model(model, config)


__all__ = ["add_lora"]
