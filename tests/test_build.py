"""The just-in-time build of the C++ CPU extension: file lock, stale builds, failure fallback."""
import os
import subprocess
import sys
import textwrap

import pytest

from ptqrt import _build

LOAD = textwrap.dedent("""
    import torch, ptqrt
    from ptqrt import _build, ops
    path = _build.load("cpu")
    assert path, "the cpu extension did not load"
    x = torch.randn(3, 40)
    q, s = ops.quantize_per_token(x)
    assert ops.backend_for("quantize_per_token", "cpu") == "cpu"
    print(path)
""")


def _env(cache):
    return {**os.environ, "PTQRT_CACHE_DIR": str(cache), "MAX_JOBS": "2", "PTQRT_BACKEND": "auto"}


@pytest.mark.skipif(not _build.sources("cpu"), reason="no C++ sources")
def test_two_processes_build_at_once_over_a_stale_half_written_build(tmp_path):
    cache = tmp_path / "cache"
    # A build folder as a crash mid-build leaves it: a truncated library and no completion marker.
    stale = cache / "ext" / f"cpu-{_build._digest('cpu')}"
    stale.mkdir(parents=True)
    (stale / f"{_build.lib_name('cpu')}.so").write_bytes(b"\x7fELF half written")
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], env=_env(cache), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert outs[0][0].strip() == outs[1][0].strip()
    assert (stale / "BUILD_OK").exists()
    # PTQRT_NO_BUILD=1 still loads that finished build; over an empty cache it falls back, saying why.
    env = {**_env(cache), "PTQRT_NO_BUILD": "1"}
    out = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == outs[0][0].strip(), out.stderr[-3000:]
    env = {**_env(tmp_path / "empty"), "PTQRT_NO_BUILD": "1"}
    out = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "holds no finished build" in out.stderr, out.stderr[-3000:]


def test_failed_build_falls_back_to_reference_with_one_message(tmp_path):
    bad = tmp_path / "csrc" / "cpu"
    bad.mkdir(parents=True)
    (bad / "broken.cpp").write_text("this is not C++;\n")
    code = textwrap.dedent(f"""
        import warnings, torch
        from pathlib import Path
        from ptqrt import _build, ops
        _build.csrc_dir = lambda: Path({str(tmp_path / 'csrc')!r})
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            q, s = ops.quantize_per_token(torch.randn(2, 8))
            q, s = ops.quantize_per_token(torch.randn(2, 8))
        msgs = [str(x.message) for x in w if "extension is unavailable" in str(x.message)]
        assert len(msgs) == 1, msgs
        assert "broken.cpp" in msgs[0] and "error" in msgs[0], msgs  # the compiler's error, not ninja's command
        assert ops.backend_for("quantize_per_token", "cpu") == "reference"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path / "cache"), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_cuda_build_is_skipped_with_a_reason_without_nvcc(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    reason = _build.cuda_unavailable_reason()
    assert reason and ("nvcc" in reason or "without CUDA" in reason), reason


def test_damaged_library_is_rebuilt_not_loaded(tmp_path):
    """A finished build whose library was truncated or overwritten since (its size or SHA-256 no
    longer the marker's) is rebuilt under the lock; loading it could kill the process (SIGBUS). A
    one-function source tree keeps the three builds quick."""
    src = tmp_path / "csrc" / "cpu"
    src.mkdir(parents=True)
    (src / "tiny.cpp").write_text('extern "C" int ptqrt_tiny() { return 7; }\n')
    code = textwrap.dedent(f"""
        import ctypes
        from pathlib import Path
        from ptqrt import _build
        _build.csrc_dir = lambda: Path({str(tmp_path / 'csrc')!r})
        path = _build._jit("cpu", verbose=False)
        print(path, ctypes.CDLL(path).ptqrt_tiny())
    """)

    def run():
        out = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path / "cache"), capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        path, value = out.stdout.split()
        assert value == "7"
        return path

    so = run()
    size, original = os.path.getsize(so), open(so, "rb").read()
    with open(so, "r+b") as f:  # truncated: half the library
        f.truncate(size // 2)
    assert run() == so and open(so, "rb").read() == original
    with open(so, "r+b") as f:  # damaged in place: the same size, other bytes
        f.seek(size // 2)
        f.write(b"\0" * 64)
    assert run() == so and os.path.getsize(so) == size


def test_stale_ahead_of_time_build_gives_way(tmp_path, monkeypatch):
    """In a checkout, an ahead-of-time library older than a source (built in place, csrc/ edited
    since) is not imported: the just-in-time build of the current sources is used, with a warning. A
    wheel's (pip writes its shipped sources after the library) is used whatever the times."""
    import importlib.machinery
    import importlib.util
    import time

    src = tmp_path / "csrc" / "cpu"
    src.mkdir(parents=True)
    (src / "a.cpp").write_text("int a;\n")
    lib = tmp_path / "_C_cpu.so"
    lib.write_bytes(b"not loaded")
    spec = importlib.machinery.ModuleSpec("ptqrt._C_cpu", None, origin=str(lib))
    monkeypatch.setattr(_build, "csrc_dir", lambda: tmp_path / "csrc")
    monkeypatch.setattr(_build, "_in_checkout", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == "ptqrt._C_cpu" else None)
    imported = []

    def import_module(name):
        imported.append(name)
        return type("Module", (), {"__file__": str(lib)})

    monkeypatch.setattr(_build.importlib, "import_module", import_module)
    old = time.time() - 100
    os.utime(lib, (old, old))
    with pytest.warns(RuntimeWarning, match="older than .*a.cpp"):
        assert _build._aot("cpu") is None
    assert imported == []
    new = time.time() + 100  # built after every source: used
    os.utime(lib, (new, new))
    assert _build._aot("cpu") == str(lib) and imported == ["ptqrt._C_cpu"]
    monkeypatch.setattr(_build, "_in_checkout", lambda: False)  # a wheel: times are not compared
    os.utime(lib, (old, old))
    assert _build._aot("cpu") == str(lib)
