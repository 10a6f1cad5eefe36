"""The encoders behave like native transformers models (issue 10): input embeddings that the forward calls
(LoRA under reentrant checkpointing, disk offload), the attention-function registry and `output_attentions`,
no dead parameters, normalization settings, and the image processor's backends."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoImageProcessor, AutoModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from histomim import HistoMIMConfig, HistoMIMForImageClassification, HistoMIMForPreTraining, HistoMIMModel
from histomim.mim import modeling_histomim
from histomim.mim.image_processing_histomim import image_processor_classes, image_processor_for

from conftest import tiny_config


def enable_checkpointing(model, use_reentrant: bool | None = None) -> None:
    # transformers 5.2x renamed gradient_checkpointing_enable (and its kwargs); accept either
    kwargs = None if use_reentrant is None else {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# --------------------------------------------------------------------------- input embeddings


def tiny_vit_classifier():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_labels=3,
    ))  # fmt: skip


@pytest.mark.parametrize("family", ["histomim", "vit"])  # transformers' ViT: the reference set-up
def test_lora_with_reentrant_checkpointing_trains_every_adapter(family):
    """Reentrant checkpointing passes gradients only through block inputs that require grad; with a frozen
    base that takes `enable_input_require_grads()` (peft calls it) hooking the patch embedding."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    if family == "histomim":
        model, targets = HistoMIMForImageClassification(tiny_config(num_labels=3)), ["qkv", "proj"]
    else:
        model, targets = tiny_vit_classifier(), ["q_proj", "v_proj"]
    enable_checkpointing(model, use_reentrant=True)
    # init_lora_weights=False: random A and B, so that every adapter tensor has a non-zero gradient
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).train()
    loss = lora(pixel_values=torch.randn(4, 3, 64, 64), labels=torch.tensor([0, 1, 2, 1])).loss
    loss.backward()
    adapters = {name: p for name, p in lora.named_parameters() if "lora_" in name}
    assert len(adapters) == 2 * len(targets) * 2  # blocks x targets x (A, B)
    for name, parameter in adapters.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_input_embeddings_are_the_called_patch_embedding():
    model = HistoMIMForImageClassification(tiny_config(num_labels=2))
    embedding = model.get_input_embeddings()
    assert embedding is model.histomim.get_input_embeddings() is model.histomim.embeddings.patch_embed
    seen = []
    embedding.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    model(torch.randn(2, 3, 64, 64))
    assert seen == [(2, 16, 64)]
    # MAE pretraining embeds only the visible patches, through the same module
    pretraining = HistoMIMForPreTraining(tiny_config())
    pretraining.get_input_embeddings().register_forward_hook(lambda module, args, output: seen.append(output.shape))
    pretraining(torch.randn(2, 3, 64, 64))
    assert seen[-1] == (2, 4, 64)


def test_disk_offload_gives_the_in_memory_outputs(tmp_path):
    torch.manual_seed(0)
    model = HistoMIMModel(tiny_config()).eval()
    model.save_pretrained(tmp_path / "model")
    pixels = torch.randn(2, 3, 64, 64)
    offloaded = AutoModel.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": "30KB"}, offload_folder=tmp_path / "offload"
    ).eval()
    assert "disk" in set(offloaded.hf_device_map.values())
    with torch.no_grad():
        torch.testing.assert_close(offloaded(pixels).last_hidden_state, model(pixels).last_hidden_state, atol=0, rtol=0)


# --------------------------------------------------------------------------- attention


def count_calls(name: str, wrapped):
    """Route attention implementation `name` through `wrapped`, counting calls."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(name)
        return wrapped(*args, **kwargs)

    return calls, counted


def test_set_attn_implementation_switches_the_code_path(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = HistoMIMModel(tiny_config()).eval()
    pixels = torch.randn(2, 3, 64, 64)
    eager_calls, counted_eager = count_calls("eager", modeling_histomim.eager_attention_forward)
    monkeypatch.setattr(modeling_histomim, "eager_attention_forward", counted_eager)
    sdpa_calls, counted_sdpa = count_calls("sdpa", sdpa_attention_forward)
    AttentionInterface.register("counted_sdpa", counted_sdpa)

    model.set_attn_implementation("counted_sdpa")  # any function of the registry
    with torch.no_grad():
        sdpa = model(pixels).last_hidden_state
    assert (len(sdpa_calls), len(eager_calls)) == (2, 0)

    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        eager = model(pixels).last_hidden_state
    assert (len(sdpa_calls), len(eager_calls)) == (2, 2)
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)  # fp32

    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).last_hidden_state, eager, atol=0, rtol=0)
    assert len(eager_calls) == 4


def assert_attention_weights(attentions, config: HistoMIMConfig, batch: int, tokens: int) -> None:
    assert len(attentions) == config.num_hidden_layers
    for weights in attentions:
        assert weights.shape == (batch, config.num_attention_heads, tokens, tokens)
        torch.testing.assert_close(weights.sum(dim=-1), torch.ones(batch, config.num_attention_heads, tokens))
        assert torch.all(weights >= 0)


def test_output_attentions_returns_each_blocks_weights():
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64)
    config = tiny_config(num_register_tokens=1)  # default attention: sdpa
    encoder = HistoMIMModel(config).eval()
    with torch.no_grad():
        out = encoder(pixels, output_attentions=True)
        plain = encoder(pixels)
    assert_attention_weights(out.attentions, config, 2, 1 + 1 + 16)
    assert plain.attentions is None
    torch.testing.assert_close(out.last_hidden_state, plain.last_hidden_state, atol=1e-5, rtol=1e-5)
    # the weights are those the block used: CLS attention of block 0 recomputed by hand
    block = encoder.blocks[0]
    with torch.no_grad():
        tokens = block.norm1(encoder.embeddings(pixels))
        query, key, _ = block.attn.qkv(tokens).view(2, 18, 3, 4, 16).permute(2, 0, 3, 1, 4)
        expected = (query @ key.transpose(-2, -1) * 16**-0.5).softmax(dim=-1)
    torch.testing.assert_close(out.attentions[0], expected, atol=1e-6, rtol=1e-5)

    classifier = HistoMIMForImageClassification(tiny_config(num_labels=2)).eval()
    assert_attention_weights(classifier(pixels, output_attentions=True).attentions, classifier.config, 2, 17)
    assert classifier(pixels, output_attentions=True, return_dict=False)[-1][0].shape == (2, 4, 17, 17)
    for objective, tokens in (("mae", 1 + 4), ("simmim", 17)):  # MAE's encoder sees CLS + visible patches
        pretraining = HistoMIMForPreTraining(tiny_config(objective=objective))
        assert_attention_weights(pretraining(pixels, output_attentions=True).attentions, pretraining.config, 2, tokens)


# --------------------------------------------------------------------------- no dead parameters


@pytest.mark.parametrize(
    "build",
    [
        lambda: HistoMIMModel(tiny_config(objective="simmim")),
        lambda: HistoMIMForImageClassification(tiny_config(objective="simmim", num_labels=2)),
        lambda: HistoMIMForPreTraining(tiny_config(objective="simmim")),
        lambda: HistoMIMForPreTraining(tiny_config(objective="mae")),
    ],
    ids=["simmim-encoder", "simmim-classifier", "simmim-pretraining", "mae-pretraining"],
)
def test_every_trainable_parameter_gets_a_gradient(build):
    """DistributedDataParallel's default (find_unused_parameters=False) fails on any parameter without one."""
    torch.manual_seed(0)
    model = build().train()
    enable_checkpointing(model)
    output = model(torch.randn(2, 3, 64, 64))
    loss = output.loss if getattr(output, "loss", None) is not None else output[0].float().pow(2).mean()
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_mask_token_exists_only_where_it_is_used():
    assert HistoMIMForPreTraining(tiny_config(objective="simmim")).histomim.embeddings.mask_token is not None
    assert HistoMIMForPreTraining(tiny_config(objective="mae")).histomim.embeddings.mask_token is None
    assert HistoMIMModel(tiny_config(objective="simmim")).embeddings.mask_token is None
    assert HistoMIMModel(tiny_config(objective="simmim"), use_mask_token=True).embeddings.mask_token is not None


# --------------------------------------------------------------------------- normalization settings


def test_normalization_accepts_scalars_maps_former_names_and_rejects_zero_std(tmp_path):
    config = tiny_config(normalization_mean=0.5, normalization_std=0.25)
    assert (config.normalization_mean, config.normalization_std) == ([0.5] * 3, [0.25] * 3)
    white = torch.full((32, 48, 3), 255, dtype=torch.uint8).numpy()
    pixels = image_processor_for(config)(white, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, torch.full((1, 3, 64, 64), 2.0))  # (1 - 0.5) / 0.25

    # configs saved with the former names load into the new fields, and are saved with the new names
    former = HistoMIMConfig.from_dict({**tiny_config().to_dict(), "image_mean": [0.1, 0.2, 0.3], "image_std": 0.5})
    assert (former.normalization_mean, former.normalization_std) == ([0.1, 0.2, 0.3], [0.5] * 3)
    former.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    assert '"normalization_std"' in saved and '"image_std"' not in saved and '"image_mean"' not in saved

    for settings in (dict(normalization_std=0.0), dict(normalization_std=[0.2, 0.0, 0.2]), dict(image_std=[0.2, -1, 0.2])):
        with pytest.raises(ValueError, match="normalization_std must be > 0"):
            tiny_config(**settings)
    with pytest.raises(ValueError, match="num_channels"):
        tiny_config(normalization_mean=[0.5, 0.5])


# --------------------------------------------------------------------------- image processor backends


def test_image_processor_backend_follows_torchvision(tmp_path, tissue_tiles):
    """The torchvision (fast) processor where torchvision imports, else the PIL one; registered either way.
    Where torchvision exists, both backends give the same pixels on real tiles."""
    from transformers.utils import is_torchvision_available

    classes = image_processor_classes()
    config = tiny_config()
    folder = tmp_path / "model"
    HistoMIMModel(config).save_pretrained(folder)
    image_processor_for(config).save_pretrained(folder)
    loaded = AutoImageProcessor.from_pretrained(folder)
    if not is_torchvision_available():
        assert set(classes) == {"pil"}
        assert type(image_processor_for(config)) is classes["pil"] is type(loaded)
        with pytest.raises(ValueError, match="torchvision"):
            image_processor_for(config, backend="torchvision")
        return
    assert type(image_processor_for(config)) is classes["torchvision"] is type(loaded)
    # real tiles at the model's size: the two backends only rescale and normalize
    mean = torch.tensor(config.normalization_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.normalization_std).view(1, 3, 1, 1)
    tiles = ((tissue_tiles[:8] * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    images = [tile.permute(1, 2, 0).numpy() for tile in tiles]
    fast = image_processor_for(config, backend="torchvision")(images, return_tensors="pt")["pixel_values"]
    pil = image_processor_for(config, backend="pil")(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(fast, pil, atol=1e-5, rtol=1e-5)


def test_registration_names_the_backends_installed_here():
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    registered = IMAGE_PROCESSOR_MAPPING[HistoMIMConfig]
    registered = registered if isinstance(registered, dict) else dict(zip(("pil", "torchvision"), registered))
    for backend, processor_class in image_processor_classes().items():
        assert registered[backend] is processor_class
