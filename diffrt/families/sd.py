"""Stable Diffusion 1.x / 2.x (and LCM-distilled SD): one CLIP text encoder, a UNet,
the KL VAE. Torch-free: the stage IO contract, defaults, presets and the numpy side
of conditioning. The torch side (module wrappers, sample inputs) is export/sd.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffrt.artifacts import TensorSpec
from diffrt.errors import DiffrtError
from diffrt.families.base import ClassifierFreeGuidance, DenoisePlan, NoGuidance, check_positive, facts_from_json
from diffrt.families.presets import Preset
from diffrt.prompt_syntax import check_syntax

NAME = "sd"
PIPELINE_CLASSES = ("StableDiffusionPipeline", "LatentConsistencyModelPipeline", "StableDiffusionInpaintPipeline")
LCM_PIPELINE_CLASS = "LatentConsistencyModelPipeline"
EXPORT_MODULE = "diffrt.export.sd"

TEXT_ENCODER = "text_encoder"
DENOISER = "unet"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
STAGES = (TEXT_ENCODER, DENOISER, VAE_DECODER, VAE_ENCODER)
# Stages with attention blocks, exported also with fused attention (not the tiny VAE: none).
ATTENTION_ROLES = (DENOISER, VAE_DECODER)
# The opt-in fast decoder (AutoencoderTiny / TAESD): a second vae_decoder stage.
TINY_VARIANT = "tiny"
TINY_VAE_DECODER = "vae_decoder-tiny"
TOKENIZER_OF = {TEXT_ENCODER: "tokenizer"}
# The UNet's text-length dim (exports since long weighted prompts; older ones fix it at
# text_max_length): text_max_length tokens per chunk of a weighted prompt.
CHUNKED_TEXT_DIM = "text_length"
# Request options only other families take (SDXL's size conditioning).
CONDITIONING_OPTIONS: tuple[str, ...] = ()

# diffusers' LatentConsistencyModelPipeline default guidance_scale.
LCM_GUIDANCE_SCALE = 8.5

PRESETS = {
    "full-30step": Preset(
        name="full-30step",
        description="the checkpoint's own scheduler, 30 steps, classifier-free guidance 7.5",
        num_inference_steps=30,
        scheduler=None,
        guidance_scale=7.5,
    ),
    "lcm-4step": Preset(
        name="lcm-4step",
        description="LCM scheduler, 4 steps; LCM-distilled UNets take guidance 8.5 as an embedding, others run without CFG",
        num_inference_steps=4,
        scheduler="lcm",
        guidance_scale=None,
    ),
}


# Facts a vae_decoder stage may carry that replace the model's in min_activation_bytes.
DECODER_MEMORY_FACTS = ("vae_decoder_channels", "vae_mid_attention")
# Options a base hands on to a refiner with its latents.
HANDOFF_OPTIONS: tuple[str, ...] = ()
# img2img's default strength: diffusers' StableDiffusionImg2ImgPipeline's.
IMG2IMG_STRENGTH = 0.8


@dataclass(frozen=True)
class Facts:
    """What the runtime knows of an SD 1.x/2.x checkpoint, written by the exporter
    (export/sd.py) under the manifest's `model`. Optional facts are the ones artifacts
    of earlier versions may lack; each says what its absence means."""

    text_max_length: int
    text_hidden_size: int
    cross_attention_dim: int
    latent_channels: int
    """The UNet's sample channels (4; 9 for an inpainting UNet)."""
    sample_size: int
    vae_scale_factor: int
    vae_scaling_factor: float
    size_multiple: int
    """Image sizes must be multiples of this."""
    time_cond_proj_dim: int | None = None
    """LCM-distilled UNets take guidance as an embedding of this size (None: CFG)."""
    num_upsamplers: int | None = None
    upcast_attention: bool = False
    """SD2.x computes attention scores in fp32 (the half-precision pass keeps them so)."""
    vae_latent_channels: int | None = None
    """The VAE's latent channels (None in older artifacts: the UNet's `latent_channels`)."""
    vae_shift_factor: float | None = None
    # for the runtime's up-front memory check (activation_terms); None: left out of the bound
    vae_decoder_channels: int | None = None
    vae_mid_attention: bool | None = None
    unet_first_attention_level: int | None = None
    unet_first_attention_heads: int | None = None
    unet_first_channels: int | None = None
    text_num_layers: int | None = None
    """The text encoder's layers; set when its stage outputs `skip_hidden_states` (what
    clip_skip selects from). None: exported before clip_skip, which it cannot take."""

    @property
    def noise_channels(self) -> int:
        return self.vae_latent_channels or self.latent_channels

    def __post_init__(self) -> None:
        check_positive(self, POSITIVE_FACTS)


# Facts that size arrays and divide: each must be a positive integer.
POSITIVE_FACTS = ("text_max_length", "cross_attention_dim", "latent_channels", "sample_size", "vae_scale_factor",
                  "size_multiple")

# Spellings of earlier versions: SD artifacts before 0.1.0's fix wrote this one wrong.
RENAMED_FACTS = {"unetfirst_attention_level": "unet_first_attention_level"}


# The text encoder output clip_skip selects from: (batch, layers, seq, hidden), entry k
# the conditioning diffusers builds with clip_skip=k (entry 0: last_hidden_state).
SKIP_OUTPUT = "skip_hidden_states"


@dataclass(frozen=True)
class Options:
    """Request options only this family takes: `clip_skip` (diffusers' meaning: the
    conditioning from that many layers before the text encoder's last; None or 0: the last)."""

    clip_skip: int | None = None
    prompt_weighting: str | None = None
    """Weighted and long prompts, as compel: "compel" or "a1111" syntax (True: compel);
    None: prompts as plain text (diffrt.runtime.prompt_weighting)."""


def facts(model: Mapping[str, Any]) -> Facts:
    """The manifest's `model` dict as typed facts (unknown or missing keys refused)."""
    return facts_from_json(Facts, model, RENAMED_FACTS)


def _f(model: Any) -> Any:
    """Typed facts: these (or SDXL's, which share the fields used here) as they are, a
    manifest dict converted."""
    return model if dataclasses.is_dataclass(model) else facts(model)


def stages(model: Any) -> tuple[str, ...]:
    """Every stage the checkpoint exports."""
    return STAGES


def runtime_roles(model: Any) -> tuple[str, ...]:
    """The stages a generation loads (the VAE encoder is for img2img)."""
    return (TEXT_ENCODER, DENOISER, VAE_DECODER)


def tokenizers(model: Any) -> tuple[str, ...]:
    return (TOKENIZER_OF[TEXT_ENCODER],)


def takes_image(model: Any) -> bool:
    return False


def inpainting(model: Any) -> str | None:
    """A UNet taking more channels than the VAE gives is a dedicated inpainting UNet
    (StableDiffusionInpaintPipeline: latents, mask, masked-image latents); any other
    SD UNet inpaints by blending the known latents after each step."""
    f = _f(model)
    return "unet" if int(f.latent_channels) != int(f.noise_channels) else "blend"


def keeps_fp32(model: Any, spec) -> str:
    """Why a stage is exported in fp32 only ("" = it gets half-precision graphs too)."""
    return ""


def check_options(model: Any, options: Mapping[str, Any], prompts: int = 1) -> Options:
    """SD takes `clip_skip` only; anything else is refused by name."""
    unknown = sorted(set(options) - {"clip_skip", "prompt_weighting"})
    if unknown:
        raise DiffrtError(f"{', '.join(unknown)}: not an option of this Stable Diffusion 1.x/2.x artifact "
                          "(it takes clip_skip and prompt_weighting beyond the common ones; only SDXL checkpoints "
                          "take prompt_2 and size conditioning)")
    return Options(clip_skip=check_clip_skip(options.get("clip_skip"), [_f(model).text_num_layers]),
                   prompt_weighting=check_syntax(options.get("prompt_weighting")))


def check_clip_skip(value: Any, layers: Sequence[int | None]) -> int | None:
    """clip_skip: None, or an integer from 0 to the fewest `layers` of the text encoders
    it applies to, minus one; an artifact whose encoder stages lack the per-layer
    output (exported before clip_skip) refuses it in one line."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise DiffrtError(f"clip_skip must be an integer >= 0, got {value!r}")
    if any(n is None for n in layers):
        from diffrt import __version__  # at call time: diffrt's package imports the families

        raise DiffrtError(f"clip_skip: this artifact's text encoder stage has no per-layer outputs (exported before "
                          f"clip_skip support); re-export it with diffrt >= {__version__}")
    fewest = min(int(n) for n in layers)
    if value >= fewest:
        raise DiffrtError(f"clip_skip must be below the text encoder's {fewest} layers, got {value}")
    return int(value)


def skipped(out: Mapping[str, np.ndarray], default: str, clip_skip: int | None, negatives: int) -> np.ndarray:
    """The encoder's conditioning at `clip_skip` for every row after the first `negatives`
    (diffusers applies clip_skip to the prompts only, never to negative prompts)."""
    if not clip_skip:
        return out[default]
    return np.concatenate([out[default][:negatives], out[SKIP_OUTPUT][negatives:, clip_skip]])


def default_preset(pipeline_class: str, model: Any = None) -> str:
    """The preset an export records as the checkpoint's defaults (`model`: its facts,
    for families whose checkpoints of one pipeline class differ, e.g. Flux schnell/dev)."""
    return "lcm-4step" if pipeline_class == LCM_PIPELINE_CLASS else "full-30step"


def preset_guidance(preset: Preset, model: Any, lcm_guidance: float = LCM_GUIDANCE_SCALE) -> float:
    """The guidance scale a preset means for this checkpoint: the preset's, else (LCM
    presets) `lcm_guidance` as an embedding for an LCM-distilled UNet, 1.0 (no CFG) for others."""
    if preset.guidance_scale is not None:
        return preset.guidance_scale
    return lcm_guidance if _f(model).time_cond_proj_dim else 1.0


def denoiser_inputs(f: Any, added: tuple[TensorSpec, ...] = ()) -> tuple[TensorSpec, ...]:
    """The UNet's inputs in the order its export wrapper takes them: sample, timestep,
    encoder_hidden_states, the family's `added` conditions, then LCM's timestep_cond.
    `f`: this or SDXL's facts (both have the fields used here)."""
    latent = ("batch", int(f.latent_channels), "latent_height", "latent_width")
    inputs = [
        TensorSpec("sample", "float32", latent),
        TensorSpec("timestep", "float32", ("batch",)),
        # the text length is named: weighted prompts over one chunk concatenate 77 tokens per chunk
        TensorSpec("encoder_hidden_states", "float32", ("batch", CHUNKED_TEXT_DIM, int(f.cross_attention_dim))),
        *added,
    ]
    if f.time_cond_proj_dim:
        inputs.append(TensorSpec("timestep_cond", "float32", ("batch", int(f.time_cond_proj_dim))))
    return tuple(inputs)


def stage_io(model: Any) -> dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]:
    """Inputs and outputs of every stage; dims named where they are dynamic."""
    f = _f(model)
    seq = int(f.text_max_length)
    hidden = int(f.text_hidden_size)
    skip = (TensorSpec(SKIP_OUTPUT, "float32", ("batch", int(f.text_num_layers), seq, hidden)),) \
        if f.text_num_layers else ()
    vae_channels = int(f.noise_channels)
    vae_latent = ("batch", vae_channels, "latent_height", "latent_width")
    image = ("batch", 3, "height", "width")
    return {
        TEXT_ENCODER: (
            (TensorSpec("input_ids", "int64", ("batch", seq)),),
            (
                TensorSpec("last_hidden_state", "float32", ("batch", seq, hidden)),
                TensorSpec("pooler_output", "float32", ("batch", hidden)),
                *skip,
            ),
        ),
        DENOISER: (denoiser_inputs(f), (TensorSpec("out_sample", "float32", vae_latent),)),
        VAE_DECODER: (
            (TensorSpec("latent_sample", "float32", vae_latent),),
            (TensorSpec("sample", "float32", image),),
        ),
        VAE_ENCODER: (
            (TensorSpec("sample", "float32", image),),
            (TensorSpec("latent_parameters", "float32", ("batch", 2 * vae_channels, "latent_height",
                                                         "latent_width")),),
        ),
    }


def activation_terms(
    model: Any, height: int, width: int, batch: int, do_cfg: bool, attention_scores: bool
) -> dict[str, int]:
    """Lower bounds, in bytes, on tensors that certainly exist at once inside each stage
    of one generation (float32 activations), by name:

    - unet_skip_activations: conv_in's output and the first down block's first resnet
      output at latent resolution, for every UNet row (CFG doubles them): both are kept
      for the skip connections until the last up block runs;
    - unet_attention_scores (when `attention_scores`: the graphs that run materialize
      them, i.e. portable graphs on ONNX Runtime): one batch x heads x tokens^2 score
      tensor at the UNet's highest-resolution attention level;
    - vae_decoder_activations: the last full-resolution conv's input and output
      (`vae_decoder_channels` wide) and the decoded image;
    - vae_attention_scores: the VAE mid block's single-head scores over every latent pixel;
    - text_encoder_activations: the widest text encoder's hidden states for every prompt
      row, twice (a layer's input and output).

    Facts missing from an older manifest leave their term out, which keeps every term a
    lower bound. A decoder stage's own facts (DECODER_MEMORY_FACTS, e.g. the tiny VAE's)
    replace the model's before this is called."""
    f = _f(model)
    f4 = 4
    factor = int(f.vae_scale_factor)
    tokens = (height // factor) * (width // factor)
    rows = 2 * batch if do_cfg else batch
    terms = {"vae_decoder_activations": batch * (2 * int(f.vae_decoder_channels or 0) + 3) * height * width * f4}
    if f.vae_mid_attention and attention_scores:
        terms["vae_attention_scores"] = batch * tokens * tokens * f4
    if f.unet_first_channels:
        terms["unet_skip_activations"] = rows * 2 * int(f.unet_first_channels) * tokens * f4
    if f.unet_first_attention_level is not None and f.unet_first_attention_heads and attention_scores:
        level_tokens = tokens // (4 ** int(f.unet_first_attention_level))
        terms["unet_attention_scores"] = rows * int(f.unet_first_attention_heads) * level_tokens * level_tokens * f4
    hidden = max(int(getattr(f, "text_hidden_size", None) or 0), int(getattr(f, "text_hidden_size_2", None) or 0))
    terms["text_encoder_activations"] = rows * 2 * int(f.text_max_length) * hidden * f4
    return terms


def min_activation_bytes(
    model: Any, height: int, width: int, batch: int, do_cfg: bool, attention_scores: bool
) -> tuple[int, str]:
    """A lower bound on the activation memory one generation needs beyond the weights,
    and what dominates it, for refusing impossible sizes up front: the stages run one
    after another, so it is the largest stage's sum of `activation_terms`."""
    terms = activation_terms(model, height, width, batch, do_cfg, attention_scores)
    stages = {
        "text encoder activations": terms.get("text_encoder_activations", 0),
        "UNet activations": terms.get("unet_skip_activations", 0) + terms.get("unet_attention_scores", 0),
        "VAE decoder activations": terms["vae_decoder_activations"] + terms.get("vae_attention_scores", 0),
    }
    if terms.get("unet_attention_scores", 0) > terms.get("unet_skip_activations", 0):
        stages["UNet attention scores"] = stages.pop("UNet activations")
    what = max(stages, key=lambda k: stages[k])
    return stages[what], what


def stage_profiles(model: Any, height: int, width: int, batch: int, do_cfg: bool,
                   prompts: int = 1) -> dict[str, dict[str, int]]:
    """The named dims each runtime stage sees for one request shape: `batch` images
    from `prompts` prompts, CFG doubling the text encoder's and the UNet's batch (one
    call each: uncond + cond), so backends that compile static shapes can compile at load."""
    factor = int(_f(model).vae_scale_factor)
    latent = {"latent_height": height // factor, "latent_width": width // factor}
    cfg = 2 if do_cfg else 1
    return {
        TEXT_ENCODER: {"batch": cfg * prompts},
        DENOISER: {"batch": cfg * batch, **latent, CHUNKED_TEXT_DIM: int(_f(model).text_max_length)},  # one chunk
        VAE_DECODER: {"batch": batch, **latent},
    }


def latent_shape(model: Any, batch: int, height: int, width: int) -> tuple[int, ...]:
    """The latents the VAE decodes (and initial noise is drawn in) for this size."""
    f = _f(model)
    factor = int(f.vae_scale_factor)
    return (batch, int(f.noise_channels), height // factor, width // factor)


def guidance_scale_embedding(w: np.ndarray, embedding_dim: int) -> np.ndarray:
    """LCM's guidance embedding (diffusers `get_guidance_scale_embedding`), float32."""
    w = np.asarray(w, dtype=np.float32) * np.float32(1000.0)
    half_dim = embedding_dim // 2
    scale = np.float32(math.log(10000.0)) / np.float32(half_dim - 1)
    freqs = np.exp(np.arange(half_dim, dtype=np.float32) * -scale)
    emb = w[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    if embedding_dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


def uses_cfg(model: Any, guidance_scale: float) -> bool:
    """CFG runs unless guidance <= 1 or the UNet takes guidance as an embedding (LCM),
    exactly as diffusers' `do_classifier_free_guidance`."""
    f = _f(model)
    return guidance_scale > 1.0 and not f.time_cond_proj_dim


def guidance_of(request) -> ClassifierFreeGuidance | NoGuidance:
    """Batched CFG at the request's scale, or none (the request decided `do_cfg`)."""
    if request.do_cfg:
        return ClassifierFreeGuidance(np.float32(request.settings.guidance_scale))
    return NoGuidance()


def prepare(model: Any, request, encode: Callable[[str, list[str]], Mapping[str, np.ndarray]]) -> DenoisePlan:
    """The denoise plan of one request: CLIP conditioning, the latent layout, batched CFG.

    With CFG the batch is [uncond..., cond...] (diffusers' order), each prompt repeated
    `num_images_per_prompt` times. `encode(role, texts)` runs a text encoder. An
    LCM-distilled UNet takes the guidance scale as an embedding (timestep_cond).
    """
    f = _f(model)
    guidance_scale = request.settings.guidance_scale
    prompts, negatives = list(request.prompts), list(request.negative_prompts)
    texts = (negatives + prompts) if request.do_cfg else prompts
    out = encode(TEXT_ENCODER, texts)
    clip_skip = request.options.clip_skip if request.options is not None else None
    conditioning = skipped(out, "last_hidden_state", clip_skip, len(texts) - len(prompts))
    embeds = np.repeat(conditioning, request.num_images_per_prompt, axis=0)
    feeds = {"encoder_hidden_states": embeds}
    if f.time_cond_proj_dim:
        w = np.full((request.batch,), guidance_scale - 1.0, dtype=np.float32)
        feeds["timestep_cond"] = guidance_scale_embedding(w, int(f.time_cond_proj_dim))
    return unet_plan(f, request, feeds)


def unet_plan(f: Any, request, feeds: Mapping[str, np.ndarray]) -> DenoisePlan:
    """A UNet's plan (SD and SDXL): the sample, timestep and out_sample feeds, no packing,
    latents / scaling_factor (+ shift_factor) into the decoder."""
    settings = request.settings
    return DenoisePlan(rows=request.batch, noise_shape=latent_shape(f, request.batch, settings.height, settings.width),
                       feeds=feeds, guidance=guidance_of(request), scaling_factor=float(f.vae_scaling_factor),
                       shift_factor=float(f.vae_shift_factor or 0.0))
