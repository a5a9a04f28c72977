"""Per-expert calibration of fused MoE experts, judged on a trained tiny MoE.

Trains (once, cached in --cache) a byte-level Mixtral (hidden 256, 4 layers, 8 experts top-2,
intermediate 384) on the tiny LM's training text (scripts/train_tiny_lm.py's corpus, schedule and
windows), then measures held-out perplexity (ptqrt/data/tiny_lm/heldout.txt, windows of 256 bytes)
under each quantization, lm_head kept float. Calibration: 32 windows of the training split
(ptqrt.evaluate.calib_windows). Rows beyond ptqrt's own configs:
  "static, one scale a module"  the per-expert static scales replaced by their maximum over the
                                module's experts (what engines with one activation scale for all
                                experts run)
  "static, experts dynamic"     static linears, per-token experts (how quantize() treated experts
                                before they were calibrated per expert)

    python bench/moe_calibration.py [--steps 600] [--cache /tmp/ptqrt_tiny_moe]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

from ptqrt import PTQConfig, quantize  # noqa: E402
from ptqrt import tiny_lm  # noqa: E402
from ptqrt.modules.experts import QuantExperts  # noqa: E402


def make_moe():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=tiny_lm.VOCAB_SIZE, hidden_size=256, intermediate_size=384, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                        bos_token_id=tiny_lm.BOS_ID, eos_token_id=tiny_lm.EOS_ID, pad_token_id=tiny_lm.EOS_ID,
                        tie_word_embeddings=False, router_aux_loss_coef=0.02, output_router_logits=True)
    return MixtralForCausalLM(cfg)


def trained(steps: int, cache: str, seq_len: int = 256, batch: int = 16, lr: float = 3e-3):
    from transformers import MixtralForCausalLM
    from train_tiny_lm import corpus_text, split_point, train_model

    if os.path.isfile(os.path.join(cache, "config.json")):
        return MixtralForCausalLM.from_pretrained(cache).eval()
    torch.manual_seed(0)
    data = corpus_text().encode("utf-8")
    train_ids = tiny_lm.encode(data[:split_point(data)])
    model = make_moe()
    train_model(model, train_ids, steps, seq_len, batch, lr, min(60, steps // 10), 0)
    model.config.output_router_logits = False
    model.eval().save_pretrained(cache)
    return model


def one_scale_a_module(model) -> None:
    for m in model.modules():
        if isinstance(m, QuantExperts) and m.mode == "W8A8":
            for p in m.shapes:
                s = getattr(m, f"{p}_input_scale")
                s.fill_(s.max())


def main() -> None:
    from ptqrt.evaluate import calib_windows

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--cache", default="/tmp/ptqrt_tiny_moe")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = trained(args.steps, args.cache)
    with open(os.path.join(tiny_lm.MODEL_DIR, "heldout.txt"), "rb") as f:
        held = tiny_lm.encode(f.read())
    calib = calib_windows(32)
    static = dict(act_dtype="int8", act_granularity="per_tensor", skip=["lm_head"])
    rows = [
        ("fp32", None, None),
        ("W8A16 RTN", PTQConfig(skip=["lm_head"]), None),
        ("W8A16 GPTQ", PTQConfig(precision_recovery="gptq", skip=["lm_head"]), None),
        ("W8A8 dynamic", PTQConfig(act_dtype="int8", skip=["lm_head"]), None),
        ("W8A8 dynamic + SmoothQuant 0.5", PTQConfig(act_dtype="int8", outliers="smooth", skip=["lm_head"]), None),
        ("W8A8 static", PTQConfig(**static), None),
        ("W8A8 static, one scale a module", PTQConfig(**static), one_scale_a_module),
        ("W8A8 static, experts dynamic", PTQConfig(**static, layer_policies={"mlp.experts": PTQConfig(act_dtype="int8")}),
         None),
        ("W8A8 static + SmoothQuant 0.5", PTQConfig(**static, outliers="smooth"), None),
        ("W8A8 static + SmoothQuant 0.8", PTQConfig(**static, outliers="smooth", smooth_alpha=0.8), None),
        ("W8A8 static + OSL", PTQConfig(**static, outliers="osl"), None),
    ]
    base = None
    print(f"{'scheme':<34}{'perplexity':>11}{'change':>9}")
    for name, cfg, after in rows:
        m = copy.deepcopy(model)
        if cfg is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = quantize(m, cfg, calib, quiet=True)
            if after is not None:
                after(m)
        ppl = tiny_lm.perplexity(m, held)
        base = base or ppl
        print(f"{name:<34}{ppl:>11.4f}{100 * (ppl / base - 1):>8.2f}%", flush=True)


if __name__ == "__main__":
    main()
