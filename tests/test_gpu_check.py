"""benchmarks/gpu_check.py and gpu_check.sh, run here on CPU backends (--device cpu): the
script a lent GPU machine runs must work end to end — export, every variant, per-stage
timing, the image checks against the torch backend and diffusers, the table, and the
JSON written to the output folder. Its TensorRT path runs on fake CuPy/TensorRT in
tests/test_tensorrt.py; .ci/run rehearses gpu_check.sh in a fresh venv made from the bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return gpu_check


def test_gpu_check_flow_on_cpu(gpu_check, tmp_path, capsys):
    out = tmp_path / "out"
    code = gpu_check.main(["--device", "cpu", "--quick", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert code == 0
    result = json.loads((out / "gpu_check.json").read_text())
    backends = result["models"]["tiny"]["backends"]
    assert set(backends) == {"torch", "ort", "ort-iobinding"}
    for label, entry in backends.items():
        assert entry["status"] == "ok", (label, entry)
        for steps, _ in gpu_check.CPU_CASES:
            case = entry[f"{steps}steps"]
            assert case["denoiser_calls"] == steps and case["denoiser_call_s"] > 0 and case["vae_decoder_s"] > 0
            assert case["host_copies_in_loop"] == 0  # CPU backends: nothing to copy
            if label == "torch":
                assert case["max_abs_diff_vs_diffusers"] < 1e-4
            else:
                assert case["max_abs_diff_vs_torch"] < 1e-4
    assert result["schedulers"]["torch-cpu"]["stayed_on_device"] is True
    table = (out / "gpu_check.md").read_text()
    assert "| tiny | ort-iobinding | 3 |" in table and "no variant failed" in table
    assert table.strip() in capsys.readouterr().out  # the same table ends the output


def test_a_missing_library_is_one_line_naming_the_bundle(gpu_check, tmp_path, monkeypatch, capsys):
    real = gpu_check._has
    monkeypatch.setattr(gpu_check, "_has", lambda name: name != "diffusers" and real(name))
    assert gpu_check.main(["--device", "cpu", "--workdir", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "diffusers cannot be imported here" in err and "gpu_bundle.sh" in err and "\n" not in err


def test_variants_the_budget_cannot_hold_are_skipped_not_failed(gpu_check, exported, tmp_path):
    report = gpu_check.Report(tmp_path, {"models": {}})
    budget = gpu_check.Budget(10.0, clock=lambda: 0.0)  # 10 s left, every variant needs more
    result = gpu_check.check_model("tiny", exported("sd15"), gpu_check.CPU_VARIANTS, gpu_check.CPU_CASES, 64, "cpu",
                                   budget, report)
    assert all(e["status"].startswith("skipped: 10s of the budget left") for e in result["backends"].values())
    assert gpu_check.failures(report.results) == []
    assert json.loads((tmp_path / "gpu_check.json").read_text())["models"]["tiny"] == result


def test_gpu_check_sh_refuses_a_bundle_for_another_python(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "requirements.txt").write_text("diffusers==0.42.1\n")
    (bundle / "python-version").write_text("2.7\n")
    env = {**os.environ, "DIFFRT_BUNDLE": str(bundle), "DIFFRT_BUNDLE_SITE": str(tmp_path / "site"),
           "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--device", "cpu"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "holds wheels for Python 2.7" in done.stderr and "--python-version" in done.stderr
    assert not (tmp_path / "site").exists()
