"""Train the tiny byte-level causal LM shipped in ptqrt/data/tiny_lm/ (perplexity checks for quantization).

Text: the values of ``pydoc_data.topics.topics`` (English reference text that CPython ships, ~460 KB),
in sorted key order, joined by a blank line, UTF-8 encoded. The last 5% of that byte stream, cut at a
line start, is held out; it is saved verbatim as ``heldout.txt`` because ``pydoc_data`` differs between
Python versions, so the held-out bytes must travel with the model rather than be re-derived.

Tokens: one token per byte (ids 0..255), BOS = 256 starts every window, EOS = 257 is unused in training.
Model: transformers ``LlamaForCausalLM``, hidden 256, 4 layers, 4 query heads over 2 KV heads (GQA),
MLP 768 (every in-feature count, 256 and 768, is a multiple of 128 so per-group int8 weights with
group 64 or 128 apply to every linear), untied lm_head, ~3.3 M parameters, saved as float16 (~6.6 MB).

Training: AdamW, linear warm-up then cosine decay, random 256-byte windows, fixed step count and
seeds, 2 CPU threads (about 13 minutes, 0.9 s a step, on an idle 2-core machine).
Run from the repository root:

    python scripts/train_tiny_lm.py            # writes ptqrt/data/tiny_lm/
    python scripts/train_tiny_lm.py --steps 50 --out /tmp/tiny_lm   # a quick smoke run
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ptqrt.tiny_lm import BOS_ID, EOS_ID, VOCAB_SIZE, encode, perplexity  # noqa: E402

HELDOUT_FRACTION = 0.05
SEPARATOR = "\n\n"


def corpus_text() -> str:
    """pydoc_data.topics values in sorted key order, joined by a blank line."""
    from pydoc_data.topics import topics

    return SEPARATOR.join(topics[k] for k in sorted(topics))


def split_point(data: bytes) -> int:
    """First line start at or after (1 - HELDOUT_FRACTION) of the stream (keeps both halves valid UTF-8)."""
    return data.index(b"\n", int(len(data) * (1 - HELDOUT_FRACTION))) + 1


def make_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        pad_token_id=EOS_ID, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    return LlamaForCausalLM(cfg)


def batches(train: torch.Tensor, seq_len: int, batch: int, gen: torch.Generator):
    """Endless random windows: input = [BOS] + bytes[i : i+seq_len-1], labels = the input itself
    (the model shifts labels internally), so every window teaches prediction from a cold BOS start."""
    bos = torch.full((batch, 1), BOS_ID, dtype=torch.long)
    offs = torch.arange(seq_len - 1)
    while True:
        starts = torch.randint(0, len(train) - seq_len, (batch,), generator=gen)
        yield torch.cat([bos, train[starts[:, None] + offs]], dim=1)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_model(model, train_ids: torch.Tensor, steps: int, seq_len: int, batch: int, lr: float, warmup: int,
                seed: int) -> float:
    """AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), the warm-up + cosine schedule of lr_at,
    gradient clip 1.0, `steps` batches of random windows; prints the loss every 50 steps. Returns the
    seconds it took."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    stream = batches(train_ids, seq_len, batch, torch.Generator().manual_seed(seed))
    model.train()
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        x = next(stream)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{time.time() - t0:.0f}s", flush=True)
    return time.time() - t0


def unigram_perplexity(train: torch.Tensor, held: torch.Tensor) -> float:
    """Add-one smoothed byte unigram fitted on train, scored on held-out: the baseline to beat."""
    counts = torch.bincount(train, minlength=256).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[held].mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "ptqrt", "data", "tiny_lm"))
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    text = corpus_text()
    data = text.encode("utf-8")
    cut = split_point(data)
    train = encode(data[:cut])
    held = encode(data[cut:])
    print(f"corpus {len(data)} bytes: train {len(train)}, held-out {len(held)}", flush=True)

    model = make_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"LlamaForCausalLM, {n_params} parameters", flush=True)
    t0 = time.time()
    train_s = train_model(model, train, args.steps, args.seq_len, args.batch, args.lr, args.warmup, args.seed)

    model.eval()
    # Score a train slice as long as the held-out set, so the two numbers are comparable.
    ppl_train = perplexity(model, train[: len(held)], seq_len=args.seq_len, stride=args.seq_len)
    ppl_held = perplexity(model, held, seq_len=args.seq_len, stride=args.seq_len)
    ppl_uni = unigram_perplexity(train, held)
    print(f"train    loss {math.log(ppl_train):.4f}  perplexity {ppl_train:.3f}")
    print(f"held-out loss {math.log(ppl_held):.4f}  perplexity {ppl_held:.3f}")
    print(f"unigram  held-out perplexity {ppl_uni:.3f} (uniform: 256)")

    os.makedirs(args.out, exist_ok=True)
    model.to(torch.float16).save_pretrained(args.out)
    with open(os.path.join(args.out, "heldout.txt"), "wb") as f:
        f.write(data[cut:])
    # fp16 storage rounds the weights: report the perplexity of what is actually shipped.
    ppl_held16 = perplexity(model.to(torch.float32), held, seq_len=args.seq_len, stride=args.seq_len)
    print(f"held-out perplexity after the float16 round trip {ppl_held16:.3f}")
    split = {
        "source": "pydoc_data.topics.topics values, sorted keys, joined by '\\n\\n', UTF-8",
        "python_version": platform.python_version(),
        "corpus_bytes": len(data),
        "corpus_sha256": hashlib.sha256(data).hexdigest(),
        "train": [0, cut],
        "heldout": [cut, len(data)],
        "heldout_file": "heldout.txt",
        "heldout_sha256": hashlib.sha256(data[cut:]).hexdigest(),
        "tokenizer": {"kind": "bytes", "vocab_size": VOCAB_SIZE, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID},
        "training": {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
                     "warmup": args.warmup, "seed": args.seed, "threads": args.threads,
                     "train_seconds": round(train_s), "torch": torch.__version__},
        "metrics": {"train_perplexity": round(ppl_train, 4), "heldout_perplexity": round(ppl_held16, 4),
                    "heldout_unigram_perplexity": round(ppl_uni, 4), "seq_len": args.seq_len,
                    "stride": args.seq_len},
    }
    with open(os.path.join(args.out, "split.json"), "w") as f:
        json.dump(split, f, indent=2)
        f.write("\n")
    print(f"saved to {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
