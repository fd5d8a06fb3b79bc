"""Stable Diffusion XL: two CLIP text encoders (ViT-L and OpenCLIP bigG with a
projection), a UNet with added conditions (pooled text embeddings and size/crop
"time ids"), the KL VAE; and the refiner (StableDiffusionXLImg2ImgPipeline: the bigG
encoder only, aesthetic-score time ids), which continues a base model's latents.
Torch-free: the stage IO contract, defaults, presets and the conditioning, built
exactly as diffusers' StableDiffusionXLPipeline / ...Img2ImgPipeline build it.
The torch side is export/sdxl.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from diffrt.artifacts import TensorSpec
from diffrt.errors import DiffrtError
from diffrt.families import sd
from diffrt.families.presets import Preset

NAME = "sdxl"
BASE_CLASS = "StableDiffusionXLPipeline"
REFINER_CLASS = "StableDiffusionXLImg2ImgPipeline"
PIPELINE_CLASSES = (BASE_CLASS, REFINER_CLASS)
EXPORT_MODULE = "diffrt.export.sdxl"

TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
DENOISER = sd.DENOISER
VAE_DECODER = sd.VAE_DECODER
VAE_ENCODER = sd.VAE_ENCODER
ATTENTION_ROLES = sd.ATTENTION_ROLES
TINY_VARIANT = sd.TINY_VARIANT
TINY_VAE_DECODER = sd.TINY_VAE_DECODER
TOKENIZER_OF = {TEXT_ENCODER: "tokenizer", TEXT_ENCODER_2: "tokenizer_2"}
DECODER_MEMORY_FACTS = sd.DECODER_MEMORY_FACTS

# latent-consistency/lcm-sdxl's model card: guidance_scale=8.0 with its guidance embedding.
LCM_GUIDANCE_SCALE = 8.0
# diffusers' StableDiffusionXLImg2ImgPipeline defaults.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5

PRESETS = {
    "full-30step": Preset(
        name="full-30step",
        description="the checkpoint's own scheduler, 30 steps, classifier-free guidance 5.0",
        num_inference_steps=30,
        guidance_scale=5.0,
        source="diffusers StableDiffusionXLPipeline (guidance_scale default 5.0)",
    ),
    "sdxl-turbo": Preset(
        name="sdxl-turbo",
        description="Euler ancestral, trailing timestep spacing, 1 step (1-4 work), no guidance, 512x512",
        num_inference_steps=1,
        scheduler="euler_ancestral",
        guidance_scale=0.0,
        scheduler_config=(("timestep_spacing", "trailing"),),
        height=512,
        width=512,
        source="stabilityai/sdxl-turbo model card and scheduler_config.json",
    ),
    "sdxl-lightning-4step": Preset(
        name="sdxl-lightning-4step",
        description="Euler, trailing timestep spacing, 4 steps, no guidance",
        num_inference_steps=4,
        scheduler="euler",
        guidance_scale=0.0,
        scheduler_config=(("timestep_spacing", "trailing"),),
        source="ByteDance/SDXL-Lightning model card (4-step UNet)",
    ),
    "lcm-sdxl-4step": Preset(
        name="lcm-sdxl-4step",
        description="LCM scheduler, 4 steps; an LCM-distilled UNet takes guidance 8.0 as an embedding, "
                    "others (LCM-LoRA fused) run without CFG",
        num_inference_steps=4,
        scheduler="lcm",
        guidance_scale=None,
        source="latent-consistency/lcm-sdxl and lcm-lora-sdxl model cards",
    ),
}

# Request options only this family takes (diffusers' argument names).
SIZE_OPTIONS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                "negative_crops_coords_top_left", "negative_target_size")
SCORE_OPTIONS = ("aesthetic_score", "negative_aesthetic_score")
CONDITIONING_OPTIONS = (*SIZE_OPTIONS, *SCORE_OPTIONS)

uses_cfg = sd.uses_cfg
min_activation_bytes = sd.min_activation_bytes
guidance_scale_embedding = sd.guidance_scale_embedding


def stages(model: Mapping[str, Any]) -> tuple[str, ...]:
    """Every stage the checkpoint exports (the refiner has no first text encoder)."""
    return (*model["text_encoders"], DENOISER, VAE_DECODER, VAE_ENCODER)


def runtime_roles(model: Mapping[str, Any]) -> tuple[str, ...]:
    """The stages a generation loads (the VAE encoder is for img2img from pixels)."""
    return (*model["text_encoders"], DENOISER, VAE_DECODER)


def tokenizers(model: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(TOKENIZER_OF[role] for role in model["text_encoders"])


def takes_image(model: Mapping[str, Any]) -> bool:
    """The refiner continues latents it is given; it does not start from noise."""
    return model["pipeline"] == "img2img"


def keeps_fp32(model: Mapping[str, Any], spec) -> str:
    """Why a stage is exported in fp32 only ("" = it gets half-precision graphs too):
    the checkpoint's own VAE when its config says `force_upcast` (SDXL's overflows in
    fp16; diffusers upcasts it to fp32). A tiny VAE (taesdxl) is fp16-safe."""
    if model.get("vae_force_upcast") and spec.role in (VAE_DECODER, VAE_ENCODER) and spec.variant != TINY_VARIANT:
        return "the VAE overflows in fp16 (force_upcast): diffusers runs it in fp32"
    return ""


def default_preset(pipeline_class: str) -> str:
    return "full-30step"


def preset_guidance(preset: Preset, model: Mapping[str, Any]) -> float:
    return sd.preset_guidance(preset, model, LCM_GUIDANCE_SCALE)


def stage_io(model: Mapping[str, Any]) -> dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]:
    seq = int(model["text_max_length"])
    channels = int(model["latent_channels"])
    latent = ("batch", channels, "latent_height", "latent_width")
    image = ("batch", 3, "height", "width")
    ids = (TensorSpec("input_ids", "int64", ("batch", seq)),)
    unet_inputs = sd.denoiser_inputs(model, added=(
        TensorSpec("text_embeds", "float32", ("batch", int(model["projection_dim"]))),
        TensorSpec("time_ids", "float32", ("batch", int(model["time_ids"]))),
    ))
    io = {
        # penultimate hidden states (SDXL conditions on the layer before the last)
        TEXT_ENCODER_2: (ids, (
            TensorSpec("hidden_states", "float32", ("batch", seq, int(model["text_hidden_size_2"]))),
            TensorSpec("text_embeds", "float32", ("batch", int(model["projection_dim"]))),
        )),
        DENOISER: (unet_inputs, (TensorSpec("out_sample", "float32", latent),)),
        VAE_DECODER: ((TensorSpec("latent_sample", "float32", latent),), (TensorSpec("sample", "float32", image),)),
        VAE_ENCODER: ((TensorSpec("sample", "float32", image),),
                      (TensorSpec("latent_parameters", "float32", ("batch", 2 * channels, "latent_height",
                                                                   "latent_width")),)),
    }
    if TEXT_ENCODER in model["text_encoders"]:  # a refiner has only the second
        hidden = int(model["text_hidden_size"])
        io[TEXT_ENCODER] = (ids, (TensorSpec("hidden_states", "float32", ("batch", seq, hidden)),))
    return {role: io[role] for role in stages(model)}


def encodes_negative(model: Mapping[str, Any], do_cfg: bool, negative_given: bool) -> bool:
    """Whether the text encoders run on negative prompts: with CFG, unless no negative
    prompt was given and the checkpoint zeroes the negative embeddings instead
    (`force_zeros_for_empty_prompt`, true for SDXL base)."""
    return do_cfg and (negative_given or not model["force_zeros_for_empty_prompt"])


def stage_profiles(
    model: Mapping[str, Any], height: int, width: int, batch: int, do_cfg: bool, prompts: int = 1
) -> dict[str, dict[str, int]]:
    """Named dims per runtime stage for one request shape (no negative prompt given)."""
    factor = int(model["vae_scale_factor"])
    latent = {"latent_height": height // factor, "latent_width": width // factor}
    text = 2 * prompts if encodes_negative(model, do_cfg, False) else prompts
    profiles = {role: {"batch": text} for role in model["text_encoders"]}
    profiles[DENOISER] = {"batch": (2 if do_cfg else 1) * batch, **latent}
    profiles[VAE_DECODER] = {"batch": batch, **latent}
    return profiles


def check_options(model: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the size/crop/aesthetic conditioning a request gives; one-line errors."""
    checked = {}
    aesthetic = bool(model["requires_aesthetics_score"])
    for key, value in options.items():
        if value is None:
            continue
        if key in SCORE_OPTIONS:
            if not aesthetic:
                raise DiffrtError(f"{key} is for a refiner (aesthetic-score) checkpoint; this one conditions on "
                                  "target_size instead")
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(value):
                raise DiffrtError(f"{key} must be a number, got {value!r}")
            checked[key] = float(value)
            continue
        if aesthetic and key in ("target_size", "negative_target_size"):
            raise DiffrtError(f"{key} is not used by a refiner (aesthetic-score) checkpoint; use aesthetic_score")
        pair = tuple(value) if isinstance(value, (tuple, list)) else None
        if pair is None or len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                     and v >= 0 for v in pair):
            raise DiffrtError(f"{key} must be two non-negative integers (height, width) or (top, left), got {value!r}")
        checked[key] = (int(pair[0]), int(pair[1]))
    return checked


def add_time_ids(model: Mapping[str, Any], options: Mapping[str, Any], height: int, width: int,
                 batch: int, do_cfg: bool) -> np.ndarray:
    """The UNet's `time_ids` rows, as diffusers builds them.

    Base (text-to-image): original_size + crops_coords_top_left + target_size; the
    negative row uses negative_original_size/..._crops_.../negative_target_size only
    when both sizes are given. diffusers repeats the [negative, positive] pair per
    image (`cat([neg, pos]).repeat(batch, 1)`), so with several images and negative
    sizes that differ from the positive ones, rows are interleaved while the text
    embeddings are [negatives..., positives...]; kept as is, for identical images.
    Refiner (img2img): original_size + crops + (aesthetic_score,), negatives with
    negative_aesthetic_score; each repeated per image, then [negatives, positives].
    """
    original = options.get("original_size", (height, width))
    crops = options.get("crops_coords_top_left", (0, 0))
    target = options.get("target_size", (height, width))
    neg_crops = options.get("negative_crops_coords_top_left", (0, 0))
    if model["pipeline"] == "img2img":
        neg_original = options.get("negative_original_size", original)
        if model["requires_aesthetics_score"]:
            pos = [*original, *crops, options.get("aesthetic_score", AESTHETIC_SCORE)]
            neg = [*neg_original, *neg_crops, options.get("negative_aesthetic_score", NEGATIVE_AESTHETIC_SCORE)]
        else:  # diffusers uses the positive crops in the negative row here
            pos = [*original, *crops, *target]
            neg = [*neg_original, *crops, *options.get("negative_target_size", target)]
        rows = np.repeat(np.array([pos], dtype=np.float32), batch, axis=0)
        if not do_cfg:
            return rows
        return np.concatenate([np.repeat(np.array([neg], dtype=np.float32), batch, axis=0), rows])
    pos = [*original, *crops, *target]
    neg = pos
    if "negative_original_size" in options and "negative_target_size" in options:
        neg = [*options["negative_original_size"], *neg_crops, *options["negative_target_size"]]
    pair = np.array([neg, pos] if do_cfg else [pos], dtype=np.float32)
    return np.tile(pair, (batch, 1))


def denoiser_conditioning(
    encode: Callable[[str, list[str]], Mapping[str, np.ndarray]], model: Mapping[str, Any], request
) -> dict[str, np.ndarray]:
    """The denoiser inputs other than sample/timestep, for one batched call per step:
    hidden states of both encoders concatenated on the feature axis, the bigG
    encoder's pooled `text_embeds`, the `time_ids`, and LCM's guidance embedding.

    `prompt_2`/`negative_prompt_2` go to the second encoder (default: the first's;
    a refiner has one encoder, which takes `prompt`);
    with CFG and no negative prompt, a `force_zeros_for_empty_prompt` checkpoint uses
    zero negative embeddings (diffusers' rule), others encode "".
    """
    settings = request.settings
    do_cfg = uses_cfg(model, settings.guidance_scale)
    prompts = list(request.prompts)
    prompts_2 = list(request.prompts_2 or prompts)
    negatives = list(request.negative_prompts)
    negatives_2 = list(request.negative_prompts_2 or negatives)
    with_negative = encodes_negative(model, do_cfg, request.negative_given)
    hidden, pooled = [], None
    for index, role in enumerate(model["text_encoders"]):
        # diffusers zips [prompt, prompt_2] with the encoders it has: a refiner's only
        # encoder (bigG) gets `prompt`, not `prompt_2`
        texts = prompts_2 if index == 1 else prompts
        if with_negative:
            texts = (negatives_2 if index == 1 else negatives) + texts
        out = encode(role, texts)
        hidden.append(out["hidden_states"])
        if role == TEXT_ENCODER_2:
            pooled = out["text_embeds"]
    embeds = np.concatenate(hidden, axis=-1)
    if do_cfg and not with_negative:
        embeds = np.concatenate([np.zeros_like(embeds), embeds])
        pooled = np.concatenate([np.zeros_like(pooled), pooled])
    count = request.num_images_per_prompt
    batch = len(prompts) * count
    feeds = {
        "encoder_hidden_states": np.repeat(embeds, count, axis=0),
        "text_embeds": np.repeat(pooled, count, axis=0),
        "time_ids": add_time_ids(model, request.options, settings.height, settings.width, batch, do_cfg),
    }
    dim = model.get("time_cond_proj_dim")
    if dim:
        w = np.full((batch,), settings.guidance_scale - 1.0, dtype=np.float32)
        feeds["timestep_cond"] = guidance_scale_embedding(w, int(dim))
    return feeds
