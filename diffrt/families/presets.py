"""Named generation recipes (distilled few-step or full-step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A named recipe. `None` fields fall back to the checkpoint's own defaults.

    `guidance_scale=None` lets the family decide (e.g. LCM: the distilled guidance
    embedding's scale when the denoiser has one, else 1.0 = no CFG).
    `scheduler_config`: (key, value) pairs the recipe sets on the checkpoint's scheduler
    config, as diffusers' `Scheduler.from_config(config, key=value)` (e.g. SDXL-Turbo's
    `timestep_spacing="trailing"`); they apply to whichever scheduler runs.
    `height`/`width`: the size the recipe was distilled at, if not the checkpoint's.
    `source`: where the recipe comes from (the model card or docs it follows).
    `options`: (name, value) pairs of the family's own request options the recipe sets
    (Flux-schnell's max_sequence_length=256); explicit options win.
    """

    name: str
    description: str
    num_inference_steps: int
    scheduler: str | None = None
    guidance_scale: float | None = None
    scheduler_config: tuple[tuple[str, Any], ...] = ()
    height: int | None = None
    width: int | None = None
    source: str = ""
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"Preset {self.name!r}: num_inference_steps must be >= 1, got {self.num_inference_steps}")
