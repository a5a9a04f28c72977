"""The backend chooser around the kernels: PTQRT_BACKEND, the `auto` dispatch table (read, checked,
replaced by the tuner), and the fallback warnings of a forced backend. CPU only: a GPU name is faked
where the table is read for one, as the tuner tests in test_cuda_backend.py do."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from ptqrt import dispatch_table, ops, tune

GPU = "Fake GPU 80GB"
CUDA = torch.device("cuda")


# ------------------------------------------------------------------------------------------ PTQRT_BACKEND
def _env_backend(monkeypatch, value: str) -> None:
    """ptqrt.ops as if imported with PTQRT_BACKEND=value."""
    monkeypatch.setenv("PTQRT_BACKEND", value)
    backend, error = ops._backend_from_env()
    monkeypatch.setattr(ops, "_backend", backend)
    monkeypatch.setattr(ops, "_backend_error", error)
    ops._cache.clear()


def test_bad_ptqrt_backend_is_refused_at_first_use_naming_the_variable(monkeypatch):
    _env_backend(monkeypatch, "cuBLAS")
    match = r"PTQRT_BACKEND must be one of auto, reference, cpu, triton, cuda.*'cuBLAS'"
    with pytest.raises(ValueError, match=match):
        ops.get_backend()
    with pytest.raises(ValueError, match=match):
        ops.quantize_per_token(torch.randn(2, 8))
    ops.set_backend("reference")  # set_backend replaces the bad value
    assert ops.get_backend() == "reference" and ops.backend_for("w8a8_gemm", "cpu") == "reference"


@pytest.mark.parametrize("value, expected", [(" Reference ", "reference"), ("", "auto"), ("CPU", "cpu")])
def test_ptqrt_backend_is_case_and_space_insensitive(monkeypatch, value, expected):
    _env_backend(monkeypatch, value)
    assert ops.get_backend() == expected


def test_bad_ptqrt_backend_does_not_stop_import():
    env = {**os.environ, "PTQRT_BACKEND": "cuBLAS"}
    code = ("import ptqrt\ntry:\n    ptqrt.get_backend()\nexcept ValueError as e:\n    print('refused:', e)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "refused: PTQRT_BACKEND must be one of" in out.stdout, out.stderr


# ------------------------------------------------------------------------------------------ dispatch table
def _cuda_rows(backend: str) -> dict:
    return {op: {str(b): backend for b in ops.M_BUCKETS} for op in ops.OP_NAMES}


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """A faked GPU whose tuned-table folder and shipped-table folder are empty temporary ones."""
    monkeypatch.setenv("PTQRT_TABLE_DIR", str(tmp_path / "tuned"))
    monkeypatch.setattr(dispatch_table, "SHIPPED", tmp_path / "shipped")
    monkeypatch.setattr(dispatch_table, "current_gpu_name", lambda: GPU)
    dispatch_table.table_dir().mkdir()
    dispatch_table.SHIPPED.mkdir()
    ops.reset_dispatch_table()
    yield
    monkeypatch.undo()
    ops.reset_dispatch_table()


BAD_TABLES = {
    "top-level list": ("[]", 'not a JSON object with an "ops" object'),
    "ops a list": (json.dumps({"device": GPU, "ops": ["w8a8_gemm"]}), 'not a JSON object with an "ops" object'),
    "row a string": (json.dumps({"device": GPU, "ops": {"w8a8_gemm": "triton"}}),
                     r"ops\['w8a8_gemm'\] is str, not an object"),
    "another GPU": (json.dumps({"device": "NVIDIA A10", "ops": {"w8a8_gemm": {"1": "triton"}}}),
                    "tuned for device 'NVIDIA A10', not this GPU"),
    "no device": (json.dumps({"ops": {"w8a8_gemm": {"1": "triton"}}}), "tuned for device None"),
    "old buckets": (json.dumps({"device": GPU, "ops": {"w8a8_gemm": {"8": "triton", "32": "triton"}}}),
                    r"unknown M-bucket '8' \(buckets: 1, 16, 64"),
    "unknown backend": (json.dumps({"device": GPU, "ops": {"w8a8_gemm": {"1": "cutlass"}}}),
                        r"ops\['w8a8_gemm'\]\['1'\] is 'cutlass', not one of triton, cuda, reference"),
    "unknown op": (json.dumps({"device": GPU, "ops": {"w4a16_gemm": {"1": "triton"}}}), "unknown op 'w4a16_gemm'"),
    "truncated": ('{"device": "Fake GPU 80GB", "ops": {"w8a8_gemm": {"1": "cu', "cannot be read"),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_unusable_tuned_table_warns_once_and_the_shipped_one_is_used(tables, case):
    text, problem = BAD_TABLES[case]
    path = dispatch_table.table_path(GPU)
    path.write_text(text)
    dispatch_table.shipped_path(GPU).write_text(json.dumps({"device": GPU, "ops": _cuda_rows("cuda")}))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert ops._auto_chain("w8a8_gemm", CUDA, 1) == ["cuda", "triton", "reference"]
        ops.reset_dispatch_table()
        assert ops._auto_chain("w8a16_gemm", CUDA, 100) == ["cuda", "triton", "reference"]
    assert len(rec) == 1, [str(r.message) for r in rec]
    msg = str(rec[0].message)
    assert str(path) in msg and re.search(problem, msg), msg


def test_unusable_shipped_table_falls_back_to_the_default(tables):
    dispatch_table.shipped_path(GPU).write_text(json.dumps({"device": GPU, "ops": {"w8a8_gemm": ["cuda"]}}))
    with pytest.warns(RuntimeWarning, match=r"shipped/Fake_GPU_80GB.json is unusable: ops\['w8a8_gemm'\] is list"):
        table = dispatch_table.load_table()
    assert table == json.loads(dispatch_table.DEFAULT.read_text())["ops"]


def test_unusable_default_table_gives_the_built_in_order(tables, tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch_table, "DEFAULT", tmp_path / "default.json")
    dispatch_table.DEFAULT.write_text('{"ops": 3}')
    with pytest.warns(RuntimeWarning, match="default.json is unusable"):
        assert dispatch_table.load_table() == {}
    assert ops._auto_chain("w8a8_gemm", CUDA, 1) == ["triton", "cuda", "reference"]


def test_a_table_may_leave_out_ops_and_buckets(tables):
    """A partial table (hand-edited, or from before an op existed) is valid: what it lacks takes the
    built-in order, triton first."""
    dispatch_table.write_table(GPU, {"w8a8_gemm": {"1": "cuda"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops._auto_chain("w8a8_gemm", CUDA, 1)[0] == "cuda"
        assert ops._auto_chain("w8a8_gemm", CUDA, 17)[0] == "triton"
        assert ops._auto_chain("w8a16_gemm", CUDA, 1)[0] == "triton"


def test_shipped_tables_are_valid():
    for path in sorted(dispatch_table.SHIPPED.glob("*.json")):
        data = json.loads(path.read_text())
        assert dispatch_table.check_table(data, data["device"]) is None, path
        assert dispatch_table.shipped_path(data["device"]) == path
    assert dispatch_table.check_table(json.loads(dispatch_table.DEFAULT.read_text()), None) is None


def test_tune_write_replaces_a_damaged_table(tables):
    """The timings just taken are written; the ops not timed take the shipped table's rows."""
    path = dispatch_table.table_path(GPU)
    path.write_text('{"device": "Fake GPU 80GB", "ops": {')
    dispatch_table.shipped_path(GPU).write_text(json.dumps({"device": GPU, "ops": _cuda_rows("cuda")}))
    with pytest.warns(RuntimeWarning, match=r"Fake_GPU_80GB.json cannot be read .*; replacing it"):
        assert tune.write({"w8a8_gemm": {1: {"triton": 0.01, "cuda": 0.02}}}, GPU) == path
    data = json.loads(path.read_text())
    assert data["ops"]["w8a8_gemm"] == {"1": "triton"} and data["ops"]["w8a16_gemm"] == _cuda_rows("cuda")["w8a16_gemm"]
    assert dispatch_table.check_table(data, GPU) is None
    assert ops._auto_chain("w8a8_gemm", CUDA, 1)[0] == "triton" and ops._auto_chain("w8a16_gemm", CUDA, 1)[0] == "cuda"


def test_tune_write_replaces_another_gpus_table(tables):
    path = dispatch_table.table_path(GPU)
    path.write_text(json.dumps({"device": "NVIDIA A10", "ops": _cuda_rows("cuda")}))
    with pytest.warns(RuntimeWarning, match="tuned for device 'NVIDIA A10'.*; replacing it"):
        tune.write({"w8a8_gemm": {1: {"triton": 0.01}}}, GPU)
    assert json.loads(path.read_text())["device"] == GPU


@pytest.mark.parametrize("names, match", [([], "ops is empty"), (["w8a8_gemm", "gemm"], r"unknown ops \['gemm'\]")])
def test_tune_refuses_an_empty_or_unknown_op_list_before_timing(names, match, monkeypatch):
    """An empty list would rewrite the table without timing anything; refused before the GPU is looked for."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: (_ for _ in ()).throw(AssertionError("looked for a GPU")))
    with pytest.raises(ValueError, match=match):
        tune.tune(ops=names, quick=True)
    assert tune.op_names(None) == list(ops.OP_NAMES)


def test_load_table_replacing_says_so_each_time_and_keeps_the_fallback_order(tables):
    """ptqrt tune's read of the table in use (load_table(replacing=True)): the fallback order is
    load_table's; an unusable tuned table is said to be replaced at every call (tune writes it next),
    while an unusable shipped one keeps the once-only "using the next table" warning."""
    dispatch_table.table_path(GPU).write_text("[]")
    shipped = dispatch_table.shipped_path(GPU)
    shipped.write_text(json.dumps({"device": GPU, "ops": _cuda_rows("cuda")}))
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match=r"ptqrt.tune: dispatch table .*Fake_GPU_80GB.json is unusable.*; "
                                                r"replacing it"):
            assert dispatch_table.load_table(replacing=True) == _cuda_rows("cuda")
    shipped.write_text("{")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert dispatch_table.load_table(replacing=True) == json.loads(dispatch_table.DEFAULT.read_text())["ops"]
    msgs = [str(r.message) for r in rec]
    assert len(msgs) == 2 and "replacing it" in msgs[0] and "shipped" in msgs[1] and "using the next table" in msgs[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_tune_without_a_gpu_raises_no_cuda_device():
    """After its argument checks, tune.tune refuses a machine without a GPU with bench_gpu.NoCudaDevice
    (a RuntimeError, as before), which `ptqrt tune` reports in one line with status 2."""
    from ptqrt import bench_gpu

    with pytest.raises(bench_gpu.NoCudaDevice, match="ptqrt.tune needs a CUDA GPU"):
        tune.tune(quick=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        tune.tune(mode="graph")


# ------------------------------------------------------------------------------------------ fallback warnings
def _layer_calls(ms=(1, 3, 40)) -> None:
    """quantize_per_token + w8a8_gemm + w8a16_gemm at three M-buckets on CPU tensors."""
    w = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
    for m in ms:
        xq, xs = ops.quantize_per_token(torch.randn(m, 32))
        ops.w8a8_gemm(xq, xs, w, torch.rand(8), None, torch.float32)
        ops.w8a16_gemm(torch.randn(m, 32), w, torch.rand(8), None, 0)


def _warnings_of(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fn()
    return [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())


def test_forced_cpu_backend_whose_build_failed_warns_once_saying_so(fresh_warnings, monkeypatch):
    from ptqrt import _build

    monkeypatch.setattr(_build, "load", lambda kind: None)
    ops.set_backend("cpu")
    got = _warnings_of(_layer_calls)
    assert len(got) == 1, got
    assert "backend 'cpu' cannot run ops on cpu tensors: its cpu extension is unavailable" in got[0]
    assert "ptqrt build --cpu" in got[0] and "has no" not in got[0]
    assert ops.backend_for("w8a8_gemm", "cpu") == "reference"


@pytest.mark.parametrize("backend, reason", [("cuda", "it runs on CUDA tensors only"),
                                             ("triton", "it runs on CPU tensors only under TRITON_INTERPRET=1")])
def test_forced_backend_that_cannot_run_on_cpu_tensors_warns_once(fresh_warnings, monkeypatch, backend, reason):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops.set_backend(backend)
    got = _warnings_of(_layer_calls)
    assert len(got) == 1 and f"backend {backend!r} cannot run ops on cpu tensors: {reason}" in got[0], got


def test_forced_backend_that_lacks_an_op_warns_once_per_op(fresh_warnings, monkeypatch):
    load = ops._load

    def without_w8a16(backend, device):
        impls, why = load(backend, device)
        return ({k: v for k, v in impls.items() if k != "w8a16_gemm"} if backend == "reference" else impls), why

    monkeypatch.setattr(ops, "_load", without_w8a16)
    ops.set_backend("reference")
    got = _warnings_of(_layer_calls)
    assert len(got) == 1 and "backend 'reference' has no w8a16_gemm for cpu tensors; using 'cpu'" in got[0], got


# ------------------------------------------------------------------------------------------ a review's cases
def test_a_reference_row_is_followed(tables):
    """tune writes "reference" where no compiled backend could be timed; auto used to run triton there."""
    dispatch_table.write_table(GPU, {"w8a8_gemm": {"1": "reference"}})
    assert ops._auto_chain("w8a8_gemm", CUDA, 1) == ["reference"]
    assert ops._auto_chain("w8a8_gemm", CUDA, 17)[0] == "triton"


def test_a_table_folder_it_may_not_search_is_skipped_with_the_warning(tables, monkeypatch):
    """Path.is_file raises (not False) for a folder without search permission: auto ops raised it."""
    dispatch_table.shipped_path(GPU).write_text(json.dumps({"device": GPU, "ops": _cuda_rows("cuda")}))
    mine, is_file = dispatch_table.table_path(GPU), type(dispatch_table.table_path(GPU)).is_file

    def guarded(path):
        if path == mine:
            raise PermissionError(13, "Permission denied", str(path))
        return is_file(path)

    monkeypatch.setattr(type(mine), "is_file", guarded)
    with pytest.warns(RuntimeWarning, match="Fake_GPU_80GB.json cannot be read"):
        assert ops._auto_chain("w8a8_gemm", CUDA, 1) == ["cuda", "triton", "reference"]


def test_huge_m_takes_the_last_bucket_and_tune_takes_one_op_name():
    assert ops.bucket(2 ** 62 + 1) == ops.M_BUCKETS[-1] and ops.bucket(0) == 1
    assert tune.op_names("w8a8_gemm") == ["w8a8_gemm"]  # (it was split into characters)


def test_calls_the_dispatcher_must_see_do_not_take_the_eager_shortcut():
    """Meta tensors get the fake impls (the backend raised on them), torch.fx traces the op (a Proxy was
    taken for a plain argument), and forward-mode AD / torch.func transforms go through the op, which
    has no derivative (the reference backend gave a tangent)."""
    import torch.autograd.forward_ad as fwAD

    w, s = torch.zeros(5, 8, dtype=torch.int8, device="meta"), torch.ones(5, device="meta")
    out = ops.w8a16_gemm(torch.zeros(3, 8, device="meta"), w, s)
    assert out.is_meta and out.shape == (3, 5)
    cache = torch.zeros(2, 4, 2, 8, dtype=torch.int8, device="meta")
    att = ops.int8_kv_decode_attention(torch.zeros(2, 4, 8, device="meta"), cache, cache,
                                       torch.ones(2, 4, 2, device="meta"), torch.ones(2, 4, 2, device="meta"),
                                       torch.zeros(2, 1, dtype=torch.int32, device="meta"),
                                       torch.ones(2, dtype=torch.int32, device="meta"), 0.5)
    assert att.is_meta and att.shape == (2, 4, 8)
    from ptqrt import PTQConfig, QuantLinear

    q = QuantLinear.from_float(torch.nn.Linear(8, 5), PTQConfig(act_dtype="int8")).to("meta")
    for _ in range(3):  # (after one accepted call QuantLinear calls the backend itself: not on meta tensors)
        assert q(torch.zeros(3, 8, device="meta")).shape == (3, 5)

    def f(x):
        return ops.quantize_per_token(x)[0]

    g = torch.fx.symbolic_trace(f)
    assert any("quantize_per_token" in str(n.target) for n in g.graph.nodes)
    x = torch.randn(3, 8)
    assert torch.equal(g(x), f(x))
    before = ops.get_backend()
    ops.set_backend("reference")  # (pure torch: on the shortcut its ops carried the tangent along)
    try:
        with fwAD.dual_level():
            dual = fwAD.make_dual(x, torch.ones_like(x))
            y = ops.w8a16_gemm(dual, torch.ones(5, 8, dtype=torch.int8), torch.ones(5))
            assert fwAD.unpack_dual(y).tangent is None
    finally:
        ops.set_backend(before)


def test_each_gpu_of_a_machine_with_two_kinds_takes_its_own_table(tables, monkeypatch):
    """The table was read once for the current GPU and the backend cache keyed by device type only: a
    second kind of GPU ran on the first one's choices."""
    names = {None: GPU, 0: GPU, 1: "Other GPU 40GB"}
    monkeypatch.setattr(dispatch_table, "current_gpu_name", lambda device=None: names[device])
    ops.reset_dispatch_table()
    dispatch_table.write_table(GPU, {"w8a8_gemm": {"1": "cuda"}})
    dispatch_table.write_table(names[1], {"w8a8_gemm": {"1": "triton"}})
    assert ops._auto_chain("w8a8_gemm", torch.device("cuda", 0), 1)[0] == "cuda"
    assert ops._auto_chain("w8a8_gemm", torch.device("cuda", 1), 1)[0] == "triton"
    assert ops._auto_chain("w8a8_gemm", CUDA, 1)[0] == "cuda"  # the current one
