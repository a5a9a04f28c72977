"""The `auto` dispatch table: which backend runs each op per M-bucket on a given GPU.

`ptqrt tune` measures every backend and writes one JSON file per GPU name into the table folder
($PTQRT_TABLE_DIR, default ~/.cache/ptqrt/tables). Without one, a table tuned for that GPU name and
shipped in ptqrt/data/tables/ is used, else the default ptqrt/data/dispatch_default.json.
Format: {"device": name, "ops": {op: {bucket: backend}}}.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

DEFAULT = Path(__file__).parent / "data" / "dispatch_default.json"
SHIPPED = Path(__file__).parent / "data" / "tables"


def table_dir() -> Path:
    return Path(os.environ.get("PTQRT_TABLE_DIR", Path.home() / ".cache" / "ptqrt" / "tables"))


def _file_name(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", device_name).strip("_") + ".json"


def table_path(device_name: str) -> Path:
    return table_dir() / _file_name(device_name)


def shipped_path(device_name: str) -> Path:
    return SHIPPED / _file_name(device_name)


def current_gpu_name() -> str | None:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return None


def load_table() -> dict:
    """{op: {bucket (str): backend}} for the current GPU: tuned here if present, else shipped for this
    GPU name, else the shipped default."""
    name = current_gpu_name()
    for path in ([table_path(name), shipped_path(name)] if name else []) + [DEFAULT]:
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                return data["ops"]
            except (ValueError, KeyError) as e:
                raise RuntimeError(f"ptqrt: dispatch table {path} is damaged ({e}); delete it or rerun `ptqrt tune`")
    return {}


def write_table(device_name: str, ops: dict, extra: dict | None = None) -> Path:
    path = table_path(device_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"device": device_name, "ops": ops, **(extra or {})}, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path
