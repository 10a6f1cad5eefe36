"""``histomim survival``: load a study, cross-validate the fusion model (and the baselines) on it, write the results.

:func:`run_survival_cv` is what ``histomim survival`` (``histomim/cli/survival.py``) calls:

1. load the study (a CSV/parquet table, or sksurv's breast-cancer cohort), collapse slides to
   patients, validate outcomes and file paths (:mod:`.study`);
2. split patients into stratified folds;
3. fit every model on every fold (:mod:`.evaluation`): :class:`~histomim.survival.estimator.SurvivalEstimator`
   and optionally Coxnet (alpha chosen by inner CV on the training fold) and a random survival forest
   (:mod:`.baselines`);
4. score each test fold and write CSV/JSON and a Kaplan-Meier PNG of the pooled out-of-fold risk groups;
5. optionally save every fold's ``HistoFusionForSurvival`` (``--save-models``) and/or a model refitted on
   all patients (``--refit``), each with a model card, and push the refitted one to the Hub (private).

Under ``accelerate launch`` / ``torchrun`` the (model, fold) fits are spread over the processes
(each trains on its ``accelerator.device``) and gathered on the main process, which writes the results.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from sklearn.base import BaseEstimator

from .baselines import baseline_estimators
from .estimator import SurvivalEstimator
from .evaluation import CVResults, cross_validate, write_results
from .labels import patient_folds, split_survival
from .model_card import write_model_card
from .study import breast_cancer_study, load_study

_ESTIMATOR_DEFAULTS = SurvivalEstimator().get_params()


@dataclass
class SurvivalCVConfig:
    """Everything ``histomim survival`` can set (see its ``--help``)."""

    table: str | None = None
    time_col: str = "time"
    event_col: str | None = None
    censorship_col: str | None = None
    patient_col: str | None = None
    genomic_cols: list[str] | None = None
    genomic_prefix: str | None = None
    slide_features_col: str | None = None
    slide_tiles_col: str | None = None  # slides / tile folders, encoded end to end by histology_encoder
    radiology_col: str | None = None
    pathways: str | None = None  # gene-set table (CSV/TSV with pathway and gene columns)
    fusion: str = _ESTIMATOR_DEFAULTS["fusion"]
    head: str = _ESTIMATOR_DEFAULTS["head"]
    linear: str = _ESTIMATOR_DEFAULTS["linear"]
    group_lasso: float = _ESTIMATOR_DEFAULTS["group_lasso"]
    modality_dropout: float = _ESTIMATOR_DEFAULTS["modality_dropout"]
    max_tiles: int | None = _ESTIMATOR_DEFAULTS["histology_max_tiles"]
    histology_encoder: str | None = None
    tiles_per_slide: int | None = _ESTIMATOR_DEFAULTS["histology_tiles_per_slide"]
    lora_rank: int = _ESTIMATOR_DEFAULTS["lora_rank"]
    lora_alpha: int | None = _ESTIMATOR_DEFAULTS["lora_alpha"]
    lora_target_modules: list[str] = field(default_factory=lambda: list(_ESTIMATOR_DEFAULTS["lora_target_modules"]))
    folds: int = 5
    epochs: int = _ESTIMATOR_DEFAULTS["epochs"]
    lr: float = _ESTIMATOR_DEFAULTS["learning_rate"]
    weight_decay: float = _ESTIMATOR_DEFAULTS["weight_decay"]
    seed: int = 0
    n_bootstrap: int = 200
    compare_baselines: bool = False
    output_dir: str = "outputs/survival"
    save_models: bool = False
    refit: bool = False
    push_to_hub: str | None = None
    public: bool = False
    estimator_params: dict[str, object] = field(default_factory=dict)


def read_pathways(path: str | Path) -> dict[str, list[str]]:
    """A gene-set table (one row per pathway/gene pair, columns ``pathway`` and ``gene``) -> ``{pathway: [gene]}``."""
    path = Path(path)
    table = pd.read_csv(path, sep="\t" if path.suffix in (".tsv", ".txt") else ",")
    missing = [c for c in ("pathway", "gene") if c not in table.columns]
    if missing:
        raise ValueError(f"gene-set table {str(path)!r} lacks the column(s) {missing}; it needs 'pathway' and 'gene'")
    return {str(k): [str(g) for g in genes] for k, genes in table.groupby("pathway", sort=False)["gene"]}


def build_estimator(config: SurvivalCVConfig) -> SurvivalEstimator:
    return SurvivalEstimator(
        head=config.head,
        fusion=config.fusion,
        linear=config.linear,
        group_lasso=config.group_lasso,
        modality_dropout=config.modality_dropout,
        histology_max_tiles=config.max_tiles,
        pathways=read_pathways(config.pathways) if config.pathways else None,
        histology_col=config.slide_features_col or config.slide_tiles_col,
        histology_encoder=config.histology_encoder,
        histology_tiles_per_slide=config.tiles_per_slide,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_target_modules=tuple(config.lora_target_modules),
        radiology_col=config.radiology_col,
        epochs=config.epochs,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        random_state=config.seed,
        **config.estimator_params,
    )


def run_survival_cv(config: SurvivalCVConfig, accelerator=None) -> CVResults:
    """Load the study, cross-validate the model (and baselines), print the comparison, write the results;
    save fold / refitted models with their cards and push the refitted one when asked."""
    import torch
    from accelerate import Accelerator

    if config.push_to_hub and not config.refit:
        raise ValueError("--push-to-hub uploads the model refitted on all patients: add --refit")
    if (config.slide_tiles_col is None) != (config.histology_encoder is None):
        raise ValueError("--slide-tiles-col and --histology-encoder go together: the encoder reads that column's tiles")
    if config.slide_tiles_col is not None and config.slide_features_col is not None:
        raise ValueError("give --slide-features-col (precomputed features) or --slide-tiles-col (end to end), not both")
    slide_col = config.slide_features_col or config.slide_tiles_col
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
            slide_col,
            config.radiology_col,
        )
    folds = patient_folds(X, labels=y, n_splits=config.folds, seed=config.seed)

    estimator = build_estimator(config)
    name = f"HistoFusion ({config.head})"
    models: dict[str, BaseEstimator] = {name: estimator}
    if config.compare_baselines:
        path_cols = {slide_col, config.radiology_col}
        models.update(baseline_estimators([c for c in X.columns if c not in path_cols], config.seed))

    output_dir = Path(config.output_dir)
    model_dir = output_dir / "models" if config.save_models else None
    results = cross_validate(models, X, y, folds, config.n_bootstrap, config.seed, accelerator, model_dir)
    if accelerator.is_main_process:
        write_results(results, output_dir, asdict(config))
        print(results.table())
        _write_fold_cards(results, name, estimator, X, y, folds, config)
        if config.refit:
            _refit_and_publish(results, name, estimator, X, y, output_dir / "models" / "refit", config)
    return results


def _write_fold_cards(results: CVResults, name: str, estimator, X, y, folds, config: SurvivalCVConfig) -> None:
    """A model card per saved fold model, with that fold's test metrics."""
    from .evaluation import seeded

    for (model, fold), folder in results.saved_models.items():
        if model != name:
            continue
        train, test = folds[fold]
        metrics = results.fold_metrics.query("model == @model and fold == @fold").iloc[0]
        fitted = seeded(estimator, config.seed)
        fitted.model_ = _load_saved(folder)  # the card describes the saved model; refit nothing
        fitted.linear_ = metrics.get("linear_mode", estimator.linear)
        event, _ = split_survival(y[train])
        write_model_card(
            fitted, folder, len(train), int(event.sum()),
            f"Fold {fold + 1} of {config.folds}-fold patient-level cross-validation (seed {config.seed}), "
            f"trained on that fold's {len(train)} training patients.",
            f"On the fold's {len(test)} held-out patients: Harrell's C {metrics['harrell_c']:.3f}, Uno's C "
            f"{metrics['uno_c']:.3f}, mean time-dependent AUC {metrics['mean_auc']:.3f}, integrated Brier score "
            f"{metrics['integrated_brier_score']:.3f}.",
        )  # fmt: skip


def _load_saved(folder: Path):
    from ..multimodal.modeling_fusion import HistoFusionForSurvival

    return HistoFusionForSurvival.from_pretrained(folder)


def _refit_and_publish(results: CVResults, name: str, estimator, X, y, folder: Path, config: SurvivalCVConfig) -> None:
    """Fit on every patient, save with a card that reports the cross-validated estimate, push if asked."""
    from .evaluation import seeded

    model = seeded(estimator, config.seed).fit(X, y)
    model.save_pretrained(folder)
    summary = results.summary()[name]
    event, _ = split_survival(y)
    repo_id = config.push_to_hub or "<repo id>"
    write_model_card(
        model, folder, len(X), int(event.sum()),
        f"Fitted on all {len(X)} patients of the study after cross-validation, with the same settings.",
        f"{config.folds}-fold patient-level cross-validation of these settings (seed {config.seed}), mean +/- std "
        "over folds: " + ", ".join(f"{m} {v['mean']:.3f} +/- {v['std']:.3f}" for m, v in summary.items()) + ".",
        repo_id=repo_id,
    )  # fmt: skip
    print(f"refitted model saved to {folder}")
    if config.push_to_hub:
        from ..hub import push_to_hub

        url = push_to_hub(folder, config.push_to_hub, private=not config.public)
        print(f"pushed to {url} ({'public' if config.public else 'private'})")
