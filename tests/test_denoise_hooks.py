"""The denoising loop's per-step seams: `denoiser_hooks` wrap each denoiser call
(outermost first; a hook may add feeds or answer without the denoiser) and
`after_step` replaces the sample after each scheduler step."""

from __future__ import annotations

import numpy as np

from diffrt.families.base import DenoisePlan, NoGuidance
from diffrt.runtime.denoise import denoise


class _Run:
    """A scheduler run that adds the model output to the sample."""
    timesteps = np.array([30.0, 20.0, 10.0])

    def scale_model_input(self, sample, i):
        return sample

    def step(self, output, i, sample, rng):
        return sample + output


class _Denoiser:
    def __init__(self):
        self.calls = []

    def run(self, feeds):
        self.calls.append(sorted(feeds))
        return {"out_sample": np.full_like(feeds["sample"], float(feeds["timestep"][0]))}


def _plan(**kwargs):
    return DenoisePlan(rows=1, noise_shape=(1, 1, 2, 2), feeds={"encoder_hidden_states": np.zeros((1, 3))},
                       guidance=NoGuidance(), **kwargs)


def _run(plan, denoiser):
    sample, _ = denoise(plan, _Run(), np.zeros((1, 1, 2, 2), np.float32), denoiser, None, lambda a: a)
    return sample


def test_without_hooks_each_step_calls_the_denoiser_once():
    denoiser = _Denoiser()
    assert np.all(_run(_plan(), denoiser) == 60.0)  # 30 + 20 + 10
    assert denoiser.calls == [["encoder_hidden_states", "sample", "timestep"]] * 3


def test_hooks_wrap_the_call_outermost_first_and_may_skip_the_denoiser():
    seen = []

    def adds_a_feed(i, feeds, call_next):
        seen.append(("outer", i))
        return call_next({**feeds, "residual": np.ones(1)})

    def caches_odd_steps(i, feeds, call_next):
        seen.append(("inner", i, "residual" in feeds))
        if i % 2:
            return {"out_sample": np.full_like(feeds["sample"], -1.0)}
        return call_next(feeds)

    denoiser = _Denoiser()
    sample = _run(_plan(denoiser_hooks=(adds_a_feed, caches_odd_steps)), denoiser)
    assert seen == [("outer", 0), ("inner", 0, True), ("outer", 1), ("inner", 1, True), ("outer", 2), ("inner", 2, True)]
    assert len(denoiser.calls) == 2 and all("residual" in c for c in denoiser.calls)
    assert np.all(sample == 30.0 - 1.0 + 10.0)


def test_after_step_replaces_the_sample():
    plan = _plan(after_step=lambda i, sample: sample * 0 if i == 1 else sample)
    assert np.all(_run(plan, _Denoiser()) == 10.0)  # reset after step 1, then + 10
