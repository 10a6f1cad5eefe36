"""Survival curves from a trained model's outputs, in NumPy: the Breslow baseline of a Cox model and
discrete-time curves evaluated at arbitrary times (what ``SurvivalEstimator.predict_survival_function`` uses)."""

from __future__ import annotations

import numpy as np
from torch import Tensor


def discrete_survival_at(survival: np.ndarray, edges: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Evaluate discrete-time survival curves ``(B, K)`` at arbitrary ``times`` ``(T,)`` -> ``(B, T)``.

    ``S_k`` is the probability of surviving through bin ``k = [edges[k], edges[k+1])``, so the curve
    steps down to ``S_k`` at the upper edge ``edges[k+1]`` and equals 1 before the first upper edge.
    """
    survival = np.asarray(survival, dtype=float)
    edges = np.asarray(edges, dtype=float)
    if survival.ndim != 2 or edges.shape != (survival.shape[1] + 1,):
        raise ValueError(
            f"`edges` must have K + 1 = {survival.shape[-1] + 1} entries for survival of shape {survival.shape}"
        )
    padded = np.pad(survival, ((0, 0), (1, 0)), constant_values=1.0)  # (B, K + 1): column k+1 is S_k
    completed = np.searchsorted(edges[1:], np.asarray(times, dtype=float), side="right")  # (T,) bins fully survived
    return padded[:, completed]  # (B, T)


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=float)


class BreslowBaseline:
    """Breslow estimate of the Cox baseline cumulative hazard, fitted on training risk scores.

    ``H0(t) = sum_{t_j <= t} d_j / sum_{k: time_k >= t_j} exp(risk_k)`` and
    ``S(t | x) = exp(-H0(t) * exp(risk(x)))``. Works on numpy arrays (tensors are detached).
    """

    def fit(self, risk, time, event) -> "BreslowBaseline":
        risk, time = _as_numpy(risk), _as_numpy(time)
        event = _as_numpy(event).astype(bool)
        if not (risk.shape == time.shape == event.shape) or risk.ndim != 1:
            raise ValueError(
                f"risk, time and event must be 1-D of one length, got {risk.shape}, {time.shape}, {event.shape}"
            )
        if not event.any():
            raise ValueError("BreslowBaseline.fit needs at least one observed event")
        # shift by the max so exp() cannot overflow; the shift cancels in H0(t) * exp(risk)
        self.shift_ = float(risk.max())
        hazard_ratio = np.exp(risk - self.shift_)  # (N,)
        order = np.argsort(time, kind="stable")
        time, event, hazard_ratio = time[order], event[order], hazard_ratio[order]

        self.event_times_ = np.unique(time[event])  # (T,)
        deaths = np.array([event[time == t].sum() for t in self.event_times_])  # (T,) d_j
        at_risk = np.cumsum(hazard_ratio[::-1])[::-1]  # (N,) sum over time_k >= time_i
        risk_set = at_risk[np.searchsorted(time, self.event_times_, side="left")]  # (T,)
        self.cumulative_hazard_ = np.cumsum(deaths / risk_set)  # (T,) H0 at each event time
        return self

    def cumulative_baseline_hazard(self, times) -> np.ndarray:
        """``H0(t)`` (relative to the stored shift) at ``times`` ``(T,)``."""
        index = np.searchsorted(self.event_times_, _as_numpy(times), side="right")  # (T,)
        return np.concatenate([[0.0], self.cumulative_hazard_])[index]

    def survival(self, risk, times) -> np.ndarray:
        """Survival probabilities ``(B, T)`` for risk scores ``(B,)`` at ``times`` ``(T,)``."""
        if not hasattr(self, "cumulative_hazard_"):
            raise RuntimeError("call BreslowBaseline.fit before survival()")
        hazard_ratio = np.exp(_as_numpy(risk) - self.shift_)  # (B,)
        return np.exp(-np.outer(hazard_ratio, self.cumulative_baseline_hazard(times)))  # (B, T)


__all__ = ["BreslowBaseline", "discrete_survival_at"]
