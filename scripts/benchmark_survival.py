"""Survival benchmark on sksurv's breast-cancer cohort (198 patients, 76 gene probes + age/er/grade/size):
SNN + Cox head and SNN + discrete-time head (default settings, nothing tuned on test folds) vs sksurv's
Coxnet (alpha by inner CV on each training fold) and RandomSurvivalForest, on the same stratified folds.

    python scripts/benchmark_survival.py                      # writes outputs/ JSON and docs/survival_benchmark.md
"""

from __future__ import annotations

import argparse

from histomim.survival.benchmark import run_benchmark


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-json",
        default="outputs/survival_benchmark.json",
        help="where the full results (per-fold metrics, bootstrap CIs, settings) are written",
    )
    parser.add_argument(
        "--markdown",
        default="docs/survival_benchmark.md",
        help="markdown report with the per-fold Harrell's C table ('' to skip)",
    )
    parser.add_argument("--folds", type=int, default=5, help="number of stratified cross-validation folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds and of every model")
    parser.add_argument(
        "--n-bootstrap",
        type=int,
        default=200,
        help="bootstrap resamples per test fold for the confidence intervals (0 = none)",
    )
    args = parser.parse_args(argv)
    run_benchmark(
        args.output_json, args.markdown or None, folds=args.folds, seed=args.seed, n_bootstrap=args.n_bootstrap
    )


if __name__ == "__main__":
    main()
