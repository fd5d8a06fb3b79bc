"""Euler on a rectified flow (SD3, Flux), as diffusers' FlowMatchEulerDiscreteScheduler.

The sample moves on the straight line x_sigma = (1 - sigma) x0 + sigma eps from sigma = 1
(noise) to 0; the denoiser predicts the velocity dx/dsigma = eps - x0 ("flow"
prediction), and a step is x + (sigma_next - sigma) v. The denoiser's timestep is
sigma * num_train_timesteps; its input is not scaled and initial latents are plain noise.

The schedule is shifted toward high noise: by the config's `shift` (SD3: 3.0), or, with
`use_dynamic_shifting` (Flux dev), by `mu`, which the pipeline computes from the image
size (`mu_for(image_seq_len)`, diffusers' `calculate_shift`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from .base import RunBase, SchedulerBase, Window
from .common import F32, as_float32
from .config import require, resolve_config
from .protocol import NoiseSource

CLASS_NAME = "FlowMatchEulerDiscreteScheduler"
DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
})
TIME_SHIFT_TYPES = ("exponential", "linear")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu for an image of `image_seq_len` latent tokens: linear from base_shift at
    base_seq_len to max_shift at max_seq_len (diffusers' Flux/SD3 calculate_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def static_shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """shift * s / (1 + (shift - 1) * s), in the dtype of `sigmas` (diffusers' arithmetic)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(sigmas: np.ndarray, mu: float, time_shift_type: str) -> np.ndarray:
    """Resolution-dependent shift: e^mu / (e^mu + (1/s - 1)) or mu / (mu + (1/s - 1))."""
    scale = math.exp(mu) if time_shift_type == "exponential" else mu
    with np.errstate(divide="ignore"):  # s = 0 maps to 0, as in diffusers
        return scale / (scale + (1 / sigmas - 1) ** 1.0)


def train_sigma_bounds(cfg: Mapping[str, Any]) -> tuple[float, float]:
    """(sigma_max, sigma_min) of the training schedule diffusers builds in __init__
    (float32 torch: t/T for t = T..1, statically shifted unless dynamic)."""
    n = cfg["num_train_timesteps"]
    ends = np.array([n, 1], dtype=F32) / F32(n)
    if not cfg["use_dynamic_shifting"]:
        shift = cfg["shift"]
        ends = F32(shift) * ends / (F32(1) + F32(shift - 1) * ends)
    return float(ends[0]), float(ends[1])


def flow_sigmas(cfg: Mapping[str, Any], n: int, sigmas: np.ndarray | None, mu: float | None) -> np.ndarray:
    """float32 sigmas of an n-step plan, before the final 0 is appended.

    The default schedule is linear in t between the training sigma bounds (float64,
    like diffusers), then shifted; custom sigmas (float32) are shifted too.
    """
    t = cfg["num_train_timesteps"]
    if sigmas is None:
        sigma_max, sigma_min = train_sigma_bounds(cfg)
        sigmas = np.linspace(sigma_max * t, sigma_min * t, n) / t
    if cfg["use_dynamic_shifting"]:
        sigmas = time_shift(sigmas, mu, cfg["time_shift_type"])
    else:
        sigmas = static_shift(sigmas, float(cfg["shift"]))
    return sigmas.astype(F32)


def flow_euler_step(model_output: Any, sample: Any, sigma: np.float32, sigma_next: np.float32) -> Any:
    """x_{sigma_next} = x_sigma + (sigma_next - sigma) * v."""
    return sample + (sigma_next - sigma) * model_output


@dataclass(frozen=True, eq=False)
class FlowMatchEulerScheduler(SchedulerBase):
    name = "flow_match_euler"
    class_name = CLASS_NAME
    takes_sigmas = True
    takes_mu = True

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def needs_mu(self) -> bool:
        return bool(self.config["use_dynamic_shifting"])

    def mu_for(self, image_seq_len: int) -> float:
        """`mu` for an image of this many latent tokens, from the config's base/max shift
        and sequence lengths (what diffusers' Flux and SD3 pipelines pass to set_timesteps)."""
        cfg = self.config
        keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
        missing = [key for key in keys if cfg[key] is None]
        if missing:
            raise ValueError(f"{CLASS_NAME}: {', '.join(missing)} is None; the resolution-dependent shift needs "
                             "base_shift, max_shift, base_image_seq_len and max_image_seq_len")
        return calculate_shift(image_seq_len, *(cfg[key] for key in keys))

    def _plan(self, n: int, sigmas: np.ndarray | None, mu: float | None, window: Window) -> FlowMatchEulerRun:
        sigmas = flow_sigmas(self.config, n, sigmas, mu)
        timesteps = sigmas * F32(self.config["num_train_timesteps"])
        return FlowMatchEulerRun(timesteps, np.concatenate([sigmas, np.zeros(1, F32)]), window)


class FlowMatchEulerRun(RunBase):
    """Stateless: each step reads its own sigma and the next."""

    def __init__(self, timesteps: np.ndarray, sigmas: np.ndarray, window: Window):
        super().__init__(timesteps, window, sigmas)

    def step(self, model_output: Any, i: int, sample: Any, rng: NoiseSource | None = None) -> Any:
        j = self._at(i)
        return flow_euler_step(as_float32(model_output), as_float32(sample), self._sigmas[j], self._sigmas[j + 1])

    def add_noise(self, original_samples: Any, noise: Any, i: int) -> Any:
        """(1 - sigma) x0 + sigma eps at the step's sigma (diffusers' scale_noise)."""
        sigma = self._sigmas[self._at(i)]
        return sigma * as_float32(noise) + (F32(1) - sigma) * as_float32(original_samples)


def validate(cfg: Mapping[str, Any]) -> None:
    if isinstance(cfg["num_train_timesteps"], bool) or not isinstance(cfg["num_train_timesteps"], int) \
            or cfg["num_train_timesteps"] < 1:
        raise ValueError(f"{CLASS_NAME}: num_train_timesteps={cfg['num_train_timesteps']!r} is not supported; "
                         "allowed: an integer >= 1")
    shift = cfg["shift"]
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 < shift < math.inf:
        raise ValueError(f"{CLASS_NAME}: shift={shift!r} is not supported; allowed: a number > 0")
    require(CLASS_NAME, "use_dynamic_shifting", cfg["use_dynamic_shifting"], (False, True))
    require(CLASS_NAME, "time_shift_type", cfg["time_shift_type"], TIME_SHIFT_TYPES)
    # compared with `in`: diffusers tests these for truthiness, so 0 / 0.0 mean off too
    require(CLASS_NAME, "shift_terminal", cfg["shift_terminal"], (None, 0))
    for key in ("invert_sigmas", "stochastic_sampling", "use_karras_sigmas", "use_exponential_sigmas",
                "use_beta_sigmas"):
        require(CLASS_NAME, key, cfg[key], (False,))


def from_config(config: Mapping[str, Any], **overrides: Any) -> FlowMatchEulerScheduler:
    """FlowMatchEulerDiscreteScheduler.from_config(config, **overrides)."""
    cfg = resolve_config(DEFAULTS, config, overrides)
    validate(cfg)
    return FlowMatchEulerScheduler(MappingProxyType(cfg))
