#!/usr/bin/env python3
"""Checks a tabular model exported by `medfl model export` with onnxruntime.

Runs the ONNX graph on the raw feature columns of a CSV and compares, row by row, its class
probabilities and predicted class with what `medfl predict` wrote for the same CSV and model
(its `row,prediction,confidence,p_LABEL...` output). Prints a table and exits non-zero on any
difference above the tolerance.

    python3 -m venv venv && venv/bin/pip install onnxruntime numpy
    medfl model export --pulled model.safetensors -o model.onnx
    medfl predict --pulled model.safetensors --input rows.csv -o predictions.csv
    venv/bin/python benches/onnx_check.py model.onnx rows.csv predictions.csv
"""

import csv
import json
import sys

import numpy as np
import onnxruntime as ort

TOLERANCE = 1e-5


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    model_path, rows_path, predictions_path = sys.argv[1:]
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    features = json.loads(meta["medfl.features"])
    labels = json.loads(meta["medfl.labels"])

    with open(rows_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in features if c not in (reader.fieldnames or [])]
        if missing:
            print(f"{rows_path}: no column(s) {missing}", file=sys.stderr)
            return 1
        x = np.array(
            [[float(r[c]) for c in features] for r in reader], dtype=np.float32
        )
    probabilities, classes = session.run(["probabilities", "class"], {"features": x})

    with open(predictions_path, newline="") as f:
        predicted = list(csv.DictReader(f))
    if len(predicted) != len(x):
        print(
            f"{predictions_path} has {len(predicted)} rows, {rows_path} {len(x)}",
            file=sys.stderr,
        )
        return 1
    medfl = np.array(
        [[float(r[f"p_{label}"]) for label in labels] for r in predicted],
        dtype=np.float64,
    )
    medfl_class = [labels.index(r["prediction"]) for r in predicted]

    # `medfl predict` prints probabilities to 6 decimals: half a unit in the last place.
    worst = float(np.max(np.abs(probabilities.astype(np.float64) - medfl)))
    agree = sum(int(a == b) for a, b in zip(classes.tolist(), medfl_class))
    print(f"{'rows':<28}{len(x):>12}")
    print(f"{'features':<28}{len(features):>12}")
    print(f"{'onnxruntime':<28}{ort.__version__:>12}")
    print(f"{'max |p_onnx - p_medfl|':<28}{worst:>12.2e}")
    print(f"{'same predicted class':<28}{agree:>7} of {len(x)}")
    ok = worst <= TOLERANCE and agree == len(x)
    print("ONNX export matches medfl predict" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
