"""The ConvNeXt encoder and its FCMAE pretraining: no leak from masked regions through the convolutions,
falling loss on real tissue through the pretraining loop, save/reload (also without histomim), feature
extraction and frozen-feature evaluation."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from transformers import AutoModel, AutoModelForPreTraining

from histomim import HistoMIMConvNextConfig, HistoMIMConvNextForPreTraining, HistoMIMConvNextModel, image_processor_for
from histomim.data import read_tile, tile_slides
from histomim.evaluation import EvaluationSettings, evaluate_encoder, nucleus_crops
from histomim.evaluation.embeddings import embed_images, image_processor
from histomim.features import extract_features, load_tile_features
from histomim.hub import check_model_card, code_files
from histomim.training.pretrain import PretrainArguments, pretrain

from test_loading import run_without_histomim


def tiny_convnext(**overrides) -> HistoMIMConvNextConfig:
    """3 stages (stride 16): 64 px images are a 4 x 4 grid of masked patches."""
    settings = dict(image_size=64, depths=[1, 1, 1], hidden_sizes=[16, 32, 64], decoder_hidden_size=32)
    return HistoMIMConvNextConfig(**{**settings, **overrides})


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_masked_regions_cannot_influence_visible_outputs(tissue_tiles):
    torch.manual_seed(0)
    encoder = HistoMIMConvNextModel(tiny_convnext(layerscale_init=1.0)).eval()  # residual branches at full weight
    pixels = tissue_tiles[:2]  # (2, 3, 64, 64) real tissue
    masked = torch.zeros(2, 4, 4, dtype=torch.bool)
    masked[:, ::2, ::2] = masked[:, 1::2, 1::2] = True  # a checkerboard: every visible patch borders masked ones
    bool_masked_pos = masked.flatten(1)  # (B, 16)
    pixel_mask = masked.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None]  # (B, 1, 64, 64)
    perturbed = torch.where(pixel_mask, torch.randn_like(pixels) * 5, pixels)  # only masked pixels change

    def stage_maps(images, mask):
        with torch.no_grad():
            return encoder(images, bool_masked_pos=mask, output_hidden_states=True).hidden_states

    for stride_index, (a, b) in enumerate(zip(stage_maps(pixels, bool_masked_pos), stage_maps(perturbed, bool_masked_pos))):
        scale = 16 // (4 * 2 ** max(stride_index - 1, 0))  # stem and stage 1 at 1/4, then 1/8, 1/16
        visible = (~masked).repeat_interleave(scale, 1).repeat_interleave(scale, 2)[:, None].expand_as(a)
        assert torch.equal(a[visible], b[visible]), f"masked pixels leak into visible positions of map {stride_index}"
        assert torch.all(a[~visible] == 0)
    # the control: without the per-stage zeroing, the first stage's 7x7 depthwise convs carry masked pixels
    # into visible neighbours, so the check above would fail
    plain, perturbed_plain = stage_maps(pixels, None)[1], stage_maps(perturbed, None)[1]
    visible = (~masked).repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].expand_as(plain)
    assert not torch.equal(plain[visible], perturbed_plain[visible])


def test_pretraining_output_and_loss_on_masked_patches_only(tissue_tiles):
    torch.manual_seed(0)
    model = HistoMIMConvNextForPreTraining(tiny_convnext()).eval()
    torch.nn.init.normal_(model.decoder.pred.weight, std=0.5)  # predictions far from zero: patch losses differ
    noise = torch.rand(model.config.mask_noise_shape(4))
    with torch.no_grad():
        out = model(tissue_tiles[:4], noise=noise, output_hidden_states=True)
        again = model(tissue_tiles[:4], noise=noise)
    assert out.logits.shape == (4, 16, 16 * 16 * 3) and out.reconstruction.shape == (4, 3, 64, 64)
    assert out.mask.sum(dim=1).tolist() == [10.0] * 4  # int(16 * (1 - 0.6)) = 6 visible, as MAE rounds
    assert model.config.realised_mask_ratio() == 10 / 16
    assert [tuple(h.shape[1:]) for h in out.hidden_states] == [(16, 16, 16), (16, 16, 16), (32, 8, 8), (64, 4, 4)]
    assert torch.equal(out.loss, again.loss)  # the same noise, the same mask
    # MSE against per-patch normalised targets, averaged over the masked patches only
    target = model.patchify(tissue_tiles[:4])  # (B, L, p*p*C)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((out.logits - target) ** 2).mean(-1)  # (B, L)
    torch.testing.assert_close(out.loss, per_patch[out.mask.bool()].mean())
    assert not torch.isclose(out.loss, per_patch.mean(), rtol=1e-3)  # visible patches would change it


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`histomim pretrain` on tiles of the sample slide with a tiny ConvNeXt config, through the one loop."""
    config_dir = tmp_path_factory.mktemp("convnext-config")
    tiny_convnext().save_pretrained(config_dir)
    output_dir = tmp_path_factory.mktemp("convnext-run")
    args = PretrainArguments(
        config=str(config_dir), demo=True, output_dir=str(output_dir), image_size=64, mpp=1.0, batch_size=32,
        max_steps=10, base_lr=0.05, warmup_steps=1, checkpointing_steps=0, reconstruction_steps=0,
    )  # fmt: skip
    result = pretrain(args)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return output_dir, result


def test_pretrain_trains_the_convnext_with_falling_loss_and_saves_it(trained):
    output_dir, result = trained
    summary = json.loads((output_dir / "pretrain_summary.json").read_text())
    assert summary["config"]["objective"] == "fcmae" and summary["data"]["slides"] == ["CMU-1-Small-Region"]
    assert summary["last_mean"] < summary["first_mean"], summary["losses"]  # falls on real tissue
    names = {p.name for p in output_dir.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "modeling_histomim_convnext.py",
            "configuration_histomim_convnext.py", "reconstruction.png", "loss_curve.png", "README.md"} <= names
    assert {p.name for p in code_files(output_dir)} >= {"modeling_histomim_convnext.py", "configuration_histomim_convnext.py",
                                                        "masking.py", "modeling_histomim.py"}  # fmt: skip
    card = check_model_card((output_dir / "README.md").read_text())
    assert "fcmae" in card.data.tags and "ConvNeXt, 3 stages of 1, 1, 1 blocks" in card.text


def test_saved_convnext_reloads_with_auto_classes_and_without_histomim(trained, tmp_path):
    output_dir, result = trained
    encoder = AutoModel.from_pretrained(output_dir).eval()
    assert type(encoder) is HistoMIMConvNextModel
    assert type(AutoModelForPreTraining.from_pretrained(output_dir)) is HistoMIMConvNextForPreTraining
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = result.model.histomim.eval()(pixels)
        assert torch.equal(encoder(pixels).pooler_output, expected.pooler_output)
    reference = tmp_path / "reference.safetensors"
    from safetensors.torch import save_file

    save_file({"pixels": pixels, "pooled": expected.pooler_output, "last": expected.last_hidden_state.contiguous()}, str(reference))
    out = run_without_histomim(
        f"""
        from safetensors.torch import load_file
        from transformers import AutoModel
        data = load_file({str(reference)!r})
        model = AutoModel.from_pretrained({str(output_dir)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "HistoMIMConvNextModel" and "histomim" not in type(model).__module__.split(".")[0]
        with torch.no_grad():
            out = model(data["pixels"])
        assert torch.equal(out.pooler_output, data["pooled"]) and torch.equal(out.last_hidden_state, data["last"])
        print("LOADED", type(model).__module__)
        """,
        env={"HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert "LOADED transformers_modules" in out


def test_convnext_features_for_extraction_and_evaluation(trained, sample_slide_path, tmp_path):
    output_dir, _ = trained
    encoder = AutoModel.from_pretrained(output_dir).eval()
    tile_slides([sample_slide_path], tmp_path / "tiles", mpp=1.0, tile_size=64, min_tissue=0.5)
    outputs = extract_features(output_dir, tmp_path / "tiles", tmp_path / "features", batch_size=16)
    manifest = pd.read_parquet(tmp_path / "tiles" / "manifest.parquet")
    features = load_tile_features(next(iter(outputs.values())))
    assert features.shape == (len(manifest), 64)
    row = manifest.iloc[1]
    pixels = image_processor_for(encoder.config)(read_tile(row), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(features[1], encoder(pixels).pooler_output[0], atol=1e-5, rtol=1e-5)

    from histomim.data.samples import sample_nuclei_pairs

    nuclei = nucleus_crops(sample_nuclei_pairs(), crop_size=32)
    processor = image_processor(str(output_dir), encoder.config)
    images = nuclei.images[:6]
    pooled = embed_images(encoder, images, processor, "mean")
    with torch.no_grad():
        expected = encoder(processor(images=images, return_tensors="pt")["pixel_values"]).pooler_output
    np.testing.assert_allclose(pooled, expected.numpy(), atol=1e-5)
    stage2 = embed_images(encoder, images, processor, "mean", layer=2)
    assert stage2.shape == (6, 32)  # the second stage's width
    with pytest.raises(ValueError, match="cls\\+mean"):
        embed_images(encoder, images, processor, "cls+mean")

    report = evaluate_encoder(str(output_dir), nuclei, EvaluationSettings(pooling="mean", protocols=("knn",)))
    assert report["architecture"] == "HistoMIMConvNextModel"
    assert set(report["results"]) == {"model", "random_init"} and "knn" in report["results"]["model"]


def test_export_to_transformers_convnext_gives_identical_unmasked_outputs(tissue_tiles):
    from histomim.export import to_convnext

    torch.manual_seed(0)
    encoder = HistoMIMConvNextModel(tiny_convnext(layerscale_init=0.5)).eval()
    reference = to_convnext(encoder)
    assert type(reference).__name__ == "ConvNextModel"
    with torch.no_grad():
        ours, theirs = encoder(tissue_tiles[:2], output_hidden_states=True), reference(tissue_tiles[:2], output_hidden_states=True)
    assert torch.equal(ours.pooler_output, theirs.pooler_output)
    assert all(torch.equal(a, b) for a, b in zip(ours.hidden_states, theirs.hidden_states))


def test_objective_fcmae_and_the_config_family_must_agree():
    from histomim.training.pretrain import load_model_config

    cnn = load_model_config(PretrainArguments(config="histomim-convnext-nano-nuclei", objective="fcmae", data="x"), None)
    assert isinstance(cnn, HistoMIMConvNextConfig) and cnn.patch_size == 4 and cnn.num_patches == 64
    with pytest.raises(ValueError, match="--objective fcmae needs a ConvNeXt --config.*'histomim-vit-nano-nuclei'"):
        load_model_config(PretrainArguments(config="histomim-vit-nano-nuclei", objective="fcmae", data="x"), None)
    with pytest.raises(ValueError, match="--objective mae needs a ViT --config"):
        load_model_config(PretrainArguments(config="histomim-convnext-nano-nuclei", objective="mae", data="x"), None)
