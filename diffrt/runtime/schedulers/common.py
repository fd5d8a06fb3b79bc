"""Math shared by the schedulers: beta schedules, timestep spacing, sigma schedules, and the
one conversion of a model output (epsilon / v_prediction / sample) into a denoised sample.

Precision follows diffusers: betas, alphas_cumprod, sigmas and step coefficients are
float32 (diffusers builds them as float32 torch tensors); schedules that diffusers builds
in float64 numpy (interpolated and Karras sigmas, timesteps) are float64 until the same
final cast to float32. Scalar constants are written as np.float32 so coefficients stay
float32 under numpy 1.x promotion rules too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from diffrt.runtime import arrays

from .protocol import NoiseSource

F32 = np.float32


# -- beta schedules ---------------------------------------------------------------------


def linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=torch.float32) bit for bit.

    torch computes a float32 step and fills the first half as start + step*i and the second
    half as end - step*(steps-1-i), each with one rounding (a fused multiply-add); np.linspace
    rounds differently and would move ~1/3 of diffusers' betas by one ulp.
    """
    start32, end32 = F32(start), F32(end)
    if steps == 1:
        return np.array([start32], dtype=F32)
    step = np.float64((end32 - start32) / F32(steps - 1))
    i = np.arange(steps)
    # float32 * int < 2**29 is exact in float64, so one float64 add + cast == one fma rounding
    head = (np.float64(start32) + step * i).astype(F32)
    tail = (np.float64(end32) - step * (steps - 1 - i)).astype(F32)
    return np.where(i < steps // 2, head, tail)


def squaredcos_cap_v2_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule (Nichol & Dhariwal 2021), in float64 like diffusers, then float32."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=F32)


def betas_from_config(cfg: Mapping[str, Any]) -> np.ndarray:
    if cfg["trained_betas"] is not None:
        return np.array(cfg["trained_betas"], dtype=F32)
    n, schedule = cfg["num_train_timesteps"], cfg["beta_schedule"]
    if schedule == "linear":
        return linspace_float32(cfg["beta_start"], cfg["beta_end"], n)
    if schedule == "scaled_linear":
        betas = linspace_float32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n)
        return betas * betas
    if schedule == "squaredcos_cap_v2":
        return squaredcos_cap_v2_betas(n)
    raise ValueError(f"beta_schedule={schedule!r} is not supported; allowed: linear, scaled_linear, squaredcos_cap_v2")


def alphas_cumprod_from_config(cfg: Mapping[str, Any]) -> np.ndarray:
    """float32 cumulative product of 1 - beta.

    torch.cumprod accumulates float32 in float64 on CPU; doing the same keeps every entry
    bit-identical to diffusers' alphas_cumprod.
    """
    alphas = F32(1.0) - betas_from_config(cfg)
    return readonly(np.cumprod(alphas.astype(np.float64)).astype(F32))


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Noise-to-signal ratio sqrt((1 - a) / a) per training timestep, ascending in t, float32."""
    return np.sqrt((F32(1.0) - alphas_cumprod) / alphas_cumprod)


# -- timestep spacing -------------------------------------------------------------------


def spaced_timesteps(
    spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int
) -> np.ndarray:
    """Descending float64 timesteps for the "Common Diffusion Noise Schedules" spacings.

    linspace is returned unrounded: DDIM/PNDM round it, Euler keeps the fractions.
    steps_offset applies to leading only, as in diffusers.
    """
    t, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, t - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (t // n)).round()[::-1] + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(t, 0, -t / n)) - 1
    raise ValueError(f"timestep_spacing={spacing!r} is not supported; allowed: leading, trailing, linspace")


# -- sigma schedules (Euler, DPM-Solver) -------------------------------------------------


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: descending float64 sigmas, evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log sigma.

    log_sigmas is float32 (as in diffusers); the mixed float32/float64 arithmetic below is
    diffusers' own, kept so the rounded timesteps come out identical.
    """
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


# -- model output conversion (the one place that knows epsilon / v / sample) ---------------


def denoised_vp(model_output: np.ndarray, sample: np.ndarray, alpha_t, sigma_t, prediction_type: str) -> np.ndarray:
    """x0 from a model output at x_t = alpha_t * x0 + sigma_t * eps (DDIM, LCM, DPM-Solver++)."""
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; allowed: epsilon, v_prediction, sample")


def epsilon_vp(model_output: np.ndarray, sample: np.ndarray, alpha_t, sigma_t, prediction_type: str) -> np.ndarray:
    """eps from a model output at x_t = alpha_t * x0 + sigma_t * eps (DDIM, PNDM)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t * model_output + sigma_t * sample
    if prediction_type == "sample":
        return (sample - alpha_t * model_output) / sigma_t
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; allowed: epsilon, v_prediction, sample")


def denoised_ve(model_output: np.ndarray, sample: np.ndarray, sigma, prediction_type: str) -> np.ndarray:
    """x0 from a model output at x = x0 + sigma * eps (Euler's unscaled sample, k-diffusion style).

    The denoiser saw x / sqrt(sigma^2 + 1), so a v prediction converts with that scale.
    """
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / np.sqrt(sigma * sigma + F32(1))) + sample / (sigma * sigma + F32(1))
    if prediction_type in ("sample", "original_sample"):
        return model_output
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; allowed: epsilon, v_prediction, sample")


# -- the forward process: noising a clean sample to a step's noise level (img2img) ----------


def add_noise_vp(original: Any, noise: Any, alpha_prod: np.float32) -> Any:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps: DDPM's q(x_t | x0) (add_noise of DDIM, PNDM, LCM)."""
    return np.sqrt(alpha_prod) * original + np.sqrt(F32(1) - alpha_prod) * noise


def add_noise_ve(original: Any, noise: Any, sigma: np.float32) -> Any:
    """x = x0 + sigma * eps: the unscaled sample Euler steps (add_noise of Euler, Euler ancestral)."""
    return original + noise * sigma


def alpha_sigma_from_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """(alpha_t, sigma_t) of the VP process whose noise-to-signal ratio is sigma."""
    alpha_t = F32(1.0) / np.sqrt(sigma * sigma + F32(1.0))
    return alpha_t, sigma * alpha_t


# -- small helpers for the runs -------------------------------------------------------------


def readonly(array: np.ndarray) -> np.ndarray:
    """Schedulers are shared across generations; their arrays must not be edited in place."""
    array.setflags(write=False)
    return array


def as_float32(array: Any) -> Any:
    """float32 in the array's own namespace: numpy stays numpy, a CuPy or torch array
    stays on its device (the steps below are written for any of them)."""
    return arrays.as_float32(array)


def clip(array: Any, low: float, high: float) -> Any:
    return arrays.namespace(array).clip(array, low, high)


def check_index(i: int, num_timesteps: int) -> int:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < num_timesteps:
        raise ValueError(f"step index i={i!r} is not supported; allowed: 0..{num_timesteps - 1}")
    return int(i)


def draw_noise(rng: NoiseSource | None, like: Any, scheduler: str, i: int) -> Any:
    """Standard normal float32 noise of `like`'s shape, drawn where diffusers calls
    randn_tensor. It is drawn on the host (per-image numpy generators make an image
    independent of its batch and its device) and copied to `like`'s device: one small
    copy, only for the samplers that inject noise."""
    if rng is None:
        raise ValueError(f"{scheduler} injects noise at step i={i}; pass rng (a numpy Generator), not None")
    return arrays.like(np.asarray(rng.standard_normal(tuple(like.shape), dtype=F32), dtype=F32), like)
