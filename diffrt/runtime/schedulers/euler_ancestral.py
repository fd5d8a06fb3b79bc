"""Euler ancestral (k-diffusion's sample_euler_ancestral, eta = 1), as diffusers'
EulerAncestralDiscreteScheduler: an Euler step down to sigma_down, then fresh noise of
size sigma_up, drawn at every step (also the last, where sigma_up is 0, so the number of
draws matches diffusers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from .base import RunBase, SchedulerBase, Window
from .common import (
    F32,
    add_noise_ve,
    alphas_cumprod_from_config,
    as_float32,
    denoised_ve,
    draw_noise,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)
from .config import TIMESTEP_SPACINGS, require, resolve_config, validate_common
from .euler import initial_sigma
from .protocol import NoiseSource

CLASS_NAME = "EulerAncestralDiscreteScheduler"
DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
})
# diffusers raises NotImplementedError for "sample" in step()
PREDICTION_TYPES = ("epsilon", "v_prediction")


def euler_ancestral_step(
    model_output: np.ndarray,
    sample: np.ndarray,
    sigma: np.float32,
    sigma_next: np.float32,
    noise: np.ndarray,
    prediction_type: str,
) -> np.ndarray:
    """Deterministic step to sigma_down, then noise * sigma_up; sigma_down^2 + sigma_up^2 = sigma_next^2."""
    denoised = denoised_ve(model_output, sample, sigma, prediction_type)
    sigma_up = np.sqrt(sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next) / (sigma * sigma))
    sigma_down = np.sqrt(sigma_next * sigma_next - sigma_up * sigma_up)
    derivative = (sample - denoised) / sigma
    prev_sample = sample + derivative * (sigma_down - sigma)
    return prev_sample + noise * sigma_up


@dataclass(frozen=True, eq=False)
class EulerAncestralScheduler(SchedulerBase):
    name = "euler_ancestral"
    class_name = CLASS_NAME

    def _plan(self, n: int, sigmas: None, mu: None, window: Window) -> EulerAncestralRun:
        cfg = self.config
        timesteps = spaced_timesteps(cfg["timestep_spacing"], cfg["num_train_timesteps"], n, cfg["steps_offset"])
        timesteps = timesteps.astype(F32)
        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        return EulerAncestralRun(self, timesteps, sigmas, window)


class EulerAncestralRun(RunBase):
    def __init__(self, scheduler: EulerAncestralScheduler, timesteps: np.ndarray, sigmas: np.ndarray,
                 window: Window):
        super().__init__(timesteps, window, sigmas)
        self._prediction_type = scheduler.prediction_type
        self.init_noise_sigma = initial_sigma(sigmas, scheduler.config["timestep_spacing"])

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        sigma = self._sigmas[self._at(i)]
        return as_float32(sample) / np.sqrt(sigma * sigma + F32(1))

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource | None = None
    ) -> np.ndarray:
        j = self._at(i)
        model_output, sample = as_float32(model_output), as_float32(sample)
        noise = draw_noise(rng, model_output, "euler_ancestral", i)
        return euler_ancestral_step(
            model_output, sample, self._sigmas[j], self._sigmas[j + 1], noise, self._prediction_type
        )

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        return add_noise_ve(as_float32(original_samples), as_float32(noise), self._sigmas[self._at(i)])


def from_config(config: Mapping[str, Any], **overrides: Any) -> EulerAncestralScheduler:
    """EulerAncestralDiscreteScheduler.from_config(config, **overrides)."""
    cfg = resolve_config(DEFAULTS, config, overrides)
    validate_common(CLASS_NAME, cfg)
    require(CLASS_NAME, "timestep_spacing", cfg["timestep_spacing"], TIMESTEP_SPACINGS)
    require(CLASS_NAME, "prediction_type", cfg["prediction_type"], PREDICTION_TYPES)
    return EulerAncestralScheduler(MappingProxyType(cfg), alphas_cumprod_from_config(cfg))
