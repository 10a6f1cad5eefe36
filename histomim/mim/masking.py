"""Mask generators shared by every MIM objective.

Convention everywhere: in a mask, 1 (or True) means *masked* (hidden from the encoder), 0 means visible.
Each generator takes optional `noise` so that callers (tests, exact resume, equivalence checks against
transformers) can fix the mask; the same noise always gives the same mask.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def num_visible_patches(num_patches: int, mask_ratio: float) -> int:
    """Visible patches (or blocks) kept by MAE; `int()` truncation matches facebookresearch/mae and transformers."""
    return int(num_patches * (1 - mask_ratio))


def num_masked_blocks(num_blocks: int, mask_ratio: float) -> int:
    """Blocks hidden by SimMIM: the nearest whole number, as in the SimMIM mask generator."""
    return int(round(num_blocks * mask_ratio))


def masked_fraction(objective: str, num_blocks: int, mask_ratio: float) -> float:
    """The fraction of the image a mask of `num_blocks` blocks really hides, by each objective's count rule."""
    if objective == "mae":
        return 1 - num_visible_patches(num_blocks, mask_ratio) / num_blocks
    return num_masked_blocks(num_blocks, mask_ratio) / num_blocks


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise (MAE).

    Returns:
        ids_keep: (B, K) indices of visible patches, K = num_visible_patches(L, mask_ratio)
        mask: (B, L) float, 1 = masked, in the original patch order
        ids_restore: (B, L) permutation that undoes the shuffle
    """
    if noise is None:
        noise = torch.rand(batch_size, num_patches, device=device)  # (B, L)
    elif noise.shape != (batch_size, num_patches):
        raise ValueError(f"noise must have shape {(batch_size, num_patches)}, got {tuple(noise.shape)}")
    num_keep = num_visible_patches(num_patches, mask_ratio)

    # 1. sort noise: small noise is kept, large is masked
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, L)
    # 2. the inverse permutation puts tokens back in image order for the decoder
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L)
    # 3. the first K shuffled patches stay visible
    ids_keep = ids_shuffle[:, :num_keep]  # (B, K)
    # 4. binary mask in shuffled order, then unshuffled to image order
    mask = torch.ones(batch_size, num_patches, device=noise.device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # (B, L)
    return ids_keep, mask, ids_restore


def random_block_masking(
    batch_size: int,
    grid_hw: tuple[int, int],
    scale: int,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's `random_masking` over blocks of `scale` x `scale` ViT patches (`mask_patch_size` / `patch_size`).

    With `scale == 1` this is `random_masking` itself (same noise, same mask and order). Otherwise the
    shuffle is drawn over blocks and every block expands to its patches, so whole blocks are hidden.

    Args:
        grid_hw: ViT patches per side (h, w), both divisible by `scale`.
        noise: optional (B, h/scale * w/scale) noise over the blocks.

    Returns: ids_keep (B, K), mask (B, h*w) float with 1 = masked, ids_restore (B, h*w), in patch units.
    """
    height, width = grid_hw
    if height % scale or width % scale:
        raise ValueError(f"a {height}x{width} patch grid cannot be cut into mask blocks of {scale}x{scale} patches")
    blocks_wide = width // scale
    num_blocks = (height // scale) * blocks_wide
    ids_keep, mask, ids_restore = random_masking(batch_size, num_blocks, mask_ratio, noise, device)
    if scale == 1:
        return ids_keep, mask, ids_restore

    # 1. the block shuffle (visible blocks first), recovered from its inverse
    block_shuffle = torch.argsort(ids_restore, dim=1)  # (B, Nb)
    # 2. each block index -> the indices of its scale x scale patches, in row-major order inside the block
    offsets = torch.arange(scale, device=mask.device)
    inside = (offsets[:, None] * width + offsets[None, :]).flatten()  # (s*s,)
    corner = (block_shuffle // blocks_wide) * scale * width + (block_shuffle % blocks_wide) * scale  # (B, Nb)
    ids_shuffle = (corner[..., None] + inside).flatten(1)  # (B, Nb*s*s) = (B, L)
    # 3. the block mask upsampled to patches; the inverse of the patch shuffle restores image order
    block_mask = mask.view(batch_size, height // scale, blocks_wide)  # (B, h/s, w/s)
    patch_mask = block_mask.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).flatten(1)  # (B, L)
    num_keep = ids_keep.shape[1] * scale * scale
    return ids_shuffle[:, :num_keep], patch_mask, torch.argsort(ids_shuffle, dim=1)


def block_random_mask(
    batch_size: int,
    grid_size: int,
    mask_patch_size: int,
    patch_size: int,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """SimMIM masking: mask random `mask_patch_size` blocks, expressed on the ViT patch grid.

    Args:
        grid_size: ViT patches per side (image_size // patch_size).
        noise: optional (B, G*G) noise over the coarse mask grid, G = image_size // mask_patch_size.

    Returns:
        bool_masked_pos: (B, grid_size * grid_size) bool, True = masked
    """
    scale = mask_patch_size // patch_size  # ViT patches per mask block side
    coarse = grid_size // scale  # G
    num_blocks = coarse * coarse
    if noise is None:
        noise = torch.rand(batch_size, num_blocks, device=device)
    elif noise.shape != (batch_size, num_blocks):
        raise ValueError(f"noise must have shape {(batch_size, num_blocks)}, got {tuple(noise.shape)}")
    num_masked = num_masked_blocks(num_blocks, mask_ratio)

    # 1. rank blocks by noise; the first `num_masked` are masked (exact count per sample)
    ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # (B, G*G)
    coarse_mask = (ranks < num_masked).view(batch_size, coarse, coarse)  # (B, G, G)
    # 2. upsample each block to scale x scale ViT patches
    fine_mask = coarse_mask.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)  # (B, g, g)
    return fine_mask.flatten(1)  # (B, g*g)


# --------------------------------------------------------------------------- BEiT's block-wise masking

BLOCK_ATTEMPTS_PER_PATCH = 1  # rectangle attempts budgeted per patch of the grid (noise size: see below)
UNIFORMS_PER_ATTEMPT = 4  # area, log aspect ratio, top, left


def block_wise_noise_size(num_patches: int) -> int:
    """Uniform numbers one sample's block-wise mask consumes: a fixed budget of rectangle attempts, so that
    block-wise masks are fixed by a noise tensor of a known shape like the other generators'."""
    return max(16, BLOCK_ATTEMPTS_PER_PATCH * num_patches) * UNIFORMS_PER_ATTEMPT


def block_rectangles(
    noise: torch.Tensor,
    grid_hw: tuple[int, int],
    num_masked: int,
    min_num_patches: int = 16,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
) -> list[tuple[int, int, int, int]]:
    """The rectangles of one block-wise mask (BEiT), as (top, left, height, width) in patches.

    Every rectangle has at least `min_num_patches` patches (lowered to half of `num_masked` on grids too small for it)
    and an aspect ratio height / width in [min_aspect, max_aspect] (default 1 / min_aspect). Rectangles are
    added, overlapping or not, while they add new patches without exceeding `num_masked`.

    Args:
        noise: (block_wise_noise_size(h * w),) uniforms in [0, 1); the same noise gives the same rectangles.
    """
    height, width = grid_hw
    max_aspect = max_aspect or 1 / min_aspect
    min_num_patches = min(min_num_patches, max(1, num_masked // 2))  # small grids: at least two rectangles' room
    log_aspects = (math.log(min_aspect), math.log(max_aspect))
    mask = np.zeros((height, width), dtype=bool)
    rectangles, masked = [], 0
    for area_u, aspect_u, top_u, left_u in noise.view(-1, UNIFORMS_PER_ATTEMPT).tolist():
        remaining = num_masked - masked
        if remaining == 0:
            break
        # 1. a target area in [min, remaining] (just min once fewer remain: then only a rectangle that
        # mostly overlaps the mask fits) and a log-uniform aspect ratio -> a rounded rectangle
        area = min_num_patches + area_u * max(remaining - min_num_patches, 0)
        aspect = math.exp(log_aspects[0] + aspect_u * (log_aspects[1] - log_aspects[0]))
        block_h, block_w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        # 2. rounding can break the bounds: such a rectangle is not drawn
        if not (block_h <= height and block_w <= width and block_h * block_w >= min_num_patches):
            continue
        if not min_aspect - 1e-9 <= block_h / block_w <= max_aspect + 1e-9:
            continue
        # 3. a uniform position; kept if it masks new patches without overshooting the target
        top, left = int(top_u * (height - block_h + 1)), int(left_u * (width - block_w + 1))
        new = block_h * block_w - int(mask[top : top + block_h, left : left + block_w].sum())
        if 0 < new <= remaining:
            mask[top : top + block_h, left : left + block_w] = True
            rectangles.append((top, left, block_h, block_w))
            masked += new
    return rectangles


def block_wise_masking(
    batch_size: int,
    grid_hw: tuple[int, int],
    mask_ratio: float,
    min_num_patches: int = 16,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """BEiT's block-wise masking: random rectangles (see `block_rectangles`) until about `mask_ratio` of the
    patches are masked. The count is at most round(mask_ratio * L) and usually within a few patches of it.

    Args:
        noise: optional (B, block_wise_noise_size(L)) uniforms that fix the masks; else drawn from `generator`.

    Returns:
        bool_masked_pos: (B, h * w) bool, True = masked
    """
    height, width = grid_hw
    num_patches = height * width
    shape = (batch_size, block_wise_noise_size(num_patches))
    if noise is None:
        noise = torch.rand(shape, generator=generator)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    num_masked = num_masked_blocks(num_patches, mask_ratio)
    masks = torch.zeros(batch_size, height, width, dtype=torch.bool)
    for sample, sample_noise in enumerate(noise.cpu()):  # a handful of rectangles per sample: plain Python
        for top, left, block_h, block_w in block_rectangles(
            sample_noise, grid_hw, num_masked, min_num_patches, min_aspect, max_aspect
        ):
            masks[sample, top : top + block_h, left : left + block_w] = True
    return masks.flatten(1).to(device or noise.device)  # (B, L)


__all__ = [
    "num_visible_patches", "num_masked_blocks", "masked_fraction", "random_masking", "random_block_masking",
    "block_random_mask", "block_wise_masking", "block_rectangles", "block_wise_noise_size",
]
