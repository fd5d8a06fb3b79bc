"""Run part of a schedule: the base/refiner hand-off (diffusers' `denoising_end` and
`denoising_start`), as an ensemble of expert denoisers.

A fraction f of the way through the noise schedule is the training timestep cutoff
`int(round(T - f * T))`. The base pipeline runs the timesteps >= cutoff and hands its
still-noisy latents on; the refiner plans the same number of steps, runs only the
timesteps < cutoff, and starts its sampler there (diffusers' `set_begin_index`), with
the latents it was given: no noise is added and nothing is decoded in between.
"""

from __future__ import annotations

import numpy as np

from .protocol import NoiseSource, Scheduler, SchedulerRun

# Samplers whose state cannot start part-way (PNDM counts its calls from the first one;
# diffusers has no set_begin_index for it either).
CANNOT_START_LATE = ("pndm",)


def check_fraction(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number between 0 and 1 (exclusive), got {value!r}")
    return float(value)


def cutoff_timestep(fraction: float, num_train_timesteps: int) -> int:
    return int(round(num_train_timesteps - fraction * num_train_timesteps))


def window(timesteps: np.ndarray, num_train_timesteps: int, denoising_start: float | None = None,
           denoising_end: float | None = None) -> tuple[int, int]:
    """(begin, stop): the indices of the full schedule's timesteps this run takes."""
    begin, stop = 0, len(timesteps)
    if denoising_end is not None:
        stop = int(np.sum(timesteps >= cutoff_timestep(denoising_end, num_train_timesteps)))
    if denoising_start is not None:
        begin = len(timesteps) - int(np.sum(timesteps < cutoff_timestep(denoising_start, num_train_timesteps)))
    return begin, stop


class WindowRun:
    """The timesteps [begin, stop) of a planned run; index i here is begin + i there."""

    def __init__(self, run: SchedulerRun, begin: int, stop: int):
        self._run, self._begin = run, begin
        self.timesteps = run.timesteps[begin:stop]
        self.init_noise_sigma = run.init_noise_sigma

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return self._run.scale_model_input(sample, self._begin + i)

    def step(self, model_output: np.ndarray, i: int, sample: np.ndarray, rng: NoiseSource | None = None) -> np.ndarray:
        return self._run.step(model_output, self._begin + i, sample, rng)


def plan_window(scheduler: Scheduler, num_inference_steps: int, denoising_start: float | None = None,
                denoising_end: float | None = None) -> SchedulerRun:
    """`scheduler.plan(num_inference_steps)` limited to the part of the schedule
    between the two fractions (None: from the start / to the end)."""
    denoising_start = check_fraction("denoising_start", denoising_start)
    denoising_end = check_fraction("denoising_end", denoising_end)
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}")
    run = scheduler.plan(num_inference_steps)
    if denoising_start is None and denoising_end is None:
        return run
    if denoising_start is not None and scheduler.name in CANNOT_START_LATE:
        raise ValueError(f"the {scheduler.name} sampler cannot start part-way through a schedule "
                         "(denoising_start); choose euler, euler_ancestral, ddim, dpmpp_2m or lcm")
    begin, stop = window(np.asarray(run.timesteps), int(scheduler.config["num_train_timesteps"]),
                         denoising_start, denoising_end)
    if begin >= stop:
        raise ValueError(f"no step of the {num_inference_steps}-step schedule lies in this part of it "
                         f"(denoising_start={denoising_start}, denoising_end={denoising_end}); use more steps")
    return WindowRun(run, begin, stop)


__all__ = ["CANNOT_START_LATE", "WindowRun", "check_fraction", "cutoff_timestep", "plan_window", "window"]
