"""Compile the Triton kernels for a GPU architecture ahead of time, on a machine without a GPU.

    TRITON_INTERPRET=0 python -m ptqrt.kernels.compile_check [--arch 90] [--all] [--sass]

The interpreter that runs the kernels in CI does not check what only the GPU compiler checks:
tl.dot's minimum tile sizes and operand types, int8 MMA layouts, constexpr typing, shared memory per
config. This builds each kernel to a cubin with Triton's bundled ptxas (default launch configs, or
every autotune config with --all) for sm_<arch>, prints shared memory per config and flags any
config over the architecture's limit; --sass also counts the instructions that tell whether the
fast paths were taken (IMMA/HMMA/HGMMA tensor-core ops, I2F conversions, 16-byte loads,
cp.async, local-memory spills). --dump DIR writes each build's SASS, one instruction a line
without addresses or encodings, so a refactor can be checked to leave the machine code unchanged
(`diff -r` two dumps). Exit status 1 if anything failed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

# Shared memory a block may use (bytes): sm_80 163 KB, sm_90 227 KB.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class Ptr:
    def __init__(self, dtype: str):
        self.dtype = dtype


class Desc:
    """A host TensorDescriptor argument: element type and box shape."""

    def __init__(self, dtype: str, block: list):
        self.dtype, self.block = dtype, block


def _source(fn, args: dict):
    """ASTSource for fn from {arg name: Ptr | runtime int/float | constexpr value}, specialized as a
    launch would be: pointers and ints divisible by 16 carry tt.divisibility."""
    import triton

    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name, val = param.name, args[param.name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = val
        elif isinstance(val, Ptr):
            signature[name] = "*" + val.dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(val, Desc):
            signature[name] = f"tensordesc<{val.dtype}[{','.join(map(str, val.block))}]>"
        elif isinstance(val, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if val % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _rt(**kw):
    return kw


def _jobs(all_configs: bool):
    """(label, jit fn, args, options) for every kernel variant to build."""
    import triton
    import triton.language as tl

    # The package's attributes named after the ops are the launchers; the modules come from importlib.
    kv_cache, quantize, w8a8_gemm, w8a16_gemm = (importlib.import_module(f"{__package__}.{m}")
                                                 for m in ("kv_cache", "quantize", "w8a8_gemm", "w8a16_gemm"))

    def opts(cfg):
        return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    jobs = []
    # --- quantize
    for k, one_pass in ((8192, True), (32768, False)):
        bk = triton.next_power_of_2(k) if one_pass else 4096
        for smooth in (False, True):
            jobs.append((f"quantize_per_token K={k} smooth={smooth}", quantize._quantize_per_token_kernel,
                         _rt(x_ptr=Ptr("fp16"), smooth_ptr=Ptr("fp16"), q_ptr=Ptr("i8"), s_ptr=Ptr("fp32"), M=8192,
                             K=k, stride_xm=k, stride_qm=k, HAS_SMOOTH=smooth, ONE_PASS=one_pass, BLOCK_M=1,
                             BLOCK_K=bk), dict(num_warps=quantize._warps(bk), num_stages=3)))
    jobs.append(("quantize_per_tensor", quantize._quantize_per_tensor_kernel,
                 _rt(x_ptr=Ptr("bf16"), smooth_ptr=Ptr("bf16"), scale_ptr=Ptr("fp32"), q_ptr=Ptr("i8"), M=8192,
                     K=8192, stride_xm=8192, stride_qm=8192, HAS_SMOOTH=True, BLOCK_M=8, BLOCK_K=1024),
                 dict(num_warps=16, num_stages=3)))

    # --- w8a8
    def w8a8_gemm_job(cfg, k, out, bias, per_token=True):
        c = dict(cfg.kwargs)
        return (f"w8a8_gemm {c} w{cfg.num_warps}s{cfg.num_stages} K={k} out={out}", w8a8_gemm._w8a8_gemm_kernel,
                _rt(a_ptr=Ptr("i8"), b_ptr=Ptr("i8"), c_ptr=Ptr(out), xs_ptr=Ptr("fp32"), ws_ptr=Ptr("fp32"),
                    bias_ptr=Ptr("bf16"), M=4096, N=4096, K=k, stride_am=k, stride_bn=k, stride_cm=4096,
                    M_BUCKET=4096, PER_TOKEN=per_token, HAS_BIAS=bias, OUT_INT32=out == "i32",
                    EVEN_K=k % c["BLOCK_K"] == 0, **c),
                dict(opts(cfg), enable_fp_fusion=False))

    gemm_cfgs = ([c for cs in w8a8_gemm.GEMM_CONFIGS.values() for c in cs] if all_configs
                 else list(w8a8_gemm.GEMM_DEFAULT.values()))
    for cfg in _unique(gemm_cfgs):
        jobs.append(w8a8_gemm_job(cfg, 4096, "fp16", False))
    d = w8a8_gemm.GEMM_DEFAULT[1 << 62]
    jobs += [w8a8_gemm_job(d, 4100, "bf16", True, False), w8a8_gemm_job(d, 4096, "i32", False),
             w8a8_gemm_job(d, 4096, "fp32", True)]

    def w8a8_tma_job(cfg, out, bias, per_token=True):
        c = dict(cfg.kwargs)
        return (f"w8a8_gemm_tma {c} w{cfg.num_warps}s{cfg.num_stages} out={out}", w8a8_gemm._w8a8_gemm_tma_kernel,
                _rt(a_desc=Desc("i8", [c["BLOCK_M"], c["BLOCK_K"]]), b_desc=Desc("i8", [c["BLOCK_N"], c["BLOCK_K"]]),
                    c_ptr=Ptr(out), xs_ptr=Ptr("fp32"), ws_ptr=Ptr("fp32"), bias_ptr=Ptr("bf16"), M=4096, N=4096,
                    K=4096, stride_cm=4096, M_BUCKET=4096, PER_TOKEN=per_token, HAS_BIAS=bias,
                    OUT_INT32=out == "i32", NUM_SMS=132, **c),
                dict(opts(cfg), enable_fp_fusion=False))

    tma_cfgs = ([c for cs in w8a8_gemm.TMA_CONFIGS.values() for c in cs] if all_configs
                else list(w8a8_gemm.TMA_DEFAULT.values()))
    for cfg in _unique(tma_cfgs):
        jobs.append(w8a8_tma_job(cfg, "fp16", False))
    t = w8a8_gemm.TMA_DEFAULT[1 << 62]
    jobs.append(w8a8_tma_job(t, "bf16", True, False))  # (fp32 / int32 outputs take the pointer kernel)

    def w8a8_gemv_job(cfg, k, out):
        c = dict(cfg.kwargs)
        return (f"w8a8_gemv {c} w{cfg.num_warps}s{cfg.num_stages} K={k} out={out}", w8a8_gemm._w8a8_gemv_kernel,
                _rt(a_ptr=Ptr("i8"), b_ptr=Ptr("i8"), c_ptr=Ptr(out), xs_ptr=Ptr("fp32"), ws_ptr=Ptr("fp32"),
                    bias_ptr=Ptr("fp16"), part_ptr=Ptr("i32"), cnt_ptr=Ptr("i32"), M=3, N=4096, K=k, stride_am=k,
                    stride_bn=k, stride_cm=4096, M_BUCKET=4, PER_TOKEN=True, HAS_BIAS=True,
                    OUT_INT32=out == "i32", BLOCK_M=16, EVEN_K=k % c["BLOCK_K"] == 0, **c),
                dict(opts(cfg), enable_fp_fusion=False))

    gemv_cfgs = w8a8_gemm.GEMV_CONFIGS if all_configs else [triton.Config(
        dict(w8a8_gemm.GEMV_DEFAULT.kwargs, SPLIT_K=s), num_warps=4, num_stages=4) for s in (4, 1)]
    for cfg in gemv_cfgs:
        jobs.append(w8a8_gemv_job(cfg, 4096, "fp16"))
    jobs.append(w8a8_gemv_job(gemv_cfgs[-1], 4100, "i32"))

    # --- w8a16
    def w8a16_job(kernel, cfg, x, g, extra):
        cfg = w8a16_gemm.fit_config(cfg, g, x == "fp32")  # what the launcher would run
        c = dict(cfg.kwargs)
        k = 4096
        mode = 0 if g == 0 else (1 if g % c["BLOCK_K"] == 0 else 2)
        name = "w8a16_gemv" if kernel is w8a16_gemm._w8a16_gemv_kernel else "w8a16_gemm"
        args = dict(x_ptr=Ptr(x), w_ptr=Ptr("i8"), c_ptr=Ptr(x), s_ptr=Ptr("fp32"), bias_ptr=Ptr(x))
        args.update(extra)
        args.update(M=5 if "part_ptr" in extra else 4096, N=4096, K=k, G=g, NUM_GROUPS=(k // g) if g else 1,
                    stride_xm=k, stride_wn=k, stride_cm=4096, M_BUCKET=8, HAS_BIAS=True,
                    DOT_DTYPE={"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}[x],
                    SCALE_MODE=mode, EVEN_K=True, **c)
        return (f"{name} {c} w{cfg.num_warps}s{cfg.num_stages} x={x} g={g}", kernel,
                _rt(**args), opts(cfg))

    gemm16 = ([c for cs in w8a16_gemm.GEMM_CONFIGS.values() for c in cs] if all_configs
              else list(w8a16_gemm.GEMM_DEFAULT.values()))
    for cfg in _unique(gemm16):
        jobs.append(w8a16_job(w8a16_gemm._w8a16_gemm_kernel, cfg, "fp16", 0, {}))
    d16 = w8a16_gemm.GEMM_DEFAULT[1 << 62]
    jobs += [w8a16_job(w8a16_gemm._w8a16_gemm_kernel, d16, "bf16", 128, {}),
             w8a16_job(w8a16_gemm._w8a16_gemm_kernel, d16, "bf16", 32, {}),
             w8a16_job(w8a16_gemm._w8a16_gemm_kernel, d16, "fp16", 96, {}),
             w8a16_job(w8a16_gemm._w8a16_gemm_kernel, w8a16_gemm.GEMM_DEFAULT[64], "fp32", 0, {})]
    gemv16 = w8a16_gemm.GEMV_CONFIGS if all_configs else [triton.Config(
        dict(w8a16_gemm.GEMV_DEFAULT.kwargs, SPLIT_K=s), num_warps=4, num_stages=4) for s in (4, 1)]
    part = dict(part_ptr=Ptr("fp32"), cnt_ptr=Ptr("i32"), BLOCK_M=16)
    for cfg in gemv16:
        jobs.append(w8a16_job(w8a16_gemm._w8a16_gemv_kernel, cfg, "fp16", 0, part))
    for x, g in (("bf16", 256), ("bf16", 128), ("fp16", 64), ("fp16", 48), ("fp32", 0)):
        jobs.append(w8a16_job(w8a16_gemm._w8a16_gemv_kernel, gemv16[-1], x, g, part))

    # --- kv cache
    for dyn in (True, False):
        jobs.append((f"kv_cache_append dynamic={dyn}", kv_cache._kv_cache_append_kernel,
                     _rt(k_ptr=Ptr("fp16"), v_ptr=Ptr("fp16"), kc_ptr=Ptr("i8"), vc_ptr=Ptr("i8"), ks_ptr=Ptr("fp32"),
                         vs_ptr=Ptr("fp32"), slots_ptr=Ptr("i64"), NUM_SLOTS=65536, H=32, D=128, stride_kt=4096,
                         stride_vt=4096, DYNAMIC_K=dyn, DYNAMIC_V=dyn, BLOCK_H=32, BLOCK_D=128),
                     dict(num_warps=8, num_stages=3)))
    # dot: the tensor-core path (GQA, G > 1), pipelined at the launch's depth; G == 1 at depth 1.
    for q, group, dyn, splits in (("fp16", 1, True, 4), ("bf16", 1, False, 1), ("fp16", 4, True, 4),
                                  ("bf16", 8, False, 1), ("fp32", 4, True, 2)):
        dot = group > 1
        launch = dict(kv_cache.DECODE)
        warps, stages = launch.pop("num_warps"), launch.pop("num_stages")
        if dot:
            warps = kv_cache.DECODE_GQA_WARPS
        launch["PIPE_L"] = stages if dot else 1
        jobs.append((f"decode_partial q={q} G={group} dynamic={dyn} splits={splits} dot={dot}",
                     kv_cache._decode_partial_kernel,
                     _rt(q_ptr=Ptr(q), kc_ptr=Ptr("i8"), vc_ptr=Ptr("i8"), ks_ptr=Ptr("fp32"), vs_ptr=Ptr("fp32"),
                         bt_ptr=Ptr("i32"), lens_ptr=Ptr("i32"), out_ptr=Ptr(q), o_part_ptr=Ptr("fp32"),
                         lse_ptr=Ptr("fp32"), qk_scale=0.127, HQ=32, HKV=32 // group, D=128, NUM_BLOCKS=8192,
                         MAX_BLOCKS=256, stride_qb=4096, stride_btb=256, NUM_SPLITS=splits, GROUP=group,
                         BLOCK_SIZE=16, SINGLE_SPLIT=splits == 1, DYNAMIC_K=dyn, DYNAMIC_V=dyn, USE_DOT=dot,
                         DOT_DTYPE={"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}[q],
                         BLOCK_G=16 if dot else 1, BLOCK_D=128, **launch),
                     dict(num_warps=warps, num_stages=stages)))
    jobs.append(("decode_merge", kv_cache._decode_merge_kernel,
                 _rt(o_part_ptr=Ptr("fp32"), lse_ptr=Ptr("fp32"), out_ptr=Ptr("bf16"), D=128, NUM_SPLITS=16,
                     BLOCK_S=16, BLOCK_D=128), dict(num_warps=1, num_stages=1)))
    return jobs


def _unique(cfgs):
    seen, out = set(), []
    for c in cfgs:
        key = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


_SASS_OPS = ("HGMMA", "IGMMA", "IMMA", "HMMA", "I2F", "F2I", "LDG.E.128", "LDGSTS", "UTMALDG", "STL", "LDL", "MUFU.EX2")


def _sass(cubin: bytes) -> list[str]:
    """The cubin's instructions, one a line, without addresses and encodings."""
    from triton.backends.nvidia import compiler as nv

    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
    out = []
    for line in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if m:
            out.append(m.group(1))
    return out


def _sass_summary(instrs: list[str]) -> str:
    ops = Counter()
    for ins in instrs:
        m = re.match(r"(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", ins)
        if m:
            ops["instr"] += 1
            for op in _SASS_OPS:
                if m.group(1).startswith(op):
                    ops[op] += 1
    return " ".join(f"{k}={v}" for k, v in sorted(ops.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, action="append",
                    help="compute capability, e.g. 90 (repeatable; default 80 and 90)")
    ap.add_argument("--all", action="store_true", help="every autotune config, not only the defaults")
    ap.add_argument("--sass", action="store_true", help="count key SASS instructions per kernel")
    ap.add_argument("--quick", action="store_true", help="only the first variant of each kernel")
    ap.add_argument("--filter", default="", help="only jobs whose label contains this text")
    ap.add_argument("--dump", metavar="DIR", help="write each build's SASS to DIR/sm_<arch>/<label>.sass")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter has nothing to compile)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget

    failed = 0
    for arch in args.arch or [80, 90]:
        target = GPUTarget("cuda", arch, 32)
        built = set()
        for label, fn, kw, options in _jobs(args.all):
            if args.filter not in label or (args.quick and fn in built):
                continue
            built.add(fn)
            try:
                ck = triton.compile(_source(fn, dict(kw)), target=target, options=options)
            except Exception as e:  # report every failure, not only the first
                failed += 1
                msg = str(e).strip().splitlines()
                print(f"FAIL sm_{arch} {label}: {type(e).__name__}: {msg[-1] if msg else ''}")
                continue
            smem = ck.metadata.shared
            over = smem > SMEM_LIMIT.get(arch, 232448)
            failed += over
            instrs = _sass(ck.asm["cubin"]) if args.sass or args.dump else []
            if args.dump:
                folder = os.path.join(args.dump, f"sm_{arch}")
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, re.sub(r"[^A-Za-z0-9=._-]+", "_", label) + ".sass"), "w") as f:
                    f.write("\n".join(instrs) + "\n")
            extra = (" " + _sass_summary(instrs)) if args.sass else ""
            print(f"{'OVER' if over else 'ok  '} sm_{arch} smem={smem:6d} {label}{extra}")
    print(f"compile_check: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
