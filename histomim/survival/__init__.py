"""Survival labels from pandas, losses, sksurv metrics, the sklearn-compatible estimator, plots and the benchmark.

``SurvivalEstimator`` is loaded on first access so that ``import histomim`` stays light.
"""


def __getattr__(name: str):
    if name == "SurvivalEstimator":
        from .estimator import SurvivalEstimator

        return SurvivalEstimator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SurvivalEstimator"]
