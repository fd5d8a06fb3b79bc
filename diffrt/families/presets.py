"""Named generation recipes (distilled few-step or full-step)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """A named recipe. `None` fields fall back to the checkpoint's own defaults.

    `guidance_scale=None` lets the family decide (e.g. LCM: the distilled guidance
    embedding's scale when the denoiser has one, else 1.0 = no CFG).
    """

    name: str
    description: str
    num_inference_steps: int
    scheduler: str | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"Preset {self.name!r}: num_inference_steps must be >= 1, got {self.num_inference_steps}")
