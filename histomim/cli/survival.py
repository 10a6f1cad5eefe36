"""Cross-validate a HistoFusion survival model on a patient table (default: sksurv's breast-cancer cohort).

    histomim survival --compare-baselines --output-dir outputs/survival
    histomim survival --table study.csv --time-col days --event-col dead --patient-col case_id \
        --genomic-prefix rna_ --slide-features-col features_path --fusion coattention --head discrete \
        --pathways hallmarks.csv --modality-dropout 0.2 --max-tiles 512 --save-models --refit
    histomim survival --table study.csv ... --slide-tiles-col slide_path --histology-encoder outputs/histomim-tiny-demo \
        --lora-rank 8 --tiles-per-slide 16 --max-tiles 8 --save-models    # the ViT fine-tuned with LoRA, end to end
    histomim survival ... --refit --push-to-hub org/my-survival-model      # private unless --public
    accelerate launch -m histomim.cli survival ...   # folds spread over the processes
"""

from __future__ import annotations

import argparse

from ..survival.experiment import SurvivalCVConfig, run_survival_cv


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> SurvivalCVConfig:
    defaults = SurvivalCVConfig()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("study table (one row per patient, or per slide with --patient-col)")
    data.add_argument(
        "--table", help="CSV/TSV/parquet study table; omitted: sksurv's breast-cancer cohort (198 patients)"
    )
    data.add_argument("--time-col", default=defaults.time_col, help="follow-up time column (non-negative numbers)")
    outcome = data.add_mutually_exclusive_group()
    outcome.add_argument("--event-col", help="event column: 1/True = event observed (death, progression), 0 = censored")
    outcome.add_argument("--censorship-col", help="censorship column (PORPOISE convention): 1 = censored, 0 = event")
    data.add_argument(
        "--patient-col",
        help="patient id column; slides of one patient are collapsed and never split across folds (required for a "
        "table with one row per slide: without it, a table whose id column repeats is refused)",
    )
    features = data.add_mutually_exclusive_group()
    features.add_argument("--genomic-cols", nargs="+", help="tabular (genomic/clinical) feature columns")
    features.add_argument("--genomic-prefix", help="use every column whose name starts with this prefix as a feature")
    slides = data.add_mutually_exclusive_group()
    slides.add_argument("--slide-features-col", help="column of tile-feature files (.npy/.safetensors, N x D) per slide")
    slides.add_argument(
        "--slide-tiles-col",
        help="column of whole-slide files, `histomim tile` folders or tile-image folders per slide, encoded end to "
        "end by --histology-encoder (fine-tuned with LoRA) instead of precomputed features",
    )
    data.add_argument("--radiology-col", help="column of DICOM/NIfTI scan paths (one per patient)")
    data.add_argument(
        "--pathways",
        help="gene-set CSV/TSV (columns pathway, gene; genes named as the feature columns): one genomic token "
        "per pathway, each from its own small SNN (co-attention fusion attends over them)",
    )

    model = parser.add_argument_group("model and training")
    model.add_argument(
        "--fusion",
        choices=["concat", "bilinear", "coattention"],
        default=defaults.fusion,
        help="how modalities are fused (only matters with more than one modality)",
    )
    model.add_argument(
        "--head",
        choices=["cox", "discrete"],
        default=defaults.head,
        help="Cox partial likelihood or discrete-time hazards (censored NLL)",
    )
    model.add_argument(
        "--linear",
        choices=["auto", "only", "both", "none"],
        default=defaults.linear,
        help="elastic-net Cox (Coxnet) on the tabular columns inside the model: 'only' = the linear model, "
        "'both' = the network trained on top of it, 'none' = the network alone, 'auto' = chosen per fit by "
        "inner CV with the one-standard-error rule (default; never worse than a tuned linear Cox on the "
        "benchmark cohorts, docs/survival_benchmark.md)",
    )
    model.add_argument(
        "--group-lasso",
        type=float,
        default=defaults.group_lasso,
        help="group-lasso strength on the first genomic layer's input columns (suppresses uninformative "
        "features; 0 = off)",
    )
    model.add_argument(
        "--modality-dropout",
        type=float,
        default=defaults.modality_dropout,
        help="probability of hiding a present modality of a patient during training (robustness to missing ones)",
    )
    model.add_argument(
        "--max-tiles",
        type=int,
        default=defaults.max_tiles,
        help="tiles sampled per patient and training step from the slide features (default: all)",
    )
    model.add_argument(
        "--histology-encoder",
        help="histomim encoder (folder or Hub id) that encodes the --slide-tiles-col tiles inside the fusion model",
    )
    model.add_argument(
        "--tiles-per-slide",
        type=int,
        default=defaults.tiles_per_slide,
        help="tiles kept per slide for --histology-encoder, spread evenly over the tissue (default: %(default)s)",
    )
    model.add_argument(
        "--lora-rank",
        type=int,
        default=defaults.lora_rank,
        help="rank of the LoRA adapters trained on the --histology-encoder ViT; 0 freezes it (default: %(default)s)",
    )
    model.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha, help="LoRA scaling (default: 2 x rank)")
    model.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=defaults.lora_target_modules,
        help="ViT linears that get adapters: qkv (attention input), proj (attention output), fc1, fc2 (MLP) "
        "(default: %(default)s)",
    )
    model.add_argument("--folds", type=int, default=defaults.folds, help="number of stratified patient-level folds")
    model.add_argument("--epochs", type=int, default=defaults.epochs, help="fixed number of full-batch epochs per fold")
    model.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate")
    model.add_argument(
        "--weight-decay", type=float, default=defaults.weight_decay, help="AdamW (decoupled) weight decay"
    )
    model.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed for the folds, weights, dropout and bootstrap"
    )

    report = parser.add_argument_group("evaluation and output")
    report.add_argument(
        "--n-bootstrap",
        type=int,
        default=defaults.n_bootstrap,
        help="bootstrap resamples per test fold for confidence intervals (0 = none)",
    )
    report.add_argument(
        "--compare-baselines",
        action="store_true",
        help="also fit sksurv's Coxnet (inner-CV alpha) and RandomSurvivalForest on the same folds",
    )
    report.add_argument(
        "--output-dir",
        default=defaults.output_dir,
        help="where fold_metrics.csv, predictions.csv, summary.json and km_*.png are written",
    )
    report.add_argument(
        "--save-models",
        action="store_true",
        help="save every fold's HistoFusionForSurvival (safetensors + config + remote code + model card) to "
        "OUTPUT_DIR/models/<model>/fold_<k>; reload with transformers.AutoModel.from_pretrained",
    )
    report.add_argument(
        "--refit", action="store_true", help="also fit on all patients and save to OUTPUT_DIR/models/refit with a card"
    )
    report.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="upload the refitted model (needs --refit) to this Hub repository, private by default",
    )
    report.add_argument("--public", action="store_true", help="with --push-to-hub: create a public repository")
    return SurvivalCVConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    run_survival_cv(parse_args(argv, prog))
    return 0
