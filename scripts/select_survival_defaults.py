"""How the `SurvivalEstimator` defaults are chosen: leave one public cohort out.

For every cohort of the benchmark, the candidate setting (`histomim.survival.benchmark.CANDIDATES`) with
the largest worst-case gain in Harrell's C over Coxnet on the *other* cohorts, and its gain on the held-out
cohort; no cohort picks its own settings. Reads the per-fold scores that scripts/benchmark_survival.py
writes (run that first; it computes every candidate on every cohort).

    python scripts/select_survival_defaults.py --json outputs/survival_benchmark.json
"""

from __future__ import annotations

import argparse
import json

from histomim.survival.benchmark import CANDIDATES, loco_selection, score_tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="outputs/survival_benchmark.json", help="scripts/benchmark_survival.py output")
    args = parser.parse_args(argv)
    with open(args.json) as file:
        _, means = score_tables(json.load(file))
    print("mean Harrell's C (models x cohorts):")
    print(means.round(3).to_string())
    print("\nleave one cohort out (candidate chosen on the other cohorts, its gain over Coxnet on the held-out one):")
    print(loco_selection(means, list(CANDIDATES)).round(3).to_string())


if __name__ == "__main__":
    main()
