"""ControlNets at run time (SD 1.x/2.x, SDXL), as diffusers' StableDiffusionControlNetPipeline
and StableDiffusionXLControlNetPipeline run them. Torch-free.

A request with `control_image=` (one image per ControlNet the artifact holds, in export
order) is checked once (`check_request`): each image is preprocessed as the pipelines'
control_image_processor (VaeImageProcessor with do_convert_rgb, do_normalize=False) does
it: a PIL image (or a path, read fully; a uint8 array as its pixels) resized with
Lanczos to the request's size, converted to RGB, in [0, 1]; a float (H, W, 3) array in
[0, 1] resized with nearest-neighbour interpolation. Without height/width the request
takes the first control image's size rounded down to the VAE's scale factor, as there.

Per step (`attach` puts a denoiser hook into the plan, diffrt.families.base.DenoiserHook):
every ControlNet whose window [control_guidance_start, control_guidance_end) holds the
step (diffusers' controlnet_keep) runs on the step's UNet inputs with its control image
and conditioning scale; the residuals are summed over ControlNets (MultiControlNetModel)
and fed to the UNet's "controlnet" variant. Outside a ControlNet's window diffusers
multiplies its residuals by 0: it is skipped here (adding zeros changes nothing); when
none runs the UNet gets zeros. guess_mode with CFG runs the ControlNets on the
conditional rows only and gives the unconditional rows zeros; in guess mode the residuals
are scaled by logspace(-1, 0, N + 1) times the scale (ControlNetModel.forward).

The ControlNet stages and the residual UNet are opened by the first request that names
ControlNets (a plain generation never loads them, and runs the plain UNet), in the
plain UNet's precision and attention form, shared with every worker() view. The residual
UNet is a second copy of the UNet's weights in memory.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from diffrt.artifacts import DEFAULT_VARIANT, FUSED_VARIANT, Manifest, StageSpec
from diffrt.errors import DiffrtError
from diffrt.families.base import ClassifierFreeGuidance, DenoisePlan
from diffrt.runtime import arrays
from diffrt.runtime import controlnet_layout as layout
from diffrt.runtime.img2img import _nearest, load_image

logger = logging.getLogger(__name__)

# Backends that run only engines `diffrt build` made, which builds no ControlNet engines yet.
ENGINE_BACKENDS = ("tensorrt",)


@dataclasses.dataclass(frozen=True, eq=False)
class ControlRequest:
    """A request's ControlNets, checked: one entry per ControlNet of the artifact."""

    images: tuple[np.ndarray | None, ...]
    """(1, C, height, width) float32 in [0, 1], preprocessed to the request's size; None
    for a ControlNet this request does not use."""
    scales: tuple[float, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]
    guess_mode: bool = False

    def keep(self, i: int, steps: int) -> list[bool]:
        """diffusers' controlnet_keep[i]: whether each ControlNet acts at step i of `steps`."""
        return [image is not None and not (i / steps < s or (i + 1) / steps > e)
                for image, s, e in zip(self.images, self.starts, self.ends, strict=True)]


def controlnet_roles(manifest: Manifest) -> list[str]:
    return layout.roles(manifest.stages)


def _describe(manifest: Manifest, roles: Sequence[str]) -> str:
    return ", ".join(f"{r} from {manifest.select(r, DEFAULT_VARIANT, 'fp32').facts.get(layout.SOURCE_FACT, '?')}"
                     for r in roles)


def _as_list(name: str, value: Any, count: int, default: float) -> list[float]:
    """A number for every ControlNet, or one number per ControlNet (diffusers' lists)."""
    values = [default if value is None else value] * count if not isinstance(value, (list, tuple)) else list(value)
    if len(values) != count:
        raise DiffrtError(f"{name}: give one number or {count} (one per ControlNet), got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
            raise DiffrtError(f"{name} must be numbers, got {v!r}")
    return [float(v) for v in values]


def default_size(control_image: Any, height: int | None, width: int | None, factor: int) -> tuple[Any, Any]:
    """diffusers' size without height/width: the first control image's, rounded down to
    a multiple of the VAE's scale factor (each missing one)."""
    if control_image is None or (height is not None and width is not None):
        return height, width
    given = [i for i in control_image if i is not None] if isinstance(control_image, (list, tuple)) else [control_image]
    if not given:
        return height, width
    first = given[0]
    picture = _read(first, "control_image")
    own_h, own_w = (picture.height, picture.width) if isinstance(picture, Image.Image) else picture.shape[:2]
    return (own_h - own_h % factor if height is None else height, own_w - own_w % factor if width is None else width)


def check_request(manifest: Manifest, control_image: Any, height: int, width: int, scale: Any = None,
                  start: Any = None, end: Any = None, guess_mode: Any = False,
                  backend: Any = None) -> ControlRequest | None:
    """The request's ControlNets, validated (one-line errors); None without control_image."""
    roles = controlnet_roles(manifest)
    if control_image is None:
        given = [n for n, v in (("controlnet_conditioning_scale", scale), ("control_guidance_start", start),
                                ("control_guidance_end", end)) if v is not None] + (["guess_mode"] if guess_mode else [])
        if given:
            raise DiffrtError(f"{', '.join(given)}: for a generation with ControlNets; pass control_image= too")
        return None
    if not roles:
        raise DiffrtError("control_image: this artifact has no ControlNets; export it with "
                          "diffrt export SRC OUT --controlnet FOLDER")
    if backend is not None:
        check_backend(backend)
    images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    if len(images) != len(roles):
        raise DiffrtError(f"control_image: this artifact has {len(roles)} ControlNet(s) ({_describe(manifest, roles)}); "
                          f"give {len(roles)} control image(s), one per ControlNet in that order (None for one not "
                          f"used), got {len(images)}")
    if all(image is None for image in images):
        raise DiffrtError("control_image: every entry is None; give at least one control image")
    if not isinstance(guess_mode, (bool, np.bool_)):
        raise DiffrtError(f"guess_mode must be True or False, got {guess_mode!r}")
    scales = _as_list("controlnet_conditioning_scale", scale, len(roles), 1.0)
    starts = _as_list("control_guidance_start", start, len(roles), 0.0)
    ends = _as_list("control_guidance_end", end, len(roles), 1.0)
    for s, e in zip(starts, ends, strict=True):
        if not 0.0 <= s < e <= 1.0:  # diffusers' check_inputs
            raise DiffrtError(f"control_guidance_start {s:g} and control_guidance_end {e:g}: need "
                              "0 <= start < end <= 1")
    channels = [int(manifest.select(r, DEFAULT_VARIANT, "fp32").input(layout.COND_INPUT).shape[1]) for r in roles]
    pictures = tuple(None if image is None else preprocess(
        _read(image, f"control_image[{k}]" if len(images) > 1 else "control_image"), height, width, c)
        for k, (image, c) in enumerate(zip(images, channels, strict=True)))
    return ControlRequest(pictures, tuple(scales), tuple(starts), tuple(ends), bool(guess_mode))


def check_backend(backend: Any) -> None:
    """Whether `backend` can run the artifact's ControlNet graphs (a one-line error if not)."""
    if backend.name in ENGINE_BACKENDS:
        raise DiffrtError(f"control_image: the {backend.name} backend has no ControlNet engines yet (diffrt build "
                          "does not build them); run ControlNet requests on the ort or openvino backend")
    if not backend.reads_graphs:
        raise DiffrtError(f"control_image: the {backend.name} backend runs the checkpoint's own modules, not the "
                          "artifact's ControlNet graphs; use the ort or openvino backend")


def _read(image: Any, what: str) -> Image.Image | np.ndarray:
    """A PIL image (any mode) or a float (H, W, 3) array in [0, 1]; a path is read fully."""
    return load_image(image, what, rgb=False)


def preprocess(image: Image.Image | np.ndarray, height: int, width: int, channels: int = 3) -> np.ndarray:
    """VaeImageProcessor(do_convert_rgb=True, do_normalize=False).preprocess(image, height,
    width): (1, 3, height, width) float32 in [0, 1]."""
    if isinstance(image, Image.Image):
        if (image.width, image.height) != (width, height):
            image = image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)
        array = np.array(image.convert("RGB")).astype(np.float32) / np.float32(255.0)
    else:
        array = image[_nearest(image.shape[0], height)][:, _nearest(image.shape[1], width)]
    if channels != 3:
        raise DiffrtError(f"this ControlNet takes {channels}-channel conditioning; diffrt gives RGB control images")
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None], dtype=np.float32)


def guess_scales(residuals: int, scale: float) -> np.ndarray:
    """ControlNetModel.forward's guess-mode scales: logspace(-1, 0, residuals) * scale, float32."""
    ramp = np.power(np.float32(10.0), np.linspace(-1.0, 0.0, residuals, dtype=np.float32)).astype(np.float32)
    return (ramp * np.float32(scale)).astype(np.float32)


# -- stages ----------------------------------------------------------------------------

def _residual_spec(manifest: Manifest, unet: StageSpec) -> StageSpec:
    variant = layout.FUSED_RESIDUAL_VARIANT if unet.variant == FUSED_VARIANT else layout.RESIDUAL_VARIANT
    precisions = [unet.precision, "fp32"]
    try:
        return manifest.select(unet.role, variant, precisions)
    except Exception:  # noqa: BLE001 - an artifact without the fused residual graph: the portable one
        return manifest.select(unet.role, layout.RESIDUAL_VARIANT, precisions)


def _controlnet_spec(manifest: Manifest, role: str, unet: StageSpec) -> StageSpec:
    fused = unet.variant == FUSED_VARIANT and any(s.variant == FUSED_VARIANT for s in manifest.variants(role))
    return manifest.select(role, FUSED_VARIANT if fused else DEFAULT_VARIANT, [unet.precision, "fp32"])


def lazy_specs(pipe: Any) -> dict[str, StageSpec]:
    """The residual UNet and each ControlNet, keyed for Pipeline.lazy_contexts: opened on
    first use (models shared with worker() views, as the VAE encoder is), files
    verified as `load` did."""
    manifest, denoiser = pipe.manifest, pipe.family.DENOISER
    unet = pipe.models[denoiser].spec
    specs = {f"{denoiser}:{layout.RESIDUAL_VARIANT}": _residual_spec(manifest, unet)}
    specs.update({role: _controlnet_spec(manifest, role, unet) for role in controlnet_roles(manifest)})
    return specs


def _contexts(pipe: Any) -> tuple[Any, list[Any]]:
    """The residual UNet's context and each ControlNet's."""
    contexts = pipe.lazy_contexts(lazy_specs(pipe), "ControlNet")
    return contexts[0], contexts[1:]


# -- the hook ----------------------------------------------------------------------------

def check_combination(pipe: Any, request: Any) -> None:
    """What a ControlNet request cannot be combined with yet (one-line errors): a start
    from an image, LoRAs (merged LoRAs change the plain UNet's weights, not the residual
    graph's), a pipeline running LoRA-branch graphs."""
    if request.controlnet is None:
        return
    check_backend(pipe.backend)
    if request.from_image:
        raise DiffrtError("control_image with image= (ControlNet img2img/inpainting) is not supported yet")
    if request.loras or pipe._branches is not None:
        raise DiffrtError("control_image with LoRAs is not supported yet: the UNet taking ControlNet residuals holds "
                          "the exported weights only (load the pipeline with lora_branches=False and run ControlNet "
                          "requests without loras)")


def attach(pipe: Any, request: Any, plan: DenoisePlan, steps: int) -> tuple[DenoisePlan, Any]:
    """`plan` with the ControlNet hook added (outermost), and the residual UNet's context
    to run as the denoiser. `steps`: the run's denoiser calls (diffusers' len(timesteps))."""
    check_combination(pipe, request)
    control = request.controlnet
    unet, nets = _contexts(pipe)
    cfg = isinstance(plan.guidance, ClassifierFreeGuidance)
    conditional_only = control.guess_mode and cfg
    rows = plan.rows if conditional_only else plan.model_rows
    images = [None if image is None else pipe._to_device(np.ascontiguousarray(np.repeat(image, rows, axis=0)))
              for image in control.images]
    facts = nets[0].spec.facts
    residuals = len(facts[layout.CHANNELS_FACT])
    scales = [pipe._to_device(guess_scales(residuals, s) if control.guess_mode
                              else np.full((residuals,), s, dtype=np.float32)) for s in control.scales]
    names = [t.name for t in layout.residual_specs(facts[layout.CHANNELS_FACT], facts[layout.DOWNSAMPLES_FACT])]
    taken = [[t.name for t in net.spec.inputs if t.name not in (layout.COND_INPUT, layout.SCALE_INPUT)]
             for net in nets]

    zeros: dict[str, dict[str, Any]] = {}  # made once per request (the stages only read their inputs)

    def hook(i: int, feeds: Mapping[str, Any], call_next: Any) -> Mapping[str, Any]:
        total = None
        for k, keep in enumerate(control.keep(i, steps)):
            if not keep:
                continue  # diffusers multiplies its residuals by 0 here
            net_feeds = {n: feeds[n][plan.rows:] if conditional_only else feeds[n] for n in taken[k]}
            out = nets[k].run({**net_feeds, layout.COND_INPUT: images[k], layout.SCALE_INPUT: scales[k]})
            total = {n: out[n] for n in names} if total is None else {n: total[n] + out[n] for n in names}
        if total is None:
            if "all" not in zeros:
                zeros["all"] = _zeros(feeds[plan.sample_feed], facts, names)
            total = zeros["all"]
        elif conditional_only:  # the unconditional rows get no control (diffusers: zeros)
            xp = arrays.namespace(feeds[plan.sample_feed])
            if "unconditional" not in zeros:
                zeros["unconditional"] = {n: xp.zeros_like(v) for n, v in total.items()}
            total = {n: xp.concat([zeros["unconditional"][n], v]) for n, v in total.items()}
        return call_next({**feeds, **total})

    return dataclasses.replace(plan, denoiser_hooks=(hook, *plan.denoiser_hooks)), unet


def _zeros(sample: Any, facts: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Zero residuals for a step no ControlNet acts at."""
    xp = arrays.namespace(sample)
    rows, _, h, w = sample.shape
    return {n: xp.zeros(layout.residual_shape(int(rows), int(c), int(d), int(h), int(w)), dtype=np.float32)
            for n, c, d in zip(names, facts[layout.CHANNELS_FACT], facts[layout.DOWNSAMPLES_FACT], strict=True)}


__all__ = ["ControlRequest", "attach", "check_request", "default_size", "guess_scales", "preprocess"]


# -- the CLI's flags ----------------------------------------------------------------------

_FLAGS = {"control_image=": "--control-image", "control_image": "--control-image",
          "controlnet_conditioning_scale": "--control-scale", "control_guidance_start": "--control-start",
          "control_guidance_end": "--control-end", "guess_mode": "--guess-mode"}


def cli_images(paths: Sequence[str] | None) -> list[str | None] | None:
    """--control-image PATH (repeatable; 'none' for a ControlNet not used)."""
    return None if not paths else [None if p.lower() == "none" else p for p in paths]


def from_cli(manifest: Manifest, request: Any, args: Any) -> Any:
    """`request` with the ControlNets of diffrt generate's flags (errors name the flags)."""
    def one(values: Sequence[float] | None) -> Any:
        return values[0] if values is not None and len(values) == 1 else values

    try:
        control = check_request(manifest, cli_images(getattr(args, "control_image", None)),
                                request.settings.height, request.settings.width,
                                one(getattr(args, "control_scale", None)), one(getattr(args, "control_start", None)),
                                one(getattr(args, "control_end", None)), bool(getattr(args, "guess_mode", False)))
    except DiffrtError as exc:
        message = str(exc)
        for name, flag in _FLAGS.items():
            message = message.replace(name, flag)
        raise DiffrtError(message.replace("--control-image too", "--control-image PATH too")) from None
    if control is not None and request.from_image:
        raise DiffrtError("--control-image with --image (ControlNet img2img/inpainting) is not supported yet")
    return dataclasses.replace(request, controlnet=control)  # the rest is checked when it runs (check_combination)
