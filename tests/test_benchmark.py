"""The benchmark's FLOP model and its CPU smoke run (timings themselves are not asserted here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from histomim import HistoMIMConfig
from histomim.training.benchmark import training_flops_per_image

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_flop_model_matches_the_measured_reference_figures():
    """docs/performance.md, "Reference figures": transformers' ViT-B/16 MAE ran 3,491 img/s = 200 model TFLOP/s, i.e.
    57.3 GFLOP per image per step by its count; ours must agree within 5%."""
    config = HistoMIMConfig.from_pretrained(REPO_ROOT / "hub_configs" / "histomim-vitb16")
    assert training_flops_per_image(config) == pytest.approx(200e12 / 3491, rel=0.05)
    # SimMIM ViT-B: 2,540 img/s = 266 TFLOP/s, the same table
    simmim = HistoMIMConfig.from_pretrained(REPO_ROOT / "hub_configs" / "histomim-vitb16-simmim")
    assert training_flops_per_image(simmim) == pytest.approx(266e12 / 2540, rel=0.05)


def test_cpu_smoke_run_writes_a_report_with_exact_losses(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_script", REPO_ROOT / "scripts" / "benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "bench.json"
    script.main(["--device", "cpu", "--preset", "histomim-vit-tiny16", "--image-size", "64", "--batch-size", "4",
                 "--dtype", "fp32", "--steps", "2", "--warmup", "1", "--peak-matmul-size", "256", "--data-pipeline",
                 "--ablations", "--json", str(out), "--plot", str(tmp_path / "bench.png")])
    report = json.loads(out.read_text())
    rows = {(r["objective"], r["variant"]): r for r in report["results"]}
    variants = ["transformers", "histomim", "histomim, attention without SDPA", "histomim, unfused AdamW"]
    assert set(rows) == {(objective, variant) for objective in ("mae", "simmim", "beit") for variant in variants}
    assert all(r["error"] is None and r["img_per_s"] > 0 and 0 < r["mfu"] for r in rows.values())
    # every histomim row is compared with the transformers row
    assert set(report["ratios"]["mae"]) == set(variants[1:])
    assert report["ratios"]["mae"]["histomim"]["transformers"] == pytest.approx(
        rows["mae", "histomim"]["img_per_s"] / rows["mae", "transformers"]["img_per_s"])
    # exactness: same weights, same mask, fp32 -> the same loss to 1e-5, for every histomim variant
    assert all(diff < 1e-5 for diff in report["loss_difference_fp32"].values())
    assert all(r["loss_difference"] < 1e-5 for r in rows.values() if r["implementation"] == "histomim")
    assert "histomim vs" in capsys.readouterr().out
    assert report["device_augmentation_img_per_s"] > 0
    with Image.open(tmp_path / "bench.png") as plot:
        assert plot.format == "PNG" and plot.size[1] > plot.size[0] / 2  # three panels of four bars
    pipeline = report["data_pipeline"]
    for name in ("read_from_slide_per_core", "decode_saved_tile_per_core", "augment_per_core",
                 "worker_for_device_augmentation_per_core", "augment_on_device"):
        assert pipeline[name] > 0, name


def test_beit_row_matches_transformers_beit_exactly_and_counts_its_codebook_head():
    """BEiT against transformers' BeitForMaskedImageModeling: the same weights, block-wise mask and codes give the
    same fp32 loss (about ln 8192 before training), and a weight change shows in histomim's loss."""
    import torch

    from histomim.training.benchmark import (
        BEIT_CODEBOOK_SIZE, objective_config, reference_and_histomim, shared_mask_loss,
    )  # fmt: skip

    tiny = HistoMIMConfig.from_pretrained(REPO_ROOT / "hub_configs" / "histomim-vit-tiny16", image_size=64)
    config = objective_config(tiny, "beit")
    assert (config.objective, config.mask_ratio, config.codebook_size) == ("beit", 0.4, BEIT_CODEBOOK_SIZE)
    torch.manual_seed(0)
    reference, ours = (model.eval() for model in reference_and_histomim(config))
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    theirs, mine = (shared_mask_loss(model, config, pixels, torch.float32) for model in (reference, ours))
    assert abs(theirs - mine) < 1e-5 and abs(mine - math.log(BEIT_CODEBOOK_SIZE)) < 1.0
    with torch.no_grad():
        ours.histomim.blocks[0].mlp.fc1.weight.mul_(1.5)
    assert abs(shared_mask_loss(ours, config, pixels, torch.float32) - theirs) > 1e-4
    # FLOPs: SimMIM's count with the 8192-way head in place of the pixel head
    simmim = objective_config(tiny, "simmim")
    head_difference = config.num_patches * config.hidden_size * (BEIT_CODEBOOK_SIZE - 16 * 16 * 3)
    assert training_flops_per_image(config) - training_flops_per_image(simmim) == 6 * head_difference


def test_a_row_that_cannot_run_is_reported_and_the_others_still_are(monkeypatch):
    """float8 without torchao: that row carries the error, the rest of the report is complete."""
    import sys

    from histomim.training.benchmark import run_benchmark, standard_variants

    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    config = HistoMIMConfig.from_pretrained(REPO_ROOT / "hub_configs" / "histomim-vit-tiny16", image_size=32)
    report = run_benchmark(config, objectives=("mae",), device="cpu", batch_size=2, steps=1, warmup=0, dtype="fp32",
                           variants=standard_variants(float8=True), peak_matmul_size=64, progress=False)
    failed = [r for r in report.results if r.error]
    assert [r.variant for r in failed] == ["histomim, float8"] and "torchao" in failed[0].error
    assert report.ratios["mae"]["histomim"]["transformers"] > 0


def test_variants_cover_each_compile_mode_and_the_requested_extras():
    from histomim.training.benchmark import standard_variants

    labels = [v.label for v in standard_variants((None, "default"), float8=True, ablations=True)]
    assert labels == ["transformers", "histomim", "transformers, compiled", "histomim, compiled",
                      "histomim, attention without SDPA", "histomim, unfused AdamW", "histomim, compiled, float8"]


def test_memory_estimate_counts_weights_and_optimizer_state_and_grows_with_the_batch():
    """Without a GPU: parameters are counted at 4 bytes each, AdamW's state at least twice that, and
    activations grow nearly in proportion to the batch and shrink under bf16 autocast."""
    from histomim import HistoMIMForPreTraining
    from histomim.training.benchmark import estimate_training_memory

    config = HistoMIMConfig.from_pretrained(REPO_ROOT / "hub_configs" / "histomim-vit-tiny16", image_size=64)
    parameter_gib = sum(p.numel() for p in HistoMIMForPreTraining(config).parameters()) * 4 / 2**30
    small, large = (estimate_training_memory(config, batch, dtype="bf16") for batch in (64, 256))
    fp32 = estimate_training_memory(config, 64, dtype="fp32")
    for estimate in (small, large, fp32):
        assert estimate["parameter"] == pytest.approx(parameter_gib, rel=1e-6)
        assert estimate["optstate"] >= 2 * parameter_gib * (1 - 1e-6)  # exp_avg and exp_avg_sq
        assert estimate["total"] == pytest.approx(sum(v for k, v in estimate.items() if k != "total"))
    assert 3.0 < large["activation"] / small["activation"] <= 4.0
    assert small["activation"] < 0.9 * fp32["activation"]  # matmul outputs are bf16 (norms and residuals stay fp32)


def test_gpu_benchmark_script_runs_its_parts_and_keeps_every_report(tmp_path):
    """scripts/gpu_benchmark.sh, rehearsed on the CPU through EXTRA_ARGS (the last value of a flag wins)."""
    import os
    import subprocess
    import sys

    extra = ("--device cpu --preset histomim-vit-tiny16 --image-size 32 --batch-size 2 --steps 1 --warmup 0 "
             "--compile none --peak-matmul-size 64")  # fmt: skip
    env = {**os.environ, "OUT": str(tmp_path), "EXTRA_ARGS": extra,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3 = this interpreter
    script = REPO_ROOT / "scripts" / "gpu_benchmark.sh"
    result = subprocess.run(["bash", str(script), "vitl"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "vitl.json").read_text())
    assert [r["variant"] for r in report["results"]] == ["transformers", "histomim"]
    assert all(r["error"] is None for r in report["results"])
    assert (tmp_path / "vitl.png").stat().st_size > 0 and "histomim vs" in (tmp_path / "vitl.log").read_text()
    assert "torch" in (tmp_path / "environment.txt").read_text()

    wrong = subprocess.run(["bash", str(script), "vit-huge"], env=env, capture_output=True, text=True, timeout=600)
    assert wrong.returncode == 2 and "unknown part" in wrong.stderr


def test_extraction_mode_times_histomim_and_vit_on_the_same_real_tiles(tmp_path, capsys):
    from histomim.cli.benchmark import main

    out = tmp_path / "extraction.json"
    assert main(["--extraction", "--device", "cpu", "--preset", "histomim-vit-tiny16", "--image-size", "32",
                 "--dtype", "fp32", "--batch-size", "8", "--num-tiles", "16", "--steps", "1", "--json", str(out)]) == 0  # fmt: skip
    figures = json.loads(out.read_text())["extraction"]
    assert figures["histomim_tiles_per_s"] > 0 and figures["vit_tiles_per_s"] > 0
    assert figures["ratio"] == pytest.approx(figures["histomim_tiles_per_s"] / figures["vit_tiles_per_s"])
    assert figures["max_abs_difference"] < 1e-4  # the same weights give the same features
    assert "CMU-1-Small-Region.svs" in figures["tiles"] and figures["num_tiles"] == 16
    assert "transformers ViTModel" in capsys.readouterr().out
    assert set(figures["attn_implementation"]) == {"histomim", "vit"}


def test_extraction_timing_interleaves_the_two_models_in_alternating_order():
    """Timing all of one model's passes, then all of the other's, would give whichever runs second a warmer
    (or a more loaded) machine; the timed passes alternate A B, B A, ... after one untimed pass each."""
    import torch

    from histomim.training.benchmark import time_extractions

    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, pixel_values):
            calls.append(self.name)
            return pixel_values.mean()

    pixels = torch.zeros(6, 3, 8, 8)
    speeds = time_extractions({"a": Recorder("a"), "b": Recorder("b")}, pixels, 3, "fp32", 3, torch.device("cpu"))
    passes = calls[::2]  # two batches of 3 tiles per pass
    assert calls[1::2] == passes  # each pass runs all its batches with one model
    assert passes == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rounds A B, B A, A B
    assert set(speeds) == {"a", "b"} and all(speed > 0 for speed in speeds.values())


def test_cnn_rows_compare_fcmae_with_transformers_convnext():
    """The fcmae rows: histomim's ConvNeXt (the atto preset) beside transformers' ConvNextModel with the same
    weights masking only its input; the FLOP model agrees with torch's FLOP counter on the forward pass."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from histomim import HistoMIMConvNextForPreTraining
    from histomim.training.benchmark import objective_config, run_benchmark

    config = HistoMIMConfig.from_pretrained(REPO_ROOT / "hub_configs" / "histomim-vit-tiny16", image_size=64)
    report = run_benchmark(config, objectives=("fcmae",), device="cpu", batch_size=2, steps=1, warmup=0, dtype="fp32",
                           peak_matmul_size=64, progress=False)
    rows = {r.variant: r for r in report.results}
    assert set(rows) == {"transformers", "histomim"} and all(r.error is None and r.img_per_s > 0 for r in rows.values())
    assert report.ratios["fcmae"]["histomim"]["transformers"] > 0
    # same weights and mask: at initialisation (LayerScale 1e-6) the only difference, what leaks through the
    # reference's depthwise convolutions, is tiny, so a wrong weight mapping would show here
    assert report.loss_difference_fp32["fcmae"] < 1e-4

    cnn = objective_config(config, "fcmae")
    assert (cnn.model_type, cnn.image_size, cnn.hidden_sizes) == ("histomim_convnext", 64, [40, 80, 160, 320])
    with FlopCounterMode(display=False) as counter:
        HistoMIMConvNextForPreTraining(cnn)(torch.randn(1, 3, 64, 64))
    assert training_flops_per_image(cnn) == pytest.approx(3 * counter.get_total_flops(), rel=0.05)
