"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline): CLIP-L and CLIP-G text encoders
with projections (penultimate hidden states + pooled text embeddings), a T5 encoder
(text_encoder_3, optional: a checkpoint saved without it runs with zeros in its place,
as diffusers does), the MMDiT transformer (SD3Transformer2DModel; SD3.5-medium's
MMDiT-X adds self-attention in its first layers), a 16-channel VAE with scaling and
shift factors, and flow-match Euler. Torch-free: the stage IO contract, defaults,
presets and the conditioning, built as diffusers 0.42's pipeline builds them. The
torch side is export/sd3.py; T5's shared pieces are families/t5.py.
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
from diffrt.families.base import (ClassifierFreeGuidance, DenoisePlan, NoGuidance, check_positive, dit_largest_stage,
                                  facts_from_json)
from diffrt.families.presets import Preset

NAME = "sd3"
PIPELINE_CLASSES = ("StableDiffusion3Pipeline",)
EXPORT_MODULE = "diffrt.export.sd3"

TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
TEXT_ENCODER_3 = "text_encoder_3"
CLIP_ENCODERS = (TEXT_ENCODER, TEXT_ENCODER_2)
DENOISER = "transformer"
VAE_DECODER = sd.VAE_DECODER
VAE_ENCODER = sd.VAE_ENCODER
# Fused for ONNX Runtime: every attention of the MMDiT (joint image + text attention, QK
# RMS norm; MMDiT-X's second self-attention; export/sd3.py writes them in the form the
# pass takes) and the VAE decoder's mid-block attention. OpenVINO fuses the portable graphs.
ATTENTION_ROLES = (DENOISER, VAE_DECODER)
TINY_VARIANT = sd.TINY_VARIANT
TINY_VAE_DECODER = sd.TINY_VAE_DECODER
TOKENIZER_OF = {TEXT_ENCODER: "tokenizer", TEXT_ENCODER_2: "tokenizer_2", TEXT_ENCODER_3: "tokenizer_3"}
TOKENIZER_KIND = {TEXT_ENCODER_3: t5.TOKENIZER_KIND}
DECODER_MEMORY_FACTS = sd.DECODER_MEMORY_FACTS
HANDOFF_OPTIONS: tuple[str, ...] = ()
# Options that size the conditioning: requests batch together only when they agree (Pipeline.batch_key).
BATCH_OPTIONS = ("max_sequence_length",)
# img2img as diffusers' StableDiffusion3Img2ImgPipeline: default strength 0.6, its strength rule (no int(),
# schedulers.strength_window "sd3"), the noise mixed in by the flow-match scheduler's
# add_noise (scale_noise), and without height/width the checkpoint's size (not the picture's).
IMG2IMG_STRENGTH = 0.6
STRENGTH_RULE = "sd3"
INPAINT_STRENGTH = 0.6  # diffusers' StableDiffusion3InpaintPipeline default too
START_IMAGE_SIZE = "checkpoint"
# diffusers' StableDiffusion3Pipeline default (max_sequence_length=256).
DEFAULT_MAX_SEQUENCE_LENGTH = 256
# The transformer's sequence axis: CLIP's tokens, then T5's (or its zeros).
TEXT_LENGTH_DIM = "text_length"

# Model cards: SD3.5-large (and SD3-medium's successor cards) run 28 steps at 3.5;
# SD3.5-medium's card 40 steps at 4.5 (the preset keeps 28 steps, its CFG 4.5).
LARGE_GUIDANCE_SCALE = 3.5
MEDIUM_GUIDANCE_SCALE = 4.5

PRESETS = {
    "sd35": Preset(
        name="sd35",
        description="the checkpoint's flow-match Euler, 28 steps, CFG 4.5 for SD3.5-medium (MMDiT-X) and 3.5 for "
                    "SD3.5-large",
        num_inference_steps=28,
        guidance_scale=None,
        source="stabilityai/stable-diffusion-3.5-large model card (28 steps, guidance 3.5); "
               "stabilityai/stable-diffusion-3.5-medium model card (guidance 4.5, 40 steps)",
    ),
    "sd35-large-turbo-4step": Preset(
        name="sd35-large-turbo-4step",
        description="the checkpoint's flow-match Euler, 4 steps, no guidance (the distilled large-turbo)",
        num_inference_steps=4,
        guidance_scale=0.0,
        source="stabilityai/stable-diffusion-3.5-large-turbo model card (num_inference_steps=4, guidance_scale=0.0)",
    ),
}


@dataclass(frozen=True)
class Facts:
    """What the runtime knows of an SD3 checkpoint, written by export/sd3.py under the
    manifest's `model`."""

    text_encoders: tuple[str, ...]
    """text_encoder and text_encoder_2 (CLIP), and text_encoder_3 (T5) when the checkpoint has it."""
    text_max_length: int
    """CLIP's token length (77): the first part of the transformer's text sequence."""
    text_hidden_size: int
    text_hidden_size_2: int
    projection_dim: int
    projection_dim_2: int
    joint_attention_dim: int
    """The transformer's text width (4096): CLIP's states are zero-padded to it; T5's have it."""
    pooled_projection_dim: int
    latent_channels: int
    patch_size: int
    sample_size: int
    pos_embed_max_size: int
    """The positional embedding's side in patches: latents up to this * patch_size."""
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    vae_scale_factor: int
    vae_scaling_factor: float
    size_multiple: int
    """vae_scale_factor * patch_size (diffusers refuses other sizes)."""
    t5_hidden_size: int | None = None
    """None: a checkpoint saved without text_encoder_3 (zeros in its place)."""
    dual_attention_layers: tuple[int, ...] = ()
    """SD3.5-medium's MMDiT-X layers with a second (self-)attention."""
    vae_latent_channels: int | None = None
    vae_shift_factor: float | None = None
    vae_decoder_channels: int | None = None
    vae_mid_attention: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_encoders", tuple(self.text_encoders))
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        check_positive(self, ("text_max_length", "text_hidden_size", "text_hidden_size_2", "joint_attention_dim",
                              "pooled_projection_dim", "latent_channels", "patch_size", "sample_size",
                              "pos_embed_max_size", "num_layers", "num_attention_heads", "attention_head_dim",
                              "vae_scale_factor", "size_multiple"))

    @property
    def noise_channels(self) -> int:
        return self.vae_latent_channels or self.latent_channels

    @property
    def has_t5(self) -> bool:
        return TEXT_ENCODER_3 in self.text_encoders


@dataclass(frozen=True)
class Options:
    """SD3's request options, with diffusers' names: the second (CLIP-G) and third (T5)
    encoders' prompts and negatives (None: the first's), and T5's token length."""

    prompt_2: tuple[str, ...] | None = None
    prompt_3: tuple[str, ...] | None = None
    negative_prompt_2: tuple[str, ...] | None = None
    negative_prompt_3: tuple[str, ...] | None = None
    max_sequence_length: int | None = None
    """T5's tokens (diffusers' default 256, at most 512)."""

    @property
    def sequence_length(self) -> int:
        return self.max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH


PROMPT_OPTIONS = ("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3")


def facts(model: Mapping[str, Any]) -> Facts:
    return facts_from_json(Facts, model)


def _f(model: Any) -> Facts:
    return model if isinstance(model, Facts) else facts(model)


def stages(model: Any) -> tuple[str, ...]:
    return (*_f(model).text_encoders, DENOISER, VAE_DECODER, VAE_ENCODER)


def runtime_roles(model: Any) -> tuple[str, ...]:
    return (*_f(model).text_encoders, DENOISER, VAE_DECODER)


def tokenizers(model: Any) -> tuple[str, ...]:
    return tuple(TOKENIZER_OF[role] for role in _f(model).text_encoders)


def takes_image(model: Any) -> bool:
    return False


def inpainting(model: Any) -> str | None:
    """As diffusers' StableDiffusion3InpaintPipeline: the known region blended back after every step
    (a 33-channel inpainting transformer: not supported, refused in one line)."""
    f = _f(model)
    return "blend" if int(f.latent_channels) == int(f.noise_channels) else None


def keeps_fp32(model: Any, spec) -> str:
    """T5 takes bf16 and not fp16 (families/t5.py, recorded on its stage); the rest get
    both. (SD3's VAE config has no force_upcast: diffusers runs it in the pipeline's dtype.)"""
    return t5.keeps_fp32(spec) if spec.role == TEXT_ENCODER_3 else ""


def check_options(model: Any, options: Mapping[str, Any], prompts: int = 1) -> Options:
    accepted = [field.name for field in dataclasses.fields(Options)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DiffrtError(f"{', '.join(unknown)}: not an option of SD3 artifacts; they take {', '.join(accepted)}")
    checked = {key: sdxl.second_prompts(key, options.get(key), prompts) for key in PROMPT_OPTIONS}
    checked["max_sequence_length"] = t5.check_max_sequence_length(options.get("max_sequence_length"))
    return Options(**checked)


def default_preset(pipeline_class: str, model: Any = None) -> str:
    return "sd35"


def preset_guidance(preset: Preset, model: Any) -> float:
    """The preset's guidance, else the model card's for this checkpoint: 4.5 for an
    MMDiT-X transformer (SD3.5-medium), 3.5 for the others (SD3.5-large)."""
    if preset.guidance_scale is not None:
        return preset.guidance_scale
    return MEDIUM_GUIDANCE_SCALE if _f(model).dual_attention_layers else LARGE_GUIDANCE_SCALE


def uses_cfg(model: Any, guidance_scale: float) -> bool:
    """diffusers' do_classifier_free_guidance: guidance_scale > 1."""
    return guidance_scale > 1.0


def stage_io(model: Any) -> dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]:
    f = _f(model)
    seq = int(f.text_max_length)
    latent = ("batch", int(f.noise_channels), "latent_height", "latent_width")
    ids = (TensorSpec("input_ids", "int64", ("batch", seq)),)

    def clip(hidden: int, projection: int):
        # penultimate hidden states and the projected pooled embedding, as diffusers reads them
        return ids, (TensorSpec("hidden_states", "float32", ("batch", seq, int(hidden))),
                     TensorSpec("text_embeds", "float32", ("batch", int(projection))))

    io = {
        TEXT_ENCODER: clip(f.text_hidden_size, f.projection_dim),
        TEXT_ENCODER_2: clip(f.text_hidden_size_2, f.projection_dim_2),
        DENOISER: ((TensorSpec("hidden_states", "float32", latent),
                    TensorSpec("timestep", "float32", ("batch",)),
                    TensorSpec("encoder_hidden_states", "float32", ("batch", TEXT_LENGTH_DIM,
                                                                    int(f.joint_attention_dim))),
                    TensorSpec("pooled_projections", "float32", ("batch", int(f.pooled_projection_dim)))),
                   (TensorSpec("out_sample", "float32", latent),)),
        VAE_DECODER: ((TensorSpec("latent_sample", "float32", latent),),
                      (TensorSpec("sample", "float32", ("batch", 3, "height", "width")),)),
        VAE_ENCODER: ((TensorSpec("sample", "float32", ("batch", 3, "height", "width")),),
                      (TensorSpec("latent_parameters", "float32",
                                  ("batch", 2 * int(f.noise_channels), "latent_height", "latent_width")),)),
    }
    if f.has_t5:
        io[TEXT_ENCODER_3] = t5.stage_io(int(f.t5_hidden_size))
    return {role: io[role] for role in stages(f)}


def latent_shape(model: Any, batch: int, height: int, width: int) -> tuple[int, ...]:
    """The latents for this size; a size past the transformer's positional embedding
    (pos_embed_max_size patches) is refused here, before any work (diffusers raises)."""
    f = _f(model)
    factor = int(f.vae_scale_factor)
    limit = int(f.pos_embed_max_size) * int(f.patch_size) * factor
    if height > limit or width > limit:
        raise DiffrtError(f"{width}x{height} is larger than this SD3 transformer's positional embedding allows "
                          f"({limit}x{limit}); use a smaller size")
    return (batch, int(f.noise_channels), height // factor, width // factor)


def _text_length(f: Facts, max_sequence_length: int) -> int:
    return int(f.text_max_length) + max_sequence_length


def stage_profiles(model: Any, height: int, width: int, batch: int, do_cfg: bool,
                   prompts: int = 1) -> dict[str, dict[str, int]]:
    """Named dims per runtime stage for one request shape at the default T5 length."""
    f = _f(model)
    factor = int(f.vae_scale_factor)
    latent = {"latent_height": height // factor, "latent_width": width // factor}
    cfg = 2 if do_cfg else 1
    profiles = {role: {"batch": cfg * prompts} for role in f.text_encoders}
    if f.has_t5:
        profiles[TEXT_ENCODER_3][t5.LENGTH_DIM] = DEFAULT_MAX_SEQUENCE_LENGTH
    profiles[DENOISER] = {"batch": cfg * batch, TEXT_LENGTH_DIM: _text_length(f, DEFAULT_MAX_SEQUENCE_LENGTH),
                          **latent}
    profiles[VAE_DECODER] = {"batch": batch, **latent}
    return profiles


def activation_terms(model: Any, height: int, width: int, batch: int, do_cfg: bool,
                     attention_scores: bool) -> dict[str, int]:
    """Lower bounds, in bytes, on tensors that exist at once inside each stage (float32):

    - transformer_activations: one block's input and output over every image and text
      token, for every row (CFG doubles the rows), at the default T5 length;
    - transformer_attention_scores (when `attention_scores`: the portable graph on ONNX
      Runtime materializes them): one joint attention's rows x heads x tokens^2 scores;
    - vae_decoder_activations / vae_attention_scores: as SD's (families/sd.py);
    - text_encoder_activations: the widest encoder's states for every prompt row, twice.
    """
    f = _f(model)
    f4 = 4
    factor, patch = int(f.vae_scale_factor), int(f.patch_size)
    image_tokens = (height // factor // patch) * (width // factor // patch)
    tokens = image_tokens + _text_length(f, DEFAULT_MAX_SEQUENCE_LENGTH)
    rows = 2 * batch if do_cfg else batch
    width_ = int(f.num_attention_heads) * int(f.attention_head_dim)
    terms = {"transformer_activations": rows * 2 * tokens * width_ * f4}
    if attention_scores:
        terms["transformer_attention_scores"] = rows * int(f.num_attention_heads) * tokens * tokens * f4
    latent_pixels = (height // factor) * (width // factor)
    terms["vae_decoder_activations"] = batch * (2 * int(f.vae_decoder_channels or 0) + 3) * height * width * f4
    if f.vae_mid_attention and attention_scores:
        terms["vae_attention_scores"] = batch * latent_pixels * latent_pixels * f4
    hidden = max(int(f.text_hidden_size), int(f.text_hidden_size_2), int(f.t5_hidden_size or 0))
    terms["text_encoder_activations"] = rows * 2 * DEFAULT_MAX_SEQUENCE_LENGTH * hidden * f4
    return terms


def min_activation_bytes(model: Any, height: int, width: int, batch: int, do_cfg: bool,
                         attention_scores: bool) -> tuple[int, str]:
    """The largest stage's sum of `activation_terms` (stages run one after another)."""
    return dit_largest_stage(activation_terms(model, height, width, batch, do_cfg, attention_scores))


def prepare(model: Any, request, encode: Callable[..., Mapping[str, np.ndarray]]) -> DenoisePlan:
    """The denoise plan of one request, as diffusers' encode_prompt and __call__ build it:

    - CLIP-L on `prompt`, CLIP-G on `prompt_2` (default `prompt`): penultimate hidden
      states concatenated on the feature axis and zero-padded to the transformer's text
      width; their pooled embeddings concatenated (`pooled_projections`);
    - T5 on `prompt_3` (default `prompt`) at `max_sequence_length` tokens, appended on
      the sequence axis; without text_encoder_3, zeros of that length;
    - with CFG (guidance > 1): negatives first, "" where none was given, their _2/_3
      forms defaulting to the negative prompt; each prompt's rows repeated
      `num_images_per_prompt` times;
    - flow-match Euler on the scheduler's timesteps as they are (mu from the image size
      when the config shifts dynamically), latents / scaling_factor + shift_factor into
      the decoder.
    """
    f = _f(model)
    options: Options = request.options or Options()
    length = options.sequence_length
    prompts = list(request.prompts)
    negatives = list(request.negative_prompts)
    texts = {1: prompts, 2: list(options.prompt_2 or prompts), 3: list(options.prompt_3 or prompts)}
    if request.do_cfg:
        negative = {1: negatives, 2: list(options.negative_prompt_2 or negatives),
                    3: list(options.negative_prompt_3 or negatives)}
        texts = {k: negative[k] + v for k, v in texts.items()}
    (hidden_1, pooled_1), (hidden_2, pooled_2) = (_clip(encode, role, texts[i + 1]) for i, role in
                                                  enumerate(CLIP_ENCODERS))
    clip_states = np.concatenate([hidden_1, hidden_2], axis=-1)
    width = int(f.joint_attention_dim)
    clip_states = np.pad(clip_states, ((0, 0), (0, 0), (0, width - clip_states.shape[-1])))
    if f.has_t5:
        t5_states = encode(TEXT_ENCODER_3, texts[3], max_length=length)["last_hidden_state"]
    else:
        t5_states = np.zeros((len(texts[3]), length, width), np.float32)
    count = request.num_images_per_prompt
    feeds = {
        "encoder_hidden_states": np.repeat(np.concatenate([clip_states, t5_states], axis=1), count, axis=0),
        "pooled_projections": np.repeat(np.concatenate([pooled_1, pooled_2], axis=-1), count, axis=0),
    }
    settings = request.settings
    guidance = (ClassifierFreeGuidance(np.float32(settings.guidance_scale)) if request.do_cfg else NoGuidance())
    schedule = {}
    if request.scheduler.needs_mu:  # use_dynamic_shifting: diffusers' calculate_shift of the patch count
        lh, lw = (s // int(f.vae_scale_factor) for s in (settings.height, settings.width))
        schedule["mu"] = request.scheduler.mu_for((lh // int(f.patch_size)) * (lw // int(f.patch_size)))
    return DenoisePlan(rows=request.batch, noise_shape=latent_shape(f, request.batch, settings.height, settings.width),
                       feeds=feeds, guidance=guidance, sample_feed="hidden_states", timestep_feed="timestep",
                       output_name="out_sample", scaling_factor=float(f.vae_scaling_factor),
                       shift_factor=float(f.vae_shift_factor or 0.0), schedule=schedule)


def _clip(encode, role: str, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    out = encode(role, texts)
    return out["hidden_states"], out["text_embeds"]
