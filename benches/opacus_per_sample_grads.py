"""Reference per-example gradients from Opacus, for medfl's record-level DP-SGD.

Writes crates/medfl-train/tests/vectors/opacus_mlp_per_sample.json: an MLP (5 inputs, a hidden
layer of 4 with ReLU, 3 classes; PyTorch's nn.Linear initialisation with seed 0), a batch of 6
examples, and what Opacus computes on it with the summed cross-entropy loss:
  - `per_sample`: each example's gradient of every weight (GradSampleModule's grad_sample);
  - `norms`: each example's flat L2 norm over all weights;
  - `clipped_sum`: the sum of the per-example gradients clipped to max_grad_norm 1.7 (three of the six are)
    (DPOptimizer with noise multiplier 0, before any division by the batch size).
Weights are named as medfl's MLP names them (`layers.{i}.weight`, `layers.{i}.bias`).
medfl's unit test checks its vectorised per-example gradients against every value to 1e-5.
This script is not used by the product; it only produces reference values.

Requirements: PyTorch and Opacus. The committed file was written with torch 1.13 (Debian 12's
CPU-only python3-torch) and opacus 1.3.0, the last release for torch 1:
    apt-get install --no-install-recommends python3-torch
    /usr/bin/python3 -m venv --system-site-packages /tmp/opacus-venv
    /tmp/opacus-venv/bin/pip install opacus==1.3.0 --no-deps && /tmp/opacus-venv/bin/pip install scipy opt_einsum
Run from the repository root: /tmp/opacus-venv/bin/python benches/opacus_per_sample_grads.py [--out FILE]
"""

import argparse
import json

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

MAX_GRAD_NORM = 1.7


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="crates/medfl-train/tests/vectors/opacus_mlp_per_sample.json"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)
    ).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    names = {
        "0.weight": "layers.0.weight",
        "0.bias": "layers.0.bias",
        "2.weight": "layers.1.weight",
        "2.bias": "layers.1.bias",
    }
    weights = {names[n]: p.detach().tolist() for n, p in model.named_parameters()}

    gsm = GradSampleModule(model, loss_reduction="sum")
    optimizer = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        expected_batch_size=6,
        loss_reduction="sum",
    )
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(gsm(x), y, reduction="sum")
    loss.backward()
    per_sample = {
        names[n.removeprefix("_module.")]: p.grad_sample.detach().tolist()
        for n, p in gsm.named_parameters()
    }
    norms = torch.stack(
        [p.grad_sample.reshape(6, -1).norm(dim=1) for p in gsm.parameters()], dim=1
    ).norm(dim=1)
    optimizer.pre_step()
    clipped = {
        names[n.removeprefix("_module.")]: p.grad.detach().tolist()
        for n, p in gsm.named_parameters()
    }
    out = {
        "dims": [5, 4, 3],
        "weights": weights,
        "features": x.tolist(),
        "labels": y.tolist(),
        "loss_sum": loss.item(),
        "max_grad_norm": MAX_GRAD_NORM,
        "per_sample": per_sample,
        "norms": norms.tolist(),
        "clipped_sum": clipped,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
