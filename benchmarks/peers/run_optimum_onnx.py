"""Runner: optimum-onnx's ORTStableDiffusionPipeline, ORTStableDiffusionXLPipeline for an
SDXL checkpoint or ORTStableDiffusion3Pipeline for an SD3 one (ONNX Runtime, CPU
execution provider), in the optimum-onnx venv (`bash benchmarks/peers/setup.sh`).

    --prepare CHECKPOINT OUT   optimum's own ONNX export of the checkpoint (main_export,
                               task text-to-image, SD or SDXL; SD3 through
                               onnx_export_from_model on the pipeline loaded here, since
                               main_export cannot load one saved without T5); the harness
                               passes a copy of the checkpoint whose tokenizers have
                               vocab.json + merges.txt, which transformers 4.x's slow
                               CLIPTokenizer needs.
Options: none (optimum's defaults: CPUExecutionProvider, its own session options).
"""

from __future__ import annotations

import gc
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers_api import DiffusersApiRunner, is_sd3, is_sdxl, load_sd3_for_export  # noqa: E402
from worker import serve  # noqa: E402


def prepare(checkpoint: str, out: str) -> dict[str, Any]:
    from optimum.exporters.onnx import main_export, onnx_export_from_model

    # do_validation=False: optimum's check reruns every stage in torch (minutes at SD1.5
    # size); the harness compares the final images of all runners instead.
    if is_sd3(checkpoint):
        with weights_released_after_each_export():
            onnx_export_from_model(load_sd3_for_export(checkpoint), out, task="text-to-image", do_validation=False)
        return {"model": out}
    main_export(model_name_or_path=checkpoint, output=out, task="text-to-image", library_name="diffusers",
                do_validation=False)
    return {"model": out}


@contextmanager
def weights_released_after_each_export():
    """Each module's weights go to the meta device as soon as torch has written its ONNX
    file. optimum keeps the whole fp32 pipeline (12.6 GB at SD3.5-medium size) while it
    then reloads the transformer's 9.3 GB graph to gather its external data into one file
    and runs it in ONNX Runtime to check its dynamic axes: over 22 GB at once, more than a
    24 GiB machine has beside anything else. The files written are unchanged (optimum
    uses no module after its export: it exports the VAE from its own copies)."""
    import torch

    original = torch.onnx.export

    def export_then_release(model, *args, **kwargs):
        result = original(model, *args, **kwargs)
        model.to("meta")
        gc.collect()
        return result

    torch.onnx.export = export_then_release  # optimum imports it inside export_pytorch, at call time
    try:
        yield
    finally:
        torch.onnx.export = original


def load(model: str, options: dict[str, Any]) -> DiffusersApiRunner:
    from importlib import metadata

    from optimum.onnxruntime import (
        ORTStableDiffusion3Pipeline,
        ORTStableDiffusionPipeline,
        ORTStableDiffusionXLPipeline,
    )

    if is_sd3(model):  # optimum loads the stages it finds: no text_encoder_3 folder, no T5 (zeros, as diffusers)
        pipe = ORTStableDiffusion3Pipeline.from_pretrained(model, provider="CPUExecutionProvider")
    elif is_sdxl(model):  # no invisible watermark: it would change the image the others are compared with
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
