"""Runner: diffusers' StableDiffusionPipeline, StableDiffusionXLPipeline for an SDXL
checkpoint or StableDiffusion3Pipeline for an SD3 one, on torch (CPU), fp32 or bf16 (main venv). Options: {"dtype": "fp32" | "bf16"}.
The checkpoint folder is loaded as saved."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from diffusers_api import DiffusersApiRunner, is_sdxl, pipeline_class  # noqa: E402
from worker import Unavailable, serve  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load(checkpoint: str, options: dict[str, Any]) -> DiffusersApiRunner:
    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    dtype = options.get("dtype", "fp32")
    if dtype not in DTYPES:
        raise Unavailable(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if pipeline_class(checkpoint) == "StableDiffusion3Pipeline":  # saved without T5: say so, as diffusers needs
        index = json.loads((Path(checkpoint) / "model_index.json").read_text())
        missing = {k: None for k in ("text_encoder_3", "tokenizer_3") if index.get(k) in (None, [None, None])}
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(checkpoint, torch_dtype=DTYPES[dtype], **missing)
        # diffusers 0.42.1 leaves the transformer's patch embedding (pos_embed.proj) in fp32 when an fp32
        # checkpoint is loaded with torch_dtype=bf16, and the first call then fails on the dtype mismatch
        pipe.to(DTYPES[dtype])
    elif is_sdxl(checkpoint):  # no invisible watermark: it would change the image the others are compared with
        pipe = StableDiffusionXLPipeline.from_pretrained(checkpoint, torch_dtype=DTYPES[dtype], add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(checkpoint, torch_dtype=DTYPES[dtype], safety_checker=None,
                                                       requires_safety_checker=False)
    runner = DiffusersApiRunner(pipe, latents_dtype=DTYPES[dtype])
    runner.info = {"diffusers": diffusers.__version__, "torch": torch.__version__, "dtype": dtype,
                   "pipeline": type(pipe).__name__, "torch_threads": torch.get_num_threads()}
    return runner


if __name__ == "__main__":
    sys.exit(serve(load))
