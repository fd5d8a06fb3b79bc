"""The shell every scheduler file shares: the frozen scheduler dataclass, `plan()`'s
argument checks, and the run's window over the full plan.

An algorithm file subclasses `SchedulerBase` (sets `name`, `class_name`, and writes
`_plan(n, sigmas, mu, window)`) and `RunBase` (writes `step` and `add_noise`, and
`scale_model_input` where the denoiser input is scaled). What differs between
algorithms stays in their files as small pure functions; only the bookkeeping is here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .common import check_index, readonly
from .config import check_num_inference_steps
from .protocol import NoiseSource, SchedulerRun

# Our names of the schedulers whose diffusers class takes `set_timesteps(sigmas=...)`
# (EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler; the others have no such argument).
TAKES_SIGMAS = ("euler", "flow_match_euler")

Window = tuple[int, "int | None"]


@dataclass(frozen=True, eq=False)
class SchedulerBase:
    """An immutable scheduler: its resolved config and the arrays built from it once.

    `alphas_cumprod` is the training noise schedule of the DDPM-style schedulers (None
    for flow matching); `final_alpha_cumprod` is the "previous" alpha past t = 0 of the
    schedulers that have one (DDIM, PNDM, LCM: diffusers' set_alpha_to_one)."""

    config: Mapping[str, Any]
    alphas_cumprod: np.ndarray | None = None
    final_alpha_cumprod: np.float32 | None = None

    name: ClassVar[str]
    """Our name for the algorithm, one of SCHEDULER_NAMES."""
    class_name: ClassVar[str]
    """The diffusers class whose semantics it follows."""
    order: ClassVar[int] = 1
    """diffusers' `scheduler.order` (1 for every scheduler here): the img2img strength rule scales by it."""
    takes_sigmas: ClassVar[bool] = False
    """Whether the diffusers class takes `set_timesteps(sigmas=...)` (names in TAKES_SIGMAS)."""
    sigmas_include_final: ClassVar[bool] = False
    """Custom `sigmas=` end with the final sigma (Euler) or get a 0 appended (flow matching)."""
    takes_mu: ClassVar[bool] = False
    """Whether `plan` takes `mu` (flow matching; used with use_dynamic_shifting)."""

    @property
    def prediction_type(self) -> str:
        return self.config["prediction_type"]

    @property
    def max_inference_steps(self) -> int:
        """The most steps diffusers plans for this scheduler (LCM: original_inference_steps)."""
        return self.config["num_train_timesteps"]

    @property
    def needs_mu(self) -> bool:
        """Whether `plan` needs `mu` (flow matching with use_dynamic_shifting)."""
        return False

    def plan(
        self,
        num_inference_steps: int | None = None,
        *,
        begin: int = 0,
        end: int | None = None,
        sigmas: Sequence[float] | np.ndarray | None = None,
        mu: float | None = None,
    ) -> SchedulerRun:
        """A fresh run over the timesteps [begin, end) of the full `num_inference_steps` plan
        (as diffusers' set_timesteps(n, sigmas=, mu=) then set_begin_index(begin)).

        `sigmas`: a custom schedule (only where `takes_sigmas`; num_inference_steps may then
        be None). `mu`: the resolution-dependent shift (only where `takes_mu`; required when
        `needs_mu`). Every mistake is a one-line ValueError."""
        if sigmas is None:
            n = self._check_steps(num_inference_steps)
        else:
            sigmas = self._check_sigmas(sigmas)
            n = len(sigmas) - 1 if self.sigmas_include_final else len(sigmas)
            if num_inference_steps is not None and num_inference_steps != n:
                raise ValueError(f"{self.name}: num_inference_steps={num_inference_steps!r} but sigmas= gives {n} "
                                 f"steps; pass num_inference_steps=None or {n}")
            self._check_steps(n)
        return self._plan(n, sigmas, self._check_mu(mu), (begin, end))

    def _plan(self, n: int, sigmas: np.ndarray | None, mu: float | None, window: Window):
        raise NotImplementedError

    def _check_steps(self, num_inference_steps: Any) -> int:
        return check_num_inference_steps(num_inference_steps, self.max_inference_steps)

    def _check_sigmas(self, sigmas: Any) -> np.ndarray:
        if not self.takes_sigmas:
            raise ValueError(f"{self.name}: sigmas= is not supported ({self.class_name} takes no custom sigmas); "
                             f"choose one of: {', '.join(TAKES_SIGMAS)}")
        # diffusers: np.array(sigmas).astype(np.float32)
        try:
            array = np.array(sigmas).astype(np.float32)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name}: sigmas= must be a list of numbers, got {type(sigmas).__name__}") from None
        least = 2 if self.sigmas_include_final else 1
        if array.ndim != 1 or len(array) < least:
            final = " (the last one is the final sigma)" if self.sigmas_include_final else ""
            raise ValueError(f"{self.name}: sigmas= must be a list of at least {least} numbers{final}, "
                             f"got shape {array.shape}")
        bad = array[~np.isfinite(array) | (array < 0)]
        if len(bad):
            raise ValueError(f"{self.name}: sigmas= must be finite numbers >= 0, got {float(bad[0])!r}")
        return array

    def _check_mu(self, mu: Any) -> float | None:
        if mu is None:
            if self.needs_mu:
                raise ValueError(f"{self.name}: use_dynamic_shifting needs mu= (the resolution-dependent shift)")
            return None
        if not self.takes_mu:
            raise ValueError(f"{self.name}: mu= is not supported; it is for flow_match_euler (use_dynamic_shifting)")
        if isinstance(mu, bool) or not isinstance(mu, (int, float, np.integer, np.floating)) or not math.isfinite(mu):
            raise ValueError(f"{self.name}: mu={mu!r} is not supported; allowed: a finite number")
        return float(mu)


def check_window(window: Window, length: int) -> tuple[int, int]:
    """(begin, end) with end=None meaning the end: 0 <= begin < end <= length."""
    begin, end = window
    end = length if end is None else end
    for value in (begin, end):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"begin={begin!r}, end={end!r}: step indices must be integers")
    if not 0 <= begin < end <= length:
        raise ValueError(f"begin={begin}, end={end} is not a window of the {length} timesteps planned; "
                         f"allowed: 0 <= begin < end <= {length}")
    return int(begin), int(end)


class RunBase:
    """One generation's run over the timesteps [begin, end) of a full plan.

    Step index i of this run is index begin + i of the full plan (`_at(i)`): samplers
    that look at neighbours (the next sigma, the previous timestep, the last step)
    see the full plan, as diffusers does after set_begin_index.
    """

    init_noise_sigma: float = 1.0

    def __init__(self, timesteps: np.ndarray, window: Window, sigmas: np.ndarray | None = None):
        begin, end = check_window(window, len(timesteps))
        self._begin = begin
        self.timesteps = readonly(timesteps)[begin:end]
        if sigmas is not None:
            self._sigmas = readonly(sigmas)
            # the sigmas this run steps through, the one it ends at included
            self.sigmas = self._sigmas[begin:end + 1]

    def _at(self, i: int) -> int:
        """The full plan's index of this run's step i."""
        return self._begin + check_index(i, len(self.timesteps))

    def scale_model_input(self, sample: Any, i: int) -> Any:
        self._at(i)
        return sample

    def step(self, model_output: Any, i: int, sample: Any, rng: NoiseSource | None = None) -> Any:
        raise NotImplementedError

    def add_noise(self, original_samples: Any, noise: Any, i: int) -> Any:
        raise NotImplementedError


__all__ = ["TAKES_SIGMAS", "RunBase", "SchedulerBase", "check_window"]
