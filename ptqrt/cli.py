"""`ptqrt` command line: quantize | inspect | eval | demo | bench | tune | build (also `python -m ptqrt`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

MODES = {"w8a16": dict(), "w8a8-dynamic": dict(act_dtype="int8"),
         "w8a8-static": dict(act_dtype="int8", act_granularity="per_tensor")}


def _hf_model(model_dir: Path):
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"ptqrt quantize: {model_dir} has no config.json; expected a Hugging Face model directory")
    cfg = AutoConfig.from_pretrained(str(model_dir))
    causal = any(a.endswith("ForCausalLM") for a in (cfg.architectures or []))
    cls = AutoModelForCausalLM if causal else AutoModel
    return cls.from_pretrained(str(model_dir)).eval()


def cmd_quantize(a) -> int:
    import torch

    from . import PTQConfig, quantize, save_quantized
    from .demo import sentences

    model_dir, out_dir = Path(a.model_dir), Path(a.out_dir)
    kw = dict(MODES[a.mode])
    if a.group_size:
        kw.update(weight_granularity="per_group", group_size=a.group_size)
    if a.gptq:
        kw.update(precision_recovery="gptq")
    if a.kv_cache:
        kw.update(kv_cache_dtype="int8", kv_granularity=a.kv_cache)
    try:
        cfg = PTQConfig(skip=a.skip, outliers=a.outliers, smooth_alpha=a.smooth_alpha, **kw)
    except ValueError as e:
        raise SystemExit(f"ptqrt quantize: {e}") from None
    model = _hf_model(model_dir)
    calib = None
    tok = None
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError):
        pass
    if cfg.needs_calibration or cfg.kv_needs_calibration:
        if tok is None:
            raise SystemExit(f"ptqrt quantize: {a.mode} needs calibration text, but {model_dir} has no tokenizer")
        text = Path(a.calib).read_text().splitlines() if a.calib else sentences("calib")
        text = [t for t in text if t.strip()][: a.max_samples]
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        calib = [dict(tok(text[i:i + 8], padding=True, return_tensors="pt")) for i in range(0, len(text), 8)]
    with torch.no_grad():
        quantize(model, cfg, calib, quiet=a.quiet)
    save_quantized(model, out_dir)
    if tok is not None:
        tok.save_pretrained(str(out_dir))
    print(f"wrote {out_dir} ({cfg.mode})")
    return 0


def cmd_inspect(a) -> int:
    from .format import read_description, tensor_headers

    desc = read_description(a.dir)
    heads = tensor_headers(a.dir, desc, load=lambda n: n.endswith(("_scale",)))
    nbytes = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "I32": 4, "I64": 8, "U8": 1, "BOOL": 1, "F64": 8}
    total = orig = 0
    rows = []
    for name, d in sorted(desc["modules"].items()):
        layer_bytes = 0
        ranges = []
        for leaf in ("weight", "weight_scale", "bias", "input_scale", "smooth_scale"):
            h = heads.get(f"{name}.{leaf}")
            if h is None:
                continue
            shape, dt, t = h
            n = 1
            for s in shape:
                n *= s
            layer_bytes += n * nbytes.get(dt, 4)
            if t is not None and t.numel():
                ranges.append(f"{leaf.replace('_scale', '')}[{t.min().item():.3g}, {t.max().item():.3g}]")
        fp32 = d["in_features"] * d["out_features"] * 4 + (d["out_features"] * 4 if d["bias"] else 0)
        rows.append((name, d["mode"] + (f"/g{d['group_size']}" if d.get("group_size") else ""),
                     f"{d['out_features']}x{d['in_features']}", layer_bytes, fp32, "  ".join(ranges)))
    other = 0
    for name, p in desc["parameters"].items():
        if p["mode"] == "FLOAT":
            shape, dt, _ = heads.get(name, (p["shape"], "F32", None))
            n = 1
            for s in shape:
                n *= s
            other += n * nbytes.get(dt, 4)
    w = max([len(r[0]) for r in rows] + [5])
    print(f"{a.dir}: format v{desc['format_version']}, ptqrt {desc['ptqrt_version']}, "
          f"{len(rows)} quantized layers, files: {', '.join(desc['files'])}")
    head = f"{'layer':<{w}}  {'mode':<16}{'shape':>12}{'bytes':>12}{'fp32 bytes':>12}  scale ranges"
    print(head)
    print("-" * len(head))
    for name, mode, shape, b, f, rng in rows:
        total += b
        orig += f
        print(f"{name:<{w}}  {mode:<16}{shape:>12}{b:>12,}{f:>12,}  {rng}")
    print("-" * len(head))
    print(f"{'quantized layers':<{w}}  {'':<16}{'':>12}{total:>12,}{orig:>12,}  "
          f"compression {orig / max(total, 1):.2f}x")
    print(f"{'float tensors':<{w}}  {'FLOAT':<16}{'':>12}{other:>12,}")
    print(f"{'total':<{w}}  {'':<16}{'':>12}{total + other:>12,}{orig + other:>12,}  "
          f"compression {(orig + other) / max(total + other, 1):.2f}x")
    return 0


def cmd_demo(a) -> int:
    from . import demo

    demo.run(repeats=a.repeats)
    return 0


def cmd_bench(a) -> int:
    import torch

    from . import bench, ops

    if a.backend:
        ops.set_backend(a.backend)
    if torch.cuda.is_available() and not a.cpu:
        from . import bench_gpu

        backends = tuple(b for b in ("triton", "cuda") if a.backend in (None, "auto", b)) or ("triton",)
        bench_gpu.run_gpu_bench(quick=a.quick, plot=a.plot, out_dir=a.out, backends=backends, flush=a.flush)
        return 0
    ms = tuple(int(m) for m in a.m.split(",")) if a.m else ((1, 16) if a.quick else bench.DEFAULT_MS)
    nks = tuple(tuple(int(v) for v in s.lower().split("x")) for s in a.nk.split(",")) if a.nk else \
        (((1024, 1024),) if a.quick else bench.DEFAULT_NK)
    rows = bench.bench_linear_ops(ms, nks)
    print(f"CPU: {bench.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    bench.print_rows(rows)
    j, c = bench.write_results(rows, a.out, "cpu-linear")
    print(f"wrote {j} and {c}")
    return 0


def cmd_eval(a) -> int:
    from . import evaluate

    evaluate.run(quick=a.quick, only=a.only)
    return 0


def cmd_tune(a) -> int:
    from . import tune

    path = tune.tune(ops=a.ops, quick=a.quick, mode=a.mode)
    print(f"wrote the dispatch table {path}; set_backend('auto') uses it from now on")
    return 0


def cmd_build(a) -> int:
    from . import _build

    kinds = [k for k in ("cpu", "cuda") if getattr(a, k)] or ["cpu"]
    rc = 0
    for kind in kinds:
        try:
            print(_build.build(kind, verbose=a.verbose))
        except Exception as e:  # noqa: BLE001 -- report every failure, then exit non-zero
            print(f"ptqrt build --{kind} failed: {e}", file=sys.stderr)
            rc = 1
    return rc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptqrt", description="post-training INT8 quantization runtime")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a Hugging Face model directory into a packed directory")
    q.add_argument("model_dir")
    q.add_argument("out_dir")
    q.add_argument("--mode", choices=sorted(MODES), default="w8a16")
    q.add_argument("--group-size", type=int, default=0, help="per-group weights (W8A16 only), e.g. 64 or 128")
    q.add_argument("--outliers", choices=["none", "smooth", "osl"], default="none",
                   help="SmoothQuant or OSL before W8A8 (needs a w8a8 mode)")
    q.add_argument("--smooth-alpha", type=float, default=0.5)
    q.add_argument("--gptq", action="store_true", help="GPTQ rounding instead of RTN (uses calibration text)")
    q.add_argument("--kv-cache", choices=["per_token", "per_channel"],
                   help="int8 KV cache for decoder models: dynamic per token-head or static per channel")
    q.add_argument("--skip", nargs="*", default=["lm_head"], help="module names (substring or regex) to keep float")
    q.add_argument("--calib", help="text file, one calibration sample per line (default: sentences shipped with ptqrt)")
    q.add_argument("--max-samples", type=int, default=128)
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(fn=cmd_quantize)

    i = sub.add_parser("inspect", help="per-layer table of a packed directory")
    i.add_argument("dir")
    i.set_defaults(fn=cmd_inspect)

    d = sub.add_parser("demo", help="quantize the bundled all-MiniLM-L6-v2 and compare with fp32")
    d.add_argument("--repeats", type=int, default=5)
    d.set_defaults(fn=cmd_demo)

    e = sub.add_parser("eval", help="perplexity of the shipped tiny causal LM under each quantization")
    e.add_argument("--quick", action="store_true", help="a shorter held-out slice")
    e.add_argument("--only", nargs="*", help="row labels to run (fp32 always runs)")
    e.set_defaults(fn=cmd_eval)

    b = sub.add_parser("bench", help="time the selected backend's ops against their float peers")
    b.add_argument("--backend", choices=["auto", "reference", "cpu", "triton", "cuda"])
    b.add_argument("--m", help="comma-separated M values (CPU)")
    b.add_argument("--nk", help="comma-separated NxK shapes, e.g. 4096x4096 (CPU)")
    b.add_argument("--quick", action="store_true", help="a small subset")
    b.add_argument("--cpu", action="store_true", help="the CPU suite even when a GPU is present")
    b.add_argument("--plot", action="store_true", help="draw the GPU results to a PNG")
    b.add_argument("--out", default="bench/results")
    b.add_argument("--flush", choices=("read", "write"), default="read",
                   help="GPU: the L2 flush before each timed call: read do_bench's buffer (default; leaves "
                        "the L2 clean) or write it (do_bench's own; the write-back is billed to the call)")
    b.set_defaults(fn=cmd_bench)

    t = sub.add_parser("tune", help="time every backend per op and M-bucket on this GPU; write the auto table")
    t.add_argument("--ops", nargs="*", help="ops to tune (default: all)")
    t.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    t.add_argument("--mode", choices=("eager", "kernel"), default="eager",
                   help="eager: back-to-back eager calls, launch cost included (default); "
                        "kernel: do_bench with the L2 flushed, the kernels alone (as under CUDA graphs)")
    t.set_defaults(fn=cmd_tune)

    bl = sub.add_parser("build", help="build the C++ (--cpu) and/or CUDA (--cuda) extension, print its path")
    bl.add_argument("--cpu", action="store_true")
    bl.add_argument("--cuda", action="store_true")
    bl.add_argument("--verbose", action="store_true")
    bl.set_defaults(fn=cmd_build)
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
