"""What the diffusers-API peers share: diffusers + torch, optimum-onnx's
ORTStableDiffusionPipeline and optimum-intel's OVStableDiffusionPipeline are all
subclasses of diffusers' StableDiffusionPipeline, so one call, one scheduler switch and
one set of stage timers serve all three. Imported only inside a peer's own venv.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from worker import StageTimer, load_latents


def scheduler_for(name: str, base_config: dict[str, Any]):
    """The workload's scheduler, configured from the checkpoint's scheduler config (as
    diffrt configures its own numpy schedulers from scheduler_config.json)."""
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler

    if name == "lcm":
        return LCMScheduler.from_config(base_config)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(base_config, use_karras_sigmas=False)
    raise ValueError(f"scheduler {name!r}: this runner knows lcm and dpmpp_2m")


class DiffusersApiRunner:
    """Runs a StableDiffusionPipeline(-like) object with the harness's request."""

    def __init__(self, pipe, latents_dtype: torch.dtype = torch.float32):
        self.pipe = pipe
        self.latents_dtype = latents_dtype
        self.base_scheduler_config = dict(pipe.scheduler.config)
        self._schedulers: dict[str, Any] = {}
        self.timer = StageTimer()
        self.wrap_stages()
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

    def wrap_stages(self) -> None:
        # diffusers calls text_encoder(...) and unet(...) (-> forward) and vae.decode(...)
        self.timer.wrap(self.pipe.text_encoder, "forward", "text_encoder")
        self.timer.wrap(self.pipe.unet, "forward", "denoiser_steps")
        self.timer.wrap(self.pipe.vae, "decode", "vae_decoder")

    def set_scheduler(self, name: str) -> None:
        if name not in self._schedulers:
            self._schedulers[name] = scheduler_for(name, self.base_scheduler_config)
        self.pipe.scheduler = self._schedulers[name]

    def generate(self, request: dict[str, Any]):
        self.set_scheduler(request["scheduler"])
        latents = torch.from_numpy(load_latents(request)).to(self.latents_dtype)
        self.timer.reset()
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
