"""Histology augmentations without torchvision: PIL for geometry, torch for colour.

A pipeline is a `Compose` of small ops. Geometric ops act on PIL images, colour ops on
``(..., 3, H, W)`` float tensors in [0, 1], so the same colour code also runs batched on the
GPU (`hed_jitter_batch`, `color_jitter_batch`). `DeviceAugmentation` is the whole pretraining
pipeline for batches on the accelerator (crop, flips and rotations as one `grid_sample`), for when
DataLoader workers cannot keep up; both take their strengths from `AugmentationStrengths`.

Every random op draws its parameters from a ``random.Random`` that `Compose` hands it. With a
``seed``, that generator is derived from ``(seed, epoch, index)``, so the augmentation of sample
``index`` at ``epoch`` is a pure function of those three numbers: exact resume after a restart,
and identical results whatever DataLoader worker happens to load the sample.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Ruifrok & Johnston (2001) stain vectors, one per row: optical density of haematoxylin, eosin
# and DAB in R, G, B. Same values as skimage.color.rgb_from_hed.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
# skimage floors intensities at 1e-6 before the log and scales optical density by -log(1e-6).
_MIN_INTENSITY = 1e-6
_LOG_ADJUST = math.log(_MIN_INTENSITY)
# ITU-R BT.601 luma weights, for greyscale in contrast/saturation jitter.
_LUMA = (0.299, 0.587, 0.114)


# -- colour math on tensors (batched, any device) ---------------------------------------------


def _mix_channels(pixels: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """Right-multiply the channel vector of every pixel by ``matrix``: (..., 3, H, W) -> same."""
    weights = torch.as_tensor(matrix, dtype=pixels.dtype, device=pixels.device)  # (3, 3)
    return torch.einsum("...chw,cd->...dhw", pixels, weights)


def rgb_to_hed(pixels: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> HED stain concentrations, (..., 3, H, W) -> (..., 3, H, W).

    Matches ``skimage.color.rgb2hed`` except that negative concentrations are kept rather than
    clipped to 0, so that `hed_to_rgb` inverts it exactly (needed for an identity at zero jitter).
    """
    optical_density = torch.log(pixels.clamp(min=_MIN_INTENSITY)) / _LOG_ADJUST
    return _mix_channels(optical_density, HED_FROM_RGB)


def hed_to_rgb(stains: torch.Tensor) -> torch.Tensor:
    """HED stain concentrations -> RGB in [0, 1]; the inverse of `rgb_to_hed` (skimage.color.hed2rgb)."""
    optical_density = _mix_channels(stains, RGB_FROM_HED)
    return torch.exp(optical_density * _LOG_ADJUST).clamp(0.0, 1.0)


def hed_perturb(pixels: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Scale and shift each stain: ``hed' = alpha * hed + beta`` (Tellez et al., 2018).

    Args:
        pixels: (B, 3, H, W) RGB in [0, 1].
        alpha, beta: (B, 3) per-sample, per-stain factor and offset.
    """
    stains = rgb_to_hed(pixels)  # (B, 3, H, W)
    stains = stains * alpha[:, :, None, None] + beta[:, :, None, None]
    return hed_to_rgb(stains)


def sample_hed_params(
    batch: int,
    sigma: float,
    bias: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-stain ``alpha ~ U(1 - sigma, 1 + sigma)`` and ``beta ~ U(-bias, bias)``, each (B, 3)."""
    uniform = torch.rand((2, batch, 3), generator=generator, device=device, dtype=dtype)  # [0, 1)
    return 1 + sigma * (2 * uniform[0] - 1), bias * (2 * uniform[1] - 1)


def hed_jitter_batch(
    pixels: torch.Tensor, sigma: float = 0.05, bias: float = 0.01, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random HED stain jitter on a batch, on the batch's device (e.g. after the DataLoader, on GPU).

    Args:
        pixels: (B, 3, H, W) RGB in [0, 1].
        sigma, bias: spread of the per-stain factor and offset (`sample_hed_params`).
        generator: a seeded ``torch.Generator`` on ``pixels.device`` for reproducible draws.
    """
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (B, 3, H, W), got shape {tuple(pixels.shape)}")
    alpha, beta = sample_hed_params(pixels.shape[0], sigma, bias, generator, pixels.device, pixels.dtype)
    return hed_perturb(pixels, alpha, beta)


def _greyscale(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    weights = torch.tensor(_LUMA, dtype=pixels.dtype, device=pixels.device)
    return torch.einsum("bchw,c->bhw", pixels, weights)[:, None]


def adjust_color(
    pixels: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor
) -> torch.Tensor:
    """Brightness, contrast and saturation by per-sample factors (1 = unchanged), like torchvision.

    Args:
        pixels: (B, 3, H, W) RGB in [0, 1].
        brightness, contrast, saturation: (B,) factors.
    """
    per_sample = (-1, 1, 1, 1)
    pixels = (pixels * brightness.view(per_sample)).clamp(0, 1)
    mean_grey = _greyscale(pixels).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    pixels = (mean_grey + (pixels - mean_grey) * contrast.view(per_sample)).clamp(0, 1)
    grey = _greyscale(pixels)  # (B, 1, H, W)
    return (grey + (pixels - grey) * saturation.view(per_sample)).clamp(0, 1)


def color_jitter_batch(
    pixels: torch.Tensor,
    brightness: float = 0.1,
    contrast: float = 0.1,
    saturation: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random brightness/contrast/saturation on a batch: factors ``~ U(1 - s, 1 + s)`` per sample."""
    uniform = torch.rand((3, pixels.shape[0]), generator=generator, device=pixels.device, dtype=pixels.dtype)
    spread = torch.tensor([brightness, contrast, saturation], dtype=pixels.dtype, device=pixels.device)[:, None]
    factors = 1 + spread * (2 * uniform - 1)  # (3, B)
    return adjust_color(pixels, *factors)


def sample_crop_boxes(
    batch: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    tries: int = 10,
) -> torch.Tensor:
    """Random-resized-crop boxes for square images, as fractions of the side: (B, 4) of
    (centre x, centre y, width, height). Like `RandomResizedCrop.crop_box`: area ~ U(scale), log aspect
    ~ U(log ratio), the first of `tries` draws that fits, else the whole image."""
    uniform = torch.rand((3, batch, tries), generator=generator, device=device)
    area = scale[0] + (scale[1] - scale[0]) * uniform[0]  # (B, T)
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * uniform[1]
    width, height = (area * log_ratio.exp()).sqrt(), (area / log_ratio.exp()).sqrt()  # (B, T)
    fits = (width <= 1) & (height <= 1)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # (B, 1) first fitting try (0 if none fits)
    width, height = width.gather(1, first)[:, 0], height.gather(1, first)[:, 0]  # (B,)
    any_fits = fits.any(dim=1)
    width, height = torch.where(any_fits, width, 1.0), torch.where(any_fits, height, 1.0)
    position = torch.rand((2, batch), generator=generator, device=device)
    centre_x = width / 2 + (1 - width) * position[0]
    centre_y = height / 2 + (1 - height) * position[1]
    return torch.stack([centre_x, centre_y, width, height], dim=1)  # (B, 4)


def crop_flip_rotate_batch(
    pixels: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random resized crop, horizontal/vertical flips and 90-degree rotations of a batch in one resampling.

    Each sample's crop box, flips and rotation compose into one affine map from output to input
    coordinates, applied with a bilinear `grid_sample` (crops are never smaller than the output after
    resizing from tiles of `size`, so no antialiasing is needed).

    Args:
        pixels: (B, C, H, W) float, square.
    Returns:
        (B, C, size, size)
    """
    batch = pixels.shape[0]
    boxes = sample_crop_boxes(batch, scale, ratio, generator, pixels.device)  # (B, 4)
    draws = torch.rand((3, batch), generator=generator, device=pixels.device)
    flip = torch.where(draws[:2] < 0.5, -1.0, 1.0)  # (2, B): x and y signs
    quarter_turns = (draws[2] * 4).floor()  # (B,) 0..3
    cos, sin = torch.cos(quarter_turns * math.pi / 2).round(), torch.sin(quarter_turns * math.pi / 2).round()
    # output (x, y) in [-1, 1] -> rotate -> flip -> scale to the box -> shift to its centre
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], dim=1)  # (B, 2, 2)
    linear = (boxes[:, 2:] * flip.T)[:, :, None] * rotation  # (B, 2, 2): diag(w, h) @ diag(flips) @ R
    shift = 2 * boxes[:, :2] - 1  # (B, 2) box centre in [-1, 1]
    theta = torch.cat([linear, shift[:, :, None]], dim=2).to(pixels.dtype)  # (B, 2, 3)
    grid = F.affine_grid(theta, [batch, pixels.shape[1], size, size], align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class AugmentationStrengths:
    """How strong each pretraining augmentation is, shared by the CPU pipeline (`pretrain_transform`) and
    the batched one on the accelerator (`DeviceAugmentation`). A jitter set to 0 is off."""

    scale: tuple[float, float] = (0.2, 1.0)  # area fraction of the random resized crop (MAE's default)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # its aspect ratio range
    hed_sigma: float = 0.05  # HED stain factor ~ U(1 - sigma, 1 + sigma)
    hed_bias: float = 0.01  # HED stain offset ~ U(-bias, bias)
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1

    def __post_init__(self):
        RandomResizedCrop(1, self.scale, self.ratio)  # validates scale and ratio

    @property
    def hed(self) -> tuple[float, float]:
        return self.hed_sigma, self.hed_bias

    @property
    def color(self) -> tuple[float, float, float]:
        return self.brightness, self.contrast, self.saturation


class DeviceAugmentation:
    """`pretrain_transform` for whole batches on the accelerator: uint8 tiles from the workers (see
    `device_augmentation_worker_transform`) -> crop/flip/rotate -> HED and colour jitter -> normalised
    float32. Takes the same strengths (`AugmentationStrengths` fields as keywords); draws come from the
    `generator` passed per call, so a seeded generator per step keeps training resumable exactly."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], **strengths):
        Normalize(mean, std)  # validates mean and std
        self.image_size, self.strengths = image_size, AugmentationStrengths(**strengths)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, tiles: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, 3, image_size, image_size) float32, normalised."""
        if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[1] != 3:
            raise ValueError(f"tiles must be a (B, 3, H, W) uint8 batch, got {tiles.dtype} {tuple(tiles.shape)}")
        pixels = tiles.float().div_(255)  # (B, 3, H, W) in [0, 1]
        strengths = self.strengths
        pixels = crop_flip_rotate_batch(pixels, self.image_size, strengths.scale, strengths.ratio, generator).clamp_(0, 1)
        if any(strengths.hed):
            pixels = hed_jitter_batch(pixels, *strengths.hed, generator=generator)
        if any(strengths.color):
            pixels = color_jitter_batch(pixels, *strengths.color, generator=generator)
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std


# -- ops: callables (x, rng) -> x ---------------------------------------------------------------


class RandomResizedCrop:
    """Crop a random area fraction ``scale`` with aspect ratio ``ratio``, resize to ``size`` (PIL)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.size, self.scale, self.ratio = size, scale, ratio

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(left, top, right, bottom); falls back to the largest centred box in range after 10 tries."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))  # log-uniform: 3/4 as likely as 4/3
            crop_w = round(math.sqrt(target_area * aspect))
            crop_h = round(math.sqrt(target_area / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
                return left, top, left + crop_w, top + crop_h
        aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
        crop_w, crop_h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        return left, top, left + crop_w, top + crop_h

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        box = self.crop_box(*image.size, rng)
        return image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)


class RandomFlip:
    """Horizontal and vertical flips, each with its own probability (PIL)."""

    def __init__(self, horizontal: float = 0.5, vertical: float = 0.5):
        self.horizontal, self.vertical = horizontal, vertical

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        if rng.random() < self.horizontal:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < self.vertical:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        return image


class RandomRotate90:
    """Rotate by 0, 90, 180 or 270 degrees; tissue has no preferred orientation (PIL)."""

    _ROTATIONS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        rotation = self._ROTATIONS[rng.randrange(4)]
        return image if rotation is None else image.transpose(rotation)


class Resize:
    """Resize the shorter side to ``size``, keeping the aspect ratio (PIL, bicubic)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        width, height = image.size
        scale = self.size / min(width, height)
        new_size = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
        return image if new_size == image.size else image.resize(new_size, Image.Resampling.BICUBIC)


class CenterCrop:
    """Crop the central ``size`` x ``size`` square (PIL)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        width, height = image.size
        if width < self.size or height < self.size:
            raise ValueError(f"CenterCrop({self.size}) needs an image at least that large, got {width}x{height}")
        left, top = (width - self.size) // 2, (height - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))


class ToTensor:
    """PIL image or (H, W, 3) uint8 array -> (3, H, W) float32 in [0, 1]."""

    def __call__(self, image: Image.Image | np.ndarray, rng: random.Random | None = None) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
        pixels = np.array(image, dtype=np.uint8)  # (H, W, 3); a writable copy, as torch wants
        return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)


class ToUint8Tensor:
    """PIL image -> (3, H, W) uint8: what DataLoader workers hand over when the augmentation runs on the
    accelerator (a quarter of float32's host-to-device traffic)."""

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


class HEDJitter:
    """Per-image HED stain jitter on a (3, H, W) tensor; see `hed_jitter_batch`."""

    def __init__(self, sigma: float = 0.05, bias: float = 0.01):
        self.sigma, self.bias = sigma, bias

    def sample_params(self, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, beta), each (3,)."""
        alpha = torch.tensor([1 + self.sigma * (2 * rng.random() - 1) for _ in range(3)])
        beta = torch.tensor([self.bias * (2 * rng.random() - 1) for _ in range(3)])
        return alpha, beta

    @staticmethod
    def apply(pixels: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Perturb one (3, H, W) image with (3,) ``alpha`` and ``beta``."""
        return hed_perturb(pixels[None], alpha[None].to(pixels), beta[None].to(pixels))[0]

    def __call__(self, pixels: torch.Tensor, rng: random.Random) -> torch.Tensor:
        return self.apply(pixels, *self.sample_params(rng))


class ColorJitter:
    """Per-image brightness/contrast/saturation jitter on a (3, H, W) tensor; see `adjust_color`."""

    def __init__(self, brightness: float = 0.1, contrast: float = 0.1, saturation: float = 0.1):
        self.spread = (brightness, contrast, saturation)

    def __call__(self, pixels: torch.Tensor, rng: random.Random) -> torch.Tensor:
        factors = [torch.tensor([1 + s * (2 * rng.random() - 1)], dtype=pixels.dtype) for s in self.spread]
        return adjust_color(pixels[None], *factors)[0]


class Normalize:
    """``(x - mean) / std`` per channel on a (3, H, W) tensor."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each and std > 0, got mean={mean}, std={std}")
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, pixels: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        return (pixels - self.mean) / self.std


# -- pipelines -----------------------------------------------------------------------------------


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator for sample ``index`` at ``epoch``; well mixed so nearby indices are unrelated."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


class Compose:
    """Apply ops in order. Call as ``transform(image, index=i, epoch=e)``; with a ``seed`` the
    result depends only on ``(seed, epoch, index)``. Without one (or without ``index``), fresh
    OS entropy is used, so forked DataLoader workers never repeat each other.
    """

    def __init__(self, ops: Sequence, seed: int | None = None):
        self.ops = list(ops)
        self.seed = seed

    def __call__(
        self,
        image: Image.Image | np.ndarray,
        index: int | None = None,
        epoch: int = 0,
        rng: random.Random | None = None,
    ) -> torch.Tensor:
        if rng is None and self.seed is not None and index is not None:
            rng = sample_rng(self.seed, epoch, index)
        elif rng is None:
            rng = random.Random()
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        elif isinstance(image, Image.Image) and image.mode != "RGB":
            image = image.convert("RGB")
        for op in self.ops:
            image = op(image, rng)
        return image

    def __repr__(self) -> str:
        ops = ", ".join(type(op).__name__ for op in self.ops)
        return f"Compose([{ops}], seed={self.seed})"


def pretrain_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], *, seed: int | None = None, **strengths
) -> Compose:
    """Augmentation for MIM pretraining on tiles.

    Random resized crop (MAE's default scale), flips and 90-degree rotations, HED stain jitter,
    mild brightness/contrast/saturation jitter, then normalisation; `strengths` are
    `AugmentationStrengths` fields as keywords (e.g. ``hed_sigma=0`` turns the stain jitter off).
    ``seed`` makes sample ``i`` at epoch ``e`` reproducible (see `Compose`).
    """
    strengths = AugmentationStrengths(**strengths)
    ops: list = [RandomResizedCrop(image_size, strengths.scale, strengths.ratio), RandomFlip(), RandomRotate90(),
                 ToTensor()]  # fmt: skip
    if any(strengths.hed):
        ops.append(HEDJitter(*strengths.hed))
    if any(strengths.color):
        ops.append(ColorJitter(*strengths.color))
    ops.append(Normalize(mean, std))
    return Compose(ops, seed=seed)


def device_augmentation_worker_transform(image_size: int) -> Compose:
    """What DataLoader workers do when `DeviceAugmentation` runs on the accelerator: bring a tile to
    ``image_size`` (a no-op for tiles cut at that size) and hand it over as uint8."""
    return Compose([Resize(image_size), CenterCrop(image_size), ToUint8Tensor()])


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> Compose:
    """Deterministic: resize the shorter side to ``image_size``, centre crop, normalise."""
    return Compose([Resize(image_size), CenterCrop(image_size), ToTensor(), Normalize(mean, std)])
