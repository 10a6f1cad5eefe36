"""Supervised fine-tuning of a histomim encoder as `HistoMIMForImageClassification`, with Accelerate:
full fine-tuning with layer-wise learning-rate decay, or LoRA adapters through PEFT.

    histomim finetune --model outputs/vitb --nuclei --epochs 20                 # full, layer decay 0.75
    histomim finetune --model outputs/vitb --nuclei --lora-rank 8 --lr 1e-3     # LoRA on qkv/proj

Layer-wise decay (BEiT, MAE fine-tuning): the head and final norm train at ``lr``, block ``i`` of
``L`` at ``lr * decay**(L - i)``, the patch/position embeddings at ``lr * decay**(L + 1)``, so the
lower layers that pretraining made most general move least. LoRA (`histomim.lora.add_lora`) freezes the encoder,
adds low-rank updates to the attention ``qkv`` and ``proj`` linears and trains the classifier in
full (``modules_to_save``); `save_pretrained` then writes only the adapter, which
``PeftModel.from_pretrained(base, folder)`` restores exactly.

The model also trains with transformers' `Trainer` (it takes ``pixel_values`` and ``labels`` and
returns a loss), for those who prefer that loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..lora import add_lora

LORA_TARGETS = ("qkv", "proj")  # the attention linears of every HistoMIMBlock (MLP linears are fc1/fc2)


def layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings (and CLS/register tokens), i + 1 for ``blocks.i``, L + 1 for the final norm and head."""
    parts = name.split(".")
    if "embeddings" in parts:
        return 0
    if "blocks" in parts:
        return int(parts[parts.index("blocks") + 1]) + 1
    return num_layers + 1


def layer_decay_param_groups(model, lr: float, layer_decay: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups with ``lr * layer_decay ** (L + 1 - layer_id)``; no weight decay on 1-D tensors
    (biases, norms, tokens) as in MAE/BEiT. Frozen parameters are left out."""
    num_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer, decay = layer_id(name, num_layers), parameter.ndim > 1
        group = groups.setdefault((layer, decay), {
            "params": [], "lr": lr * layer_decay ** (num_layers + 1 - layer), "weight_decay": weight_decay if decay else 0.0,
            "layer": layer,
        })  # fmt: skip
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


def classifier_from_encoder(model_or_path, class_names: list[str]):
    """`HistoMIMForImageClassification` with the encoder's weights (a pretraining or encoder folder) and a new
    linear head for ``class_names``."""
    import histomim  # noqa: F401
    from transformers import logging as hf_logging

    from ..mim import HistoMIMForImageClassification

    labels = {"num_labels": len(class_names), "id2label": dict(enumerate(class_names)),
              "label2id": {name: i for i, name in enumerate(class_names)}}  # fmt: skip
    if not isinstance(model_or_path, (str, Path)):
        from ..mim import HistoMIMConfig

        config = HistoMIMConfig.from_dict({**model_or_path.config.to_dict(), **labels})
        model = HistoMIMForImageClassification(config)
        model.histomim.load_state_dict(model_or_path.state_dict())
        return model
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head and a pretraining folder's decoder are expected differences
    try:
        return HistoMIMForImageClassification.from_pretrained(str(model_or_path), **labels)
    finally:
        hf_logging.set_verbosity(verbosity)


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations of a (B, 3, H, W) batch: tissue has no orientation."""
    batch = pixels.clone()
    flips = torch.rand(len(batch), 2, generator=generator) < 0.5
    turns = torch.randint(0, 4, (len(batch),), generator=generator)
    for i in range(len(batch)):
        image = batch[i]
        if flips[i, 0]:
            image = image.flip(-1)
        if flips[i, 1]:
            image = image.flip(-2)
        batch[i] = torch.rot90(image, int(turns[i]), dims=(-2, -1))
    return batch


@dataclass
class FinetuneSettings:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: int | None = None
    seed: int = 0
    cpu: bool = False
    mixed_precision: str | None = None


@dataclass
class FinetuneResult:
    model: torch.nn.Module  # unwrapped; a PeftModel for LoRA
    epoch_losses: list[float]  # mean training loss per epoch
    step_losses: list[float] = field(default_factory=list)
    test_metrics: dict | None = None


def finetune(model, train_pixels: torch.Tensor, train_labels: torch.Tensor, settings: FinetuneSettings,
             test_pixels: torch.Tensor | None = None, test_labels: torch.Tensor | None = None) -> FinetuneResult:  # fmt: skip
    """Fine-tune ``model`` (a `HistoMIMForImageClassification`) on preprocessed (N, 3, H, W) pixels with Accelerate.

    Warmup then cosine decay of every group's lr; with ``settings.lora_rank`` the encoder is frozen and
    LoRA adapters train instead (layer decay then applies to nothing but the head, so it is not used).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .common import warmup_cosine_schedule

    accelerator = Accelerator(cpu=settings.cpu, mixed_precision=settings.mixed_precision)
    torch.manual_seed(settings.seed)
    if settings.lora_rank:
        model = add_lora(
            model, r=settings.lora_rank, lora_alpha=settings.lora_alpha or 2 * settings.lora_rank,
            target_modules=LORA_TARGETS, trainable_modules=["classifier"],
        )  # fmt: skip
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": settings.weight_decay}]
    else:
        groups = layer_decay_param_groups(model, settings.lr, settings.layer_decay, settings.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr)
    dataset = torch.utils.data.TensorDataset(train_pixels, train_labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(settings.seed))  # fmt: skip
    total = settings.epochs * len(loader)
    scheduler = warmup_cosine_schedule(optimizer, round(settings.warmup_epochs * len(loader)), total)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    epoch_losses, step_losses = [], []
    model.train()
    for _ in tqdm(range(settings.epochs), desc="fine-tuning", unit="epoch", disable=not accelerator.is_local_main_process):
        losses = []
        for pixels, labels in loader:
            pixels = augment(pixels.cpu(), generator).to(accelerator.device)  # (B, 3, H, W)
            loss = model(pixel_values=pixels, labels=labels).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(accelerator.gather(loss.detach()).mean().item())
        if not all(math.isfinite(v) for v in losses):
            raise FloatingPointError("fine-tuning loss is not finite; lower --lr")
        step_losses += losses
        epoch_losses.append(float(np.mean(losses)))
    model = accelerator.unwrap_model(model).eval()
    test_metrics = None
    if test_pixels is not None:
        test_metrics = evaluate_classifier(model, test_pixels, test_labels, model.config.num_labels)
    return FinetuneResult(model, epoch_losses, step_losses, test_metrics)


@torch.inference_mode()
def predict_probabilities(model, pixels: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    device = next(model.parameters()).device
    logits = [model(pixel_values=pixels[i : i + batch_size].to(device)).logits.float().cpu()
              for i in range(0, len(pixels), batch_size)]  # fmt: skip
    return torch.cat(logits).softmax(-1).numpy()


def evaluate_classifier(model, pixels: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Balanced accuracy, macro-F1 and AUROC of the classifier (the harness's `score`)."""
    from ..evaluation.probes import score

    return score(labels.numpy(), predict_probabilities(model.eval(), pixels), num_classes)


__all__ = ["layer_decay_param_groups", "layer_id", "classifier_from_encoder", "finetune",
           "FinetuneSettings", "FinetuneResult", "evaluate_classifier", "predict_probabilities", "LORA_TARGETS"]  # fmt: skip
