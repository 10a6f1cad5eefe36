"""Side-by-side training-step benchmark: histomim vs transformers' own MIM models, in one process.

For each objective the reference model is built from the preset, and the histomim model is imported
from it (`histomim.export`), so both hold the same weights. Each then runs the same training step
(forward + backward + AdamW, fused on CUDA; bf16 autocast on GPU) on the same random batch and mask
ratio. Each row (a `Variant`: implementation, compile mode, attention kernel, fused or foreach AdamW,
float8) reports img/s, step time, model TFLOP/s, MFU against a matmul peak measured in the same run,
peak memory and its loss for one shared mask before training (in the benchmark dtype on the device);
every histomim row is compared with every transformers row (img/s ratio, loss difference). The fp32
loss difference on the CPU is the exactness check.

FLOPs are counted analytically as 6 x multiply-accumulates of the forward matmuls (QKV/proj/MLP,
attention scores and values, patch embedding, decoder embedding and prediction): 2 FLOPs per MAC,
forward + backward = 3 x forward. MAE embeds and encodes 1 + K tokens (K visible patches), its
decoder sees 1 + L; the same count serves both implementations, so MFU credits only required work.

The CNN rows (objective ``fcmae``, the `CNN_PRESET` ConvNeXt at the same image size) compare histomim's
FCMAE with transformers' `ConvNextModel` holding the same weights (`histomim.export.to_convnext`) under the
same decoder and loss but masking only its input pixels, i.e. what the per-stage masking costs over plain
masked convolution. Their losses differ only by what leaks across patch borders in the reference (tiny at
initialisation, where LayerScale is 1e-6); without a mask the two encoders agree exactly.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..export import from_beit, from_vit_mae, from_vit_simmim, to_convnext, vit_encoder_settings
from ..mim.configuration_histomim import HistoMIMConfig
from ..mim.configuration_histomim_convnext import HistoMIMConvNextConfig
from ..mim.masking import block_random_mask, block_wise_masking, num_visible_patches, random_masking
from ..presets import config_source

BEIT_CODEBOOK_SIZE = 8192  # BEiT v2's codebook: the width of the BEiT head in both implementations
# The benchmark feeds random codes as BEiT's labels: no tokenizer is loaded (nor timed, as in transformers' BEiT).
BENCHMARK_TOKENIZER = "none (the benchmark passes random codes as labels)"
CNN_PRESET = "histomim-convnext-atto"
OBJECTIVES = ("mae", "simmim", "beit", "fcmae")


# --------------------------------------------------------------------------- FLOP counting


def transformer_macs(tokens: int, dim: int, mlp_dim: int, depth: int) -> int:
    """Multiply-accumulates of `depth` pre-norm blocks over `tokens` tokens."""
    projections = tokens * (4 * dim * dim + 2 * dim * mlp_dim)  # qkv (3) + proj (1), fc1 + fc2
    attention = 2 * tokens * tokens * dim  # QK^T and attention x V
    return depth * (projections + attention)


def convnext_block_macs(positions: int, dim: int) -> int:
    """Multiply-accumulates of one ConvNeXt block: 7x7 depthwise conv and the 4x MLP, at `positions` positions."""
    return positions * (49 * dim + 8 * dim * dim)


def fcmae_macs(config: HistoMIMConvNextConfig) -> int:
    """Forward MACs of one image's FCMAE step (dense: masked positions are computed, then zeroed)."""
    side = config.image_size // config.stem_size
    macs = side * side * config.num_channels * config.stem_size**2 * config.hidden_sizes[0]  # stem
    for index, (depth, dim) in enumerate(zip(config.depths, config.hidden_sizes)):
        if index:
            side //= 2
            macs += side * side * 4 * config.hidden_sizes[index - 1] * dim  # 2x2 stride-2 downsampling
        macs += depth * convnext_block_macs(side * side, dim)
    patches, dec = config.num_patches, config.decoder_hidden_size
    macs += patches * config.hidden_sizes[-1] * dec + config.decoder_num_hidden_layers * convnext_block_macs(patches, dec)
    return macs + patches * dec * config.patch_size**2 * config.num_channels  # prediction


def training_flops_per_image(config: HistoMIMConfig | HistoMIMConvNextConfig) -> float:
    """6 x forward MACs of one image's training step for `config`'s objective."""
    if config.objective == "fcmae":
        return 6.0 * fcmae_macs(config)
    patches = config.num_patches
    pixels_per_patch = config.patch_size**2 * config.num_channels
    if config.objective == "mae":
        visible = num_visible_patches(patches, config.mask_ratio)
        dec = config.decoder_hidden_size
        # only visible patches need embedding: counting the masked ones would credit work MAE need not do
        macs = visible * pixels_per_patch * config.hidden_size
        macs += transformer_macs(1 + visible, config.hidden_size, config.intermediate_size, config.num_hidden_layers)
        macs += (1 + visible) * config.hidden_size * dec  # decoder embedding
        macs += transformer_macs(1 + patches, dec, config.decoder_intermediate_size, config.decoder_num_hidden_layers)
        macs += (1 + patches) * dec * pixels_per_patch  # prediction
    else:
        macs = patches * pixels_per_patch * config.hidden_size  # patch embedding
        macs += transformer_macs(1 + patches, config.hidden_size, config.intermediate_size, config.num_hidden_layers)
        head_outputs = config.codebook_size if config.objective == "beit" else pixels_per_patch
        macs += patches * config.hidden_size * head_outputs  # SimMIM's pixel head or BEiT's head over the codebook
    return 6.0 * macs


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """Dense matmul FLOP/s on this device: the MFU denominator, measured rather than taken from a data sheet."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- models


class InputMaskedConvNext(torch.nn.Module):
    """The fcmae rows' reference: transformers' `ConvNextModel` with `model`'s encoder weights and a copy of
    its decoder, the mask applied to the input pixels only (no per-stage masking), the same loss."""

    def __init__(self, model):
        import copy

        super().__init__()
        self.config = model.config
        self.convnext = to_convnext(model.histomim).train()
        self.decoder = copy.deepcopy(model.decoder)

    def forward(self, pixel_values: torch.Tensor, noise: torch.Tensor | None = None):
        from transformers.utils import ModelOutput

        from ..mim.modeling_histomim import masked_patch_mse, patchify
        from ..mim.modeling_histomim_convnext import visible_map

        patch = self.config.patch_size
        grid_hw = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        _, mask, _ = random_masking(pixel_values.shape[0], grid_hw[0] * grid_hw[1], self.config.mask_ratio, noise,
                                    device=pixel_values.device)  # fmt: skip
        visible = visible_map(mask.bool(), grid_hw, patch).to(pixel_values.dtype)  # (B, 1, H, W)
        features = self.convnext(pixel_values * visible).last_hidden_state  # (B, C, h, w)
        logits = self.decoder(features, mask).float()  # (B, L, p*p*C)
        loss, _ = masked_patch_mse(logits, patchify(pixel_values.float(), patch), mask, self.config.norm_pix_loss)
        return ModelOutput(loss=loss, logits=logits)


def reference_and_histomim(config: HistoMIMConfig | HistoMIMConvNextConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """transformers' model for `config.objective` and the histomim model holding the same weights."""
    from transformers import BeitConfig, BeitForMaskedImageModeling, ViTConfig, ViTForMaskedImageModeling, ViTMAEConfig, ViTMAEForPreTraining

    if config.objective == "fcmae":
        from ..mim.modeling_histomim_convnext import HistoMIMConvNextForPreTraining

        ours = HistoMIMConvNextForPreTraining(config)
        return InputMaskedConvNext(ours), ours

    shared = dict(**vit_encoder_settings(config), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if config.objective == "mae":
        reference = ViTMAEForPreTraining(ViTMAEConfig(
            **shared, mask_ratio=config.mask_ratio, norm_pix_loss=config.norm_pix_loss,
            decoder_hidden_size=config.decoder_hidden_size, decoder_num_hidden_layers=config.decoder_num_hidden_layers,
            decoder_num_attention_heads=config.decoder_num_attention_heads,
            decoder_intermediate_size=config.decoder_intermediate_size,
        ))
        with torch.no_grad():  # transformers 5.2x leaves MAE's sin-cos tables at zero; give both real values
            reference.vit.embeddings.position_embeddings.normal_(0, 0.02)
            reference.decoder.decoder_pos_embed.normal_(0, 0.02)
        return reference, from_vit_mae(reference)
    if config.objective == "beit":
        # BEiT in the layout histomim shares: absolute positions, no relative position bias, no layer scale
        settings = {name: value for name, value in shared.items() if name != "qkv_bias"}  # BEiT: q and v biases
        reference = BeitForMaskedImageModeling(BeitConfig(
            **settings, vocab_size=config.codebook_size, use_mask_token=True, use_absolute_position_embeddings=True,
            use_relative_position_bias=False, use_shared_relative_position_bias=False, layer_scale_init_value=0.0,
            use_mean_pooling=True, drop_path_rate=0.0,
        ))
        return reference, from_beit(reference, mask_ratio=config.mask_ratio, tokenizer_name_or_path=config.tokenizer_name_or_path)
    reference = ViTForMaskedImageModeling(ViTConfig(**shared, encoder_stride=config.patch_size))
    return reference, from_vit_simmim(reference, mask_ratio=config.mask_ratio, mask_patch_size=config.mask_patch_size)


def objective_config(config: HistoMIMConfig, objective: str) -> HistoMIMConfig:
    """`config` with `objective`; switching objective takes that objective's usual settings
    (MAE: 75% of 16 px patches, normalized targets; SimMIM: 60% of 32 px blocks, raw pixels); `fcmae` is the
    `CNN_PRESET` ConvNeXt at `config`'s image size."""
    if objective == config.objective:
        return config
    if objective == "fcmae":
        return HistoMIMConvNextConfig.from_pretrained(config_source(CNN_PRESET), image_size=config.image_size)
    usual = {"mae": dict(mask_ratio=0.75, mask_patch_size=None, norm_pix_loss=True),
             "simmim": dict(mask_ratio=0.6, mask_patch_size=None, norm_pix_loss=False),
             "beit": dict(mask_ratio=0.4, mask_patch_size=None, norm_pix_loss=False, codebook_size=BEIT_CODEBOOK_SIZE,
                          tokenizer_name_or_path=BENCHMARK_TOKENIZER)}[objective]  # fmt: skip
    return HistoMIMConfig(**{**config.to_dict(), "objective": objective, **usual})


def reference_inputs(config: HistoMIMConfig, batch: int, device: torch.device, implementation: str = "transformers",
                     generator: torch.Generator | None = None) -> dict:
    """Inputs of one step: MAE (and the fcmae reference) mask internally, SimMIM takes a mask, BEiT a block-wise
    mask and the codes of the patches (random; transformers takes those of the masked patches only, histomim all
    (B, L))."""
    if config.objective in ("mae", "fcmae"):
        return {}
    if config.objective == "beit":
        grid = config.image_size // config.patch_size
        mask = block_wise_masking(batch, (grid, grid), config.mask_ratio, config.block_min_num_patches,
                                  config.block_min_aspect, generator=generator)  # fmt: skip
        labels = torch.randint(config.codebook_size, (batch, grid * grid), generator=generator)
        labels = labels[mask] if implementation == "transformers" else labels
        return {"bool_masked_pos": mask.to(device), "labels": labels.to(device)}
    grid = config.image_size // config.patch_size
    return {"bool_masked_pos": block_random_mask(batch, grid, config.mask_patch_size, config.patch_size,
                                                 config.mask_ratio, device=device)}


# --------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Variant:
    """One row of the benchmark: an implementation and the switches it runs with."""

    implementation: str  # "transformers" or "histomim"
    compile_mode: str | None = None  # None: eager; else a torch.compile mode ("default", "reduce-overhead", ...)
    attention: str = "sdpa"  # "sdpa" or "eager" (the attention kernels)
    fused_adamw: bool = True  # fused AdamW on CUDA (foreach otherwise)
    float8: bool = False  # torchao float8 linears (histomim only; trades exactness)

    @property
    def label(self) -> str:
        parts = [self.implementation]
        if self.compile_mode:
            parts.append("compiled" if self.compile_mode == "default" else f"compiled {self.compile_mode}")
        if self.attention != "sdpa":
            parts.append("attention without SDPA")
        if not self.fused_adamw:
            parts.append("unfused AdamW")
        if self.float8:
            parts.append("float8")
        return ", ".join(parts)


def standard_variants(compile_modes=(None,), float8: bool = False, ablations: bool = False) -> list[Variant]:
    """transformers and histomim under each compile mode (None = eager); with `float8`, histomim in float8
    under the last mode; with `ablations`, histomim without SDPA and without fused AdamW under the first
    mode, to show what each bought."""
    variants = [Variant(name, mode) for mode in compile_modes for name in ("transformers", "histomim")]
    if ablations:
        variants += [Variant("histomim", compile_modes[0], attention="eager"),
                     Variant("histomim", compile_modes[0], fused_adamw=False)]
    if float8:
        variants.append(Variant("histomim", compile_modes[-1], float8=True))
    return variants


@dataclass
class Result:
    implementation: str
    objective: str
    batch_size: int
    img_per_s: float
    step_ms: float
    model_tflops: float
    mfu: float
    peak_memory_gib: float | None
    variant: str = ""
    compiled: bool = False
    shared_mask_loss: float | None = None  # loss before training for a mask fixed by seed 0, benchmark dtype
    loss_difference: float | None = None  # |shared_mask_loss - transformers'| for histomim rows
    error: str | None = None  # why this row could not run (e.g. float8 without torchao); the others still do


def build_variant(variant: Variant, config: HistoMIMConfig, device: torch.device) -> torch.nn.Module:
    """The (uncompiled) model of `variant` on `device`, built from the seeded reference so that every
    variant starts from the same weights."""
    torch.manual_seed(0)
    reference, ours = reference_and_histomim(config)
    model = reference if variant.implementation == "transformers" else ours
    if config.objective != "fcmae":  # a CNN has no attention kernel to choose
        model.config._attn_implementation = variant.attention
    if variant.float8:
        from .float8 import convert_to_float8

        convert_to_float8(model)
    return model.to(device).train()


def time_training_steps(
    model, inputs_fn, pixels, device, dtype, steps, warmup, fused_adamw=True, cuda_graphs=False
) -> list[float]:
    """Seconds per training step (forward + backward + AdamW) after `warmup` steps."""
    fused = fused_adamw and device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=None if fused else True)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    for step in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        if cuda_graphs:  # tell CUDA graph trees that a new step begins (the previous step's outputs are done)
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss = model(pixels, **inputs_fn()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


def shared_mask_loss(model, config: HistoMIMConfig, pixels: torch.Tensor, dtype: torch.dtype) -> float:
    """`model`'s loss on `pixels` for a mask drawn from seed 0 (the same for every variant), without grad."""
    generator = torch.Generator().manual_seed(0)
    batch = pixels.shape[0]
    if config.objective == "beit":
        implementation = "histomim" if hasattr(model, "histomim") else "transformers"
        masking = reference_inputs(config, batch, pixels.device, implementation, generator)
        with torch.no_grad(), torch.autocast(pixels.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(pixels, **masking).loss.item()
    noise = torch.rand(config.mask_noise_shape(batch), generator=generator).to(pixels.device)
    if config.objective in ("mae", "fcmae"):
        masking = {"noise": noise}
    else:
        grid = config.image_size // config.patch_size
        masking = {"bool_masked_pos": block_random_mask(
            batch, grid, config.mask_patch_size, config.patch_size, config.mask_ratio, noise)}
    with torch.no_grad(), torch.autocast(pixels.device.type, dtype=dtype, enabled=dtype != torch.float32):
        return model(pixels, **masking).loss.item()


def loss_difference(config: HistoMIMConfig, batch: int = 4) -> float:
    """|loss_histomim - loss_transformers| in fp32 on the CPU for one shared mask (exactness check)."""
    reference, ours = (m.float().eval() for m in reference_and_histomim(config))
    pixels = torch.randn(batch, config.num_channels, config.image_size, config.image_size)
    return abs(shared_mask_loss(reference, config, pixels, torch.float32)
               - shared_mask_loss(ours, config, pixels, torch.float32))  # fmt: skip


@dataclass
class BenchmarkReport:
    device: str
    dtype: str
    matmul_peak_tflops: float
    results: list[Result] = field(default_factory=list)
    ratios: dict = field(default_factory=dict)
    loss_difference_fp32: dict = field(default_factory=dict)
    flops_per_image: dict = field(default_factory=dict)
    device_augmentation_img_per_s: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def update_comparisons(self) -> None:
        """For every histomim row: its img/s over each transformers row's (`ratios[objective][ours][theirs]`),
        and |its loss - transformers' loss| for the shared mask (`loss_difference` of the row; both
        computed before compiling and training, so every transformers row has the same one)."""
        self.ratios = {}
        for objective in dict.fromkeys(r.objective for r in self.results):
            rows = [r for r in self.results if r.objective == objective and r.error is None]
            references = [r for r in rows if r.implementation == "transformers"]
            ours = [r for r in rows if r.implementation == "histomim"]
            self.ratios[objective] = {
                row.variant: {ref.variant: row.img_per_s / ref.img_per_s for ref in references} for row in ours
            }
            if references:
                for row in ours:
                    row.loss_difference = abs(row.shared_mask_loss - references[0].shared_mask_loss)


def run_benchmark(
    config: HistoMIMConfig,
    objectives: tuple[str, ...] = ("mae", "simmim"),
    device: str = "cuda",
    batch_size: int = 256,
    steps: int = 15,
    warmup: int = 3,
    dtype: str = "bf16",
    variants: list[Variant] | None = None,
    peak_matmul_size: int = 8192,
    progress: bool = True,
    on_result=None,
) -> BenchmarkReport:
    """Benchmark histomim against transformers for each objective on one device, same config and batch.

    `variants` defaults to transformers and histomim in eager mode. `on_result(report)` is called after
    every row, e.g. to write the JSON as it grows so that a run cut short keeps what it measured.
    """
    from tqdm.auto import tqdm

    variants = variants or standard_variants()
    torch_device = torch.device(device)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    peak = measure_matmul_peak(torch_device, torch_dtype if torch_device.type == "cuda" else torch.float32, peak_matmul_size)
    report = BenchmarkReport(device=describe_device(torch_device), dtype=dtype, matmul_peak_tflops=peak / 1e12)
    report.device_augmentation_img_per_s = device_augmentation_throughput(torch_device, config.image_size)

    # one random batch for every row (the objectives share the image size)
    pixels = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size,
                         generator=torch.Generator().manual_seed(0)).to(torch_device)  # fmt: skip
    jobs = [(objective, variant) for objective in objectives for variant in variants]
    for objective, variant in tqdm(jobs, desc="benchmark", disable=not progress):
        run_config = objective_config(config, objective)
        if objective not in report.flops_per_image:
            report.loss_difference_fp32[objective] = loss_difference(run_config)
            report.flops_per_image[objective] = training_flops_per_image(run_config)
        row = dict(implementation=variant.implementation, objective=objective, batch_size=batch_size,
                   variant=variant.label, compiled=variant.compile_mode is not None)
        try:
            model = build_variant(variant, run_config, torch_device)
            loss = shared_mask_loss(model, run_config, pixels, torch_dtype)  # before any step: same weights for all
            if variant.compile_mode:
                model = torch.compile(model, mode=variant.compile_mode)
            if torch_device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(torch_device)
            inputs_fn = lambda: reference_inputs(run_config, batch_size, torch_device, variant.implementation)  # noqa: E731
            step_s = statistics.median(time_training_steps(
                model, inputs_fn, pixels, torch_device, torch_dtype, steps, warmup, variant.fused_adamw,
                cuda_graphs=variant.compile_mode == "reduce-overhead"))
        except Exception as error:  # one row failing (out of memory, no torchao, a compiler error) keeps the others
            report.results.append(Result(**row, img_per_s=0.0, step_ms=0.0, model_tflops=0.0, mfu=0.0,
                                         peak_memory_gib=None, error=f"{type(error).__name__}: {error}"[:500]))
        else:
            flops = report.flops_per_image[objective] * batch_size / step_s
            report.results.append(Result(
                **row, img_per_s=batch_size / step_s, step_ms=1000 * step_s, model_tflops=flops / 1e12,
                mfu=flops / peak, shared_mask_loss=loss,
                peak_memory_gib=torch.cuda.max_memory_allocated(torch_device) / 2**30 if torch_device.type == "cuda" else None,
            ))
        model = None  # free the device memory before the next row
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
        report.update_comparisons()
        if on_result:
            on_result(report)
    return report


# --------------------------------------------------------------------------- memory without a GPU


def estimate_training_memory(config: HistoMIMConfig, batch_size: int, dtype: str = "bf16") -> dict[str, float]:
    """Peak memory (GiB) of one histomim training step (forward, backward, AdamW), estimated without
    running it: the model and step run on fake tensors (`FakeTensorMode`) under torch's `MemTracker`,
    which adds up every tensor alive at each point. Returns GiB per kind (parameters, activations,
    gradients, optimizer state, ...) at the peak, plus "total".

    The step runs with the CPU's kernels, so attention is counted as the CPU computes it; GPU flash
    attention keeps less, while the CUDA caching allocator and cuBLAS workspaces add some: read it as an
    estimate for planning (will batch N fit?), not as a measurement.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from ..mim.modeling_histomim import HistoMIMForPreTraining
    from ..mim.modeling_histomim_convnext import HistoMIMConvNextForPreTraining

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    with FakeTensorMode():
        model = (HistoMIMConvNextForPreTraining if config.objective == "fcmae" else HistoMIMForPreTraining)(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        for parameter in model.parameters():  # the tracker hooks every parameter (fixed sin-cos tables: a few KiB)
            parameter.requires_grad_(True)
        pixels = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size)
        with tracker:
            for step in range(2):  # the second step has the optimizer state from the first
                with torch.autocast("cpu", dtype=torch_dtype, enabled=torch_dtype != torch.float32):
                    loss = model(pixels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step == 0:
                    tracker.reset_mod_stats()
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return {str(getattr(kind, "value", kind)).lower(): size / 2**30 for kind, size in peak.items()}


# --------------------------------------------------------------------------- input pipeline


def data_pipeline_throughput(
    image_size: int = 224, num_images: int = 128, device: str = "cpu", batch_size: int = 64, work_dir=None
) -> dict:
    """Images/s of the input pipeline on one CPU core, on tiles of the real sample slide:

    - `read_from_slide_per_core`: read a manifest tile from the slide (tiles not extracted);
    - `decode_saved_tile_per_core`: decode a tile saved by `tile_slides(save_images=True)`;
    - `augment_per_core`: a saved tile through the full CPU `pretrain_transform` (crop, flips,
      rotations, HED and colour jitter, normalisation): a worker's work by default;
    - `worker_for_device_augmentation_per_core`: a saved tile to uint8, a worker's work with
      `--augment-on-device`;
    - `augment_on_device`: `DeviceAugmentation` of whole batches on `device`.
    A training step that needs N img/s needs about N / (per-core figure) DataLoader workers.
    """
    import tempfile

    from ..data.samples import sample_slide_path
    from ..data.tiles import load_tile_dataset
    from ..data.tiling import tile_slides
    from ..data.transforms import device_augmentation_worker_transform, pretrain_transform

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-core figures
    try:
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            tile_slides([sample_slide_path()], tmp, mpp=0.5, tile_size=image_size, min_tissue=0.5, save_images=True)
            mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
            saved = str(Path(tmp) / "tiles")
            pipelines = {
                "read_from_slide_per_core": (str(Path(tmp) / "manifest.parquet"), None),
                "decode_saved_tile_per_core": (saved, None),
                "augment_per_core": (saved, pretrain_transform(image_size, mean, std, seed=0)),
                "worker_for_device_augmentation_per_core": (saved, device_augmentation_worker_transform(image_size)),
            }
            figures = {}
            for name, (source, transform) in pipelines.items():
                dataset = load_tile_dataset(source, transform=transform)
                count = min(num_images, len(dataset))
                for index in range(min(8, count)):  # warm-up: opens the slide, fills the page cache
                    dataset[index]
                start = time.perf_counter()
                for index in range(num_images):
                    dataset[index % count]
                figures[name] = num_images / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)

    figures["augment_on_device"] = device_augmentation_throughput(torch.device(device), image_size, batch_size)
    figures["device"] = describe_device(torch.device(device))
    return figures


def device_augmentation_throughput(
    device: torch.device, image_size: int = 224, batch_size: int = 64, repeats: int = 5
) -> float:
    """Images/s of `DeviceAugmentation` (crop, flips, rotations, HED and colour jitter, normalisation of
    uint8 batches) on `device`: the cost of `--augment-on-device` in the training step."""
    from ..data.transforms import DeviceAugmentation

    augment = DeviceAugmentation(image_size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    tiles = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, device=device)
    for step in range(2 + repeats):
        if step == 2:  # after warm-up
            synchronize(device)
            start = time.perf_counter()
        augment(tiles)
    synchronize(device)
    return batch_size * repeats / (time.perf_counter() - start)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_report(report: BenchmarkReport) -> str:
    """Markdown tables for the terminal and docs/performance.md."""
    lines = [
        f"device: {report.device}; dtype: {report.dtype}; measured matmul peak: {report.matmul_peak_tflops:.3g} TFLOP/s",
        "",
        "| objective | implementation | batch | img/s | step ms | model TFLOP/s | MFU | peak GiB | loss diff vs transformers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.results:
        if r.error:
            lines.append(f"| {r.objective} | {r.variant} | {r.batch_size} | failed: {r.error} | | | | | |")
            continue
        memory = f"{r.peak_memory_gib:.1f}" if r.peak_memory_gib is not None else "-"
        difference = f"{r.loss_difference:.2e}" if r.loss_difference is not None else "-"
        lines.append(f"| {r.objective} | {r.variant} | {r.batch_size} | {r.img_per_s:,.1f} | {r.step_ms:.1f} | "
                     f"{r.model_tflops:.3g} | {100 * r.mfu:.1f}% | {memory} | {difference} |")
    lines.append("")
    for objective, rows in report.ratios.items():
        for ours, versus in rows.items():
            against = "; ".join(f"{ratio:.2f}x {theirs}" for theirs, ratio in versus.items())
            lines.append(f"{objective}: {ours} vs {against}")
        lines.append(f"{objective}: fp32 CPU loss difference for one shared mask = "
                     f"{report.loss_difference_fp32[objective]:.2e}"
                     + (" (the reference masks only its input: the difference is what leaks through its convolutions)"
                        if objective == "fcmae" else ""))
    if report.device_augmentation_img_per_s:
        lines.append(f"augmentation of uint8 batches on the device (--augment-on-device): "
                     f"{report.device_augmentation_img_per_s:,.0f} img/s")
    return "\n".join(lines)


def save_benchmark_plot(report: BenchmarkReport, path) -> Path:
    """A PNG with one panel per objective: img/s of every row that ran, each bar labelled with its MFU
    and its speed relative to the first transformers row (eager, when eager ran)."""
    from ..plotting import new_figure, save_png

    objectives = list(dict.fromkeys(r.objective for r in report.results))
    if not objectives:
        raise ValueError("the report has no results to plot")
    heights = [1 + 0.45 * sum(r.objective == o for r in report.results) for o in objectives]
    figure = new_figure(figsize=(8, sum(heights)))
    axes = figure.subplots(len(objectives), 1, squeeze=False, gridspec_kw={"height_ratios": heights})
    for axis, objective in zip(axes[:, 0], objectives):
        rows = [r for r in report.results if r.objective == objective and r.error is None]
        baseline = next((r.img_per_s for r in rows if r.implementation == "transformers"), None)
        colours = ["tab:grey" if r.implementation == "transformers" else "tab:blue" for r in rows]
        bars = axis.barh([r.variant for r in rows], [r.img_per_s for r in rows], color=colours)
        for bar, row in zip(bars, rows):
            relative = f", {row.img_per_s / baseline:.2f}x" if baseline else ""
            axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {100 * row.mfu:.0f}% MFU{relative}",
                      va="center", fontsize=8)  # fmt: skip
        axis.invert_yaxis()  # rows top to bottom in run order
        axis.set_xlim(0, 1.3 * max([r.img_per_s for r in rows], default=1))
        axis.set_xlabel("images / s (training step)")
        axis.set_title(f"{objective}, batch {rows[0].batch_size if rows else '?'}", fontsize=10)
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle(f"{report.device}, {report.dtype}", fontsize=10)
    figure.tight_layout()
    return save_png(figure, path)


__all__ = [
    "run_benchmark", "standard_variants", "Variant", "estimate_training_memory", "data_pipeline_throughput", "device_augmentation_throughput",
    "format_report", "save_benchmark_plot", "training_flops_per_image", "transformer_macs", "BenchmarkReport",
]


# --------------------------------------------------------------------------- feature extraction


def real_tile_pixels(image_size: int, num_tiles: int, mpp: float = 0.5) -> tuple[torch.Tensor, str]:
    """(num_tiles, 3, S, S) normalised tissue tiles of the real sample slide (repeated when it has fewer), and
    where they come from. Both extraction rows run on this same tensor."""
    from ..data.samples import sample_slide_path
    from ..data.slides import open_slide
    from ..data.tiling import tile_manifest
    from ..data.tissue import detect_tissue
    from ..mim.image_processing_histomim import image_processor_for

    with open_slide(sample_slide_path()) as slide:
        manifest = tile_manifest(slide, detect_tissue(slide), mpp=mpp, tile_size=image_size, min_tissue=0.5)
        rows = [manifest.iloc[i % len(manifest)] for i in range(num_tiles)]
        tiles = [slide.read_tile((int(r.x), int(r.y)), int(r.level), int(r.read_size), image_size) for r in rows]
    processor = image_processor_for(HistoMIMConfig(image_size=image_size))
    pixels = processor(images=tiles, return_tensors="pt")["pixel_values"]  # (N, 3, S, S)
    return pixels, f"{len(manifest)} tissue tiles of {sample_slide_path().name} at {mpp} um/px, {image_size} px"


@torch.inference_mode()
def time_extractions(models: dict[str, torch.nn.Module], pixels: torch.Tensor, batch_size: int, dtype: str,
                     repeats: int, device: torch.device) -> dict[str, float]:  # fmt: skip
    """Tiles/s of each encoder's forward over ``pixels`` in batches: one untimed pass each, then ``repeats``
    rounds in which every model makes one timed pass, the order reversed every other round (A B, B A, ...), so
    that neither always runs first or last (warm caches, clock boost, a neighbour's load hit both alike).
    The best pass of each, as timeit does, since a shared machine only ever adds time."""
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    autocast = dtype != "fp32"  # as histomim extract: bf16 autocast on a GPU

    def one_pass(model: torch.nn.Module) -> float:
        start = time.perf_counter()
        for first in range(0, len(pixels), batch_size):
            batch = pixels[first : first + batch_size].to(device, non_blocking=True)  # (B, 3, S, S)
            with torch.autocast(device.type, dtype=torch_dtype, enabled=autocast):
                model(pixel_values=batch)
        synchronize(device)
        return time.perf_counter() - start

    names = list(models)
    for name in names:  # warm-up: allocator, kernels, lazily built caches
        one_pass(models[name])
    times = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            times[name].append(one_pass(models[name]))
    return {name: len(pixels) / min(times[name]) for name in names}


def extraction_throughput(config: HistoMIMConfig, device: str = "cpu", batch_size: int = 64, num_tiles: int = 256,
                          dtype: str = "fp32", repeats: int = 3) -> dict:  # fmt: skip
    """Tile-embedding throughput of `HistoMIMModel` against a plain transformers `ViTModel` of the same size
    holding the same weights (`histomim.export.to_vit`), on the same real tiles: tiles/s of each, the ratio
    histomim / ViT, and the largest difference of their final hidden states (fp32: the exactness check)."""
    from ..export import to_vit
    from ..mim.modeling_histomim import HistoMIMModel

    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        histomim = HistoMIMModel(config).eval()
    vit = to_vit(histomim).eval()
    pixels, source = real_tile_pixels(config.image_size, num_tiles)
    with torch.inference_mode():
        sample = pixels[:4]
        difference = (histomim(sample).last_hidden_state - vit(pixel_values=sample).last_hidden_state).abs().max().item()
    histomim, vit = histomim.to(device), vit.to(device)
    speeds = time_extractions({"histomim": histomim, "vit": vit}, pixels, batch_size, dtype, repeats, device)
    figures = {"histomim_tiles_per_s": speeds["histomim"], "vit_tiles_per_s": speeds["vit"]}
    return {**figures, "ratio": figures["histomim_tiles_per_s"] / figures["vit_tiles_per_s"],
            "max_abs_difference": difference, "tiles": source, "num_tiles": num_tiles, "batch_size": batch_size,
            "dtype": dtype, "device": describe_device(device), "repeats": repeats,
            "attn_implementation": {"histomim": histomim.config._attn_implementation,
                                    "vit": vit.config._attn_implementation}}  # fmt: skip
