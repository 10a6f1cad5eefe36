"""``histomim survival``: load a study, cross-validate the fusion model (and the baselines) on it, write the results.

:func:`run_survival_cv` is what ``histomim survival`` (``histomim/cli/survival.py``) calls:

1. load the study (a CSV/parquet table, or sksurv's breast-cancer cohort), collapse slides to
   patients, validate outcomes and file paths (:mod:`.study`);
2. split patients into stratified folds;
3. fit every model on every fold (:mod:`.evaluation`): :class:`~histomim.survival.estimator.SurvivalEstimator`
   and optionally Coxnet (alpha chosen by inner CV on the training fold) and a random survival forest
   (:mod:`.baselines`);
4. score each test fold and write CSV/JSON and a Kaplan-Meier PNG of the pooled out-of-fold risk groups.

Under ``accelerate launch`` / ``torchrun`` the (model, fold) fits are spread over the processes
(each trains on its ``accelerator.device``) and gathered on the main process, which writes the results.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sklearn.base import BaseEstimator

from .baselines import baseline_estimators
from .estimator import SurvivalEstimator
from .evaluation import CVResults, cross_validate, write_results
from .labels import patient_folds
from .study import breast_cancer_study, load_study

_ESTIMATOR_DEFAULTS = SurvivalEstimator().get_params()


@dataclass
class SurvivalCVConfig:
    """Everything ``scripts/train_survival.py`` can set (see its ``--help``)."""

    table: str | None = None
    time_col: str = "time"
    event_col: str | None = None
    censorship_col: str | None = None
    patient_col: str | None = None
    genomic_cols: list[str] | None = None
    genomic_prefix: str | None = None
    slide_features_col: str | None = None
    radiology_col: str | None = None
    fusion: str = "concat"
    head: str = "discrete"
    folds: int = 5
    epochs: int = _ESTIMATOR_DEFAULTS["epochs"]
    lr: float = _ESTIMATOR_DEFAULTS["learning_rate"]
    weight_decay: float = _ESTIMATOR_DEFAULTS["weight_decay"]
    seed: int = 0
    n_bootstrap: int = 200
    compare_baselines: bool = False
    output_dir: str = "outputs/survival"
    estimator_params: dict[str, object] = field(default_factory=dict)


def run_survival_cv(config: SurvivalCVConfig, accelerator=None) -> CVResults:
    """Load the study, cross-validate the model (and baselines), print the comparison, write the results."""
    import torch
    from accelerate import Accelerator

    # cpu=True on CPU-only machines so that torchrun / accelerate launch start gloo processes
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    if config.table is None:
        X, y = breast_cancer_study()
    else:
        if config.event_col is None and config.censorship_col is None:
            raise ValueError("a study table needs --event-col or --censorship-col")
        X, y = load_study(
            config.table,
            config.time_col,
            config.event_col,
            config.censorship_col,
            config.patient_col,
            config.genomic_cols,
            config.genomic_prefix,
            config.slide_features_col,
            config.radiology_col,
        )
    folds = patient_folds(X, labels=y, n_splits=config.folds, seed=config.seed)

    estimator = SurvivalEstimator(
        head=config.head,
        fusion=config.fusion,
        histology_col=config.slide_features_col,
        radiology_col=config.radiology_col,
        epochs=config.epochs,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        random_state=config.seed,
        **config.estimator_params,
    )
    models: dict[str, BaseEstimator] = {f"HistoFusion ({config.head})": estimator}
    if config.compare_baselines:
        path_cols = {config.slide_features_col, config.radiology_col}
        models.update(baseline_estimators([c for c in X.columns if c not in path_cols], config.seed))

    results = cross_validate(models, X, y, folds, config.n_bootstrap, config.seed, accelerator)
    if accelerator.is_main_process:
        write_results(results, config.output_dir, asdict(config))
        print(results.table())
    return results
