"""Runner: optimum-onnx's ORTStableDiffusionPipeline, or ORTStableDiffusionXLPipeline for
an SDXL checkpoint (ONNX Runtime, CPU execution provider), in the optimum-onnx venv
(`bash benchmarks/peers/setup.sh`).

    --prepare CHECKPOINT OUT   optimum's own ONNX export of the checkpoint (main_export,
                               task text-to-image, SD or SDXL); the harness passes a
                               copy of the checkpoint whose tokenizers have vocab.json +
                               merges.txt, which transformers 4.x's slow CLIPTokenizer
                               needs.
Options: none (optimum's defaults: CPUExecutionProvider, its own session options).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers_api import DiffusersApiRunner, is_sdxl  # noqa: E402
from worker import serve  # noqa: E402


def prepare(checkpoint: str, out: str) -> dict[str, Any]:
    from optimum.exporters.onnx import main_export

    # do_validation=False: optimum's check reruns every stage in torch (minutes at SD1.5
    # size); the harness compares the final images of all runners instead.
    main_export(model_name_or_path=checkpoint, output=out, task="text-to-image", library_name="diffusers",
                do_validation=False)
    return {"model": out}


def load(model: str, options: dict[str, Any]) -> DiffusersApiRunner:
    from importlib import metadata

    from optimum.onnxruntime import ORTStableDiffusionPipeline, ORTStableDiffusionXLPipeline

    if is_sdxl(model):  # no invisible watermark: it would change the image the others are compared with
        pipe = ORTStableDiffusionXLPipeline.from_pretrained(model, provider="CPUExecutionProvider",
                                                            add_watermarker=False)
    else:
        pipe = ORTStableDiffusionPipeline.from_pretrained(model, provider="CPUExecutionProvider")
    runner = DiffusersApiRunner(pipe)
    runner.info = {name: metadata.version(name) for name in ("optimum-onnx", "onnxruntime", "diffusers", "transformers")}
    runner.info["pipeline"] = type(pipe).__name__
    return runner


if __name__ == "__main__":
    sys.exit(serve(load, prepare))
