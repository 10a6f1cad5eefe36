"""Augmentations on a real H&E tile from the CMU-1 sample slide."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import hed2rgb, rgb2hed

from histomim.data.samples import sample_slide_path
from histomim.data.slides import open_slide
from histomim.data.transforms import (
    CenterCrop,
    ColorJitter,
    Compose,
    DeviceAugmentation,
    HEDJitter,
    Normalize,
    RandomFlip,
    RandomResizedCrop,
    RandomRotate90,
    ToTensor,
    adjust_color,
    color_jitter_batch,
    crop_flip_rotate_batch,
    device_augmentation_worker_transform,
    eval_transform,
    hed_jitter_batch,
    hed_to_rgb,
    pretrain_transform,
    rgb_to_hed,
    sample_crop_boxes,
    sample_hed_params,
)

MEAN, STD = (0.7, 0.55, 0.7), (0.15, 0.2, 0.15)


@pytest.fixture(scope="module")
def tile() -> Image.Image:
    with open_slide(sample_slide_path()) as slide:
        return slide.read_tile((1000, 1200), 0, 224, 224)


@pytest.fixture(scope="module")
def batch(tile) -> torch.Tensor:
    """(4, 3, 96, 96): four different crops of the tile."""
    crops = [tile.crop((x, x, x + 96, x + 96)) for x in (0, 40, 80, 120)]
    return torch.stack([ToTensor()(c) for c in crops])


def test_to_tensor_shape_dtype_range(tile):
    pixels = ToTensor()(tile)
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
    assert 0 <= pixels.min() and pixels.max() <= 1
    np.testing.assert_allclose(pixels.permute(1, 2, 0).numpy() * 255, np.asarray(tile), atol=1e-3)


def test_pretrain_transform_shapes_and_normalisation(tile):
    out = pretrain_transform(96, MEAN, STD, seed=0)(tile, index=0)
    assert out.shape == (3, 96, 96) and out.dtype == torch.float32
    # normalised H&E is roughly centred: far from the [0, 1] range of raw pixels
    assert out.min() < -1 and out.abs().mean() < 3


def test_seeded_pretrain_transform_is_a_function_of_seed_epoch_index(tile):
    transform = pretrain_transform(64, MEAN, STD, seed=7)
    first = transform(tile, index=3, epoch=2)
    assert torch.equal(first, transform(tile, index=3, epoch=2))
    assert torch.equal(first, pretrain_transform(64, MEAN, STD, seed=7)(tile, index=3, epoch=2))
    assert not torch.equal(first, transform(tile, index=4, epoch=2))
    assert not torch.equal(first, transform(tile, index=3, epoch=3))
    assert not torch.equal(first, pretrain_transform(64, MEAN, STD, seed=8)(tile, index=3, epoch=2))
    # an explicit generator also reproduces
    assert torch.equal(transform(tile, rng=random.Random(1)), transform(tile, rng=random.Random(1)))


def test_unseeded_transform_varies(tile):
    transform = pretrain_transform(64, MEAN, STD)
    assert not torch.equal(transform(tile, index=0), transform(tile, index=0))


def test_eval_transform_is_deterministic_resize_and_centre_crop(tile):
    wide = tile.resize((300, 200))
    transform = eval_transform(100, MEAN, STD)
    out = transform(wide)
    assert out.shape == (3, 100, 100)
    assert torch.equal(out, transform(wide))
    expected = wide.resize((150, 100), Image.Resampling.BICUBIC).crop((25, 0, 125, 100))
    torch.testing.assert_close(out, Normalize(MEAN, STD)(ToTensor()(expected)))
    with pytest.raises(ValueError, match="CenterCrop"):
        CenterCrop(100)(Image.new("RGB", (50, 50)), None)


def test_random_resized_crop_respects_scale_and_ratio():
    crop = RandomResizedCrop(32, scale=(0.3, 0.6), ratio=(0.5, 2.0))
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = crop.crop_box(400, 300, rng)
        assert 0 <= left < right <= 400 and 0 <= top < bottom <= 300
        area = (right - left) * (bottom - top) / (400 * 300)
        assert 0.28 <= area <= 0.62  # rounding to whole pixels
        assert 0.48 <= (right - left) / (bottom - top) <= 2.1
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCrop(32, scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="ratio"):
        RandomResizedCrop(32, ratio=(2.0, 1.0))


def test_flips_and_rotations_reach_all_eight_symmetries():
    asymmetric = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20)
    ops = Compose([RandomFlip(), RandomRotate90()])
    seen = {np.asarray(ops(asymmetric.convert("RGB"), rng=random.Random(s))).tobytes() for s in range(200)}
    assert len(seen) == 8  # the dihedral group of the square


def test_batched_crop_boxes_respect_scale_and_ratio_and_stay_inside():
    boxes = sample_crop_boxes(2000, scale=(0.3, 0.6), ratio=(0.5, 2.0), generator=torch.Generator().manual_seed(0))
    centre_x, centre_y, width, height = boxes.T
    assert torch.all(centre_x - width / 2 >= 0) and torch.all(centre_x + width / 2 <= 1 + 1e-6)
    assert torch.all(centre_y - height / 2 >= 0) and torch.all(centre_y + height / 2 <= 1 + 1e-6)
    area = width * height
    assert area.min() >= 0.3 - 1e-6 and area.max() <= 0.6 + 1e-6
    assert (width / height).min() >= 0.5 - 1e-6 and (width / height).max() <= 2.0 + 1e-6
    # spread over the whole range, not stuck at one end
    assert area.mean() == pytest.approx(0.45, abs=0.02)
    # no draw fits (areas above 1 are impossible): the whole image
    whole = sample_crop_boxes(5, scale=(1.0, 1.0), ratio=(4.0, 4.0), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(whole, torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 5))


def test_batched_crop_of_the_whole_tile_is_one_of_the_eight_symmetries(batch):
    """With the whole tile as the box, the resampling only flips and rotates, pixel-exactly, and every
    one of the 8 symmetries of the square occurs."""
    tiles = batch[:1].expand(64, -1, -1, -1)  # (64, 3, 96, 96), one tile repeated
    out = crop_flip_rotate_batch(tiles, 96, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    image = batch[0]
    symmetries = [torch.rot90(flipped, k, dims=(1, 2)) for flipped in (image, image.flip(2)) for k in range(4)]
    matched = [min(range(8), key=lambda i: (o - symmetries[i]).abs().max().item()) for o in out]
    for o, i in zip(out, matched):
        torch.testing.assert_close(o, symmetries[i], atol=1e-5, rtol=0)
    assert set(matched) == set(range(8))


def test_batched_crop_zooms_into_the_box(tile):
    """A small box is an upsampled piece of the tile: the output matches PIL's crop-and-resize of the
    same box (bilinear vs bilinear, up to interpolation at the box edges)."""
    pixels = ToTensor()(tile)[None]  # (1, 3, 224, 224)
    generator = torch.Generator().manual_seed(3)
    out = crop_flip_rotate_batch(pixels, 112, scale=(0.25, 0.25), ratio=(1.0, 1.0), generator=generator)[0]
    centre_x, centre_y, width, height = sample_crop_boxes(1, (0.25, 0.25), (1.0, 1.0), torch.Generator().manual_seed(3))[0]
    box = [float(v) * 224 for v in (centre_x - width / 2, centre_y - height / 2, centre_x + width / 2, centre_y + height / 2)]
    reference = ToTensor()(tile.resize((112, 112), Image.Resampling.BILINEAR, box=box))
    # the same draws also picked flips/rotation: compare with the best of the 8 symmetries
    errors = [(torch.rot90(f, k, dims=(1, 2)) - out).abs().mean().item()
              for f in (reference, reference.flip(2)) for k in range(4)]  # fmt: skip
    assert min(errors) < 0.01 < sorted(errors)[1]


def test_device_augmentation_from_uint8_tiles(tile):
    worker = device_augmentation_worker_transform(96)
    tiles = torch.stack([worker(tile.crop((x, 0, x + 128, 128)), index=0) for x in (0, 50, 96)])
    assert tiles.dtype == torch.uint8 and tiles.shape == (3, 3, 96, 96)
    augment = DeviceAugmentation(64, MEAN, STD)
    out = augment(tiles, torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 64, 64) and out.dtype == torch.float32
    # normalised: back in [0, 1] after undoing mean/std; and seeded draws repeat
    pixels = out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    torch.testing.assert_close(augment(tiles, torch.Generator().manual_seed(0)), out)
    assert not torch.allclose(augment(tiles, torch.Generator().manual_seed(1)), out)
    with pytest.raises(ValueError, match="uint8"):
        augment(tiles.float())


def test_rgb_to_hed_matches_skimage(tile):
    rgb = np.asarray(tile)
    ours = rgb_to_hed(ToTensor()(tile)[None])[0].permute(1, 2, 0).numpy()  # (H, W, 3)
    # skimage clips negative concentrations; ours keeps them so the round trip is exact
    np.testing.assert_allclose(np.maximum(ours, 0), rgb2hed(rgb), atol=1e-5)
    stains = np.maximum(ours, 0)
    back = hed_to_rgb(torch.from_numpy(stains).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(back, hed2rgb(stains), atol=1e-5)


def test_hed_jitter_with_zero_sigma_is_identity(batch):
    out = hed_jitter_batch(batch, sigma=0.0, bias=0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, batch, atol=1e-5, rtol=0)
    single = HEDJitter(0.0, 0.0)(batch[0], random.Random(0))
    torch.testing.assert_close(single, batch[0], atol=1e-5, rtol=0)


def test_hed_jitter_changes_stain_mildly(batch):
    out = hed_jitter_batch(batch, sigma=0.05, bias=0.01, generator=torch.Generator().manual_seed(0))
    change = (out - batch).abs().mean().item()
    assert 0.005 < change < 0.1
    assert out.shape == batch.shape and 0 <= out.min() and out.max() <= 1


def test_batch_hed_jitter_matches_per_image_version(batch):
    out = hed_jitter_batch(batch, sigma=0.1, bias=0.02, generator=torch.Generator().manual_seed(3))
    alpha, beta = sample_hed_params(len(batch), 0.1, 0.02, torch.Generator().manual_seed(3))  # (B, 3) each
    assert not torch.allclose(alpha[0], alpha[1])  # every sample its own stain shift
    for i in range(len(batch)):
        torch.testing.assert_close(out[i], HEDJitter.apply(batch[i], alpha[i], beta[i]))
    again = hed_jitter_batch(batch, sigma=0.1, bias=0.02, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        hed_jitter_batch(batch[0])


def test_color_adjustments(batch):
    ones = torch.ones(len(batch))
    torch.testing.assert_close(adjust_color(batch, ones, ones, ones), batch)
    grey = adjust_color(batch, ones, ones, torch.zeros(len(batch)))
    torch.testing.assert_close(grey[:, 0], grey[:, 1])  # saturation 0 removes colour
    flat = adjust_color(batch, ones, torch.zeros(len(batch)), ones)
    assert flat[0].std() < 1e-6  # contrast 0: every pixel becomes the mean grey
    darker = adjust_color(batch, ones * 0.5, ones, ones)
    torch.testing.assert_close(darker, batch * 0.5)
    jittered = color_jitter_batch(batch, 0.2, 0.2, 0.2, generator=torch.Generator().manual_seed(0))
    assert jittered.shape == batch.shape and not torch.equal(jittered, batch)
    single = ColorJitter(0.0, 0.0, 0.0)(batch[0], random.Random(0))
    torch.testing.assert_close(single, batch[0])


def test_normalize_validates():
    with pytest.raises(ValueError, match="std"):
        Normalize((0.5, 0.5, 0.5), (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="3 values"):
        Normalize((0.5,), (0.2,))
