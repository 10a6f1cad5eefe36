"""The nucleus recipe's statistics and plumbing: repeated paired splits, the tuning/report pools, the tiles, the
side-by-side table and the command line. Behaviour only; the recipe's figures are in docs/evaluation.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from histomim.data.samples import sample_nuclei_pairs
from histomim.evaluation import EvaluationSettings, nucleus_crops
from histomim.evaluation.data import LabelledImages
from histomim.evaluation.learning_curve import corrected_paired_p, learning_curve, paired_summary, repeated_split_scores
from histomim.evaluation.recipe import (chosen_by_rule, cut_slide_tiles, main, nucleus_pools, objectives_table,
                                       parse_args, preset_for, select_recipe, selection_table)

SETTINGS = EvaluationSettings(pooling="mean", protocols=("linear", "knn"), knn_k=3)


@pytest.fixture(scope="module")
def nuclei():
    return nucleus_crops(sample_nuclei_pairs(), crop_size=32)


def fake_data(labels) -> LabelledImages:
    return LabelledImages([None] * len(labels), labels, ["a", "b", "c"], [f"g{i}" for i in range(len(labels))], "fake")


def test_paired_summary_known_answer():
    summary = paired_summary([0.8, 0.6, 0.7, 0.5], [0.6, 0.6, 0.4, 0.7])
    assert summary["mean"] == pytest.approx(0.65) and summary["std"] == pytest.approx(np.std([0.8, 0.6, 0.7, 0.5]))
    assert summary["difference_mean"] == pytest.approx(0.075)  # (0.2 + 0 + 0.3 - 0.2) / 4
    assert summary["difference_std"] == pytest.approx(np.std([0.2, 0.0, 0.3, -0.2]))
    assert summary["won"] == 0.5 and summary["tied"] == 0.25 and summary["splits"] == 4
    assert summary["p_value"] is None  # no test fraction given
    with pytest.raises(ValueError, match="same, non-zero number of splits"):
        paired_summary([0.5, 0.6], [0.5])


def test_corrected_t_test_known_answer_and_its_floor():
    from scipy import stats

    difference = np.array([0.2, 0.0, 0.3, -0.2])  # mean 0.075, sample std 0.2217
    t = 0.075 / np.sqrt(np.var(difference, ddof=1) * (1 / 4 + 0.3 / 0.7))  # Nadeau & Bengio's variance
    assert corrected_paired_p(difference, 0.3) == pytest.approx(stats.t.sf(t, 3))
    assert paired_summary([0.8, 0.6, 0.7, 0.5], [0.6, 0.6, 0.4, 0.7], 0.3)["p_value"] == pytest.approx(stats.t.sf(t, 3))
    # more splits of the same images cannot make a difference certain: the n_test / n_train term remains
    noisy = np.random.default_rng(0).normal(0.06, 0.09, 10_000)
    plain = stats.ttest_1samp(noisy, 0, alternative="greater").pvalue
    assert plain < 1e-6 < 0.1 < corrected_paired_p(noisy, 0.3)
    assert corrected_paired_p(np.full(5, 0.1), 0.3) == 0.0 and corrected_paired_p(np.zeros(5), 0.3) == 1.0
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 1.5"):
        corrected_paired_p(difference, 1.5)


def test_repeated_splits_score_each_seed_and_pair_encoders():
    labels = np.repeat([0, 1, 2], 20)  # (60,)
    rng = np.random.default_rng(0)
    separable = np.eye(3)[labels] * 5 + rng.normal(0, 0.1, (60, 3))  # (60, 3): the label, plainly
    noise = rng.normal(0, 1, (60, 3))  # (60, 3): nothing to learn
    data = fake_data(labels)
    good = repeated_split_scores(separable, data, SETTINGS, range(4))
    bad = repeated_split_scores(noise, data, SETTINGS, range(4))
    assert set(good) == {"linear", "knn"} and all(len(v) == 4 for v in good.values())
    assert good["linear"] == [1.0] * 4 and good["knn"] == [1.0] * 4
    assert np.mean(bad["linear"]) < 0.7 and len(set(bad["linear"])) > 1  # the splits differ
    assert paired_summary(good["linear"], bad["linear"])["won"] == 1.0
    assert repeated_split_scores(noise, data, SETTINGS, range(4)) == bad  # fixed by the seeds


def test_learning_curve_pairs_every_checkpoint_with_the_twin_on_the_same_splits(nuclei, tmp_path):
    from safetensors.torch import save_file

    from histomim import HistoMIMForPreTraining
    from histomim.evaluation.embeddings import random_init_twin

    config = tiny_config(image_size=32, patch_size=8, objective="simmim")  # its checkpoints hold a mask token
    twin = random_init_twin(config, seed=0)
    torch.manual_seed(1)
    other = HistoMIMForPreTraining(config)
    for step, state in ((10, {f"histomim.{k}": v for k, v in twin.state_dict().items()}), (20, other.state_dict())):
        folder = tmp_path / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    pool = nucleus_pools(nuclei)["report"]
    points = learning_curve(tmp_path, pool, SETTINGS, split_seeds=range(3), config=config)
    assert [p["step"] for p in points] == [0, 10, 20]
    # a checkpoint holding the twin's weights: the same score on every split, so a zero difference, all ties
    assert points[1]["scores"] == points[0]["scores"]
    assert points[1]["summary"]["linear"]["difference_std"] == 0 and points[1]["summary"]["knn"]["tied"] == 1.0
    assert points[2]["scores"] != points[0]["scores"] and points[2]["summary"]["linear"]["splits"] == 3


def test_learning_curve_reads_convnext_checkpoints(nuclei, tmp_path):
    from safetensors.torch import save_file

    from histomim import HistoMIMConvNextConfig, HistoMIMConvNextForPreTraining, HistoMIMConvNextModel
    from histomim.evaluation.embeddings import random_init_twin
    from histomim.evaluation.learning_curve import checkpoint_encoder

    config = HistoMIMConvNextConfig(image_size=32, stem_size=1, depths=[1, 1], hidden_sizes=[8, 16], decoder_hidden_size=8)
    twin = random_init_twin(config, seed=0)
    torch.manual_seed(1)
    trained = HistoMIMConvNextForPreTraining(config).state_dict()  # the pretraining model: encoder + decoder
    folder = tmp_path / "checkpoints" / "step_00000010"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trained.items()}, str(folder / "model.safetensors"))
    encoder = checkpoint_encoder(folder, config)
    assert isinstance(encoder, HistoMIMConvNextModel)
    assert all(torch.equal(v, trained[f"histomim.{k}"]) for k, v in encoder.state_dict().items())
    points = learning_curve(tmp_path, nucleus_pools(nuclei)["tune"], SETTINGS, split_seeds=range(2), config=config)
    assert [p["step"] for p in points] == [0, 10] and points[1]["scores"] != points[0]["scores"]
    assert not any(torch.equal(v, twin.state_dict()[k]) for k, v in encoder.state_dict().items() if v.numel() > 1 and v.std() > 0)


def test_the_selection_rule_needs_both_probes_positive_then_the_best_linear():
    def row(linear, knn):
        return {"summary": {"linear": {"difference_mean": linear}, "knn": {"difference_mean": knn}}}

    rows = [row(0.09, -0.01), row(0.04, 0.10), row(0.06, 0.01), row(0.0, 0.2)]
    assert chosen_by_rule(rows) is rows[2]  # 0.09 has a negative kNN difference; 0.0 is not positive
    assert chosen_by_rule([row(0.1, 0.0), row(-0.1, 0.3)]) is None


def test_select_recipe_probes_each_final_checkpoint_with_every_feature(nuclei, tmp_path):
    from safetensors.torch import save_file

    from histomim import HistoMIMConvNextConfig, HistoMIMForPreTraining
    from histomim.evaluation.embeddings import random_init_twin

    vit = tiny_config(image_size=32, patch_size=8)
    cnn = HistoMIMConvNextConfig(image_size=32, stem_size=1, depths=[1, 1], hidden_sizes=[8, 16], decoder_hidden_size=8)
    runs = []
    for name, config in (("vit", vit), ("cnn", cnn)):
        run = tmp_path / name
        config.save_pretrained(run)
        twin = {f"histomim.{k}": v for k, v in random_init_twin(config, seed=0).state_dict().items()}
        torch.manual_seed(1)
        other = HistoMIMForPreTraining(config).state_dict() if name == "vit" else {k: v + 0.05 * torch.randn_like(v) for k, v in twin.items()}
        for step, state in ((5, other), (10, twin)):  # the final checkpoint holds the twin's weights
            folder = run / "checkpoints" / f"step_{step:08d}"
            folder.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        runs.append(run)
    features = (("mean", 1), ("mean", None), ("cls+mean", 1))
    crops = {32: nucleus_pools(nuclei)["tune"], 48: nucleus_pools(nucleus_crops(sample_nuclei_pairs(), crop_size=48))["tune"]}
    selection = select_recipe(runs, crops, range(2), features=features)
    per_crop = ["mean/layer1", "mean/last", "cls+mean/layer1"]
    assert [(Path(r["run"]).name, r["crop_size"], r["features"]) for r in selection["rows"]] == (
        [("vit", crop, f) for crop in (32, 48) for f in per_crop] + [("cnn", crop, f) for crop in (32, 48) for f in per_crop[:2]])
    assert {r["step"] for r in selection["rows"]} == {10}  # the final checkpoint only
    assert all(r["summary"]["linear"]["difference_mean"] == 0 for r in selection["rows"])  # it is the twin
    assert selection["chosen"] is None and "tuning pool" in selection["rule"]
    assert selection_table(selection).count("\n") == 1 + len(selection["rows"])


def test_nucleus_pools_are_disjoint_stratified_and_fixed(nuclei):
    pools = nucleus_pools(nuclei)
    assert (len(pools["tune"]), len(pools["report"])) == (50, 75)
    for name in ("1", "2", "3", "5"):  # every class in both, in proportion (within one nucleus)
        assert abs(pools["tune"].class_counts()[name] - 0.4 * nuclei.class_counts()[name]) <= 1
    tune = {np.asarray(image).tobytes() for image in pools["tune"].images}
    report = {np.asarray(image).tobytes() for image in pools["report"].images}
    assert not tune & report and len(tune | report) == len(nuclei)
    again = nucleus_pools(nuclei)["report"]
    assert [np.asarray(a).tobytes() for a in again.images] == [np.asarray(b).tobytes() for b in pools["report"].images]
    assert "report pool (75 of 125" in pools["report"].description


def test_context_crops_keep_each_pool_on_the_same_nuclei():
    # --crop-size 64 must change what the probe sees around each nucleus, never which nuclei are in which pool
    from histomim.evaluation.recipe import recipe_nuclei

    for pool in ("tune", "report"):
        bare, context = recipe_nuclei(pool, 32), recipe_nuclei(pool, 64)
        assert np.array_equal(bare.labels, context.labels) and {image.size for image in context.images} == {(64, 64)}
        centres = [np.asarray(image)[16:48, 16:48] for image in context.images]  # the middle 32 px of each 64 px crop
        assert all(np.array_equal(centre, np.asarray(image)) for centre, image in zip(centres, bare.images))
        assert "64 px nucleus crops" in context.description


def test_cut_slide_tiles_writes_the_manifest_tiles_at_each_resolution(sample_slide_path, tmp_path):
    from PIL import Image

    from histomim.data.slides import open_slide
    from histomim.data.tiling import tile_manifest
    from histomim.data.tissue import detect_tissue

    count = cut_slide_tiles(sample_slide_path, tmp_path, resolutions=((4.0, 32), (8.0, 16)))
    with open_slide(sample_slide_path) as slide:
        tissue = detect_tissue(slide)
        expected = [len(tile_manifest(slide, tissue, mpp=m, tile_size=s, min_tissue=0.5)) for m, s in ((4.0, 32), (8.0, 16))]
    files = sorted(tmp_path.glob("*.png"))
    assert count == len(files) == sum(expected) and all(expected)
    assert {Image.open(f).size for f in files if "_4mpp_" in f.name} == {(32, 32)}
    assert len([f for f in files if "_8mpp_" in f.name]) == expected[1]
    assert cut_slide_tiles(sample_slide_path, tmp_path, resolutions=((4.0, 32), (8.0, 16))) == count  # reused


def test_objectives_table_puts_each_run_beside_its_twin(tmp_path):
    def report(objective, model, twin):
        points = [{"step": 0, "scores": {p: twin for p in ("linear", "knn")}},
                  {"step": 300, "scores": {p: model for p in ("linear", "knn")}}]  # fmt: skip
        path = tmp_path / f"{objective}.json"
        settings = {"pooling": "mean", "layer": 2, "test_size": 0.3}
        path.write_text(json.dumps({"objective": objective, "mask_ratio": 0.5, "settings": settings, "points": points}))
        return path

    table = objectives_table([report("mae", [0.8, 0.7], [0.6, 0.6]), report("simmim", [0.5, 0.6], [0.6, 0.6])])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|") == 14
    p_mae = corrected_paired_p(np.array([0.2, 0.1]), 0.3)
    assert lines[2].startswith(f"| {tmp_path.name} | mae (0.5), mean/layer2, 32 px | 300 | 0.750 ± 0.050 | 0.600 ± 0.000 | +0.150 ± 0.050 | 2/2 | {p_mae:.3f} |")
    assert "| -0.050 ± 0.050 | 0/2 |" in lines[3]
    at_start = objectives_table([tmp_path / "mae.json"], step=0).splitlines()[2]
    assert at_start.startswith(f"| {tmp_path.name} | mae (0.5), mean/layer2, 32 px | 0 | 0.600 ± 0.000 | 0.600 ± 0.000 | +0.000 ± 0.000 | 0/2 | 1.000 |")
    with pytest.raises(ValueError, match="mae.json: no checkpoint at step 100; it has steps"):
        objectives_table([tmp_path / "mae.json"], step=100)
    # a report copied away from its run (as into docs/) is named by the run it records, with its crop size
    copied = json.loads((tmp_path / "mae.json").read_text()) | {"pretraining": {"output_dir": "outputs/nano-5000"}, "crop_size": 64}
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "mae.json").write_text(json.dumps(copied))
    assert objectives_table([tmp_path / "docs" / "mae.json"]).splitlines()[2].startswith("| nano-5000 | mae (0.5), mean/layer2, 64 px | 300 |")


def test_recipe_command_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--objective", "--tiles", "--pool", "--split-seeds", "--pooling", "--layer", "--table", "--tokenizer-steps",
                 "--crop-size", "--select-features", "--select-crop-sizes"):
        assert flag in text
    chosen = parse_args(["--select", "run", "--select-features", "mean/2", "cls+mean/last", "--select-crop-sizes", "32", "64"])
    assert chosen.select_features == [("mean", 2), ("cls+mean", None)] and chosen.select_crop_sizes == [32, 64]
    with pytest.raises(SystemExit):
        parse_args(["--select-features", "max/2"])
    args = parse_args([])
    assert (args.objective, args.pool, args.split_seeds, args.layer) == ("mae", "report", 20, 2)
    assert parse_args(["--layer", "last"]).layer is None and parse_args(["--layer", "-1"]).layer == -1
    with pytest.raises(SystemExit):
        parse_args(["--layer", "top"])
    with pytest.raises(SystemExit):
        parse_args(["--objective", "tokenizer"])  # the tokenizer is trained for beit, not a recipe of its own
    assert preset_for("fcmae") == "histomim-convnext-nano-nuclei" and preset_for("beit") == "histomim-vit-nano-nuclei"
    assert parse_args(["--objective", "fcmae", "--resume"]).resume and not parse_args([]).resume
    assert parse_args([]).config is None and parse_args(["--config", "histomim-vit-tiny16"]).config == "histomim-vit-tiny16"
    assert parse_args([]).tiles == "grid" and parse_args(["--tiles", "nuclei"]).tiles == "nuclei"
    with pytest.raises(SystemExit):
        parse_args(["--tiles", "random"])


def test_recipe_end_to_end_on_nucleus_centred_tiles(tmp_path, capsys):
    """The whole command, shortened: nucleus tiles cut from the real unlabelled images, 2 pretraining steps, the
    tuning pool probed at every checkpoint beside the twin, the report and the figure written."""
    run = tmp_path / "nano"
    assert main(["--tiles", "nuclei", "--output-dir", str(run), "--max-steps", "2", "--checkpointing-steps", "1",
                 "--pool", "tune", "--split-seeds", "2"]) == 0  # fmt: skip
    tiles = sorted((tmp_path / "recipe_nucleus_tiles").glob("*.png"))
    assert len(tiles) > 1000 and all("_nucleus40_" in t.name for t in tiles)
    report = json.loads((run / "learning_curve_tune_mean-layer2.json").read_text())
    assert report["tiles"] == "nuclei" and [p["step"] for p in report["points"]] == [0, 1, 2]
    assert all(p["summary"]["linear"]["p_value"] is not None for p in report["points"])
    assert (run / "learning_curve_tune_mean-layer2.png").stat().st_size > 0
    assert f"{len(tiles)} unlabelled H&E tiles (nuclei)" in capsys.readouterr().out
