"""What an artifact's ControlNet stages look like: stage names, roles, IO, facts. Torch-free;
shared by the exporter (diffrt.export.controlnet) and the runtime (diffrt.runtime.controlnet).

Each ControlNet is a role of its own, `controlnet_0`, `controlnet_1`, ... (in the order
given at export), with the usual variants (fused-attention) and precisions beside it.
Roles, not variants of one role: variants are alternative graphs of one computation that
a pipeline picks one of, while several ControlNets all run in the same step.

The UNet gets one more variant, "controlnet" (and "fused-attention+controlnet"): the same
weights with the ControlNets' residuals as inputs, `down_residual_0..N-1` and
`mid_residual`, added where diffusers adds down_block_additional_residuals and
mid_block_additional_residual. A plain generation never opens it.

A ControlNet stage takes the UNet's sample, timestep, encoder_hidden_states (SDXL: also
text_embeds and time_ids), `controlnet_cond` (the control image, (batch, 3, H, W) in
[0, 1]) and `conditioning_scale`, one factor per residual (N + 1: the down residuals,
then the mid one): the ControlNet's outputs are multiplied by them, so the runtime gives
diffusers' constant scale or, in guess mode, its logspace(-1, 0, N + 1) ramp times the scale.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from diffrt.artifacts import TensorSpec

ROLE_PREFIX = "controlnet_"
RESIDUAL_VARIANT = "controlnet"
FUSED_RESIDUAL_VARIANT = "fused-attention+controlnet"
RESIDUAL_UNET = "unet-controlnet"
COND_INPUT = "controlnet_cond"
SCALE_INPUT = "conditioning_scale"
MID_RESIDUAL = "mid_residual"
# stage facts of a ControlNet: where it came from, and each residual's downsampling steps
SOURCE_FACT = "source"
DOWNSAMPLES_FACT = "residual_downsamples"
CHANNELS_FACT = "residual_channels"
_ROLE = re.compile(rf"^{ROLE_PREFIX}(\d+)$")


def role(index: int) -> str:
    return f"{ROLE_PREFIX}{index}"


def down_residual(index: int) -> str:
    return f"down_residual_{index}"


def roles(stages: Mapping[str, Any]) -> list[str]:
    """The ControlNet roles among a manifest's stages, in order (controlnet_0, controlnet_1, ...)."""
    found = {int(m.group(1)) for s in stages.values() if (m := _ROLE.match(s.role))}
    return [role(i) for i in sorted(found)]


def _spatial(name: str, downsamples: int) -> str:
    return name if downsamples == 0 else f"{name}_{downsamples}"


def residual_specs(channels: Sequence[int], downsamples: Sequence[int]) -> tuple[TensorSpec, ...]:
    """down_residual_k ... then mid_residual: (batch, channels, latent size halved `downsamples` times)."""
    names = [down_residual(k) for k in range(len(channels) - 1)] + [MID_RESIDUAL]
    return tuple(TensorSpec(n, "float32", ("batch", int(c), _spatial("latent_height", d), _spatial("latent_width", d)))
                 for n, c, d in zip(names, channels, downsamples, strict=True))


def residual_shape(batch: int, channels: int, downsamples: int, height: int, width: int) -> tuple[int, ...]:
    """A residual's shape at latent size (height, width): each downsample is a stride-2
    convolution with padding 1 (diffusers' Downsample2D), so sizes round up."""
    for _ in range(downsamples):
        height, width = (height + 1) // 2, (width + 1) // 2
    return (batch, channels, height, width)


def controlnet_io(unet_inputs: Sequence[TensorSpec], cond_channels: int, residuals: tuple[TensorSpec, ...]
                  ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """A ControlNet stage's IO: the UNet's conditioning inputs (not LCM's timestep_cond,
    which ControlNetModel does not take), the control image and the scales; the residuals."""
    taken = tuple(t for t in unet_inputs if t.name != "timestep_cond")
    inputs = (*taken, TensorSpec(COND_INPUT, "float32", ("batch", int(cond_channels), "height", "width")),
              TensorSpec(SCALE_INPUT, "float32", (len(residuals),)))
    return inputs, residuals


def residual_unet_io(unet_io: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]],
                     residuals: tuple[TensorSpec, ...]) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    inputs, outputs = unet_io
    return (*inputs, *residuals), outputs
