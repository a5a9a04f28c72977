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


# ----------------------------------------------------------------------------- ptqrt build --clean
def _fake_build(root, name, nbytes=1000):
    """A build folder as _jit leaves one: the library, its marker, and the lock file beside it."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / f"{name.split('-')[0]}.so").write_bytes(b"x" * nbytes)
    (folder / "BUILD_OK").write_text("")
    (root / f"{name}.lock").touch()
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty temporary build cache with a finished build of the current sources of each kind."""
    monkeypatch.setenv("PTQRT_CACHE_DIR", str(tmp_path / "cache"))
    root = _build.cache_root()
    root.mkdir(parents=True)
    current = [_fake_build(root, f"{kind}-{_build._digest(kind)}") for kind in _build.KINDS]
    return root, current


def test_clean_removes_stale_builds_and_keeps_current_and_foreign_ones(cache, tmp_path):
    root, current = cache
    stale = [_fake_build(root, "cpu-0123456789abcdef", 3000), _fake_build(root, "cuda-fedcba9876543210", 5000)]
    (root / "cpu-aaaaaaaaaaaaaaaa.lock").touch()  # a lock file left without its folder
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.so").write_bytes(b"y" * 100)
    foreign = [root / "cpu-0123456789ABCDEF", root / "cpu-0123456789abcdef0", root / "rocm-0123456789abcdef",
               root / "cpu-0123456789abcde", root / "other"]
    for f in foreign:
        f.mkdir()
        (f / "data").write_bytes(b"z")
    (root / "notes.txt").write_text("mine")
    (root / "cuda-1111111111111111").write_text("a file, not a build folder")
    (root / "cpu-2222222222222222").symlink_to(outside, target_is_directory=True)  # never followed
    (root / "cpu-3333333333333333.lock").symlink_to(outside / "keep.so")

    done = _build.clean_cache()
    assert sorted(done.removed) == sorted(stale + [root / "cpu-aaaaaaaaaaaaaaaa.lock"])
    assert done.busy == [] and done.freed == 3000 + 5000  # the markers are empty
    assert not any(p.exists() for p in stale) and not (root / "cpu-0123456789abcdef.lock").exists()
    assert not (root / "cpu-aaaaaaaaaaaaaaaa.lock").exists()
    for folder in current:
        assert (folder / "BUILD_OK").exists() and (root / f"{folder.name}.lock").exists()
    assert all((f / "data").exists() for f in foreign) and (root / "notes.txt").exists()
    assert (root / "cuda-1111111111111111").is_file() and (root / "cpu-2222222222222222").is_symlink()
    assert (root / "cpu-3333333333333333.lock").is_symlink() and (outside / "keep.so").read_bytes() == b"y" * 100
    assert _build.clean_cache() == ([], [], 0)
    # keep_current=False: the current builds go too.
    assert sorted(_build.clean_cache(keep_current=False).removed) == sorted(current)


def test_clean_skips_a_build_whose_lock_is_held(cache):
    """A folder whose lock another process holds (a build or load in progress) is left, reported busy.
    flock locks belong to an open file description, so a second open here conflicts like another process."""
    import fcntl

    root, _ = cache
    busy = _fake_build(root, "cpu-0123456789abcdef")
    stale = _fake_build(root, "cuda-0123456789abcdef")
    with open(root / f"{busy.name}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        done = _build.clean_cache()
        assert done.removed == [stale] and done.busy == [busy]
        assert (busy / "BUILD_OK").exists() and (root / f"{busy.name}.lock").exists()
    assert _build.clean_cache().removed == [busy]


def test_clean_skips_a_build_locked_by_another_process(cache):
    root, _ = cache
    busy = _fake_build(root, "cpu-0123456789abcdef")
    code = ("import fcntl, sys, time\nf = open(sys.argv[1], 'w')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(root / f"{busy.name}.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert _build.clean_cache().busy == [busy] and busy.exists()
    finally:
        holder.kill()
        holder.wait()
    assert _build.clean_cache().removed == [busy]


def test_a_lock_removed_by_clean_while_waited_on_is_taken_afresh(tmp_path):
    """clean_cache unlinks a lock file while it holds it; a builder that was waiting on that file then
    holds a lock no newcomer sees, so it locks the file now at the path instead (two builders in one
    folder otherwise)."""
    import fcntl
    import threading

    path = tmp_path / "cpu-0123456789abcdef.lock"
    cleaner = _build._open_lock(path)
    fcntl.flock(cleaner, fcntl.LOCK_EX)
    got = []
    waiter = threading.Thread(target=lambda: got.append(_build._acquire(path, _build._open_lock(path))))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # waiting on the cleaner's lock
    os.unlink(path)
    cleaner.close()
    waiter.join(10)
    lock = got[0]
    try:
        assert os.fstat(lock.fileno()).st_ino == os.stat(path).st_ino  # the file at the path, locked
        newcomer = _build._acquire(path, _build._open_lock(path), blocking=False)
        assert newcomer is None  # so a newcomer waits for it
    finally:
        lock.close()


def test_a_finished_build_in_a_cache_it_cannot_write_is_used(monkeypatch):
    """A read-only cache (a shared, prebuilt one): the lock cannot be opened for writing. A finished build
    of these sources there is loaded (it was refused unless PTQRT_NO_BUILD=1); with none, the error stays."""
    path = _build.load("cpu")
    if path is None:
        pytest.skip("the cpu extension is unavailable here")

    def read_only(p):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(_build, "_open_lock", read_only)
    assert _build._jit("cpu", verbose=False) == path
    monkeypatch.setattr(_build, "_finished", lambda so, done: False)
    with pytest.raises(PermissionError):
        _build._jit("cpu", verbose=False)
