"""The torch side of the Flux family: read the components' configs, load one stage's
module at a time, wrap it for export, make trace and check inputs. IO names and shapes
come from diffrt.families.flux; the VAE stages are SD's (export/sd.py), the T5 stage is
export/t5.py's, and the one-stage-at-a-time loading is the one export/sd.py describes.

The transformer is exported with the TorchScript exporter like every other stage, which
has no ONNX symbolic for `aten::rms_norm` (the QK RMSNorm of FLUX's attention) before
opset 23. So the export wrapper changes how three things are written, not what they
compute (the wrapped module gives diffusers' outputs; tests compare with the unchanged
FluxPipeline):

- the QK RMSNorms as primitive ops (x * rsqrt(mean(x^2) + eps) * weight), holding the
  checkpoint's own weight Parameters (the weight map finds them under their names);
- the attention (FluxAttnProcessor's math) with the rotary embedding applied on the
  flat (batch, tokens, heads * head_dim) projections: diffusers' reshape to
  (..., -1, 2) pairs is traced with fixed sizes, so its graph fails at any other token
  count; on the flat layout the pairs are the same adjacent elements and every shape
  stays dynamic. Heads are split from and merged back to that layout as diffusers'
  UNet attention does, so the fused-attention pass (export/passes/attention.py) makes
  each block one MultiHeadAttention op for ONNX Runtime;
- the rotary angles in float32 (diffusers computes them in float64 and rounds the
  cos/sin to float32): float64 is not what ONNX backends run (TensorRT casts it down;
  OpenVINO computes in float32). At 1024x1024 (positions up to 64 rad) the angles are
  off by at most ~4e-6.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from diffrt.errors import DiffrtError
from diffrt.export.checkpoint import quiet_library_progress, read_json
from diffrt.export.sd import (  # noqa: F401 - load_tiny_vae and friends are this module's too
    SampleInputs as _SdSampleInputs,
)
from diffrt.export.sd import (
    StageModule,
    load_module,
    load_tiny_vae,
    read_config,
    tiny_vae_facts,
    tiny_vae_stage,
)
from diffrt.export.t5 import ensure_tokenizer_json, t5_stage
from diffrt.families import flux, t5
from diffrt.families.base import facts_to_json

logger = logging.getLogger(__name__)

NEEDS = "a Flux checkpoint needs text_encoder/, text_encoder_2/, transformer/ and vae/"
# The checkpoint folder each stage's module is loaded from.
STAGE_COMPONENTS = {flux.TEXT_ENCODER: "text_encoder", flux.TEXT_ENCODER_2: "text_encoder_2",
                    flux.DENOISER: "transformer", flux.VAE_DECODER: "vae", flux.VAE_ENCODER: "vae"}
_QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")


# -- the export wrappers ----------------------------------------------------------------

class PooledTextEncoderStage(torch.nn.Module):
    """CLIPTextModel -> pooler_output only (FluxPipeline conditions on the pooled output)."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids=input_ids, return_dict=True).pooler_output


class PrimitiveRMSNorm(torch.nn.Module):
    """torch.nn.RMSNorm's math in ops the TorchScript exporter writes (no aten::rms_norm),
    around the original module's own weight Parameter."""

    def __init__(self, norm: torch.nn.RMSNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight = norm.weight  # the same Parameter (or None): the state dict is unchanged

    def forward(self, x):
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x * self.weight if self.weight is not None else x


class Float32RotaryEmbedding(torch.nn.Module):
    """FluxPosEmbed with float32 angles: per id axis, cos/sin of position * theta^(-2i/d),
    each repeated for both elements of its pair."""

    def __init__(self, theta: float, axes_dim):
        super().__init__()
        self.theta = theta
        self.axes_dim = tuple(int(d) for d in axes_dim)

    def forward(self, ids):
        cos, sin = [], []
        for axis, dim in enumerate(self.axes_dim):
            freqs = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            angles = ids[:, axis:axis + 1].float() * freqs[None, :]
            cos.append(torch.stack([angles.cos(), angles.cos()], dim=-1).reshape(ids.shape[0], dim))
            sin.append(torch.stack([angles.sin(), angles.sin()], dim=-1).reshape(ids.shape[0], dim))
        return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def _per_head_norm(attn, norm, x):
    """RMS-normalize each head of a (B, S, H*D) projection; back in the flat layout."""
    batch, inner = x.shape[0], attn.heads * attn.head_dim
    return norm(x.view(batch, -1, attn.heads, attn.head_dim)).reshape(batch, -1, inner)


def _flat_rotary(x, rotary, heads: int):
    """diffusers' apply_rotary_emb (use_real, pairs (2i, 2i+1)) on (B, S, H*D): the
    (S, D) tables tiled over the heads."""
    cos, sin = (table.repeat(1, heads)[None] for table in rotary)
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).reshape(x.shape[0], -1, x.shape[2])
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _attention(attn, q, k, v):
    """Scaled dot-product attention over (B, S, H*D) q, k, v: the head split and merge
    of diffusers' AttnProcessor2_0, the form the fused-attention pass matches."""
    batch, inner = q.shape[0], attn.heads * attn.head_dim

    def heads(t):
        return t.view(batch, -1, attn.heads, attn.head_dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    return out.transpose(1, 2).reshape(batch, -1, inner)


class ExportFluxAttnProcessor:
    """diffusers' FluxAttnProcessor (no IP-Adapter), written for the exporter (see the
    module docstring). Double-stream blocks return (image, text) outputs; single-stream
    blocks (no encoder_hidden_states, no output projection) the joint sequence."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise NotImplementedError("FluxPipeline passes no attention mask")
        q = _per_head_norm(attn, attn.norm_q, attn.to_q(hidden_states))
        k = _per_head_norm(attn, attn.norm_k, attn.to_k(hidden_states))
        v = attn.to_v(hidden_states)
        if attn.added_kv_proj_dim is not None:  # text tokens first, as diffusers concatenates
            q = torch.cat([_per_head_norm(attn, attn.norm_added_q, attn.add_q_proj(encoder_hidden_states)), q], dim=1)
            k = torch.cat([_per_head_norm(attn, attn.norm_added_k, attn.add_k_proj(encoder_hidden_states)), k], dim=1)
            v = torch.cat([attn.add_v_proj(encoder_hidden_states), v], dim=1)
        if image_rotary_emb is not None:
            q, k = _flat_rotary(q, image_rotary_emb, attn.heads), _flat_rotary(k, image_rotary_emb, attn.heads)
        out = _attention(attn, q, k, v).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text = encoder_hidden_states.shape[1]
        context, image = out[:, :text], out[:, text:]
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(context)


def prepare_transformer(transformer: torch.nn.Module) -> torch.nn.Module:
    """Make a loaded FluxTransformer2DModel exportable in place (its parameters untouched):
    primitive QK RMSNorms, the export attention processor, float32 rotary angles."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    for module in transformer.modules():
        if isinstance(module, FluxAttention):
            for name in _QK_NORMS:
                norm = getattr(module, name, None)
                if isinstance(norm, torch.nn.RMSNorm):
                    setattr(module, name, PrimitiveRMSNorm(norm))
            module.set_processor(ExportFluxAttnProcessor())
    rope = transformer.pos_embed
    transformer.pos_embed = Float32RotaryEmbedding(rope.theta, rope.axes_dim)
    return transformer


class TransformerStage(torch.nn.Module):
    """FluxTransformer2DModel's forward with its inputs in the stage's order (guidance
    last, for dev); the timestep is diffusers' t / 1000."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None):
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, timestep=timestep, img_ids=img_ids,
                                txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


# -- configs, facts, loading ----------------------------------------------------------------

def component_classes() -> dict[str, type]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    return {"text_encoder": CLIPTextModel, "text_encoder_2": T5EncoderModel, "transformer": FluxTransformer2DModel,
            "vae": AutoencoderKL}


def read_configs(folder: Path) -> dict[str, Any]:
    """Every component's config, no weights read (see export/sd.py)."""
    quiet_library_progress()
    return {name: read_config(folder, name, cls, NEEDS) for name, cls in component_classes().items()}


def load_modules(folder: Path) -> dict[str, torch.nn.Module]:
    """Every component loaded at once (for comparisons against torch; the exporter loads
    one stage's at a time, `load_stage`)."""
    quiet_library_progress()
    return {name: load_module(folder, name, cls, NEEDS) for name, cls in component_classes().items()}


def load_stage(folder: Path, name: str, model: dict[str, Any], inputs: SampleInputs) -> StageModule:
    """Stage `name` with only its own component loaded."""
    component = STAGE_COMPONENTS[name]
    quiet_library_progress()
    module = load_module(folder, component, component_classes()[component], NEEDS)
    return stage_module(name, module, model, inputs)


def _clip_length(folder: Path, text_config) -> int:
    path = folder / "tokenizer" / "tokenizer_config.json"
    length = read_json(path).get("model_max_length") if path.is_file() else None
    if not isinstance(length, int) or length > text_config.max_position_embeddings:
        length = int(text_config.max_position_embeddings)
    return length


def model_facts(folder: Path, configs: dict[str, Any]) -> dict[str, Any]:
    """What the runtime needs to know about the checkpoint, in plain JSON types, from the
    components' configs (`read_configs`), checked for the shapes FluxPipeline assumes."""
    clip, t5 = configs["text_encoder"], configs["text_encoder_2"]
    transformer, vae = configs["transformer"], configs["vae"]
    if transformer.patch_size != 1 or transformer.in_channels != vae.latent_channels * flux.PATCH ** 2:
        raise DiffrtError(f"{folder / 'transformer'}: in_channels={transformer.in_channels}, patch_size="
                          f"{transformer.patch_size}; FluxPipeline packs the VAE's {vae.latent_channels} latent "
                          f"channels in 2x2 patches ({vae.latent_channels * 4} channels, patch_size 1)")
    if (transformer.out_channels or transformer.in_channels) != transformer.in_channels:
        raise DiffrtError(f"{folder / 'transformer'}: out_channels={transformer.out_channels} differs from "
                          f"in_channels={transformer.in_channels}; FluxPipeline steps the packed latents with it")
    for name, have, want in (("joint_attention_dim", transformer.joint_attention_dim, t5.d_model),
                             ("pooled_projection_dim", transformer.pooled_projection_dim, clip.hidden_size)):
        if have != want:
            raise DiffrtError(f"{folder / 'transformer'}: {name}={have}, but the text encoder it reads gives {want}")
    vae_scale_factor = 2 ** (len(vae.block_out_channels) - 1)
    guidance = bool(transformer.guidance_embeds)
    facts = {
        "text_max_length": _clip_length(folder, clip),
        "text_hidden_size": int(clip.hidden_size),
        "t5_hidden_size": int(t5.d_model),
        "max_sequence_length": flux.DEV_T5_LENGTH if guidance else flux.SCHNELL_T5_LENGTH,
        "transformer_in_channels": int(transformer.in_channels),
        "guidance_embeds": guidance,
        "num_attention_heads": int(transformer.num_attention_heads),
        "attention_head_dim": int(transformer.attention_head_dim),
        "num_layers": int(transformer.num_layers),
        "num_single_layers": int(transformer.num_single_layers),
        "latent_channels": int(vae.latent_channels),
        "sample_size": flux.DEFAULT_SAMPLE_SIZE,
        "vae_scale_factor": vae_scale_factor,
        "vae_scaling_factor": float(vae.scaling_factor),
        "vae_shift_factor": float(vae.shift_factor or 0.0),
        "size_multiple": vae_scale_factor * flux.PATCH,
        "vae_force_upcast": bool(getattr(vae, "force_upcast", True)),
        "vae_decoder_channels": int(vae.block_out_channels[0]),
        "vae_mid_attention": bool(getattr(vae, "mid_block_add_attention", True)),
    }
    # built as the family's typed facts: a misspelled or missing fact fails here, at export
    return facts_to_json(flux.Facts(**facts))


def stage_facts(name: str, model: dict[str, Any]) -> dict[str, Any]:
    """What a stage records about itself: T5's precision rule (families/t5.py)."""
    return t5.stage_facts() if name == flux.TEXT_ENCODER_2 else {}


def finish_component(folder: Path, component: str) -> None:
    """A copied tokenizer folder made complete for the runtime: the T5 tokenizer gets a
    tokenizer.json when the checkpoint has only spiece.model."""
    if component == flux.TOKENIZER_OF[flux.TEXT_ENCODER_2]:
        ensure_tokenizer_json(folder)


# -- trace and check inputs ---------------------------------------------------------------

class SampleInputs(_SdSampleInputs):
    """SD's seeded inputs plus the transformer's: traced at 2 images of 3x5 patches
    with 7 text tokens, checked at 1 image of 4x6 patches with 9 (every dynamic dim
    changes; the ids are FluxPipeline's)."""

    def transformer(self, wrapper: torch.nn.Module) -> StageModule:
        model = self.model

        def feeds(batch: int, rows: int, cols: int, text: int) -> dict[str, torch.Tensor]:
            ids = torch.from_numpy(flux.image_ids(rows * flux.PATCH, cols * flux.PATCH))
            out = {
                "hidden_states": self.randn(batch, rows * cols, model["transformer_in_channels"]),
                "encoder_hidden_states": self.randn(batch, text, model["t5_hidden_size"]),
                "pooled_projections": self.randn(batch, model["text_hidden_size"]),
                "timestep": torch.full((batch,), 0.75),
                "img_ids": ids,
                "txt_ids": torch.zeros(text, flux.ID_AXES),
            }
            if model["guidance_embeds"]:
                out["guidance"] = torch.full((batch,), 3.5)
            return out

        return StageModule(wrapper, tuple(feeds(2, 3, 5, 7).values()), feeds(1, 4, 6, 9))


def stage_module(name: str, module: torch.nn.Module, model: dict[str, Any], inputs: SampleInputs) -> StageModule:
    """Stage `name`'s wrapper around its loaded component, with trace inputs and check
    inputs of a different shape. `inputs` draws from one generator: build the stages in
    the family's order to get the same inputs every time."""
    if name == flux.TEXT_ENCODER:
        stage = inputs.text_encoder(PooledTextEncoderStage(module), module.config.vocab_size)
    elif name == flux.TEXT_ENCODER_2:
        stage = t5_stage(module, inputs.gen, STAGE_COMPONENTS[name])
    elif name == flux.DENOISER:
        stage = inputs.transformer(TransformerStage(prepare_transformer(module)))
    elif name == flux.VAE_DECODER:
        stage = inputs.vae_decoder(module)
    else:
        stage = inputs.vae_encoder(module)
    return replace(stage, weights=module, component=STAGE_COMPONENTS[name])


def stage_modules(modules: dict[str, torch.nn.Module], model: dict[str, Any]) -> dict[str, StageModule]:
    """Every stage's wrapper over already loaded components (`load_modules`); the
    transformer is prepared for export in place."""
    inputs = SampleInputs(model)
    return {name: stage_module(name, modules[STAGE_COMPONENTS[name]], model, inputs) for name in flux.STAGES}


__all__ = ["ExportFluxAttnProcessor", "PrimitiveRMSNorm", "SampleInputs", "TransformerStage", "finish_component",
           "load_modules", "load_stage", "load_tiny_vae", "model_facts", "prepare_transformer", "read_configs",
           "stage_facts", "stage_module", "stage_modules", "tiny_vae_facts", "tiny_vae_stage"]
