#!/usr/bin/env python3
"""Reference values of Hendrycks' `calib_err` (outlier-exposure, utils/calibration_tools.py;
the function the confidence-token paper's evaluation calls) for pipe's
`calibration_error(..., hendrycks_compat=true)` (stages/src/metrics/calibration.rs).

The function below follows that one step for step: numpy argsort of the confidences,
bins of `beta` by index with the last bin stretched to the end, a loop over every bin
but the last, |mean confidence - mean correctness| per bin, weighted sum (p=1), square
root of the weighted sum of squares (p=2) or the maximum (infty). Confidences here are
distinct, so the sort order does not depend on numpy's sort algorithm.

    pip install numpy && python3 scripts/reference/make_calib_fixtures.py
"""
import json
import pathlib

import numpy as np


def hendrycks_calib_err(confidence, correct, p="2", beta=100):
    order = np.argsort(confidence)
    confidence, correct = confidence[order], correct[order]
    edges = [[k * beta, (k + 1) * beta] for k in range(len(confidence) // beta)]
    edges[-1] = [edges[-1][0], len(confidence)]
    err, total = 0.0, len(confidence)
    for lo, hi in edges[:-1]:
        c, a = confidence[lo:hi], correct[lo:hi]
        if len(c) == 0:
            continue
        d = np.abs(np.nanmean(c) - np.nanmean(a))
        if p == "2":
            err += len(c) / total * d**2
        elif p == "1":
            err += len(c) / total * d
        else:
            err = max(err, d)
    return float(np.sqrt(err)) if p == "2" else float(err)


def main():
    rng = np.random.default_rng(7)
    cases = []
    for n, beta in [(10, 3), (25, 5), (40, 10), (57, 10), (120, 50), (300, 100), (7, 2), (9, 4)]:
        conf = rng.permutation(np.linspace(0.05, 0.95, n)) + rng.uniform(0, 1e-4, n)
        # Correct with probability near the confidence, skewed so that bins differ.
        correct = rng.uniform(size=n) < np.clip(conf * 0.8 + 0.1, 0, 1)
        for p in ["1", "2", "infty"]:
            cases.append(
                {
                    "confidence": [round(float(x), 12) for x in conf],
                    "correct": [bool(x) for x in correct],
                    "beta": beta,
                    "p": p,
                }
            )
    for c in cases:
        c["calib_err"] = hendrycks_calib_err(
            np.array(c["confidence"]), np.array(c["correct"], dtype=float), c["p"], c["beta"]
        )
    path = pathlib.Path(__file__).resolve().parents[2] / "stages/tests/fixtures/calib_err.json"
    path.write_text(json.dumps({"cases": cases}) + "\n")
    print(f"{len(cases)} cases -> {path}")


if __name__ == "__main__":
    main()
