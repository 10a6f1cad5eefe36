"""Histology MIL on real tissue: gated-attention MIL over tile features, and the end-to-end ViT path with LoRA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import colour_features

from histomim.multimodal.mil import ABMIL, GatedAttentionPooling, sample_tiles
from histomim.lora import add_lora

REPO_ROOT = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="module")
def he_and_ihc_features() -> tuple[torch.Tensor, torch.Tensor]:
    """Tile features of the real H&E sample slide and of the real IHC (DAB-stained) image."""
    import tiffslide
    from PIL import Image

    from histomim.data.samples import sample_ihc_path, sample_slide_path

    slide = tiffslide.TiffSlide(sample_slide_path())
    width, height = slide.dimensions
    he = np.asarray(slide.read_region((0, 0), 0, (width, height // 2)).convert("RGB"))
    ihc = np.asarray(Image.open(sample_ihc_path()).convert("RGB"))
    return torch.from_numpy(colour_features(he)), torch.from_numpy(colour_features(ihc))


def make_bags(he, ihc, num_bags: int, generator: torch.Generator):
    """Bags of 5-8 real H&E tiles padded to 8 with NaN; half the bags get 1-2 IHC tiles (label 1)."""
    bags = torch.full((num_bags, 8, he.shape[1]), float("nan"))
    mask = torch.zeros(num_bags, 8, dtype=torch.bool)
    labels = torch.arange(num_bags) % 2
    ihc_slots = torch.zeros(num_bags, 8, dtype=torch.bool)
    for b in range(num_bags):
        size = int(torch.randint(5, 9, (1,), generator=generator))
        tiles = he[torch.randint(len(he), (size,), generator=generator)]
        if labels[b]:
            num_ihc = int(torch.randint(1, 3, (1,), generator=generator))
            tiles[:num_ihc] = ihc[torch.randint(len(ihc), (num_ihc,), generator=generator)]
            ihc_slots[b, :num_ihc] = True
        bags[b, :size], mask[b, :size] = tiles, True
    return bags, mask, labels.float(), ihc_slots


def test_padding_and_tile_order_do_not_change_the_bag_embedding(he_and_ihc_features):
    he, _ = he_and_ihc_features
    torch.manual_seed(0)
    mil = ABMIL(he.shape[1], hidden_size=16, attention_dim=8).eval()
    bag = he[:5].unsqueeze(0)  # (1, 5, 9)
    padded = torch.cat([bag, torch.full((1, 3, he.shape[1]), float("nan"))], dim=1)  # (1, 8, 9) NaN padding
    mask = torch.tensor([[True] * 5 + [False] * 3])

    plain, with_padding = mil(bag), mil(padded, mask)
    torch.testing.assert_close(with_padding.pooled, plain.pooled)
    assert torch.all(with_padding.attention[0, 5:] == 0)
    assert with_padding.attention.sum().item() == pytest.approx(1.0)
    shuffled = mil(bag[:, torch.tensor([3, 0, 4, 1, 2])])
    torch.testing.assert_close(shuffled.pooled, plain.pooled)

    empty = mil(padded, torch.zeros_like(mask))  # a bag without real tiles pools to zeros, not NaN
    assert torch.all(empty.pooled == 0) and torch.all(empty.attention == 0)


def test_gated_attention_matches_ilse_formula():
    torch.manual_seed(0)
    pooling = GatedAttentionPooling(6, attention_dim=4)
    tokens = torch.randn(2, 5, 6)
    pooled, attention = pooling(tokens)
    V, U, w = pooling.attention_tanh[0], pooling.attention_gate[0], pooling.attention_score
    scores = w(torch.tanh(V(tokens)) * torch.sigmoid(U(tokens))).squeeze(-1)  # (2, 5)
    torch.testing.assert_close(attention, scores.softmax(-1))
    torch.testing.assert_close(pooled, (attention.unsqueeze(-1) * tokens).sum(1))


def test_sample_tiles_draws_distinct_real_tiles():
    generator = torch.Generator().manual_seed(0)
    features = torch.arange(2 * 10, dtype=torch.float32).view(2, 10, 1)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 3:] = False  # bag 1 has only 3 real tiles
    kept, kept_mask = sample_tiles(features, mask, max_tiles=4, generator=generator)
    assert kept.shape == (2, 4, 1)
    assert kept_mask[0].all() and kept_mask[1].sum() == 3
    assert len(set(kept[0, :, 0].tolist())) == 4
    assert set(kept[1][kept_mask[1]][:, 0].tolist()) == {10.0, 11.0, 12.0}
    seen = set()
    for _ in range(30):  # every real tile of bag 0 gets drawn sometime
        seen |= set(sample_tiles(features, mask, 4, generator)[0][0, :, 0].tolist())
    assert seen == set(range(10))


def test_max_tiles_samples_in_training_only(he_and_ihc_features):
    he, _ = he_and_ihc_features
    mil = ABMIL(he.shape[1], hidden_size=16, attention_dim=8, max_tiles=4)
    bags = he[:24].view(3, 8, -1)
    assert mil.train()(bags).tokens.shape == (3, 4, 16)
    assert mil.eval()(bags).tokens.shape == (3, 8, 16)
    with pytest.raises(ValueError, match=r"\(B, N, 9\)"):
        mil(bags[..., :5])


def test_abmil_finds_the_ihc_tiles_in_mixed_bags(he_and_ihc_features):
    """Bag label = 'contains DAB-stained IHC tissue'; the attention should pick out those tiles."""
    he, ihc = he_and_ihc_features
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    train_bags, train_mask, train_labels, _ = make_bags(he, ihc, 64, generator)
    test_bags, test_mask, test_labels, test_ihc = make_bags(he, ihc, 40, generator)

    mean, std = he.mean(0), he.std(0)
    mil = ABMIL(he.shape[1], hidden_size=16, attention_dim=8, max_tiles=6)
    classifier = torch.nn.Linear(16, 1)
    optimizer = torch.optim.Adam([*mil.parameters(), *classifier.parameters()], lr=1e-2)
    for _ in range(60):
        logits = classifier(mil((train_bags - mean) / std, train_mask).pooled).squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, train_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    mil.eval()
    with torch.no_grad():
        output = mil((test_bags - mean) / std, test_mask)
        predicted = classifier(output.pooled).squeeze(-1) > 0
    assert (predicted.float() == test_labels).float().mean() > 0.9
    positive = test_labels.bool()
    top_tile = output.attention[positive].argmax(dim=1)  # (P,)
    hits = test_ihc[positive].gather(1, top_tile[:, None]).float().mean()
    assert hits > 0.9, hits


# ------------------------------------------------------------------------------- end to end + LoRA


@pytest.fixture
def lora_setup(tissue_tiles):
    """A genomic + histology fusion model whose histology path is a 2-block HistoMIM ViT on 64 px tiles."""
    from sksurv.datasets import load_breast_cancer
    from transformers import AutoConfig

    from histomim.multimodal.configuration_fusion import HistoFusionConfig
    from histomim.multimodal.modeling_fusion import HistoFusionForSurvival

    encoder_config = AutoConfig.from_pretrained(
        REPO_ROOT / "hub_configs" / "histomim-vit-tiny16", image_size=64, num_hidden_layers=2
    )
    features, outcome = load_breast_cancer()
    probes = features[[c for c in features.columns if c.startswith("X")]].astype(float)
    patients = slice(0, 8)
    genes = torch.tensor(((probes - probes.mean()) / probes.std()).values[patients], dtype=torch.float32)
    time = torch.tensor(np.ascontiguousarray(outcome["t.tdm"][patients]), dtype=torch.float32)
    event = torch.tensor(np.ascontiguousarray(outcome["e.tdm"][patients]))
    event[:2] = True  # make sure the tiny batch has events to rank
    config = HistoFusionConfig(
        modalities=["genomic", "histology"],
        genomic_num_features=genes.shape[1],
        histology_encoder=encoder_config,
        hidden_size=32,
        dropout=0.0,
        genomic_dropout=0.0,
    )
    torch.manual_seed(0)
    model = HistoFusionForSurvival(config)
    bags = tissue_tiles.view(8, 4, 3, 64, 64)  # 8 patients x 4 real tiles
    bag_mask = torch.ones(8, 4, dtype=torch.bool)
    bag_mask[5, 2:] = False  # one smaller bag
    inputs = {"genomic": genes, "histology": bags, "histology_mask": bag_mask}
    return model, inputs, time, event


def test_lora_trains_only_adapters_and_reloads_identically(lora_setup, tmp_path):
    from peft import PeftModel

    from histomim.multimodal.modeling_fusion import HistoFusionForSurvival

    model, inputs, time, event = lora_setup
    model.save_pretrained(tmp_path / "base")
    encoder_before = {k: v.clone() for k, v in model.histology_encoder.encoder.state_dict().items()}

    trainable_modules = ["genomic_encoder", "mil", "fusion", "survival_head"]
    peft_model = add_lora(model, r=4, target_modules=["qkv", "proj"], trainable_modules=trainable_modules)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "modules_to_save" in name for name in trainable)
    assert sum("lora_" in name for name in trainable) == 2 * 2 * 2  # (qkv, proj) x 2 blocks x (A, B)
    lora_b_before = {n: p.clone() for n, p in peft_model.named_parameters() if "lora_B" in n}

    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = peft_model(**inputs, time=time, event=event).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    base_encoder = peft_model.get_base_model().histology_encoder.encoder
    for key, value in base_encoder.state_dict().items():
        if "lora_" not in key:
            original = key.replace(".base_layer", "")
            assert torch.equal(value, encoder_before[original]), key
    assert all(not torch.equal(p, lora_b_before[n]) for n, p in peft_model.named_parameters() if "lora_B" in n)

    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**inputs).risk
    peft_model.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}

    reloaded = PeftModel.from_pretrained(HistoFusionForSurvival.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).risk, expected, rtol=0, atol=0)

    merged = reloaded.merge_and_unload()
    assert isinstance(merged, HistoFusionForSurvival)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).risk, expected, rtol=1e-4, atol=1e-5)


def test_add_lora_rejects_unknown_module_names(lora_setup):
    model, *_ = lora_setup
    with pytest.raises(ValueError, match=r"no modules named \['query'\]"):
        add_lora(model, target_modules=["query"])


def test_tile_encoder_is_a_transformers_sub_config(tmp_path):
    import json

    from transformers import AutoConfig

    from histomim.mim import HistoMIMConfig
    from histomim.multimodal.configuration_fusion import HistoFusionConfig

    encoder = AutoConfig.from_pretrained(REPO_ROOT / "hub_configs" / "histomim-vit-tiny16", num_hidden_layers=2)
    config = HistoFusionConfig(modalities=["histology"], histology_encoder=encoder.to_dict(), hidden_size=32)
    assert set(HistoFusionConfig.sub_configs) == {"histology_encoder"}
    assert isinstance(config.histology_encoder, HistoMIMConfig)  # a dict becomes the sub-config object
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["histology_encoder"]
    assert saved["model_type"] == "histomim" and saved["num_hidden_layers"] == 2
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded.histology_encoder, HistoMIMConfig)
    assert loaded.histology_encoder.to_dict() == config.histology_encoder.to_dict()
    assert HistoFusionConfig(modalities=["genomic"], genomic_num_features=3).histology_encoder is None
