"""Protocols on frozen features: linear probe, kNN and few-shot, scored by the same three metrics.

    linear_probe(train_x, train_y, test_x, test_y)         # logistic regression, C by inner CV
    knn_probe(..., k=20)                                   # cosine kNN
    few_shot(..., shots=(1, 4, 8), seeds=range(5))         # SimpleShot nearest centroids, k per class

Every protocol returns a dict of metrics (`score`) plus what it chose (C, k, shots), so a report can
say exactly what was run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("balanced_accuracy", "macro_f1", "auroc")
C_GRID = tuple(float(c) for c in np.logspace(-4, 3, 8))  # 1e-4 ... 1e3


def score(labels: np.ndarray, probabilities: np.ndarray, num_classes: int) -> dict[str, float]:
    """Balanced accuracy, macro-F1 and AUROC of (N, C) class probabilities against (N,) labels.

    AUROC: binary -> of the positive class; multi-class -> one-vs-rest, macro-averaged (sklearn's
    ``roc_auc_score(multi_class="ovr")``) over the classes present in ``labels``: a class absent from
    the test set has no ROC curve, so it is left out rather than failing the whole evaluation.
    Predictions are the most probable class; F1 is averaged over every class seen in training or test.
    """
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    predictions = probabilities.argmax(axis=1)
    present = np.unique(labels)
    if num_classes == 2:
        auroc = roc_auc_score(labels, probabilities[:, 1]) if len(present) == 2 else float("nan")
    elif len(present) == num_classes:
        auroc = roc_auc_score(labels, probabilities, multi_class="ovr", average="macro", labels=range(num_classes))
    else:
        per_class = [roc_auc_score(labels == c, probabilities[:, c]) for c in present] if len(present) > 1 else []
        auroc = float(np.mean(per_class)) if per_class else float("nan")
    return {
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro", labels=np.union1d(present, predictions))),
        "auroc": float(auroc),
    }


def _full_probabilities(model, features: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes) probabilities, with zeros for classes the classifier never saw in training."""
    probabilities = np.zeros((len(features), num_classes))
    probabilities[:, model.classes_] = model.predict_proba(features)
    return probabilities


def linear_probe(
    train_x, train_y, test_x, test_y, num_classes: int, seed: int = 0, c_grid: Sequence[float] = C_GRID, folds: int = 5
) -> dict:
    """Standardised features -> multinomial logistic regression, C chosen by stratified inner CV on the
    training set only (balanced accuracy; ``folds`` capped by the smallest class)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    counts = np.bincount(train_y)
    folds = min(folds, int(counts[counts > 0].min()))  # every fold needs each class
    if folds >= 2:
        search = GridSearchCV(
            pipeline, {"logisticregression__C": list(c_grid)}, scoring="balanced_accuracy",
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
        )
        model = search.fit(train_x, train_y).best_estimator_
        chosen = float(search.best_params_["logisticregression__C"])
    else:  # a class with one training example: no CV possible, sklearn's default C
        model, chosen = pipeline.fit(train_x, train_y), 1.0
    return {**score(test_y, _full_probabilities(model, test_x, num_classes), num_classes), "C": chosen, "cv_folds": folds}


def knn_probe(train_x, train_y, test_x, test_y, num_classes: int, k: int = 20) -> dict:
    """Cosine k-nearest-neighbour vote (``k`` capped by the training set size)."""
    from sklearn.neighbors import KNeighborsClassifier

    k = min(k, len(train_y))
    model = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(train_x, train_y)
    return {**score(test_y, _full_probabilities(model, test_x, num_classes), num_classes), "k": k}


def simpleshot_probabilities(support_x, support_y, query_x, num_classes: int, temperature: float = 0.1):
    """SimpleShot (Wang et al., 2019): centre on the support mean, L2-normalise, nearest class centroid by
    cosine; (N, C) softmax over similarities / ``temperature`` (classes without support get 0)."""
    centre = support_x.mean(axis=0, keepdims=True)

    def normalise(x):
        x = x - centre
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    support, query = normalise(support_x), normalise(query_x)
    present = np.unique(support_y)
    centroids = np.stack([support[support_y == c].mean(axis=0) for c in present])  # (C', D)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    logits = query @ centroids.T / temperature  # (N, C')
    logits -= logits.max(axis=1, keepdims=True)
    probabilities = np.zeros((len(query_x), num_classes))
    probabilities[:, present] = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probabilities


def few_shot(
    train_x, train_y, test_x, test_y, num_classes: int, shots: Sequence[int] = (1, 4, 8), seeds: Sequence[int] = range(5)
) -> dict[int, dict]:
    """For each k in ``shots``: draw k training examples per class (all of a class that has fewer) with each
    seed, classify the test set with `simpleshot_probabilities`; mean and std of every metric over seeds."""
    results = {}
    for k in shots:
        runs = []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            support = np.concatenate([
                rng.choice(np.flatnonzero(train_y == c), min(k, int((train_y == c).sum())), replace=False)
                for c in np.unique(train_y)
            ])  # fmt: skip
            probabilities = simpleshot_probabilities(train_x[support], train_y[support], test_x, num_classes)
            runs.append(score(test_y, probabilities, num_classes))
        results[int(k)] = {
            **{m: float(np.mean([r[m] for r in runs])) for m in METRICS},
            **{f"{m}_std": float(np.std([r[m] for r in runs])) for m in METRICS},
            "seeds": [int(s) for s in seeds],
        }
    return results


__all__ = ["METRICS", "C_GRID", "score", "linear_probe", "knn_probe", "few_shot", "simpleshot_probabilities"]
