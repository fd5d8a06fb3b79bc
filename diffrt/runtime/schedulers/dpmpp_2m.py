"""DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler with
algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint"; optionally on
Karras sigmas ("dpmpp_2m_karras").

The first step, and the last one when diffusers lowers the order there, is first order
(DDIM in x0 form); every other step uses the previous step's denoised sample too.
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
    alpha_sigma_from_sigma,
    alphas_cumprod_from_config,
    as_float32,
    denoised_vp,
    karras_sigmas,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
)
from .config import TIMESTEP_SPACINGS, hidden_config_value, require, resolve_config, validate_common
from .protocol import NoiseSource

CLASS_NAME = "DPMSolverMultistepScheduler"
DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
})
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# diffusers rewrites these (configs of DEIS / UniPC) to the DPM-Solver equivalents on init
ALGORITHM_ALIASES = {"deis": "dpmsolver++"}
SOLVER_TYPE_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}


def log_snr(sigma: np.float32) -> np.float32:
    """lambda = log(alpha_t) - log(sigma_t); +inf at sigma = 0 (the final step)."""
    alpha_t, sigma_t = alpha_sigma_from_sigma(sigma)
    with np.errstate(divide="ignore"):
        return np.log(alpha_t) - np.log(sigma_t)


def dpmpp_first_order(denoised: np.ndarray, sample: np.ndarray, sigma_s: np.float32, sigma_t: np.float32) -> np.ndarray:
    """x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0, i.e. DDIM in x0 form."""
    alpha_t, sigma_t_vp = alpha_sigma_from_sigma(sigma_t)
    _, sigma_s_vp = alpha_sigma_from_sigma(sigma_s)
    h = log_snr(sigma_t) - log_snr(sigma_s)
    return sigma_t_vp / sigma_s_vp * sample - alpha_t * (np.exp(-h) - F32(1.0)) * denoised


def dpmpp_2m_second_order(
    denoised: np.ndarray,
    prev_denoised: np.ndarray,
    sample: np.ndarray,
    sigma_prev: np.float32,
    sigma_s: np.float32,
    sigma_t: np.float32,
) -> np.ndarray:
    """Multistep midpoint update: the first-order step plus half the finite-difference correction D1."""
    alpha_t, sigma_t_vp = alpha_sigma_from_sigma(sigma_t)
    _, sigma_s_vp = alpha_sigma_from_sigma(sigma_s)
    lambda_t, lambda_s0, lambda_s1 = log_snr(sigma_t), log_snr(sigma_s), log_snr(sigma_prev)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    with np.errstate(divide="ignore"):  # h = 0 when sigma_min is both last sigmas: D1 -> 0, as in diffusers
        d1 = F32(1.0) / (h_0 / h) * (denoised - prev_denoised)
    scale = alpha_t * (np.exp(-h) - F32(1.0))
    return sigma_t_vp / sigma_s_vp * sample - scale * denoised - F32(0.5) * scale * d1


def dpm_timesteps(cfg: Mapping[str, Any], alphas_cumprod: np.ndarray, n: int) -> np.ndarray:
    """int64 timesteps before any Karras re-spacing; DPM spaces n + 1 points and drops the last."""
    t_train = cfg["num_train_timesteps"]
    # lambda_min_clipped cuts off the low-SNR end (cosine schedules): only t below it are used
    lambdas = np.log(np.sqrt(alphas_cumprod)) - np.log(np.sqrt(F32(1) - alphas_cumprod))
    last_timestep = t_train - int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"]))
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        step_ratio = last_timestep // (n + 1)
        return (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].astype(np.int64) + cfg["steps_offset"]
    return np.arange(last_timestep, 0, -t_train / n).round().astype(np.int64) - 1


@dataclass(frozen=True, eq=False)
class DPMSolverMultistepScheduler(SchedulerBase):
    class_name = CLASS_NAME

    @property
    def name(self) -> str:
        return "dpmpp_2m_karras" if self.config["use_karras_sigmas"] else "dpmpp_2m"

    def _plan(self, n: int, sigmas: None, mu: None, window: Window) -> DPMSolverMultistepRun:
        cfg = self.config
        timesteps = dpm_timesteps(cfg, self.alphas_cumprod, n)
        train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        if cfg["use_karras_sigmas"]:
            # diffusers reads sigma_min / sigma_max with hasattr(config, ...), which also sees
            # keys carried over from another scheduler's config
            sigma_min = cfg.get("sigma_min") if cfg.get("sigma_min") is not None else train_sigmas[0].item()
            sigma_max = cfg.get("sigma_max") if cfg.get("sigma_max") is not None else train_sigmas[-1].item()
            sigmas = karras_sigmas(sigma_min, sigma_max, n)
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
            # astype truncates: diffusers rounds except for the cosine schedule
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        sigma_last = train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(F32)
        return DPMSolverMultistepRun(self, timesteps, sigmas, window)


class DPMSolverMultistepRun(RunBase):
    def __init__(self, scheduler: DPMSolverMultistepScheduler, timesteps: np.ndarray, sigmas: np.ndarray,
                 window: Window):
        super().__init__(timesteps.astype(F32), window, sigmas)
        cfg = scheduler.config
        self._prediction_type = scheduler.prediction_type
        self._num_steps = n = len(timesteps)
        # diffusers drops to first order on the last step of the full plan for short plans,
        # or whenever the final sigma is 0 (a second-order step would divide by h = inf there)
        self._first_order_final = (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero"
        )
        # the first step may be any index (like diffusers' set_begin_index: the first step
        # is first order); then steps run in order
        self._next: int | None = None
        self._prev_denoised: np.ndarray | None = None

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource | None = None
    ) -> np.ndarray:
        j = self._at(i)
        if self._next is not None and i != self._next:
            raise ValueError(f"step index i={i} is not supported here; allowed: {self._next} (steps run in order)")
        model_output, sample = as_float32(model_output), as_float32(sample)
        sigma_s, sigma_t = self._sigmas[j], self._sigmas[j + 1]
        alpha_s, sigma_s_vp = alpha_sigma_from_sigma(sigma_s)
        denoised = denoised_vp(model_output, sample, alpha_s, sigma_s_vp, self._prediction_type)
        if self._prev_denoised is None or (j == self._num_steps - 1 and self._first_order_final):
            prev_sample = dpmpp_first_order(denoised, sample, sigma_s, sigma_t)
        else:
            prev_sample = dpmpp_2m_second_order(
                denoised, self._prev_denoised, sample, self._sigmas[j - 1], sigma_s, sigma_t
            )
        self._prev_denoised = denoised
        self._next = i + 1
        return prev_sample

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """x = alpha_t x0 + sigma_t eps at the step's sigma (DPM-Solver works in the VP process)."""
        alpha_t, sigma_t = alpha_sigma_from_sigma(self._sigmas[self._at(i)])
        return alpha_t * as_float32(original_samples) + sigma_t * as_float32(noise)


def validate(cfg: Mapping[str, Any]) -> None:
    validate_common(CLASS_NAME, cfg)
    require(CLASS_NAME, "timestep_spacing", cfg["timestep_spacing"], TIMESTEP_SPACINGS)
    require(CLASS_NAME, "prediction_type", cfg["prediction_type"], PREDICTION_TYPES)
    require(CLASS_NAME, "algorithm_type", cfg["algorithm_type"], ("dpmsolver++", *ALGORITHM_ALIASES))
    require(CLASS_NAME, "solver_type", cfg["solver_type"], ("midpoint", *SOLVER_TYPE_ALIASES))
    require(CLASS_NAME, "solver_order", cfg["solver_order"], (2,))
    require(CLASS_NAME, "variance_type", cfg["variance_type"], (None,))
    unsupported_flags = ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas")
    for key in (*unsupported_flags, "use_dynamic_shifting"):
        require(CLASS_NAME, key, cfg[key], (False,))
    require(CLASS_NAME, "final_sigmas_type", cfg["final_sigmas_type"], ("zero", "sigma_min"))


def from_config(config: Mapping[str, Any], **overrides: Any) -> DPMSolverMultistepScheduler:
    """DPMSolverMultistepScheduler.from_config(config, **overrides)."""
    cfg = resolve_config(DEFAULTS, config, overrides)
    validate(cfg)
    cfg["algorithm_type"] = ALGORITHM_ALIASES.get(cfg["algorithm_type"], cfg["algorithm_type"])
    cfg["solver_type"] = SOLVER_TYPE_ALIASES.get(cfg["solver_type"], cfg["solver_type"])
    for key in ("sigma_min", "sigma_max"):
        if hidden_config_value(config, key) is not None:
            cfg[key] = hidden_config_value(config, key)
    return DPMSolverMultistepScheduler(MappingProxyType(cfg), alphas_cumprod_from_config(cfg))
