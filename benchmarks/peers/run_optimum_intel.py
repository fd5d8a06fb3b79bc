"""Runner: optimum-intel's OVStableDiffusionPipeline, OVStableDiffusionXLPipeline for an
SDXL checkpoint or OVStableDiffusion3Pipeline for an SD3 one (OpenVINO, CPU), in the
optimum-intel venv (`bash benchmarks/peers/setup.sh`).

    --prepare CHECKPOINT OUT   optimum-intel's own OpenVINO IR export, weights kept fp32
                               (OVConfig(dtype="fp32"): no fp16 compression, no int8);
                               an SD3 checkpoint saved without T5 gets its absent
                               components passed as None (model_loading_kwargs), as
                               diffusers needs.
Options:
    cache_dir   OpenVINO's compiled-model cache (ov_config CACHE_DIR), set by the harness.
    static      reshape every stage to the request's static shapes, then compile(): the
                speed-up optimum-intel documents. Its reshape() doubles the denoiser
                batch for CFG (the UNet's unless it takes timestep_cond; SD3's
                transformer always), so without CFG the denoiser is reshaped again here
                by hand to the batch it really gets.
Inference precision is OpenVINO's default for the CPU (bf16 where the CPU has AMX /
AVX512-BF16, else f32); `info` reports what the compiled denoiser uses.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffusers_api import DiffusersApiRunner, absent_components, is_sd3, is_sdxl  # noqa: E402
from worker import serve  # noqa: E402

PROPERTIES = ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS")


def prepare(checkpoint: str, out: str) -> dict[str, Any]:
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    main_export(model_name_or_path=checkpoint, output=out, task="text-to-image", library_name="diffusers",
                ov_config=OVConfig(dtype="fp32"), model_loading_kwargs=absent_components(checkpoint))
    return {"model": out}


class OptimumIntelRunner(DiffusersApiRunner):
    def __init__(self, pipe, static: bool):
        super().__init__(pipe)
        self.static = static
        self.shape: tuple[int, int, int, int] | None = None  # (images, unet batch, height, width)
        self.info: dict[str, Any] = {}

    def prepare(self, request: dict[str, Any]) -> None:
        """Static mode: reshape + compile for this request's shapes (timed apart by the worker)."""
        if not self.static:
            return
        cfg = request["guidance_scale"] > 1.0
        images = request["batch"]
        shape = (images, images * (2 if cfg else 1), request["height"], request["width"])
        if shape == self.shape:
            return
        self.pipe.reshape(batch_size=1, height=request["height"], width=request["width"], num_images_per_prompt=images)
        if not cfg and self.pipe.unet is not None:
            self.pipe.unet.model = reshape_unet(self.pipe, shape[1], request["height"], request["width"])
        elif not cfg:
            self.pipe.transformer.model = reshape_sd3_transformer(self.pipe, shape[1], request["height"],
                                                                  request["width"])
        self.pipe.compile()
        self.shape = shape

    def generate(self, request: dict[str, Any]):
        result = super().generate(request)
        self.info.update(compiled_properties(self.pipe))
        return result


def reshape_unet(pipe, unet_batch: int, height: int, width: int):
    """optimum-intel's _reshape_unet with the batch given (no CFG doubling), SDXL's added
    conditions (text_embeds, time_ids) included."""
    model = pipe.unet.model
    factor = pipe.vae_scale_factor
    max_length = (pipe.tokenizer if pipe.tokenizer is not None else pipe.tokenizer_2).model_max_length
    shapes = {}
    for tensor in model.inputs:
        shape = tensor.get_partial_shape()
        name = tensor.get_any_name()
        if name == "timestep":
            if shape.rank == 1:
                shape[0] = 1
        elif name == "sample":
            shape = [unet_batch, pipe.unet.config["in_channels"], height // factor, width // factor]
        elif name == "text_embeds":
            shape = [unet_batch, pipe.text_encoder_2.config["projection_dim"]]
        elif name == "time_ids":
            shape = [unet_batch, shape[1]]
        elif name == "timestep_cond":
            shape = [unet_batch, pipe.unet.config["time_cond_proj_dim"]]
        else:  # encoder_hidden_states
            shape[0] = unet_batch
            shape[1] = max_length
        shapes[tensor] = shape
    model.reshape(shapes)
    return model


def reshape_sd3_transformer(pipe, batch: int, height: int, width: int):
    """optimum-intel's _reshape_transformer for SD3 with the batch given (no CFG
    doubling); the text sequence stays dynamic, as optimum-intel leaves it."""
    model = pipe.transformer.model
    factor = pipe.vae_scale_factor
    shapes = {}
    for tensor in model.inputs:
        name = tensor.get_any_name()
        shape = tensor.get_partial_shape()
        if name == "timestep":
            shape[0] = batch
        elif name == "hidden_states":
            shape = [batch, pipe.transformer.config["in_channels"], height // factor, width // factor]
        elif name == "pooled_projections":
            shape = [batch, pipe.transformer.config["pooled_projection_dim"]]
        else:  # encoder_hidden_states: CLIP-L/G (+ T5) tokens
            shape[0] = batch
            shape[1] = -1
        shapes[tensor] = shape
    model.reshape(shapes)
    return model


def compiled_properties(pipe) -> dict[str, Any]:
    stage = "unet" if pipe.unet is not None else "transformer"
    request = getattr(getattr(pipe, stage), "request", None)
    if request is None:
        return {}
    props = {}
    for name in PROPERTIES:
        try:
            props[f"{stage} {name}"] = str(request.get_property(name))
        except Exception:  # noqa: BLE001 - a property this OpenVINO version does not report
            pass
    return props


def load(model: str, options: dict[str, Any]) -> OptimumIntelRunner:
    from importlib import metadata

    from optimum.intel import (
        OVStableDiffusion3Pipeline,
        OVStableDiffusionPipeline,
        OVStableDiffusionXLPipeline,
    )

    ov_config = {"CACHE_DIR": options["cache_dir"]} if options.get("cache_dir") else None
    static = bool(options.get("static"))
    # Dynamic: compile now, as from_pretrained does by default. Static: compile after reshape.
    if is_sd3(model):  # its export has no text_encoder_3: the pipeline runs without T5 (zeros, as diffusers)
        pipe = OVStableDiffusion3Pipeline.from_pretrained(model, ov_config=ov_config, compile=not static)
    elif is_sdxl(model):  # no invisible watermark: it would change the image the others are compared with
        pipe = OVStableDiffusionXLPipeline.from_pretrained(model, ov_config=ov_config, compile=not static,
                                                           add_watermarker=False)
    else:
        pipe = OVStableDiffusionPipeline.from_pretrained(model, ov_config=ov_config, compile=not static)
    runner = OptimumIntelRunner(pipe, static)
    runner.info = {name: metadata.version(name) for name in ("optimum-intel", "openvino", "diffusers", "transformers")}
    runner.info["pipeline"] = type(pipe).__name__
    runner.info["static"] = static
    runner.info.update(compiled_properties(pipe))
    return runner


if __name__ == "__main__":
    sys.exit(serve(load, prepare))
