"""Semantic segmentation: HistoMIMForSemanticSegmentation (loss, Auto reload, remote code), training on the
real cellseg H&E patches with a falling loss, IoU/Dice against hand-computed values, and `histomim segment`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import save_tiny_encoder, tiny_config
from PIL import Image

from histomim import HistoMIMForSemanticSegmentation
from histomim.data.samples import sample_nuclei_pairs
from histomim.evaluation.segmentation import (
    IGNORE_INDEX, confusion_matrix, remap_classes, segmentation_pairs, segmentation_scores,
)  # fmt: skip
from histomim.training.segmentation import (
    SegmentationSettings, predict_masks, random_init_baseline, segmenter_from_encoder, train_segmenter,
)  # fmt: skip


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("encoder"), seed=1)


def test_logits_at_pixel_resolution_and_ignored_pixels_carry_no_loss():
    torch.manual_seed(0)
    model = HistoMIMForSemanticSegmentation(tiny_config(num_labels=3, segmentation_out_indices=[1, -1])).eval()
    pixels = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 3, (2, 64, 64))
    output = model(pixels, labels=labels)
    assert output.logits.shape == (2, 3, 64, 64)
    expected = torch.nn.functional.cross_entropy(output.logits, labels)
    torch.testing.assert_close(output.loss, expected)
    # pixels marked 255 leave the loss: it equals the loss over the others only
    ignored = labels.clone()
    ignored[:, :32] = IGNORE_INDEX
    kept = torch.nn.functional.cross_entropy(output.logits[..., 32:, :], labels[:, 32:])
    torch.testing.assert_close(model(pixels, labels=ignored).loss, kept)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="segmentation_out_indices: 5"):
        HistoMIMForSemanticSegmentation(tiny_config(num_labels=2, segmentation_out_indices=[5]))
    with pytest.raises(ValueError, match="num_labels >= 2"):
        HistoMIMForSemanticSegmentation(tiny_config(num_labels=1))


def test_save_and_auto_reload_give_equal_logits(tmp_path):
    import histomim  # noqa: F401
    from test_loading import run_without_histomim
    from transformers import AutoModelForSemanticSegmentation

    torch.manual_seed(0)
    model = HistoMIMForSemanticSegmentation(tiny_config(num_labels=2, segmentation_out_indices=[0, 2])).eval()
    model.save_pretrained(tmp_path / "seg")
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(pixels).logits
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "seg").eval()
    assert type(reloaded) is HistoMIMForSemanticSegmentation
    assert reloaded.config.segmentation_out_indices == [0, 2]
    with torch.no_grad():
        assert torch.equal(reloaded(pixels).logits, reference)

    from safetensors.torch import save_file

    save_file({"pixels": pixels, "reference": reference}, str(tmp_path / "reference.safetensors"))
    out = run_without_histomim(f"""
        from safetensors.torch import load_file
        from transformers import AutoModelForSemanticSegmentation
        data = load_file({str(tmp_path / "reference.safetensors")!r})
        model = AutoModelForSemanticSegmentation.from_pretrained({str(tmp_path / "seg")!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            assert torch.equal(model(data["pixels"]).logits, data["reference"])
        print("REMOTE", type(model).__module__)
    """, env={"HF_MODULES_CACHE": str(tmp_path / "modules")})  # fmt: skip
    assert "REMOTE transformers_modules" in out


def test_scores_match_hand_computed_values():
    truth = np.array([[0, 0, 1, 1],
                      [0, 0, 1, 1],
                      [2, 2, IGNORE_INDEX, IGNORE_INDEX]])  # fmt: skip
    predicted = np.array([[0, 1, 1, 1],
                          [0, 0, 1, 2],
                          [2, 0, 1, 0]])  # fmt: skip
    # labelled pixels: class 0: 4 true, 3 right, 1 predicted 1; class 1: 4 true, 3 right, 1 predicted 2;
    # class 2: 2 true, 1 right, 1 predicted 0. The two ignored pixels count nowhere.
    confusion = confusion_matrix(predicted, truth, 3)
    np.testing.assert_array_equal(confusion, [[3, 1, 0], [0, 3, 1], [1, 0, 1]])
    scores = segmentation_scores(predicted, truth, 3, ["bg", "a", "b"])
    # IoU = TP / (TP + FP + FN): 3 / (3 + 1 + 1), 3 / (3 + 1 + 1), 1 / (1 + 1 + 1)
    assert scores["per_class"]["bg"]["iou"] == pytest.approx(3 / 5)
    assert scores["per_class"]["a"]["iou"] == pytest.approx(3 / 5)
    assert scores["per_class"]["b"]["iou"] == pytest.approx(1 / 3)
    # Dice = 2TP / (2TP + FP + FN)
    assert scores["per_class"]["bg"]["dice"] == pytest.approx(6 / 8)
    assert scores["per_class"]["b"]["dice"] == pytest.approx(2 / 4)
    assert scores["miou"] == pytest.approx((3 / 5 + 3 / 5 + 1 / 3) / 3)
    assert scores["mdice"] == pytest.approx((6 / 8 + 6 / 8 + 2 / 4) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(7 / 10)
    # a class absent from truth and prediction has no score and leaves the mean alone
    four = segmentation_scores(predicted, truth, 4)
    assert np.isnan(four["per_class"]["3"]["iou"]) and four["miou"] == pytest.approx(scores["miou"])
    # lists of images pool their pixels
    pooled = segmentation_scores([predicted, predicted], [truth, truth], 3)
    assert pooled["miou"] == pytest.approx(scores["miou"])


def test_real_masks_are_read_and_mismatched_sizes_named(tmp_path):
    pairs = segmentation_pairs(sample_nuclei_pairs(), "foreground")
    assert [p.image.shape for p in pairs] == [(256, 256, 3)] * 3
    assert set(np.unique(pairs[0].mask)) == {0, 1} and 0.05 < pairs[0].mask.mean() < 0.6
    types = segmentation_pairs(sample_nuclei_pairs(), "type")
    assert set(np.unique(np.concatenate([p.mask.ravel() for p in types]))) == {0, 1, 2, 3, 5}
    remapped = remap_classes(types, [0, 1, 2, 3, 5])
    assert set(np.unique(remapped[2].mask)) <= {0, 1, 2, 3, 4}
    small = tmp_path / "small_mask.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(small)
    with pytest.raises(ValueError, match="small_mask.png: mask is 10x10 but .*patch1.png is 256x256"):
        segmentation_pairs([(sample_nuclei_pairs()[0][0], small)])


def test_training_on_real_patches_lowers_the_loss_and_predicts_whole_images(encoder_dir):
    pairs = segmentation_pairs(sample_nuclei_pairs(), "foreground")
    torch.manual_seed(0)
    model = segmenter_from_encoder(encoder_dir, ["background", "nucleus"])
    baseline = random_init_baseline(model, seed=0)
    # the baseline keeps the decoder init and takes the random-init encoder
    assert torch.equal(baseline.decoder.classifier.weight, model.decoder.classifier.weight)
    assert not torch.equal(baseline.histomim.blocks[0].attn.qkv.weight, model.histomim.blocks[0].attn.qkv.weight)
    mean, std = model.config.normalization_mean, model.config.normalization_std
    settings = SegmentationSettings(steps=40, batch_size=8, lr=2e-3, warmup_steps=5, cpu=True)
    result = train_segmenter(model, pairs[:2], settings, mean, std)
    first, last = np.mean(result.step_losses[:8]), np.mean(result.step_losses[-8:])
    assert last < 0.85 * first, result.step_losses
    predicted = predict_masks(result.model, [pairs[2].image[:250, :200]], mean, std)[0]  # not a multiple of 32
    assert predicted.shape == (250, 200)
    scores = segmentation_scores(predicted, pairs[2].mask[:250, :200], 2)
    assert scores["pixel_accuracy"] > pairs[2].mask[:250, :200].mean()  # better than calling every pixel a nucleus


def test_segment_command_writes_model_summary_and_overlay(encoder_dir, tmp_path, capsys):
    from transformers import AutoModelForSemanticSegmentation

    from histomim.cli import main

    out = tmp_path / "seg"
    assert main(["segment", "--model", str(encoder_dir), "--output-dir", str(out), "--steps", "6",
                 "--batch-size", "4", "--cpu"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "random-init encoder" in printed and "IoU / Dice nucleus" in printed
    summary = json.loads((out / "segment_summary.json").read_text())
    assert summary["test_pairs"] == ["patch3.png"] and summary["train_pairs"] == ["patch1.png", "patch2.png"]
    assert set(summary["test"]) == {"encoder", "random-init encoder"}
    assert len(summary["losses"]["encoder"]) == 6
    assert 0.0 <= summary["test"]["encoder"]["miou"] <= 1.0
    with Image.open(out / "overlay.png") as overlay:
        assert overlay.format == "PNG" and overlay.size[0] > 600
    model = AutoModelForSemanticSegmentation.from_pretrained(out)
    assert model.config.id2label == {0: "background", 1: "nucleus"}


def test_the_encoder_keeps_its_weights_and_init_only_the_decoder_gets_kaiming(tmp_path):
    """The segmenter's own `_init_weights` (kaiming convolutions, unit GroupNorms) is for its decoder: the encoder
    is a sub-model that transformers initialises with HistoMIMModel's MAE init (xavier patch embedding), and a
    pretrained encoder keeps every weight it is loaded with, from an encoder or a pretraining folder, through
    `segmenter_from_encoder`, `AutoModelForSemanticSegmentation` or an encoder object."""
    from transformers import AutoModelForSemanticSegmentation

    from histomim import HistoMIMForPreTraining, HistoMIMModel

    torch.manual_seed(0)
    encoder = HistoMIMModel(tiny_config())
    encoder.save_pretrained(tmp_path / "encoder")
    pretraining = HistoMIMForPreTraining(tiny_config())
    pretraining.save_pretrained(tmp_path / "pretraining")
    for source, weights in [(tmp_path / "encoder", encoder.state_dict()), (tmp_path / "pretraining", pretraining.histomim.state_dict()),
                            (encoder, encoder.state_dict())]:  # fmt: skip
        loaded = [segmenter_from_encoder(source, ["background", "nucleus"])]
        if not isinstance(source, HistoMIMModel):
            loaded.append(AutoModelForSemanticSegmentation.from_pretrained(source, num_labels=2))
        for model in loaded:
            kept = model.histomim.state_dict()
            assert kept.keys() == weights.keys() and all(torch.equal(kept[k], weights[k]) for k in weights), source

    # built from a config: the encoder is initialised exactly as HistoMIMModel is, the decoder's convs by kaiming
    torch.manual_seed(1)
    alone = HistoMIMModel(tiny_config()).state_dict()
    torch.manual_seed(1)
    model = HistoMIMForSemanticSegmentation(tiny_config(num_labels=2))
    assert all(torch.equal(model.histomim.state_dict()[k], alone[k]) for k in alone)
    patch_embed = model.histomim.embeddings.patch_embed.weight  # (D, 3, p, p), xavier over the flattened patch
    fan_in, fan_out = patch_embed[0].numel(), patch_embed.shape[0]
    assert patch_embed.abs().max() > 0.9 * (6 / (fan_in + fan_out)) ** 0.5 > 1.1 / fan_in**0.5  # not kaiming's bound
    fuse = model.decoder.fuse[0].weight  # (C, layers * D, 1, 1), kaiming-uniform with a = sqrt(5): bound 1/sqrt(fan_in)
    assert 0.9 / fuse[0].numel() ** 0.5 < fuse.abs().max() <= 1 / fuse[0].numel() ** 0.5
