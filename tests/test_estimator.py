"""SurvivalEstimator on the real breast-cancer cohort: sklearn/sksurv compatibility, survival functions,
determinism, categorical encoding, and the histology/radiology columns of the fusion model."""

import re

import numpy as np
import pytest
import torch

from histomim.survival import SurvivalEstimator
from histomim.survival.labels import patient_folds, split_survival
from histomim.survival.metrics import evaluate

FAST = dict(epochs=30, random_state=0, linear="none")  # the network alone: these tests check it learns


@pytest.fixture(scope="module")
def cohort():
    from histomim.survival.study import breast_cancer_study

    return breast_cancer_study()


@pytest.fixture(scope="module")
def split(cohort):
    X, y = cohort
    train, test = patient_folds(X, labels=y, n_splits=4, seed=0)[0]
    return X.iloc[train], y[train], X.iloc[test], y[test]


@pytest.fixture(scope="module")
def fitted(split):
    X_train, y_train, _, _ = split
    return {head: SurvivalEstimator(head=head, **FAST).fit(X_train, y_train) for head in ("cox", "discrete")}


def test_uses_the_fusion_model_with_one_hot_categoricals(fitted, split):
    model = fitted["cox"]
    from histomim.multimodal.modeling_fusion import HistoFusionForSurvival

    assert isinstance(model.model_, HistoFusionForSurvival)
    assert model.model_.config.modalities == ["genomic"]
    names = model.model_.config.genomic_feature_names
    assert "er_positive" in names and "grade_poorly differentiated" in names and "X204540_at" in names
    levels = split[0]["er"].nunique() + split[0]["grade"].nunique()
    assert model.model_.config.genomic_num_features == len(names) == 76 + 2 + levels


@pytest.mark.parametrize("head", ["cox", "discrete"])
def test_learns_and_beats_chance_on_held_out_patients(fitted, split, head):
    X_train, y_train, X_test, y_test = split
    model = fitted[head]
    assert model.loss_history_[-1] < model.loss_history_[0]
    assert model.score(X_train, y_train) > 0.7
    risk = model.predict(X_test)
    assert risk.shape == (len(X_test),) and np.isfinite(risk).all()
    scores = evaluate(y_train, y_test, risk, model.predict_survival_function(X_test))
    assert scores["harrell_c"] > 0.55 and 0.0 < scores["integrated_brier_score"] < 0.25


@pytest.mark.parametrize("head", ["cox", "discrete"])
def test_survival_functions_are_non_increasing_step_functions_in_unit_interval(fitted, split, head):
    from sksurv.functions import StepFunction

    model, X_test = fitted[head], split[2]
    functions = model.predict_survival_function(X_test.iloc[:8])
    assert len(functions) == 8 and all(isinstance(f, StepFunction) for f in functions)
    grid = np.linspace(0, model.unique_times_.max(), 50)
    curves = np.vstack([f(grid) for f in functions])  # (8, 50)
    assert np.all((curves >= 0) & (curves <= 1)) and np.all(np.diff(curves, axis=1) <= 1e-12)
    assert np.all(curves[:, 0] == 1.0) and curves[:, -1].mean() < 0.9  # KM at the last time is ~0.5
    array = model.predict_survival_function(X_test.iloc[:8], return_array=True)
    np.testing.assert_allclose(array, np.vstack([f.y for f in functions]))
    # a higher risk score means a lower survival curve
    risk = model.predict(X_test.iloc[:8])
    assert np.corrcoef(risk, curves[:, -1])[0, 1] < -0.9


def test_deterministic_with_random_state_and_leaves_global_rng_alone(split):
    X_train, y_train, X_test, _ = split
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    a = SurvivalEstimator(epochs=5, random_state=7).fit(X_train, y_train).predict(X_test)
    assert torch.equal(torch.rand(3), expected_draw)
    b = SurvivalEstimator(epochs=5, random_state=7).fit(X_train, y_train).predict(X_test)
    c = SurvivalEstimator(epochs=5, random_state=8).fit(X_train, y_train).predict(X_test)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_numpy_input_and_unknown_categories(split):
    X_train, y_train, X_test, _ = split
    numeric = X_train.select_dtypes("number").to_numpy()
    model = SurvivalEstimator(**FAST).fit(numeric, y_train)
    assert model.predict(X_test.select_dtypes("number").to_numpy()).shape == (len(X_test),)
    categorical = SurvivalEstimator(epochs=2, random_state=0).fit(X_train, y_train)
    unseen = X_test.astype({"grade": object}).assign(grade="not graded")
    assert np.isfinite(categorical.predict(unseen)).all()


def test_bad_inputs_raise_clear_errors(split):
    X_train, y_train, X_test, _ = split
    with pytest.raises(ValueError, match="no events"):
        SurvivalEstimator(epochs=1).fit(X_train, np.array([(False, t) for _, t in y_train], dtype=y_train.dtype))
    with pytest.raises(ValueError, match="X has 10 rows but y has"):
        SurvivalEstimator(epochs=1).fit(X_train.iloc[:10], y_train)
    with pytest.raises(ValueError, match="structured array"):
        SurvivalEstimator(epochs=1).fit(X_train, split_survival(y_train)[1])
    with pytest.raises(ValueError, match="`head` must be"):
        SurvivalEstimator(epochs=1, head="aft").fit(X_train, y_train)
    model = SurvivalEstimator(epochs=1).fit(X_train, y_train)
    with pytest.raises(ValueError, match="fitted with"):
        model.predict(X_test.drop(columns=["age"]))
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        SurvivalEstimator().predict(X_test)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("event", 0.5, r"event field 'event' of y must hold booleans or 0/1, got 0.5 at index 3"),
        ("event", 2.0, r"event field 'event' of y must hold booleans or 0/1, got 2.0 at index 3"),
        ("time", np.nan, r"time field 'time' of y has a missing \(NaN\) time at index 3"),
        ("time", -2.0, r"time field 'time' of y has a negative time at index 3"),
        ("time", np.inf, r"time field 'time' of y has an infinite time at index 3"),
    ],
)
def test_fit_validates_outcomes_as_strictly_as_sksurv(split, field, value, message):
    X_train, y_train, _, _ = split
    y = y_train.astype([("event", float), ("time", float)])
    y[field][3] = value
    with pytest.raises(ValueError, match=message):
        SurvivalEstimator(**FAST).fit(X_train, y)


def test_fit_refuses_a_single_patient(split):
    X_train, y_train, _, _ = split
    with pytest.raises(ValueError, match=r"y holds 1 patient\(s\); fitting a survival model needs at least 2"):
        SurvivalEstimator(**FAST, head="cox").fit(X_train.iloc[:1], y_train[:1])


def test_numbers_given_as_text_are_parsed_not_one_hot_encoded(fitted, split):
    X_train, y_train, X_test, _ = split

    def as_text(X):
        return X.astype({"age": str, "size": str})  # e.g. a CSV column that pandas read as text

    numeric = fitted["discrete"]
    text = SurvivalEstimator(**FAST).fit(as_text(X_train), y_train)
    assert text.model_.config.genomic_feature_names == numeric.model_.config.genomic_feature_names
    np.testing.assert_array_equal(text.predict(as_text(X_test)), numeric.predict(X_test))

    mixed = as_text(X_train)
    mixed.loc[mixed.index[4], "size"] = "n/a"
    with pytest.raises(ValueError, match=rf"column 'size' mixes numbers and text: .*'n/a' at row {mixed.index[4]}"):
        SurvivalEstimator(**FAST).fit(mixed, y_train)
    mixed = as_text(X_test)
    mixed.loc[mixed.index[0], "size"] = "unknown"
    with pytest.raises(ValueError, match=rf"column 'size' mixes numbers and text: .*'unknown' at row {mixed.index[0]}"):
        text.predict(mixed)


def test_cross_val_score_and_grid_search_with_sksurv_scorers(cohort):
    from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
    from sksurv.metrics import (
        as_concordance_index_ipcw_scorer,
        as_integrated_brier_score_scorer,
    )

    X, y = cohort
    X = X[["age", "size", "er", "grade", "X204540_at", "X221928_at", "X202240_at"]]
    cv = KFold(3, shuffle=True, random_state=0)
    scores = cross_val_score(SurvivalEstimator(epochs=15, random_state=0), X, y, cv=cv)
    assert scores.shape == (3,) and np.all((scores > 0.5) & (scores < 1))

    tau = np.quantile(y["time"], 0.7)
    search = GridSearchCV(
        as_concordance_index_ipcw_scorer(SurvivalEstimator(epochs=15, random_state=0, linear="none"), tau=tau),
        {"estimator__weight_decay": [0.01, 1.0], "estimator__head": ["cox", "discrete"]},
        cv=cv,
    ).fit(X, y)
    assert search.cv_results_["mean_test_score"].shape == (4,)
    assert search.best_estimator_.estimator.weight_decay in (0.01, 1.0)

    times = np.quantile(y["time"][y["event"]], [0.2, 0.4, 0.6])
    brier = cross_val_score(
        as_integrated_brier_score_scorer(SurvivalEstimator(epochs=15, random_state=0), times), X, y, cv=cv
    )
    assert np.all((-brier > 0) & (-brier < 0.3))  # sksurv negates the Brier score so that higher is better


def _tile_features(tmp_path, X, rng):
    """One file of (N, 8) tile features per patient; a few patients without a slide, one with two slides."""
    paths = []
    for row, patient in enumerate(X.index):
        if row % 7 == 3:
            paths.append(None)
            continue
        features = rng.normal(size=(int(rng.integers(3, 12)), 8)).astype(np.float32)
        if row == 1:  # the layout scripts/extract_features.py writes
            from safetensors.numpy import save_file

            path = tmp_path / f"{patient}.safetensors"
            save_file({"features": features, "coords": np.zeros((len(features), 2), dtype=np.int64)}, str(path))
        else:
            path = tmp_path / f"{patient}.npy"
            np.save(path, features)
        paths.append([str(path), str(path)] if row == 0 else str(path))
    return paths


def test_histology_and_radiology_columns_feed_the_fusion_model(tmp_path, cohort):
    from pydicom.examples import get_path

    X, y = cohort
    X, y = X.iloc[:40][["age", "size", "er"]].copy(), y[:40]
    rng = np.random.default_rng(0)
    X["slides"] = _tile_features(tmp_path, X, rng)
    X["ct"] = [str(get_path("ct")) if row % 5 else None for row in range(len(X))]
    model = SurvivalEstimator(
        histology_col="slides", radiology_col="ct", radiology_size=16, fusion="coattention", epochs=3, random_state=0
    ).fit(X, y)
    config = model.model_.config
    assert config.modalities == ["genomic", "histology", "radiology"] and config.fusion == "coattention"
    assert config.histology_feature_dim == 8 and config.radiology_image_size == [16, 16]
    assert config.genomic_feature_names == ["age", "size", "er_negative", "er_positive"]
    assert np.isfinite(model.predict(X)).all()

    broken = X.copy()
    broken.loc[broken.index[5], "slides"] = str(tmp_path / "lost.npy")
    with pytest.raises(FileNotFoundError, match=rf"column 'slides', row {broken.index[5]!r}: .*lost\.npy"):
        model.predict(broken)
    broken = X.copy()
    broken.loc[broken.index[6], "ct"] = str(tmp_path / "gone.dcm")
    with pytest.raises(FileNotFoundError, match=rf"column 'ct', row {broken.index[6]!r}: .*gone\.dcm"):
        model.predict(broken)
    broken.loc[broken.index[6], "ct"] = str(tmp_path / "not-a-scan.dcm")
    (tmp_path / "not-a-scan.dcm").write_bytes(b"not a DICOM file")
    with pytest.raises(ValueError, match=rf"column 'ct', row {broken.index[6]!r}: .*not-a-scan\.dcm"):
        model.predict(broken)


def test_bad_tile_feature_files_are_named_instead_of_turning_risks_into_nan(tmp_path, cohort):
    X, y = cohort
    X, y = X.iloc[:40][["age", "size"]].copy(), y[:40]
    X["slides"] = _tile_features(tmp_path, X, np.random.default_rng(0))
    settings = dict(histology_col="slides", epochs=2, random_state=0, linear="none")
    patient = X.index[2]
    path = tmp_path / f"{patient}.npy"
    good = np.load(path)
    np.save(path, np.where(np.arange(len(good))[:, None] == 1, np.nan, good))  # tile 1 is NaN
    with pytest.raises(ValueError, match=rf"column 'slides', row {patient}: .*{patient}\.npy: tile 1 has non-finite"):
        SurvivalEstimator(**settings).fit(X, y)
    np.save(path, good)
    model = SurvivalEstimator(**settings).fit(X, y)
    assert np.isfinite(model.predict(X)).all()

    # predict: tiles of another encoder (another width), a torn .npy and a file that is not safetensors
    np.save(tmp_path / "wide.npy", np.ones((4, 5), dtype=np.float32))
    (tmp_path / "torn.npy").write_bytes(path.read_bytes()[:100])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for name, message in [
        ("wide.npy", "tile features are 5 wide, the model was fitted on 8"),
        ("torn.npy", "cannot read tile features"),
        ("junk.safetensors", "cannot read tile features"),
    ]:
        broken = X.copy()
        broken.loc[patient, "slides"] = str(tmp_path / name)
        with pytest.raises(ValueError, match=rf"column 'slides', row {patient}: .*{re.escape(name)}: {message}"):
            model.predict(broken)
    broken.loc[patient, "slides"] = str(tmp_path / "wide.npy")
    with pytest.raises(ValueError, match=r"wide\.npy: tile features are 5 wide, earlier files hold 8"):
        SurvivalEstimator(**settings).fit(broken, y)


def test_a_diverging_fit_stops_naming_the_epoch_and_what_went_non_finite(split):
    X_train, y_train, _, _ = split
    with pytest.raises(
        FloatingPointError,
        match=r"survival loss is nan at epoch 2/5, step 1: the weights '.+' are no longer finite "
        r".*learning_rate \(now inf\)",
    ):
        SurvivalEstimator(epochs=5, learning_rate=float("inf"), random_state=0, linear="none").fit(X_train, y_train)


@pytest.mark.parametrize("head", ["cox", "discrete"])
def test_seed_ensemble_averages_its_networks(split, head):
    X_train, y_train, X_test, _ = split
    model = SurvivalEstimator(head=head, n_networks=3, epochs=5, random_state=0, linear="none").fit(X_train, y_train)
    assert len(model.models_) == 3 and model.model_ is model.models_[0]
    inputs = model._predict_inputs(X_test)
    batch = model._batch(inputs, np.arange(len(X_test)))
    with torch.no_grad():
        members = [m(**batch) for m in model.models_]
    risks = np.stack([m.risk.double().numpy() for m in members])  # (3, N)
    assert not np.allclose(risks[0], risks[1])  # different seeds
    if head == "cox":
        np.testing.assert_allclose(model.predict(X_test), risks.mean(0), rtol=1e-5, atol=1e-6)
    else:  # the risk of the mean survival curve
        survival = np.stack([m.survival.double().numpy() for m in members]).mean(0)
        np.testing.assert_allclose(model.predict(X_test), -survival.sum(1), rtol=1e-5, atol=1e-6)
        curves = model.predict_survival_function(X_test.iloc[:4], return_array=True)
        assert np.all(np.diff(curves, axis=1) <= 1e-12)


def test_group_lasso_shrinks_the_inputs_of_noise_columns(split):
    X_train, y_train, _, _ = split
    rng = np.random.default_rng(0)
    noise_columns = {f"noise{i}": rng.normal(size=len(X_train)) for i in range(20)}
    X = X_train[["age", "size", "er", "grade"]].assign(**noise_columns)

    def column_norms(model):  # ||W[:, j]|| of the first genomic layer, per encoded feature
        weight = model.model_.genomic_encoder.blocks[0][0].weight.detach()
        return dict(zip(model.model_.config.genomic_feature_names, weight.norm(dim=0).tolist()))

    plain = column_norms(SurvivalEstimator(epochs=60, group_lasso=0.0, random_state=0, linear="none").fit(X, y_train))
    sparse = column_norms(SurvivalEstimator(epochs=60, group_lasso=0.05, random_state=0, linear="none").fit(X, y_train))
    noise = [name for name in plain if name.startswith("noise")]
    assert np.mean([sparse[n] for n in noise]) < 0.3 * np.mean([plain[n] for n in noise])


def _simulated(log_hazard, n=300, seed=0):
    """Five standard-normal covariates, exponential times with the given log hazard, 25% random censoring."""
    import pandas as pd

    from histomim.survival.labels import survival_from_arrays

    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, 5)), columns=[f"x{i}" for i in range(5)])
    time = rng.exponential(size=n) / np.exp(log_hazard(X.to_numpy()))
    return X, survival_from_arrays(rng.random(n) < 0.75, time)


def test_linear_only_is_the_coxnet_linear_predictor_inside_the_model(split):
    X_train, y_train, X_test, y_test = split
    model = SurvivalEstimator(head="cox", linear="only", random_state=0).fit(X_train, y_train)
    assert model.model_.config.genomic_linear and model.loss_history_ == []  # nothing left to train
    genomic = model.model_inputs(X_test)["genomic"].double().numpy()
    np.testing.assert_allclose(model.predict(X_test), genomic @ model.linear_model_.coef_, rtol=1e-4, atol=1e-4)
    assert model.score(X_test, y_test) == pytest.approx(model.linear_model_.score(genomic, y_test), abs=1e-3)


@pytest.mark.parametrize("signal", ["linear", "nonlinear"])
def test_auto_chooses_by_inner_cv_with_the_one_standard_error_rule(signal):
    log_hazard = (lambda x: 1.5 * x[:, 0] - x[:, 1]) if signal == "linear" else (lambda x: 2.0 * np.abs(x[:, 0]))
    model = SurvivalEstimator(random_state=0).fit(*_simulated(log_hazard))
    scores = model.selection_scores_
    assert set(scores) == {"only", "both", "none"}
    # the first mode (simplest first) whose inner-CV C is within one SE of the best mode's
    best = max(scores.values(), key=lambda s: s["mean"])
    assert model.linear_ == next(m for m in ("only", "both", "none") if scores[m]["mean"] >= best["mean"] - best["se"])
    if signal == "linear":  # a linear Cox is the right model: nothing more flexible is kept
        assert model.linear_ == "only" and scores["only"]["mean"] > 0.7


def test_same_random_state_gives_bit_identical_predictions_across_processes(split, tmp_path):
    """Two fresh Python processes fitting the default estimator with random_state=3 predict the same bytes."""
    import subprocess
    import sys

    script = """
import numpy as np, torch
torch.set_num_threads(1)
from histomim.survival import SurvivalEstimator
from histomim.survival.labels import patient_folds
from histomim.survival.study import breast_cancer_study
X, y = breast_cancer_study()
train, test = patient_folds(X, labels=y, n_splits=4, seed=0)[0]
model = SurvivalEstimator(random_state=3).fit(X.iloc[train], y[train])
np.save(__import__("sys").argv[1], np.r_[model.predict(X.iloc[test]), model.predict_survival_function(X.iloc[test], return_array=True).ravel()])
"""
    outputs = []
    for run in range(2):
        path = tmp_path / f"run{run}.npy"
        result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(np.load(path))
    assert outputs[0].tobytes() == outputs[1].tobytes()


@pytest.mark.parametrize("head", ["cox", "discrete"])
def test_saved_model_reloads_through_automodel_with_identical_risks(split, tmp_path, head):
    from transformers import AutoModel

    import histomim  # noqa: F401  (registers the fusion model with the Auto classes)

    X_train, y_train, X_test, _ = split
    model = SurvivalEstimator(head=head, linear="both", epochs=20, random_state=0).fit(X_train, y_train)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.config.genomic_linear and loaded.config.genomic_feature_names == list(
        model.encoder_.get_feature_names_out()
    )
    with torch.no_grad():
        output = loaded(**model.model_inputs(X_test))
    # the estimator's risk: Cox log hazard ratio, or -sum_k S_k of the discrete curve summed in float64
    risk = output.risk.double() if head == "cox" else -output.survival.double().sum(dim=1)
    np.testing.assert_array_equal(risk.numpy(), model.predict(X_test))


def test_a_patient_without_any_tabular_value_is_missing_that_modality_not_imputed(tmp_path, cohort):
    """Issue 16: all-NaN genomic columns mark the genomic modality absent (masked), like a missing slide."""
    X, y = cohort
    X, y = X.iloc[:40][["X204540_at", "X221928_at", "X202240_at"]].copy(), y[:40]
    X["slides"] = _tile_features(tmp_path, X, np.random.default_rng(0))
    X.loc[X.index[[2, 5]], ["X204540_at", "X221928_at", "X202240_at"]] = np.nan  # rows 2 and 5 have slides
    model = SurvivalEstimator(histology_col="slides", linear="both", epochs=3, random_state=0).fit(X, y)
    inputs = model.model_inputs(X)
    assert torch.isnan(inputs["genomic"][[2, 5]]).all() and not torch.isnan(inputs["genomic"][[0, 1]]).any()
    with torch.no_grad():
        output = model.model_(**inputs)
    assert output.modality_mask[[2, 5]].tolist() == [[False, True], [False, True]]
    assert output.modality_mask[[0, 1]].tolist() == [[True, True], [True, True]]
    # the absent genomics cannot influence these patients: any other missing-value encoding gives the same risk
    changed = X.copy()
    changed.loc[changed.index[2], "X204540_at"] = None
    np.testing.assert_array_equal(model.predict(changed)[[2, 5]], model.predict(X)[[2, 5]])
    assert np.isfinite(model.predict(X)).all()
