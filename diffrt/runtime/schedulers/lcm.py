"""Latent Consistency Model multistep sampling (Luo et al. 2023), as diffusers' LCMScheduler.

Each step maps x_t straight to a denoised sample through the consistency function
(c_skip * x_t + c_out * x0), then re-noises it to the next timestep; the last step returns
the denoised sample itself. Timesteps are a subset of the `original_inference_steps`
distillation schedule, so timestep_spacing and steps_offset do not apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from .base import RunBase, SchedulerBase, Window
from .common import F32, add_noise_vp, alphas_cumprod_from_config, as_float32, clip, denoised_vp, draw_noise
from .config import require, resolve_config, validate_common
from .protocol import NoiseSource

CLASS_NAME = "LCMScheduler"
DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
})
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SIGMA_DATA = 0.5


def boundary_scalings(timestep: int, timestep_scaling: float) -> tuple[np.float32, np.float32]:
    """(c_skip, c_out) of the consistency parameterization; c_skip -> 1, c_out -> 0 as t -> 0."""
    scaled = F32(timestep) * F32(timestep_scaling)
    sigma_data_sq = F32(SIGMA_DATA**2)
    c_skip = sigma_data_sq / (scaled * scaled + sigma_data_sq)
    c_out = scaled / np.sqrt(scaled * scaled + sigma_data_sq)
    return c_skip, c_out


def lcm_timesteps(original_inference_steps: int, num_train_timesteps: int, n: int) -> np.ndarray:
    """n evenly spaced picks (descending) from the distillation schedule k-1, 2k-1, ..."""
    k = num_train_timesteps // original_inference_steps
    origin = (np.arange(1, original_inference_steps + 1) * k - 1)[::-1]
    indices = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return origin[indices].astype(np.int64)


@dataclass(frozen=True, eq=False)
class LCMScheduler(SchedulerBase):
    name = "lcm"
    class_name = CLASS_NAME

    @property
    def max_inference_steps(self) -> int:
        # diffusers: no more steps than the distillation schedule has
        return self.config["original_inference_steps"]

    def _plan(self, n: int, sigmas: None, mu: None, window: Window) -> LCMRun:
        cfg = self.config
        timesteps = lcm_timesteps(cfg["original_inference_steps"], cfg["num_train_timesteps"], n)
        return LCMRun(self, timesteps, window)


class LCMRun(RunBase):
    def __init__(self, scheduler: LCMScheduler, timesteps: np.ndarray, window: Window):
        super().__init__(timesteps.astype(F32), window)
        self._scheduler = scheduler
        self._timesteps = timesteps

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource | None = None
    ) -> np.ndarray:
        """The next sample; at the full plan's last step (no noise drawn), the denoised sample."""
        s, cfg = self._scheduler, self._scheduler.config
        j = self._at(i)
        model_output, sample = as_float32(model_output), as_float32(sample)
        t = int(self._timesteps[j])
        alpha_prod_t = s.alphas_cumprod[t]
        denoised = denoised_vp(
            model_output, sample, np.sqrt(alpha_prod_t), np.sqrt(F32(1) - alpha_prod_t), s.prediction_type
        )
        if cfg["clip_sample"]:
            denoised = clip(denoised, -cfg["clip_sample_range"], cfg["clip_sample_range"])
        c_skip, c_out = boundary_scalings(t, cfg["timestep_scaling"])
        denoised = c_out * denoised + c_skip * sample
        if j == len(self._timesteps) - 1:
            return denoised
        prev_t = int(self._timesteps[j + 1])
        alpha_prod_t_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod
        noise = draw_noise(rng, model_output, "lcm", i)
        return np.sqrt(alpha_prod_t_prev) * denoised + np.sqrt(F32(1) - alpha_prod_t_prev) * noise

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        alpha_prod = self._scheduler.alphas_cumprod[int(self._timesteps[self._at(i)])]
        return add_noise_vp(as_float32(original_samples), as_float32(noise), alpha_prod)


def from_config(config: Mapping[str, Any], **overrides: Any) -> LCMScheduler:
    """LCMScheduler.from_config(config, **overrides)."""
    cfg = resolve_config(DEFAULTS, config, overrides)
    validate_common(CLASS_NAME, cfg)
    require(CLASS_NAME, "prediction_type", cfg["prediction_type"], PREDICTION_TYPES)
    original = cfg["original_inference_steps"]
    if not isinstance(original, int) or not 1 <= original <= cfg["num_train_timesteps"]:
        raise ValueError(
            f"{CLASS_NAME}: original_inference_steps={original!r} is not supported; "
            f"allowed: 1..num_train_timesteps={cfg['num_train_timesteps']}"
        )
    alphas_cumprod = alphas_cumprod_from_config(cfg)
    final = F32(1.0) if cfg["set_alpha_to_one"] else alphas_cumprod[0]
    return LCMScheduler(MappingProxyType(cfg), alphas_cumprod, final)
