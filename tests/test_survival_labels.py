"""Labels from pandas on sksurv's real breast-cancer cohort: validation errors, bins, patient-level folds."""

import numpy as np
import pandas as pd
import pytest

from histomim.survival.labels import (
    bin_index,
    patient_folds,
    patient_table,
    resolve_paths,
    split_survival,
    survival_array,
    time_bins,
)


@pytest.fixture(scope="module")
def cohort():
    """One row per patient: the 198 breast-cancer patients with their outcome columns."""
    from sksurv.datasets import load_breast_cancer

    X, y = load_breast_cancer()
    event, time = split_survival(y)
    table = X.assign(patient=[f"P{i:03d}" for i in range(len(X))], time=time, event=event.astype(int))
    return table, y


@pytest.fixture(scope="module")
def slides(cohort):
    """One row per slide: every patient has 1-3 slides with its own feature path."""
    table, _ = cohort
    repeats = np.random.default_rng(0).integers(1, 4, len(table))
    rows = table.loc[table.index.repeat(repeats)].reset_index(drop=True)
    rows["slide"] = [f"{p}_{i}.npy" for p, i in zip(rows["patient"], rows.groupby("patient").cumcount())]
    return rows


def test_survival_array_matches_sksurv(cohort):
    table, y = cohort
    labels = survival_array(table, "time", event_col="event")
    assert labels.dtype.names == ("event", "time")
    np.testing.assert_array_equal(labels["event"], y["e.tdm"])
    np.testing.assert_array_equal(labels["time"], y["t.tdm"])


def test_censorship_column_is_inverted(cohort):
    table, y = cohort
    table = table.assign(censorship=1 - table["event"])
    labels = survival_array(table, "time", censorship_col="censorship")
    np.testing.assert_array_equal(labels["event"], y["e.tdm"])


def test_boolean_events_are_accepted(cohort):
    table, y = cohort
    labels = survival_array(table.assign(event=table["event"].astype(bool)), "time", "event")
    assert labels["event"].sum() == 51


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("time", "soon", r"non-numeric value 'soon' at row 5"),
        ("time", np.nan, r"missing \(NaN\) time at row 5"),
        ("time", -3.0, r"negative time at row 5"),
        ("time", np.inf, r"infinite time at row 5"),
        ("event", 2, r"'event' must hold 0/1 or booleans, got 2 at row 5"),
        ("event", "yes", r"'event' must hold 0/1 or booleans, got 'yes' at row 5"),
        ("event", np.nan, r"'event' has a missing value at row 5"),
    ],
)
def test_bad_outcomes_name_column_and_row(cohort, column, value, message):
    table = cohort[0][["patient", "time", "event"]].astype(object)
    table.loc[5, column] = value
    with pytest.raises(ValueError, match=message):
        survival_array(table, "time", event_col="event")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("e.tdm", 0.5, r"event field 'e.tdm' of y must hold booleans or 0/1, got 0.5 at index 5"),
        ("e.tdm", 2.0, r"event field 'e.tdm' of y must hold booleans or 0/1, got 2.0 at index 5"),
        ("e.tdm", np.nan, r"event field 'e.tdm' of y must hold booleans or 0/1, got nan at index 5"),
        ("t.tdm", np.nan, r"time field 't.tdm' of y has a missing \(NaN\) time at index 5"),
        ("t.tdm", -1.0, r"time field 't.tdm' of y has a negative time at index 5"),
        ("t.tdm", np.inf, r"time field 't.tdm' of y has an infinite time at index 5"),
    ],
)
def test_sksurv_arrays_with_bad_outcomes_are_refused_naming_field_and_index(cohort, field, value, message):
    """Float event fields are not cast: 0.5 or 2.0 would silently become events."""
    _, y = cohort
    labels = y.astype([("e.tdm", float), ("t.tdm", float)])
    np.testing.assert_array_equal(split_survival(labels)[0], y["e.tdm"])  # float 0/1 events are fine
    labels[field][5] = value
    with pytest.raises(ValueError, match=message):
        split_survival(labels)


def test_no_events_and_argument_errors(cohort):
    table = cohort[0]
    with pytest.raises(ValueError, match="no events.*'event'"):
        survival_array(table.assign(event=0), "time", "event")
    with pytest.raises(ValueError, match="no events.*censorship column 'c'"):
        survival_array(table.assign(c=1), "time", censorship_col="c")
    with pytest.raises(ValueError, match="exactly one"):
        survival_array(table, "time", event_col="event", censorship_col="event")
    with pytest.raises(KeyError, match="'days'"):
        survival_array(table, "days", "event")


def test_time_bins_hold_equal_numbers_of_events(cohort):
    _, y = cohort
    event, time = split_survival(y)
    edges = time_bins(time, event, num_bins=4)
    assert edges[0] == 0 and edges[-1] == np.inf and np.all(np.diff(edges) > 0)
    bins = bin_index(time, edges)
    assert bins.min() == 0 and bins.max() == 3
    events_per_bin = np.bincount(bins[event], minlength=4)
    assert events_per_bin.max() - events_per_bin.min() <= 2  # 51 events in ~13s
    # every time lies inside its bin [edges[k], edges[k+1])
    assert np.all((edges[bins] <= time) & (time < edges[bins + 1]))


def test_time_bins_errors():
    with pytest.raises(ValueError, match="duplicate edges"):
        time_bins(np.array([5.0, 5.0, 5.0, 9.0]), np.array([1, 1, 1, 0]), num_bins=4)
    with pytest.raises(ValueError, match="at least one observed event"):
        time_bins(np.array([5.0, 6.0]), np.array([0, 0]))
    with pytest.raises(ValueError, match="non-negative"):
        bin_index(np.array([-1.0]), np.array([0.0, 1.0, np.inf]))


def test_folds_never_split_a_patient_and_are_stratified(slides):
    folds = patient_folds(slides, "patient", "event", n_splits=5, seed=0)
    assert len(folds) == 5
    test_rows = np.concatenate([test for _, test in folds])
    assert np.array_equal(np.sort(test_rows), np.arange(len(slides)))  # every slide tested exactly once
    per_patient = slides.drop_duplicates("patient")
    overall = per_patient["event"].mean()
    for train, test in folds:
        train_patients, test_patients = set(slides["patient"].iloc[train]), set(slides["patient"].iloc[test])
        assert not train_patients & test_patients
        assert len(train) + len(test) == len(slides)
        fold_rate = slides.iloc[test].drop_duplicates("patient")["event"].mean()
        assert abs(fold_rate - overall) < 0.03  # 51/198 events; each fold has 10-11 events out of ~40


def test_folds_are_reproducible_and_accept_sksurv_labels(cohort):
    table, y = cohort
    a = patient_folds(table, labels=y, n_splits=3, seed=1)
    b = patient_folds(table, "patient", "event", n_splits=3, seed=1)
    c = patient_folds(table, labels=y, n_splits=3, seed=2)
    assert all(np.array_equal(x[1], z[1]) for x, z in zip(a, b))
    assert not all(np.array_equal(x[1], z[1]) for x, z in zip(a, c))


def test_fold_errors(slides):
    conflicting = slides.copy()
    first = conflicting.index[
        conflicting["patient"] == conflicting["patient"][conflicting.duplicated("patient")].iloc[0]
    ]
    conflicting.loc[first[0], "event"] = 1 - conflicting.loc[first[0], "event"]
    with pytest.raises(ValueError, match=f"patient '{conflicting.loc[first[0], 'patient']}' has conflicting event"):
        patient_folds(conflicting, "patient", "event")
    few = slides[
        slides["patient"].isin(slides.loc[slides["event"] == 1, "patient"].unique()[:3]) | (slides["event"] == 0)
    ]
    with pytest.raises(ValueError, match="got 3 with and"):
        patient_folds(few, "patient", "event", n_splits=5)
    with pytest.raises(KeyError, match="'case_id'"):
        patient_folds(slides, "case_id", "event")


def test_patient_table_collapses_slides(slides, cohort):
    table = patient_table(slides[["patient", "time", "event", "age", "slide"]], "patient", list_cols=["slide"])
    assert len(table) == len(cohort[0])
    assert list(table["patient"]) == list(cohort[0]["patient"])
    counts = slides.groupby("patient", sort=False).size().to_numpy()
    assert [len(s) for s in table["slide"]] == list(counts)
    np.testing.assert_array_equal(table["time"], cohort[0]["time"])


def test_patient_table_names_conflicting_patient_and_column(slides):
    rows = slides[["patient", "time", "event", "slide"]].copy()
    patient = rows["patient"][rows.duplicated("patient")].iloc[0]
    rows.loc[rows.index[rows["patient"] == patient][0], "time"] += 30.0
    with pytest.raises(ValueError, match=f"patient '{patient}' has conflicting values in column 'time'"):
        patient_table(rows, "patient", list_cols=["slide"])


def test_resolve_paths_reports_missing_file(tmp_path):
    (tmp_path / "a.npy").write_bytes(b"")
    table = pd.DataFrame({"features": ["a.npy", "missing.npy", None]}, index=["P1", "P2", "P3"])
    with pytest.raises(FileNotFoundError, match=r"'features', row 'P2': file .*missing\.npy"):
        resolve_paths(table, "features", base_dir=tmp_path)
    with pytest.raises(ValueError, match="'features' has a missing path at row 'P3'"):
        resolve_paths(table.iloc[[0, 2]], "features", base_dir=tmp_path)
    resolved = resolve_paths(table.iloc[[0, 2]], "features", base_dir=tmp_path, allow_missing=True)
    assert resolved.tolist() == [str(tmp_path / "a.npy"), None]
    slides = pd.DataFrame({"features": [["a.npy", "a.npy"], ["a.npy", "gone.npy"]]}, index=["P1", "P2"])
    assert resolve_paths(slides.iloc[:1], "features", base_dir=tmp_path).iloc[0] == [str(tmp_path / "a.npy")] * 2
    with pytest.raises(FileNotFoundError, match=r"row 'P2': file .*gone\.npy"):
        resolve_paths(slides, "features", base_dir=tmp_path)
