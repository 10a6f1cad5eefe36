"""Checkpoints saved before issue 10 (tests/fixtures, made by tests/fixtures/make_fixtures.py at a9a95e3) load by
all three routes and compute what they computed then: the package, remote code without histomim (from a folder
and an offline Hub cache), and the plain-ViT export."""

from __future__ import annotations

import functools
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

from histomim import HistoMIMForImageClassification, HistoMIMForPreTraining, HistoMIMModel
from histomim.export import to_vit

# the same weights and inputs give the same outputs up to float rounding, which differs between CPUs (SIMD widths)
close = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-6)

from test_loading import make_hub_cache, run_without_histomim

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CODE_DIR = Path(__file__).resolve().parents[1] / "histomim" / "mim"
EXPECTED = FIXTURES / "expected_outputs.safetensors"
OBJECTIVES = ("mae", "simmim")


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(EXPECTED)


def encoder_outputs(encoder, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = encoder(pixels)
        larger = encoder(torch.nn.functional.interpolate(pixels, size=48), interpolate_pos_encoding=True)
    return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output,
            "last_hidden_state_48px": larger.last_hidden_state}  # fmt: skip


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_old_checkpoint_loads_with_the_package(objective, expected):
    folder = FIXTURES / f"histomim-{objective}-tiny"
    pretraining, info = HistoMIMForPreTraining.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    with torch.no_grad():
        out = pretraining.eval()(expected["pixels"], noise=expected[f"{objective}.noise"])
    for name in ("loss", "logits", "mask"):
        close(getattr(out, name), expected[f"{objective}.{name}"], msg=name)

    encoder = AutoModel.from_pretrained(folder).eval()
    assert type(encoder) is HistoMIMModel and encoder.embeddings.mask_token is None
    for name, value in encoder_outputs(encoder, expected["pixels"]).items():
        close(value, expected[f"{objective}.{name}"], msg=name)

    # a classifier from the checkpoint: the objective head and mask token are left behind, quietly
    classifier, info = AutoModelForImageClassification.from_pretrained(folder, num_labels=2, output_loading_info=True)
    assert type(classifier) is HistoMIMForImageClassification
    assert not info["unexpected_keys"] and set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    close(encoder_outputs(classifier.histomim.eval(), expected["pixels"])["pooler_output"],
          expected[f"{objective}.pooler_output"])  # fmt: skip


def folder_with_current_code(objective: str, destination: Path) -> Path:
    """The old checkpoint's files next to today's code files, as a re-published Hub repo holds them."""
    destination.mkdir(parents=True)
    for file in (FIXTURES / f"histomim-{objective}-tiny").iterdir():
        shutil.copy(file, destination / file.name)
    for name in ("configuration_histomim.py", "modeling_histomim.py", "masking.py"):
        shutil.copy(CODE_DIR / name, destination / name)
    return destination


def remote_code_snippet(source: str, objective: str) -> str:
    return textwrap.dedent(
        f"""
        import functools
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoModelForPreTraining
        data = load_file({str(EXPECTED)!r})
        encoder = AutoModel.from_pretrained({source!r}, trust_remote_code=True).eval()
        assert "histomim" not in type(encoder).__module__.split(".")[0], type(encoder).__module__
        pretraining = AutoModelForPreTraining.from_pretrained({source!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            out = encoder(data["pixels"])
            loss = pretraining(data["pixels"], noise=data["{objective}.noise"]).loss
        close = functools.partial(torch.testing.assert_close, rtol=1e-5, atol=1e-6)
        close(out.last_hidden_state, data["{objective}.last_hidden_state"])
        close(out.pooler_output, data["{objective}.pooler_output"])
        close(loss, data["{objective}.loss"])
        print("LOADED", type(encoder).__module__)
        """
    )


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_old_checkpoint_loads_with_remote_code_without_histomim(objective, tmp_path):
    folder = folder_with_current_code(objective, tmp_path / "model")
    modules = {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    assert "LOADED transformers_modules" in run_without_histomim(remote_code_snippet(str(folder), objective), env=modules)

    cache = tmp_path / "hub"
    make_hub_cache(folder, cache, f"org/histomim-{objective}")
    env = {**modules, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    assert "LOADED transformers_modules" in run_without_histomim(remote_code_snippet(f"org/histomim-{objective}", objective), env=env)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_old_checkpoint_exports_to_plain_vit(objective, expected):
    encoder = AutoModelForPreTraining.from_pretrained(FIXTURES / f"histomim-{objective}-tiny")
    vit = to_vit(encoder)
    with torch.no_grad():
        theirs = vit(expected["pixels"]).last_hidden_state
    torch.testing.assert_close(theirs, expected[f"{objective}.last_hidden_state"], atol=1e-5, rtol=1e-5)
