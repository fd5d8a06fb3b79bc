"""img2img: a generation that starts from a picture (or from latents) instead of pure
noise, as diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionXLImg2ImgPipeline
do it. Torch-free.

1. The picture is preprocessed as VaeImageProcessor.preprocess does (`preprocess`): a
   PIL image (or a uint8 array, its pixels) is resized with Lanczos to (height, width),
   by default its own size rounded down to a multiple of the VAE's scale factor; a
   float array in [0, 1] is resized with nearest-neighbour interpolation (torch's
   `interpolate` default); then [0, 1] -> [-1, 1]. Only RGB pictures are taken: diffusers
   does not convert RGBA or grayscale either (its VAE then fails on the channel count).
2. The VAE encoder stage gives the latent distribution's parameters (mean and logvar
   stacked on channels); `encoded_latents` samples it (mean + std * eps, diffusers'
   `latent_dist.sample`, eps the caller's `image_noise` or drawn) or takes its mode
   ("argmax"), then applies the model's scaling (and shift).
3. `strength` picks where in the schedule to start (diffusers' rule:
   schedulers.strength_window) and the latents are noised to that step
   (`run.add_noise(x0, noise, 0)`). A request that gives `denoising_start` (a refiner
   continuing a base's latents) starts there and adds no noise, as diffusers does.

Flow-matching families (SD3, Flux; StableDiffusion3Img2ImgPipeline, FluxImg2ImgPipeline)
take the same path: the flow-match scheduler's add_noise is diffusers' scale_noise, the
family names its strength rule (request.strength_rule: "sd3"), and Flux packs the
noised latents (and, inpainting, the blended arrays) into its 2x2 layout.

Latents given as `image=` ((batch, latent channels, h, w), e.g. a base model's
output_type="latent") skip 1-2: the refiner hand-off is this path with denoising_start.

Inpainting with a regular (4-channel) UNet, as StableDiffusionInpaintPipeline: a
`mask_image` (white = repaint; resized, made grayscale and binarized as its mask
processor does, then shrunk to the latents with nearest-neighbour) and, after every
step, the known region put back: the image's latents noised to the next step's level
(the same start noise) outside the mask (`keep_unmasked`). At strength 1 the start is
pure noise (times init_noise_sigma), as there.

Dedicated inpainting UNets (9 input channels: latents, mask, masked-image latents) get
no blending: the mask and the masked picture's latents (`masked_pixels`,
`inpainting_channels`) are concatenated to every step's scaled model input through the
plan's `extra_channels`, as StableDiffusionInpaintPipeline does for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from diffrt.errors import DiffrtError
from diffrt.runtime.schedulers import denoising_window, plan_window, strength_window

logger = logging.getLogger(__name__)

# diffusers' retrieve_latents: "sample" draws from latent_dist, "argmax" takes its mode.
SAMPLE_MODES = ("sample", "argmax")
IMAGE_FORMS = "a PIL image, an image file path, or an (H, W, 3) RGB array (uint8, or float in [0, 1])"


@dataclass(frozen=True, eq=False)
class StartImage:
    """What `image=` resolved to: latents to continue (`latents`), or a preprocessed
    picture (`pixels`, (1, 3, height, width) float32 in [-1, 1]); and the size it implies."""

    height: int
    width: int
    latents: np.ndarray | None = None
    pixels: np.ndarray | None = None


def read_start_image(facts: Any, image: Any, height: int | None, width: int | None) -> StartImage:
    """`image=` as latents (a 4-d array with the VAE's latent channels, as diffusers
    takes them) or as a picture, preprocessed to (height, width) or to its own size
    rounded down to a multiple of the VAE scale factor."""
    channels = int(facts.noise_channels)
    factor = int(facts.vae_scale_factor)
    if isinstance(image, np.ndarray) and image.ndim == 4:
        if image.shape[1] != channels:
            raise DiffrtError(f"image must be latents of shape (batch, {channels}, height/{factor}, width/{factor}) "
                              f"(e.g. a base model's output_type='latent') or one picture ({IMAGE_FORMS}), "
                              f"got an array of shape {image.shape}")
        size = (image.shape[2] * factor, image.shape[3] * factor)
        if (height, width) not in ((None, None), size):
            raise DiffrtError(f"height/width {height}x{width} disagree with the image latents' size "
                              f"{size[0]}x{size[1]}; leave them out")
        return StartImage(size[0], size[1], latents=np.asarray(image, dtype=np.float32))
    picture = load_image(image)
    pixels = preprocess(picture, height, width, factor)
    return StartImage(pixels.shape[2], pixels.shape[3], pixels=pixels)


def load_image(image: Any, what: str = "image", rgb: bool = True) -> Image.Image | np.ndarray:
    """A PIL RGB image (any mode with rgb=False: a ControlNet's image processor converts
    it) or a float (H, W, 3) array in [0, 1]; a path is opened and read fully (a truncated
    file is an error here, not a half-grey picture later)."""
    if isinstance(image, (str, Path)):
        image = _open(image, what)
    if isinstance(image, Image.Image):
        if rgb and image.mode != "RGB":
            raise DiffrtError(f"{what} is a {image.mode} image; img2img takes RGB (diffusers' VAE does too): "
                              "convert it first, e.g. image.convert('RGB')")
        return image
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise DiffrtError(f"{what} must be {IMAGE_FORMS}, got an array of shape {image.shape}")
        if image.dtype == np.uint8:
            return Image.fromarray(image, "RGB")
        if not np.issubdtype(image.dtype, np.floating):
            raise DiffrtError(f"{what}: an array must be uint8 or float in [0, 1], got {image.dtype}")
        array = image.astype(np.float32)
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise DiffrtError(f"{what}: a float array must hold values in [0, 1] (diffusers' convention), got "
                              f"[{float(np.nanmin(array)):g}, {float(np.nanmax(array)):g}]")
        return array
    raise DiffrtError(f"{what} must be {IMAGE_FORMS}, got {type(image).__name__}")


def preprocess(image: Image.Image | np.ndarray, height: int | None, width: int | None,
               vae_scale_factor: int) -> np.ndarray:
    """VaeImageProcessor(vae_scale_factor).preprocess(image, height, width): (1, 3, H, W)
    float32 in [-1, 1]."""
    own_height, own_width = (image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2]
    height = own_height if height is None else height
    width = own_width if width is None else width
    height, width = height - height % vae_scale_factor, width - width % vae_scale_factor
    if height <= 0 or width <= 0:
        raise DiffrtError(f"image is {own_width}x{own_height}; img2img needs at least {vae_scale_factor} pixels "
                          "each way")
    if isinstance(image, Image.Image):
        resized = image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)
        array = np.array(resized).astype(np.float32) / np.float32(255.0)
    else:
        array = image[_nearest(own_height, height)][:, _nearest(own_width, width)]
    pixels = array.transpose(2, 0, 1)[None]
    return np.ascontiguousarray(pixels * np.float32(2.0) - np.float32(1.0), dtype=np.float32)


def _nearest(size_in: int, size_out: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode="nearest")'s source index per output index."""
    if size_in == size_out:
        return np.arange(size_out)
    scale = np.float32(size_in) / np.float32(size_out)
    return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64), size_in - 1)


def read_mask(mask: Any, picture_size: tuple[int, int], height: int, width: int,
              vae_scale_factor: int) -> np.ndarray:
    """mask_image= (a PIL image of any mode, a path, or a uint8 (H, W) array; the
    picture's size) as diffusers' mask processor and prepare_mask_latents make it: resized
    with Lanczos to (height, width), grayscale, >= 0.5 -> 1, then nearest-neighbour to the
    latent size: (1, 1, h, w) float32, 1 where the image is repainted."""
    binary = full_mask(mask, picture_size, height, width)
    h, w = height // vae_scale_factor, width // vae_scale_factor
    return np.ascontiguousarray(binary[_nearest(height, h)][:, _nearest(width, w)][None, None])


def masked_pixels(pixels: np.ndarray, mask: Any, picture_size: tuple[int, int]) -> np.ndarray:
    """What a 9-channel inpainting UNet sees of the picture: its preprocessed pixels
    with the repainted region set to 0 (diffusers: init_image * (mask_condition < 0.5))."""
    binary = full_mask(mask, picture_size, pixels.shape[2], pixels.shape[3])
    return (pixels * (binary < np.float32(0.5)).astype(np.float32)[None, None]).astype(np.float32)


def load_mask(mask: Any) -> Image.Image:
    """`mask_image` as a PIL image: a path read fully, a uint8 (H, W) array as mode L."""
    if isinstance(mask, (str, Path)):
        mask = _open(mask, "mask_image")
    if isinstance(mask, np.ndarray) and mask.ndim == 2 and mask.dtype == np.uint8:
        mask = Image.fromarray(mask, "L")
    if not isinstance(mask, Image.Image):
        raise DiffrtError("mask_image must be a PIL image, an image file path or a uint8 (H, W) array "
                          f"(white = repaint), got {type(mask).__name__}")
    return mask


def full_mask(mask: Any, picture_size: tuple[int, int], height: int, width: int) -> np.ndarray:
    """The mask processor's binarized mask at (height, width): (H, W) float32 of 0/1."""
    mask = load_mask(mask)
    if (mask.height, mask.width) != picture_size:
        raise DiffrtError(f"mask_image is {mask.width}x{mask.height} but image is {picture_size[1]}x{picture_size[0]}; "
                          "give a mask of the picture's size")
    resized = mask.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None).convert("L")
    return (np.array(resized).astype(np.float32) / np.float32(255.0) >= 0.5).astype(np.float32)


def _open(path: str | Path, what: str) -> Image.Image:
    try:
        with Image.open(Path(path).expanduser()) as opened:
            opened.load()
            return opened.copy()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DiffrtError(f"{what}: cannot read {str(path)!r} as an image ({exc}); give a complete PNG or "
                          "JPEG file") from None


def picture_size(image: Any) -> tuple[int, int] | None:
    """(height, width) of a picture given as image= (None for latents)."""
    if isinstance(image, (str, Path)):
        image = _open(image, "image")
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray) and image.ndim == 3:
        return image.shape[0], image.shape[1]
    return None


def check_strength(strength: Any, default: float) -> float:
    value = default if strength is None else strength
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or not 0 < value <= 1:
        raise DiffrtError(f"strength must be a number in (0, 1] (how much of the schedule to redo from the image), "
                          f"got {value!r}")
    return float(value)


def check_sample_mode(sample_mode: Any) -> str:
    mode = "sample" if sample_mode is None else sample_mode
    if mode not in SAMPLE_MODES:
        raise DiffrtError(f"sample_mode={sample_mode!r}; choose one of: {', '.join(SAMPLE_MODES)}")
    return mode


def check_noise(name: str, value: Any, shapes: list[tuple[int, ...]]) -> np.ndarray | None:
    """A caller's noise array: float32, finite, one of `shapes`."""
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float32)
    if array.shape not in shapes or not np.isfinite(array).all():
        allowed = " or ".join(str(s) for s in shapes)
        raise DiffrtError(f"{name} must be a finite float array of shape {allowed}, got shape {array.shape}")
    return array


def plan_run(request: Any, **schedule: Any) -> Any:
    """The scheduler run of a request: from the strength's start step when it starts
    from an image (up to its denoising_end, if any), else `plan_window`'s."""
    n = request.settings.num_inference_steps
    scheduler = request.scheduler
    if request.strength is None:
        return plan_window(scheduler, n, request.denoising_start, request.denoising_end, **schedule)
    schedule = {k: v for k, v in schedule.items() if v is not None}
    begin, end = strength_window(n, request.strength, scheduler.order, rule=request.strength_rule)
    if request.denoising_end is not None:  # SDXL img2img: begin from the strength, end from denoising_end
        full = scheduler.plan(n, **schedule).timesteps
        end = denoising_window(full, int(scheduler.config["num_train_timesteps"]),
                               denoising_end=request.denoising_end)[1]
        if begin >= end:
            raise ValueError(f"strength={request.strength} starts after denoising_end={request.denoising_end}: "
                             "no step is left; use a higher strength or a later denoising_end")
    return scheduler.plan(n, begin=begin, end=end, **schedule)


def start_latents(request: Any, plan: Any, run: Any, rng: Any, encode: Callable[[np.ndarray], np.ndarray],
                  inpainting_unet: bool = False) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The first sample of a request that starts from an image, in the VAE's layout:
    its latents (given, or the picture encoded by `encode` and scaled), noised to the
    run's first step unless it continues from denoising_start. Draws, in this order
    and each only when the caller gave no array: the encoder's sample noise, then the
    noise added at the start step (per image row, from `rng`). Returns (the first
    sample, the image's latents, the start noise or None). An inpainting UNet at
    strength 1 starts from pure noise and never needs the image's latents: like
    diffusers, it neither encodes the picture nor draws its sample (the latents: None)."""
    shape = plan.noise_shape
    if inpainting_unet and request.strength == 1.0:
        noise = request.noise if request.noise is not None else rng.standard_normal(shape, dtype=np.float32)
        return (noise * np.float32(run.init_noise_sigma)).astype(np.float32), None, noise
    if request.pixels is not None:
        eps = None
        if request.sample_mode == "sample":
            eps = request.image_noise if request.image_noise is not None else \
                rng.standard_normal(shape, dtype=np.float32)
        x0 = encoded_latents(encode(request.pixels), eps, plan.scaling_factor, plan.shift_factor)
        x0 = np.ascontiguousarray(np.broadcast_to(x0, shape), dtype=np.float32)
    else:
        x0 = request.image
    if request.strength is None:
        return x0, x0, None
    noise = request.noise if request.noise is not None else rng.standard_normal(shape, dtype=np.float32)
    if request.mask is not None and request.strength == 1.0:  # diffusers' inpainting: pure noise at full strength
        return (noise * np.float32(run.init_noise_sigma)).astype(np.float32), x0, noise
    return np.asarray(run.add_noise(x0, noise, 0), dtype=np.float32), x0, noise


def keep_unmasked(run: Any, x0: Any, noise: Any, mask: Any) -> Callable[[int, Any], Any]:
    """Inpainting's step (after the scheduler's step i): outside the mask, the image's
    latents noised to step i + 1's level (none after the last), as
    StableDiffusionInpaintPipeline does for 4-channel UNets. Arrays on the device."""
    last = len(run.timesteps) - 1

    def blend(i: int, sample: Any) -> Any:
        known = run.add_noise(x0, noise, i + 1) if i < last else x0
        return (1 - mask) * known + mask * sample

    return blend


def inpainting_channels(request: Any, plan: Any, rng: Any,
                        encode: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """A 9-channel inpainting UNet's extra input, one row per model row: the mask at the
    latents' size, then the masked picture's latents (`request.masked_pixels` encoded
    and scaled), as StableDiffusionInpaintPipeline's prepare_mask_latents; CFG rows
    repeat them. Draws after `start_latents` (diffusers' order): the masked picture's
    encoder sample, per image row, unless sample_mode is "argmax"."""
    shape = plan.noise_shape
    eps = rng.standard_normal(shape, dtype=np.float32) if request.sample_mode == "sample" else None
    # diffusers' _encode_vae_image scales and never shifts (SD's VAE has no shift)
    latents = encoded_latents(encode(request.masked_pixels), eps, plan.scaling_factor, 0.0)
    latents = np.broadcast_to(latents, shape)
    mask = np.broadcast_to(request.mask, (shape[0], 1, *shape[2:]))
    channels = np.concatenate([mask, latents], axis=1)
    return np.ascontiguousarray(np.concatenate([channels] * plan.guidance.rows_per_sample), dtype=np.float32)


def encoded_latents(parameters: np.ndarray, eps: np.ndarray | None, scaling_factor: float,
                    shift_factor: float) -> np.ndarray:
    """The VAE encoder's output (mean and logvar stacked on channels) as the denoiser's
    latents: diffusers' DiagonalGaussianDistribution (logvar clamped to [-30, 20]),
    sampled with `eps` (or its mode when None), then (x - shift) * scaling."""
    mean, logvar = np.split(parameters.astype(np.float32), 2, axis=1)
    latents = mean
    if eps is not None:
        std = np.exp(np.float32(0.5) * np.clip(logvar, np.float32(-30.0), np.float32(20.0)))
        latents = mean + std * eps
    if shift_factor:
        latents = latents - np.float32(shift_factor)
    return (latents * np.float32(scaling_factor)).astype(np.float32)


__all__ = ["SAMPLE_MODES", "StartImage", "check_noise", "check_sample_mode", "check_strength", "encoded_latents",
           "full_mask", "inpainting_channels", "keep_unmasked", "load_image", "masked_pixels", "picture_size",
           "plan_run", "preprocess", "read_mask", "read_start_image", "start_latents"]
