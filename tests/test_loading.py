"""The three ways users load a histomim model, plus save/load round trips and the ViT adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    ViTMAEConfig,
    ViTMAEForPreTraining,
)

import histomim
from histomim import HistoMIMForPreTraining, HistoMIMModel, image_processor_for
from histomim.export import from_vit_mae, to_vit

from conftest import make_hub_cache, tiny_config

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A saved tiny MAE model with its image processor, plus reference encoder outputs."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("saved")
    model = HistoMIMForPreTraining(tiny_config()).eval()
    model.save_pretrained(folder)
    image_processor_for(model.config).save_pretrained(folder)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model.histomim(pixels).last_hidden_state
    save_file({"pixels": pixels, "reference": reference}, str(folder.parent / "reference.safetensors"))
    return folder, model, pixels, reference


def test_saved_folder_carries_weights_code_and_processor(saved_model):
    folder, *_ = saved_model
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "modeling_histomim.py",
            "configuration_histomim.py", "masking.py"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in names)  # safetensors only
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_histomim.HistoMIMModel"


def test_round_trip_gives_identical_outputs(saved_model):
    folder, model, pixels, reference = saved_model
    noise = torch.rand(2, 16)
    reloaded = HistoMIMForPreTraining.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixels, noise=noise).loss, model(pixels, noise=noise).loss)
        assert torch.equal(reloaded.histomim(pixels).last_hidden_state, reference)


def test_auto_classes_with_histomim_installed(saved_model):
    folder, _, pixels, reference = saved_model
    assert isinstance(AutoConfig.from_pretrained(folder), histomim.HistoMIMConfig)
    encoder = AutoModel.from_pretrained(folder).eval()
    assert type(encoder) is HistoMIMModel
    with torch.no_grad():
        assert torch.equal(encoder(pixels).last_hidden_state, reference)
    assert type(AutoModelForPreTraining.from_pretrained(folder)) is HistoMIMForPreTraining
    classifier = AutoModelForImageClassification.from_pretrained(folder, num_labels=4)
    assert classifier.classifier.out_features == 4
    processor = AutoImageProcessor.from_pretrained(folder)
    batch = processor(torch.randint(0, 255, (100, 120, 3), dtype=torch.uint8).numpy(), return_tensors="pt")
    assert batch["pixel_values"].shape == (1, 3, 64, 64)


def test_presets_load_with_auto_config():
    for name, width, depth in (("histomim-vit-tiny16", 192, 12), ("histomim-vits16", 384, 12),
                               ("histomim-vitb16", 768, 12), ("histomim-vitl16", 1024, 24)):
        config = AutoConfig.from_pretrained(REPO_ROOT / "hub_configs" / name)
        assert (config.hidden_size, config.num_hidden_layers, config.patch_size) == (width, depth, 16)
    vitb = AutoConfig.from_pretrained(REPO_ROOT / "hub_configs" / "histomim-vitb16")
    assert (vitb.decoder_hidden_size, vitb.decoder_num_hidden_layers, vitb.decoder_num_attention_heads) == (512, 8, 16)
    processor = AutoImageProcessor.from_pretrained(REPO_ROOT / "hub_configs" / "histomim-vitb16")
    assert processor.size == {"height": 224, "width": 224}


# Prepended to every snippet run by `run_without_histomim`: a fresh Python where `import histomim` fails,
# so only the files saved with a model may be used.
BLOCK_HISTOMIM = textwrap.dedent(
    """
    import sys
    sys.path = [p for p in sys.path if p not in ("", {repo!r}) and "__editable__" not in p]
    sys.modules["histomim"] = None  # blocks the package and any editable finder
    try:
        import histomim
    except ImportError:
        pass
    else:
        raise SystemExit("histomim is importable")
    import torch
    torch.set_num_threads(1)  # as in the test process (conftest), so outputs can be compared bit for bit
    """
)


def run_without_histomim(code: str, env: dict | None = None) -> str:
    """Run the Python snippet `code` where histomim cannot be imported; assert it succeeds, return its stdout."""
    program = BLOCK_HISTOMIM.format(repo=str(REPO_ROOT)) + textwrap.dedent(code)
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd="/", env={**os.environ, **(env or {})}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def load_encoder_snippet(source: str, reference: Path) -> str:
    """Load a saved encoder with trust_remote_code and check its outputs against `reference`."""
    return textwrap.dedent(
        f"""
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoImageProcessor
        data = load_file({str(reference)!r})
        model = AutoModel.from_pretrained({source!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "HistoMIMModel", type(model)
        assert "histomim" not in type(model).__module__.split(".")[0]
        with torch.no_grad():
            out = model(data["pixels"]).last_hidden_state
        assert torch.equal(out, data["reference"]), (out - data["reference"]).abs().max()
        AutoImageProcessor.from_pretrained({source!r})
        print("LOADED", type(model).__module__)
        """
    )


def test_trust_remote_code_from_folder_without_histomim(saved_model, tmp_path):
    folder, *_ = saved_model
    out = run_without_histomim(load_encoder_snippet(str(folder), folder.parent / "reference.safetensors"),
                               env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert "LOADED transformers_modules" in out


def test_repo_id_resolves_from_offline_hub_cache(saved_model, tmp_path):
    folder, _, pixels, reference = saved_model
    cache = tmp_path / "hub"
    make_hub_cache(folder, cache, "org/histomim-vitb")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    # with histomim installed (registered Auto classes) ...
    code = textwrap.dedent(
        f"""
        import torch, histomim
        from safetensors.torch import load_file
        from transformers import AutoModel
        data = load_file({str(folder.parent / "reference.safetensors")!r})
        model = AutoModel.from_pretrained("org/histomim-vitb").eval()
        assert type(model) is histomim.HistoMIMModel
        assert torch.equal(model(data["pixels"]).last_hidden_state, data["reference"])
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr
    # ... and without it, through the code stored in the repo
    out = run_without_histomim(load_encoder_snippet("org/histomim-vitb", folder.parent / "reference.safetensors"), env=env)
    assert "LOADED transformers_modules" in out


def test_to_vit_matches_histomim_outputs():
    from transformers import ViTModel

    torch.manual_seed(0)
    encoder = HistoMIMModel(tiny_config(qkv_bias=True)).eval()
    vit = to_vit(encoder)
    assert isinstance(vit, ViTModel) and vit.config.model_type == "vit"
    for size in (64, 96):
        pixels = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ours = encoder(pixels, interpolate_pos_encoding=size != 64).last_hidden_state
            theirs = vit(pixels, interpolate_pos_encoding=size != 64).last_hidden_state
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)  # stated tolerance: fp32, 1e-5
    with pytest.raises(ValueError, match="register"):
        to_vit(HistoMIMModel(tiny_config(num_register_tokens=2)))


def test_to_vit_saved_model_loads_without_remote_code(tmp_path):
    encoder = HistoMIMModel(tiny_config()).eval()
    to_vit(encoder).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "vit" and "auto_map" not in config
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).last_hidden_state, encoder(pixels).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_from_vit_mae_matches_transformers(tmp_path, norm_pix_loss):
    torch.manual_seed(0)
    config = ViTMAEConfig(
        image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, decoder_hidden_size=32, decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4, decoder_intermediate_size=64, norm_pix_loss=norm_pix_loss,
    )
    reference = ViTMAEForPreTraining(config)
    with torch.no_grad():  # non-trivial weights everywhere (fresh transformers MAE leaves some zeros)
        for parameter in reference.parameters():
            parameter.normal_(0, 0.1)
    reference.save_pretrained(tmp_path)
    model = from_vit_mae(tmp_path).eval()
    reference.eval()
    pixels, noise = torch.randn(3, 3, 64, 64), torch.rand(3, 16)
    with torch.no_grad():
        theirs, ours = reference(pixels, noise=noise), model(pixels, noise=noise)
        torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(ours.mask, theirs.mask)
        torch.testing.assert_close(model.histomim.norm.weight, reference.vit.layernorm.weight)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        from_vit_mae(tmp_path / "missing")
