"""A survival study as ``(X, y)``: one row of features per patient and an sksurv label array.

:func:`load_study` reads a CSV/TSV/parquet table (one row per patient, or per slide with a patient
column), :func:`breast_cancer_study` is the default cohort of ``histomim survival``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .labels import (
    _plain,
    patient_table,
    resolve_paths,
    split_survival,
    survival_array,
    survival_from_arrays,
)


def breast_cancer_study() -> tuple[pd.DataFrame, np.ndarray]:
    """sksurv's breast-cancer cohort: 198 patients, 76 gene-expression probes + age/er/grade/size, 51 events."""
    from sksurv.datasets import load_breast_cancer

    X, y = load_breast_cancer()
    return X, survival_from_arrays(*split_survival(y))


# Words that make a column an identifier (split on non-letters and camelCase: "case_id", "PatientID", "submitter")
ID_WORDS = {"id", "ids", "patient", "case", "subject", "participant", "submitter", "barcode", "pid"}


def refuse_repeated_ids(df: pd.DataFrame, features: Sequence[str]) -> None:
    """Without a patient column every row is a patient: refuse a table whose ids repeat, which is one row per slide.

    Its slides would land in different folds (patient-level leakage), so a ``ValueError`` names the column
    and tells to pass it as ``--patient-col``. An id column is one named like one (:data:`ID_WORDS`), or a
    text feature column with more distinct values than half the rows (no category has that many levels).
    """
    for column in df.columns:
        values = df[column]
        repeated = values.duplicated(keep=False) & values.notna()
        if not repeated.any():
            continue
        words = {w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", str(column))}
        text = not pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        many_levels = text and column in features and values.nunique() > len(values) / 2
        if words & ID_WORDS or many_levels:
            value = values[repeated].iloc[0]
            rows = values.index[(values == value).to_numpy()][:2].tolist()
            raise ValueError(
                f"column {column!r} repeats the id {_plain(value)!r} (rows {rows[0]!r} and {rows[1]!r}): the table "
                "looks like one row per slide, and without a patient column a patient's slides would be split "
                f"across folds (patient-level leakage). Pass --patient-col {column} (load_study(patient_col="
                f"{column!r})) so that they are collapsed into one patient"
            )


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

    if patient_col is None:
        refuse_repeated_ids(df.drop(columns=[*outcome_cols, *path_cols]), features)
    df = df[[*id_cols, *outcome_cols, *features, *path_cols]]
    if patient_col is not None:
        df = patient_table(df, patient_col, list_cols=[slide_features_col] if slide_features_col else ()).set_index(
            patient_col
        )
    if len(df) < 2:
        who = f"patient column {patient_col!r}" if patient_col is not None else "one row per patient"
        raise ValueError(f"the study table holds {len(df)} patient(s) ({who}); survival needs at least 2")
    y = survival_array(df, time_col, event_col, censorship_col)
    X = df[[*features, *path_cols]].copy()
    for column in path_cols:
        X[column] = resolve_paths(X, column, base_dir, allow_missing=True)
    return X, y
