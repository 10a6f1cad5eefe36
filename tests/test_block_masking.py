"""BEiT's block-wise masking: the masked fraction, the rectangles' bounds, and determinism."""

from __future__ import annotations

import pytest
import torch

from histomim.mim.masking import block_rectangles, block_wise_masking, block_wise_noise_size, num_masked_blocks


@pytest.mark.parametrize(("grid_hw", "mask_ratio"), [((14, 14), 0.4), ((14, 14), 0.6), ((8, 8), 0.4)])
def test_masked_fraction_is_close_to_the_target_and_never_above(grid_hw, mask_ratio):
    masks = block_wise_masking(64, grid_hw, mask_ratio, generator=torch.Generator().manual_seed(0))  # (B, L)
    num_patches = grid_hw[0] * grid_hw[1]
    target = num_masked_blocks(num_patches, mask_ratio)
    counts = masks.sum(dim=1)
    assert masks.shape == (64, num_patches) and masks.dtype == torch.bool
    assert int(counts.max()) <= target
    assert float(counts.float().mean()) >= target - 0.05 * num_patches  # within 5% of the image on average
    assert int(counts.min()) >= target - 0.1 * num_patches
    assert len({tuple(mask.tolist()) for mask in masks}) > 48  # samples draw their own masks


def test_rectangles_obey_the_area_and_aspect_bounds_and_make_the_mask():
    grid_hw, num_masked = (14, 14), 78
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        noise = torch.rand(block_wise_noise_size(196), generator=generator)
        rectangles = block_rectangles(noise, grid_hw, num_masked, min_num_patches=16, min_aspect=0.3)
        assert rectangles
        painted = torch.zeros(grid_hw, dtype=torch.bool)
        for top, left, height, width in rectangles:
            assert height * width >= 16
            assert 0.3 <= height / width <= 1 / 0.3
            assert 0 <= top and top + height <= 14 and 0 <= left and left + width <= 14
            painted[top : top + height, left : left + width] = True
        mask = block_wise_masking(1, grid_hw, num_masked / 196, noise=noise[None])[0]
        assert torch.equal(mask, painted.flatten())  # the mask is exactly the union of the rectangles


@pytest.mark.parametrize("num_masked", [6, 10])
def test_small_grid_lowers_the_minimum_area_and_still_masks(num_masked):
    """4 x 4 patches (a 64 px tile of 16 px patches): 6 or 10 masked, fewer than the 16-patch minimum, which
    falls to half the target so rectangles still fit."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        rectangles = block_rectangles(torch.rand(block_wise_noise_size(16), generator=generator), (4, 4), num_masked)
        assert rectangles and all(h * w >= num_masked // 2 for _, _, h, w in rectangles)
    masks = block_wise_masking(32, (4, 4), num_masked / 16, generator=generator)
    assert int(masks.sum(1).min()) >= num_masked // 2 and int(masks.sum(1).max()) <= num_masked


def test_same_noise_or_seed_gives_the_same_mask_and_bad_noise_is_named():
    first = block_wise_masking(4, (14, 14), 0.4, generator=torch.Generator().manual_seed(7))
    again = block_wise_masking(4, (14, 14), 0.4, generator=torch.Generator().manual_seed(7))
    other = block_wise_masking(4, (14, 14), 0.4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    noise = torch.rand(4, block_wise_noise_size(196))
    assert torch.equal(block_wise_masking(4, (14, 14), 0.4, noise=noise), block_wise_masking(4, (14, 14), 0.4, noise=noise))
    with pytest.raises(ValueError, match="noise must have shape"):
        block_wise_masking(4, (14, 14), 0.4, noise=torch.rand(4, 10))
