"""One generation request, validated before any work: settings, prompts, seed, memory.

Everything here needs only the artifact's manifest.json and scheduler config, not the
loaded model: the CLI (and later the server) checks a request before it spends the
seconds a real-size load takes, and `Pipeline.__call__` runs the same checks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.artifacts import DEFAULT_VARIANT, FUSED_VARIANT, Manifest
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.families import get_family
from diffrt.runtime import img2img, mask_crop
from diffrt.runtime.memory import available_memory_bytes, format_gib
from diffrt.runtime.schedulers import make_scheduler, strength_window
from diffrt.runtime.schedulers.window import CANNOT_START_LATE, check_fraction
from diffrt.verification import artifact_file

logger = logging.getLogger(__name__)

# "latent": the denoised latents, not decoded (diffusers' output_type="latent"), e.g.
# to hand them to an SDXL refiner.
OUTPUT_TYPES = ("pil", "np", "latent")
# numpy seeds any non-negative int; image i of a request uses seed + i, so keep room.
MAX_SEED = 2**63 - 1
# Useful classifier-free guidance scales are about 1-20 (diffusers' defaults 5-7.5);
# 100 leaves room for experiments and keeps the arithmetic far from overflow.
MAX_GUIDANCE_SCALE = 100.0
# Samplers of flow-matching models (SD3, Flux): they never fit a noise-predicting UNet, nor the reverse.
FLOW_SCHEDULERS = ("flow_match_euler",)


@dataclass(frozen=True)
class Settings:
    """One generation's resolved settings (explicit args > preset > checkpoint defaults)."""

    scheduler: str
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    # (key, value) pairs a preset sets on the scheduler config (e.g. trailing spacing)
    scheduler_config: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True, eq=False)
class Request:
    """A validated generation request: built once (`Pipeline.request`, `make_request`),
    then passed on, never rebuilt from keyword arguments.

    Image i of the batch (prompt-major order) draws its noise from
    `np.random.default_rng(seed + i)`, so an image depends only on its own seed, never
    on its position in a batch: rerun it alone with `seed + i`.

    `scheduler`: the configured sampler (built once, immutable); `do_cfg`: whether the
    denoiser runs classifier-free guidance (the family's rule at this scale);
    `negative_given`: whether a negative prompt was given at all (SDXL zeroes the
    negative embeddings when not); `options`: the family's own options, a frozen
    dataclass (SDXL: prompt_2, original_size, ...); `denoising_start`/`_end`: the part
    of the schedule to run (a base/refiner hand-off); `latents`: initial noise given
    by the caller; `image`: the latents an img2img run (or a refiner) starts from,
    given as such; `pixels`: the picture it starts from instead, preprocessed (1, 3, H,
    W) in [-1, 1] (diffrt.runtime.img2img); `strength`: how much of the schedule it
    redoes (None: it continues from denoising_start, adding no noise); `noise`,
    `image_noise`: the caller's draws for the noise added at the start step and the
    VAE encoder's sample (`sample_mode` "sample"; "argmax" takes the mode)."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    num_images_per_prompt: int
    settings: Settings
    seed: int
    output_type: str
    scheduler: Any
    do_cfg: bool
    vae: str = DEFAULT_VARIANT
    negative_given: bool = False
    options: Any = None
    denoising_start: float | None = None
    denoising_end: float | None = None
    latents: np.ndarray | None = None
    image: np.ndarray | None = None
    loras: tuple[tuple[str, float], ...] = ()
    """(name, strength) of the LoRAs merged while it runs, sorted, none at 0 (Pipeline.request)."""
    pixels: np.ndarray | None = None
    strength: float | None = None
    noise: np.ndarray | None = None
    image_noise: np.ndarray | None = None
    sample_mode: str = "sample"
    strength_rule: str = "sd"
    """Which of diffusers' img2img strength rules picks the start step (the family's:
    schedulers.strength_window's "sd", or "sd3" for SD3 and Flux)."""
    mask: np.ndarray | None = None
    """Inpainting: (1, 1, h, w) at the latents' size, 1 where the picture is repainted."""
    masked_pixels: np.ndarray | None = None
    """A 9-channel inpainting UNet's: the picture's pixels, 0 where it is repainted."""
    overlay: Any = None
    """padding_mask_crop: where the images go back into the whole picture (mask_crop.CropOverlay)."""
    controlnet: Any = None
    """Its ControlNets' images, scales and windows (diffrt.runtime.controlnet.ControlRequest)."""
    cache: Any = None
    """Its step cache (diffrt.runtime.step_cache.StepCache), None when off."""

    @property
    def from_image(self) -> bool:
        """Whether it starts from an image (img2img, or a refiner's latents), not from noise."""
        return self.image is not None or self.pixels is not None

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt


def read_scheduler_config(folder: Path) -> dict[str, Any]:
    """The artifact's scheduler/scheduler_config.json: a regular file inside the folder,
    never read through a link (Pipeline.load checks it against the manifest)."""
    path = artifact_file(folder, "scheduler/scheduler_config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
        raise ArtifactError(f"{path} cannot be read ({exc}); re-export the model") from None


def check_scheduler(name: str, scheduler_config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None):
    """The configured scheduler, or a one-line error naming the allowed names."""
    try:
        return make_scheduler(name, scheduler_config, overrides)
    except ValueError as exc:
        raise DiffrtError(f"scheduler: {exc}") from None


def resolve_settings(
    manifest: Manifest,
    scheduler_config: Mapping[str, Any],
    preset: str | None = None,
    scheduler: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
) -> Settings:
    """Explicit arguments win over the preset, the preset over the checkpoint's defaults."""
    return _resolve(manifest, scheduler_config, preset, scheduler, num_inference_steps, guidance_scale, height,
                    width)[0]


def _resolve(manifest: Manifest, scheduler_config: Mapping[str, Any], preset: str | None, scheduler: str | None,
             num_inference_steps: Any, guidance_scale: Any, height: Any, width: Any) -> tuple[Settings, Any]:
    """The settings and the sampler they name, constructed (and its steps checked) once."""
    family = get_family(manifest.family)
    defaults = manifest.defaults
    if preset is not None:
        if preset not in family.PRESETS:
            raise DiffrtError(f"unknown preset {preset!r}; choose one of: {', '.join(family.PRESETS)}")
        recipe = family.PRESETS[preset]
        base_scheduler = recipe.scheduler or defaults["scheduler"]
        base_steps = recipe.num_inference_steps
        base_guidance = family.preset_guidance(recipe, manifest.model)
        overrides = recipe.scheduler_config
        height = recipe.height if height is None else height
        width = recipe.width if width is None else width
    else:
        base_scheduler = defaults["scheduler"]
        base_steps = defaults["num_inference_steps"]
        base_guidance = defaults["guidance_scale"]
        overrides = ()
    steps = base_steps if num_inference_steps is None else num_inference_steps
    if not _is_int(steps) or steps < 1:
        raise DiffrtError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    guidance = check_guidance(base_guidance if guidance_scale is None else guidance_scale)
    height, width = check_size(manifest, height, width)
    name = base_scheduler if scheduler is None else scheduler
    sampler = check_scheduler(name, scheduler_config, dict(overrides))  # validates the name now, before any work
    if (name in FLOW_SCHEDULERS) != (defaults["scheduler"] in FLOW_SCHEDULERS):
        kind = "flow-matching" if defaults["scheduler"] in FLOW_SCHEDULERS else "noise-predicting (diffusion)"
        raise DiffrtError(f"scheduler {name!r} does not fit this {kind} model; choose one of its kind "
                          f"(the checkpoint's own: {defaults['scheduler']})")
    try:
        # the sampler's own bound on steps (e.g. 1..num_train_timesteps), before loading; a resolution-
        # dependent shift (Flux-dev's mu) comes with the model's plan, any value checks the steps
        sampler.plan(int(steps), mu=0.0 if sampler.needs_mu else None)
    except ValueError as exc:
        raise DiffrtError(f"{name}: {exc}") from None
    return Settings(name, int(steps), guidance, height, width, tuple(overrides)), sampler


def check_guidance(value: Any) -> float:
    """0 to MAX_GUIDANCE_SCALE: far past any useful scale the CFG arithmetic overflows
    (1e308 gave an all-NaN, black image)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or not 0 <= value <= MAX_GUIDANCE_SCALE:
        raise DiffrtError(f"guidance_scale must be a finite number >= 0 and <= {MAX_GUIDANCE_SCALE:g}, got {value!r}")
    return float(value)


def check_size(manifest: Manifest, height: Any = None, width: Any = None) -> tuple[int, int]:
    """(height, width), the checkpoint's default where None, each a positive multiple of
    the family's size factor."""
    multiple = int(manifest.model["size_multiple"])
    sizes = {"height": manifest.defaults["height"] if height is None else height,
             "width": manifest.defaults["width"] if width is None else width}
    for name, value in sizes.items():
        if not _is_int(value) or value <= 0 or value % multiple:
            raise DiffrtError(f"{name} must be a positive multiple of {multiple}, got {value!r}")
    return int(sizes["height"]), int(sizes["width"])


def check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise DiffrtError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    return int(seed)


def new_seed() -> int:
    """A fresh random seed for a request that gave none (reported back, so the image can be remade)."""
    return secrets.randbelow(2**32)


def check_count(name: str, value: Any) -> int:
    if not _is_int(value) or value < 1:
        raise DiffrtError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def prompt_lists(prompt: Any, negative_prompt: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, Sequence) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise DiffrtError("prompt must be a string or a non-empty list of strings")
    if negative_prompt is None:
        negatives = [""] * len(prompts)
    elif isinstance(negative_prompt, str):
        negatives = [negative_prompt] * len(prompts)
    else:
        negatives = list(negative_prompt) if isinstance(negative_prompt, Sequence) else []
    if len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives):
        raise DiffrtError(f"negative_prompt must be a string or a list of {len(prompts)} strings (one per prompt)")
    return tuple(prompts), tuple(negatives)


def make_request(
    manifest: Manifest,
    scheduler_config: Mapping[str, Any],
    prompt: Any,
    negative_prompt: Any = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    num_images_per_prompt: int = 1,
    seed: int | None = None,
    scheduler: str | None = None,
    preset: str | None = None,
    latents: Any = None,
    output_type: str = "pil",
    vae: str | None = None,
    *,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
    image: Any = None,
    strength: float | None = None,
    noise: Any = None,
    image_noise: Any = None,
    sample_mode: str | None = None,
    mask_image: Any = None,
    padding_mask_crop: int | None = None,
    **options: Any,
) -> Request:
    """Validate every argument of a generation once (a one-line DiffrtError on the first
    bad one); `options` are the family's own (e.g. SDXL's prompt_2, original_size), which
    the family validates and types. A missing seed is drawn here. Callers then
    `check_memory`."""
    family = get_family(manifest.family)
    facts = family.facts(manifest.model)
    start_image, overlay = None, None
    if padding_mask_crop is not None and image is None:
        raise DiffrtError("padding_mask_crop is for inpainting: pass image= and mask_image= too")
    if image is not None:  # img2img: the size follows from the picture or the latents
        if mask_image is not None or getattr(family, "START_IMAGE_SIZE", "picture") == "checkpoint":
            # inpainting (and SD3/Flux img2img): the checkpoint's size unless given, as diffusers'
            height, width = check_size(manifest, height, width)
        image, mask_image, overlay = _crop_around_mask(image, mask_image, padding_mask_crop, height, width,
                                                       output_type)
        start_image = read_start_image(family, facts, image, height, width)
        height, width = start_image.height, start_image.width
    settings, sampler = _resolve(manifest, scheduler_config, preset, scheduler, num_inference_steps, guidance_scale,
                                 height, width)
    prompts, negatives = prompt_lists(prompt, negative_prompt)
    # None means "not given" for every option (diffusers' convention), here as there; a
    # preset's options (family.PRESETS[preset].options) come under the explicit ones
    given = {**dict(family.PRESETS[preset].options if preset is not None else ()),
             **{k: v for k, v in options.items() if v is not None}}
    checked_options = family.check_options(facts, given, len(prompts))
    count = check_count("num_images_per_prompt", num_images_per_prompt)
    seed = check_seed(seed)
    if output_type not in OUTPUT_TYPES:
        raise DiffrtError(f"output_type={output_type!r}; choose one of: {', '.join(OUTPUT_TYPES)}")
    vae = check_vae(manifest, vae)
    try:
        start, end = check_fraction("denoising_start", denoising_start), check_fraction("denoising_end", denoising_end)
    except ValueError as exc:
        raise DiffrtError(str(exc)) from None
    if start is not None and end is not None and start >= end:
        raise DiffrtError(f"denoising_start={start} must be below denoising_end={end}")
    if start is not None and settings.scheduler in CANNOT_START_LATE:
        raise DiffrtError(f"the {settings.scheduler} sampler cannot start part-way through a schedule "
                          "(denoising_start); choose euler, euler_ancestral, ddim, dpmpp_2m or lcm")
    shape = family.latent_shape(facts, len(prompts) * count, settings.height, settings.width)
    latents = _check_latents(family, facts, shape, latents, start_image)
    mask, masked = _check_mask(family, facts, settings, image, start_image, start, mask_image)
    # the start image's and its noise's layout: the VAE's (Flux's latents= are packed, its image latents not)
    vae_shape = family.noise_shape(facts, shape[0], settings.height, settings.width) \
        if hasattr(family, "noise_shape") else shape
    starting = check_image_start(family, settings, sampler, vae_shape, start_image, start, strength, noise,
                                 image_noise, sample_mode, inpainting=mask is not None)
    return Request(prompts, negatives, count, settings, new_seed() if seed is None else seed, output_type, sampler,
                   family.uses_cfg(facts, settings.guidance_scale), vae, negative_given=negative_prompt is not None,
                   options=checked_options, denoising_start=start, denoising_end=end, latents=latents, mask=mask,
                   masked_pixels=masked, overlay=overlay, **starting)


def _crop_around_mask(image: Any, mask_image: Any, padding: Any, height: int, width: int,
                      output_type: str) -> tuple[Any, Any, Any]:
    """padding_mask_crop (diffrt.runtime.mask_crop): the picture and mask cropped around
    the mask and resized to the request's size, and where the images go back; as given
    without it."""
    padding = mask_crop.check_padding(padding)
    if padding is None:
        return image, mask_image, None
    if mask_image is None:
        raise DiffrtError("padding_mask_crop is for inpainting: pass mask_image= too")
    if output_type == "latent":
        raise DiffrtError("padding_mask_crop pastes the images back into the picture: use output_type 'pil' or "
                          "'np', not 'latent'")
    return mask_crop.crop_inputs(image, mask_image, height, width, padding, img2img.load_image)


def _check_latents(family, facts, shape: tuple[int, ...], latents: Any,
                   start_image: Any) -> np.ndarray | None:
    """Initial noise (`latents`): only for a text-to-image start, a float32 array of the
    batch's latent shape. A refiner starts from an image only."""
    if family.takes_image(facts):
        if latents is not None:
            raise DiffrtError("latents= is initial noise; a refiner starts from a base model's latents: "
                              "pass them as image=")
        if start_image is None:
            raise DiffrtError("a refiner continues a base model's latents or refines a picture: pass image=<the "
                              "base's latents, output_type='latent'> and denoising_start=<the base's denoising_end, "
                              "e.g. 0.8> (or call the base with refiner=this pipeline), or image=<a picture> and "
                              "strength=")
    if latents is None:
        return None
    if start_image is not None:
        raise DiffrtError("latents= is the initial noise of text-to-image; with image= give noise= (the noise "
                          "added at the start step) instead")
    latents = np.asarray(latents, dtype=np.float32)
    if latents.shape != shape:
        raise DiffrtError(f"latents must have shape {shape} for this batch and size, got {latents.shape}")
    return latents


def read_start_image(family, facts, image: Any, height: Any, width: Any) -> Any:
    if getattr(family, "IMG2IMG_STRENGTH", None) is None:
        raise DiffrtError(f"image= (img2img) is not supported for {family.NAME} artifacts yet; "
                          "Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux take it")
    start = img2img.read_start_image(facts, image, height, width)
    multiple = int(facts.size_multiple)
    if start.pixels is not None and (start.height % multiple or start.width % multiple):
        raise DiffrtError(f"image: its size {start.width}x{start.height} (rounded down to a multiple of "
                          f"{facts.vae_scale_factor}) is not a multiple of {multiple}; pass height= and width= "
                          f"(multiples of {multiple}) to resize it")
    return start


def check_image_start(family, settings: Settings, sampler: Any, shape: tuple[int, ...], start_image: Any,
                      start: float | None, strength: Any, noise: Any, image_noise: Any,
                      sample_mode: Any, inpainting: bool = False) -> dict[str, Any]:
    """The img2img fields of a Request: the start latents or picture, the strength (the
    family's default, diffusers' per pipeline; none when it continues from
    denoising_start), the caller's noise arrays, the encoder's sample mode."""
    rule = getattr(family, "STRENGTH_RULE", "sd")
    if start_image is None:
        for name, value in (("strength", strength), ("noise", noise), ("image_noise", image_noise),
                            ("sample_mode", sample_mode)):
            if value is not None:
                raise DiffrtError(f"{name} is for a generation that starts from an image: pass image= too")
        return {}
    if start_image.latents is not None and start_image.latents.shape != shape:
        raise DiffrtError(f"image must be latents of shape {shape} (e.g. a base model's output_type='latent') "
                          f"for this batch and size, got shape {start_image.latents.shape}")
    mode = img2img.check_sample_mode(sample_mode)
    if start is not None:
        if strength is not None or noise is not None:
            raise DiffrtError("strength and noise= are for a start from the image's noised latents; "
                              "denoising_start continues the latents as they are (diffusers adds no noise): "
                              "give one or the other")
        value = None
    else:
        default = getattr(family, "INPAINT_STRENGTH", 1.0) if inpainting else family.IMG2IMG_STRENGTH
        value = img2img.check_strength(strength, default)
        try:
            strength_window(settings.num_inference_steps, value, sampler.order, rule=rule)
        except ValueError as exc:
            raise DiffrtError(str(exc)) from None
    sampled = start_image.pixels is not None and mode == "sample"
    if image_noise is not None and not sampled:
        raise DiffrtError("image_noise is the VAE encoder's sample noise: only with a picture as image= and "
                          "sample_mode='sample'")
    return {"image": start_image.latents, "pixels": start_image.pixels, "strength": value, "sample_mode": mode,
            "strength_rule": rule,
            "noise": img2img.check_noise("noise", noise, [shape]),
            "image_noise": img2img.check_noise("image_noise", image_noise, [(1, *shape[1:]), shape])}


def _check_mask(family, facts, settings: Settings, image: Any, start_image: Any, start: float | None,
                mask_image: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Inpainting's mask at the latents' size: SD 1.x/2.x, a picture to repaint, a mask
    of its size (diffrt.runtime.img2img.read_mask); and for a 9-channel inpainting UNet
    (which takes nothing else) the masked picture too."""
    how = family.inpainting(facts)
    inpainting_unet = how == "unet"
    if mask_image is None:
        if inpainting_unet:
            raise DiffrtError("this is an inpainting checkpoint (its UNet takes a mask and a masked picture): pass "
                              "image=<the picture> and mask_image=<white = repaint> (CLI: --image and --mask)")
        return None, None
    if start_image is None or start_image.pixels is None:
        raise DiffrtError("mask_image is for inpainting a picture: pass image=<the picture> too")
    if how is None:
        raise DiffrtError(f"mask_image (inpainting) is not supported for this {family.NAME} artifact: Stable Diffusion "
                          "1.x/2.x, SDXL, SD3 and Flux take it with their regular denoisers (and SD/SDXL inpainting "
                          "UNets)")
    if inpainting_unet and int(facts.latent_channels) != 2 * int(facts.noise_channels) + 1:
        raise DiffrtError(f"this UNet takes {facts.latent_channels} channels; an inpainting UNet takes "
                          f"{2 * int(facts.noise_channels) + 1} (latents, mask, masked-image latents)")
    if start is not None:
        raise DiffrtError("mask_image with denoising_start is not supported; use strength")
    size = img2img.picture_size(image)
    mask = img2img.read_mask(mask_image, size, settings.height, settings.width, int(facts.vae_scale_factor))
    return mask, img2img.masked_pixels(start_image.pixels, mask_image, size) if inpainting_unet else None


def check_vae(manifest: Manifest, vae: str | None) -> str:
    """The VAE decoder variant to decode with: "default" (the checkpoint's own VAE) or
    another the artifact holds, e.g. "tiny" (exported with --tiny-vae)."""
    family = get_family(manifest.family)
    # the fused-attention graph is another form of the default decoder, not a choice here
    have = sorted({s.variant for s in manifest.variants(family.VAE_DECODER)} - {FUSED_VARIANT})
    vae = DEFAULT_VARIANT if vae is None else vae
    if vae not in have:
        hint = "; export with --tiny-vae PATH to add the tiny decoder" if vae == family.TINY_VARIANT else ""
        raise DiffrtError(f"vae={vae!r}: this artifact has VAE decoders {', '.join(have)}{hint}")
    return vae


def check_memory(manifest: Manifest, request: Request, weights_loaded: bool, attention_scores: bool = False,
                 unopened_weights: int = 0) -> None:
    """Refuse a request whose weights plus largest activations exceed the memory available,
    before any work: otherwise it dies minutes later in an allocation deep in a backend.
    The estimate is a lower bound (see the family's `min_activation_bytes`), so a
    request that fits is never refused. `weights_loaded`: the model is already in
    memory (a loaded pipeline), so only activations are counted against what is left.
    `attention_scores`: the graphs that will run materialize attention score tensors
    (known once loaded; before, the bound leaves them out). `unopened_weights`: bytes of
    the stages this request opens on first use (VAE encoder, ControlNets, step-cache
    graphs), each a further copy of weights."""
    family = get_family(manifest.family)
    settings = request.settings
    decoder = manifest.select(family.VAE_DECODER, request.vae)
    facts = dataclasses.replace(family.facts(manifest.model),
                                **{k: v for k, v in decoder.facts.items() if k in family.DECODER_MEMORY_FACTS})
    activations, what = family.min_activation_bytes(facts, settings.height, settings.width, request.batch,
                                                    request.do_cfg, attention_scores)
    roles = family.runtime_roles(manifest.model)
    stages = [manifest.select(role) for role in roles if role != family.VAE_DECODER] + [decoder]
    weights = 0 if weights_loaded else sum(f.size for spec in stages for f in spec.files)
    needed = weights + unopened_weights + activations
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise DiffrtError(
            f"{settings.width}x{settings.height} with {request.batch} image(s) needs at least {format_gib(needed)} "
            f"of memory ({what}{_opening(unopened_weights)}), and {format_gib(available)} is available; use a smaller "
            "size or fewer images"
        )


def _opening(unopened_weights: int) -> str:
    return f"; plus {format_gib(unopened_weights)} of stages it opens first" if unopened_weights else ""


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


__all__ = [
    "MAX_GUIDANCE_SCALE",
    "OUTPUT_TYPES",
    "Request",
    "Settings",
    "check_count",
    "check_guidance",
    "check_memory",
    "check_scheduler",
    "check_seed",
    "check_size",
    "check_vae",
    "make_request",
    "new_seed",
    "prompt_lists",
    "read_scheduler_config",
    "resolve_settings",
]
