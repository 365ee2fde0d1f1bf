"""Reference per-example gradients from Opacus for a LoRA layer on padded sequences, for medfl's
vectorised DP-SGD on LoRA.

Writes crates/medfl-train/tests/vectors/opacus_lora_per_sample.json: a batch of 4 sequences of up
to 5 tokens of width 6 (sequence i has i padded positions), a frozen dense layer W (4 x 6) and b
with a LoRA adapter A (rank 2 x 6), B (4 x 2) at scale 1.5, mean pooling over the unpadded
positions, and a trained head (3 classes x 4). What Opacus computes on it with the summed
cross-entropy loss:
  - `per_sample`: each example's gradient of A, B, the head's weight and bias (GradSampleModule's
    grad_sample; its linear sampler sums over the sequence positions);
  - `norms`: each example's flat L2 norm over those tensors;
  - `clipped_sum`: the sum of the per-example gradients clipped to max_grad_norm 1.2 (two of the four are)
    (DPOptimizer with noise multiplier 0, before any division by the batch size).
medfl's unit test runs its fused LoRA layer with per-example collection (medfl_train::ops) on the
same values and checks every number to 1e-5. This script is not used by the product; it only
produces reference values.

Requirements as for benches/opacus_per_sample_grads.py (torch 1.13, opacus 1.3.0). Run from the
repository root: /tmp/opacus-venv/bin/python benches/opacus_lora_per_sample_grads.py [--out FILE]
"""

import argparse
import json

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

MAX_GRAD_NORM = 1.2
SCALE = 1.5
BATCH, SEQ, WIDTH, OUT, RANK, CLASSES = 4, 5, 6, 4, 2, 3


class LoraClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.base = torch.nn.Linear(WIDTH, OUT)
        self.base.requires_grad_(False)
        self.lora_a = torch.nn.Linear(WIDTH, RANK, bias=False)
        self.lora_b = torch.nn.Linear(RANK, OUT, bias=False)
        self.head = torch.nn.Linear(OUT, CLASSES)

    def forward(self, x, mask):
        h = self.base(x) + SCALE * self.lora_b(self.lora_a(x))
        m = mask.unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1)
        return self.head(pooled)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="crates/medfl-train/tests/vectors/opacus_lora_per_sample.json"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LoraClassifier()
    # B away from zero (PEFT starts it at zero), so that A's gradient is not zero either.
    torch.nn.init.normal_(model.lora_b.weight, std=0.5)
    x = torch.randn(BATCH, SEQ, WIDTH)
    mask = torch.ones(BATCH, SEQ)
    for i in range(BATCH):
        if i:
            mask[i, SEQ - i:] = 0.0
    labels = torch.tensor([0, 2, 1, 2])

    gsm = GradSampleModule(model, loss_reduction="sum")
    trained = [p for p in gsm.parameters() if p.requires_grad]
    optimizer = DPOptimizer(
        torch.optim.SGD(trained, lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        expected_batch_size=BATCH,
        loss_reduction="sum",
    )
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(gsm(x, mask), labels, reduction="sum")
    loss.backward()
    names = {
        "lora_a.weight": "a",
        "lora_b.weight": "b",
        "head.weight": "head_weight",
        "head.bias": "head_bias",
    }
    per_sample = {
        names[n]: p.grad_sample.tolist()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    norms = torch.stack(
        [p.grad_sample.reshape(BATCH, -1).norm(dim=1) for p in trained], dim=1
    ).norm(dim=1)
    optimizer.pre_step()
    clipped = {
        names[n]: p.summed_grad.tolist()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    out = {
        "max_grad_norm": MAX_GRAD_NORM,
        "scale": SCALE,
        "x": x.tolist(),
        "mask": mask.tolist(),
        "labels": labels.tolist(),
        "weight": model.base.weight.tolist(),
        "bias": model.base.bias.tolist(),
        "a": model.lora_a.weight.tolist(),
        "b": model.lora_b.weight.tolist(),
        "head_weight": model.head.weight.tolist(),
        "head_bias": model.head.bias.tolist(),
        "per_sample": per_sample,
        "norms": norms.tolist(),
        "clipped_sum": clipped,
        "loss_sum": loss.item(),
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}: norms {[round(n, 4) for n in norms.tolist()]}")


if __name__ == "__main__":
    main()
