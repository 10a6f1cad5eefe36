"""Side-by-side training-step benchmark: histomim vs transformers' own MIM models, in one process.

For each objective the reference model is built from the preset, and the histomim model is imported
from it (`histomim.export`), so both hold the same weights. Each then runs the same training step
(forward + backward + AdamW, fused on CUDA; bf16 autocast on GPU) on the same random batch and mask
ratio. Reported per implementation: img/s, step time, model TFLOP/s, MFU against a matmul peak measured
in the same run, peak memory, and the histomim/reference ratio; plus the loss difference for one
shared mask in fp32 (exactness).

FLOPs are counted analytically as 6 x multiply-accumulates of the forward matmuls (QKV/proj/MLP,
attention scores and values, patch embedding, decoder embedding and prediction): 2 FLOPs per MAC,
forward + backward = 3 x forward. MAE's encoder sees 1 + K tokens, its decoder 1 + L.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from .export import from_vit_mae, from_vit_simmim, vit_encoder_settings
from .mim.configuration_histomim import HistoMIMConfig
from .mim.masking import block_random_mask, num_visible_patches


# --------------------------------------------------------------------------- FLOP counting


def transformer_macs(tokens: int, dim: int, mlp_dim: int, depth: int) -> int:
    """Multiply-accumulates of `depth` pre-norm blocks over `tokens` tokens."""
    projections = tokens * (4 * dim * dim + 2 * dim * mlp_dim)  # qkv (3) + proj (1), fc1 + fc2
    attention = 2 * tokens * tokens * dim  # QK^T and attention x V
    return depth * (projections + attention)


def training_flops_per_image(config: HistoMIMConfig) -> float:
    """6 x forward MACs of one image's training step for `config`'s objective."""
    patches = config.num_patches
    pixels_per_patch = config.patch_size**2 * config.num_channels
    macs = patches * pixels_per_patch * config.hidden_size  # patch embedding (all patches)
    if config.objective == "mae":
        visible = num_visible_patches(patches, config.mask_ratio)
        dec = config.decoder_hidden_size
        macs += transformer_macs(1 + visible, config.hidden_size, config.intermediate_size, config.num_hidden_layers)
        macs += (1 + visible) * config.hidden_size * dec  # decoder embedding
        macs += transformer_macs(1 + patches, dec, config.decoder_intermediate_size, config.decoder_num_hidden_layers)
        macs += (1 + patches) * dec * pixels_per_patch  # prediction
    else:
        macs += transformer_macs(1 + patches, config.hidden_size, config.intermediate_size, config.num_hidden_layers)
        macs += patches * config.hidden_size * pixels_per_patch  # SimMIM head
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


def reference_and_histomim(config: HistoMIMConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """transformers' model for `config.objective` and the histomim model holding the same weights."""
    from transformers import ViTConfig, ViTForMaskedImageModeling, ViTMAEConfig, ViTMAEForPreTraining

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
    reference = ViTForMaskedImageModeling(ViTConfig(**shared, encoder_stride=config.patch_size))
    return reference, from_vit_simmim(reference, mask_ratio=config.mask_ratio, mask_patch_size=config.mask_patch_size)


def objective_config(config: HistoMIMConfig, objective: str) -> HistoMIMConfig:
    """`config` with `objective`; switching objective takes that objective's usual settings
    (MAE: 75% of 16 px patches, normalized targets; SimMIM: 60% of 32 px blocks, raw pixels)."""
    if objective == config.objective:
        return config
    usual = {"mae": dict(mask_ratio=0.75, mask_patch_size=None, norm_pix_loss=True),
             "simmim": dict(mask_ratio=0.6, mask_patch_size=None, norm_pix_loss=False)}[objective]
    return HistoMIMConfig(**{**config.to_dict(), "objective": objective, **usual})


def reference_inputs(config: HistoMIMConfig, batch: int, device: torch.device) -> dict:
    """Inputs transformers' models need for one step: MAE masks internally, SimMIM takes a mask."""
    if config.objective == "mae":
        return {}
    grid = config.image_size // config.patch_size
    return {"bool_masked_pos": block_random_mask(batch, grid, config.mask_patch_size, config.patch_size,
                                                 config.mask_ratio, device=device)}


def loss_difference(config: HistoMIMConfig, batch: int = 4) -> float:
    """|loss_histomim - loss_transformers| in fp32 on the CPU for one shared mask (exactness check)."""
    reference, ours = (m.float().eval() for m in reference_and_histomim(config))
    pixels = torch.randn(batch, config.num_channels, config.image_size, config.image_size)
    if config.objective == "mae":
        masking = {"noise": torch.rand(batch, config.num_patches)}
    else:
        masking = reference_inputs(config, batch, torch.device("cpu"))
    with torch.no_grad():
        return abs(reference(pixels, **masking).loss.item() - ours(pixels, **masking).loss.item())


# --------------------------------------------------------------------------- timing


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
    compiled: bool = False


def time_training_steps(model, inputs_fn, pixels, device, dtype, steps, warmup) -> list[float]:
    """Seconds per training step (forward + backward + AdamW) after `warmup` steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    for step in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss = model(pixels, **inputs_fn()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return times


@dataclass
class BenchmarkReport:
    device: str
    dtype: str
    matmul_peak_tflops: float
    results: list[Result] = field(default_factory=list)
    ratios: dict = field(default_factory=dict)
    loss_difference_fp32: dict = field(default_factory=dict)
    flops_per_image: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def run_benchmark(
    config: HistoMIMConfig,
    objectives: tuple[str, ...] = ("mae", "simmim"),
    device: str = "cuda",
    batch_size: int = 256,
    steps: int = 15,
    warmup: int = 3,
    dtype: str = "bf16",
    compile: bool = False,
    peak_matmul_size: int = 8192,
    progress: bool = True,
) -> BenchmarkReport:
    """Benchmark histomim against transformers for each objective on one device, same config and batch."""
    from tqdm.auto import tqdm

    torch_device = torch.device(device)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    peak = measure_matmul_peak(torch_device, torch_dtype if torch_device.type == "cuda" else torch.float32, peak_matmul_size)
    report = BenchmarkReport(device=describe_device(torch_device), dtype=dtype, matmul_peak_tflops=peak / 1e12)

    jobs = [(objective, name) for objective in objectives for name in ("transformers", "histomim")]
    for objective, name in tqdm(jobs, desc="benchmark", disable=not progress):
        run_config = objective_config(config, objective)
        if name == "transformers":
            report.loss_difference_fp32[objective] = loss_difference(run_config)
            report.flops_per_image[objective] = training_flops_per_image(run_config)
        torch.manual_seed(0)
        reference, ours = reference_and_histomim(run_config)
        model = (reference if name == "transformers" else ours).to(torch_device).train()
        del reference, ours
        if compile:
            model = torch.compile(model)
        pixels = torch.randn(batch_size, run_config.num_channels, run_config.image_size, run_config.image_size,
                             device=torch_device)
        inputs_fn = lambda: reference_inputs(run_config, batch_size, torch_device)  # noqa: E731
        if torch_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(torch_device)
        step_s = statistics.median(time_training_steps(model, inputs_fn, pixels, torch_device, torch_dtype, steps, warmup))
        flops = report.flops_per_image[objective] * batch_size / step_s
        report.results.append(Result(
            implementation=name, objective=objective, batch_size=batch_size, img_per_s=batch_size / step_s,
            step_ms=1000 * step_s, model_tflops=flops / 1e12, mfu=flops / peak, compiled=compile,
            peak_memory_gib=torch.cuda.max_memory_allocated(torch_device) / 2**30 if torch_device.type == "cuda" else None,
        ))
        del model
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()

    for objective in objectives:
        speed = {r.implementation: r.img_per_s for r in report.results if r.objective == objective}
        report.ratios[objective] = speed["histomim"] / speed["transformers"]
    return report


# --------------------------------------------------------------------------- input pipeline


def data_pipeline_throughput(
    image_size: int = 224, num_images: int = 128, device: str = "cpu", batch_size: int = 64, work_dir=None
) -> dict:
    """Images/s of the input pipeline on one CPU core, on tiles of the real sample slide:

    - `decode_per_core`: read a tile region from the slide and resize it (no augmentation);
    - `augment_per_core`: the full CPU `pretrain_transform` (crop, flips, rotations, HED and colour jitter);
    - `augment_without_stain_per_core`: the same with stain/colour jitter left to the accelerator;
    - `stain_jitter_on_device`: batched HED + colour jitter (`hed_jitter_batch`, `color_jitter_batch`) on `device`.
    A training step that needs N img/s needs about N / augment_per_core DataLoader workers.
    """
    import tempfile

    from .data.samples import sample_slide_path
    from .data.tiles import load_tile_dataset
    from .data.tiling import tile_slides
    from .data.transforms import color_jitter_batch, hed_jitter_batch, pretrain_transform

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per-core figures
    try:
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            tile_slides([sample_slide_path()], tmp, mpp=0.5, tile_size=image_size, min_tissue=0.5)
            mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
            pipelines = {
                "decode_per_core": None,
                "augment_per_core": pretrain_transform(image_size, mean, std, seed=0),
                "augment_without_stain_per_core": pretrain_transform(
                    image_size, mean, std, hed_sigma=0, hed_bias=0, brightness=0, contrast=0, saturation=0, seed=0),
            }
            figures = {}
            for name, transform in pipelines.items():
                dataset = load_tile_dataset(tmp, transform=transform)
                count = min(num_images, len(dataset))
                for index in range(min(8, count)):  # warm-up: opens the slide, fills the page cache
                    dataset[index]
                start = time.perf_counter()
                for index in range(count):
                    dataset[index]
                figures[name] = count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)

    torch_device = torch.device(device)
    pixels = torch.rand(batch_size, 3, image_size, image_size, device=torch_device)  # (B, 3, H, W) in [0, 1]
    repeats = 5
    for step in range(2 + repeats):
        if step == 2:  # after warm-up
            synchronize(torch_device)
            start = time.perf_counter()
        color_jitter_batch(hed_jitter_batch(pixels))
    synchronize(torch_device)
    figures["stain_jitter_on_device"] = batch_size * repeats / (time.perf_counter() - start)
    figures["device"] = describe_device(torch_device)
    return figures


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_report(report: BenchmarkReport) -> str:
    """A markdown table for the terminal and docs/performance.md."""
    lines = [
        f"device: {report.device}; dtype: {report.dtype}; measured matmul peak: {report.matmul_peak_tflops:.3g} TFLOP/s",
        "",
        "| objective | implementation | batch | img/s | step ms | model TFLOP/s | MFU | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report.results:
        memory = f"{r.peak_memory_gib:.1f}" if r.peak_memory_gib is not None else "-"
        lines.append(f"| {r.objective} | {r.implementation}{' (compiled)' if r.compiled else ''} | {r.batch_size} | "
                     f"{r.img_per_s:,.1f} | {r.step_ms:.1f} | {r.model_tflops:.3g} | {100 * r.mfu:.1f}% | {memory} |")
    lines.append("")
    for objective, ratio in report.ratios.items():
        lines.append(f"{objective}: histomim / transformers = {ratio:.2f}x; "
                     f"fp32 loss difference for one shared mask = {report.loss_difference_fp32[objective]:.2e}")
    return "\n".join(lines)


__all__ = ["run_benchmark", "data_pipeline_throughput", "format_report", "training_flops_per_image", "transformer_macs", "BenchmarkReport"]
