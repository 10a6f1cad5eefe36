"""Fine-tuning on real nucleus crops: layer-wise lr decay, LoRA adapters that reload exactly, the
transformers Trainer, and the `histomim finetune` command with a falling loss."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_encoder, tiny_config

from histomim import HistoMIMForImageClassification, image_processor_for
from histomim.data.samples import sample_nuclei_pairs
from histomim.evaluation import nucleus_crops
from histomim.training.finetune import (
    FinetuneSettings, classifier_from_encoder, finetune, layer_decay_param_groups, predict_probabilities,
)  # fmt: skip


@pytest.fixture(scope="module")
def nuclei_pixels():
    """(125, 3, 32, 32) normalised nucleus crops and their (125,) type labels."""
    crops = nucleus_crops(sample_nuclei_pairs(), crop_size=32)
    processor = image_processor_for(tiny_config(image_size=32, patch_size=8))
    pixels = processor(images=list(crops.images), return_tensors="pt")["pixel_values"]
    return pixels, torch.as_tensor(crops.labels), crops.class_names


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("encoder"), seed=0)


def test_layer_decay_scales_lr_from_head_to_embeddings(encoder_dir):
    model = classifier_from_encoder(encoder_dir, ["a", "b"])
    groups = layer_decay_param_groups(model, lr=1.0, layer_decay=0.5, weight_decay=0.05)
    lr_of = {}
    for group in groups:
        for parameter in group["params"]:
            lr_of[id(parameter)] = (group["lr"], group["weight_decay"])
    named = dict(model.named_parameters())
    assert lr_of[id(named["classifier.weight"])] == (1.0, 0.05)
    assert lr_of[id(named["classifier.bias"])] == (1.0, 0.0)  # no decay on biases
    assert lr_of[id(named["histomim.blocks.1.attn.qkv.weight"])][0] == 0.5  # last of 2 blocks
    assert lr_of[id(named["histomim.blocks.0.attn.qkv.weight"])][0] == 0.25
    assert lr_of[id(named["histomim.embeddings.patch_embed.weight"])][0] == 0.125
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(lr_of) == trainable


def test_lora_trains_adapters_and_head_only_and_reloads_to_identical_predictions(encoder_dir, nuclei_pixels, tmp_path):
    from peft import PeftModel

    pixels, labels, names = nuclei_pixels
    torch.manual_seed(0)
    base = classifier_from_encoder(encoder_dir, names)
    frozen_qkv = base.histomim.blocks[0].attn.qkv.weight.detach().clone()
    settings = FinetuneSettings(epochs=2, batch_size=32, lr=5e-3, lora_rank=4, cpu=True)
    result = finetune(base, pixels[:64], labels[:64], settings)
    model = result.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert any("attn.qkv.lora_A" in n for n in trainable) and any("attn.proj.lora_B" in n for n in trainable)
    assert torch.equal(model.base_model.model.histomim.blocks[0].attn.qkv.base_layer.weight, frozen_qkv)
    expected = predict_probabilities(model, pixels[64:])

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()  # the adapter only
    torch.manual_seed(123)  # a different random head: the saved one must replace it
    fresh = classifier_from_encoder(encoder_dir, names)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    torch.testing.assert_close(torch.as_tensor(predict_probabilities(reloaded, pixels[64:])), torch.as_tensor(expected))


def test_transformers_trainer_runs_on_the_model(encoder_dir, nuclei_pixels, tmp_path):
    from transformers import Trainer, TrainingArguments

    pixels, labels, names = nuclei_pixels
    model = classifier_from_encoder(encoder_dir, names)
    rows = [{"pixel_values": pixels[i], "labels": labels[i]} for i in range(48)]
    arguments = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=16, max_steps=4,
                                  learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                                  use_cpu=True, disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=model, args=arguments, train_dataset=rows)
    before = model.classifier.weight.detach().clone()
    output = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert output.global_step == 4 and len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, model.classifier.weight)


def test_finetune_command_trains_on_nucleus_crops_with_falling_loss(encoder_dir, tmp_path, capsys):
    from histomim.cli import main

    out = tmp_path / "finetuned"
    argv = ["finetune", "--model", str(encoder_dir), "--nuclei", "--output-dir", str(out), "--epochs", "6",
            "--batch-size", "16", "--lr", "2e-3", "--cpu"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "finetune_summary.json").read_text())
    losses = summary["epoch_losses"]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    assert summary["split"]["num_test"] == 38 and set(summary["test"]) == {"balanced_accuracy", "macro_f1", "auroc"}
    model = HistoMIMForImageClassification.from_pretrained(out)
    assert model.config.id2label == {0: "1", 1: "2", 2: "3", 3: "5"}
    assert "loss per epoch" in capsys.readouterr().out
