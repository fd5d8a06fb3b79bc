"""Flux.1 (schnell and dev): a CLIP text encoder (its pooled output only), a T5 encoder
(`text_encoder_2`, the per-token conditioning), the FluxTransformer2DModel (a DiT on
2x2-packed latents, with rotary position ids for every text and image token), and a
16-channel VAE whose latents are scaled and shifted. Torch-free: the stage IO contract,
defaults, presets and the conditioning, built exactly as diffusers' FluxPipeline builds
it. The torch side is export/flux.py.

- schnell (timestep-distilled, `guidance_embeds=False`): 4 steps, no guidance, the
  scheduler's static shift (1.0), T5 prompts of 256 tokens (its model card's setting);
- dev (guidance-distilled, `guidance_embeds=True`): the guidance scale is an input of
  the transformer (an embedding, one value per image: no CFG, one row per image), the
  resolution-dependent shift (`mu` from the image token count), 512 T5 tokens.

The sampler is flow-match Euler on diffusers' FluxPipeline schedule: sigmas
linspace(1, 1/n, n), shifted by `mu` when the config says use_dynamic_shifting; the
transformer takes the timestep as t / 1000.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffrt.artifacts import TensorSpec
from diffrt.errors import DiffrtError
from diffrt.families import sd, sdxl, t5
from diffrt.families.base import DenoisePlan, NoGuidance, check_positive, dit_largest_stage, facts_from_json
from diffrt.families.presets import Preset

NAME = "flux"
PIPELINE_CLASSES = ("FluxPipeline",)
EXPORT_MODULE = "diffrt.export.flux"

TEXT_ENCODER = "text_encoder"  # CLIP ViT-L: pooled output
TEXT_ENCODER_2 = "text_encoder_2"  # T5 v1.1 XXL encoder: hidden states
DENOISER = "transformer"
VAE_DECODER = sd.VAE_DECODER
VAE_ENCODER = sd.VAE_ENCODER
STAGES = (TEXT_ENCODER, TEXT_ENCODER_2, DENOISER, VAE_DECODER, VAE_ENCODER)
# The transformer's joint attention (fused by the attention pass: export/flux.py writes it
# in the head split/merge form the pass matches) and the VAE decoder's mid-block attention.
ATTENTION_ROLES = (DENOISER, VAE_DECODER)
TINY_VARIANT = sd.TINY_VARIANT
TINY_VAE_DECODER = sd.TINY_VAE_DECODER
TOKENIZER_OF = {TEXT_ENCODER: "tokenizer", TEXT_ENCODER_2: "tokenizer_2"}
TOKENIZER_KIND = {TEXT_ENCODER_2: t5.TOKENIZER_KIND}  # the other is CLIP's
DECODER_MEMORY_FACTS = sd.DECODER_MEMORY_FACTS
HANDOFF_OPTIONS: tuple[str, ...] = ()
# Options that shape the transformer's inputs (T5's tokens are its text tokens): requests
# stack into one batch only when they agree on these (Pipeline.batch_key).
BATCH_OPTIONS = ("max_sequence_length",)

# img2img as diffusers' FluxImg2ImgPipeline: default strength 0.6, its strength rule (no int(),
# schedulers.strength_window "sd3"), the noise mixed in by the flow-match scheduler's
# add_noise (scale_noise), and without height/width the checkpoint's size (not the picture's).
IMG2IMG_STRENGTH = 0.6
STRENGTH_RULE = "sd3"
INPAINT_STRENGTH = 0.6  # diffusers' FluxInpaintPipeline default too
START_IMAGE_SIZE = "checkpoint"
PATCH = 2  # latents are packed in 2x2 patches: (C, H, W) -> (H/2 * W/2 tokens, 4C)
ID_AXES = 3  # rotary position ids per token: (0, row, column); text tokens all (0, 0, 0)
# T5 prompt lengths (diffusers' FluxPipeline takes max_sequence_length <= 512): schnell
# was distilled with 256 (its model card passes max_sequence_length=256), dev with 512.
SCHNELL_T5_LENGTH = 256
DEV_T5_LENGTH = 512
# diffusers' FluxPipeline.default_sample_size: 128 latent pixels (1024x1024 images).
DEFAULT_SAMPLE_SIZE = 128

PRESETS = {
    "flux-schnell-4step": Preset(
        name="flux-schnell-4step",
        description="flow-match Euler, 4 steps, no guidance, T5 prompts of 256 tokens",
        num_inference_steps=4,
        guidance_scale=0.0,
        options=(("max_sequence_length", SCHNELL_T5_LENGTH),),
        source="black-forest-labs/FLUX.1-schnell model card (guidance_scale=0.0, num_inference_steps=4, "
               "max_sequence_length=256)",
    ),
    "flux-dev": Preset(
        name="flux-dev",
        description="flow-match Euler with the resolution-dependent shift, 28 steps, guidance 3.5 as an embedding",
        num_inference_steps=28,
        guidance_scale=3.5,
        source="diffusers FluxPipeline defaults (num_inference_steps=28, guidance_scale=3.5) and the "
               "black-forest-labs/FLUX.1-dev model card",
    ),
}


@dataclass(frozen=True)
class Facts:
    """What the runtime knows of a Flux checkpoint, written by export/flux.py under the
    manifest's `model`."""

    text_max_length: int
    """CLIP's prompt length (77)."""
    text_hidden_size: int
    """CLIP's width: the pooled projection the transformer takes."""
    t5_hidden_size: int
    """T5's width (the transformer's joint_attention_dim)."""
    max_sequence_length: int
    """The T5 prompt length when a request gives none: 256 (schnell) or 512 (dev)."""
    transformer_in_channels: int
    """The packed token width: latent_channels * 4."""
    guidance_embeds: bool
    """dev: the guidance scale is a transformer input (an embedding); schnell: none."""
    num_attention_heads: int
    attention_head_dim: int
    num_layers: int
    """Double-stream (MMDiT) blocks."""
    num_single_layers: int
    """Single-stream blocks."""
    latent_channels: int
    """The VAE's latent channels (16)."""
    sample_size: int
    """Default latent size (images are sample_size * vae_scale_factor pixels square)."""
    vae_scale_factor: int
    vae_scaling_factor: float
    vae_shift_factor: float
    size_multiple: int
    """Image sizes must be multiples of this: the VAE's factor times the 2x2 packing."""
    vae_force_upcast: bool = True
    vae_decoder_channels: int | None = None
    vae_mid_attention: bool | None = None

    def __post_init__(self) -> None:
        check_positive(self, POSITIVE_FACTS)

    @property
    def noise_channels(self) -> int:
        return self.latent_channels


POSITIVE_FACTS = ("text_max_length", "text_hidden_size", "t5_hidden_size", "max_sequence_length",
                  "transformer_in_channels", "num_attention_heads", "attention_head_dim", "latent_channels",
                  "sample_size", "vae_scale_factor", "size_multiple")


@dataclass(frozen=True)
class Options:
    """Flux's request options, with diffusers' names: the T5 prompts (`prompt_2`, default:
    the prompts) and their length (`max_sequence_length`, default: the checkpoint's)."""

    prompt_2: tuple[str, ...] | None = None
    max_sequence_length: int | None = None


def facts(model: Mapping[str, Any]) -> Facts:
    """The manifest's `model` dict as typed facts (unknown or missing keys refused)."""
    return facts_from_json(Facts, model)


def _f(model: Any) -> Facts:
    return model if isinstance(model, Facts) else facts(model)


def stages(model: Any) -> tuple[str, ...]:
    return STAGES


def runtime_roles(model: Any) -> tuple[str, ...]:
    """The stages a generation loads (the VAE encoder is for img2img)."""
    return (TEXT_ENCODER, TEXT_ENCODER_2, DENOISER, VAE_DECODER)


def tokenizers(model: Any) -> tuple[str, ...]:
    return (TOKENIZER_OF[TEXT_ENCODER], TOKENIZER_OF[TEXT_ENCODER_2])


def takes_image(model: Any) -> bool:
    return False


def inpainting(model: Any) -> str | None:
    """As diffusers' FluxInpaintPipeline: the known region blended back after every step
    (a Flux Fill transformer (its own pipeline): not supported, refused in one line)."""
    f = _f(model)
    return "blend" if int(f.transformer_in_channels) == PATCH * PATCH * int(f.latent_channels) else None


def keeps_fp32(model: Any, spec) -> str:
    """Why a stage gets no graph in `spec.precision` ("" = it does): T5 takes bf16, not
    fp16 (families/t5.py, recorded on its stage); the checkpoint's VAE none when its
    config says force_upcast (FLUX.1's does; TensorRT's demoDiffusion also keeps Flux's
    VAE out of fp16), as SDXL's. A tiny VAE (taef1) is fp16-safe."""
    if spec.role == TEXT_ENCODER_2:
        return t5.keeps_fp32(spec)
    if _f(model).vae_force_upcast and spec.role in (VAE_DECODER, VAE_ENCODER) and spec.variant != TINY_VARIANT:
        return "the VAE's config says force_upcast: it runs in fp32"
    return ""


def default_preset(pipeline_class: str, model: Any = None) -> str:
    """schnell's 4-step recipe, or dev's 28 steps with guidance 3.5: told apart by the
    guidance embedding (one pipeline class for both)."""
    return "flux-dev" if model is not None and _f(model).guidance_embeds else "flux-schnell-4step"


def preset_guidance(preset: Preset, model: Any) -> float:
    return 0.0 if preset.guidance_scale is None else preset.guidance_scale


def uses_cfg(model: Any, guidance_scale: float) -> bool:
    """Never: dev takes guidance as an embedding, schnell takes none (diffusers'
    FluxPipeline runs one transformer row per image unless true_cfg_scale, not supported)."""
    return False


def check_options(model: Any, options: Mapping[str, Any], prompts: int = 1) -> Options:
    """Validate Flux's own request options (None: not given), one-line errors naming the
    option; `prompts`: how many prompts the request has (a prompt_2 list must match)."""
    accepted = [field.name for field in dataclasses.fields(Options)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DiffrtError(f"{', '.join(unknown)}: not an option of Flux artifacts; they take {', '.join(accepted)}")
    return Options(prompt_2=sdxl.second_prompts("prompt_2", options.get("prompt_2"), prompts),
                   max_sequence_length=t5.check_max_sequence_length(options.get("max_sequence_length")))


def sequence_length(model: Any, options: Options | None) -> int:
    """The T5 prompt length of a request: its max_sequence_length, else the checkpoint's."""
    given = options.max_sequence_length if options is not None else None
    return int(given) if given is not None else int(_f(model).max_sequence_length)


def image_tokens(model: Any, height: int, width: int) -> int:
    """Packed latent tokens of an image: (height / 16) * (width / 16) for FLUX.1."""
    side = int(_f(model).vae_scale_factor) * PATCH
    return (height // side) * (width // side)


def stage_io(model: Any) -> dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]:
    f = _f(model)
    channels = int(f.latent_channels)
    packed = ("batch", "image_tokens", int(f.transformer_in_channels))
    vae_latent = ("batch", channels, "latent_height", "latent_width")
    image = ("batch", 3, "height", "width")
    transformer_inputs = [
        TensorSpec("hidden_states", "float32", packed),
        TensorSpec("encoder_hidden_states", "float32", ("batch", t5.LENGTH_DIM, int(f.t5_hidden_size))),
        TensorSpec("pooled_projections", "float32", ("batch", int(f.text_hidden_size))),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("img_ids", "float32", ("image_tokens", ID_AXES)),
        TensorSpec("txt_ids", "float32", (t5.LENGTH_DIM, ID_AXES)),
    ]
    if f.guidance_embeds:
        transformer_inputs.append(TensorSpec("guidance", "float32", ("batch",)))
    return {
        TEXT_ENCODER: ((TensorSpec("input_ids", "int64", ("batch", int(f.text_max_length))),),
                       (TensorSpec("pooler_output", "float32", ("batch", int(f.text_hidden_size))),)),
        TEXT_ENCODER_2: t5.stage_io(int(f.t5_hidden_size)),
        DENOISER: (tuple(transformer_inputs), (TensorSpec("out_sample", "float32", packed),)),
        VAE_DECODER: ((TensorSpec("latent_sample", "float32", vae_latent),), (TensorSpec("sample", "float32", image),)),
        VAE_ENCODER: ((TensorSpec("sample", "float32", image),),
                      (TensorSpec("latent_parameters", "float32", ("batch", 2 * channels, "latent_height",
                                                                   "latent_width")),)),
    }


def stage_profiles(model: Any, height: int, width: int, batch: int, do_cfg: bool,
                   prompts: int = 1, max_sequence_length: int | None = None) -> dict[str, dict[str, int]]:
    """The named dims each runtime stage sees for one request shape (T5 at the
    checkpoint's default length unless given): one transformer row per image."""
    f = _f(model)
    text = int(max_sequence_length or f.max_sequence_length)
    factor = int(f.vae_scale_factor)
    return {
        TEXT_ENCODER: {"batch": prompts},
        TEXT_ENCODER_2: {"batch": prompts, t5.LENGTH_DIM: text},
        DENOISER: {"batch": batch, "image_tokens": image_tokens(f, height, width), t5.LENGTH_DIM: text},
        VAE_DECODER: {"batch": batch, "latent_height": height // factor, "latent_width": width // factor},
    }


def latent_shape(model: Any, batch: int, height: int, width: int) -> tuple[int, ...]:
    """The layout `latents=` takes, as diffusers' FluxPipeline takes it: packed,
    (batch, image tokens, latent_channels * 4)."""
    f = _f(model)
    return (batch, image_tokens(f, height, width), int(f.transformer_in_channels))


def noise_shape(model: Any, batch: int, height: int, width: int) -> tuple[int, ...]:
    """The VAE's latent layout, where noise is drawn (then packed), as diffusers draws it."""
    f = _f(model)
    factor = int(f.vae_scale_factor)
    return (batch, int(f.latent_channels), height // factor, width // factor)


# -- the memory bound -------------------------------------------------------------------

def activation_terms(model: Any, height: int, width: int, batch: int, do_cfg: bool,
                     attention_scores: bool) -> dict[str, int]:
    """Lower bounds, in bytes, on tensors that certainly exist at once inside each stage
    (float32 activations), for any request of this size and batch:

    - transformer_activations: in a single-stream block, the joint sequence as the
      residual and the concatenated attention + MLP output (dim + 4 * dim wide) that
      proj_out reads; counted over the image tokens only (the text tokens depend on the
      request's max_sequence_length, which this bound does not see);
    - transformer_attention_scores (when `attention_scores`: portable graphs on ONNX
      Runtime): one batch x heads x tokens^2 score tensor, image tokens only;
    - vae_decoder_activations / vae_attention_scores: as SD's decoder (its last conv's
      input and output and the image; the mid block's single-head scores);
    - text_encoder_activations: CLIP's hidden states of one prompt (77 tokens), twice."""
    f = _f(model)
    f4 = 4
    tokens = image_tokens(f, height, width)
    inner = int(f.num_attention_heads) * int(f.attention_head_dim)
    latent = (height // int(f.vae_scale_factor)) * (width // int(f.vae_scale_factor))
    terms = {
        "transformer_activations": batch * tokens * (inner + 5 * inner) * f4,
        "vae_decoder_activations": batch * (2 * int(f.vae_decoder_channels or 0) + 3) * height * width * f4,
        "text_encoder_activations": 2 * int(f.text_max_length) * int(f.text_hidden_size) * f4,
    }
    if attention_scores:
        terms["transformer_attention_scores"] = batch * int(f.num_attention_heads) * tokens * tokens * f4
        if f.vae_mid_attention:
            terms["vae_attention_scores"] = batch * latent * latent * f4
    return terms


def min_activation_bytes(model: Any, height: int, width: int, batch: int, do_cfg: bool,
                         attention_scores: bool) -> tuple[int, str]:
    """The largest stage's sum of `activation_terms` (the stages run one after another)."""
    return dit_largest_stage(activation_terms(model, height, width, batch, do_cfg, attention_scores))


# -- conditioning and the plan -----------------------------------------------------------

def pack_latents(latents: Any) -> Any:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token (diffusers'
    _pack_latents), on any array namespace."""
    xp = _namespace(latents)
    b, c, h, w = latents.shape
    patches = xp.reshape(latents, (b, c, h // PATCH, PATCH, w // PATCH, PATCH))
    return xp.reshape(xp.permute_dims(patches, (0, 2, 4, 1, 3, 5)), (b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH))


def unpack_latents(packed: Any, height: int, width: int) -> Any:
    """(B, tokens, 4C) -> (B, C, height, width) latents (diffusers' _unpack_latents)."""
    xp = _namespace(packed)
    b, _, features = packed.shape
    c = features // (PATCH * PATCH)
    patches = xp.reshape(packed, (b, height // PATCH, width // PATCH, c, PATCH, PATCH))
    return xp.reshape(xp.permute_dims(patches, (0, 3, 1, 4, 2, 5)), (b, c, height, width))


def _namespace(array: Any) -> Any:
    from diffrt.runtime import arrays  # the runtime's array namespaces (numpy, CuPy, torch)

    return arrays.namespace(array)


def image_ids(latent_height: int, latent_width: int) -> np.ndarray:
    """(tokens, 3) float32: (0, row, column) of every 2x2 patch, row-major (diffusers'
    _prepare_latent_image_ids)."""
    rows, cols = latent_height // PATCH, latent_width // PATCH
    ids = np.zeros((rows, cols, ID_AXES), dtype=np.float32)
    ids[..., 1] = np.arange(rows, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(cols, dtype=np.float32)[None, :]
    return ids.reshape(rows * cols, ID_AXES)


def flux_sigmas(num_inference_steps: int) -> np.ndarray:
    """FluxPipeline's schedule before the shift: linspace(1, 1/n, n) (float64, as numpy
    gives it to diffusers' set_timesteps)."""
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)


def schedule(model: Any, scheduler: Any, num_inference_steps: int, height: int, width: int) -> dict[str, Any]:
    """What the plan adds to the scheduler's: FluxPipeline's sigmas, and `mu` from the
    image token count (diffusers' calculate_shift) where the config shifts dynamically."""
    mu = scheduler.mu_for(image_tokens(model, height, width)) if scheduler.needs_mu else None
    return {"sigmas": flux_sigmas(num_inference_steps), "mu": mu}


def prepare(model: Any, request, encode: Callable[..., Mapping[str, np.ndarray]]) -> DenoisePlan:
    """The denoise plan of one request, as diffusers' FluxPipeline builds its inputs:
    CLIP's pooled output of `prompt` and T5's hidden states of `prompt_2` (default:
    `prompt`) at `max_sequence_length` tokens, each repeated per image; the image and
    text position ids (static: the same for every row and step); the guidance scale as
    a per-image input when the transformer embeds it (dev). A negative prompt has
    nothing to act on (no CFG) and is refused. `encode(role, texts, max_length=None)`
    tokenizes and runs a text encoder."""
    f = _f(model)
    settings = request.settings
    if request.negative_given:
        raise DiffrtError("negative_prompt: Flux runs without classifier-free guidance (dev embeds the guidance "
                          "scale), so a negative prompt has nothing to act on; leave it out")
    prompts = list(request.prompts)
    length = sequence_length(f, request.options)
    count = request.num_images_per_prompt
    pooled = encode(TEXT_ENCODER, prompts)["pooler_output"]
    hidden = encode(TEXT_ENCODER_2, list(request.options.prompt_2 or prompts), max_length=length)["last_hidden_state"]
    feeds = {"encoder_hidden_states": np.repeat(hidden, count, axis=0),
             "pooled_projections": np.repeat(pooled, count, axis=0)}
    if f.guidance_embeds:
        feeds["guidance"] = np.full((request.batch,), settings.guidance_scale, dtype=np.float32)
    shape = noise_shape(f, request.batch, settings.height, settings.width)
    latent_h, latent_w = shape[2], shape[3]
    return DenoisePlan(
        rows=request.batch, noise_shape=shape, feeds=feeds, guidance=NoGuidance(),
        static_feeds={"img_ids": image_ids(latent_h, latent_w), "txt_ids": np.zeros((length, ID_AXES), np.float32)},
        sample_feed="hidden_states", timestep_scale=1 / 1000,
        pack=pack_latents, unpack=lambda packed: unpack_latents(packed, latent_h, latent_w),
        scaling_factor=float(f.vae_scaling_factor), shift_factor=float(f.vae_shift_factor),
        schedule=schedule(f, request.scheduler, settings.num_inference_steps, settings.height, settings.width),
    )
