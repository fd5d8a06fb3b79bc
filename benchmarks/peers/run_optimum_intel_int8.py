"""Runner: optimum-intel's own fast mode, hybrid int8 quantization (NNCF), in the
optimum-intel venv: the same pipelines and options as run_optimum_intel.py (`static`,
`cache_dir`), on a quantized export.

    --prepare CHECKPOINT OUT   optimum-intel's fp32 OpenVINO export (run_optimum_intel.py's),
                               then OV*Pipeline.from_pretrained(..., quantization_config=
                               OVWeightQuantizationConfig(bits=8, quant_method="hybrid",
                               dataset=PROMPTS)) and save_pretrained(OUT): int8 weights in
                               every model, and the UNet's (transformer's) activations
                               quantized too, calibrated on the denoiser inputs the
                               pipeline itself produces for PROMPTS (calibration_prompts.txt
                               beside this script: a list of prompts, so nothing is
                               downloaded; optimum-intel's own default steps and size
                               for the calibration runs, CALIBRATION_SAMPLES denoiser inputs).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run_optimum_intel  # noqa: E402
from diffusers_api import is_sd3, is_sdxl  # noqa: E402
from worker import serve  # noqa: E402

PROMPTS_FILE = HERE / "calibration_prompts.txt"
# optimum-intel's default for diffusion is 200 denoiser inputs, collected at 512x512 with
# 50 steps and CFG, then 200 more UNet runs to gather statistics: about 45 min on 2 cores at
# SD1.5 size. 64 (the first 2 calibration prompts' 50 steps, less 36) keeps the preparation
# bounded; it changes the ranges the activations are quantized with (the error column
# shows what they cost), not the speed of the int8 graph.
CALIBRATION_SAMPLES = 64


def calibration_prompts() -> list[str]:
    return [line.strip() for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]


def prepare(checkpoint: str, out: str) -> dict[str, Any]:
    from optimum.intel import (
        OVStableDiffusion3Pipeline,
        OVStableDiffusionPipeline,
        OVStableDiffusionXLPipeline,
        OVWeightQuantizationConfig,
    )

    fp32 = Path(out).with_name(Path(out).name + "-fp32-export")  # beside OUT: the harness empties OUT first
    shutil.rmtree(fp32, ignore_errors=True)
    run_optimum_intel.prepare(checkpoint, str(fp32))
    prompts = calibration_prompts()
    config = OVWeightQuantizationConfig(bits=8, quant_method="hybrid", dataset=prompts,
                                        num_samples=CALIBRATION_SAMPLES)
    cls = (OVStableDiffusion3Pipeline if is_sd3(fp32) else
           OVStableDiffusionXLPipeline if is_sdxl(fp32) else OVStableDiffusionPipeline)
    pipe = cls.from_pretrained(fp32, quantization_config=config, compile=False)
    pipe.save_pretrained(out)
    shutil.rmtree(fp32, ignore_errors=True)
    return {"model": out, "quantization": "hybrid int8", "calibration_prompts": len(prompts),
            "calibration_samples": CALIBRATION_SAMPLES}


def load(model: str, options: dict[str, Any]):
    runner = run_optimum_intel.load(model, options)
    runner.info["quantization"] = "hybrid int8 (OVWeightQuantizationConfig(bits=8, quant_method='hybrid'))"
    return runner


if __name__ == "__main__":
    sys.exit(serve(load, prepare))
