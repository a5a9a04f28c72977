"""The `auto` dispatch table: which backend runs each op per M-bucket on a given GPU.

`ptqrt tune` measures every backend and writes one JSON file per GPU name into the table folder
($PTQRT_TABLE_DIR, default ~/.cache/ptqrt/tables). Without one, a table tuned for that GPU name and
shipped in ptqrt/data/tables/ is used, else the default ptqrt/data/dispatch_default.json.
Format: {"device": name, "ops": {op: {bucket: backend}}}. A file that cannot be read, or is not a table
for this GPU (`check_table`: device name, op names, M-bucket keys, backend names), is skipped with one
warning, and the next in that order is used.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

DEFAULT = Path(__file__).parent / "data" / "dispatch_default.json"
SHIPPED = Path(__file__).parent / "data" / "tables"
# Backends a table may name: those that run CUDA tensors ("reference" when neither compiled one loaded).
TABLE_BACKENDS = ("triton", "cuda", "reference")


class TableError(ValueError):
    """A dispatch table file that cannot be used: the message names the file and what is wrong."""


def table_dir() -> Path:
    return Path(os.environ.get("PTQRT_TABLE_DIR", Path.home() / ".cache" / "ptqrt" / "tables"))


def _file_name(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", device_name).strip("_") + ".json"


def table_path(device_name: str) -> Path:
    return table_dir() / _file_name(device_name)


def shipped_path(device_name: str) -> Path:
    return SHIPPED / _file_name(device_name)


def current_gpu_name(device: int | None = None) -> str | None:
    """The name of the GPU of this index (None: the current one), or None without CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return None


def check_table(data, device_name: str | None) -> str | None:
    """What is wrong with a parsed table file, or None when `_auto_chain` can read it for `device_name`
    (None: any device, as for the shipped default): a dict {"device": name, "ops": {op: {bucket: backend}}}
    with known op names, the bucket keys of ops.M_BUCKETS and backend names a CUDA tensor can use."""
    from . import ops

    if not isinstance(data, dict) or not isinstance(data.get("ops"), dict):
        return 'not a JSON object with an "ops" object'
    if device_name is not None and data.get("device") != device_name:
        return f"it was tuned for device {data.get('device')!r}, not this GPU ({device_name!r})"
    buckets = {str(b) for b in ops.M_BUCKETS}
    for op, row in data["ops"].items():
        if op not in ops.OP_NAMES:
            return f"unknown op {op!r} (ops: {', '.join(ops.OP_NAMES)})"
        if not isinstance(row, dict):
            return f"ops[{op!r}] is {type(row).__name__}, not an object {{bucket: backend}}"
        for b, backend in row.items():
            if b not in buckets:
                return f"ops[{op!r}] has the unknown M-bucket {b!r} (buckets: {', '.join(sorted(buckets, key=int))})"
            if backend not in TABLE_BACKENDS:
                return f"ops[{op!r}][{b!r}] is {backend!r}, not one of {', '.join(TABLE_BACKENDS)}"
    return None


def read_table(path: Path, device_name: str | None) -> dict:
    """{op: {bucket: backend}} of the table file at `path`; TableError naming the file and what is wrong."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TableError(f"dispatch table {path} cannot be read ({e})") from None
    problem = check_table(data, device_name)
    if problem:
        raise TableError(f"dispatch table {path} is unusable: {problem}")
    return data["ops"]


def load_table(tuned: bool = True, replacing: bool = False, device: int | None = None) -> dict:
    """{op: {bucket (str): backend}} for the current GPU (or the one of CUDA index `device`): tuned here
    if present (and `tuned`), else shipped for this GPU name, else the shipped default, else {} (the
    built-in order, triton first). A
    file that cannot be read, or is not a table for this GPU (`check_table`), is skipped with one
    warning naming it and what is wrong; the next in that order is used. An op or bucket the table
    lacks takes the built-in order.

    replacing=True is `ptqrt tune`'s read, just before it writes this GPU's tuned table: an unusable
    tuned table is said to be replaced, at every call (not once per process)."""
    name = current_gpu_name() if device is None else current_gpu_name(device)  # (device: a CUDA index)
    mine = table_path(name) if name and tuned else None
    candidates = ([(mine, name)] if mine else []) + ([(shipped_path(name), name)] if name else [])
    for path, table_device in candidates + [(DEFAULT, None)]:
        try:
            found = path.is_file()
        except OSError:  # a folder it may not search (is_file raises then): read_table says so below
            found = True
        if found:
            try:
                return read_table(path, table_device)
            except TableError as e:
                if replacing and path == mine:
                    warnings.warn(f"ptqrt.tune: {e}; replacing it (the ops not timed now take the shipped table's "
                                  f"choice)", RuntimeWarning, stacklevel=4)
                    continue
                from . import ops

                msg = f"ptqrt: {e}; using the next table (rerun `ptqrt tune` to replace it)"
                ops._warn_once(("table", msg), msg, stacklevel=3)
    return {}


def write_table(device_name: str, ops: dict, extra: dict | None = None) -> Path:
    path = table_path(device_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"device": device_name, "ops": ops, **(extra or {})}, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path
