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
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from . import ddim, dpmpp_2m, euler, euler_ancestral, lcm, pndm
from .config import resolve_config
from .protocol import NoiseSource, Scheduler, SchedulerRun
from .window import plan_window

__all__ = [
    "SCHEDULER_NAMES",
    "NoiseSource",
    "Scheduler",
    "SchedulerRun",
    "make_scheduler",
    "plan_window",
    "scheduler_name_for",
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
