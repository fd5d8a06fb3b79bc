"""The torch side of ControlNets (`diffrt export SRC OUT --controlnet FOLDER ...`), SD 1.x/2.x
and SDXL. The stage layout (names, IO, facts) is diffrt.runtime.controlnet_layout.

Each FOLDER is a diffusers ControlNetModel (save_pretrained). Before the long part of
the export, each is checked against the checkpoint's UNet: a ControlNet made for another
base (cross_attention_dim, block_out_channels, in_channels, layers, or SDXL's added
conditioning) is a one-line error naming the folder and what differs. Then each becomes
a stage `controlnet_<i>`, and the UNet is exported once more as `unet-controlnet`, with
the residual inputs; both are checked against torch like every other stage, and get
fused-attention graphs (`derive_fused`) and half-precision ones (export/variants.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffrt.artifacts import FUSED_VARIANT, StageSpec
from diffrt.errors import DiffrtError
from diffrt.export.checkpoint import quiet_library_progress
from diffrt.export.sd import StageModule, load_module
from diffrt.export.variants import UPCAST_FACT
from diffrt.runtime import controlnet_layout as layout

logger = logging.getLogger(__name__)

NOT_ONE = "give a saved diffusers ControlNetModel folder (config.json + weights)"


@dataclasses.dataclass(frozen=True)
class ControlNetSource:
    """A checked --controlnet folder: where it is and its residual layout."""

    path: Path
    channels: tuple[int, ...]
    """Each residual's channels: the down residuals, then the mid one."""
    downsamples: tuple[int, ...]
    conditioning_channels: int
    upcast_attention: bool = False
    """Its config's upcast_attention (SD 2.x): its half graphs compute attention scores in fp32."""


class ControlNetStage(torch.nn.Module):
    """sample, timestep, encoder_hidden_states [, text_embeds, time_ids], controlnet_cond,
    conditioning_scale -> each residual times its scale (ControlNetModel.forward's last
    step, with the scales as an input so guess mode's ramp needs no second graph)."""

    def __init__(self, controlnet: torch.nn.Module, names: Sequence[str]):
        super().__init__()
        self.controlnet = controlnet
        self.names = tuple(names)

    def forward(self, *args):
        feeds = dict(zip(self.names, args, strict=True))
        added = {k: feeds[k] for k in ("text_embeds", "time_ids") if k in feeds} or None
        down, mid = self.controlnet(feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds[
            "encoder_hidden_states"], controlnet_cond=feeds[layout.COND_INPUT], conditioning_scale=1.0,
            added_cond_kwargs=added, return_dict=False)
        scale = feeds[layout.SCALE_INPUT]
        return (*(d * scale[k] for k, d in enumerate(down)), mid * scale[-1])


class ResidualUNetStage(torch.nn.Module):
    """The UNet with ControlNet residuals as inputs (down_block_additional_residuals,
    mid_block_additional_residual), inputs in the order of its stage IO."""

    def __init__(self, unet: torch.nn.Module, names: Sequence[str], residuals: int):
        super().__init__()
        self.unet = unet
        self.names = tuple(names)
        self.residuals = residuals

    def forward(self, *args):
        feeds = dict(zip(self.names, args, strict=True))
        added = {k: feeds[k] for k in ("text_embeds", "time_ids") if k in feeds} or None
        down = tuple(feeds[layout.down_residual(k)] for k in range(self.residuals - 1))
        return self.unet(feeds["sample"], feeds["timestep"], encoder_hidden_states=feeds["encoder_hidden_states"],
                         timestep_cond=feeds.get("timestep_cond"), added_cond_kwargs=added,
                         down_block_additional_residuals=down,
                         mid_block_additional_residual=feeds[layout.MID_RESIDUAL], return_dict=False)[0]


def _config(path: Path) -> Any:
    """The ControlNetModel config of `path` (defaults filled in; no weights read)."""
    from diffusers import ControlNetModel

    if not (path / "config.json").is_file():
        raise DiffrtError(f"--controlnet {path}: no config.json there; {NOT_ONE}")
    quiet_library_progress()
    try:
        config = ControlNetModel.load_config(path)
        if config.get("_class_name") not in (None, "ControlNetModel"):
            raise ValueError(f"it holds a {config.get('_class_name')}, not a ControlNetModel")
        with torch.device("meta"):
            return ControlNetModel.from_config(config).config
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffrtError(f"--controlnet {path}: cannot read it as a ControlNetModel ({first}); {NOT_ONE}") from None


def _per_block(value: Any, blocks: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * blocks


def _differences(cn: Any, unet: Any) -> list[str]:
    """What a ControlNet's config and the UNet's disagree on, of what the residuals and
    the conditioning depend on."""
    keys = ["in_channels", "cross_attention_dim", "block_out_channels", "layers_per_block", "down_block_types",
            "addition_embed_type"]
    if unet.addition_embed_type == "text_time":  # SDXL's added conditioning (pooled text + time ids)
        keys += ["addition_time_embed_dim", "projection_class_embeddings_input_dim"]
    out = []
    for key in keys:
        ours, theirs = getattr(cn, key, None), getattr(unet, key, None)
        if isinstance(ours, (list, tuple)) or isinstance(theirs, (list, tuple)):
            blocks = len(unet.block_out_channels)
            ours = tuple(ours) if key == "down_block_types" else tuple(_per_block(ours, blocks))
            theirs = tuple(theirs) if key == "down_block_types" else tuple(_per_block(theirs, blocks))
        if ours != theirs:
            out.append(f"{key} {_show(ours)} (the UNet's: {_show(theirs)})")
    return out


def _show(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def check_sources(paths: Sequence[str | Path], folder: Path, model: Mapping[str, Any],
                  takes_image: bool = False) -> list[ControlNetSource]:
    """Every --controlnet folder read (configs only) and checked against the
    checkpoint's UNet: a one-line error naming the folder and what differs."""
    from diffusers import UNet2DConditionModel

    if not paths:
        return []
    if takes_image:
        raise DiffrtError("--controlnet: this checkpoint is an SDXL refiner; ControlNets steer a base model")
    if not (folder / "unet" / "config.json").is_file():
        raise DiffrtError(f"--controlnet: {folder} has no unet/; ControlNets are for SD 1.x/2.x and SDXL UNets")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")).config
    sources = []
    for value in paths:
        path = Path(value)
        cn = _config(path)
        differs = _differences(cn, unet)
        if differs:
            raise DiffrtError(f"--controlnet {path}: made for another base model: {'; '.join(differs)}")
        if cn.global_pool_conditions:
            raise DiffrtError(f"--controlnet {path}: global_pool_conditions (shuffle ControlNets) is not supported")
        factor = 2 ** (len(cn.conditioning_embedding_out_channels) - 1)
        if factor != int(model["vae_scale_factor"]):
            raise DiffrtError(f"--controlnet {path}: its conditioning embedding downsamples {factor}x, this "
                              f"checkpoint's VAE {model['vae_scale_factor']}x; made for another base model")
        if cn.controlnet_conditioning_channel_order != "rgb":
            raise DiffrtError(f"--controlnet {path}: controlnet_conditioning_channel_order "
                              f"{cn.controlnet_conditioning_channel_order!r} is not supported (rgb only)")
        channels, downsamples = _layout(cn)
        sources.append(ControlNetSource(path, channels, downsamples, int(cn.conditioning_channels),
                                        bool(getattr(cn, "upcast_attention", False))))
    return sources


def _layout(cn: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Each residual's channels and downsampling steps, as ControlNetModel makes them:
    conv_in's output, each down block's layers (and its downsampler but the last's), the mid block."""
    blocks = len(cn.block_out_channels)
    layers = _per_block(cn.layers_per_block, blocks)
    channels, downsamples = [cn.block_out_channels[0]], [0]
    for i, width in enumerate(cn.block_out_channels):
        channels += [width] * layers[i]
        downsamples += [i] * layers[i]
        if i < blocks - 1:
            channels.append(width)
            downsamples.append(i + 1)
    channels.append(cn.block_out_channels[-1])
    downsamples.append(blocks - 1)
    return tuple(int(c) for c in channels), tuple(downsamples)


def add_jobs(io: dict, jobs: list, sources: Sequence[ControlNetSource], folder: Path, model: Mapping[str, Any],
             denoiser: str) -> None:
    """Append the ControlNet stages and the residual UNet to the exporter's jobs
    (name, role, variant, facts, load), and their IO to `io` (by stage name)."""
    if not sources:
        return
    channels, downsamples = sources[0].channels, sources[0].downsamples
    residuals = layout.residual_specs(channels, downsamples)
    unet_io = io[denoiser]
    facts = {layout.CHANNELS_FACT: list(channels), layout.DOWNSAMPLES_FACT: list(downsamples)}
    for index, source in enumerate(sources):
        name = layout.role(index)
        io[name] = layout.controlnet_io(unet_io[0], source.conditioning_channels, residuals)
        jobs.append((name, name, "default", {**facts, layout.SOURCE_FACT: source.path.name,
                                             UPCAST_FACT: source.upcast_attention},
                     lambda source=source, names=[t.name for t in io[name][0]]: _controlnet_stage(
                         source, names, model)))
    io[layout.RESIDUAL_UNET] = layout.residual_unet_io(unet_io, residuals)
    names = [t.name for t in io[layout.RESIDUAL_UNET][0]]
    jobs.append((layout.RESIDUAL_UNET, denoiser, layout.RESIDUAL_VARIANT, facts,
                 lambda: _residual_unet_stage(folder, names, sources[0], model)))


def _feeds(names: Sequence[str], source: ControlNetSource, model: Mapping[str, Any], batch: int, h: int, w: int,
           gen: torch.Generator, chunks: int = 1) -> dict[str, torch.Tensor]:
    """Seeded inputs for a ControlNet or residual-UNet stage at latent size (h, w)."""
    f = int(model["vae_scale_factor"])
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    known = {
        "sample": lambda: randn(batch, int(model["latent_channels"]), h, w),
        "timestep": lambda: torch.full((batch,), 501.0),
        "encoder_hidden_states": lambda: randn(batch, chunks * int(model["text_max_length"]),  # weighted prompts' chunks
                                               int(model["cross_attention_dim"])),
        "text_embeds": lambda: randn(batch, int(model.get("projection_dim") or 1)),
        "time_ids": lambda: torch.tensor([[h * f, w * f, 0, 0, h * f, w * f][:int(model.get("time_ids") or 6)]]
                                         * batch, dtype=torch.float32),
        "timestep_cond": lambda: randn(batch, int(model.get("time_cond_proj_dim") or 1)),
        layout.COND_INPUT: lambda: torch.rand(batch, source.conditioning_channels, h * f, w * f, generator=gen),
        layout.SCALE_INPUT: lambda: torch.linspace(0.5, 1.5, len(source.channels)),
    }
    specs = {t.name: t for t in layout.residual_specs(source.channels, source.downsamples)}
    out = {}
    for name in names:
        if name in specs:
            shape = layout.residual_shape(batch, int(specs[name].shape[1]),
                                          source.downsamples[list(specs).index(name)], h, w)
            out[name] = randn(*shape) * 0.5
        else:
            out[name] = known[name]()
    return out


def _stage(module: torch.nn.Module, weights: torch.nn.Module, component: str, names: Sequence[str],
           source: ControlNetSource, model: Mapping[str, Any]) -> StageModule:
    """Traced at latent sizes that are not multiples of 2**num_upsamplers (as the UNet is,
    export/sd.py SampleInputs), checked at another shape."""
    gen = torch.Generator().manual_seed(7)
    up = 2 ** int(model["num_upsamplers"])
    trace = _feeds(names, source, model, 2, up + 1, 2 * up + 1, gen, chunks=2)  # the text length is dynamic too
    check = _feeds(names, source, model, 1, 2 * up, 3 * up, gen)
    return StageModule(module, tuple(trace.values()), check, weights=weights, component=component)


def load_controlnet(path: Path) -> torch.nn.Module:
    from diffusers import ControlNetModel

    quiet_library_progress()
    try:
        module = ControlNetModel.from_pretrained(path, torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffrtError(f"--controlnet {path}: cannot load it as a ControlNetModel ({first}); {NOT_ONE}") from None
    return module.eval().requires_grad_(False)


def _controlnet_stage(source: ControlNetSource, names: Sequence[str], model: Mapping[str, Any]) -> StageModule:
    module = load_controlnet(source.path)
    return _stage(ControlNetStage(module, names), module, "controlnet", names, source, model)


def _residual_unet_stage(folder: Path, names: Sequence[str], source: ControlNetSource,
                         model: Mapping[str, Any]) -> StageModule:
    from diffusers import UNet2DConditionModel

    quiet_library_progress()
    unet = load_module(folder, "unet", UNet2DConditionModel, "the checkpoint needs unet/")
    return _stage(ResidualUNetStage(unet, names, len(source.channels)), unet, "unet", names, source, model)


def derive_fused(stages: Mapping[str, StageSpec], feeds: Mapping[str, Any], staging: Path) -> dict[str, StageSpec]:
    """Fused-attention graphs of the ControlNet stages and the residual UNet (variants.py
    makes them for the default variants of the family's attention roles only); the
    half-precision pass then covers them as it covers every fp32 stage."""
    from diffrt.export.passes import fuse_attention
    from diffrt.export.variants import FUSED_TOLERANCE, _checked, _mapped

    derived = {}
    for source in [s for s in stages.values() if s.name == layout.RESIDUAL_UNET or s.role in layout.roles(stages)]:
        name = f"{source.name}-fused"
        t0 = time.perf_counter()
        files, report = fuse_attention(staging / source.name, staging / name)
        if not report.complete:
            raise RuntimeError(f"{source.name}: fused {report.fused} of {report.found} attention blocks "
                               f"({'; '.join(report.not_fused) or 'none found'})")
        variant = layout.FUSED_RESIDUAL_VARIANT if source.name == layout.RESIDUAL_UNET else FUSED_VARIANT
        spec = dataclasses.replace(source, name=name, variant=variant, passes=(*source.passes, "fuse_attention"))
        spec = _mapped(spec, source, staging, report.initializers)
        derived[name] = _checked(spec, source, files, staging, feeds[source.name], "ort", FUSED_TOLERANCE)
        logger.info("%s: %d attention blocks fused in %.1fs, max abs error vs %s %.2e", name, report.fused,
                    time.perf_counter() - t0, source.name, derived[name].max_abs_error)
    return derived


__all__ = ["ControlNetSource", "add_jobs", "check_sources", "derive_fused", "load_controlnet"]
