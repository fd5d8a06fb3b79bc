"""The two types the pipeline codes against; every scheduler file provides both.

A `Scheduler` is immutable and built once from a checkpoint's scheduler_config.json;
`plan()` gives a fresh `SchedulerRun` per generation, which holds whatever history a
multistep sampler needs. The shared implementation is in base.py; these Protocols are
the contract (see the package docstring for how the pieces are used).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np


class NoiseSource(Protocol):
    """What a run draws injected noise from (a `np.random.Generator` satisfies it)."""

    def standard_normal(self, size: tuple[int, ...], dtype: Any = ...) -> np.ndarray: ...


class SchedulerRun(Protocol):
    """Per-generation state over the steps [begin, end) of a plan; call `step` with
    i = 0, 1, ... len(timesteps) - 1 in order (index i is the plan's step begin + i)."""

    timesteps: np.ndarray
    """float32, one entry per denoiser call: exactly the values diffusers feeds the denoiser."""
    init_noise_sigma: float
    """Initial latents are standard normal noise times this (diffusers' prepare_latents)."""

    def scale_model_input(self, sample: Any, i: int) -> Any: ...

    def step(self, model_output: Any, i: int, sample: Any, rng: NoiseSource | None = None) -> Any: ...

    def add_noise(self, original_samples: Any, noise: Any, i: int) -> Any:
        """`original_samples` noised to the level of step i's input (diffusers'
        `add_noise(x0, noise, timesteps[i])`; flow matching: `scale_noise`)."""
        ...


class Scheduler(Protocol):
    name: str
    """Our name for the algorithm, one of SCHEDULER_NAMES."""
    class_name: str
    """The diffusers class whose semantics it follows, e.g. "PNDMScheduler"."""
    config: Mapping[str, Any]
    """Resolved config: every key the diffusers class takes, as `Class.from_config` sets it."""
    order: int
    """diffusers' `scheduler.order` (1 for every scheduler here)."""

    @property
    def prediction_type(self) -> str: ...

    @property
    def needs_mu(self) -> bool: ...

    def plan(
        self,
        num_inference_steps: int | None = None,
        *,
        begin: int = 0,
        end: int | None = None,
        sigmas: Sequence[float] | np.ndarray | None = None,
        mu: float | None = None,
    ) -> SchedulerRun: ...
