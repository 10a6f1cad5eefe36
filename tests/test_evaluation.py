"""The evaluation harness on the real cellseg nucleus patches: data, embeddings, protocols, report, card.

These tests check behaviour (shapes, splits, metrics equal to sklearn's, the random-init twin, the
model-index round trip), never that an encoder is good.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import save_tiny_encoder, tiny_config
from PIL import Image

from histomim import HistoMIMModel, image_processor_for
from histomim.data.samples import sample_nuclei_pairs
from histomim.evaluation import EvaluationSettings, evaluate_encoder, nucleus_crops, split_images
from histomim.evaluation.data import hf_dataset, image_folder, image_table, read_hovernet_mask
from histomim.evaluation.embeddings import embed_images, image_processor, random_init_twin
from histomim.evaluation.probes import few_shot, knn_probe, linear_probe, score

FAST = dict(shots=(1, 2), few_shot_seeds=2, knn_k=5)


@pytest.fixture(scope="module")
def nuclei():
    return nucleus_crops(sample_nuclei_pairs(), crop_size=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny histomim encoder for 32 px crops, with its image processor and no card."""
    return save_tiny_encoder(tmp_path_factory.mktemp("encoder"), seed=3)


def test_nucleus_crops_are_centred_on_each_labelled_nucleus(nuclei):
    assert len(nuclei) == 20 + 47 + 58
    assert nuclei.class_names == ["1", "2", "3", "5"]
    assert nuclei.class_counts() == {"1": 63, "2": 24, "3": 19, "5": 19}
    assert sorted(set(nuclei.groups)) == ["patch1.png", "patch2.png", "patch3.png"]
    image_path, mask_path = sample_nuclei_pairs()[2]
    rgb = np.asarray(Image.open(image_path).convert("RGB"))
    mask = read_hovernet_mask(mask_path)
    first = int(np.flatnonzero(nuclei.groups == "patch3.png")[0])
    for offset in (0, 5):  # an interior nucleus: the crop centre is the image pixel at its centroid
        x, y = np.round(mask["inst_centroid"][offset]).astype(int)
        crop = np.asarray(nuclei.images[first + offset])
        assert crop.shape == (32, 32, 3)
        if 16 <= x < 240 and 16 <= y < 240:
            np.testing.assert_array_equal(crop[16, 16], rgb[y, x])
            assert mask["inst_map"][y, x] != 0  # the centroid lies on the nucleus
    assert nuclei.class_names[nuclei.labels[first]] == str(mask["inst_type"][0])


def test_splits_are_fixed_by_seed_stratified_or_by_group(nuclei):
    a, b = split_images(nuclei, "stratified", 0.3, seed=0), split_images(nuclei, "stratified", 0.3, seed=0)
    np.testing.assert_array_equal(a.test, b.test)
    assert not set(a.train) & set(a.test) and len(a.train) + len(a.test) == len(nuclei)
    assert set(nuclei.labels[a.test]) == set(nuclei.labels)  # stratified: every class is tested
    other = split_images(nuclei, "stratified", 0.3, seed=1)
    assert not np.array_equal(a.test, other.test)
    group = split_images(nuclei, "group", 0.3, seed=0)
    assert not set(nuclei.groups[group.train]) & set(nuclei.groups[group.test])


def test_metrics_match_sklearn_on_a_fixed_toy_case():
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    labels = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    probabilities = np.array([
        [0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.2, 0.6, 0.2], [0.5, 0.3, 0.2],
        [0.1, 0.1, 0.8], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.6, 0.3, 0.1],
    ])  # fmt: skip
    metrics = score(labels, probabilities, 3)
    predictions = probabilities.argmax(1)
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, probabilities, multi_class="ovr"))
    binary = score(np.array([0, 1, 1, 0]), np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.4, 0.6]]), 2)
    assert binary["auroc"] == pytest.approx(0.75)
    # a class missing from the test labels is left out of AUROC instead of failing
    partial = score(np.array([0, 0, 1, 1]), np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1]]), 3)
    assert partial["auroc"] == pytest.approx(np.mean([roc_auc_score([1, 1, 0, 0], [0.6, 0.2, 0.1, 0.5]),
                                                      roc_auc_score([0, 0, 1, 1], [0.3, 0.7, 0.8, 0.4])]))


def test_protocols_separate_separable_features_and_choose_c_by_cv():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 30)
    features = rng.normal(size=(90, 8)) + 4 * np.eye(3, 8)[labels]  # three well separated clusters
    train, test = np.arange(90) % 3 != 0, np.arange(90) % 3 == 0
    args = (features[train], labels[train], features[test], labels[test], 3)
    linear = linear_probe(*args)
    assert linear["balanced_accuracy"] > 0.9 and linear["C"] in np.logspace(-4, 3, 8) and linear["cv_folds"] == 5
    assert knn_probe(*args, k=5)["balanced_accuracy"] > 0.9
    shots = few_shot(*args, shots=(1, 5), seeds=range(3))
    assert set(shots) == {1, 5} and shots[5]["balanced_accuracy"] > 0.8 and shots[1]["seeds"] == [0, 1, 2]
    noise = linear_probe(rng.normal(size=(60, 8)), labels[:60] % 2, rng.normal(size=(30, 8)), labels[:30] % 2, 2)
    assert noise["balanced_accuracy"] < 0.8  # no signal, no score


def test_embeddings_pooling_and_layers(nuclei, model_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir)
    processor = image_processor(str(model_dir), model.config)
    images = nuclei.images[:5]
    dim = model.config.hidden_size
    cls = embed_images(model, images, processor, "cls", batch_size=2)
    assert cls.shape == (5, dim) and cls.dtype == np.float32
    with torch.no_grad():
        expected = model(**processor(images=images, return_tensors="pt")).pooler_output  # config pooling is cls
    np.testing.assert_allclose(cls, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert embed_images(model, images, processor, "mean").shape == (5, dim)
    both = embed_images(model, images, processor, "cls+mean")
    assert both.shape == (5, 2 * dim) and np.allclose(both[:, :dim], cls, atol=1e-6)
    layer1 = embed_images(model, images, processor, "mean", layer=1)
    assert layer1.shape == (5, dim) and not np.allclose(layer1, embed_images(model, images, processor, "mean"))


def test_random_init_twin_is_seeded_and_untrained(model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    state = torch.random.get_rng_state()
    a, b, c = random_init_twin(config, 0), random_init_twin(config, 0), random_init_twin(config, 1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was
    weight = "blocks.0.attn.qkv.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])
    assert type(a) is HistoMIMModel


def test_cli_reports_model_and_random_init_twin_and_writes_model_index(model_dir, capsys):
    import json

    from huggingface_hub import ModelCard

    from histomim.cli import main

    argv = ["evaluate", "--model", str(model_dir), "--nuclei", "--knn-k", "5", "--shots", "1", "2",
            "--few-shot-seeds", "2"]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "random init" in table and "linear probe" in table and "2-shot" in table
    report = json.loads((model_dir / "evaluation" / "nuclei__cellseg_sample_.json").read_text())
    assert set(report["results"]) == {"model", "random_init"}
    assert report["split"] == {"method": "stratified", "seed": 0, "test_size": 0.3, "num_train": 87, "num_test": 38}
    assert report["data"]["counts"] == {"1": 63, "2": 24, "3": 19, "5": 19}
    for results in report["results"].values():
        assert set(results) == {"linear", "knn", "few_shot"} and set(results["few_shot"]) == {"1", "2"}

    card = ModelCard.load(model_dir / "README.md")
    results = card.data.eval_results
    assert len(results) == 4 * 3  # linear, kNN, 1-shot, 2-shot x three metrics; the twin is not in model-index
    linear = {r.metric_type: r.metric_value for r in results if r.metric_config.startswith("linear probe")}
    assert linear["balanced_accuracy"] == pytest.approx(report["results"]["model"]["linear"]["balanced_accuracy"], abs=1e-4)
    assert card.data.model_name == model_dir.name and "random init" in card.text
    assert main(argv) == 0  # a rerun replaces its own entries
    assert len(ModelCard.load(model_dir / "README.md").data.eval_results) == 12


def test_a_plain_vit_and_the_to_vit_export_work_as_encoders(nuclei, tmp_path):
    from transformers import ViTConfig, ViTModel

    from histomim.export import to_vit

    torch.manual_seed(0)
    encoder = HistoMIMModel(tiny_config(image_size=32, patch_size=8))
    export = tmp_path / "export"
    to_vit(encoder).save_pretrained(export)
    image_processor_for(encoder.config).save_pretrained(export)
    settings = EvaluationSettings(protocols=("linear",), **FAST)
    exported = evaluate_encoder(str(export), nuclei, settings)
    original = evaluate_encoder(encoder, nuclei, settings)
    # the export computes the same features, so the probe gives the same scores
    assert exported["results"]["model"]["linear"] == pytest.approx(original["results"]["model"]["linear"], abs=1e-6)
    assert exported["architecture"] == "ViTModel"

    plain = tmp_path / "vit"  # a ViT folder without an image processor: ImageNet statistics at its size
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(plain)  # fmt: skip
    report = evaluate_encoder(str(plain), nuclei, EvaluationSettings(pooling="cls+mean", protocols=("knn",), **FAST))
    assert set(report["results"]) == {"model", "random_init"} and 0 <= report["results"]["random_init"]["knn"]["auroc"] <= 1


def test_folder_table_and_dataset_sources_give_the_same_labels(nuclei, tmp_path):
    import datasets
    import pandas as pd

    rows = []
    for i in range(0, len(nuclei), 10):
        name = nuclei.class_names[nuclei.labels[i]]
        path = tmp_path / "by_class" / f"type{name}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        nuclei.images[i].save(path)
        rows.append({"path": str(path.relative_to(tmp_path)), "label": f"type{name}", "slide": nuclei.groups[i]})
    folder = image_folder(tmp_path / "by_class")
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    table = image_table(tmp_path / "labels.csv", group_column="slide")
    frame = pd.DataFrame(rows).sort_values("path")  # the folder lists classes, then files, in sorted order
    expected = [folder.class_names.index(label) for label in frame["label"]]
    np.testing.assert_array_equal(folder.labels, expected)
    assert table.class_names == folder.class_names and sorted(set(table.groups)) == sorted(set(nuclei.groups))
    assert np.asarray(table.images[0]).shape == (32, 32, 3)

    dataset = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / r["path"]) for r in rows], "label": [r["label"] for r in rows]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=folder.class_names)}),
    )
    loaded = hf_dataset(dataset)
    assert loaded.class_names == folder.class_names and len(loaded) == len(rows)
    assert loaded.images[1].mode == "RGB"


def test_learning_curve_reads_pretraining_checkpoints_and_cut_tiles(tmp_path):
    from safetensors.torch import save_file

    from histomim import HistoMIMForPreTraining
    from histomim.data.samples import sample_unlabelled_he_dir
    from histomim.evaluation.learning_curve import checkpoint_encoder, checkpoint_steps
    from histomim.evaluation.recipe import cut_tiles

    images = sorted(sample_unlabelled_he_dir().glob("*.png"))
    assert [p.name for p in images] == ["HE.png", "test1.png", "test2.png"]
    assert cut_tiles(images[:1], tmp_path / "tiles", sizes=(250,)) == 9  # 500 px at stride 125
    assert len(list((tmp_path / "tiles").glob("*.png"))) == 9

    config = tiny_config(image_size=32, patch_size=8)
    torch.manual_seed(0)
    pretraining = HistoMIMForPreTraining(config)
    for step in (20, 10):
        folder = tmp_path / "run" / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        save_file(pretraining.state_dict(), str(folder / "model.safetensors"))
    (tmp_path / "run" / "checkpoints" / ".partial-step_00000030").mkdir()
    assert [step for step, _ in checkpoint_steps(tmp_path / "run")] == [10, 20]
    encoder = checkpoint_encoder(tmp_path / "run" / "checkpoints" / "step_00000010", config)
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(encoder(pixels).last_hidden_state, pretraining.histomim.eval()(pixels).last_hidden_state)
