"""The benchmark's FLOP model and its CPU smoke run (timings themselves are not asserted here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from histomim import HistoMIMConfig
from histomim.benchmark import training_flops_per_image

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_flop_model_matches_the_measured_reference_figures():
    """shared/PERFORMANCE_NOTES.md: transformers' ViT-B/16 MAE ran 3,491 img/s = 200 model TFLOP/s, i.e.
    57.3 GFLOP per image per step by its count; ours must agree within 5%."""
    config = HistoMIMConfig.from_pretrained(REPO_ROOT / "hub_configs" / "histomim-vitb16")
    assert training_flops_per_image(config) == pytest.approx(200e12 / 3491, rel=0.05)
    # SimMIM ViT-B: 2,540 img/s = 266 TFLOP/s in the table
    simmim = HistoMIMConfig.from_pretrained(REPO_ROOT / "hub_configs" / "histomim-vitb16-simmim")
    assert training_flops_per_image(simmim) == pytest.approx(266e12 / 2540, rel=0.05)


def test_cpu_smoke_run_writes_a_report_with_exact_losses(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_script", REPO_ROOT / "scripts" / "benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "bench.json"
    script.main(["--device", "cpu", "--preset", "histomim-vit-tiny16", "--image-size", "64", "--batch-size", "4",
                 "--dtype", "fp32", "--steps", "2", "--warmup", "1", "--peak-matmul-size", "256", "--data-pipeline", "--json", str(out)])
    report = json.loads(out.read_text())
    assert {(r["objective"], r["implementation"]) for r in report["results"]} == {
        ("mae", "transformers"), ("mae", "histomim"), ("simmim", "transformers"), ("simmim", "histomim")}
    assert all(r["img_per_s"] > 0 and 0 < r["mfu"] for r in report["results"])
    assert set(report["ratios"]) == {"mae", "simmim"}
    # exactness: same weights, same mask, fp32 on CPU -> the same loss to 1e-5
    assert all(diff < 1e-5 for diff in report["loss_difference_fp32"].values())
    assert "histomim / transformers" in capsys.readouterr().out
    pipeline = report["data_pipeline"]
    for name in ("decode_per_core", "augment_per_core", "augment_without_stain_per_core", "stain_jitter_on_device"):
        assert pipeline[name] > 0, name
