"""LoRA fusion end to end: a histomim ViT fine-tuned with LoRA inside HistoFusionForSurvival, from a table whose
histology column names real slides and tile folders, saved with its adapters and card, reloaded with identical risks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import save_tiny_encoder
from PIL import Image

from histomim.data.bags import spread_indices, tile_bag

NUM_PATIENTS = 16
TILES_PER_SLIDE = 4


@pytest.fixture(scope="module")
def study(tmp_path_factory, sample_slide_path):
    """16 breast-cancer patients, 8 with an event (4 tabular columns); patient 0's histology is the real CMU-1 slide (tiled on the
    fly), the others' a folder of 4 real 64 px tiles cut from a different part of it."""
    import tiffslide
    from sksurv.datasets import load_breast_cancer

    root = tmp_path_factory.mktemp("lora_fusion")
    encoder = save_tiny_encoder(root / "encoder", seed=0)
    slide = tiffslide.TiffSlide(sample_slide_path)
    region = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    features, outcome = load_breast_cancer()
    event = outcome["e.tdm"]
    rows = np.sort(np.r_[np.flatnonzero(event)[: NUM_PATIENTS // 2], np.flatnonzero(~event)[: NUM_PATIENTS // 2]])
    X = features.iloc[rows][["X200726_at", "X200965_s_at", "X201068_s_at", "age"]].astype(float)
    X = X.reset_index(drop=True)
    slides = [sample_slide_path]
    for patient in range(1, NUM_PATIENTS):
        folder = root / f"patient_{patient}"
        folder.mkdir()
        for tile in range(TILES_PER_SLIDE):
            y, x = 300 + 96 * (patient % 8) + 16 * tile, 300 + 400 * (patient // 8) + 64 * tile
            Image.fromarray(region[y : y + 64, x : x + 64]).save(folder / f"tile_{tile}.png")
        slides.append(str(folder))
    X["slide"] = slides
    return X, outcome[rows], encoder, root


def lora_estimator(encoder, **overrides):
    from histomim.survival.estimator import SurvivalEstimator

    settings = dict(
        histology_col="slide", histology_encoder=str(encoder), histology_tiles_per_slide=TILES_PER_SLIDE,
        lora_rank=4, linear="both", head="cox", epochs=8, random_state=0,
    )  # fmt: skip
    settings.update(overrides)
    return SurvivalEstimator(**settings)


def test_spread_indices_are_even_and_deterministic():
    assert spread_indices(3, 8).tolist() == [0, 1, 2]
    assert spread_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert spread_indices(100, None).tolist() == list(range(100))


def test_a_slide_is_tiled_on_the_fly_into_a_preprocessed_bag(study, sample_slide_path):
    from transformers import AutoConfig

    from histomim import image_processor_for

    _, _, encoder, root = study
    config = AutoConfig.from_pretrained(encoder)
    processor = image_processor_for(config)
    bag = tile_bag(sample_slide_path, processor, mpp=0.5, tile_size=32, max_tiles=6)
    assert bag.shape == (6, 3, 32, 32)
    torch.testing.assert_close(bag, tile_bag(sample_slide_path, processor, mpp=0.5, tile_size=32, max_tiles=6))
    folder_bag = tile_bag(root / "patient_1", processor, mpp=0.5, tile_size=32)
    assert folder_bag.shape == (TILES_PER_SLIDE, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        tile_bag(root / "missing_folder", processor, mpp=0.5, tile_size=32)


def test_lora_fusion_trains_adapters_only_saves_them_and_reloads_with_identical_risks(study, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    from histomim.survival.estimator import LORA_FOLDER
    from histomim.survival.model_card import write_model_card

    X, y, encoder, _ = study
    estimator = lora_estimator(encoder).fit(X, y)
    risk = estimator.predict(X)
    assert np.isfinite(risk).all() and risk.std() > 0
    assert estimator.loss_history_[-1] < estimator.loss_history_[0]

    # the ViT changed only by its (trained, non-zero) low-rank adapters: merged - base = scale * B @ A
    base = AutoModel.from_pretrained(encoder)
    adapter = estimator.lora_adapters_[0]
    merged = estimator.model_.histology_encoder.encoder
    for block in range(base.config.num_hidden_layers):
        prefix = f"base_model.model.blocks.{block}.attn.qkv"
        lora_a, lora_b = adapter["weights"][f"{prefix}.lora_A.weight"], adapter["weights"][f"{prefix}.lora_B.weight"]
        assert lora_b.abs().max() > 0  # trained: PEFT initialises B at zero
        delta = merged.blocks[block].attn.qkv.weight - base.blocks[block].attn.qkv.weight
        torch.testing.assert_close(delta, (adapter["config"].lora_alpha / 4) * lora_b @ lora_a, rtol=1e-4, atol=1e-6)
    merged_state, base_state = merged.state_dict(), base.state_dict()
    unchanged = [k for k in base_state if ".qkv." not in k]
    assert unchanged and all(torch.equal(merged_state[k], base_state[k]) for k in unchanged)

    (folder,) = estimator.save_pretrained(tmp_path / "model")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (folder / LORA_FOLDER).iterdir()}
    card = write_model_card(estimator, folder, len(X), int(y["e.tdm"].sum()), "trained here", "not evaluated")
    assert "LoRA rank 4 on qkv" in card.read_text()

    reloaded = AutoModel.from_pretrained(folder).eval()
    assert type(reloaded).__name__ == "HistoFusionForSurvival"
    inputs = estimator.model_inputs(X)
    assert inputs["histology"].shape == (NUM_PATIENTS, TILES_PER_SLIDE, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(**inputs).risk.double().numpy(), risk)

    # the adapters alone, the PEFT way, on the base encoder: the fine-tuned tile encoder
    tuned = PeftModel.from_pretrained(AutoModel.from_pretrained(encoder), folder / LORA_FOLDER).eval()
    tiles = inputs["histology"][1]
    with torch.no_grad():
        torch.testing.assert_close(
            tuned(pixel_values=tiles).pooler_output, merged(pixel_values=tiles).pooler_output, rtol=1e-4, atol=1e-5
        )


def test_same_random_state_gives_identical_lora_fusion_risks(study):
    X, y, encoder, _ = study
    first = lora_estimator(encoder, epochs=3).fit(X, y).predict(X)
    second = lora_estimator(encoder, epochs=3).fit(X, y).predict(X)
    np.testing.assert_array_equal(first, second)


def test_rank_zero_freezes_the_vit(study):
    from transformers import AutoModel

    X, y, encoder, _ = study
    estimator = lora_estimator(encoder, lora_rank=0, epochs=3).fit(X, y)
    assert estimator.lora_adapters_ is None
    base = AutoModel.from_pretrained(encoder).state_dict()
    fitted = estimator.model_.histology_encoder.encoder.state_dict()
    assert all(torch.equal(fitted[k], v) for k, v in base.items())


def test_the_encoder_needs_a_histology_column(study):
    X, y, encoder, _ = study
    with pytest.raises(ValueError, match="set histology_col"):
        lora_estimator(encoder, histology_col=None).fit(X.drop(columns="slide"), y)


def test_survival_cli_fine_tunes_the_vit_with_lora_and_saves_fold_models(study, tmp_path):
    from transformers import AutoModel

    from histomim.cli.survival import main
    from histomim.survival.estimator import LORA_FOLDER

    X, y, encoder, _ = study
    table = X.assign(days=y["t.tdm"], dead=y["e.tdm"].astype(int))
    table.to_csv(tmp_path / "study.csv", index=False)
    output = tmp_path / "out"
    table_args = [
        "--table", str(tmp_path / "study.csv"), "--time-col", "days", "--event-col", "dead",
        "--genomic-cols", "X200726_at", "X200965_s_at", "X201068_s_at", "age", "--output-dir", str(output),
    ]  # fmt: skip
    argv = [
        *table_args, "--slide-tiles-col", "slide", "--histology-encoder", str(encoder),
        "--tiles-per-slide", str(TILES_PER_SLIDE), "--lora-rank", "2", "--linear", "none", "--folds", "2",
        "--epochs", "3", "--n-bootstrap", "0", "--save-models",
    ]  # fmt: skip
    assert main(argv) == 0
    folds = sorted((output / "models").glob("*/fold_*"))
    assert len(folds) == 2
    for fold in folds:
        assert (fold / LORA_FOLDER / "adapter_model.safetensors").is_file()
        assert "LoRA rank 2 on qkv" in (fold / "README.md").read_text()
        model = AutoModel.from_pretrained(fold)
        assert model.config.histology_encoder.image_size == 32
    predictions = pd.read_csv(output / "predictions.csv")
    assert len(predictions) == NUM_PATIENTS and np.isfinite(predictions.filter(like="risk").to_numpy()).all()

    with pytest.raises(ValueError, match="go together"):
        main([*table_args, "--slide-tiles-col", "slide"])
