"""Mask generators shared by every MIM objective.

Convention everywhere: in a mask, 1 (or True) means *masked* (hidden from the encoder), 0 means visible.
Each generator takes optional `noise` so that callers (tests, exact resume, equivalence checks against
transformers) can fix the mask; the same noise always gives the same mask.
"""

from __future__ import annotations

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


__all__ = [
    "num_visible_patches", "num_masked_blocks", "masked_fraction", "random_masking", "random_block_masking",
    "block_random_mask",
]
