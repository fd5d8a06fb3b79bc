"""numpy schedulers with diffusers' semantics, configured from a scheduler_config.json dict.

    scheduler = make_scheduler(scheduler_name_for(cfg["_class_name"], cfg), cfg)
    run = scheduler.plan(num_inference_steps)          # fresh per generation
    latents = noise * run.init_noise_sigma
    for i, t in enumerate(run.timesteps):
        model_input = run.scale_model_input(latents, i)
        model_output = denoiser(model_input, t)
        latents = run.step(model_output, i, latents, rng)

Choosing a scheduler by name behaves like diffusers' `OtherScheduler.from_config(cfg)`:
keys the class does not take are ignored, missing keys take that class's defaults.
Steps run on any array namespace (numpy, CuPy, torch: diffrt.runtime.arrays); the
result stays in the input's namespace. A scheduler also says `order` (diffusers'; 1
for all here), `max_inference_steps`, `takes_sigmas`, `needs_mu` and `prediction_type`
("epsilon" | "v_prediction" | "sample" | "flow").

Planning: `scheduler.plan(num_inference_steps=None, *, begin=0, end=None, sigmas=None,
mu=None) -> SchedulerRun`, as diffusers' `set_timesteps(n, sigmas=, mu=)` then
`set_begin_index(begin)`:
- `begin`, `end`: the run covers the timesteps [begin, end) of the full n-step plan
  (end=None: to the end). Its step i is the plan's step begin + i, so `run.timesteps`,
  `run.sigmas` (sigma-based schedulers: the sigmas stepped through, the one the run
  ends at included) and every coefficient are the full plan's. Only PNDM differs, as
  in diffusers: it restarts its warm-up at `begin`. "Steps" are denoiser calls (PNDM
  plans n + 1 of them, or n + 9 with its PRK warm-up).
- `sigmas`: a custom schedule, only for the schedulers in `TAKES_SIGMAS` (the others
  raise a one-line ValueError naming them). "euler": n + 1 sigmas, the final one
  included (timesteps are interpolated from them); "flow_match_euler": n sigmas (they
  are shifted like the default ones; a final 0 is appended). num_inference_steps may
  be None (taken from the sigmas) or must agree.
- `mu`: the resolution-dependent shift, for "flow_match_euler" only. Required when its
  config has use_dynamic_shifting (`scheduler.needs_mu`), ignored otherwise (as
  diffusers ignores it); get it with `scheduler.mu_for(image_seq_len)` (image_seq_len =
  latent tokens, e.g. Flux: (h // 16) * (w // 16)). Other schedulers refuse it.

Windows (pure functions, each returns `(begin, end)` for `plan`):
- `strength_window(n, strength, order=scheduler.order, rule="sd") -> (begin, None)`:
  diffusers' img2img strength rule (init_timestep = min(int(n * strength), n);
  t_start = max(n - init_timestep, 0); begin = t_start * order). rule="sd3": the SD3
  and Flux img2img pipelines' variant without the int() (t_start = int(max(n - min(n *
  strength, n), 0)); 10 steps at 0.3 run 3 steps with "sd", 4 with "sd3"). Raises
  ValueError for a strength outside [0, 1] or when no step is left.
- `denoising_window(full_timesteps, num_train_timesteps, denoising_start=None,
  denoising_end=None) -> (begin, end)`: the SDXL base/refiner cut-offs, on the full
  plan's timesteps (`scheduler.plan(n).timesteps`); ValueError for a fraction outside
  (0, 1), start >= end, or no step in between. `plan_window(scheduler, n,
  denoising_start, denoising_end)` is it applied (and refuses a late start for the
  samplers in `CANNOT_START_LATE`: pndm). To combine img2img with a base's
  denoising_end (SDXL img2img), take begin from the first and end from the second.

    # img2img (SD/SDXL): redo the last `strength` of the schedule from image latents
    begin, end = strength_window(n, strength, order=scheduler.order)
    run = scheduler.plan(n, begin=begin, end=end)
    latents = run.add_noise(image_latents, noise, 0)    # then the loop above
    # base + refiner, one schedule cut at fraction f
    full = scheduler.plan(n).timesteps
    base_run = scheduler.plan(n, end=denoising_window(full, T, denoising_end=f)[1])
    refiner_run = scheduler.plan(n, begin=denoising_window(full, T, denoising_start=f)[0])
    # Flux: its own sigma list, shifted by mu
    run = scheduler.plan(n, sigmas=np.linspace(1.0, 1 / n, n), mu=scheduler.mu_for(seq_len))

img2img / inpainting: `run.add_noise(original_samples, noise, i)` noises clean latents
to the level of the run's step i (i = 0: the start of an img2img run), as diffusers'
`add_noise(x0, noise, timesteps[i])` after set_begin_index: sqrt(a) x0 + sqrt(1 - a) eps
(ddim, pndm, lcm); x0 + sigma eps (euler, euler_ancestral: the unscaled sample, no
init_noise_sigma); alpha_t x0 + sigma_t eps (dpmpp_2m*); (1 - sigma) x0 + sigma eps
(flow_match_euler: diffusers' scale_noise). Any array namespace, like `step`.

Flow matching: name "flow_match_euler" (diffusers' FlowMatchEulerDiscreteScheduler,
`scheduler_name_for("FlowMatchEulerDiscreteScheduler", cfg)`); prediction_type "flow"
(the denoiser predicts the velocity eps - x0), timesteps = sigmas * num_train_timesteps
(Flux feeds t / 1000), init_noise_sigma 1, scale_model_input the identity. Config:
shift, use_dynamic_shifting + base_shift / max_shift / base_image_seq_len /
max_image_seq_len, time_shift_type exponential | linear; invert_sigmas,
stochastic_sampling, shift_terminal and Karras/exponential/beta sigmas are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from . import ddim, dpmpp_2m, euler, euler_ancestral, flow_match_euler, lcm, pndm
from .base import TAKES_SIGMAS
from .config import resolve_config
from .protocol import NoiseSource, Scheduler, SchedulerRun
from .window import STRENGTH_RULES, denoising_window, plan_window, strength_window

__all__ = [
    "SCHEDULER_NAMES",
    "STRENGTH_RULES",
    "TAKES_SIGMAS",
    "NoiseSource",
    "Scheduler",
    "SchedulerRun",
    "denoising_window",
    "make_scheduler",
    "plan_window",
    "scheduler_name_for",
    "strength_window",
]

# name -> (the module of its diffusers class, from_config overrides the name implies)
_REGISTRY: dict[str, tuple[ModuleType, Mapping[str, Any]]] = {
    "ddim": (ddim, {}),
    "pndm": (pndm, {}),
    "euler": (euler, {}),
    "euler_ancestral": (euler_ancestral, {}),
    "dpmpp_2m": (dpmpp_2m, {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": (dpmpp_2m, {"use_karras_sigmas": True}),
    "lcm": (lcm, {}),
    "flow_match_euler": (flow_match_euler, {}),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(_REGISTRY)
_SUPPORTED_CLASSES: tuple[str, ...] = tuple(dict.fromkeys(entry[0].CLASS_NAME for entry in _REGISTRY.values()))


def scheduler_name_for(class_name: str, config: Mapping[str, Any]) -> str:
    """Our name for a checkpoint's diffusers scheduler class (its `_class_name`)."""
    if class_name == dpmpp_2m.CLASS_NAME:
        use_karras = resolve_config(dpmpp_2m.DEFAULTS, config)["use_karras_sigmas"]
        return "dpmpp_2m_karras" if use_karras else "dpmpp_2m"
    for name, (module, _) in _REGISTRY.items():
        if module.CLASS_NAME == class_name:
            return name
    raise ValueError(f"scheduler class {class_name!r} is not supported; choose one of: {', '.join(_SUPPORTED_CLASSES)}")


def make_scheduler(name: str, config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Scheduler:
    """The scheduler `name` configured from a scheduler_config.json dict (any class's),
    as diffusers' `Class.from_config(config, **overrides)`. `overrides` keys the class
    does not take are ignored (a recipe's `timestep_spacing` means nothing to LCM);
    the ones the name implies (dpmpp_2m_karras: use_karras_sigmas) win."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULER_NAMES)}")
    module, implied = _REGISTRY[name]
    taken = {k: v for k, v in (overrides or {}).items() if k in module.DEFAULTS}
    return module.from_config(config, **{**taken, **implied})
