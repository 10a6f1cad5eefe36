"""The cross-validation engine: fit every model on the same folds, score each test fold, write the results.

:func:`cross_validate` fits each (model, fold) pair (spread over ``accelerate`` processes when given an
``Accelerator``), scores it with :func:`~histomim.survival.metrics.evaluate` and bootstrap CIs, and
returns :class:`CVResults`; :func:`write_results` writes its CSV/JSON files (atomically) and a
Kaplan-Meier PNG of the pooled out-of-fold risk groups per model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, clone
from tqdm.auto import tqdm

from ..atomic import atomic_path
from .labels import split_survival, survival_from_arrays
from .metrics import METRICS, bootstrap_ci, evaluate
from .plots import plot_risk_groups, risk_groups


@dataclass
class CVResults:
    """Per-fold scores and out-of-fold predictions of every model."""

    fold_metrics: pd.DataFrame  # one row per (model, fold): metrics and their bootstrap CIs
    predictions: pd.DataFrame  # one row per (model, patient): fold, risk, risk group, time, event
    saved_models: dict[tuple[str, int], Path] = field(default_factory=dict)  # (model, fold) -> saved folder

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


def seeded(estimator: BaseEstimator, seed: int) -> BaseEstimator:
    """A clone of ``estimator`` whose unset ``random_state`` parameters (nested ones too: pipeline steps,
    ``GridSearchCV``'s estimator) are ``seed``, so that a cross-validation run is reproducible by default."""
    model = clone(estimator)
    unset = {
        name: seed
        for name, value in model.get_params(deep=True).items()
        if name.rsplit("__", 1)[-1] == "random_state" and value is None
    }
    return model.set_params(**unset)


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
    model_dir: Path | None = None,
) -> dict[str, object]:
    """Fit one model on one fold and score its test patients; models that can be saved
    (``save_pretrained``) are written to ``model_dir/<model>/fold_<k>`` when it is given."""
    model = seeded(estimator, seed)
    if device is not None and "device" in model.get_params():
        model.set_params(device=device)
    model.fit(X.iloc[train], y[train])
    saved = None
    if model_dir is not None and hasattr(model, "save_pretrained"):
        saved = model_dir / slug(name) / f"fold_{fold}"
        model.save_pretrained(saved)
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
        "saved": saved,
        "linear": getattr(model, "linear_", None),
    }


def cross_validate(
    models: Mapping[str, BaseEstimator],
    X: pd.DataFrame,
    y: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    n_bootstrap: int = 200,
    seed: int = 0,
    accelerator=None,
    model_dir: str | Path | None = None,
) -> CVResults:
    """Fit and score every model on every fold (the same folds for all models).

    With an ``accelerate.Accelerator`` the (model, fold) fits are split across its processes and
    gathered, so every process returns the full results. With ``model_dir``, every fold's fitted
    ``SurvivalEstimator`` is saved there (``CVResults.saved_models``).
    """
    model_dir = Path(model_dir) if model_dir is not None else None
    tasks = [(name, fold) for name in models for fold in range(len(folds))]
    device = accelerator.device if accelerator is not None else None
    show = accelerator is None or accelerator.is_main_process

    def run(my_tasks):
        return [
            _fit_fold(name, models[name], X, y, fold, *folds[fold], n_bootstrap, seed, device, model_dir)
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
        if o["linear"] is not None:
            row["linear_mode"] = o["linear"]
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
    saved = {(o["model"], o["fold"]): o["saved"] for o in outcomes if o["saved"] is not None}
    return CVResults(pd.DataFrame(fold_rows), pd.concat(prediction_rows, ignore_index=True), saved)


def write_results(
    results: CVResults, output_dir: str | Path, config: Mapping[str, object] | None = None
) -> dict[str, Path]:
    """``fold_metrics.csv``, ``predictions.csv``, ``summary.json`` and one ``km_<model>.png`` per model.

    Every file is written atomically, so a killed run never leaves a truncated table behind. The
    Kaplan-Meier plot pools the test patients of all folds, each split at the median risk of its own
    fold's training patients.
    """
    output_dir = Path(output_dir)
    paths = {"fold_metrics": output_dir / "fold_metrics.csv", "predictions": output_dir / "predictions.csv"}
    for name, frame in (("fold_metrics", results.fold_metrics), ("predictions", results.predictions)):
        with atomic_path(paths[name]) as partial:
            frame.to_csv(partial, index=False)

    log_rank = {}
    for model, rows in results.predictions.groupby("model", sort=False):
        y = survival_from_arrays(rows["event"].to_numpy(bool), rows["time"].to_numpy(float))
        path = output_dir / f"km_{slug(model)}.png"
        groups = rows["risk_group"].to_numpy()
        log_rank[model] = plot_risk_groups(y, None, path, groups=groups, title=f"{model}: out-of-fold risk groups")
        paths[f"km_{model}"] = path

    paths["summary"] = output_dir / "summary.json"
    summary = {"metrics": results.summary(), "log_rank": log_rank, "config": dict(config or {})}
    write_text(paths["summary"], to_json(summary))
    return paths


def slug(model: str) -> str:
    """A model's name as a file name: ``"HistoFusion (discrete)"`` -> ``"HistoFusion_(discrete)"``."""
    return model.replace(" ", "_").replace("+", "")


def write_text(path: str | Path, text: str) -> Path:
    """Write a JSON/markdown result file atomically (see :func:`histomim.atomic.atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as partial:
        partial.write_text(text)
    return path


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
