"""Finds or builds ptqrt's C++ (csrc/cpu) and CUDA (csrc/cuda) extensions.

Order: an ahead-of-time build installed with the package (``PTQRT_BUILD_EXT=1 pip install .`` gives
``ptqrt._C_cpu`` / ``ptqrt._C_cuda``), else a just-in-time ninja build into a cache folder keyed by a
hash of the sources, flags and torch version. A file lock makes concurrent processes wait for one
build; a folder without its completion marker (a crash mid-build), or whose library no longer has
the size and SHA-256 the marker recorded (truncated or damaged since: loading it could kill the
process with SIGBUS), is wiped and rebuilt. A failed build prints one message, with the compiler's
first error, and returns None, so the `auto` backend falls back to `reference`.

Each digest gets its own folder, so a change of sources, flags, torch or Python leaves the old one
behind: `clean_cache` (`ptqrt build --clean`) removes every build but the current sources'.

The compiled libraries register their ops with TORCH_LIBRARY under ``ptqrt_cpu`` / ``ptqrt_cuda``.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import importlib
import json
import os
import re
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch

KINDS = ("cpu", "cuda")
_loaded: dict = {}

CPU_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]  # -std comes from torch (c++17 or c++20, as its headers need)
CPU_LDFLAGS = ["-fopenmp"]
CUDA_GENCODE = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
# No -std here: torch adds the C++ standard its own headers need (recent torch requires C++20).
# The .cu files are torch-free and compile as C++17 under nvcc.
CUDA_CFLAGS = ["-O3"]
CUDA_NVCCFLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", *CUDA_GENCODE]


def csrc_dir() -> Path:
    """csrc/ of a source checkout or editable install, else the copy shipped inside the wheel."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "csrc", here / "_csrc"):
        if cand.is_dir():
            return cand
    return here.parent / "csrc"


def sources(kind: str) -> list[Path]:
    root = csrc_dir() / kind
    pats = ["*.cpp"] if kind == "cpu" else ["*.cpp", "*.cu"]
    return sorted(Path(p) for pat in pats for p in glob.glob(str(root / pat)))


def headers(kind: str) -> list[Path]:
    """Headers that can change the `kind` build: its own folder's (recursively) and csrc/'s top level."""
    root = csrc_dir()
    pats = ("*.h", "*.cuh", "*.hpp")
    own = [p for pat in pats for p in glob.glob(str(root / kind / "**" / pat), recursive=True)]
    top = [p for pat in pats for p in glob.glob(str(root / pat))]
    return sorted(Path(p) for p in own + top)


def nvidia_includes() -> list[str]:
    """Headers of pip's nvidia-* packages (site-packages/nvidia/*/include), for a CUDA build on a
    machine that has CUDA torch and nvcc but no system CUDA toolkit headers beside nvcc."""
    out = []
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}:
        out += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted(set(out))


def cuda_unavailable_reason() -> Optional[str]:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    from torch.utils import cpp_extension
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or cpp_extension.CUDA_HOME
    nvcc = shutil.which("nvcc") or (home and os.path.join(home, "bin", "nvcc"))
    if not nvcc or not os.path.exists(nvcc):
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _flags(kind: str) -> dict:
    if kind == "cpu":
        return dict(extra_cflags=CPU_CFLAGS, extra_ldflags=CPU_LDFLAGS, extra_include_paths=[str(csrc_dir())])
    inc = [str(csrc_dir()), *nvidia_includes()]
    return dict(extra_cflags=CUDA_CFLAGS, extra_cuda_cflags=CUDA_NVCCFLAGS, extra_include_paths=inc)


def _digest(kind: str) -> str:
    h = hashlib.sha256()
    for p in sources(kind) + headers(kind):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(repr(_flags(kind)).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("PTQRT_CACHE_DIR", Path.home() / ".cache" / "ptqrt")) / "ext"


def lib_name(kind: str) -> str:
    return f"ptqrt_{kind}_ext"


def _in_checkout() -> bool:
    """Whether the sources are a checkout's csrc/ (beside the package), not a wheel's shipped _csrc/."""
    return csrc_dir() == Path(__file__).resolve().parent.parent / "csrc"


def _aot(kind: str) -> Optional[str]:
    """The ahead-of-time build's path, loaded; None where there is none, or, in a source checkout,
    where a source is newer than it (an in-place build whose csrc/ was edited since: the just-in-time
    build of the current sources is used instead, and this says so). Checked before the import, which
    would register the stale library's ops for good. A wheel's library and its shipped _csrc/ are not
    compared: pip writes the sources after the library, so they are always newer."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(f"ptqrt._C_{kind}")
    except ImportError:
        return None
    if spec is None or not spec.origin:
        return None
    built = os.path.getmtime(spec.origin)
    newer = [p for p in sources(kind) + headers(kind) if p.stat().st_mtime > built] if _in_checkout() else []
    if newer:
        warnings.warn(f"ptqrt: the ahead-of-time {kind} extension {spec.origin} is older than {newer[0]}"
                      f"{f' and {len(newer) - 1} more sources' if len(newer) > 1 else ''}; using a just-in-time "
                      f"build of the current sources instead", RuntimeWarning, stacklevel=3)
        return None
    try:
        return importlib.import_module(f"ptqrt._C_{kind}").__file__
    except ImportError:
        return None


def _fingerprint(so: Path) -> dict:
    h = hashlib.sha256()
    with open(so, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"library": so.name, "bytes": so.stat().st_size, "sha256": h.hexdigest()}


def _finished(so: Path, done: Path) -> bool:
    """Whether `done` marks a finished build whose library is still the one it recorded (a marker
    from before fingerprints, or a library truncated or damaged since, is not)."""
    if not (done.exists() and so.exists()):
        return False
    try:
        recorded = json.loads(done.read_text())
    except ValueError:
        return False
    return isinstance(recorded, dict) and recorded.get("bytes") == so.stat().st_size and recorded == _fingerprint(so)


def _lock_path(build_dir: Path) -> Path:
    return build_dir.with_name(build_dir.name + ".lock")


def _open_lock(path: Path):
    """The lock file at `path`, opened for flock (created if absent; a symbolic link is refused)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666), "w")


def _acquire(path: Path, f, blocking: bool = True):
    """flock `f`, the lock file opened at `path`; returns the locked file, or None (f closed) where
    blocking=False and another process holds the lock. clean_cache unlinks a lock file while holding
    it, so a process that waited on it wakes holding a lock nobody else can see: it then opens and
    locks the file now at `path` instead, so two processes never hold "the" lock of one folder."""
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            f.close()
            return None
        try:
            now = os.stat(path, follow_symlinks=False)
            held = os.fstat(f.fileno())
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return f
        except FileNotFoundError:
            pass
        f.close()
        f = _open_lock(path)


def _jit(kind: str, verbose: bool, allow_build: bool = True) -> str:
    """Build (or reuse) the extension in the cache under a file lock; return the library's path.
    allow_build=False only loads a finished build of these sources (PTQRT_NO_BUILD=1) and raises if
    there is none. torch.utils.cpp_extension is imported only to build: on a machine without CUDA its
    import logs a warning, which a run that only loads a finished CPU build should not print."""
    srcs = sources(kind)
    if not srcs:
        raise FileNotFoundError(f"no sources under {csrc_dir() / kind}")
    build_dir = cache_root() / f"{kind}-{_digest(kind)}"
    so, done = build_dir / f"{lib_name(kind)}.so", build_dir / "BUILD_OK"
    if allow_build:
        if kind == "cuda":
            why = cuda_unavailable_reason()
            if why:
                raise RuntimeError(f"the CUDA extension cannot be built: {why}")
            if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
                from torch.utils import cpp_extension

                os.environ["CUDA_HOME"] = "/usr/local/cuda"
                cpp_extension.CUDA_HOME = "/usr/local/cuda"
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        build_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = _lock_path(build_dir)
    try:
        lock = _open_lock(lock_path)
    except OSError:
        if allow_build and not _finished(so, done):
            raise
        lock = None  # a read-only (or absent) cache: nobody builds there either; a finished build is used
    try:
        if lock is not None:
            lock = _acquire(lock_path, lock)  # one builder at a time; the others wait, then reuse its result
        if _finished(so, done):
            torch.ops.load_library(str(so))
        elif not allow_build:
            raise RuntimeError(f"PTQRT_NO_BUILD=1 forbids a just-in-time build, and {build_dir} holds no "
                               "finished build of these sources")
        else:
            shutil.rmtree(build_dir, ignore_errors=True)  # stale, half-written or damaged: start clean
            build_dir.mkdir(parents=True)
            os.environ.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))
            from torch.utils import cpp_extension

            cpp_extension.load(name=lib_name(kind), sources=[str(s) for s in srcs],
                               build_directory=str(build_dir), is_python_module=False,
                               verbose=verbose, **_flags(kind))
            done.write_text(json.dumps(_fingerprint(so)))
    finally:
        if lock is not None and not lock.closed:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
    return str(so)


_BUILD_NAME = re.compile(rf"({'|'.join(KINDS)})-[0-9a-f]{{16}}")


class Cleaned(NamedTuple):
    """What clean_cache did: folders removed, folders skipped because a process holds their lock (a
    build, or a load, in progress), and the bytes the removed ones held."""

    removed: list[Path]
    busy: list[Path]
    freed: int


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (a symbolic link counts as itself: os.walk follows none)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def clean_cache(keep_current: bool = True) -> Cleaned:
    """Remove the just-in-time builds in cache_root() that the current sources no longer use: every
    folder named `cpu-<16 hex>` or `cuda-<16 hex>` with its `.lock` file (and a `.lock` file left
    without its folder), except, with keep_current, the folders of the current digests of both kinds.
    Builds for another torch or Python (a second environment sharing the cache) count as stale: that
    environment rebuilds on its next use. Nothing else is touched: other names, symbolic links and
    plain files stay, and nothing outside cache_root() is followed. Each folder's lock is taken without
    waiting first; a folder whose lock another process holds is left and reported in `busy`."""
    root = cache_root()
    if not root.is_dir():
        return Cleaned([], [], 0)
    keep = {f"{k}-{_digest(k)}" for k in KINDS} if keep_current else set()
    stems = {p.name[: -len(".lock")] if p.name.endswith(".lock") else p.name for p in root.iterdir()}
    removed, busy, freed = [], [], 0
    for stem in sorted(s for s in stems if _BUILD_NAME.fullmatch(s) and s not in keep):
        folder, lock_path = root / stem, _lock_path(root / stem)
        if (folder.is_symlink() or lock_path.is_symlink() or (folder.exists() and not folder.is_dir())
                or (lock_path.exists() and not lock_path.is_file())):
            continue  # not what _jit makes: left alone
        lock = _acquire(lock_path, _open_lock(lock_path), blocking=False)
        if lock is None:
            busy.append(folder)
            continue
        try:
            if folder.is_dir():
                size = _tree_bytes(folder)
                shutil.rmtree(folder)
                freed += size
                removed.append(folder)
            else:
                removed.append(lock_path)  # a lock file whose folder is gone
            os.unlink(lock_path)  # while still holding it: see _acquire
        finally:
            lock.close()
    return Cleaned(removed, busy, freed)


def build(kind: str, verbose: bool = False) -> str:
    """Build (or find) the extension and load it; return its shared library's path. Raises on failure."""
    if kind not in KINDS:
        raise ValueError(f"extension kind must be one of {KINDS}; got {kind!r}")
    if _loaded.get(kind):  # a library registers its ops once per process: never load a second copy
        return _loaded[kind]
    path = _aot(kind) or _jit(kind, verbose)
    _loaded[kind] = path
    return path


def load(kind: str) -> Optional[str]:
    """Path of the loaded extension, building it on first use; None (said once) if it cannot be had.

    PTQRT_NO_BUILD=1 never builds just in time: ahead-of-time builds and finished just-in-time builds
    of the same sources in the cache still load."""
    if kind in _loaded:
        return _loaded[kind]
    path = None
    try:
        path = _aot(kind)
        if path is None and sources(kind):
            if kind == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("no CUDA device is visible")
            path = _jit(kind, verbose=False, allow_build=os.environ.get("PTQRT_NO_BUILD", "0") != "1")
    except Exception as e:  # noqa: BLE001 -- any build failure means: fall back, say why once
        warnings.warn(f"ptqrt: the {kind} extension is unavailable ({_first_error(e)}); falling back to the next "
                      f"backend. Run `ptqrt build --{kind}` to see the full build log.", RuntimeWarning, stacklevel=3)
        path = None
    _loaded[kind] = path
    return path


def _first_error(e: Exception) -> str:
    """The line of a failure that says what went wrong: a build's message starts with ninja's command
    lines, so the compiler's (or linker's) first error line is taken where there is one."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    for ln in lines[1:]:
        if re.search(r"(^|[\s:])(fatal )?error\b", ln, re.IGNORECASE) and not ln.startswith("FAILED:"):
            return ln[:300]
    return lines[0][:300]
