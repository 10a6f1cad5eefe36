"""Survival metrics, all computed by scikit-survival: Harrell's C, Uno's C, time-dependent AUC and the
integrated Brier score, on a time grid valid for both the training and the test follow-up, with
bootstrap confidence intervals over test patients.

The inverse-probability-of-censoring weights (Uno's C, AUC, Brier) are estimated on the *training*
outcomes and are only defined before the last training time. Test outcomes are therefore
administratively censored at ``horizon = min(max train time, max test time)``; metrics evaluated at
times before the horizon are unchanged by that, and no test patient gets an undefined weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from .labels import split_survival, survival_from_arrays

METRICS = ("harrell_c", "uno_c", "mean_auc", "integrated_brier_score")


def follow_up_horizon(y_train: np.ndarray, y_test: np.ndarray) -> float:
    """The last time at which metrics are defined for this train/test pair: ``min(max train, max test)``."""
    return float(min(split_survival(y_train)[1].max(), split_survival(y_test)[1].max()))


def censor_at(y: np.ndarray, horizon: float) -> np.ndarray:
    """Administrative censoring: times beyond ``horizon`` become censored at ``horizon``."""
    event, time = split_survival(y)
    return survival_from_arrays(event & (time < horizon), np.minimum(time, horizon))


def evaluation_times(y_train: np.ndarray, y_test: np.ndarray, num: int = 10) -> np.ndarray:
    """A time grid for AUC and Brier scores: quantiles 10%..90% of the test event times, kept strictly
    inside the test follow-up and before the horizon (see module docstring). At least 2 points."""
    test_event, test_time = split_survival(y_test)
    horizon = follow_up_horizon(y_train, y_test)
    event_times = test_time[test_event & (test_time < horizon)]
    if event_times.size == 0:
        raise ValueError(
            "the test set has no events before the end of the training follow-up; cannot build a time grid"
        )
    grid = np.unique(np.quantile(event_times, np.linspace(0.1, 0.9, num)))
    grid = grid[(grid >= test_time.min()) & (grid < horizon)]
    if grid.size < 2:
        raise ValueError(
            f"only {grid.size} valid evaluation time(s) in [{test_time.min()}, {horizon}); the test set is too small"
        )
    return grid


def survival_matrix(survival_functions, times: np.ndarray) -> np.ndarray:
    """Survival probabilities ``(N, T)`` at ``times`` from ``StepFunction``s, or a ready ``(N, T)`` array."""
    if isinstance(survival_functions, np.ndarray) and survival_functions.dtype != object:
        if survival_functions.ndim != 2 or survival_functions.shape[1] != len(times):
            raise ValueError(
                f"survival_functions array must have shape (N, {len(times)}) to match `times`, "
                f"got {survival_functions.shape}"
            )
        return survival_functions
    return np.vstack([fn(times) for fn in survival_functions])


def evaluate(
    y_train: np.ndarray,
    y_test: np.ndarray,
    risk: np.ndarray,
    survival_functions: Sequence | np.ndarray | None = None,
    times: np.ndarray | None = None,
) -> dict[str, float]:
    """Harrell's C, Uno's C, mean time-dependent AUC and (with survival functions) the integrated Brier score.

    Args:
        y_train: sksurv outcomes of the training set (for the censoring weights).
        y_test: sksurv outcomes of the evaluated patients.
        risk: ``(N,)`` risk scores, higher = worse.
        survival_functions: per-patient ``StepFunction``s or an ``(N, T)`` array evaluated at ``times``.
        times: evaluation grid; default :func:`evaluation_times`.

    Returns:
        ``{"harrell_c", "uno_c", "mean_auc", "integrated_brier_score"}``; the Brier score is NaN
        without survival functions.
    """
    from sksurv.metrics import (
        concordance_index_censored,
        concordance_index_ipcw,
        cumulative_dynamic_auc,
        integrated_brier_score,
    )

    risk = np.asarray(risk, dtype=float)
    test_event, test_time = split_survival(y_test)
    if risk.shape != test_time.shape:
        raise ValueError(f"`risk` has shape {risk.shape} but y_test has {test_time.shape[0]} patients")
    if not np.isfinite(risk).all():
        raise ValueError("`risk` contains NaN or infinite values")
    if not test_event.any():
        raise ValueError("y_test has no events: concordance is undefined")
    times = evaluation_times(y_train, y_test) if times is None else np.asarray(times, dtype=float)
    horizon = follow_up_horizon(y_train, y_test)
    if times.max() >= horizon:
        raise ValueError(
            f"evaluation times must be < {horizon} (end of the joint train/test follow-up), got max {times.max()}"
        )
    y_train = survival_from_arrays(*split_survival(y_train))
    y_test_censored = censor_at(y_test, horizon)

    metrics = {
        "harrell_c": float(concordance_index_censored(test_event, test_time, risk)[0]),
        "uno_c": float(concordance_index_ipcw(y_train, y_test_censored, risk, tau=times.max())[0]),
        "mean_auc": float(cumulative_dynamic_auc(y_train, y_test_censored, risk, times)[1]),
        "integrated_brier_score": float("nan"),
    }
    if survival_functions is not None:
        probabilities = survival_matrix(survival_functions, times)  # (N, T)
        metrics["integrated_brier_score"] = float(
            integrated_brier_score(y_train, y_test_censored, probabilities, times)
        )
    return metrics


def bootstrap_ci(
    y_train: np.ndarray,
    y_test: np.ndarray,
    risk: np.ndarray,
    survival_functions: Sequence | np.ndarray | None = None,
    times: np.ndarray | None = None,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of :func:`evaluate`'s metrics over test patients.

    The time grid is fixed on the full test set so every resample measures the same quantity;
    resamples on which a metric is undefined (no event, grid outside the resample's follow-up) are
    skipped. Returns ``{metric: (low, high)}`` (NaN when fewer than 10 resamples were usable).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence}")
    risk = np.asarray(risk, dtype=float)
    times = evaluation_times(y_train, y_test) if times is None else np.asarray(times, dtype=float)
    probabilities = None if survival_functions is None else survival_matrix(survival_functions, times)  # (N, T)

    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {name: [] for name in METRICS}
    for _ in tqdm(range(n_bootstrap), desc="bootstrap", leave=False, disable=None):
        rows = rng.integers(0, len(risk), len(risk))
        try:
            scores = evaluate(
                y_train, y_test[rows], risk[rows], None if probabilities is None else probabilities[rows], times
            )
        except ValueError:
            continue
        for name, value in scores.items():
            samples[name].append(value)

    tail = (1.0 - confidence) / 2 * 100
    intervals = {}
    for name, values in samples.items():
        values = np.asarray(values)
        values = values[np.isfinite(values)]
        intervals[name] = tuple(np.percentile(values, [tail, 100 - tail])) if values.size >= 10 else (np.nan, np.nan)
    return {name: (float(low), float(high)) for name, (low, high) in intervals.items()}
