"""Euler (Karras et al. 2022, Algorithm 2 without churn), as diffusers' EulerDiscreteScheduler.

Works on the unscaled sample x = x0 + sigma * eps: the denoiser gets x / sqrt(sigma^2 + 1)
and the initial latents are scaled up by the largest sigma.
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
    karras_sigmas,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    spaced_timesteps,
)
from .config import TIMESTEP_SPACINGS, require, resolve_config, validate_common
from .protocol import NoiseSource

CLASS_NAME = "EulerDiscreteScheduler"
DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_spacing": "linspace",
    "timestep_type": "discrete",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
})
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "original_sample")


def euler_step(
    model_output: np.ndarray, sample: np.ndarray, sigma: np.float32, sigma_next: np.float32, prediction_type: str
) -> np.ndarray:
    """One Euler step of dx/dsigma = (x - x0) / sigma from sigma to sigma_next."""
    denoised = denoised_ve(model_output, sample, sigma, prediction_type)
    derivative = (sample - denoised) / sigma
    return sample + derivative * (sigma_next - sigma)


def euler_sigmas(cfg: Mapping[str, Any], alphas_cumprod: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps float32, sigmas float32 with the final sigma appended) for n steps."""
    timesteps = spaced_timesteps(cfg["timestep_spacing"], cfg["num_train_timesteps"], n, cfg["steps_offset"])
    timesteps = timesteps.astype(F32)
    train_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
    sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    if cfg["use_karras_sigmas"]:
        sigma_min = cfg["sigma_min"] if cfg["sigma_min"] is not None else sigmas[-1].item()
        sigma_max = cfg["sigma_max"] if cfg["sigma_max"] is not None else sigmas[0].item()
        sigmas = karras_sigmas(sigma_min, sigma_max, n)
        timesteps = sigma_to_t(sigmas, np.log(train_sigmas)).astype(F32)
    if cfg["final_sigmas_type"] == "sigma_min":
        sigma_last = train_sigmas[0]
    else:
        sigma_last = 0
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(F32)
    if cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction":
        # EDM-style conditioning: the denoiser takes c_noise = log(sigma) / 4, not a timestep
        timesteps = F32(0.25) * np.log(sigmas[:-1])
    return timesteps, sigmas


def timesteps_for_sigmas(cfg: Mapping[str, Any], alphas_cumprod: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """timesteps float32 for custom float32 sigmas (final sigma included), as diffusers'
    set_timesteps(sigmas=...): each sigma's fractional training timestep."""
    if cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction":
        return F32(0.25) * np.log(sigmas[:-1])
    train_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
    return sigma_to_t(sigmas[:-1], np.log(train_sigmas)).astype(F32)


@dataclass(frozen=True, eq=False)
class EulerScheduler(SchedulerBase):
    name = "euler"
    class_name = CLASS_NAME
    takes_sigmas = True
    sigmas_include_final = True

    def _plan(self, n: int, sigmas: np.ndarray | None, mu: None, window: Window) -> EulerRun:
        if sigmas is None:
            timesteps, sigmas = euler_sigmas(self.config, self.alphas_cumprod, n)
        else:
            timesteps = timesteps_for_sigmas(self.config, self.alphas_cumprod, sigmas)
        return EulerRun(self, timesteps, sigmas, window)


def initial_sigma(sigmas: np.ndarray, timestep_spacing: str) -> float:
    """diffusers' init_noise_sigma: the largest sigma, or sqrt(sigma^2 + 1) for leading spacing."""
    max_sigma = sigmas.max()
    if timestep_spacing in ("linspace", "trailing"):
        return float(max_sigma)
    return float(np.sqrt(max_sigma * max_sigma + F32(1)))


class EulerRun(RunBase):
    def __init__(self, scheduler: EulerScheduler, timesteps: np.ndarray, sigmas: np.ndarray, window: Window):
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
        return euler_step(
            as_float32(model_output), as_float32(sample), self._sigmas[j], self._sigmas[j + 1], self._prediction_type
        )

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        return add_noise_ve(as_float32(original_samples), as_float32(noise), self._sigmas[self._at(i)])


def validate_sigma_options(cfg: Mapping[str, Any]) -> None:
    """Euler's sigma schedule keys: linear interpolation, optionally Karras; nothing else."""
    require(CLASS_NAME, "interpolation_type", cfg["interpolation_type"], ("linear",))
    require(CLASS_NAME, "use_exponential_sigmas", cfg["use_exponential_sigmas"], (False,))
    require(CLASS_NAME, "use_beta_sigmas", cfg["use_beta_sigmas"], (False,))
    require(CLASS_NAME, "timestep_type", cfg["timestep_type"], ("discrete", "continuous"))
    require(CLASS_NAME, "final_sigmas_type", cfg["final_sigmas_type"], ("zero", "sigma_min"))


def from_config(config: Mapping[str, Any], **overrides: Any) -> EulerScheduler:
    """EulerDiscreteScheduler.from_config(config, **overrides)."""
    cfg = resolve_config(DEFAULTS, config, overrides)
    validate_common(CLASS_NAME, cfg)
    require(CLASS_NAME, "timestep_spacing", cfg["timestep_spacing"], TIMESTEP_SPACINGS)
    require(CLASS_NAME, "prediction_type", cfg["prediction_type"], PREDICTION_TYPES)
    validate_sigma_options(cfg)
    return EulerScheduler(MappingProxyType(cfg), alphas_cumprod_from_config(cfg))
