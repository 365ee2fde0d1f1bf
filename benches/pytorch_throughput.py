"""PyTorch reference numbers for BENCHMARKS.md: all-MiniLM-L6-v2 on CPU, 2 threads.

Measures, at batch 32 and sequence length 64 on real ICD-10-CM descriptions:
  1. forward only (BERT encoder + masked mean pooling + 21-class linear head),
     under torch.inference_mode();
  2. one LoRA training step (rank 8, alpha 16, dropout 0, on query and value of
     every layer; base weights frozen; LoRA A/B and the head trained with AdamW,
     lr 1e-3, cross-entropy): forward + backward + optimizer.step + zero_grad.
The encoder is written out here in plain torch (weights read with safetensors)
so that it is the same computation as the Rust implementation, with no
dependency on transformers or peft. Base-model dropout is not applied in either
measurement. This script is not used by the product; it only produces numbers.

Requirements (a virtual environment outside the repository, CPU-only torch):
    python3 -m venv /tmp/medfl-torch-venv
    /tmp/medfl-torch-venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    /tmp/medfl-torch-venv/bin/pip install tokenizers safetensors
Where that index cannot be reached (the plain PyPI torch wheel pulls in several
GB of CUDA libraries), Debian 12 ships a CPU-only torch 1.13:
    apt-get install --no-install-recommends python3-torch libopenblas0-pthread
    /usr/bin/python3 -m venv --system-site-packages /tmp/medfl-torch-venv
    /tmp/medfl-torch-venv/bin/pip install tokenizers safetensors

Run from the repository root:
    /tmp/medfl-torch-venv/bin/python benches/pytorch_throughput.py
Options: --model DIR, --data FILE, --iters N, --warmup N, --json.
"""

import argparse
import json
import math
import os
import statistics
import time

# Pin every thread pool to 2 before torch loads: OpenMP and a generic BLAS read
# these at start-up, and torch.set_num_threads alone does not reach them all.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

THREADS, BATCH, SEQ, CLASSES = 2, 32, 64, 21
LORA_RANK, LORA_ALPHA, LR = 8, 16.0, 1e-3


class LoRALinear(torch.nn.Module):
    """y = W x + b + (alpha / r) * B(A(x)), with W and b frozen."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.a = torch.nn.Parameter(torch.empty(rank, base.in_features))
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        # Same init as nn.Linear / peft: A random, B zero, so the wrapped layer starts equal to the base.
        torch.nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.a), self.b)


class Bert(torch.nn.Module):
    """BERT encoder (post-LayerNorm, exact GELU) + masked mean pooling + linear head."""

    def __init__(self, cfg, weights, classes):
        super().__init__()
        h, self.heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]

        def linear(prefix):
            w = weights[prefix + ".weight"]
            lin = torch.nn.Linear(w.shape[1], w.shape[0])
            lin.weight.data.copy_(w)
            lin.bias.data.copy_(weights[prefix + ".bias"])
            return lin

        def norm(prefix):
            ln = torch.nn.LayerNorm(h, eps=eps)
            ln.weight.data.copy_(weights[prefix + ".weight"])
            ln.bias.data.copy_(weights[prefix + ".bias"])
            return ln

        emb = "embeddings."
        self.word = torch.nn.Embedding.from_pretrained(weights[emb + "word_embeddings.weight"])
        self.pos = torch.nn.Embedding.from_pretrained(weights[emb + "position_embeddings.weight"])
        self.typ = torch.nn.Embedding.from_pretrained(weights[emb + "token_type_embeddings.weight"])
        self.emb_norm = norm(emb + "LayerNorm")
        self.layers = torch.nn.ModuleList()
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            self.layers.append(torch.nn.ModuleDict({
                "q": linear(p + "attention.self.query"),
                "k": linear(p + "attention.self.key"),
                "v": linear(p + "attention.self.value"),
                "o": linear(p + "attention.output.dense"),
                "norm1": norm(p + "attention.output.LayerNorm"),
                "up": linear(p + "intermediate.dense"),
                "down": linear(p + "output.dense"),
                "norm2": norm(p + "output.LayerNorm"),
            }))
        self.head = torch.nn.Linear(h, classes)

    def split(self, x):  # [b, s, h] -> [b, heads, s, h / heads]
        b, s, h = x.shape
        return x.view(b, s, self.heads, h // self.heads).transpose(1, 2)

    def forward(self, ids, mask):
        b, s = ids.shape
        positions = torch.arange(s).unsqueeze(0)
        x = self.emb_norm(self.word(ids) + self.pos(positions) + self.typ(torch.zeros_like(ids)))
        # Additive mask: padding keys get a large negative score, as in transformers.
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            q, k, v = (self.split(layer[n](x)) for n in ("q", "k", "v"))
            if hasattr(F, "scaled_dot_product_attention"):  # torch >= 2.0, the fused kernel
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            else:
                scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
                ctx = scores.softmax(-1) @ v
            ctx = ctx.transpose(1, 2).reshape(b, s, -1)
            x = layer["norm1"](x + layer["o"](ctx))
            x = layer["norm2"](x + layer["down"](F.gelu(layer["up"](x))))
        m = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return self.head(pooled)


def load_batch(data_path, tokenizer_path):
    """The first BATCH texts of the JSONL file, tokenized to exactly SEQ tokens, and their labels."""
    with open(data_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    classes = sorted({r["label"] for r in rows})
    tok = Tokenizer.from_file(tokenizer_path)
    tok.enable_truncation(SEQ)
    tok.enable_padding(length=SEQ, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch([r["text"] for r in rows[:BATCH]])
    ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
    labels = torch.tensor([classes.index(r["label"]) for r in rows[:BATCH]], dtype=torch.long)
    return ids, mask, labels, len(classes)


def time_steps(step, warmup, iters):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    med, mean = statistics.median(times), statistics.mean(times)
    return {"batch": BATCH, "seq": SEQ, "iters": iters,
            "ms_per_step_median": med * 1e3, "ms_per_step_mean": mean * 1e3,
            "examples_per_s_median": BATCH / med, "examples_per_s_mean": BATCH / mean}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="../shared/models/all-MiniLM-L6-v2")
    ap.add_argument("--data", default="../shared/data/icd10cm_chapters.jsonl")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = ap.parse_args()

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    ids, mask, labels, n_classes = load_batch(args.data, os.path.join(args.model, "tokenizer.json"))
    assert n_classes == CLASSES, f"expected {CLASSES} labels in {args.data}, found {n_classes}"
    with open(os.path.join(args.model, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    model = Bert(cfg, load_file(os.path.join(args.model, "model.safetensors")), CLASSES).eval()

    def forward():
        with torch.inference_mode():
            model(ids, mask)

    results = {"forward": time_steps(forward, args.warmup, args.iters)}

    # LoRA on query and value; everything else frozen except the head.
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        layer["q"] = LoRALinear(layer["q"], LORA_RANK, LORA_ALPHA)
        layer["v"] = LoRALinear(layer["v"], LORA_RANK, LORA_ALPHA)
    model.head.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR)

    def train_step():
        loss = F.cross_entropy(model(ids, mask), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()

    results["lora_train_step"] = time_steps(train_step, args.warmup, args.iters)
    results["lora_train_step"]["trainable_params"] = sum(p.numel() for p in trainable)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "attention": "sdpa" if hasattr(F, "scaled_dot_product_attention") else "matmul+softmax",
            "real_tokens_per_example": mask.sum().item() / BATCH, "results": results}

    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"torch {info['torch']}, {info['threads']} threads, attention {info['attention']}, "
          f"{info['real_tokens_per_example']:.1f} real tokens per example (rest padding)\n")
    print("| measurement | batch | seq | examples/s (median) | examples/s (mean) | ms/step (median) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['batch']} | {r['seq']} | {r['examples_per_s_median']:.1f} | "
              f"{r['examples_per_s_mean']:.1f} | {r['ms_per_step_median']:.1f} |")


if __name__ == "__main__":
    main()
