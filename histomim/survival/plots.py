"""Kaplan-Meier curves of predicted risk groups with the log-rank p-value and a number-at-risk table (PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..plotting import save_png, subplots
from .labels import split_survival

GROUPINGS = {"median": ("low risk", "high risk"), "tertiles": ("low risk", "intermediate risk", "high risk")}


def risk_groups(risk: np.ndarray, grouping: str = "median", reference_risk: np.ndarray | None = None) -> np.ndarray:
    """Group index per patient (0 = lowest risk) by quantiles of the risk score.

    Without ``reference_risk`` the groups are equal-size quantiles of ``risk`` itself, taken on ranks
    so that tied scores cannot produce empty groups. With it (e.g. the training patients' risks in
    cross-validation, as PORPOISE does) the cut-offs are quantiles of ``reference_risk``, so test
    patients are grouped without looking at each other.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"`grouping` must be one of {list(GROUPINGS)}, got {grouping!r}")
    num_groups = len(GROUPINGS[grouping])
    risk = np.asarray(risk, dtype=float)
    if reference_risk is not None:
        cutoffs = np.quantile(np.asarray(reference_risk, dtype=float), np.arange(1, num_groups) / num_groups)
        return np.searchsorted(cutoffs, risk, side="right")
    if risk.size < num_groups:
        raise ValueError(f"{grouping!r} grouping needs at least {num_groups} patients, got {risk.size}")
    rank = np.argsort(np.argsort(risk, kind="stable"), kind="stable")  # (N,) 0..N-1
    return (rank * num_groups) // risk.size


def number_at_risk(y: np.ndarray, groups: np.ndarray, times: np.ndarray, labels: list[str]) -> pd.DataFrame:
    """Patients still followed (``time >= t``) per group (rows, by ``labels``, 0 = lowest risk) at each of ``times``."""
    _, time = split_survival(y)
    groups = np.asarray(groups)
    counts = [(time[groups == index][:, None] >= np.asarray(times)[None, :]).sum(axis=0) for index in range(len(labels))]
    return pd.DataFrame(np.array(counts), index=labels, columns=list(times))


def plot_risk_groups(
    y: np.ndarray,
    risk: np.ndarray | None,
    path: str | Path,
    grouping: str = "median",
    title: str = "Kaplan-Meier by predicted risk group",
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """Write a Kaplan-Meier PNG of the predicted risk groups and return the log-rank test.

    Groups are :func:`risk_groups` of ``risk``, or the given ``groups`` (0 = lowest risk), e.g.
    pooled over cross-validation folds. Returns ``{"chisq", "p_value"}`` from
    ``sksurv.compare.compare_survival``.
    """
    from sksurv.compare import compare_survival
    from sksurv.nonparametric import kaplan_meier_estimator

    event, time = split_survival(y)
    if groups is None:
        if risk is None or len(np.asarray(risk)) != len(time):
            raise ValueError(f"`risk` must have one score per patient ({len(time)})")
        groups = risk_groups(risk, grouping)
    groups = np.asarray(groups)
    if len(groups) != len(time):
        raise ValueError(f"`groups` has {len(groups)} entries but `y` has {len(time)} patients")
    # the log-rank test needs two groups; a model with (nearly) constant risk may leave only one
    chisq, p_value = compare_survival(y, groups) if len(np.unique(groups)) > 1 else (np.nan, np.nan)

    from matplotlib.ticker import MaxNLocator

    labels = GROUPINGS[grouping]
    figure, (ax, table) = subplots(
        2, 1, figsize=(6, 5.6), sharex=True, gridspec_kw={"height_ratios": [4, 0.35 + 0.3 * len(labels)]}
    )
    colors = {}
    for index, label in enumerate(labels):
        in_group = groups == index
        if not in_group.any():
            continue
        km_time, km_survival, (low, high) = kaplan_meier_estimator(event[in_group], time[in_group], conf_type="log-log")
        # curves start at (0, 1): everyone is alive at time zero
        km_time, km_survival = np.r_[0.0, km_time], np.r_[1.0, km_survival]
        low, high = np.r_[1.0, low], np.r_[1.0, high]
        line = ax.step(
            km_time, km_survival, where="post", label=f"{label} (n={in_group.sum()}, events={event[in_group].sum()})"
        )
        colors[index] = line[0].get_color()
        ax.fill_between(km_time, low, high, step="post", alpha=0.15, color=colors[index])
    ax.set(ylabel="survival probability", ylim=(0, 1.02), title=title)
    note = f"log-rank p = {p_value:.3g}" if np.isfinite(p_value) else "log-rank test n/a: a single risk group"
    ax.text(0.02, 0.04, note, transform=ax.transAxes)
    ax.legend(loc="upper right", fontsize=8)

    # number-at-risk table under the curves, at the x ticks (as in clinical KM figures)
    ticks = MaxNLocator(6).tick_values(0.0, float(time.max()))
    ticks = ticks[(ticks >= 0) & (ticks <= time.max())]
    at_risk = number_at_risk(y, groups, ticks, list(labels))
    for row, index in enumerate(colors):
        for tick, count in zip(ticks, at_risk.iloc[index]):
            table.text(tick, row, str(count), ha="center", va="center", fontsize=8, color=colors[index])
    table.set_yticks(range(len(colors)), [labels[i] for i in colors], fontsize=8)
    table.set_ylim(len(colors) - 0.5, -0.5)
    table.set_xlim(0.0, float(time.max()) * 1.02)
    table.set_xlabel("time")
    table.set_title("number at risk", fontsize=8, loc="left")
    table.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        table.spines[side].set_visible(False)
    figure.tight_layout()
    save_png(figure, path, dpi=120)
    return {"chisq": float(chisq), "p_value": float(p_value)}
