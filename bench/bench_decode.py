"""Greedy decode of the shipped tiny Llama (ptqrt/data/tiny_lm) end to end: milliseconds per generated
token for the float model and each quantized form, all in one process, the rounds going through the
forms in turn (so each ratio compares moments alike on a shared machine).

What it measures that the op benchmarks do not: the host work around the kernels (QuantLinear's
calls, the int8 KV cache's store and its Hugging Face glue), which decides a small model's decode on
the CPU and an eager decode on a GPU. The model is tiny (4 layers of 256, 4 query heads on 2 kv
heads of 64), so the numbers are mostly that host work; a 4096-wide model pays it per layer too.

    python bench/bench_decode.py [--device cpu|cuda] [--tokens 64] [--rounds 5] [--threads N] [--json PATH]

Prints, per form: min and median ms per token over the rounds, and the median's ratio to the float
model's (> 1: slower). Writes the same as JSON (default bench/results/decode_<device>_<host>.json)
with the device, versions and thread count. Nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from ptqrt import PTQConfig, prepack, quantize  # noqa: E402
from ptqrt.bench import cpu_name, profile_lines  # noqa: E402
from ptqrt.tiny_lm import encode, load_tiny_lm  # noqa: E402

FORMS = (
    ("W8A16", PTQConfig()),
    ("W8A8 dynamic", PTQConfig(act_dtype="int8")),
    ("W8A8 dynamic + int8 KV", PTQConfig(act_dtype="int8", kv_cache_dtype="int8")),
    ("int8 KV", PTQConfig(skip=[".*"], kv_cache_dtype="int8")),
)
PROMPT = "The quick brown fox jumps over the lazy dog. "


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ms_per_token(model, ids: torch.Tensor, tokens: int) -> float:
    _sync(ids.device)
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    _sync(ids.device)
    return (time.perf_counter() - t) / tokens * 1e3


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def build(dev: torch.device) -> dict:
    """{form name: model}: the tiny Llama in fp16 (GPU) or fp32 (CPU), then each quantized form."""
    import warnings

    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    base, _, _, _ = load_tiny_lm(dtype=dtype, device=dev)
    models = {"fp16" if dtype == torch.float16 else "fp32": base}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no nn.Linear left to quantize" for the KV-only form
        for name, cfg in FORMS:
            models[name] = quantize(copy.deepcopy(base), cfg, quiet=True)
    return models


def run(device: str = "cpu", tokens: int = 64, rounds: int = 5, keep: str = "") -> dict:
    """Times per form; with keep = a form's name, res["_kept"] = (that model, the prompt ids)."""
    import transformers

    dev = torch.device(device)
    models = build(dev)
    float_name = next(iter(models))
    if dev.type == "cpu":  # the cpu backend's packed weights, made now rather than in the first round
        for m in models.values():
            prepack(m)
    ids = encode(PROMPT, bos=True)[None].to(dev)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up: kernels compiled, caches and packed weights made
            ms_per_token(m, ids, min(tokens, 8))
        for _ in range(rounds):
            for name, m in models.items():
                times[name].append(ms_per_token(m, ids, tokens))
    ref = statistics.median(times[float_name])
    rows = {name: {"min_ms": min(ts), "median_ms": statistics.median(ts), "ms": ts,
                   "vs_float": statistics.median(ts) / ref} for name, ts in times.items()}
    res = {"device": device_name(dev), "device_type": dev.type, "torch": torch.__version__,
           "transformers": transformers.__version__, "threads": torch.get_num_threads(),
           "tokens": tokens, "rounds": rounds, "prompt_tokens": int(ids.shape[1]), "float": float_name,
           "forms": rows}
    if keep in models:
        res["_kept"] = (models[keep], ids)
    return res


def profile(model, ids: torch.Tensor, tokens: int, top: int = 15) -> list[str]:
    """Where one generate's host time goes, per generated token (cProfile, own time), and on a GPU
    every call that waited for it (torch.cuda.set_sync_debug_mode: a synchronizing call in a decode
    step stalls the host once per call, however fast the kernels are)."""
    import cProfile
    import warnings

    prof = cProfile.Profile()
    syncs: dict[str, int] = {}
    cuda = ids.device.type == "cuda"
    with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.synchronize(ids.device)
            torch.cuda.set_sync_debug_mode("warn")
        try:
            prof.enable()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            prof.disable()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{Path(w.filename).name}:{w.lineno}"
            syncs[where] = syncs.get(where, 0) + 1
    out = profile_lines(prof, tokens, top, "tok")
    if cuda:
        out.append("calls that waited for the GPU (sync debug mode), per generate: "
                   + (", ".join(f"{k} x{v}" for k, v in sorted(syncs.items(), key=lambda kv: -kv[1])) or "none"))
    return out


def lines(res: dict) -> list[str]:
    out = [f"tiny Llama greedy decode, {res['tokens']} tokens after a {res['prompt_tokens']}-token prompt, "
           f"{res['rounds']} rounds: {res['device']}, torch {res['torch']}, transformers {res['transformers']}, "
           f"{res['threads']} threads",
           f"{'form':<24} {'min ms/tok':>10} {'median':>8} {'vs ' + res['float']:>8}"]
    for name, r in res["forms"].items():
        out.append(f"{name:<24} {r['min_ms']:>10.3f} {r['median_ms']:>8.3f} {r['vs_float']:>7.2f}x")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default="", help="where to write the results (default bench/results/...)")
    ap.add_argument("--profile", default="", metavar="FORM",
                    help="then profile one generate of this form (e.g. 'int8 KV'): host time per token by "
                         "function, and on a GPU the calls that waited for it")
    a = ap.parse_args(argv)
    if a.tokens < 1 or a.rounds < 1:
        ap.error("--tokens and --rounds must be at least 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    if a.threads:
        torch.set_num_threads(a.threads)
    forms = ("fp16" if a.device == "cuda" else "fp32", *(n for n, _ in FORMS))
    if a.profile and a.profile not in forms:
        ap.error(f"--profile: no form {a.profile!r} on {a.device}; choose from {', '.join(forms)}")
    res = run(a.device, a.tokens, a.rounds, keep=a.profile)
    kept = res.pop("_kept", None)
    print("\n".join(lines(res)))
    path = Path(a.json) if a.json else ROOT / "bench" / "results" / f"decode_{a.device}_{platform.node() or 'host'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))  # before the profile: a time limit there keeps the timings
    print(f"wrote {path}")
    if kept is not None:
        print(f"\nprofile of one generate of {a.profile!r} ({a.tokens} tokens):")
        print("\n".join(profile(*kept, a.tokens)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
