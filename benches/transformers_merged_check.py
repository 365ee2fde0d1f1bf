"""Checks a medfl merged model with PyTorch/transformers, independently of medfl's own encoder.

`medfl model pull --merged` (or `medfl model merge`) writes the base with the LoRA adapter merged
into its weights. This script shows that transformers loads that directory unchanged and that it
computes what medfl computed:

1. `AutoModel.from_pretrained(MERGED)` reports no missing, unexpected or mismatched tensors.
2. Every merged weight equals W + (alpha/rank) B A computed here in PyTorch from the base and the
   adapter (the adapter carries the run spec, so alpha and rank come from it).
3. The merged encoder in transformers, pooled as the run pools and followed by the adapter's
   classifier head, predicts the same label with the same confidence as `medfl predict` did on
   the same texts (PREDICTIONS, the output of `medfl predict --input INPUT -o PREDICTIONS`).

The product never needs Python; this only cross-checks it. Environment used for BENCHMARKS.md:
Debian's python3-torch (1.13) in a virtual environment with --system-site-packages, plus
`pip install transformers==4.44.2 safetensors`.

    python benches/transformers_merged_check.py --base BASE_DIR --merged MERGED_DIR \
        --input texts.jsonl --predictions predictions.jsonl
"""

import argparse
import json
import sys
import tomllib

import torch
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the base model directory")
    p.add_argument("--merged", required=True, help="the directory medfl wrote")
    p.add_argument("--input", required=True, help="JSON lines given to `medfl predict`")
    p.add_argument("--predictions", required=True, help="what `medfl predict` wrote")
    args = p.parse_args()
    torch.set_grad_enabled(False)

    # 1. transformers loads the merged directory as it is.
    merged, info = AutoModel.from_pretrained(args.merged, output_loading_info=True)
    # BertModel's pooler is not part of a sentence-transformers checkpoint; it is not used here.
    missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]
    if missing or info["unexpected_keys"] or info["mismatched_keys"] or info["error_msgs"]:
        sys.exit(f"transformers did not load {args.merged} cleanly: {info}")
    merged.eval()

    # 2. The merged weights are W + (alpha/rank) B A.
    adapter_path = f"{args.merged}/adapter.safetensors"
    with safe_open(adapter_path, "pt") as f:
        spec = tomllib.loads(f.metadata()["medfl.run_spec"])
        adapter = {k: f.get_tensor(k) for k in f.keys()}
    adaptation = spec["model"]["adaptation"]
    scale = adaptation["alpha"] / adaptation["rank"]
    base = AutoModel.from_pretrained(args.base).eval()
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    worst, pairs = 0.0, 0
    for name, a in adapter.items():
        if not name.endswith(".lora_A.weight"):
            continue
        prefix = name[: -len(".lora_A.weight")]
        b = adapter[f"{prefix}.lora_B.weight"]
        expected = base_sd[f"{prefix}.weight"] + scale * (b @ a)
        worst = max(worst, (merged_sd[f"{prefix}.weight"] - expected).abs().max().item())
        pairs += 1
    changed = sum(1 for k in base_sd if not torch.equal(base_sd[k], merged_sd[k]))
    print(f"LoRA pairs merged: {pairs}; tensors differing from the base: {changed}")
    print(f"merged weights vs W + scale*B@A computed in PyTorch: max |diff| {worst:.3g}")

    # 3. Same predictions as `medfl predict`.
    text_field = spec["task"].get("text", "text")
    labels = spec["task"]["labels"]
    texts = [json.loads(line)[text_field] for line in open(args.input) if line.strip()]
    theirs = [json.loads(line) for line in open(args.predictions) if line.strip()]
    if len(texts) != len(theirs):
        sys.exit(f"{len(texts)} input lines but {len(theirs)} predictions")
    tokenizer = AutoTokenizer.from_pretrained(args.merged)
    head_w, head_b = adapter["classifier.weight"], adapter["classifier.bias"]
    pooling = spec["model"].get("pooling", "mean")
    max_len = spec["model"].get("max_seq_len", 128)
    agree, conf_diff = 0, 0.0
    for start in range(0, len(texts), 64):
        batch = tokenizer(
            texts[start : start + 64],
            padding=True,
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        )
        hidden = merged(**batch).last_hidden_state
        if pooling == "mean":
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
        else:
            pooled = hidden[:, 0]
        probs = torch.softmax(pooled @ head_w.T + head_b, dim=-1)
        conf, idx = probs.max(-1)
        for i, (c, k) in enumerate(zip(conf.tolist(), idx.tolist())):
            medfl = theirs[start + i]
            agree += labels[k] == medfl["prediction"]
            conf_diff = max(conf_diff, abs(c - medfl["confidence"]))
    print(f"predictions agreeing with medfl predict: {agree}/{len(texts)}")
    print(f"confidence vs medfl predict: max |diff| {conf_diff:.3g}")
    if pairs == 0 or worst > 1e-5 or agree != len(texts) or conf_diff > 1e-4:
        sys.exit("MISMATCH")
    print("OK")


if __name__ == "__main__":
    main()
