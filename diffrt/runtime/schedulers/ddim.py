"""DDIM (Song et al. 2020) with eta = 0, as diffusers' DDIMScheduler runs in the SD pipelines."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from .base import RunBase, SchedulerBase, Window
from .common import (
    F32,
    add_noise_vp,
    alphas_cumprod_from_config,
    as_float32,
    clip,
    denoised_vp,
    epsilon_vp,
    spaced_timesteps,
)
from .config import TIMESTEP_SPACINGS, require, resolve_config, validate_common
from .protocol import NoiseSource

CLASS_NAME = "DDIMScheduler"
DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
})
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def ddim_step(
    model_output: np.ndarray,
    sample: np.ndarray,
    alpha_prod_t: np.float32,
    alpha_prod_t_prev: np.float32,
    prediction_type: str,
    clip_range: float | None,
) -> np.ndarray:
    """x_{t-1} = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps (DDIM eq. 12 with sigma_t = 0)."""
    alpha_t, sigma_t = np.sqrt(alpha_prod_t), np.sqrt(F32(1) - alpha_prod_t)
    denoised = denoised_vp(model_output, sample, alpha_t, sigma_t, prediction_type)
    # eps comes from the unclipped x0, like diffusers' default use_clipped_model_output=False
    eps = epsilon_vp(model_output, sample, alpha_t, sigma_t, prediction_type)
    if clip_range is not None:
        denoised = clip(denoised, -clip_range, clip_range)
    return np.sqrt(alpha_prod_t_prev) * denoised + np.sqrt(F32(1) - alpha_prod_t_prev) * eps


@dataclass(frozen=True, eq=False)
class DDIMScheduler(SchedulerBase):
    name = "ddim"
    class_name = CLASS_NAME

    def _plan(self, n: int, sigmas: None, mu: None, window: Window) -> DDIMRun:
        cfg = self.config
        timesteps = spaced_timesteps(cfg["timestep_spacing"], cfg["num_train_timesteps"], n, cfg["steps_offset"])
        # diffusers steps back by num_train_timesteps // n whatever the spacing
        return DDIMRun(self, np.round(timesteps).astype(np.int64), cfg["num_train_timesteps"] // n, window)


class DDIMRun(RunBase):
    """Stateless: each step reads only its own timestep (diffusers has no set_begin_index for DDIM)."""

    def __init__(self, scheduler: DDIMScheduler, timesteps: np.ndarray, step_ratio: int, window: Window):
        super().__init__(timesteps.astype(F32), window)
        self._scheduler = scheduler
        self._timesteps = timesteps
        self._step_ratio = step_ratio

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource | None = None
    ) -> np.ndarray:
        s = self._scheduler
        t = int(self._timesteps[self._at(i)])
        prev_t = t - self._step_ratio
        alpha_prod_t_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod
        clip_range = s.config["clip_sample_range"] if s.config["clip_sample"] else None
        return ddim_step(
            as_float32(model_output), as_float32(sample), s.alphas_cumprod[t], alpha_prod_t_prev,
            s.prediction_type, clip_range,
        )

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        alpha_prod = self._scheduler.alphas_cumprod[int(self._timesteps[self._at(i)])]
        return add_noise_vp(as_float32(original_samples), as_float32(noise), alpha_prod)


def from_config(config: Mapping[str, Any], **overrides: Any) -> DDIMScheduler:
    """DDIMScheduler.from_config(config, **overrides)."""
    cfg = resolve_config(DEFAULTS, config, overrides)
    validate_common(CLASS_NAME, cfg)
    require(CLASS_NAME, "timestep_spacing", cfg["timestep_spacing"], TIMESTEP_SPACINGS)
    require(CLASS_NAME, "prediction_type", cfg["prediction_type"], PREDICTION_TYPES)
    alphas_cumprod = alphas_cumprod_from_config(cfg)
    final = F32(1.0) if cfg["set_alpha_to_one"] else alphas_cumprod[0]
    return DDIMScheduler(MappingProxyType(cfg), alphas_cumprod, final)
