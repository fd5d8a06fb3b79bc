"""Which steps of a full plan a run takes: two pure rules that give `(begin, end)` for
`scheduler.plan(n, begin=begin, end=end)`.

- `strength_window`: diffusers' img2img `strength` (how much of the schedule to redo
  from a noised start image). `init_timestep = min(int(n * strength), n)`,
  `t_start = max(n - init_timestep, 0)`, begin = `t_start * scheduler.order` (the SD /
  SDXL img2img pipelines); the SD3 and Flux img2img pipelines skip the int():
  `t_start = int(max(n - min(n * strength, n), 0))` (rule="sd3").
- `denoising_window`: the base/refiner hand-off (diffusers' `denoising_end` and
  `denoising_start`), an ensemble of expert denoisers. A fraction f of the way through
  the noise schedule is the training timestep cutoff `int(round(T - f * T))`; the base
  runs the timesteps >= cutoff and hands its still-noisy latents on; the refiner plans
  the same number of steps and runs only the timesteps < cutoff, starting its sampler
  there (diffusers' `set_begin_index`) with the latents it was given: no noise is added
  and nothing is decoded in between.

`plan_window` is the refiner rule applied: plan(n) limited to the two fractions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .protocol import Scheduler, SchedulerRun

# Samplers whose state cannot start part-way in a refiner hand-off (PNDM restarts its
# warm-up at the window's first step: diffusers has no set_begin_index for it).
CANNOT_START_LATE = ("pndm",)
STRENGTH_RULES = ("sd", "sd3")


def check_fraction(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number between 0 and 1 (exclusive), got {value!r}")
    return float(value)


def cutoff_timestep(fraction: float, num_train_timesteps: int) -> int:
    return int(round(num_train_timesteps - fraction * num_train_timesteps))


def denoising_window(timesteps: np.ndarray, num_train_timesteps: int, denoising_start: float | None = None,
                     denoising_end: float | None = None) -> tuple[int, int]:
    """(begin, end): the indices of the full plan's `timesteps` that lie between the two
    fractions of the schedule (None: from the start / to the end). Raises ValueError when
    a fraction is outside (0, 1), start >= end, or no step lies in between."""
    denoising_start = check_fraction("denoising_start", denoising_start)
    denoising_end = check_fraction("denoising_end", denoising_end)
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}")
    timesteps = np.asarray(timesteps)
    begin, end = 0, len(timesteps)
    if denoising_end is not None:
        end = int(np.sum(timesteps >= cutoff_timestep(denoising_end, num_train_timesteps)))
    if denoising_start is not None:
        begin = len(timesteps) - int(np.sum(timesteps < cutoff_timestep(denoising_start, num_train_timesteps)))
    if begin >= end:
        raise ValueError(f"no step of the {len(timesteps)}-step schedule lies in this part of it "
                         f"(denoising_start={denoising_start}, denoising_end={denoising_end}); use more steps")
    return begin, end


def strength_window(num_inference_steps: int, strength: float, order: int = 1, rule: str = "sd") -> tuple[int, None]:
    """(begin, None): img2img redoes the last `strength` of an n-step plan, as diffusers'
    `get_timesteps` (rule "sd": SD/SDXL img2img; "sd3": SD3/Flux img2img). `order` is
    the scheduler's (`scheduler.order`). Raises ValueError when no step is left."""
    if rule not in STRENGTH_RULES:
        raise ValueError(f"rule={rule!r} is not supported; choose one of: {', '.join(STRENGTH_RULES)}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number between 0 and 1, got {strength!r}")
    n = num_inference_steps
    if rule == "sd":
        t_start = max(n - min(int(n * strength), n), 0)
    else:
        t_start = int(max(n - min(n * strength, n), 0))
    if t_start >= n:
        raise ValueError(f"strength={strength} leaves no step of {n} to run; use a higher strength or more steps")
    return t_start * order, None


def plan_window(scheduler: Scheduler, num_inference_steps: int, denoising_start: float | None = None,
                denoising_end: float | None = None, **schedule: Any) -> SchedulerRun:
    """`scheduler.plan(num_inference_steps, **schedule)` limited to the part of the
    schedule between the two fractions (None: from the start / to the end). `schedule`:
    what a model adds to the plan, e.g. flow matching's `mu` (the family's DenoisePlan
    says; None values are left out)."""
    schedule = {k: v for k, v in schedule.items() if v is not None}
    denoising_start = check_fraction("denoising_start", denoising_start)
    denoising_end = check_fraction("denoising_end", denoising_end)
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}")
    run = scheduler.plan(num_inference_steps, **schedule)
    if denoising_start is None and denoising_end is None:
        return run
    if denoising_start is not None and scheduler.name in CANNOT_START_LATE:
        raise ValueError(f"the {scheduler.name} sampler cannot start part-way through a schedule "
                         "(denoising_start); choose euler, euler_ancestral, ddim, dpmpp_2m or lcm")
    begin, end = denoising_window(run.timesteps, int(scheduler.config["num_train_timesteps"]),
                                  denoising_start, denoising_end)
    return scheduler.plan(num_inference_steps, begin=begin, end=end, **schedule)


__all__ = ["CANNOT_START_LATE", "STRENGTH_RULES", "check_fraction", "cutoff_timestep", "denoising_window",
           "plan_window", "strength_window"]
