"""K-fold cross-validation of survival models on a patient table, with sksurv baselines on the same folds.

``run_survival_cv`` is what ``scripts/train_survival.py`` calls:

1. load the study (a CSV/parquet table, or sksurv's breast-cancer cohort), collapse slides to
   patients, validate outcomes and file paths;
2. split patients into stratified folds;
3. fit every model on every fold: :class:`~histomim.survival.estimator.SurvivalEstimator` (fixed
   epochs, no early stopping on the test fold) and optionally Coxnet (alpha chosen by inner CV on
   the training fold) and a random survival forest;
4. score each test fold (Harrell's C, Uno's C, mean time-dependent AUC, integrated Brier score,
   bootstrap CIs) and write CSV/JSON and a Kaplan-Meier PNG of the pooled out-of-fold risk groups.

Under ``accelerate launch`` / ``torchrun`` the (model, fold) fits are spread over the processes
(each trains on its ``accelerator.device``) and gathered on the main process, which writes the results.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone
from tqdm.auto import tqdm

from ..survival.estimator import SurvivalEstimator, make_tabular_encoder
from ..survival.labels import patient_folds, patient_table, resolve_paths, split_survival, survival_array
from ..survival.metrics import METRICS, bootstrap_ci, evaluate
from ..survival.plots import plot_risk_groups, risk_groups

# ------------------------------------------------------------------------------------------ data


def breast_cancer_study() -> tuple[pd.DataFrame, np.ndarray]:
    """sksurv's breast-cancer cohort: 198 patients, 76 gene-expression probes + age/er/grade/size, 51 events."""
    from sksurv.datasets import load_breast_cancer

    X, y = load_breast_cancer()
    event, time = split_survival(y)
    labels = np.empty(len(y), dtype=[("event", bool), ("time", float)])
    labels["event"], labels["time"] = event, time
    return X, labels


def _read_table(table: str | Path | pd.DataFrame) -> tuple[pd.DataFrame, Path | None]:
    if isinstance(table, pd.DataFrame):
        return table, None
    path = Path(table)
    if not path.exists():
        raise FileNotFoundError(f"study table {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        return pd.read_parquet(path), path.parent
    return pd.read_csv(path, sep="\t" if path.suffix in (".tsv", ".txt") else ","), path.parent


def load_study(
    table: str | Path | pd.DataFrame,
    time_col: str,
    event_col: str | None = None,
    censorship_col: str | None = None,
    patient_col: str | None = None,
    feature_cols: Sequence[str] | None = None,
    feature_prefix: str | None = None,
    slide_features_col: str | None = None,
    radiology_col: str | None = None,
) -> tuple[pd.DataFrame, np.ndarray]:
    """A study table -> ``(X, y)`` with one row per patient.

    Rows are collapsed to patients with :func:`~histomim.survival.labels.patient_table` (the slide
    column gathered into lists, everything else required to agree). Tabular features are
    ``feature_cols``, else the columns starting with ``feature_prefix``, else every column that is
    not an outcome, id or path column. Path columns are resolved relative to the table's folder and
    must exist; a missing cell means the patient lacks that modality.
    """
    df, base_dir = _read_table(table)
    path_cols = [c for c in (slide_features_col, radiology_col) if c is not None]
    outcome_cols = [c for c in (time_col, event_col, censorship_col) if c is not None]
    id_cols = [c for c in (patient_col,) if c is not None]
    missing = [c for c in (*outcome_cols, *id_cols, *path_cols, *(feature_cols or ())) if c not in df.columns]
    if missing:
        raise KeyError(f"column(s) {missing} not found in the study table; available columns: {list(df.columns)}")

    if feature_cols is not None:
        features = list(feature_cols)
    elif feature_prefix is not None:
        features = [c for c in df.columns if str(c).startswith(feature_prefix)]
        if not features:
            raise ValueError(f"no column of the study table starts with feature prefix {feature_prefix!r}")
    else:
        features = [c for c in df.columns if c not in {*outcome_cols, *id_cols, *path_cols}]

    df = df[[*id_cols, *outcome_cols, *features, *path_cols]]
    if patient_col is not None:
        df = patient_table(df, patient_col, list_cols=[slide_features_col] if slide_features_col else ()).set_index(
            patient_col
        )
    y = survival_array(df, time_col, event_col, censorship_col)
    X = df[[*features, *path_cols]].copy()
    for column in path_cols:
        X[column] = resolve_paths(X, column, base_dir, allow_missing=True)
    return X, y


# ------------------------------------------------------------------------------------------ models


class CoxnetCV(BaseEstimator):
    """Elastic-net Cox (sksurv ``CoxnetSurvivalAnalysis``) whose alpha is chosen by inner K-fold CV
    (Harrell's C) on the training data only, then refitted on all of it."""

    def __init__(
        self,
        l1_ratio: float = 0.5,
        n_alphas: int = 30,
        alpha_min_ratio: float = 0.01,
        cv: int = 5,
        random_state: int = 0,
    ):
        self.l1_ratio = l1_ratio
        self.n_alphas = n_alphas
        self.alpha_min_ratio = alpha_min_ratio
        self.cv = cv
        self.random_state = random_state

    def _fit_path(self, X: np.ndarray, y: np.ndarray, alphas: np.ndarray | None = None):
        """Coxnet over a descending alpha path (its own, or the given ``alphas``).

        On a small fold the nearly unpenalized end of the path can diverge (sksurv raises
        ``ArithmeticError``); the path is then shortened at that end until it fits.
        """
        from sksurv.linear_model import CoxnetSurvivalAnalysis

        ratio = self.alpha_min_ratio
        while True:
            path = {"n_alphas": self.n_alphas, "alpha_min_ratio": ratio} if alphas is None else {"alphas": alphas}
            try:
                return CoxnetSurvivalAnalysis(l1_ratio=self.l1_ratio, **path).fit(X, y)
            except ArithmeticError:
                if alphas is None and ratio < 0.5:
                    ratio *= 3
                elif alphas is not None and len(alphas) > 2:
                    alphas = alphas[: len(alphas) * 3 // 4]
                else:
                    raise

    def fit(self, X, y) -> "CoxnetCV":
        from sklearn.model_selection import StratifiedKFold
        from sksurv.linear_model import CoxnetSurvivalAnalysis
        from sksurv.metrics import concordance_index_censored

        X = np.asarray(X, dtype=float)
        event, time = split_survival(y)
        alphas = self._fit_path(X, y).alphas_
        scores = np.zeros(len(alphas))  # mean inner-CV C per alpha; -inf where some inner fit diverged
        inner = StratifiedKFold(self.cv, shuffle=True, random_state=self.random_state)
        for train, test in inner.split(X, event):
            path = self._fit_path(X[train], y[train], alphas)
            scores[len(path.alphas_) :] = -np.inf
            for i, alpha in enumerate(path.alphas_):
                risk = path.predict(X[test], alpha=alpha)
                scores[i] += concordance_index_censored(event[test], time[test], risk)[0] / self.cv
        best = int(np.argmax(scores))
        self.alpha_ = float(alphas[best])
        # refit along the path down to the chosen alpha: warm starts keep small alphas numerically stable
        settings = {"l1_ratio": self.l1_ratio, "fit_baseline_model": True}
        self.model_ = CoxnetSurvivalAnalysis(alphas=alphas[: best + 1], **settings).fit(X, y)
        return self

    def predict(self, X) -> np.ndarray:
        return self.model_.predict(np.asarray(X, dtype=float), alpha=self.alpha_)

    def predict_survival_function(self, X, return_array: bool = False):
        return self.model_.predict_survival_function(
            np.asarray(X, dtype=float), alpha=self.alpha_, return_array=return_array
        )

    def score(self, X, y) -> float:
        from sksurv.metrics import concordance_index_censored

        event, time = split_survival(y)
        return float(concordance_index_censored(event, time, self.predict(X))[0])


def baseline_estimators(tabular_columns: Sequence[str], seed: int = 0) -> dict[str, BaseEstimator]:
    """Coxnet (inner-CV alpha) and a random survival forest on the tabular columns, encoded like the SNN's."""
    from sklearn.compose import make_column_transformer
    from sklearn.pipeline import make_pipeline
    from sksurv.ensemble import RandomSurvivalForest

    def encoder():
        return make_column_transformer((make_tabular_encoder(), list(tabular_columns)))

    forest = RandomSurvivalForest(
        n_estimators=300, min_samples_split=10, min_samples_leaf=15, max_features="sqrt", n_jobs=1, random_state=seed
    )
    return {
        "Coxnet": make_pipeline(encoder(), CoxnetCV(random_state=seed)),
        "RSF": make_pipeline(encoder(), forest),
    }


# ------------------------------------------------------------------------------------------ CV


@dataclass
class CVResults:
    """Per-fold scores and out-of-fold predictions of every model."""

    fold_metrics: pd.DataFrame  # one row per (model, fold): metrics and their bootstrap CIs
    predictions: pd.DataFrame  # one row per (model, patient): fold, risk, risk group, time, event

    def summary(self) -> dict[str, dict[str, dict[str, object]]]:
        """``{model: {metric: {"mean", "std", "folds"}}}`` (std over folds, ddof=1)."""
        summary = {}
        for model, rows in self.fold_metrics.groupby("model", sort=False):
            summary[model] = {
                metric: {
                    "mean": float(rows[metric].mean()),
                    "std": float(rows[metric].std(ddof=1)),
                    "folds": [float(v) for v in rows[metric]],
                }
                for metric in METRICS
            }
        return summary

    def table(self, metrics: Sequence[str] = METRICS) -> str:
        """Models side by side: ``mean +/- std`` over folds of each metric."""
        summary = self.summary()
        width = max(len(m) for m in summary) + 2
        lines = ["model".ljust(width) + "".join(m.rjust(26) for m in metrics)]
        for model, scores in summary.items():
            cells = "".join(f"{scores[m]['mean']:.3f} +/- {scores[m]['std']:.3f}".rjust(26) for m in metrics)
            lines.append(model.ljust(width) + cells)
        return "\n".join(lines)


def _fit_fold(
    name: str,
    estimator: BaseEstimator,
    X: pd.DataFrame,
    y: np.ndarray,
    fold: int,
    train: np.ndarray,
    test: np.ndarray,
    n_bootstrap: int,
    seed: int,
    device,
) -> dict[str, object]:
    """Fit one model on one fold and score its test patients."""
    model = clone(estimator)
    if device is not None and "device" in model.get_params():
        model.set_params(device=device)
    model.fit(X.iloc[train], y[train])
    risk = model.predict(X.iloc[test])
    # a fitted GridSearchCV does not forward predict_survival_function; its refitted best model does
    survival = getattr(model, "best_estimator_", model).predict_survival_function(X.iloc[test])
    metrics = evaluate(y[train], y[test], risk, survival)
    intervals = (
        bootstrap_ci(y[train], y[test], risk, survival, n_bootstrap=n_bootstrap, seed=seed + fold)
        if n_bootstrap
        else {}
    )
    groups = risk_groups(risk, "median", reference_risk=model.predict(X.iloc[train]))
    return {
        "model": name,
        "fold": fold,
        "test": test,
        "risk": risk,
        "group": groups,
        "metrics": metrics,
        "intervals": intervals,
    }


def cross_validate(
    models: Mapping[str, BaseEstimator],
    X: pd.DataFrame,
    y: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    n_bootstrap: int = 200,
    seed: int = 0,
    accelerator=None,
) -> CVResults:
    """Fit and score every model on every fold (the same folds for all models).

    With an ``accelerate.Accelerator`` the (model, fold) fits are split across its processes and
    gathered, so every process returns the full results.
    """
    tasks = [(name, fold) for name in models for fold in range(len(folds))]
    device = accelerator.device if accelerator is not None else None
    show = accelerator is None or accelerator.is_main_process

    def run(my_tasks):
        return [
            _fit_fold(name, models[name], X, y, fold, *folds[fold], n_bootstrap, seed, device)
            for name, fold in tqdm(my_tasks, desc="cross-validation", disable=not show or None)
        ]

    if accelerator is None or accelerator.num_processes == 1:
        outcomes = run(tasks)
    else:
        from accelerate.utils import gather_object

        with accelerator.split_between_processes(tasks) as my_tasks:
            outcomes = gather_object(run(my_tasks))
    outcomes.sort(key=lambda o: (list(models).index(o["model"]), o["fold"]))

    event, time = split_survival(y)
    fold_rows, prediction_rows = [], []
    for o in outcomes:
        row = {
            "model": o["model"],
            "fold": o["fold"],
            "n_test": len(o["test"]),
            "events_test": int(event[o["test"]].sum()),
        }
        row.update(o["metrics"])
        for metric, (low, high) in o["intervals"].items():
            row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = low, high
        fold_rows.append(row)
        prediction_rows.append(
            pd.DataFrame(
                {
                    "model": o["model"],
                    "fold": o["fold"],
                    "patient": X.index[o["test"]],
                    "risk": o["risk"],
                    "risk_group": o["group"],
                    "time": time[o["test"]],
                    "event": event[o["test"]],
                }
            )
        )
    return CVResults(pd.DataFrame(fold_rows), pd.concat(prediction_rows, ignore_index=True))


def write_results(
    results: CVResults, output_dir: str | Path, config: Mapping[str, object] | None = None
) -> dict[str, Path]:
    """``fold_metrics.csv``, ``predictions.csv``, ``summary.json`` and one ``km_<model>.png`` per model.

    The Kaplan-Meier plot pools the test patients of all folds, each split at the median risk of
    its own fold's training patients.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"fold_metrics": output_dir / "fold_metrics.csv", "predictions": output_dir / "predictions.csv"}
    results.fold_metrics.to_csv(paths["fold_metrics"], index=False)
    results.predictions.to_csv(paths["predictions"], index=False)

    log_rank = {}
    for model, rows in results.predictions.groupby("model", sort=False):
        y = np.empty(len(rows), dtype=[("event", bool), ("time", float)])
        y["event"], y["time"] = rows["event"].to_numpy(bool), rows["time"].to_numpy(float)
        path = output_dir / f"km_{model.replace(' ', '_').replace('+', '')}.png"
        groups = rows["risk_group"].to_numpy()
        log_rank[model] = plot_risk_groups(y, None, path, groups=groups, title=f"{model}: out-of-fold risk groups")
        paths[f"km_{model}"] = path

    paths["summary"] = output_dir / "summary.json"
    summary = {"metrics": results.summary(), "log_rank": log_rank, "config": dict(config or {})}
    paths["summary"].write_text(to_json(summary))
    return paths


def to_json(value: object) -> str:
    """Strict JSON: NaN (an undefined metric) becomes ``null``."""

    def clean(v):
        if isinstance(v, float) and not np.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), indent=2, default=str)


# ------------------------------------------------------------------------------------------ entry points


_ESTIMATOR_DEFAULTS = SurvivalEstimator().get_params()


@dataclass
class SurvivalCVConfig:
    """Everything ``scripts/train_survival.py`` can set (see its ``--help``)."""

    table: str | None = None
    time_col: str = "time"
    event_col: str | None = None
    censorship_col: str | None = None
    patient_col: str | None = None
    genomic_cols: list[str] | None = None
    genomic_prefix: str | None = None
    slide_features_col: str | None = None
    radiology_col: str | None = None
    fusion: str = "concat"
    head: str = "discrete"
    folds: int = 5
    epochs: int = _ESTIMATOR_DEFAULTS["epochs"]
    lr: float = _ESTIMATOR_DEFAULTS["learning_rate"]
    weight_decay: float = _ESTIMATOR_DEFAULTS["weight_decay"]
    seed: int = 0
    n_bootstrap: int = 200
    compare_baselines: bool = False
    output_dir: str = "outputs/survival"
    estimator_params: dict[str, object] = field(default_factory=dict)


def run_survival_cv(config: SurvivalCVConfig, accelerator=None) -> CVResults:
    """Load the study, cross-validate the model (and baselines), print the comparison, write the results."""
    import torch
    from accelerate import Accelerator

    # cpu=True on CPU-only machines so that torchrun / accelerate launch start gloo processes
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    if config.table is None:
        X, y = breast_cancer_study()
    else:
        if config.event_col is None and config.censorship_col is None:
            raise ValueError("a study table needs --event-col or --censorship-col")
        X, y = load_study(
            config.table,
            config.time_col,
            config.event_col,
            config.censorship_col,
            config.patient_col,
            config.genomic_cols,
            config.genomic_prefix,
            config.slide_features_col,
            config.radiology_col,
        )
    folds = patient_folds(X, labels=y, n_splits=config.folds, seed=config.seed)

    estimator = SurvivalEstimator(
        head=config.head,
        fusion=config.fusion,
        histology_col=config.slide_features_col,
        radiology_col=config.radiology_col,
        epochs=config.epochs,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        random_state=config.seed,
        **config.estimator_params,
    )
    models: dict[str, BaseEstimator] = {f"HistoFusion ({config.head})": estimator}
    if config.compare_baselines:
        path_cols = {config.slide_features_col, config.radiology_col}
        models.update(baseline_estimators([c for c in X.columns if c not in path_cols], config.seed))

    results = cross_validate(models, X, y, folds, config.n_bootstrap, config.seed, accelerator)
    if accelerator.is_main_process:
        write_results(results, config.output_dir, asdict(config))
        print(results.table())
    return results
