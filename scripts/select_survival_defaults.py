"""How the `SurvivalEstimator` defaults were chosen: candidates vs Coxnet on cohorts OTHER than the benchmark's.

sksurv's WHAS500, GBSG2, veterans, FLCHAIN and AIDS cohorts, each subsampled to ~200 patients with 70 added
noise columns (`histomim.survival.benchmark.reference_cohorts`; two draws, seeds 0 and 1), 5-fold CV, mean
Harrell's C. The breast-cancer benchmark (scripts/benchmark_survival.py) is never used here.

    python scripts/select_survival_defaults.py               # ~15 min on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
import warnings

import torch

from histomim.survival import SurvivalEstimator
from histomim.survival.baselines import baseline_estimators
from histomim.survival.benchmark import compare_on_cohorts, reference_cohorts


def candidates() -> dict[str, object]:
    """The settings compared (every other parameter at its previous default)."""
    grid = {
        "previous defaults (32-unit SNN, no lasso)": {},
        "seed ensemble of 5": {"n_networks": 5},
        "group lasso 0.01": {"group_lasso": 0.01},
        "group lasso 0.02": {"group_lasso": 0.02},
        "group lasso 0.03": {"group_lasso": 0.03},
        "group lasso 0.05": {"group_lasso": 0.05},
        "group lasso 0.07": {"group_lasso": 0.07},
        "group lasso 0.1": {"group_lasso": 0.1},
        "group lasso 0.05, ensemble of 5": {"group_lasso": 0.05, "n_networks": 5},
        "group lasso 0.05, weight decay 0.1": {"group_lasso": 0.05, "weight_decay": 0.1},
        "group lasso 0.05, no hidden layer": {"group_lasso": 0.05, "genomic_hidden_sizes": ()},
    }
    return {
        f"{head}: {name}": SurvivalEstimator(head=head, genomic_hidden_sizes=(32,), group_lasso=0.0, random_state=0)
        .set_params(**params)
        for head in ("cox", "discrete")
        for name, params in grid.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="cohort draws (subsample + noise)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)  # tiny full-batch networks: one thread is several times faster than contended many

    tables = []
    for seed in args.seeds:
        cohorts = reference_cohorts(seed=seed)
        models = candidates()
        scores = compare_on_cohorts(models, cohorts, seed=seed)
        for name, (X, y) in cohorts.items():  # Coxnet encodes each cohort's own columns
            coxnet = {"Coxnet": baseline_estimators(list(X.columns), seed)["Coxnet"]}
            scores.loc["Coxnet", name] = compare_on_cohorts(coxnet, {name: (X, y)}, seed=seed)[name].iloc[0]
        scores["mean"] = scores.drop(columns="mean").mean(axis=1)
        tables.append(scores)
    mean = sum(tables) / len(tables)
    print(f"mean Harrell's C over cohort draws {args.seeds}:")
    print(mean.sort_values("mean", ascending=False).round(3).to_string())


if __name__ == "__main__":
    main()
