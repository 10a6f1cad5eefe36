"""Survival analysis around the fusion model: labels from pandas (labels), studies (study), sksurv metrics,
survival curves (curves), the sklearn-compatible estimator, sksurv baselines, the cross-validation engine
(evaluation), the `histomim survival` driver (experiment), plots and the benchmark. Nothing here imports
`histomim.training`.

``SurvivalEstimator`` is loaded on first access so that ``import histomim`` stays light.
"""


def __getattr__(name: str):
    if name == "SurvivalEstimator":
        from .estimator import SurvivalEstimator

        return SurvivalEstimator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SurvivalEstimator"]
