"""`ptqrt` command line: quantize | dequantize | inspect | eval | demo | bench | tune | build (also `python -m ptqrt`)."""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

MODES = {"w8a16": dict(), "w8a8-dynamic": dict(act_dtype="int8"),
         "w8a8-static": dict(act_dtype="int8", act_granularity="per_tensor")}
# Files whose presence makes a directory a checkpoint that `quantize` must not overwrite unasked.
CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")


# ---------------------------------------------------------------------------- argument types
# Each raises ArgumentTypeError, which argparse reports as "ptqrt <cmd>: error: argument ...".
def _int(text: str, low: int, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = low - 1
    if n < low:
        raise argparse.ArgumentTypeError(f"must be a {what} integer; got {text!r}")
    return n


def _positive_int(text: str) -> int:
    return _int(text, 1, "positive")


def _count(text: str) -> int:
    return _int(text, 0, "non-negative")


def _positive_ints(text: str) -> tuple:
    """'1,16,128' -> (1, 16, 128)."""
    try:
        return tuple(_positive_int(v) for v in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,16,128; "
                                         f"got {text!r}") from None


def _shapes(text: str) -> tuple:
    """'4096x4096,1024x512' -> ((4096, 4096), (1024, 512))."""
    try:
        out = tuple(tuple(_positive_int(v) for v in s.lower().split("x")) for s in text.split(","))
    except argparse.ArgumentTypeError:
        out = ()
    if not out or any(len(nk) != 2 for nk in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated NxK shapes such as 4096x4096,1024x512; "
                                         f"got {text!r}")
    return out


def _text_file(text: str) -> Path:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return Path(text)


def _check_out_dir(model_dir: Path, out_dir: Path) -> None:
    """Refuse to write the packed model over the float model, or over another checkpoint (--force does)."""
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError(f"OUT_DIR {out_dir} is MODEL_DIR: the packed model would overwrite the float checkpoint "
                         f"there; choose another OUT_DIR (or pass --force)")
    from .format import DESCRIPTION

    if out_dir.is_dir() and not (out_dir / DESCRIPTION).is_file():
        found = _checkpoint_files(out_dir)
        if found:
            raise ValueError(f"OUT_DIR {out_dir} holds a checkpoint that is not a ptqrt packed one "
                             f"({', '.join(found[:3])}) and would be overwritten; choose another OUT_DIR "
                             f"(or pass --force)")


def _checkpoint_files(d: Path) -> list:
    """The checkpoint files in folder `d` (CHECKPOINT_FILES, else its safetensors files), [] for none."""
    if not d.is_dir():
        return []
    return [f for f in CHECKPOINT_FILES if (d / f).exists()] or sorted(f.name for f in d.glob("*.safetensors"))


def _check_out_path(out_dir: Path) -> None:
    """Refuse an OUT_DIR that cannot be made a directory (a file there, or above it): --force cannot either."""
    for p in (out_dir, *out_dir.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                what = f"{'a file' if p.exists() else 'a broken link'}, not a directory; choose another OUT_DIR"
                raise ValueError(f"OUT_DIR {out_dir} is {what}" if p == out_dir
                                 else f"OUT_DIR {out_dir} cannot be created: {p} is {what}")
            return


def _calibration_options(a, cfg) -> list:
    """The options of `quantize` that make it calibrate (each needs MODEL_DIR's tokenizer for the text)."""
    why = []
    if cfg.mode == "W8A8":
        why.append(f"--mode {a.mode} (static activation scales)")
    if cfg.outliers != "none":
        why.append(f"--outliers {a.outliers}")
    if cfg.precision_recovery != "none":
        why.append("--gptq")
    if cfg.kv_needs_calibration:
        why.append(f"--kv-cache {a.kv_cache} (static KV cache scales)")
    return why or [f"--mode {a.mode}"]


def _tokenizer(model_dir: Path):
    """MODEL_DIR's tokenizer, or None when it has none."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError):
        return None


def _calibration(a, tok) -> list:
    """The calibration batches: --calib's lines (or ptqrt's sentences), tokenized and padded by a copy of
    `tok`, so that the tokenizer saved with the packed model stays the source's (no pad token added)."""
    from .demo import sentences

    text = a.calib.read_text().splitlines() if a.calib else sentences("calib")
    text = [t for t in text if t.strip()][: a.max_samples]
    tok = copy.deepcopy(tok)  # padding sets pad_token and the backend's padding state
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return [dict(tok(text[i:i + 8], padding=True, return_tensors="pt")) for i in range(0, len(text), 8)]


def _hf_model(model_dir: Path):
    """The model config.json's `architectures` names, task head included (the first class transformers has,
    the one ptqrt.from_pretrained builds from the packed directory); the bare AutoModel, with a warning on
    stderr, when it names none."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from .format import FormatError
    from .pretrained import CONFIG, _model_class

    cfg = transformers.AutoConfig.from_pretrained(str(model_dir))
    try:
        cls = _model_class(cfg, model_dir / CONFIG)
    except FormatError:
        model = transformers.AutoModel.from_pretrained(str(model_dir)).eval()
        names = cfg.architectures or []
        why = (f"architectures {names} name no model class of transformers {transformers.__version__}" if names
               else "'architectures' is empty")
        print(f"ptqrt quantize: warning: {model_dir / CONFIG} names no model class ({why}): quantizing the bare "
              f"{type(model).__name__} (AutoModel), without any task head", file=sys.stderr)
        return model
    return cls.from_pretrained(str(model_dir)).eval()


def cmd_quantize(a) -> int:
    import torch

    from . import PTQConfig, quantize, save_quantized

    model_dir, out_dir = Path(a.model_dir), Path(a.out_dir)
    # Everything that can be refused is refused here, before the (slow) load and calibration.
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} has no config.json; expected a Hugging Face model directory")
    _check_out_path(out_dir)
    if not a.force:
        _check_out_dir(model_dir, out_dir)
    kw = dict(MODES[a.mode])
    if a.group_size:
        kw.update(weight_granularity="per_group", group_size=a.group_size)
    if a.gptq:
        kw.update(precision_recovery="gptq")
    if a.kv_cache:
        kw.update(kv_cache_dtype="int8", kv_granularity=a.kv_cache)
    if a.act_percentile is not None:
        kw.update(act_observer="percentile", act_percentile=a.act_percentile)
    cfg = PTQConfig(skip=a.skip, outliers=a.outliers, smooth_alpha=a.smooth_alpha, **kw)
    tok = _tokenizer(model_dir)
    calib = None
    if cfg.needs_calibration or cfg.kv_needs_calibration:
        if tok is None:
            why = _calibration_options(a, cfg)
            raise ValueError(f"{' and '.join(why)} need{'s' if len(why) == 1 else ''} calibration text, tokenized "
                             f"with the model's tokenizer, but {model_dir} has no tokenizer")
        calib = _calibration(a, tok)
    model = _hf_model(model_dir)
    with torch.no_grad():
        quantize(model, cfg, calib, quiet=a.quiet)
    save_quantized(model, out_dir)
    if tok is not None:
        tok.save_pretrained(str(out_dir))
    print(f"wrote {out_dir} ({cfg.mode}, {type(model).__name__})")
    return 0


def cmd_dequantize(a) -> int:
    import shutil

    import torch

    from . import dequantize, from_pretrained
    from .format import DESCRIPTION, INDEX

    packed, out_dir = Path(a.packed_dir), Path(a.out_dir)
    if not (packed / DESCRIPTION).is_file():
        raise ValueError(f"{packed} has no {DESCRIPTION}; expected a directory `ptqrt quantize` (or save_quantized) "
                         f"wrote")
    _check_out_path(out_dir)
    if out_dir.resolve() == packed.resolve():  # the files are read (mapped) while the float ones are written
        raise ValueError(f"OUT_DIR {out_dir} is PACKED_DIR: the float model is read from there while it is "
                         f"written; choose another OUT_DIR")
    if not a.force:
        found = _checkpoint_files(out_dir)
        if found:
            raise ValueError(f"OUT_DIR {out_dir} holds a checkpoint ({', '.join(found[:3])}) that would be "
                             f"overwritten; choose another OUT_DIR (or pass --force)")
    model = from_pretrained(packed)  # the files' checksums checked
    dequantize(model)
    if a.dtype:
        model.to(getattr(torch, a.dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DESCRIPTION).unlink(missing_ok=True)  # (--force over a packed directory) it is one no more
    before = {f.name: f.stat().st_mtime_ns for f in out_dir.iterdir()}
    model.save_pretrained(str(out_dir))
    written = {f.name for f in out_dir.iterdir() if before.get(f.name) != f.stat().st_mtime_ns}
    # The rest of PACKED_DIR (the tokenizer's files, a chat template, a README) as it is: loading the
    # tokenizer to save it again would lose one that cannot load here.
    packed_files = {DESCRIPTION, INDEX, "config.json", "generation_config.json"}
    for f in sorted(packed.iterdir()):
        if f.is_file() and f.name not in packed_files | written and f.suffix != ".safetensors":
            shutil.copy2(f, out_dir / f.name)
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point()})
    print(f"wrote {out_dir} (float: {', '.join(dtypes)}; {type(model).__name__})")
    return 0


_NBYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "I32": 4, "I64": 8, "U8": 1, "BOOL": 1, "F64": 8}


def _tensor_bytes(shape, dtype: str) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * _NBYTES.get(dtype, 4)


def _module_tensors(heads: dict, name: str, leaves) -> tuple[int, str]:
    """(bytes, scale ranges) of the tensors `leaves` of module `name` found in the file's headers."""
    size, ranges = 0, []
    for leaf in leaves:
        h = heads.get(f"{name}.{leaf}")
        if h is None:
            continue
        shape, dt, t = h
        size += _tensor_bytes(shape, dt)
        if t is not None and t.numel():
            ranges.append(f"{leaf.replace('_scale', '')}[{t.min().item():.3g}, {t.max().item():.3g}]")
    return size, "  ".join(ranges)


def _model_line(d: Path) -> str:
    """What config.json says the model is (the class ptqrt.from_pretrained builds), or why there is none."""
    import json

    from .pretrained import CONFIG

    try:
        archs = json.loads((d / CONFIG).read_text()).get("architectures") or []
        archs = [archs] if isinstance(archs, str) else list(archs)
    except FileNotFoundError:
        return f"model: no {CONFIG} (not a transformers model): load with ptqrt.load_quantized(model, dir)"
    except (OSError, ValueError, AttributeError) as e:
        return f"model: {CONFIG} cannot be read ({e})"
    if not archs:
        return f"model: {CONFIG} names no class: load with ptqrt.load_quantized(model, dir)"
    return f"model: {', '.join(map(str, archs))} ({CONFIG}: ptqrt.from_pretrained(dir) builds the first of these transformers has)"


def cmd_inspect(a) -> int:
    from .format import read_description, tensor_headers

    desc = read_description(a.dir)
    heads = tensor_headers(a.dir, desc, load=lambda n: n.endswith(("_scale",)))
    total = orig = 0
    rows, kv_rows = [], []
    for name, d in sorted(desc["modules"].items()):
        if f"{name}.weight" in desc.get("aliases", {}):  # a linear shown under its first name: stored once
            continue
        if d.get("kind") == "kv_cache":  # scales of an attention layer's int8 KV cache (none if dynamic)
            size, rng = _module_tensors(heads, name, ("k_scale", "v_scale"))
            kv_rows.append((name, f"C8/{d['granularity']}", f"{d['num_kv_heads']}x{d['head_dim']}", size, rng))
            continue
        if d.get("kind") == "experts":  # fused MoE experts: a row per projection, [experts x out x in]
            e = d["num_experts"]
            for proj, (n, k) in d["projections"].items():
                leaves = (proj, f"{proj}_scale", f"{proj}_input_scale", f"{proj}_smooth_scale")
                size, rng = _module_tensors(heads, name, leaves)
                rows.append((f"{name.rpartition('.')[0]}.{proj}",
                             d["mode"] + (f"/g{d['group_size']}" if d.get("group_size") else ""),
                             f"{e}x{n}x{k}", size, e * n * k * 4,
                             rng.replace(f"{proj}[", "weight[").replace(f"{proj}_", "")))
            continue
        size, rng = _module_tensors(heads, name, ("weight", "weight_scale", "bias", "input_scale", "smooth_scale"))
        fp32 = d["in_features"] * d["out_features"] * 4 + (d["out_features"] * 4 if d["bias"] else 0)
        rows.append((name, d["mode"] + (f"/g{d['group_size']}" if d.get("group_size") else ""),
                     f"{d['out_features']}x{d['in_features']}", size, fp32, rng))
    other = 0
    for name, p in desc["parameters"].items():
        if p["mode"] == "FLOAT" and name not in desc.get("aliases", {}):  # a tied tensor is stored once
            shape, dt, _ = heads.get(name, (p["shape"], "F32", None))
            other += _tensor_bytes(shape, dt)
    w = max([len(r[0]) for r in rows + kv_rows] + [16])
    print(f"{a.dir}: format v{desc['format_version']}, ptqrt {desc['ptqrt_version']}, "
          f"{len(rows)} quantized layers, files: {', '.join(desc['files'])}")
    print(_model_line(Path(a.dir)))
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
    kv = sum(r[3] for r in kv_rows)
    if kv_rows:
        print(f"\nint8 KV cache of {len(kv_rows)} attention layers (shape: kv heads x head dim; per_token "
              f"saves no scales: they are computed as tokens are written)")
        print(f"{'kv cache':<{w}}  {'mode':<16}{'shape':>12}{'bytes':>12}{'':>12}  scale ranges")
        print("-" * len(head))
        for name, mode, shape, b, rng in kv_rows:
            print(f"{name:<{w}}  {mode:<16}{shape:>12}{b:>12,}{'':>12}  {rng}")
        print("-" * len(head))
    print(f"{'float tensors':<{w}}  {'FLOAT':<16}{'':>12}{other:>12,}")
    if kv_rows:
        print(f"{'kv cache scales':<{w}}  {'C8':<16}{'':>12}{kv:>12,}")
    print(f"{'total':<{w}}  {'':<16}{'':>12}{total + other + kv:>12,}{orig + other:>12,}  "
          f"compression {(orig + other) / max(total + other + kv, 1):.2f}x")
    return 0


def cmd_demo(a) -> int:
    from . import demo

    demo.run(repeats=a.repeats)
    return 0


# `ptqrt bench --backend` values that run on CPU tensors only: they select the CPU suite on a GPU machine too.
CPU_SUITE_BACKENDS = ("reference", "cpu")


def _bench_suite(a) -> str:
    """The suite `ptqrt bench` runs for these arguments, "gpu" or "cpu". Refuses (ValueError) an
    argument that suite would ignore, before anything is timed or the backend is changed."""
    import os

    import torch

    if a.cpu or a.backend in CPU_SUITE_BACKENDS or not torch.cuda.is_available():
        why = ("--cpu" if a.cpu else f"--backend {a.backend}" if a.backend in CPU_SUITE_BACKENDS
               else "no CUDA device is visible")
        if a.plot:
            raise ValueError(f"--plot draws the GPU suite's results; the CPU suite ({why}) has no plot")
        if a.flush:
            raise ValueError(f"--flush sets the GPU suite's L2 flush; the CPU suite ({why}) has none")
        if a.backend == "cuda" or (a.backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") != "1"):
            raise ValueError(f"--backend {a.backend} cannot run the CPU suite ({why}): it times CPU tensors, which "
                             f"{a.backend} runs {'only under TRITON_INTERPRET=1' if a.backend == 'triton' else 'not at all'}")
        return "cpu"
    given = [flag for flag, v in (("--m", a.m), ("--nk", a.nk)) if v]
    if given:
        raise ValueError(f"{' and '.join(given)} set the CPU suite's shapes; the GPU suite times fixed shapes "
                         f"(ptqrt.bench_gpu.GEMM_M, GEMM_NK); add --cpu for the CPU suite")
    return "gpu"


def cmd_bench(a) -> int:
    import torch

    from . import bench, ops

    suite = _bench_suite(a)
    if a.backend:
        ops.set_backend(a.backend)
    if suite == "gpu":
        from . import bench_gpu

        backends = ("triton", "cuda") if a.backend in (None, "auto") else (a.backend,)
        bench_gpu.run_gpu_bench(quick=a.quick, plot=a.plot, out_dir=a.out, backends=backends, flush=a.flush or "read")
        return 0
    ms = a.m or ((1, 16) if a.quick else bench.DEFAULT_MS)
    nks = a.nk or (((1024, 1024),) if a.quick else bench.DEFAULT_NK)
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

    path = tune.tune(ops=a.ops, quick=a.quick, mode=a.mode)  # refuses bad ops, then a machine without a GPU
    print(f"wrote the dispatch table {path}; set_backend('auto') uses it from now on")
    return 0


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB ({n:,} bytes)" if n >= 2**20 else f"{n:,} bytes"


def clean_builds() -> None:
    """`ptqrt build --clean`: remove the stale just-in-time builds, saying what went and what stayed."""
    from . import _build

    root = _build.cache_root()
    done = _build.clean_cache()
    for path in done.removed:
        print(f"removed {path}")
    for path in done.busy:
        print(f"skipped {path}: another process holds its lock (a build or load in progress); run again later")
    if done.removed:
        print(f"freed {_size(done.freed)} in {root}")
    elif not done.busy:
        print(f"nothing to remove in {root}: it holds no build but the current sources'")


def cmd_build(a) -> int:
    from . import _build

    if a.clean:
        clean_builds()
        if not (a.cpu or a.cuda):
            return 0
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
    q.add_argument("--group-size", type=_count, default=0, help="per-group weights (W8A16 only), e.g. 64 or 128")
    q.add_argument("--outliers", choices=["none", "smooth", "osl"], default="none",
                   help="SmoothQuant or OSL before W8A8 (needs a w8a8 mode)")
    q.add_argument("--smooth-alpha", type=float, default=0.5)
    q.add_argument("--act-percentile", type=float, metavar="Q",
                   help="w8a8-static: the static scales from the Q quantile of |x / s| (e.g. 0.9999) instead of its max")
    q.add_argument("--gptq", action="store_true", help="GPTQ rounding instead of RTN (uses calibration text)")
    q.add_argument("--kv-cache", choices=["per_token", "per_channel"],
                   help="int8 KV cache for decoder models: dynamic per token-head or static per channel")
    q.add_argument("--skip", nargs="*", default=["lm_head"], help="module names (substring or regex) to keep float")
    q.add_argument("--calib", type=_text_file,
                   help="text file, one calibration sample per line (default: sentences shipped with ptqrt)")
    q.add_argument("--max-samples", type=_positive_int, default=128)
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.add_argument("--force", action="store_true",
                   help="write OUT_DIR even when it is MODEL_DIR or holds another (not ptqrt) checkpoint")
    q.set_defaults(fn=cmd_quantize)

    dq = sub.add_parser("dequantize", help="a packed directory back to a float Hugging Face model directory")
    dq.add_argument("packed_dir")
    dq.add_argument("out_dir")
    dq.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                    help="cast the whole float model to it (default: the dtypes the packed directory holds)")
    dq.add_argument("--force", action="store_true", help="write OUT_DIR even when it holds a checkpoint")
    dq.set_defaults(fn=cmd_dequantize)

    i = sub.add_parser("inspect", help="per-layer table of a packed directory")
    i.add_argument("dir")
    i.set_defaults(fn=cmd_inspect)

    d = sub.add_parser("demo", help="quantize the bundled all-MiniLM-L6-v2 and compare with fp32")
    d.add_argument("--repeats", type=_positive_int, default=5)
    d.set_defaults(fn=cmd_demo)

    e = sub.add_parser("eval", help="perplexity of the shipped tiny causal LM under each quantization")
    e.add_argument("--quick", action="store_true", help="a shorter held-out slice")
    e.add_argument("--only", nargs="*", help="row labels to run, e.g. W8A16 \"int8 KV\" (fp32 always runs)")
    e.set_defaults(fn=cmd_eval)

    b = sub.add_parser("bench", help="time the selected backend's ops against their float peers")
    b.add_argument("--backend", choices=["auto", "reference", "cpu", "triton", "cuda"],
                   help="the backend timed; reference and cpu run the CPU suite, also on a GPU machine")
    b.add_argument("--m", type=_positive_ints, help="comma-separated M values (CPU suite only)")
    b.add_argument("--nk", type=_shapes, help="comma-separated NxK shapes, e.g. 4096x4096 (CPU suite only)")
    b.add_argument("--quick", action="store_true", help="a small subset")
    b.add_argument("--cpu", action="store_true", help="the CPU suite even when a GPU is present")
    b.add_argument("--plot", action="store_true", help="draw the GPU results to a PNG (GPU suite only)")
    b.add_argument("--out", default="bench/results")
    b.add_argument("--flush", choices=("read", "write"),
                   help="GPU suite only: the L2 flush before each timed call: read do_bench's buffer (default; "
                        "leaves the L2 clean) or write it (do_bench's own; the write-back is billed to the call)")
    b.set_defaults(fn=cmd_bench)

    t = sub.add_parser("tune", help="time every backend per op and M-bucket on this GPU; write the auto table")
    t.add_argument("--ops", nargs="+", help="ops to tune (default: all)")
    t.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    t.add_argument("--mode", choices=("eager", "kernel"), default="eager",
                   help="eager: back-to-back eager calls, launch cost included (default); "
                        "kernel: do_bench with the L2 flushed, the kernels alone (as under CUDA graphs)")
    t.set_defaults(fn=cmd_tune)

    bl = sub.add_parser("build", help="build the C++ (--cpu) and/or CUDA (--cuda) extension, print its path")
    bl.add_argument("--cpu", action="store_true")
    bl.add_argument("--cuda", action="store_true")
    bl.add_argument("--verbose", action="store_true")
    bl.add_argument("--clean", action="store_true",
                    help="remove the just-in-time builds of other sources (or another torch / Python) from the "
                         "build cache; with --cpu / --cuda, build after")
    bl.set_defaults(fn=cmd_build)
    return p


def main(argv=None) -> int:
    """Run one command. Bad arguments, files or configs, and a GPU command on a machine without a GPU,
    end it with status 2 and one line on stderr, `ptqrt <cmd>: error: ...`, as argparse's own usage
    errors do (PTQRT_DEBUG=1: the traceback). The checks are the callees' own (tune.tune,
    bench_gpu.run_gpu_bench, ...): a Python caller gets the same refusals."""
    from .bench_gpu import NoCudaDevice

    p = parser()
    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, OSError, NoCudaDevice) as e:  # FormatError is a ValueError
        if os.environ.get("PTQRT_DEBUG") == "1":  # the whole traceback, for a bug report
            raise
        msg = " ".join(str(e).split())
        p.exit(2, f"ptqrt {a.cmd}: error: {msg}\n")


if __name__ == "__main__":
    sys.exit(main())
