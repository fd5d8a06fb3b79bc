"""The two types the pipeline codes against; every scheduler file provides both.

These are structural types (no shared implementation): a `Scheduler` is immutable and
built once from a checkpoint's scheduler_config.json; `plan()` gives a fresh
`SchedulerRun` per generation, which holds whatever history a multistep sampler needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np


class NoiseSource(Protocol):
    """What a run draws injected noise from (a `np.random.Generator` satisfies it)."""

    def standard_normal(self, size: tuple[int, ...], dtype: Any = ...) -> np.ndarray: ...


class SchedulerRun(Protocol):
    """Per-generation state; call `step` with i = 0, 1, ... len(timesteps) - 1 in order."""

    timesteps: np.ndarray
    """float32, one entry per denoiser call: exactly the values diffusers feeds the denoiser."""
    init_noise_sigma: float
    """Initial latents are standard normal noise times this (diffusers' prepare_latents)."""

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray: ...

    def step(
        self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource | None = None
    ) -> np.ndarray: ...


class Scheduler(Protocol):
    name: str
    """Our name for the algorithm, one of SCHEDULER_NAMES."""
    class_name: str
    """The diffusers class whose semantics it follows, e.g. "PNDMScheduler"."""
    config: Mapping[str, Any]
    """Resolved config: every key the diffusers class takes, as `Class.from_config` sets it."""

    @property
    def prediction_type(self) -> str: ...

    def plan(self, num_inference_steps: int) -> SchedulerRun: ...
