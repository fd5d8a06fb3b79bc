"""Stable Diffusion XL: two CLIP text encoders (ViT-L and OpenCLIP bigG with a
projection), a UNet with added conditions (pooled text embeddings and size/crop
"time ids"), the KL VAE; and the refiner (StableDiffusionXLImg2ImgPipeline: the bigG
encoder only, aesthetic-score time ids), which continues a base model's latents.
Torch-free: the stage IO contract, defaults, presets and the conditioning, built
exactly as diffusers' StableDiffusionXLPipeline / ...Img2ImgPipeline build it.
The torch side is export/sdxl.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffrt.artifacts import TensorSpec
from diffrt.errors import DiffrtError
from diffrt.families import sd
from diffrt.families.base import DenoisePlan, check_positive, facts_from_json
from diffrt.families.presets import Preset

NAME = "sdxl"
BASE_CLASS = "StableDiffusionXLPipeline"
REFINER_CLASS = "StableDiffusionXLImg2ImgPipeline"
INPAINT_CLASS = "StableDiffusionXLInpaintPipeline"
PIPELINE_CLASSES = (BASE_CLASS, REFINER_CLASS, INPAINT_CLASS)
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
CHUNKED_TEXT_DIM = sd.CHUNKED_TEXT_DIM  # the UNet's text length: 77 tokens per weighted prompt chunk
DECODER_MEMORY_FACTS = sd.DECODER_MEMORY_FACTS
# Options a base hands on to a refiner with its latents.
HANDOFF_OPTIONS: tuple[str, ...] = ("prompt_2", "negative_prompt_2", "prompt_weighting")

# latent-consistency/lcm-sdxl's model card: guidance_scale=8.0 with its guidance embedding.
LCM_GUIDANCE_SCALE = 8.0
# diffusers' StableDiffusionXLImg2ImgPipeline defaults.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5
IMG2IMG_STRENGTH = 0.3
# StableDiffusionXLInpaintPipeline's default strength: just below 1, so its first step is skipped
# and the start is the picture's noised latents, not pure noise.
INPAINT_STRENGTH = 0.9999

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
PROMPT_OPTIONS = ("prompt_2", "negative_prompt_2")
SIZE_OPTIONS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                "negative_crops_coords_top_left", "negative_target_size")
SCORE_OPTIONS = ("aesthetic_score", "negative_aesthetic_score")
CONDITIONING_OPTIONS = (*SIZE_OPTIONS, *SCORE_OPTIONS)

guidance_scale_embedding = sd.guidance_scale_embedding


@dataclass(frozen=True)
class Facts:
    """What the runtime knows of an SDXL base or refiner checkpoint, written by the
    exporter (export/sdxl.py) under the manifest's `model`."""

    text_encoders: tuple[str, ...]
    """The text encoder roles this checkpoint has (a refiner: only text_encoder_2)."""
    text_max_length: int
    text_hidden_size_2: int
    projection_dim: int
    cross_attention_dim: int
    time_ids: int
    """5 (refiner: sizes + crops + aesthetic score) or 6 (sizes + crops + target size)."""
    pipeline: str
    """"text2img" (base) or "img2img" (refiner)."""
    requires_aesthetics_score: bool
    force_zeros_for_empty_prompt: bool
    latent_channels: int
    sample_size: int
    vae_scale_factor: int
    vae_scaling_factor: float
    size_multiple: int
    text_hidden_size: int | None = None
    """The first (CLIP ViT-L) encoder's width; None for a refiner, which has none."""
    time_cond_proj_dim: int | None = None
    vae_force_upcast: bool = True
    num_upsamplers: int | None = None
    upcast_attention: bool = False
    vae_latent_channels: int | None = None
    vae_shift_factor: float | None = None
    vae_decoder_channels: int | None = None
    vae_mid_attention: bool | None = None
    unet_first_attention_level: int | None = None
    unet_first_attention_heads: int | None = None
    unet_first_channels: int | None = None
    text_num_layers: int | None = None
    text_num_layers_2: int | None = None
    """Each encoder's layers; set when its stage outputs `skip_hidden_states` (what
    clip_skip selects from). None: exported before clip_skip, which it cannot take."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_encoders", tuple(self.text_encoders))
        check_positive(self, (*sd.POSITIVE_FACTS, "text_hidden_size_2", "projection_dim", "time_ids"))

    @property
    def noise_channels(self) -> int:
        return self.vae_latent_channels or self.latent_channels


@dataclass(frozen=True)
class Options:
    """SDXL's request options, with diffusers' names: the second encoder's prompts (None:
    the first's), the size/crop micro-conditioning, and a refiner's aesthetic scores
    (None: diffusers' defaults)."""

    prompt_2: tuple[str, ...] | None = None
    negative_prompt_2: tuple[str, ...] | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    clip_skip: int | None = None
    """diffusers' meaning for SDXL: hidden_states[-(clip_skip + 2)] of both encoders
    (the penultimate state is clip_skip 0), for the prompts only."""
    prompt_weighting: str | None = None
    """Weighted and long prompts on both encoders, as compel: "compel" or "a1111" syntax
    (True: compel); None: plain text (diffrt.runtime.prompt_weighting)."""


def facts(model: Mapping[str, Any]) -> Facts:
    """The manifest's `model` dict as typed facts (unknown or missing keys refused)."""
    return facts_from_json(Facts, model)


def _f(model: Any) -> Facts:
    return model if isinstance(model, Facts) else facts(model)


def uses_cfg(model: Any, guidance_scale: float) -> bool:
    return sd.uses_cfg(_f(model), guidance_scale)


def activation_terms(model: Any, height: int, width: int, batch: int, do_cfg: bool,
                     attention_scores: bool) -> dict[str, int]:
    return sd.activation_terms(_f(model), height, width, batch, do_cfg, attention_scores)


def min_activation_bytes(model: Any, height: int, width: int, batch: int, do_cfg: bool,
                         attention_scores: bool) -> tuple[int, str]:
    return sd.min_activation_bytes(_f(model), height, width, batch, do_cfg, attention_scores)


def latent_shape(model: Any, batch: int, height: int, width: int) -> tuple[int, ...]:
    return sd.latent_shape(_f(model), batch, height, width)


def stages(model: Any) -> tuple[str, ...]:
    """Every stage the checkpoint exports (the refiner has no first text encoder)."""
    return (*_f(model).text_encoders, DENOISER, VAE_DECODER, VAE_ENCODER)


def runtime_roles(model: Any) -> tuple[str, ...]:
    """The stages a generation loads (the VAE encoder is for img2img from pixels)."""
    return (*_f(model).text_encoders, DENOISER, VAE_DECODER)


def tokenizers(model: Any) -> tuple[str, ...]:
    return tuple(TOKENIZER_OF[role] for role in _f(model).text_encoders)


def takes_image(model: Any) -> bool:
    """The refiner continues latents it is given; it does not start from noise."""
    return _f(model).pipeline == "img2img"


def inpainting(model: Any) -> str | None:
    """As SD's (StableDiffusionXLInpaintPipeline): a UNet taking more channels than the
    VAE gives is a dedicated inpainting UNet, any other (a refiner's too) blends."""
    return sd.inpainting(_f(model))


def keeps_fp32(model: Any, spec) -> str:
    """Why a stage is exported in fp32 only ("" = it gets half-precision graphs too):
    the checkpoint's own VAE when its config says `force_upcast` (SDXL's overflows in
    fp16; diffusers upcasts it to fp32). A tiny VAE (taesdxl) is fp16-safe."""
    if _f(model).vae_force_upcast and spec.role in (VAE_DECODER, VAE_ENCODER) and spec.variant != TINY_VARIANT:
        return "the VAE overflows in fp16 (force_upcast): diffusers runs it in fp32"
    return ""


def default_preset(pipeline_class: str, model: Any = None) -> str:
    return "full-30step"


def preset_guidance(preset: Preset, model: Any) -> float:
    return sd.preset_guidance(preset, _f(model), LCM_GUIDANCE_SCALE)


def stage_io(model: Any) -> dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]:
    f = _f(model)
    seq = int(f.text_max_length)
    channels = int(f.noise_channels)
    latent = ("batch", channels, "latent_height", "latent_width")
    image = ("batch", 3, "height", "width")
    ids = (TensorSpec("input_ids", "int64", ("batch", seq)),)
    unet_inputs = sd.denoiser_inputs(f, added=(
        TensorSpec("text_embeds", "float32", ("batch", int(f.projection_dim))),
        TensorSpec("time_ids", "float32", ("batch", int(f.time_ids))),
    ))
    io = {
        # penultimate hidden states (SDXL conditions on the layer before the last)
        TEXT_ENCODER_2: (ids, (
            TensorSpec("hidden_states", "float32", ("batch", seq, int(f.text_hidden_size_2))),
            TensorSpec("text_embeds", "float32", ("batch", int(f.projection_dim))),
            *_skip_output(f.text_num_layers_2, seq, int(f.text_hidden_size_2)),
        )),
        DENOISER: (unet_inputs, (TensorSpec("out_sample", "float32", latent),)),
        VAE_DECODER: ((TensorSpec("latent_sample", "float32", latent),), (TensorSpec("sample", "float32", image),)),
        VAE_ENCODER: ((TensorSpec("sample", "float32", image),),
                      (TensorSpec("latent_parameters", "float32", ("batch", 2 * channels, "latent_height",
                                                                   "latent_width")),)),
    }
    if TEXT_ENCODER in f.text_encoders:  # a refiner has only the second
        io[TEXT_ENCODER] = (ids, (TensorSpec("hidden_states", "float32", ("batch", seq, int(f.text_hidden_size))),
                                  *_skip_output(f.text_num_layers, seq, int(f.text_hidden_size))))
    return {role: io[role] for role in stages(f)}


def _skip_output(layers: int | None, seq: int, hidden: int) -> tuple[TensorSpec, ...]:
    """Entry k of (batch, layers, seq, hidden): hidden_states[-(k + 2)], what clip_skip=k
    conditions on; none in artifacts exported before clip_skip."""
    return (TensorSpec(sd.SKIP_OUTPUT, "float32", ("batch", int(layers), seq, hidden)),) if layers else ()


def encodes_negative(model: Any, do_cfg: bool, negative_given: bool) -> bool:
    """Whether the text encoders run on negative prompts: with CFG, unless no negative
    prompt was given and the checkpoint zeroes the negative embeddings instead
    (`force_zeros_for_empty_prompt`, true for SDXL base)."""
    return do_cfg and (negative_given or not _f(model).force_zeros_for_empty_prompt)


def stage_profiles(model: Any, height: int, width: int, batch: int, do_cfg: bool,
                   prompts: int = 1) -> dict[str, dict[str, int]]:
    """Named dims per runtime stage for one request shape (no negative prompt given)."""
    f = _f(model)
    factor = int(f.vae_scale_factor)
    latent = {"latent_height": height // factor, "latent_width": width // factor}
    text = 2 * prompts if encodes_negative(f, do_cfg, False) else prompts
    profiles = {role: {"batch": text} for role in f.text_encoders}
    profiles[DENOISER] = {"batch": (2 if do_cfg else 1) * batch, **latent,
                          CHUNKED_TEXT_DIM: int(f.text_max_length)}  # one chunk
    profiles[VAE_DECODER] = {"batch": batch, **latent}
    return profiles


def check_options(model: Any, options: Mapping[str, Any], prompts: int = 1) -> Options:
    """Validate SDXL's own request options (None: not given); one-line errors naming the
    option. `prompts`: how many prompts the request has (prompt_2 lists must match)."""
    f = _f(model)
    accepted = [field.name for field in dataclasses.fields(Options)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DiffrtError(f"{', '.join(unknown)}: not an option of SDXL artifacts; they take {', '.join(accepted)}")
    checked: dict[str, Any] = {}
    for key in PROMPT_OPTIONS:
        checked[key] = second_prompts(key, options.get(key), prompts)
    for key in (*SIZE_OPTIONS, *SCORE_OPTIONS):
        value = options.get(key)
        if value is None:
            continue
        if key in SCORE_OPTIONS:
            if not f.requires_aesthetics_score:
                raise DiffrtError(f"{key} is for a refiner (aesthetic-score) checkpoint; this one conditions on "
                                  "target_size instead")
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(value):
                raise DiffrtError(f"{key} must be a number, got {value!r}")
            checked[key] = float(value)
            continue
        if f.requires_aesthetics_score and key in ("target_size", "negative_target_size"):
            raise DiffrtError(f"{key} is not used by a refiner (aesthetic-score) checkpoint; use aesthetic_score")
        pair = tuple(value) if isinstance(value, (tuple, list)) else None
        if pair is None or len(pair) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                     and v >= 0 for v in pair):
            raise DiffrtError(f"{key} must be two non-negative integers (height, width) or (top, left), got {value!r}")
        checked[key] = (int(pair[0]), int(pair[1]))
    layers = {TEXT_ENCODER: f.text_num_layers, TEXT_ENCODER_2: f.text_num_layers_2}
    checked["clip_skip"] = sd.check_clip_skip(options.get("clip_skip"), [layers[r] for r in f.text_encoders])
    checked["prompt_weighting"] = sd.check_syntax(options.get("prompt_weighting"))
    return Options(**checked)


def second_prompts(name: str, value: Any, count: int) -> tuple[str, ...] | None:
    """prompt_2 / negative_prompt_2: None, "" or [] mean "the same as the first"
    (diffusers' `prompt_2 or prompt`); a string applies to every prompt."""
    if not value:
        return None
    if isinstance(value, str):
        return (value,) * count
    items = list(value) if isinstance(value, Sequence) else None
    if items is None or len(items) != count or not all(isinstance(v, str) for v in items):
        raise DiffrtError(f"{name} must be a string or a list of {count} strings (one per prompt)")
    return tuple(items)


def add_time_ids(model: Any, options: Options, height: int, width: int,
                 batch: int, do_cfg: bool, img2img: bool = False) -> np.ndarray:
    """The UNet's `time_ids` rows, as diffusers builds them.

    Base (text-to-image): original_size + crops_coords_top_left + target_size; the
    negative row uses negative_original_size/..._crops_.../negative_target_size only
    when both sizes are given. diffusers repeats the [negative, positive] pair per
    image (`cat([neg, pos]).repeat(batch, 1)`), so with several images and negative
    sizes that differ from the positive ones, rows are interleaved while the text
    embeddings are [negatives..., positives...]; kept as is, for identical images.
    Refiner, or any checkpoint starting from an image (`img2img`, diffusers'
    StableDiffusionXLImg2ImgPipeline): original_size + crops + (aesthetic_score,)
    where the checkpoint requires aesthetics scores (negatives with
    negative_aesthetic_score), else + target_size; each repeated per image, then
    [negatives, positives].
    """
    f = _f(model)
    given = {k: v for k, v in dataclasses.asdict(options).items() if v is not None}
    original = given.get("original_size", (height, width))
    crops = given.get("crops_coords_top_left", (0, 0))
    target = given.get("target_size", (height, width))
    neg_crops = given.get("negative_crops_coords_top_left", (0, 0))
    if f.pipeline == "img2img" or img2img:
        neg_original = given.get("negative_original_size", original)
        if f.requires_aesthetics_score:
            pos = [*original, *crops, given.get("aesthetic_score", AESTHETIC_SCORE)]
            neg = [*neg_original, *neg_crops, given.get("negative_aesthetic_score", NEGATIVE_AESTHETIC_SCORE)]
        else:  # diffusers uses the positive crops in the negative row here
            pos = [*original, *crops, *target]
            neg = [*neg_original, *crops, *given.get("negative_target_size", target)]
        rows = np.repeat(np.array([pos], dtype=np.float32), batch, axis=0)
        if not do_cfg:
            return rows
        return np.concatenate([np.repeat(np.array([neg], dtype=np.float32), batch, axis=0), rows])
    pos = [*original, *crops, *target]
    neg = pos
    if "negative_original_size" in given and "negative_target_size" in given:
        neg = [*given["negative_original_size"], *neg_crops, *given["negative_target_size"]]
    pair = np.array([neg, pos] if do_cfg else [pos], dtype=np.float32)
    return np.tile(pair, (batch, 1))


def prepare(model: Any, request, encode: Callable[[str, list[str]], Mapping[str, np.ndarray]]) -> DenoisePlan:
    """The denoise plan of one request: the UNet inputs other than sample/timestep —
    hidden states of both encoders concatenated on the feature axis, the bigG encoder's
    pooled `text_embeds`, the `time_ids`, and LCM's guidance embedding — with batched CFG.

    `prompt_2`/`negative_prompt_2` go to the second encoder (default: the first's;
    a refiner has one encoder, which takes `prompt`);
    with CFG and no negative prompt, a `force_zeros_for_empty_prompt` checkpoint uses
    zero negative embeddings (diffusers' rule), others encode "".
    """
    f = _f(model)
    settings = request.settings
    do_cfg = request.do_cfg
    options = request.options
    prompts = list(request.prompts)
    prompts_2 = list(options.prompt_2 or prompts)
    negatives = list(request.negative_prompts)
    negatives_2 = list(options.negative_prompt_2 or negatives)
    with_negative = encodes_negative(f, do_cfg, request.negative_given)
    hidden, pooled = [], None
    for index, role in enumerate(f.text_encoders):
        # diffusers zips [prompt, prompt_2] with the encoders it has: a refiner's only
        # encoder (bigG) gets `prompt`, not `prompt_2`
        texts = prompts_2 if index == 1 else prompts
        if with_negative:
            texts = (negatives_2 if index == 1 else negatives) + texts
        out = encode(role, texts)
        hidden.append(sd.skipped(out, "hidden_states", options.clip_skip, len(texts) - len(prompts)))
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
        "time_ids": add_time_ids(f, options, settings.height, settings.width, batch, do_cfg,
                                 img2img=request.from_image),
    }
    if f.time_cond_proj_dim:
        w = np.full((batch,), settings.guidance_scale - 1.0, dtype=np.float32)
        feeds["timestep_cond"] = guidance_scale_embedding(w, int(f.time_cond_proj_dim))
    return sd.unet_plan(f, request, feeds)
