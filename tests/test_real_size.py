"""Real-size SD1.5 (860M-parameter UNet) through build -> export -> generate.

Marked slow (about 4 minutes on 2 cores, 8 GB of disk, ~6 GiB of RAM): not part of
the default `python -m pytest -q`; run it with `python -m pytest -q -m slow`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_size_sd15.py"


@pytest.mark.slow
def test_real_size_sd15_build_export_generate(tmp_path):
    results = tmp_path / "report.json"
    cmd = [sys.executable, str(SCRIPT), "--workdir", str(tmp_path / "work"), "--steps", "1", "--size", "256x256",
           "--results", str(results)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(results.read_text())
    artifact = tmp_path / "work" / "artifact"
    # the fp32 UNet is over protobuf's 2 GB limit: graph + one external-data file
    assert (artifact / "unet" / "model.onnx.data").stat().st_size > 3 * 2**30
    manifest = json.loads((artifact / "manifest.json").read_text())
    for name, stage in manifest["stages"].items():
        assert stage["max_abs_error"] <= 1e-3, (name, stage["max_abs_error"])
    generate = report["phases"]["generate"]
    assert generate["image_finite"]
    assert len(generate["timings"]["denoiser_calls"]) == 2  # PNDM: 1 step = 2 UNet calls
