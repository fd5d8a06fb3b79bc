"""benchmarks/gpu_check.py, run here on CPU backends (--device cpu): the script a GPU
machine runs must work end to end — export, every backend, per-stage timing, the image
checks against the torch backend and diffusers, the table and the JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_flow_on_cpu(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    output = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--device", "cpu", "--quick", "--workdir", str(tmp_path / "work"),
                           "--output", str(output)])
    assert code == 0
    result = json.loads(output.read_text())
    backends = result["models"]["tiny"]["backends"]
    assert set(backends) == {"torch", "ort", "ort-iobinding"}
    for label, entry in backends.items():
        assert "error" not in entry, (label, entry)
        for steps in (2, 3):
            case = entry[f"{steps}steps"]
            assert case["denoiser_calls"] == steps and case["denoiser_call_s"] > 0 and case["vae_decoder_s"] > 0
            if label == "torch":
                assert case["max_abs_diff_vs_diffusers"] < 1e-4
            else:
                assert case["max_abs_diff_vs_torch"] < 1e-4
    assert "| tiny | ort-iobinding | 3 |" in capsys.readouterr().out
