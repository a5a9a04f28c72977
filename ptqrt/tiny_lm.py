"""The tiny byte-level causal LM shipped in ``ptqrt/data/tiny_lm/``: load it, tokenize, measure perplexity.

It exists so that quantization can be judged end to end on a real (if small) trained language model
without any download: a ``LlamaForCausalLM`` (hidden 256, 4 layers, GQA 4/2 heads, MLP 768) trained by
``scripts/train_tiny_lm.py`` on the English text CPython ships in ``pydoc_data.topics``. See that
folder's README.md for how it was trained and its held-out perplexity.

Tokens are bytes: the UTF-8 bytes of the text are the ids 0..255; BOS = 256 opens every window;
EOS = 257 (unused in training). transformers is imported only when the model is loaded.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Union

import torch

VOCAB_SIZE = 258
BOS_ID = 256
EOS_ID = 257
MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_lm")


def encode(text: Union[str, bytes], bos: bool = False) -> torch.Tensor:
    """str (UTF-8 encoded) or bytes -> int64 [L] of byte values, with BOS first when ``bos``."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids = torch.tensor(list(data), dtype=torch.int64)
    if bos:
        ids = torch.cat([torch.tensor([BOS_ID]), ids])
    return ids


def decode(ids) -> str:
    """int ids (tensor or list) -> str; special ids (BOS/EOS) are dropped, broken UTF-8 is replaced."""
    if isinstance(ids, torch.Tensor):
        ids = ids.reshape(-1).tolist()
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def load_tiny_lm(dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu",
                 model_dir: str = MODEL_DIR) -> tuple[torch.nn.Module, Callable, Callable, torch.Tensor]:
    """Load the shipped model in eval mode.

    Returns (model, encode, decode, heldout_ids) where heldout_ids is int64 [L] (the held-out bytes,
    without BOS), ready for ``perplexity(model, heldout_ids)``. The weights are stored as float16;
    ``dtype`` is what they are cast to on load.
    """
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"no tiny LM in {model_dir}: run `python scripts/train_tiny_lm.py` to create it")
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    with open(os.path.join(model_dir, "heldout.txt"), "rb") as f:
        heldout = encode(f.read())
    return model, encode, decode, heldout


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, seq_len: int = 256, stride: int = 256,
               batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood) of the byte ids int64 [L] under ``model``.

    Windows of ``seq_len`` bytes start every ``stride`` bytes; each window is fed as [BOS] + bytes, and
    only the bytes that no earlier window scored are counted, so every byte is scored exactly once
    (with ``stride < seq_len`` each byte after the first window sees at least seq_len - stride bytes
    of context). Log-probabilities are taken in float32. Needs 1 <= stride <= seq_len.
    """
    if not 1 <= stride <= seq_len:
        raise ValueError(f"need 1 <= stride <= seq_len, got stride={stride}, seq_len={seq_len}")
    ids = ids.reshape(-1).to(torch.int64)
    if ids.numel() == 0:
        raise ValueError("perplexity of an empty sequence is undefined")
    device = next(model.parameters()).device
    # (begin, end, first scored position) for each window
    windows, scored_to, begin = [], 0, 0
    while scored_to < ids.numel():
        end = min(begin + seq_len, ids.numel())
        windows.append((begin, end, scored_to))
        scored_to, begin = end, begin + stride
    nll, count = 0.0, 0
    i = 0
    while i < len(windows):
        # batch consecutive windows of one length (only the tail ones can be shorter)
        n = windows[i][1] - windows[i][0]
        j = i
        while j < len(windows) and j - i < batch_size and windows[j][1] - windows[j][0] == n:
            j += 1
        group, i = windows[i:j], j
        x = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
        bos = torch.full((x.shape[0], 1), BOS_ID, dtype=torch.int64, device=device)
        logits = model(input_ids=torch.cat([bos, x], dim=1), use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position j predicts x[:, j]
        tok = logp.gather(-1, x[..., None]).squeeze(-1)  # [B, n]
        for row, (b, e, s) in enumerate(group):
            nll -= tok[row, s - b:].double().sum().item()
            count += e - s
    return math.exp(nll / count)
