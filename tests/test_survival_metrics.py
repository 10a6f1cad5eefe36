"""Metrics and Kaplan-Meier plots on the real breast-cancer cohort, checked against sksurv directly."""

import numpy as np
import pytest

from histomim.survival.labels import patient_folds, split_survival
from histomim.survival.metrics import bootstrap_ci, censor_at, evaluate, evaluation_times
from histomim.survival.plots import number_at_risk, plot_risk_groups, risk_groups


@pytest.fixture(scope="module")
def fold():
    """A CoxPH model on four columns, trained on the training patients of one breast-cancer fold."""
    from sksurv.datasets import load_breast_cancer
    from sksurv.linear_model import CoxPHSurvivalAnalysis

    X, y = load_breast_cancer()
    X = X[["age", "size", "X204540_at", "X221928_at"]]
    # a fold whose test follow-up ends before the training follow-up (the longest time is in another fold)
    longest = np.argmax(split_survival(y)[1])
    train, test = next((tr, te) for tr, te in patient_folds(X, labels=y, n_splits=5, seed=0) if longest not in te)
    model = CoxPHSurvivalAnalysis().fit(X.iloc[train], y[train])
    return {
        "y_train": y[train],
        "y_test": y[test],
        "risk": model.predict(X.iloc[test]),
        "survival": model.predict_survival_function(X.iloc[test]),
    }


def test_evaluate_matches_sksurv(fold):
    from sksurv.metrics import (
        concordance_index_censored,
        concordance_index_ipcw,
        cumulative_dynamic_auc,
        integrated_brier_score,
    )

    y_train, y_test, risk = fold["y_train"], fold["y_test"], fold["risk"]
    times = evaluation_times(y_train, y_test)
    _, test_time = split_survival(y_test)
    assert times.min() >= test_time.min() and times.max() < split_survival(y_train)[1].max()
    scores = evaluate(y_train, y_test, risk, fold["survival"])
    assert set(scores) == {"harrell_c", "uno_c", "mean_auc", "integrated_brier_score"}
    event = split_survival(y_test)[0]
    assert scores["harrell_c"] == pytest.approx(concordance_index_censored(event, test_time, risk)[0])
    # this fold's follow-up ends before training's, so the horizon censoring changes nothing
    assert test_time.max() < split_survival(y_train)[1].max()
    assert scores["uno_c"] == pytest.approx(concordance_index_ipcw(y_train, y_test, risk, tau=times.max())[0])
    assert scores["mean_auc"] == pytest.approx(cumulative_dynamic_auc(y_train, y_test, risk, times)[1])
    probabilities = np.vstack([fn(times) for fn in fold["survival"]])
    assert scores["integrated_brier_score"] == pytest.approx(
        integrated_brier_score(y_train, y_test, probabilities, times)
    )
    # an (N, T) array on the same grid gives the same Brier score
    assert evaluate(y_train, y_test, risk, probabilities, times)["integrated_brier_score"] == pytest.approx(
        scores["integrated_brier_score"]
    )
    assert np.isnan(evaluate(y_train, y_test, risk)["integrated_brier_score"])


def test_oracle_and_inverted_risk(fold):
    y_train, y_test = fold["y_train"], fold["y_test"]
    _, test_time = split_survival(y_test)
    oracle = evaluate(y_train, y_test, -test_time)  # earlier event = higher risk
    assert oracle["harrell_c"] == 1.0 and oracle["uno_c"] == 1.0 and oracle["mean_auc"] == 1.0
    inverted = evaluate(y_train, y_test, test_time)
    assert inverted["harrell_c"] == 0.0


def test_test_follow_up_beyond_training_is_censored_at_the_horizon(fold):
    from sksurv.metrics import cumulative_dynamic_auc

    # training follow-up that ends with a censored patient at ~70% of the test times: the censoring
    # distribution is zero from there on, and sksurv's weights for later test events are undefined
    train_event, train_time = split_survival(fold["y_train"])
    cut = np.sort(train_time[~train_event])[int(0.7 * (~train_event).sum())]
    y_train = fold["y_train"][train_time <= cut]
    y_test = fold["y_test"]
    test_event, test_time = split_survival(y_test)
    assert (test_event & (test_time > cut)).any()
    risk = -test_time + np.random.default_rng(0).normal(0, 1000, len(y_test))  # a noisy oracle
    times = evaluation_times(y_train, y_test)
    assert times.max() < cut
    with pytest.raises(ValueError, match="censoring survival function is zero"):
        cumulative_dynamic_auc(y_train, y_test, risk, times)
    scores = evaluate(y_train, y_test, risk)
    assert 0.6 < scores["mean_auc"] <= 1.0 and 0.6 < scores["uno_c"] <= 1.0
    truncated = censor_at(y_test, cut)
    assert truncated["time"].max() == cut and not truncated["event"][truncated["time"] == cut].any()
    # metrics at times before the horizon do not change by censoring there (checked where sksurv works directly)
    y_train, y_test, risk = fold["y_train"], fold["y_test"], fold["risk"]
    times = evaluation_times(y_train, y_test)
    horizon = (times.max() + np.sort(split_survival(y_test)[1])[-1]) / 2
    for metric in (auc_at_times, integrated_brier_score_of_risk):
        np.testing.assert_allclose(
            metric(y_train, censor_at(y_test, horizon), risk, times), metric(y_train, y_test, risk, times)
        )


def auc_at_times(y_train, y_test, risk, times):
    from sksurv.metrics import cumulative_dynamic_auc

    return cumulative_dynamic_auc(y_train, y_test, risk, times)[0]


def integrated_brier_score_of_risk(y_train, y_test, risk, times):
    from sksurv.metrics import integrated_brier_score

    survival = np.exp(-np.outer(np.exp(risk), times / times.max()))  # (N, T) any curves ordered by risk
    return integrated_brier_score(y_train, y_test, survival, times)


def test_evaluate_errors(fold):
    y_train, y_test, risk = fold["y_train"], fold["y_test"], fold["risk"]
    with pytest.raises(ValueError, match="`risk` has shape"):
        evaluate(y_train, y_test, risk[:-1])
    with pytest.raises(ValueError, match="NaN"):
        evaluate(y_train, y_test, np.where(np.arange(len(risk)) == 0, np.nan, risk))
    censored_only = y_test[~split_survival(y_test)[0]]
    with pytest.raises(ValueError, match="no events"):
        evaluate(y_train, censored_only, risk[: len(censored_only)])
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        evaluate(y_train, y_test, risk, np.ones((len(risk), 2)), times=evaluation_times(y_train, y_test)[:3])


def test_bootstrap_interval_contains_estimate_and_is_reproducible(fold):
    args = (fold["y_train"], fold["y_test"], fold["risk"], fold["survival"])
    point = evaluate(*args)
    intervals = bootstrap_ci(*args, n_bootstrap=60, seed=3)
    for name, (low, high) in intervals.items():
        assert low < point[name] < high, name
    assert intervals == bootstrap_ci(*args, n_bootstrap=60, seed=3)
    assert intervals != bootstrap_ci(*args, n_bootstrap=60, seed=4)


def test_km_plot_writes_png_with_logrank_p(tmp_path, fold):
    from sksurv.compare import compare_survival

    y_test = fold["y_test"]
    oracle = -split_survival(y_test)[1]
    result = plot_risk_groups(y_test, oracle, tmp_path / "km.png", grouping="tertiles")
    assert (tmp_path / "km.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["p_value"] == pytest.approx(compare_survival(y_test, risk_groups(oracle, "tertiles"))[1])
    assert result["p_value"] < 0.01  # ordering patients by their true time separates the groups
    assert np.bincount(risk_groups(np.zeros(9), "tertiles")).tolist() == [3, 3, 3]  # ties cannot empty a group
    single = plot_risk_groups(y_test, None, tmp_path / "one.png", groups=np.zeros(len(y_test), dtype=int))
    assert np.isnan(single["p_value"]) and (tmp_path / "one.png").exists()
    # cut-offs from reference (training) risks: test patients are grouped without looking at each other
    assert risk_groups(np.array([0.1, 5.0, 9.0]), "median", reference_risk=np.arange(10.0)).tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="grouping"):
        plot_risk_groups(y_test, oracle, tmp_path / "x.png", grouping="quartiles")


def test_number_at_risk_counts_patients_still_followed(fold):
    y_test = fold["y_test"]
    _, time = split_survival(y_test)
    groups = risk_groups(-time, "median")  # shortest times = highest risk
    table = number_at_risk(y_test, groups, np.array([0.0, np.median(time), time.max() + 1]), ["low", "high"])
    assert table.loc["low", 0.0] + table.loc["high", 0.0] == len(time)  # everyone is at risk at time 0
    assert table.loc["low", np.median(time)] > table.loc["high", np.median(time)]  # long-time group still followed
    assert table.iloc[:, -1].sum() == 0  # nobody is followed past the last time


def test_km_plot_leaves_the_matplotlib_backend_and_pyplot_alone(tmp_path, fold):
    script = f"""
import sys, matplotlib, numpy as np
matplotlib.use("svg")  # a user's own backend choice
from histomim.survival.plots import plot_risk_groups
from histomim.survival.labels import survival_from_arrays
rng = np.random.default_rng(0)
y = survival_from_arrays(rng.random(40) < 0.7, rng.exponential(size=40))
plot_risk_groups(y, rng.normal(size=40), {str(tmp_path / "km.png")!r})
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
print("OK")
"""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]
    assert (tmp_path / "km.png").read_bytes()[:4] == b"\x89PNG"
