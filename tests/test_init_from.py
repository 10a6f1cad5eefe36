"""`histomim pretrain --init-from`: the encoder starts from a saved histomim model (folder or Hub id) or from
timm-layout ViT weights, on real tiles of the sample slide, and the card names the base model."""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from huggingface_hub import ModelCard, constants
from safetensors.torch import save_file
from transformers import AutoModel

from histomim import HistoMIMModel
from histomim.training.pretrain import PretrainArguments, load_model_config, pretrain

from conftest import make_hub_cache, save_tiny_encoder, tiny_config
from test_convert_timm import HEADS, IMAGE, timm_reference_forward, timm_state_dict


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def preset_dir(tmp_path_factory):
    """The `--config`: a tiny MAE preset whose encoder differs from every source below (64 px, patch 16)."""
    folder = tmp_path_factory.mktemp("preset")
    tiny_config(num_attention_heads=HEADS).save_pretrained(folder)
    return folder


def frozen_run(preset_dir, output_dir, init_from: str) -> PretrainArguments:
    """One optimizer step at lr 0 on 32 px tiles: the saved encoder is exactly the one training started from."""
    return PretrainArguments(
        config=str(preset_dir), init_from=init_from, demo=True, output_dir=str(output_dir), mpp=1.0, image_size=IMAGE,
        batch_size=8, max_steps=1, base_lr=0.0, warmup_steps=1, checkpointing_steps=0, reconstruction_steps=0,
    )  # fmt: skip


def test_init_from_a_hub_id_starts_from_its_encoder_and_names_it_as_base_model(preset_dir, tmp_path, monkeypatch):
    source = save_tiny_encoder(tmp_path / "source", seed=7)  # 32 px, patch 8
    make_hub_cache(source, tmp_path / "hub", "org/histomim-tiny")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    result = pretrain(frozen_run(preset_dir, tmp_path / "run", "org/histomim-tiny"))
    config = result.model.config
    assert (config.image_size, config.patch_size, config.objective) == (32, 8, "mae")  # encoder: source; objective: preset
    trained = AutoModel.from_pretrained(tmp_path / "run").state_dict()
    expected = HistoMIMModel.from_pretrained(source).state_dict()
    assert trained.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(trained[name], value), name
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert card.data.base_model == "org/histomim-tiny"
    assert "Initialised from | `org/histomim-tiny`" in card.text


def test_init_from_timm_weights_gives_the_timm_encoder(preset_dir, tmp_path):
    state = timm_state_dict(mlp="packed", layerscale=True, registers=2, pos_prefix="none")
    save_file(state, str(tmp_path / "virchow-like.safetensors"))
    (tmp_path / "config.json").write_text('{"architecture": "vit_tiny", "model_args": {"mlp_layer": "timm.layers.SwiGLUPacked"}}')

    pretrain(frozen_run(preset_dir, tmp_path / "run", str(tmp_path / "virchow-like.safetensors")))
    encoder = AutoModel.from_pretrained(tmp_path / "run").eval()
    assert encoder.config.mlp_type == "swiglu" and encoder.config.num_register_tokens == 2
    pixels = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels).last_hidden_state, timm_reference_forward(state, pixels, "packed"),
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert card.data.base_model is None  # a local file is no Hub id, and its path is not published
    assert "Initialised from | `virchow-like.safetensors`" in card.text and str(tmp_path) not in card.text


def test_init_from_a_missing_source_is_named(preset_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = frozen_run(preset_dir, tmp_path / "run", str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        load_model_config(args, None)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"weights\.bin: neither a histomim model"):
        load_model_config(frozen_run(preset_dir, tmp_path / "run", str(tmp_path / "weights.bin")), None)
