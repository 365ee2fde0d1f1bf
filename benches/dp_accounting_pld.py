"""Reference ε from Google's dp-accounting PLD accountant, for medfl's PLD accountant.

Writes crates/medfl-core/tests/vectors/pld_subsampled_gaussian.csv: ε at δ = 1e-5 for the
Poisson-subsampled Gaussian mechanism (add-or-remove-one adjacency, value discretization
interval 1e-4, pessimistic estimate, the library's defaults otherwise) for sample rates
0.01, 0.1 and 1, noise multipliers 0.5, 1 and 2, and 1, 10, 100 and 1,000 steps. medfl's unit
test checks its own accountant against every row to 1%. This script is not used by the
product; it only produces reference values.

Requirements: python3 -m pip install dp-accounting==0.6.0
Run from the repository root: python3 benches/dp_accounting_pld.py [--out FILE]
"""

import argparse
import csv
import sys

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant

SAMPLE_RATES = [0.01, 0.1, 1.0]
NOISE_MULTIPLIERS = [0.5, 1.0, 2.0]
STEPS = [1, 10, 100, 1000]
DELTA = 1e-5


def epsilon(q, z, steps):
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(DELTA)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="crates/medfl-core/tests/vectors/pld_subsampled_gaussian.csv"
    )
    args = parser.parse_args()
    with open(args.out, "w", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["sample_rate", "noise_multiplier", "steps", "delta", "epsilon"])
        for q in SAMPLE_RATES:
            for z in NOISE_MULTIPLIERS:
                for steps in STEPS:
                    eps = epsilon(q, z, steps)
                    out.writerow([q, z, steps, DELTA, repr(eps)])
                    print(f"q={q} z={z} steps={steps}: ε={eps}", file=sys.stderr)


if __name__ == "__main__":
    main()
