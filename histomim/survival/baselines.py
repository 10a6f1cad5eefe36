"""The scikit-survival baselines every histomim survival model is compared with: an elastic-net Cox whose
alpha is chosen by inner CV (:class:`CoxnetCV`) and a random survival forest, on the same tabular encoding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator

from .estimator import make_tabular_encoder
from .labels import split_survival


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
        self.coef_ = self.model_.coef_[:, -1]  # (G,) the path ends at the chosen alpha
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
