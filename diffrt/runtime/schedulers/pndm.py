"""PNDM (Liu et al. 2022): Runge-Kutta warm-up (PRK) then 4th-order linear multistep (PLMS),
as diffusers' PNDMScheduler (SD1.x's default, usually with skip_prk_steps=True).

With skip_prk_steps the first step is taken twice (Euler, then Heun on the same interval),
so a run has num_inference_steps + 1 denoiser calls; without, 12 PRK calls replace the
first 3 steps (num_inference_steps + 9 calls, num_inference_steps >= 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from .base import RunBase, SchedulerBase, Window
from .common import F32, add_noise_vp, alphas_cumprod_from_config, as_float32, epsilon_vp, spaced_timesteps
from .config import TIMESTEP_SPACINGS, require, resolve_config, validate_common
from .protocol import NoiseSource

CLASS_NAME = "PNDMScheduler"
DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "skip_prk_steps": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
})
PREDICTION_TYPES = ("epsilon", "v_prediction")
PNDM_ORDER = 4


def pndm_transfer(
    sample: np.ndarray, eps: np.ndarray, alpha_prod_t: np.float32, alpha_prod_t_prev: np.float32
) -> np.ndarray:
    """The PNDM transfer function phi (Liu et al. eq. 11): move sample from t to t_prev along eps."""
    beta_prod_t, beta_prod_t_prev = F32(1) - alpha_prod_t, F32(1) - alpha_prod_t_prev
    sample_coeff = np.sqrt(alpha_prod_t_prev / alpha_prod_t)
    denom = alpha_prod_t * np.sqrt(beta_prod_t_prev) + np.sqrt(alpha_prod_t * beta_prod_t * alpha_prod_t_prev)
    return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * eps / denom


def plms_combination(ets: list[np.ndarray]) -> np.ndarray:
    """Adams-Bashforth combination of the last 1-4 model outputs (oldest first)."""
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return 1 / 24 * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])


def pndm_timesteps(cfg: Mapping[str, Any], n: int) -> tuple[np.ndarray, int]:
    """(all denoiser timesteps in call order, number of leading PRK calls)."""
    ascending = np.round(
        spaced_timesteps(cfg["timestep_spacing"], cfg["num_train_timesteps"], n, cfg["steps_offset"])
    )[::-1].astype(np.int64)
    if cfg["skip_prk_steps"]:
        # the first interval is visited twice: the repeated entry is the Heun correction
        plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        return plms.copy(), 0
    half_step = cfg["num_train_timesteps"] // n // 2
    prk = ascending[-PNDM_ORDER:].repeat(2) + np.tile(np.array([0, half_step]), PNDM_ORDER)
    prk = prk[:-1].repeat(2)[1:-1][::-1]
    return np.concatenate([prk, ascending[:-3][::-1]]).astype(np.int64), len(prk)


@dataclass(frozen=True, eq=False)
class PNDMScheduler(SchedulerBase):
    name = "pndm"
    class_name = CLASS_NAME

    def _plan(self, n: int, sigmas: None, mu: None, window: Window) -> PNDMRun:
        cfg = self.config
        if not cfg["skip_prk_steps"] and n < PNDM_ORDER:
            # diffusers fails in set_timesteps here: the PRK warm-up needs 4 timesteps
            raise ValueError(
                f"num_inference_steps={n} is not supported with skip_prk_steps=False; allowed: "
                f"{PNDM_ORDER}..{cfg['num_train_timesteps']}"
            )
        timesteps, num_prk = pndm_timesteps(cfg, n)
        return PNDMRun(self, timesteps, num_prk, cfg["num_train_timesteps"] // n, window)


class PNDMRun(RunBase):
    """Holds the multistep history; diffusers' `counter` is this run's call index i.

    A run that starts part-way (begin > 0) restarts the warm-up there, as diffusers does:
    PNDM has no set_begin_index, so img2img feeds it timesteps[begin:] with its counter
    at 0 (the Heun correction of call 1 and the PRK stages are then taken from the full
    plan's intervals, not the window's)."""

    def __init__(self, scheduler: PNDMScheduler, timesteps: np.ndarray, num_prk: int, step_ratio: int,
                 window: Window):
        super().__init__(timesteps.astype(F32), window)
        self._scheduler = scheduler
        self._timesteps = timesteps
        self._num_prk = num_prk
        self._step_ratio = step_ratio
        self._next = 0
        self._ets: list[np.ndarray] = []  # model outputs of the main steps, oldest first
        self._cur_sample: np.ndarray | None = None
        self._cur_model_output: Any = 0

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource | None = None
    ) -> np.ndarray:
        t = int(self._timesteps[self._at(i)])
        if i != self._next:
            raise ValueError(f"step index i={i} is not supported here; allowed: {self._next} (steps run in order)")
        model_output, sample = as_float32(model_output), as_float32(sample)
        if i < self._num_prk:
            prev_sample = self._step_prk(model_output, i, t, sample)
        else:
            prev_sample = self._step_plms(model_output, i, t, sample)
        self._next += 1
        return prev_sample

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        alpha_prod = self._scheduler.alphas_cumprod[int(self._timesteps[self._at(i)])]
        return add_noise_vp(as_float32(original_samples), as_float32(noise), alpha_prod)

    def _step_prk(self, model_output: np.ndarray, i: int, t: int, sample: np.ndarray) -> np.ndarray:
        """One of the 4 Runge-Kutta stages; the 4th applies the weighted (1, 2, 2, 1)/6 average."""
        prev_t = t - (0 if i % 2 else self._step_ratio // 2)
        t = int(self._timesteps[i // 4 * 4])
        if i % 4 == 0:
            self._cur_model_output += 1 / 6 * model_output
            self._ets.append(model_output)
            self._cur_sample = sample
        elif i % 4 in (1, 2):
            self._cur_model_output += 1 / 3 * model_output
        else:
            model_output = self._cur_model_output + 1 / 6 * model_output
            self._cur_model_output = 0
        return self._transfer(self._cur_sample, t, prev_t, model_output)

    def _step_plms(self, model_output: np.ndarray, i: int, t: int, sample: np.ndarray) -> np.ndarray:
        prev_t = t - self._step_ratio
        if i != 1:
            self._ets = self._ets[-3:] + [model_output]
        else:
            # skip_prk's second call redoes the first interval from the saved sample (Heun)
            prev_t, t = t, t + self._step_ratio
        if len(self._ets) == 1 and i == 0:
            self._cur_sample = sample
        elif len(self._ets) == 1 and i == 1:
            model_output = (model_output + self._ets[-1]) / 2
            sample, self._cur_sample = self._cur_sample, None
        else:
            model_output = plms_combination(self._ets)
        return self._transfer(sample, t, prev_t, model_output)

    def _transfer(self, sample: np.ndarray, t: int, prev_t: int, model_output: np.ndarray) -> np.ndarray:
        s = self._scheduler
        alpha_prod_t = s.alphas_cumprod[t]
        alpha_prod_t_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod
        eps = epsilon_vp(
            model_output, sample, np.sqrt(alpha_prod_t), np.sqrt(F32(1) - alpha_prod_t), s.prediction_type
        )
        return pndm_transfer(sample, eps, alpha_prod_t, alpha_prod_t_prev)


def from_config(config: Mapping[str, Any], **overrides: Any) -> PNDMScheduler:
    """PNDMScheduler.from_config(config, **overrides)."""
    cfg = resolve_config(DEFAULTS, config, overrides)
    validate_common(CLASS_NAME, cfg)
    require(CLASS_NAME, "timestep_spacing", cfg["timestep_spacing"], TIMESTEP_SPACINGS)
    require(CLASS_NAME, "prediction_type", cfg["prediction_type"], PREDICTION_TYPES)
    alphas_cumprod = alphas_cumprod_from_config(cfg)
    final = F32(1.0) if cfg["set_alpha_to_one"] else alphas_cumprod[0]
    return PNDMScheduler(MappingProxyType(cfg), alphas_cumprod, final)
