"""Runner: diffusers' StableDiffusionPipeline, StableDiffusionXLPipeline for an SDXL
checkpoint or StableDiffusion3Pipeline for an SD3 one, on torch (CPU), fp32 or bf16 (main venv). Options: {"dtype": "fp32" | "bf16"}.
The checkpoint folder is loaded as saved.

"deepcache": {"cache_interval": N, "cache_branch_id": B} turns on the DeepCache
package's DeepCacheSDHelper (UNets only; run in the diffusers-deepcache venv, which has
it): the UNet's deep branch is computed on every N-th step and reused in between."""

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
    if options.get("deepcache"):
        runner.info["deepcache"] = enable_deepcache(pipe, options["deepcache"])
    return runner


def enable_deepcache(pipe, params: dict[str, Any]) -> dict[str, Any]:
    """DeepCacheSDHelper on the pipeline, as the package's README shows. It wraps
    pipe.unet.forward after the stage timer did, so every UNet call, full or shallow,
    is still timed as one denoiser call."""
    from importlib import metadata

    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        raise Unavailable("the DeepCache package is not installed in this venv "
                          "(bash benchmarks/peers/setup.sh VENV_ROOT diffusers-deepcache)") from None
    if getattr(pipe, "unet", None) is None:
        raise Unavailable(f"DeepCache's helper wraps a UNet; {type(pipe).__name__} has a transformer")
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(**params)
    helper.enable()
    pipe._deepcache_helper = helper  # kept alive with the pipeline
    return {"package": metadata.version("DeepCache"), **params}


if __name__ == "__main__":
    sys.exit(serve(load))
