"""The cross-validation driver and scripts/train_survival.py end to end on small real-data studies."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from histomim.survival.baselines import CoxnetCV
from histomim.survival.experiment import SurvivalCVConfig, run_survival_cv
from histomim.survival.labels import split_survival
from histomim.survival.study import breast_cancer_study, load_study

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_survival.py"


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A per-slide CSV study: 60 breast-cancer patients, 1-2 slides each with an .npy of tile features,
    outcomes as a PORPOISE-style censorship column, genes prefixed ``X``."""
    folder = tmp_path_factory.mktemp("study")
    X, y = breast_cancer_study()
    event, time = split_survival(y)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        for slide in range(1 + i % 2):
            path = folder / "features" / f"P{i}_{slide}.npy"
            path.parent.mkdir(exist_ok=True)
            np.save(path, rng.normal(size=(int(rng.integers(4, 10)), 6)).astype(np.float32))
            genes = X.iloc[i][["X204540_at", "X221928_at", "X202240_at", "age", "er"]].to_dict()
            rows.append(
                {
                    "case": f"P{i}",
                    "slide_path": f"features/{path.name}",
                    "days": time[i],
                    "censored": int(not event[i]),
                    **genes,
                }
            )
    table = folder / "study.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


def test_load_study_collapses_slides_and_resolves_paths(study):
    X, y = load_study(
        study,
        "days",
        censorship_col="censored",
        patient_col="case",
        feature_prefix="X",
        slide_features_col="slide_path",
    )
    reference = breast_cancer_study()[1][:60]
    assert list(X.columns) == ["X204540_at", "X221928_at", "X202240_at", "slide_path"]
    assert len(X) == 60 and X.index[1] == "P1" and len(X.loc["P1", "slide_path"]) == 2
    assert Path(X.loc["P0", "slide_path"][0]).is_absolute() and Path(X.loc["P0", "slide_path"][0]).exists()
    np.testing.assert_array_equal(y["event"], reference["event"])
    # without a prefix, every non-outcome, non-id, non-path column is a feature (categorical "er" included)
    X_all, _ = load_study(study, "days", censorship_col="censored", patient_col="case", slide_features_col="slide_path")
    assert list(X_all.columns) == ["X204540_at", "X221928_at", "X202240_at", "age", "er", "slide_path"]


def test_load_study_errors(study, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        load_study(tmp_path / "nowhere.csv", "days", "dead")
    with pytest.raises(KeyError, match="'dead'"):
        load_study(study, "days", event_col="dead")
    with pytest.raises(ValueError, match="feature prefix 'rna_'"):
        load_study(study, "days", censorship_col="censored", feature_prefix="rna_")
    table = pd.read_csv(study)
    table.loc[1, "days"] += 1  # row 1 is the first of patient P1's two slides
    conflicting = tmp_path / "conflict.csv"
    table.to_csv(conflicting, index=False)
    with pytest.raises(ValueError, match="patient 'P1' has conflicting values in column 'days'"):
        load_study(conflicting, "days", censorship_col="censored", patient_col="case", slide_features_col="slide_path")
    table = pd.read_csv(study)
    table.loc[3, "slide_path"] = "features/missing.npy"
    missing = study.parent / "missing_file.csv"
    table.to_csv(missing, index=False)
    with pytest.raises(FileNotFoundError, match=r"'slide_path', row 'P2': file .*missing\.npy"):
        load_study(missing, "days", censorship_col="censored", patient_col="case", slide_features_col="slide_path")


def test_a_per_slide_table_without_patient_col_is_refused_naming_the_id_column(study):
    """Without --patient-col every row is a patient: the two slides of P1 would land in different folds."""
    slide_rows = dict(censorship_col="censored", slide_features_col="slide_path")
    with pytest.raises(ValueError, match=r"column 'case' repeats the id 'P1' \(rows 1 and 2\).*--patient-col case"):
        load_study(study, "days", **slide_rows)
    with pytest.raises(ValueError, match="--patient-col case"):  # also when the ids are not among the features
        load_study(study, "days", feature_prefix="X", **slide_rows)
    # ids under a name that does not say so: a text column with more levels than half the rows
    renamed = study.parent / "renamed.csv"
    pd.read_csv(study).rename(columns={"case": "who"}).to_csv(renamed, index=False)
    with pytest.raises(ValueError, match="column 'who' repeats the id 'P1'.*--patient-col who"):
        load_study(renamed, "days", **slide_rows)
    with pytest.raises(ValueError, match="--patient-col case"):
        run_survival_cv(
            SurvivalCVConfig(table=str(study), time_col="days", censorship_col="censored", output_dir=str(study.parent))
        )
    # one row per patient (first slides only) is what a table without a patient column must be
    per_patient = study.parent / "per_patient.csv"
    pd.read_csv(study).drop_duplicates("case").to_csv(per_patient, index=False)
    X, y = load_study(per_patient, "days", feature_prefix="X", **slide_rows)
    assert len(X) == len(y) == 60


def test_a_study_of_one_patient_is_refused(study):
    one = study.parent / "one_patient.csv"
    pd.read_csv(study).query("case == 'P1'").to_csv(one, index=False)
    with pytest.raises(ValueError, match=r"holds 1 patient\(s\) \(patient column 'case'\); survival needs at least 2"):
        load_study(one, "days", censorship_col="censored", patient_col="case", slide_features_col="slide_path")


def test_script_end_to_end_with_slides_and_baselines(study, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable,
        str(SCRIPT),
        "--table",
        str(study),
        "--time-col",
        "days",
        "--censorship-col",
        "censored",
        "--patient-col",
        "case",
        "--genomic-prefix",
        "X",
        "--slide-features-col",
        "slide_path",
        "--fusion",
        "concat",
        "--head",
        "discrete",
        "--folds",
        "2",
        "--epochs",
        "2",
        "--seed",
        "1",
        "--n-bootstrap",
        "20",
        "--compare-baselines",
        "--output-dir",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Coxnet" in result.stdout and "RSF" in result.stdout and "HistoFusion (discrete)" in result.stdout

    folds = pd.read_csv(out / "fold_metrics.csv")
    assert len(folds) == 6 and set(folds["model"]) == {"HistoFusion (discrete)", "Coxnet", "RSF"}
    assert folds["harrell_c"].between(0, 1).all() and folds["integrated_brier_score"].between(0, 1).all()
    assert (folds["harrell_c_ci_low"] <= folds["harrell_c_ci_high"]).all()
    predictions = pd.read_csv(out / "predictions.csv")
    assert len(predictions) == 3 * 60 and predictions.groupby("model")["patient"].nunique().eq(60).all()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["head"] == "discrete" and summary["config"]["folds"] == 2
    assert set(summary["metrics"]["Coxnet"]) == {"harrell_c", "uno_c", "mean_auc", "integrated_brier_score"}
    assert len(summary["metrics"]["RSF"]["harrell_c"]["folds"]) == 2
    for name in ("km_HistoFusion_(discrete).png", "km_Coxnet.png", "km_RSF.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name


def test_default_study_is_breast_cancer(tmp_path):
    config = SurvivalCVConfig(folds=2, epochs=2, n_bootstrap=0, output_dir=str(tmp_path))
    results = run_survival_cv(config)
    assert len(results.predictions) == 198 and results.fold_metrics["events_test"].sum() == 51
    assert (tmp_path / "summary.json").exists() and (tmp_path / "km_HistoFusion_(discrete).png").exists()


def test_help_documents_every_flag():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0
    for flag in (
        "--table",
        "--censorship-col",
        "--patient-col",
        "--genomic-prefix",
        "--slide-features-col",
        "--radiology-col",
        "--fusion",
        "--head",
        "--compare-baselines",
        "--output-dir",
        "--pathways",
        "--linear",
        "--group-lasso",
        "--modality-dropout",
        "--max-tiles",
        "--save-models",
        "--refit",
        "--push-to-hub",
        "--public",
    ):
        assert flag in result.stdout


def test_coxnet_baseline_picks_alpha_on_training_data_only():
    from sksurv.linear_model import CoxnetSurvivalAnalysis

    from histomim.survival.estimator import make_tabular_encoder
    from histomim.survival.labels import patient_folds

    X, y = breast_cancer_study()
    train, test = patient_folds(X, labels=y, n_splits=2, seed=0)[0]
    encoder = make_tabular_encoder().fit(X.iloc[train])
    X_train, X_test = encoder.transform(X.iloc[train]), encoder.transform(X.iloc[test])
    # 99 patients, 83 features: a cold-started fit at a small alpha diverges; CoxnetCV refits along the path
    smallest = (
        CoxnetSurvivalAnalysis(l1_ratio=0.5, n_alphas=30, alpha_min_ratio=0.01).fit(X_train, y[train]).alphas_[-1]
    )
    with pytest.raises(ArithmeticError):
        CoxnetSurvivalAnalysis(l1_ratio=0.5, alphas=[smallest]).fit(X_train, y[train])
    model = CoxnetCV(cv=3).fit(X_train, y[train])
    assert model.alpha_ > 0 and model.score(X_test, y[test]) > 0.55
    functions = model.predict_survival_function(X_test[:5])
    assert len(functions) == 5 and all(np.all(np.diff(f.y) <= 0) for f in functions)


def test_saved_fold_models_reload_through_automodel_with_identical_risks(tmp_path, monkeypatch):
    """`--save-models --refit` writes every fold's model and a refitted one with model cards; a fold model
    reloaded with AutoModel gives exactly the risks the cross-validation recorded for its test patients."""
    import torch
    from transformers import AutoModel

    import histomim  # noqa: F401  (registers the fusion model with the Auto classes)
    from histomim.cli.survival import parse_args
    from histomim.survival.experiment import build_estimator
    from histomim.survival.labels import patient_folds

    pathways = tmp_path / "pathways.csv"
    pd.DataFrame({"pathway": ["p1", "p1", "p2"], "gene": ["X204540_at", "X221928_at", "X202240_at"]}).to_csv(
        pathways, index=False
    )
    out = tmp_path / "run"
    config = parse_args(["--folds", "2", "--epochs", "3", "--n-bootstrap", "0", "--head", "cox", "--linear", "both",
                         "--pathways", str(pathways), "--genomic-cols", "X204540_at", "X221928_at", "X202240_at",
                         "--save-models", "--refit", "--output-dir", str(out)])  # fmt: skip
    X, y = breast_cancer_study()
    config.table = None  # the default study, restricted below to the genes named by the gene-set table
    X = X[["X204540_at", "X221928_at", "X202240_at"]]
    from histomim.survival import experiment

    monkeypatch.setattr(experiment, "breast_cancer_study", lambda: (X, y))
    results = run_survival_cv(config)

    folder = out / "models" / "HistoFusion_(cox)" / "fold_1"
    card = (folder / "README.md").read_text()
    assert "Harrell's C" in card and "Fold 2 of 2" in card and "pathway tokens" in card
    assert (out / "models" / "refit" / "README.md").exists() and (out / "models" / "refit" / "model.safetensors").exists()
    loaded = AutoModel.from_pretrained(folder)
    assert loaded.config.genomic_linear and len(loaded.config.genomic_pathways) == 2

    train, test = patient_folds(X, labels=y, n_splits=2, seed=0)[1]
    refit = build_estimator(config).fit(X.iloc[train], y[train])  # same seed and settings as the fold's fit
    with torch.no_grad():
        risk = loaded(**refit.model_inputs(X.iloc[test])).risk.double().numpy()
    recorded = results.predictions.query("fold == 1")["risk"].to_numpy()
    np.testing.assert_array_equal(risk, recorded)
