"""Where the GPU memory of a layer-by-layer quantize(device="cuda") goes (diagnosis for
tests/test_layerwise.py::test_only_one_layer_on_the_device): allocated and peak bytes after each
layer, and the allocation sites of the blocks still live at the end.

    python bench/probe_layer_memory.py [n_layers]
"""
import sys
from collections import Counter

import torch

sys.path.insert(0, "tests")
from test_layerwise import STATIC, PreNormLayer, Stack, _calib  # noqa: E402

from ptqrt import PTQConfig, quantize  # noqa: E402


def main(n: int) -> None:
    import os
    os.environ["PTQRT_TRITON_AUTOTUNE"] = "0"
    cfg = PTQConfig(precision_recovery="gptq", **STATIC)
    quantize(Stack(PreNormLayer, n=2).eval(), cfg, _calib(), quiet=True, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    real_empty = torch.cuda.empty_cache

    def empty_cache():
        print(f"  after a layer: allocated {torch.cuda.memory_allocated() - base:+9d}  "
              f"peak {torch.cuda.max_memory_allocated() - base:9d}", flush=True)
        real_empty()

    torch.cuda.empty_cache = empty_cache
    torch.cuda.memory._record_memory_history(max_entries=200000)
    model = Stack(PreNormLayer, n=n).eval()
    quantize(model, cfg, _calib(), quiet=True, device="cuda")
    torch.cuda.synchronize()
    print(f"end: allocated {torch.cuda.memory_allocated() - base:+d}  peak {torch.cuda.max_memory_allocated() - base}")
    snap = torch.cuda.memory._snapshot()
    sites = Counter()
    for seg in snap["segments"]:
        for b in seg["blocks"]:
            if b["state"] != "active_allocated":
                continue
            frames = [f for f in b.get("frames", []) if "ptqrt" in f["filename"] or "tests" in f["filename"]]
            where = " <- ".join(f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in frames[:4])
            sites[where or "(no ptqrt frame)"] += b["size"]
    print("live blocks by allocation site (bytes):")
    for where, size in sites.most_common(12):
        print(f"  {size:9d}  {where}")
    torch.cuda.memory._record_memory_history(enabled=None)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8)
