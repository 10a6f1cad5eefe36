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
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from time import perf_counter

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


def reference_cohorts(
    n_patients: int = 200, n_noise: int = 70, min_event_rate: float = 0.25, seed: int = 0
) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    """Small, high-dimensional versions of sksurv's other cohorts, for choosing defaults off the benchmark.

    WHAS500, GBSG2, veterans lung cancer, FLCHAIN (without ``chapter``, the cause of death) and ACTG
    AIDS are each subsampled to ``n_patients`` (veterans has 137; events oversampled to at least
    ``min_event_rate`` where the cohort has fewer) and given ``n_noise`` standard-normal columns, to
    mimic a gene-expression cohort like :func:`breast_cancer_study` (198 patients, ~84 features of
    which few matter). Returns ``{name: (X, y)}`` with ``y`` an sksurv ``(event, time)`` array.
    """
    from sksurv import datasets

    rng = np.random.default_rng(seed)
    cohorts = {}
    for name, loader in [
        ("whas500", datasets.load_whas500),
        ("gbsg2", datasets.load_gbsg2),
        ("veterans", datasets.load_veterans_lung_cancer),
        ("flchain", datasets.load_flchain),
        ("aids", datasets.load_aids),
    ]:
        X, y = loader()
        X = X.drop(columns=["chapter"], errors="ignore").reset_index(drop=True)
        event, time = split_survival(y)
        size = min(n_patients, len(X))
        n_events = min(int(event.sum()), max(round(size * event.mean()), round(size * min_event_rate)))
        rows = np.r_[
            rng.choice(np.flatnonzero(event), n_events, replace=False),
            rng.choice(np.flatnonzero(~event), size - n_events, replace=False),
        ]
        noise = pd.DataFrame(rng.normal(size=(size, n_noise)), columns=[f"noise{i}" for i in range(n_noise)])
        labels = np.empty(size, dtype=[("event", bool), ("time", float)])
        labels["event"], labels["time"] = event[rows], time[rows]
        cohorts[name] = (pd.concat([X.iloc[rows].reset_index(drop=True), noise], axis=1), labels)
    return cohorts


def compare_on_cohorts(
    models: Mapping[str, BaseEstimator],
    cohorts: Mapping[str, tuple[pd.DataFrame, np.ndarray]],
    folds: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean Harrell's C over ``folds`` stratified CV folds of every model on every cohort ``(models x cohorts)``.

    The folds are the same for every model; nothing is tuned on a test fold.
    """
    from sksurv.metrics import concordance_index_censored

    scores = pd.DataFrame(index=list(models), columns=list(cohorts), dtype=float)
    for cohort, (X, y) in cohorts.items():
        event, time = split_survival(y)
        splits = patient_folds(X, labels=y, n_splits=folds, seed=seed)
        for name, estimator in tqdm(models.items(), desc=cohort):
            c = []
            for train, test in splits:
                risk = clone(estimator).fit(X.iloc[train], y[train]).predict(X.iloc[test])
                c.append(concordance_index_censored(event[test], time[test], risk)[0])
            scores.loc[name, cohort] = np.mean(c)
    scores["mean"] = scores.mean(axis=1)
    return scores


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


_NESTED_GRID = {"head": ["cox", "discrete"], "group_lasso": [0.03, 0.05]}


def run_benchmark(
    output_json: str | Path,
    markdown: str | Path | None = None,
    folds: int = 5,
    seed: int = 0,
    n_bootstrap: int = 200,
) -> dict[str, object]:
    """SNN + Cox head and SNN + discrete head vs Coxnet and RSF on sksurv's breast-cancer cohort, on the
    same stratified folds; writes JSON and a markdown report.

    The SNNs use the estimator defaults (chosen on other cohorts); one more row picks the head and the
    group-lasso strength by inner 3-fold CV on each training fold (nested CV), never on the test fold.
    """
    import torch
    from sklearn.model_selection import GridSearchCV, KFold

    X, y = breast_cancer_study()
    splits = patient_folds(X, labels=y, n_splits=folds, seed=seed)
    nested = GridSearchCV(
        SurvivalEstimator(random_state=seed), _NESTED_GRID, cv=KFold(3, shuffle=True, random_state=seed)
    )
    models = {
        "SNN + Cox": SurvivalEstimator(head="cox", random_state=seed),
        "SNN + discrete": SurvivalEstimator(head="discrete", random_state=seed),
        "SNN (nested CV)": nested,
        **baseline_estimators(list(X.columns), seed),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny full-batch networks: one thread is several times faster on a busy machine
    started = perf_counter()
    try:
        results = cross_validate(models, X, y, splits, n_bootstrap, seed)
    finally:
        torch.set_num_threads(threads)
    report = {
        "dataset": "sksurv.datasets.load_breast_cancer: 198 patients, 51 events, "
        "76 gene-expression probes + age/er/grade/size",
        "folds": folds,
        "seed": seed,
        "n_bootstrap": n_bootstrap,
        "date": date.today().isoformat(),
        "hardware": f"{platform.machine()} CPU, {_cpu_count()} cores (shared), torch {_torch_version()}",
        "wall_time_s": round(perf_counter() - started, 1),
        "estimator_defaults": {
            k: v for k, v in SurvivalEstimator().get_params().items() if k not in ("device", "verbose")
        },
        "nested_grid": _NESTED_GRID,
        "metrics": results.summary(),
        "fold_metrics": results.fold_metrics.to_dict(orient="records"),
    }
    Path(output_json).parent.mkdir(parents=True, exist_ok=True)
    Path(output_json).write_text(to_json(report))
    if markdown is not None:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown).write_text(benchmark_markdown(report))
    print(results.table())
    return report


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _torch_version() -> str:
    import torch

    return torch.__version__


# Measured when the defaults were chosen (scripts/select_survival_defaults.py); not re-run by the benchmark.
_DEFAULTS_CONTEXT = [
    "## How the defaults were chosen",
    "",
    "Not on this dataset. `scripts/select_survival_defaults.py` compares candidate settings with Coxnet on "
    "sksurv's WHAS500, GBSG2, veterans, FLCHAIN (without the cause-of-death column) and AIDS cohorts, each "
    "subsampled to ~200 patients (events oversampled to >= 25%) with 70 added standard-normal noise columns "
    "(`reference_cohorts`, two random draws), 5-fold CV, mean Harrell's C over the 5 cohorts and 2 draws. "
    "Coxnet scored 0.701 there. The previous defaults (32-unit hidden layer, no sparsity) scored 0.634 (Cox) "
    "and 0.629 (discrete): AdamW normalizes every gradient, so its weight decay cannot tell informative "
    "from noise columns. A group-lasso penalty on the first layer's input columns fixes that: discrete head "
    "0.659 / 0.693 / 0.712 / 0.703 at strength 0.01 / 0.03 / 0.05 / 0.07 (0.1 collapses on some cohorts, 0.639); "
    "Cox head 0.652 / 0.657 at 0.01 / 0.03. Dropping the 32-unit hidden layer (features -> 16 SELU units) helps "
    "the Cox head (0.689 at 0.05) and is neutral for the discrete head (0.712). A seed ensemble of 5 networks "
    "did not pay (0.636 vs 0.634 Cox, 0.712 vs 0.712 discrete with the lasso) and stays off by default "
    "(`n_networks`); weight decay 0.1 instead of 1.0 was neutral to slightly worse for the discrete head. "
    "Defaults kept: `group_lasso=0.05`, `genomic_hidden_sizes=()`, everything else unchanged. The discrete "
    "head scored higher than the Cox head there (0.712 vs 0.689), so `head='discrete'` is the better choice for "
    "small, high-dimensional cohorts and is the default.",
]


def benchmark_markdown(report: Mapping[str, object]) -> str:
    """The benchmark report: setup, Harrell's C per fold, every metric's mean +/- std, and the verdict."""
    metrics, folds = report["metrics"], report["folds"]
    defaults = report["estimator_defaults"]
    lines = [
        "# Survival benchmark: breast-cancer gene expression",
        "",
        f"Generated by `python scripts/benchmark_survival.py` on {report['date']}; hardware: {report['hardware']}; "
        f"wall time {report['wall_time_s']} s for every model, fold and {report['n_bootstrap']} bootstrap "
        "resamples per fold.",
        "",
        f"- **Data**: {report['dataset']}; categorical columns one-hot encoded, numeric columns standardized "
        "(fitted on each training fold).",
        f"- **Protocol**: {folds}-fold cross-validation stratified by event (seed {report['seed']}), the same folds "
        "for every model. Fixed epochs; nothing is tuned or early-stopped on a test fold.",
        "- **SNN + Cox / SNN + discrete**: `SurvivalEstimator` defaults (HistoFusion genomic SNN: "
        f"hidden {list(defaults['genomic_hidden_sizes'])} -> {defaults['hidden_size']}, group lasso "
        f"{defaults['group_lasso']} on its input columns, dropout {defaults['dropout']}, "
        f"AdamW lr {defaults['learning_rate']}, weight decay {defaults['weight_decay']}, "
        f"{defaults['epochs']} full-batch epochs, {defaults['n_networks']} network(s); discrete head with "
        f"{defaults['num_bins']} bins). These defaults were chosen beforehand on other sksurv cohorts (see the "
        "last section), never on this dataset.",
        f"- **SNN (nested CV)**: head and group-lasso strength picked from {report['nested_grid']} by "
        "3-fold CV (Harrell's C) inside each training fold.",
        "- **Coxnet**: sksurv `CoxnetSurvivalAnalysis(l1_ratio=0.5)`, alpha chosen by inner 5-fold CV on each "
        "training fold. **RSF**: sksurv `RandomSurvivalForest(300 trees, min_samples_split=10, min_samples_leaf=15, "
        "max_features='sqrt')`.",
        "",
        "## Harrell's C per test fold",
        "",
        "| model | " + " | ".join(f"fold {k + 1}" for k in range(folds)) + " | mean +/- std |",
        "|---|" + "---:|" * (folds + 1),
    ]
    for model, scores in metrics.items():
        c = scores["harrell_c"]
        lines.append(
            f"| {model} | "
            + " | ".join(f"{v:.3f}" for v in c["folds"])
            + f" | **{c['mean']:.3f} +/- {c['std']:.3f}** |"
        )
    lines += [
        "",
        "## All metrics (mean +/- std over folds)",
        "",
        "Uno's C truncated at the last evaluation time; time-dependent AUC averaged over 10 quantiles of the test "
        "event times; integrated Brier score over the same grid (lower is better). Per-fold values and bootstrap "
        "95% CIs are in the JSON output.",
        "",
        "| model | " + " | ".join(METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for model, scores in metrics.items():
        lines.append(
            f"| {model} | " + " | ".join(f"{scores[m]['mean']:.3f} +/- {scores[m]['std']:.3f}" for m in METRICS) + " |"
        )

    coxnet = metrics["Coxnet"]["harrell_c"]
    lines += ["", "## Verdict", ""]
    for model in [m for m in metrics if m.startswith("SNN")]:
        c = metrics[model]["harrell_c"]
        gap = c["mean"] - coxnet["mean"]
        wins = sum(a > b for a, b in zip(c["folds"], coxnet["folds"]))
        verdict = "matches or beats" if gap >= -0.005 else "falls short of"
        lines.append(
            f"- {model} {verdict} Coxnet: mean Harrell's C {c['mean']:.3f} vs {coxnet['mean']:.3f} "
            f"({gap:+.3f}), higher on {wins} of {folds} folds; the fold-to-fold std ({c['std']:.3f}) "
            "is larger than the gap, so the difference is within fold-to-fold noise."
            if abs(gap) < c["std"]
            else f"- {model} {verdict} Coxnet: mean Harrell's C {c['mean']:.3f} vs {coxnet['mean']:.3f} ({gap:+.3f}), "
            f"higher on {wins} of {folds} folds."
        )
    lines += [
        "",
        "One seed and 5 folds of about 40 patients (10 events) each: fold-to-fold differences of a few points of "
        "C are noise. Ranking (Harrell's C) and calibration (integrated Brier score) can disagree; compare both.",
        "",
        *_DEFAULTS_CONTEXT,
    ]
    return "\n".join(lines) + "\n"
