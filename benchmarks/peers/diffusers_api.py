"""What the diffusers-API peers share: diffusers + torch, optimum-onnx's
ORTStableDiffusion(XL|3)Pipeline and optimum-intel's OVStableDiffusion(XL|3)Pipeline are
all subclasses of diffusers' StableDiffusionPipeline (StableDiffusionXLPipeline for
SDXL, StableDiffusion3Pipeline for SD3), so one call, one scheduler switch and one set
of stage timers serve all three. Imported only inside a peer's own venv.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker import StageTimer, load_latents


def pipeline_class(folder: str | Path) -> str:
    """The saved pipeline's class name (model_index.json's _class_name)."""
    return json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name", "")


def is_sdxl(folder: str | Path) -> bool:
    """Whether a saved pipeline folder (a diffusers checkpoint, or optimum's export of
    one, which keeps its model_index.json) is an SDXL text-to-image pipeline."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return index.get("_class_name") == "StableDiffusionXLPipeline"


def is_sd3(folder: str | Path) -> bool:
    """Whether a saved pipeline folder (a checkpoint or optimum's export of one) is SD3."""
    return "StableDiffusion3" in pipeline_class(folder)


def absent_components(folder: str | Path) -> dict[str, None]:
    """The components model_index.json lists as absent ([null, null]: SD3 saved without
    T5), as None keywords: diffusers' from_pretrained refuses a pipeline folder that lacks
    a non-optional component unless it is passed explicitly."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return {k: None for k, v in index.items() if not k.startswith("_") and v in (None, [None, None])}


def load_sd3_for_export(checkpoint: str | Path):
    """The fp32 StableDiffusion3Pipeline optimum's exporters take (their main_export
    cannot pass the absent components above, so the runners export from this object)."""
    from diffusers import StableDiffusion3Pipeline

    absent = absent_components(checkpoint)
    return StableDiffusion3Pipeline.from_pretrained(checkpoint, torch_dtype=torch.float32, **absent)


def scheduler_for(name: str, base_config: dict[str, Any], overrides: dict[str, Any] | None = None):
    """The workload's scheduler, configured from the checkpoint's scheduler config plus
    the workload's overrides (as diffrt configures its own numpy schedulers from
    scheduler_config.json and a preset's overrides)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        LCMScheduler,
    )

    overrides = dict(overrides or {})
    if name == "lcm":
        return LCMScheduler.from_config(base_config, **overrides)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(base_config, **{"use_karras_sigmas": False, **overrides})
    if name == "euler":
        return EulerDiscreteScheduler.from_config(base_config, **overrides)
    if name == "flow_match_euler":  # SD3: the checkpoint's own FlowMatchEulerDiscreteScheduler
        return FlowMatchEulerDiscreteScheduler.from_config(base_config, **overrides)
    raise ValueError(f"scheduler {name!r}: this runner knows lcm, dpmpp_2m, euler and flow_match_euler")


def diffrt_lcm_noise(seed: int):
    """A stand-in for diffusers' randn_tensor inside its LCMScheduler: each LCM step's
    noise drawn as diffrt draws it (row i of the batch from np.random.default_rng(seed +
    i), float32, in step order), so every runner's W1 image can be compared with the
    fp32 reference's; the cost, a few microseconds of numpy per step, is not the
    pipeline's work. The generator diffusers passes is ignored."""
    generators: list[np.random.Generator] = []

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        if not generators:
            generators.extend(np.random.default_rng(seed + i) for i in range(shape[0]))
        if len(generators) != shape[0]:
            raise ValueError(f"LCM noise for a batch of {shape[0]} after one of {len(generators)}")
        rows = np.stack([g.standard_normal(tuple(shape[1:]), dtype=np.float32) for g in generators])
        return torch.from_numpy(rows).to(device=device or "cpu", dtype=dtype or torch.float32)

    return randn_tensor


class DiffusersApiRunner:
    """Runs a StableDiffusionPipeline(-like) object with the harness's request."""

    def __init__(self, pipe, latents_dtype: torch.dtype = torch.float32):
        self.pipe = pipe
        self.latents_dtype = latents_dtype
        self.base_scheduler_config = dict(pipe.scheduler.config)
        self._schedulers: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}
        self.timer = StageTimer()
        self.wrap_stages()
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

    def wrap_stages(self) -> None:
        # diffusers calls text_encoder(...) and unet(...) / transformer(...) (-> forward) and
        # vae.decode(...); SDXL's and SD3's other encoders count as text-encoder time too
        # (StageTimer sums a stage's calls).
        for encoder in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(self.pipe, encoder, None) is not None:
                self.timer.wrap(getattr(self.pipe, encoder), "forward", "text_encoder")
        denoiser = self.pipe.unet if getattr(self.pipe, "unet", None) is not None else self.pipe.transformer
        self.timer.wrap(denoiser, "forward", "denoiser_steps")
        self.timer.wrap(self.pipe.vae, "decode", "vae_decoder")

    def set_scheduler(self, name: str, overrides: dict[str, Any] | None = None) -> None:
        key = (name, tuple(sorted((overrides or {}).items())))
        if key not in self._schedulers:
            self._schedulers[key] = scheduler_for(name, self.base_scheduler_config, overrides)
        self.pipe.scheduler = self._schedulers[key]

    def generate(self, request: dict[str, Any]):
        self.set_scheduler(request["scheduler"], request.get("scheduler_config"))
        latents = torch.from_numpy(load_latents(request)).to(self.latents_dtype)
        self.timer.reset()
        # LCM (W1) injects noise at each step: diffrt's draws, for every runner alike (see above)
        from diffusers.schedulers import scheduling_lcm

        scheduling_lcm.randn_tensor = diffrt_lcm_noise(request["seed"])
        with torch.inference_mode():
            out = self.pipe(
                request["prompt"],
                num_inference_steps=request["steps"],
                guidance_scale=request["guidance_scale"],
                height=request["height"],
                width=request["width"],
                num_images_per_prompt=request["batch"],
                latents=latents,
                generator=torch.Generator().manual_seed(request["seed"]),
                output_type="np",
            )
        return np.asarray(out.images, dtype=np.float32), self.timer.stages()
