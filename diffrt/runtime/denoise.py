"""The denoising loop: one function over a family's DenoisePlan and a scheduler run.

It knows no family: the plan says what to feed the denoiser, how guidance combines
its outputs, and the layout of the latents. Everything it touches lives where the
backend computes (numpy on a CPU; a GPU backend's device arrays): the sample, the
conditioning and every step's timestep row are moved there once, before the loop.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from diffrt.families.base import ClassifierFreeGuidance, DenoisePlan, DenoiserCall, DenoiserHook
from diffrt.runtime import arrays

Progress = Callable[[int, int], None]


def device_plan(plan: DenoisePlan, to_device: Callable[[np.ndarray], Any]) -> DenoisePlan:
    """The plan with its conditioning (and a per-row guidance scale) moved to the device once."""
    guidance = plan.guidance
    if isinstance(guidance, ClassifierFreeGuidance) and np.ndim(guidance.scale):
        guidance = dataclasses.replace(guidance, scale=to_device(guidance.scale))
    return dataclasses.replace(plan, feeds={k: to_device(v) for k, v in plan.feeds.items()},
                               static_feeds={k: to_device(v) for k, v in plan.static_feeds.items()}, guidance=guidance,
                               extra_channels=None if plan.extra_channels is None else to_device(plan.extra_channels))


def denoise(plan: DenoisePlan, run: Any, sample: Any, denoiser: Any, rng: Any, to_device: Callable[[np.ndarray], Any],
            progress: Progress | None = None, counted: tuple[int, int, int] = (0, 0, 0)) -> tuple[Any, list[float]]:
    """Run every step of `run` on `sample` (already on the device, in the plan's packed
    layout); returns the denoised sample and the seconds of each denoiser call.

    `progress(step, total)` is called after every call; `counted` = (steps done
    before this run, total steps, calls to skip before counting) makes it count the
    requested steps: PNDM's extra warm-up call is not a step, and a refiner continues
    a base's count. The plan's `denoiser_hooks` wrap each call and its `after_step`
    replaces the sample after each step.
    """
    done, total, extra = counted
    xp = arrays.namespace(sample)
    timesteps = run.timesteps.astype(np.float32)
    if plan.timestep_scale != 1.0:
        timesteps = timesteps * np.float32(plan.timestep_scale)
    timesteps = to_device(np.repeat(timesteps[:, None], plan.model_rows, axis=1))
    call_times = []
    for i in range(len(run.timesteps)):
        t0 = time.perf_counter()
        model_input = run.scale_model_input(plan.guidance.model_input(sample, xp), i)
        if plan.extra_channels is not None:  # after scaling, as diffusers concatenates them
            model_input = xp.concat([model_input, plan.extra_channels], axis=1)
        feeds = {plan.sample_feed: model_input, plan.timestep_feed: timesteps[i], **plan.feeds, **plan.static_feeds,
                 **plan.step_feeds(i, float(run.timesteps[i]))}
        output = plan.guidance.combine(_call(plan.denoiser_hooks, i, denoiser.run)(feeds)[plan.output_name],
                                       sample.shape[0])
        sample = run.step(output, i, sample, rng)
        if plan.after_step is not None:
            sample = plan.after_step(i, sample)
        call_times.append(time.perf_counter() - t0)
        if progress is not None:
            progress(max(0, done + i + 1 - extra), total)
    return sample, call_times


def _call(hooks: tuple[DenoiserHook, ...], i: int, run: DenoiserCall) -> DenoiserCall:
    """Step i's denoiser call wrapped by `hooks`, the first outermost."""
    for hook in reversed(hooks):
        run = _wrapped(hook, i, run)
    return run


def _wrapped(hook: DenoiserHook, i: int, call_next: DenoiserCall) -> DenoiserCall:
    return lambda feeds: hook(i, feeds, call_next)


__all__ = ["denoise", "device_plan"]
