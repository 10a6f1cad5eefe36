"""Frozen embeddings of images from any encoder that `AutoModel` loads (a histomim encoder, a plain
`transformers.ViTModel`, the `histomim.export.to_vit` export, ...), and its random-init twin.

Which tokens make the embedding (`POOLINGS`) and from which layer:

* ``cls``: the CLS token; ``mean``: the mean of the patch tokens (CLS and register tokens left out);
  ``cls+mean``: both, concatenated (2D); a convolutional encoder (feature maps, no tokens) gives its
  ``pooler_output`` (or, for an earlier layer, the spatial mean of that stage's map) for ``cls`` and ``mean``;
* ``layer=None``: the encoder's final, normalised output (``last_hidden_state``); an integer ``k``:
  ``hidden_states[k]`` (``output_hidden_states=True``; 0 is the embedding layer, ``k`` the output of
  block ``k``, negative counts from the end), as they are, before the final norm.

Images are preprocessed by the model's own image processor (`image_processor`), so each encoder sees
the size and normalisation it was trained with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

POOLINGS = ("cls", "mean", "cls+mean")


def load_encoder(model_or_path):
    """(encoder in eval mode, its source folder or None): `AutoModel` on a folder or Hub id."""
    if isinstance(model_or_path, (str, Path)):
        import histomim  # noqa: F401  (registers the Auto classes)
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(model_or_path)).eval(), str(model_or_path)
    return model_or_path.eval(), None


def random_init_twin(config, seed: int = 0):
    """`AutoModel.from_config(config)` with ``torch.manual_seed(seed)``: the same architecture, untrained.

    The global RNG is restored afterwards, so building the twin does not change what follows.
    """
    import histomim  # noqa: F401
    from transformers import AutoModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModel.from_config(config).eval()


def image_processor(source: str | None, config):
    """The image processor saved with the model (``AutoImageProcessor``); for a model given as an object, or a
    folder without one, `histomim.image_processor_for` for histomim configs, else a ViT processor at the
    config's image size with ImageNet statistics."""
    from transformers import AutoImageProcessor

    if source is not None:
        try:
            return AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError):
            pass  # no preprocessor_config.json
    if getattr(config, "model_type", None) in ("histomim", "histomim_convnext"):
        from ..mim import image_processor_for

        return image_processor_for(config)
    from ..mim.configuration_histomim import IMAGENET_MEAN, IMAGENET_STD

    try:
        from transformers import ViTImageProcessorPil as processor_class
    except ImportError:
        from transformers import ViTImageProcessor as processor_class
    size = getattr(config, "image_size", 224)
    return processor_class(size={"height": size, "width": size}, image_mean=list(IMAGENET_MEAN),
                           image_std=list(IMAGENET_STD))  # fmt: skip


def num_prefix_tokens(config) -> int:
    """CLS plus register tokens: the tokens before the patch tokens."""
    return getattr(config, "num_prefix_tokens", 1 + (getattr(config, "num_register_tokens", 0) or 0))


def pool_tokens(tokens: torch.Tensor, pooling: str, prefix: int) -> torch.Tensor:
    """(B, N, D) tokens -> (B, D) (``cls``, ``mean``) or (B, 2D) (``cls+mean``)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    cls = tokens[:, 0]  # (B, D)
    mean = tokens[:, prefix:].mean(dim=1)  # (B, D)
    return {"cls": cls, "mean": mean, "cls+mean": torch.cat([cls, mean], dim=-1)}[pooling]


def pool_features(output, tokens: torch.Tensor, pooling: str, prefix: int, layer: int | None) -> torch.Tensor:
    """Tokens (B, N, D) pooled by `pool_tokens`; a CNN's feature map (B, C, h, w) has no CLS token: its
    `pooler_output` for the last layer, the spatial mean of an earlier one, with `pooling` "mean" (or "cls",
    which a CNN's pooled output stands in for)."""
    if tokens.ndim == 3:
        return pool_tokens(tokens, pooling, prefix)
    if pooling == "cls+mean":
        raise ValueError("pooling 'cls+mean' needs token outputs; a convolutional encoder gives feature maps: use 'mean'")
    return output.pooler_output if layer is None else tokens.mean(dim=(-2, -1))  # (B, C)


@torch.inference_mode()
def embed_images(
    encoder,
    images,
    processor,
    pooling: str = "cls",
    layer: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    desc: str = "embedding",
) -> np.ndarray:
    """(N, D) float32 embeddings of PIL ``images``; see the module docstring for ``pooling`` and ``layer``."""
    from tqdm.auto import tqdm

    encoder = encoder.to(device).eval()
    prefix = num_prefix_tokens(encoder.config)
    features = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        batch = [images[i] for i in range(start, min(start + batch_size, len(images)))]
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)  # (B, 3, H, W)
        output = encoder(pixel_values=pixels, output_hidden_states=layer is not None)
        tokens = output.last_hidden_state if layer is None else output.hidden_states[layer]  # (B, N, D) | (B, C, h, w)
        features.append(pool_features(output, tokens, pooling, prefix, layer).float().cpu())
    return torch.cat(features).numpy()


__all__ = ["POOLINGS", "load_encoder", "random_init_twin", "image_processor", "embed_images", "pool_tokens"]
