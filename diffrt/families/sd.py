"""Stable Diffusion 1.x / 2.x (and LCM-distilled SD): one CLIP text encoder, a UNet,
the KL VAE. Torch-free: the stage IO contract, defaults, presets and the numpy side
of conditioning. The torch side (module wrappers, sample inputs) is export/sd.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from diffrt.artifacts import TensorSpec
from diffrt.errors import DiffrtError
from diffrt.families.presets import Preset

NAME = "sd"
PIPELINE_CLASSES = ("StableDiffusionPipeline", "LatentConsistencyModelPipeline")
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



def stages(model: Mapping[str, Any]) -> tuple[str, ...]:
    """Every stage the checkpoint exports."""
    return STAGES


def runtime_roles(model: Mapping[str, Any]) -> tuple[str, ...]:
    """The stages a generation loads (the VAE encoder is for img2img)."""
    return (TEXT_ENCODER, DENOISER, VAE_DECODER)


def tokenizers(model: Mapping[str, Any]) -> tuple[str, ...]:
    return (TOKENIZER_OF[TEXT_ENCODER],)


def takes_image(model: Mapping[str, Any]) -> bool:
    return False


def keeps_fp32(model: Mapping[str, Any], spec) -> str:
    """Why a stage is exported in fp32 only ("" = it gets half-precision graphs too)."""
    return ""


def check_options(model: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    given = [key for key, value in options.items() if value is not None]
    if given:
        raise DiffrtError(f"{', '.join(given)}: only SDXL checkpoints take this; this artifact is Stable Diffusion 1.x/2.x")
    return {}


def default_preset(pipeline_class: str) -> str:
    return "lcm-4step" if pipeline_class == LCM_PIPELINE_CLASS else "full-30step"


def preset_guidance(preset: Preset, model: Mapping[str, Any], lcm_guidance: float = LCM_GUIDANCE_SCALE) -> float:
    """The guidance scale a preset means for this checkpoint: the preset's, else (LCM
    presets) `lcm_guidance` as an embedding for an LCM-distilled UNet, 1.0 (no CFG) for others."""
    if preset.guidance_scale is not None:
        return preset.guidance_scale
    return lcm_guidance if model.get("time_cond_proj_dim") else 1.0


def denoiser_inputs(model: Mapping[str, Any], added: tuple[TensorSpec, ...] = ()) -> tuple[TensorSpec, ...]:
    """The UNet's inputs in the order its export wrapper takes them: sample, timestep,
    encoder_hidden_states, the family's `added` conditions, then LCM's timestep_cond."""
    seq = int(model["text_max_length"])
    latent = ("batch", int(model["latent_channels"]), "latent_height", "latent_width")
    inputs = [
        TensorSpec("sample", "float32", latent),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", seq, int(model["cross_attention_dim"]))),
        *added,
    ]
    if model.get("time_cond_proj_dim"):
        inputs.append(TensorSpec("timestep_cond", "float32", ("batch", int(model["time_cond_proj_dim"]))))
    return tuple(inputs)


def stage_io(model: Mapping[str, Any]) -> dict[str, tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]:
    """Inputs and outputs of every stage; dims named where they are dynamic."""
    seq = int(model["text_max_length"])
    hidden = int(model["text_hidden_size"])
    channels = int(model["latent_channels"])
    latent = ("batch", channels, "latent_height", "latent_width")
    image = ("batch", 3, "height", "width")
    return {
        TEXT_ENCODER: (
            (TensorSpec("input_ids", "int64", ("batch", seq)),),
            (
                TensorSpec("last_hidden_state", "float32", ("batch", seq, hidden)),
                TensorSpec("pooler_output", "float32", ("batch", hidden)),
            ),
        ),
        DENOISER: (denoiser_inputs(model), (TensorSpec("out_sample", "float32", latent),)),
        VAE_DECODER: (
            (TensorSpec("latent_sample", "float32", latent),),
            (TensorSpec("sample", "float32", image),),
        ),
        VAE_ENCODER: (
            (TensorSpec("sample", "float32", image),),
            (TensorSpec("latent_parameters", "float32", ("batch", 2 * channels, "latent_height", "latent_width")),),
        ),
    }


def activation_terms(
    model: Mapping[str, Any], height: int, width: int, batch: int, do_cfg: bool, attention_scores: bool
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
    f4 = 4
    factor = int(model["vae_scale_factor"])
    tokens = (height // factor) * (width // factor)
    rows = 2 * batch if do_cfg else batch
    terms = {"vae_decoder_activations": batch * (2 * int(model.get("vae_decoder_channels", 0)) + 3)
             * height * width * f4}
    if model.get("vae_mid_attention") and attention_scores:
        terms["vae_attention_scores"] = batch * tokens * tokens * f4
    if model.get("unet_first_channels"):
        terms["unet_skip_activations"] = rows * 2 * int(model["unet_first_channels"]) * tokens * f4
    # "unetfirst_attention_level": how SD artifacts exported before 0.1.0's fix spelled it
    level = model.get("unet_first_attention_level", model.get("unetfirst_attention_level"))
    heads = model.get("unet_first_attention_heads")
    if level is not None and heads and attention_scores:
        level_tokens = tokens // (4 ** int(level))
        terms["unet_attention_scores"] = rows * int(heads) * level_tokens * level_tokens * f4
    hidden = max(int(model.get("text_hidden_size") or 0), int(model.get("text_hidden_size_2") or 0))
    terms["text_encoder_activations"] = rows * 2 * int(model.get("text_max_length") or 0) * hidden * f4
    return terms


def min_activation_bytes(
    model: Mapping[str, Any], height: int, width: int, batch: int, do_cfg: bool, attention_scores: bool
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


def stage_profiles(
    model: Mapping[str, Any], height: int, width: int, batch: int, do_cfg: bool, prompts: int = 1
) -> dict[str, dict[str, int]]:
    """The named dims each runtime stage sees for one request shape: `batch` images
    from `prompts` prompts, CFG doubling the text encoder's and the UNet's batch (one
    call each: uncond + cond), so backends that compile static shapes can compile at load."""
    factor = int(model["vae_scale_factor"])
    latent = {"latent_height": height // factor, "latent_width": width // factor}
    cfg = 2 if do_cfg else 1
    return {
        TEXT_ENCODER: {"batch": cfg * prompts},
        DENOISER: {"batch": cfg * batch, **latent},
        VAE_DECODER: {"batch": batch, **latent},
    }


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


def uses_cfg(model: Mapping[str, Any], guidance_scale: float) -> bool:
    """CFG runs unless guidance <= 1 or the UNet takes guidance as an embedding (LCM),
    exactly as diffusers' `do_classifier_free_guidance`."""
    return guidance_scale > 1.0 and not model.get("time_cond_proj_dim")


def denoiser_conditioning(
    encode: Callable[[str, list[str]], Mapping[str, np.ndarray]], model: Mapping[str, Any], request
) -> dict[str, np.ndarray]:
    """The denoiser inputs other than sample/timestep, for one batched call per step.

    With CFG the batch is [uncond..., cond...] (diffusers' order), each prompt repeated
    `num_images_per_prompt` times. `encode(role, texts)` runs a text encoder.
    """
    guidance_scale = request.settings.guidance_scale
    prompts, negatives = list(request.prompts), list(request.negative_prompts)
    do_cfg = uses_cfg(model, guidance_scale)
    texts = (negatives + prompts) if do_cfg else prompts
    embeds = np.repeat(encode(TEXT_ENCODER, texts)["last_hidden_state"], request.num_images_per_prompt, axis=0)
    feeds = {"encoder_hidden_states": embeds}
    dim = model.get("time_cond_proj_dim")
    if dim:
        batch = len(prompts) * request.num_images_per_prompt
        w = np.full((batch,), guidance_scale - 1.0, dtype=np.float32)
        feeds["timestep_cond"] = guidance_scale_embedding(w, int(dim))
    return feeds
