"""Training `HistoMIMForSemanticSegmentation` on image/mask pairs, with Accelerate, and predicting whole images.

    model = segmenter_from_encoder("outputs/histomim-tiny-demo", ["background", "nucleus"])
    result = train_segmenter(model, train_pairs, SegmentationSettings(steps=300))
    masks = predict_masks(result.model, [pair.image for pair in test_pairs], crop_size=64)

Every step draws a batch of random ``crop_size`` crops from the training pairs (with the same random
flip / 90-degree turn of image and mask: tissue has no orientation). The encoder trains with layer-wise
lr decay (`histomim.training.finetune.layer_decay_param_groups`; the decoder is the top "layer"), or
not at all with ``freeze_encoder``. Whole images are predicted tile by tile at ``crop_size`` (reflect-
padded to a multiple of it) and stitched back.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..evaluation.segmentation import SegmentationPair


@dataclass
class SegmentationSettings:
    steps: int = 300
    batch_size: int = 16
    crop_size: int | None = None  # None: the encoder's image_size
    lr: float = 1e-3
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_steps: int = 20
    freeze_encoder: bool = False
    seed: int = 0
    cpu: bool = False
    mixed_precision: str | None = None


@dataclass
class SegmentationResult:
    model: torch.nn.Module  # unwrapped, in eval mode
    step_losses: list[float]


def segmenter_from_encoder(model_or_path, class_names: Sequence[str], out_indices: Sequence[int] | None = None,
                           decoder_channels: int | None = None):  # fmt: skip
    """`HistoMIMForSemanticSegmentation` with the encoder weights of a histomim encoder/pretraining folder (or
    model) and a new decoder for ``class_names`` (index 0 is usually the background)."""
    import histomim  # noqa: F401
    from transformers import logging as hf_logging

    from ..mim import HistoMIMConfig, HistoMIMForSemanticSegmentation

    settings = {"num_labels": len(class_names), "id2label": dict(enumerate(class_names)),
                "label2id": {name: i for i, name in enumerate(class_names)},
                "segmentation_out_indices": list(out_indices) if out_indices else None,
                "segmentation_decoder_channels": decoder_channels}  # fmt: skip
    if not isinstance(model_or_path, (str, Path)):
        model = HistoMIMForSemanticSegmentation(HistoMIMConfig.from_dict({**model_or_path.config.to_dict(), **settings}))
        model.histomim.load_state_dict(model_or_path.state_dict())
        return model
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new decoder and a pretraining folder's MAE decoder are expected differences
    try:
        # via the config: from_pretrained hands keyword arguments the config class does not define to the model
        config = HistoMIMConfig.from_pretrained(str(model_or_path), **settings)
        return HistoMIMForSemanticSegmentation.from_pretrained(str(model_or_path), config=config)
    finally:
        hf_logging.set_verbosity(verbosity)


def random_init_baseline(model, seed: int = 0):
    """A copy of the segmenter whose encoder is the seeded random-init twin: the same decoder init, untrained encoder."""
    from ..evaluation.embeddings import random_init_twin

    baseline = copy.deepcopy(model)
    baseline.histomim.load_state_dict(random_init_twin(model.histomim.config, seed).state_dict())
    return baseline


def normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float, scaled to [0, 1] and normalised per channel."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W)
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def random_crops(pairs: Sequence[SegmentationPair], size: int, count: int, generator: np.random.Generator):
    """``count`` random (size x size) crops of random pairs, image and mask flipped/turned together.

    Returns ((count, size, size, 3) uint8 images, (count, size, size) int64 masks).
    """
    images, masks = [], []
    for _ in range(count):
        pair = pairs[generator.integers(len(pairs))]
        height, width = pair.mask.shape
        if height < size or width < size:
            raise ValueError(f"{pair.name}: {width}x{height} is smaller than the {size} px crop")
        top, left = generator.integers(height - size + 1), generator.integers(width - size + 1)
        image, mask = pair.image[top : top + size, left : left + size], pair.mask[top : top + size, left : left + size]
        turns = int(generator.integers(4))
        image, mask = np.rot90(image, turns), np.rot90(mask, turns)
        if generator.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        images.append(image)
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def train_segmenter(model, pairs: Sequence[SegmentationPair], settings: SegmentationSettings, mean, std) -> SegmentationResult:
    """Train ``model`` on random crops of ``pairs`` for ``settings.steps`` steps (warmup + cosine lr)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .common import warmup_cosine_schedule
    from .finetune import layer_decay_param_groups

    accelerator = Accelerator(cpu=settings.cpu, mixed_precision=settings.mixed_precision)
    torch.manual_seed(settings.seed)
    size = settings.crop_size or model.config.image_size
    if settings.freeze_encoder:
        model.histomim.requires_grad_(False)
    groups = layer_decay_param_groups(model, settings.lr, settings.layer_decay, settings.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr)
    scheduler = warmup_cosine_schedule(optimizer, settings.warmup_steps, settings.steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    generator = np.random.default_rng(settings.seed)
    interpolate = size != model.config.image_size
    losses = []
    model.train()
    for _ in tqdm(range(settings.steps), desc="segmentation", unit="step", disable=not accelerator.is_local_main_process):
        images, masks = random_crops(pairs, size, settings.batch_size, generator)
        pixels = normalise(images, mean, std).to(accelerator.device)  # (B, 3, s, s)
        labels = torch.from_numpy(masks).to(accelerator.device)  # (B, s, s)
        loss = model(pixel_values=pixels, labels=labels, interpolate_pos_encoding=interpolate).loss
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"segmentation loss is not finite at step {len(losses)}; lower --lr")
    return SegmentationResult(accelerator.unwrap_model(model).eval(), losses)


@torch.inference_mode()
def predict_masks(model, images: Sequence[np.ndarray], mean, std, crop_size: int | None = None,
                  batch_size: int = 32) -> list[np.ndarray]:  # fmt: skip
    """(H, W) argmax class maps of whole (H, W, 3) uint8 images, predicted in non-overlapping ``crop_size`` tiles."""
    size = crop_size or model.config.image_size
    device = next(model.parameters()).device
    predictions = []
    for image in images:
        height, width = image.shape[:2]
        pad_h, pad_w = -height % size, -width % size
        padded = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
        rows, cols = padded.shape[0] // size, padded.shape[1] // size
        tiles = padded.reshape(rows, size, cols, size, 3).transpose(0, 2, 1, 3, 4).reshape(-1, size, size, 3)
        labels = []
        for start in range(0, len(tiles), batch_size):
            pixels = normalise(tiles[start : start + batch_size], mean, std).to(device)  # (b, 3, s, s)
            logits = model(pixel_values=pixels, interpolate_pos_encoding=size != model.config.image_size).logits
            labels.append(logits.argmax(dim=1).cpu().numpy())  # (b, s, s)
        stitched = np.concatenate(labels).reshape(rows, cols, size, size).transpose(0, 2, 1, 3)
        predictions.append(stitched.reshape(rows * size, cols * size)[:height, :width])
    return predictions


__all__ = ["SegmentationSettings", "SegmentationResult", "segmenter_from_encoder", "random_init_baseline",
           "random_crops", "train_segmenter", "predict_masks", "normalise"]  # fmt: skip
