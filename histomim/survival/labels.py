"""Survival labels from pandas tables: validated sksurv arrays, discrete time bins and patient-level folds.

A study is a DataFrame with one row per patient, or one row per slide grouped by a patient column.
Outcomes are given either as an *event* column (1/True = event observed, the sksurv convention used
everywhere in histomim) or as a *censorship* column (1/True = censored, the PORPOISE/SurvPath
convention), which is converted with ``event = 1 - censorship``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

EVENT_FIELD, TIME_FIELD = "event", "time"


def _require_columns(df: pd.DataFrame, *columns: str | None) -> None:
    missing = [c for c in columns if c is not None and c not in df.columns]
    if missing:
        raise KeyError(f"column(s) {missing} not found in the table; available columns: {list(df.columns)}")


def _plain(value):
    """numpy scalars print as ``np.int64(2)``; show the plain Python value in error messages."""
    return value.item() if isinstance(value, np.generic) else value


def _first_bad_row(df: pd.DataFrame, mask: np.ndarray) -> str:
    rows = df.index[mask]
    more = f" (and {len(rows) - 1} more)" if len(rows) > 1 else ""
    return f"row {rows[0]!r}{more}"


def validate_times(df: pd.DataFrame, time_col: str) -> np.ndarray:
    """Times as float, rejecting non-numeric, NaN, infinite and negative values (naming the row)."""
    _require_columns(df, time_col)
    time = pd.to_numeric(df[time_col], errors="coerce").to_numpy(dtype=float)
    not_numeric = np.isnan(time) & df[time_col].notna().to_numpy()
    if not_numeric.any():
        row = _first_bad_row(df, not_numeric)
        raise ValueError(
            f"time column {time_col!r} has a non-numeric value {_plain(df[time_col][not_numeric].iloc[0])!r} at {row}"
        )
    for mask, what in _time_problems(time):
        if mask.any():
            raise ValueError(f"time column {time_col!r} has {what} at {_first_bad_row(df, mask)}")
    return time


def _time_problems(time: np.ndarray) -> list[tuple[np.ndarray, str]]:
    """``(mask, what)`` of every kind of time no survival model can use, as sksurv rejects them."""
    return [
        (np.isnan(time), "a missing (NaN) time"),
        (np.isinf(time), "an infinite time"),
        (time < 0, "a negative time"),
    ]


def validate_binary(df: pd.DataFrame, column: str) -> np.ndarray:
    """A 0/1 or boolean column as a bool array, rejecting NaN and any other value (naming the row)."""
    _require_columns(df, column)
    values = df[column]
    if values.isna().any():
        raise ValueError(f"column {column!r} has a missing value at {_first_bad_row(df, values.isna().to_numpy())}")
    numeric = pd.to_numeric(values.astype(object), errors="coerce").astype(float)
    bad = ~numeric.isin([0, 1]).to_numpy()
    if bad.any():
        raise ValueError(
            f"column {column!r} must hold 0/1 or booleans, "
            f"got {_plain(values[bad].iloc[0])!r} at {_first_bad_row(df, bad)}"
        )
    return numeric.to_numpy(dtype=float).astype(bool)


def survival_array(
    df: pd.DataFrame, time_col: str, event_col: str | None = None, censorship_col: str | None = None
) -> np.ndarray:
    """Validated sksurv structured array ``[("event", bool), ("time", float)]`` from a DataFrame.

    Give exactly one of ``event_col`` (1 = event observed) or ``censorship_col`` (1 = censored).
    Raises ``KeyError`` for a missing column and ``ValueError`` naming the column and row for
    non-numeric/NaN/negative times, outcomes outside {0, 1}, or a table without any event.
    """
    if (event_col is None) == (censorship_col is None):
        raise ValueError("give exactly one of `event_col` (1 = event) or `censorship_col` (1 = censored)")
    _require_columns(df, time_col, event_col, censorship_col)
    time = validate_times(df, time_col)
    event = validate_binary(df, event_col) if event_col is not None else ~validate_binary(df, censorship_col)
    if not event.any():
        source = f"event column {event_col!r}" if event_col is not None else f"censorship column {censorship_col!r}"
        raise ValueError(f"no events in the table ({source}): every patient is censored, survival cannot be fitted")
    return survival_from_arrays(event, time)


def survival_from_arrays(event, time) -> np.ndarray:
    """The sksurv structured array ``[("event", bool), ("time", float)]`` of two 1-D sequences, as
    ``sksurv.util.Surv.from_arrays`` builds it (without importing sksurv). Every histomim label array is made here."""
    event, time = np.asarray(event, dtype=bool), np.asarray(time, dtype=float)
    if event.ndim != 1 or event.shape != time.shape:
        raise ValueError(f"event and time must be 1-D of one length, got shapes {event.shape} and {time.shape}")
    y = np.empty(len(event), dtype=[(EVENT_FIELD, bool), (TIME_FIELD, float)])
    y[EVENT_FIELD], y[TIME_FIELD] = event, time
    return y


def split_survival(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(event bool, time float)`` from any sksurv structured array (its field names may differ, e.g. ``e.tdm``).

    Validated as scikit-survival validates ``y``: events must be booleans or 0/1 and times finite and
    non-negative; a ``ValueError`` names the field and the first bad index otherwise.
    """
    if getattr(y, "dtype", None) is None or y.dtype.names is None or len(y.dtype.names) != 2:
        raise ValueError(
            "`y` must be a structured array with an event (bool) and a time (float) field, e.g. from survival_array()"
        )
    event_name, time_name = y.dtype.names
    # contiguous copies: field views of a structured array are strided, which torch cannot wrap
    return _checked_events(y[event_name], event_name), _checked_times(y[time_name], time_name)


def _first_bad_index(mask: np.ndarray) -> str:
    indices = np.flatnonzero(mask)
    more = f" (and {len(indices) - 1} more)" if len(indices) > 1 else ""
    return f"index {indices[0]}{more}"


def _checked_events(values: np.ndarray, field: str) -> np.ndarray:
    """An event field as bool, refusing anything but booleans and 0/1: a cast would turn 0.5 or 2.0 into an event."""
    if values.dtype == bool:
        return np.ascontiguousarray(values)
    numeric = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(dtype=float)
    bad = ~np.isin(numeric, (0.0, 1.0))
    if bad.any():
        raise ValueError(
            f"event field {field!r} of y must hold booleans or 0/1, "
            f"got {_plain(values[bad][0])!r} at {_first_bad_index(bad)}"
        )
    return numeric.astype(bool)


def _checked_times(values: np.ndarray, field: str) -> np.ndarray:
    """A time field as float, refusing non-numeric, NaN, infinite and negative times (naming the index)."""
    try:
        time = np.ascontiguousarray(values, dtype=float)
    except (TypeError, ValueError) as error:
        raise ValueError(f"time field {field!r} of y must hold numbers: {error}") from None
    for mask, what in _time_problems(time):
        if mask.any():
            raise ValueError(f"time field {field!r} of y has {what} at {_first_bad_index(mask)}")
    return time


def time_bins(time: np.ndarray, event: np.ndarray, num_bins: int = 4) -> np.ndarray:
    """Bin edges ``(num_bins + 1,)`` at quantiles of the *uncensored* times, outer edges widened to 0 and inf.

    As in PORPOISE/SurvPath, each bin holds about the same number of events; bins are ``[edges[k], edges[k+1])``.
    """
    time, event = np.asarray(time, dtype=float), np.asarray(event, dtype=bool)
    if num_bins < 2:
        raise ValueError(f"`num_bins` must be at least 2, got {num_bins}")
    if not event.any():
        raise ValueError("time_bins needs at least one observed event to place the quantiles")
    edges = np.quantile(time[event], np.linspace(0.0, 1.0, num_bins + 1))
    edges[0], edges[-1] = 0.0, np.inf
    if np.any(np.diff(edges) <= 0):
        raise ValueError(
            f"{num_bins} bins give duplicate edges {edges.tolist()} "
            f"({int(event.sum())} event times, many tied); use fewer bins"
        )
    return edges


def bin_index(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin ``k`` with ``edges[k] <= time < edges[k+1]`` of every time, as int64 ``(N,)``."""
    time, edges = np.asarray(time, dtype=float), np.asarray(edges, dtype=float)
    if np.any(time < 0) or np.any(np.isnan(time)):
        raise ValueError("bin_index: times must be non-negative and not NaN")
    return np.clip(np.searchsorted(edges, time, side="right") - 1, 0, len(edges) - 2).astype(np.int64)


def patient_table(df: pd.DataFrame, patient_col: str, list_cols: Sequence[str] = ()) -> pd.DataFrame:
    """Collapse per-slide rows to one row per patient (in order of first appearance).

    Every column except ``list_cols`` must agree within a patient (a patient has one outcome and one
    genome); ``list_cols`` (e.g. slide feature paths) are gathered into lists. Raises ``ValueError``
    naming the patient and the column when a patient's rows conflict.
    """
    _require_columns(df, patient_col, *list_cols)
    missing_id = df[patient_col].isna().to_numpy()
    if missing_id.any():
        raise ValueError(f"patient column {patient_col!r} has a missing id at {_first_bad_row(df, missing_id)}")
    grouped = df.groupby(patient_col, sort=False)
    constant_cols = [c for c in df.columns if c != patient_col and c not in list_cols]
    if constant_cols:
        distinct = grouped[constant_cols].nunique(dropna=False)  # (P, C)
        conflicts = distinct.gt(1)
        if conflicts.to_numpy().any():
            patient, column = conflicts.stack().loc[lambda s: s].index[0]
            values = df.loc[df[patient_col] == patient, column].tolist()
            raise ValueError(f"patient {patient!r} has conflicting values in column {column!r}: {values}")
    table = grouped[constant_cols].first() if constant_cols else pd.DataFrame(index=grouped.size().index)
    for column in list_cols:
        table[column] = grouped[column].agg(list)
    return table.reset_index()


def patient_folds(
    df: pd.DataFrame,
    patient_col: str | None = None,
    event_col: str | None = None,
    *,
    labels: np.ndarray | None = None,
    n_splits: int = 5,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """K-fold splits at patient level, stratified by event: ``[(train_rows, test_rows), ...]`` (positional).

    All rows (slides) of one patient land in the same fold. Stratification uses ``event_col`` or
    ``labels`` (per row: an sksurv array or a 0/1 vector); ``patient_col=None`` means one row per patient.
    """
    from sklearn.model_selection import StratifiedKFold

    if (event_col is None) == (labels is None):
        raise ValueError("give exactly one of `event_col` or `labels` to stratify the folds by event")
    if labels is None:
        event = validate_binary(df, event_col)
    elif getattr(labels, "dtype", None) is not None and labels.dtype.names is not None:
        event = split_survival(labels)[0]
    else:
        event = np.asarray(labels).astype(bool)
    if len(event) != len(df):
        raise ValueError(f"`labels` has {len(event)} entries for a table of {len(df)} rows")

    if patient_col is not None:
        _require_columns(df, patient_col)
    patients = df[patient_col].to_numpy() if patient_col is not None else np.arange(len(df))
    per_patient = pd.DataFrame({"patient": patients, "event": event}).groupby("patient", sort=False)["event"]
    conflicting = per_patient.nunique() > 1
    if conflicting.any():
        raise ValueError(f"patient {conflicting[conflicting].index[0]!r} has conflicting event values across its rows")
    patient_event = per_patient.first()  # (P,)
    counts = patient_event.value_counts()
    if len(counts) < 2 or counts.min() < n_splits:
        raise ValueError(
            f"{n_splits} stratified folds need at least {n_splits} patients with and without an event; "
            f"got {int(counts.get(True, 0))} with and {int(counts.get(False, 0))} without"
        )

    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    patient_ids = patient_event.index.to_numpy()
    folds = []
    for _, test_patients in splitter.split(patient_ids, patient_event.to_numpy()):
        test_rows = np.flatnonzero(np.isin(patients, patient_ids[test_patients]))
        train_rows = np.setdiff1d(np.arange(len(df)), test_rows)
        folds.append((train_rows, test_rows))
    return folds


def resolve_paths(
    df: pd.DataFrame, column: str, base_dir: str | Path | None = None, allow_missing: bool = False
) -> pd.Series:
    """Absolute paths of ``column`` (relative ones resolved against ``base_dir``, default the working directory).

    A cell may hold one path or a list of paths (a patient's slides). Raises ``FileNotFoundError``
    naming the column, row and path of the first file that does not exist, and ``ValueError`` for
    an empty cell unless ``allow_missing`` (a patient without that modality; the cell becomes ``None``).
    """
    _require_columns(df, column)
    base = Path(base_dir) if base_dir is not None else Path.cwd()

    def resolve(row, value) -> str:
        path = Path(value)
        path = path if path.is_absolute() else base / path
        if not path.exists():
            raise FileNotFoundError(f"path column {column!r}, row {row!r}: file {str(path)!r} does not exist")
        return str(path)

    resolved = []
    for row, cell in df[column].items():
        values = list(cell) if isinstance(cell, (list, tuple, np.ndarray)) else [cell]
        values = [v for v in values if not pd.isna(v)]
        if not values:
            if not allow_missing:
                raise ValueError(f"path column {column!r} has a missing path at row {row!r}")
            resolved.append(None)
            continue
        paths = [resolve(row, v) for v in values]
        resolved.append(paths if isinstance(cell, (list, tuple, np.ndarray)) else paths[0])
    return pd.Series(resolved, index=df.index, name=column, dtype=object)
