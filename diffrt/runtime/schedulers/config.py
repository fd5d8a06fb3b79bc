"""diffusers' `from_config` semantics and the validation shared by every scheduler."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def resolve_config(
    defaults: Mapping[str, Any], config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The init arguments of `Class.from_config(config, **overrides)` for a class with these defaults.

    Keys the class does not take (other schedulers' keys, `_class_name`, ...) are ignored;
    missing keys take the class default. A diffusers scheduler's in-memory config lists
    the keys that took defaults under `_use_default_values`, and from_config drops those
    so the new class applies its own defaults (a saved scheduler_config.json has no such list).
    """
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"override keys {unknown} are not scheduler config keys; allowed: {sorted(defaults)}")
    defaulted = set(config.get("_use_default_values") or ())
    resolved = {}
    for key, default in defaults.items():
        if key in overrides:
            resolved[key] = overrides[key]
        elif key in config and key not in defaulted:
            resolved[key] = config[key]
        else:
            resolved[key] = default
    return resolved


def hidden_config_value(config: Mapping[str, Any], key: str) -> Any:
    """A key the class does not take but diffusers still keeps in `scheduler.config`.

    diffusers registers every unknown key of the source config on the new scheduler's
    config, and some code reads them with `hasattr(self.config, key)`; None if absent.
    """
    if key in set(config.get("_use_default_values") or ()):
        return None
    return config.get(key)


def require(class_name: str, key: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise ValueError unless `value` is one of `allowed`.

    Compared with `in`, so a JSON 0 passes for False like it does for diffusers' truthiness tests.
    """
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(
            f"{class_name}: {key}={value!r} is not supported; allowed: {', '.join(repr(a) for a in allowed)}"
        )


def validate_common(class_name: str, cfg: Mapping[str, Any]) -> None:
    """Keys every scheduler here shares: the beta schedule and the features none of them support."""
    if not isinstance(cfg["num_train_timesteps"], int) or cfg["num_train_timesteps"] < 2:
        raise ValueError(
            f"{class_name}: num_train_timesteps={cfg['num_train_timesteps']!r} is not supported; "
            "allowed: an integer >= 2"
        )
    if cfg["trained_betas"] is None:
        # diffusers ignores beta_schedule when trained_betas is given
        require(class_name, "beta_schedule", cfg["beta_schedule"], BETA_SCHEDULES)
    elif len(cfg["trained_betas"]) != cfg["num_train_timesteps"]:
        raise ValueError(
            f"{class_name}: trained_betas has {len(cfg['trained_betas'])} entries; allowed: exactly "
            f"num_train_timesteps={cfg['num_train_timesteps']}"
        )
    if "rescale_betas_zero_snr" in cfg:
        require(class_name, "rescale_betas_zero_snr", cfg["rescale_betas_zero_snr"], (False,))
    if "thresholding" in cfg:
        require(class_name, "thresholding", cfg["thresholding"], (False,))


def check_num_inference_steps(num_inference_steps: int, maximum: int) -> int:
    """1 <= num_inference_steps <= maximum (diffusers' own upper bound for the scheduler)."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"num_inference_steps={num_inference_steps!r} is not supported; allowed: an integer")
    if not 1 <= num_inference_steps <= maximum:
        raise ValueError(f"num_inference_steps={num_inference_steps} is not supported; allowed: 1..{maximum}")
    return int(num_inference_steps)
