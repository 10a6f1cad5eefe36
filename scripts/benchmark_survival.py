"""Survival benchmark on public cohorts: the default `SurvivalEstimator` (and the other candidate defaults) vs
sksurv's Coxnet (alpha by inner CV) and RandomSurvivalForest, the same stratified folds on every cohort, with
the leave-one-cohort-out choice of the defaults.

    pip download --no-deps lifelines==0.30.3 survset==0.2.11 -d ~/.cache/histomim/cohorts   # once
    python scripts/benchmark_survival.py          # ~30 min on 2 shared CPU cores; JSON + docs/survival_benchmark.md
"""

from __future__ import annotations

import argparse
import warnings

from histomim.survival.benchmark import run_benchmark
from histomim.survival.cohorts import DEFAULT_CACHE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-json",
        default="outputs/survival_benchmark.json",
        help="per-fold Harrell's C and times of every model on every cohort (rewritten after each cohort; "
        "a rerun with the same settings resumes)",
    )
    parser.add_argument("--markdown", default="docs/survival_benchmark.md", help="markdown report ('' to skip)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="folder with the lifelines and survset wheels")
    parser.add_argument("--cohorts", nargs="+", help="a subset of the cohorts (default: all)")
    parser.add_argument("--folds", type=int, default=5, help="number of stratified cross-validation folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds, the subsampling and every model")
    parser.add_argument("--no-resume", action="store_true", help="recompute cohorts already in --output-json")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    run_benchmark(args.output_json, args.markdown or None, args.cache_dir, args.cohorts, args.folds, args.seed,
                  resume=not args.no_resume)  # fmt: skip


if __name__ == "__main__":
    main()
