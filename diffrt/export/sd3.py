"""The torch side of the SD3 family: read the components' configs, load one stage's
module at a time, wrap it for export, make trace and check inputs. IO names and shapes
come from diffrt.families.sd3; the CLIP wrapper is SDXL's (penultimate hidden states +
projected pooled embeddings), the T5 one export/t5.py's, the VAE stages SD's.

A checkpoint saved without text_encoder_3 (model_index.json lists it as [null, null],
as `StableDiffusion3Pipeline.from_pretrained(..., text_encoder_3=None,
tokenizer_3=None).save_pretrained(...)` writes it) exports without the T5 stage; the
runtime then feeds zeros in its place, as diffusers does.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from diffrt.errors import DiffrtError
from diffrt.export import t5 as t5_export
from diffrt.export.checkpoint import quiet_library_progress
from diffrt.export.sd import (  # noqa: F401 - load_tiny_vae and friends are this module's too
    SampleInputs,
    StageModule,
    load_module,
    load_tiny_vae,
    read_config,
    tiny_vae_facts,
    tiny_vae_stage,
    vae_latent_facts,
)
from diffrt.export.sdxl import TextEncoderStage, _components, _max_length
from diffrt.families import sd3, t5
from diffrt.families.base import facts_to_json

logger = logging.getLogger(__name__)

NEEDS = "an SD3 checkpoint needs text_encoder/, text_encoder_2/, transformer/ and vae/ (text_encoder_3/ is optional)"
STAGE_COMPONENTS = {sd3.TEXT_ENCODER: "text_encoder", sd3.TEXT_ENCODER_2: "text_encoder_2",
                    sd3.TEXT_ENCODER_3: "text_encoder_3", sd3.DENOISER: "transformer", sd3.VAE_DECODER: "vae",
                    sd3.VAE_ENCODER: "vae"}
# Traced at one size and text length, checked at others (latents in whole patches).
TRACE_LATENT, CHECK_LATENT = (6, 10), (8, 4)
TRACE_TEXT, CHECK_TEXT = 13, 9


def _per_head(attn, norm, x):
    """A (B, S, H*D) projection, QK-normalized per head when the layer has a norm
    (diffusers normalizes (B, H, S, D) over D: the same numbers), kept flat."""
    if norm is None:
        return x
    batch, inner = x.shape[0], attn.to_q.out_features
    return norm(x.view(batch, -1, attn.heads, inner // attn.heads)).reshape(batch, -1, inner)


def _attention(attn, q, k, v):
    """Scaled dot-product attention over flat (B, S, H*D) q, k, v with the head split and
    merge of diffusers' AttnProcessor2_0: the form the fused-attention pass matches."""
    batch, inner = q.shape[0], attn.to_q.out_features

    def heads(t):
        return t.view(batch, -1, attn.heads, inner // attn.heads).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    return out.transpose(1, 2).reshape(batch, -1, inner)


class ExportJointAttnProcessor:
    """diffusers' JointAttnProcessor2_0 (an MMDiT block's joint attention: image tokens,
    then text tokens) and AttnProcessor2_0 (MMDiT-X's second, image-only attention) as
    the exporter should write them: the same math, with the QK norms applied per head
    on the flat projections and the image and text streams concatenated before the heads
    are split. diffusers splits heads first and concatenates (B, H, S, D) tensors, which
    the fused-attention pass cannot take; this way each attention becomes one
    MultiHeadAttention op for ONNX Runtime (tests compare with the unchanged pipeline)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("StableDiffusion3Pipeline passes no attention mask")
        q = _per_head(attn, attn.norm_q, attn.to_q(hidden_states))
        k = _per_head(attn, attn.norm_k, attn.to_k(hidden_states))
        v = attn.to_v(hidden_states)
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            q = torch.cat([q, _per_head(attn, attn.norm_added_q, attn.add_q_proj(e))], dim=1)
            k = torch.cat([k, _per_head(attn, attn.norm_added_k, attn.add_k_proj(e))], dim=1)
            v = torch.cat([v, attn.add_v_proj(e)], dim=1)
        out = _attention(attn, q, k, v).to(q.dtype)
        image = attn.to_out[1](attn.to_out[0](out[:, :hidden_states.shape[1]]))
        if encoder_hidden_states is None:
            return image
        context = out[:, hidden_states.shape[1]:]
        return image, (context if attn.context_pre_only else attn.to_add_out(context))


def prepare_transformer(transformer: torch.nn.Module) -> torch.nn.Module:
    """The export processor on every attention of a loaded SD3Transformer2DModel (its
    parameters untouched)."""
    for block in transformer.transformer_blocks:
        for attn in (block.attn, getattr(block, "attn2", None)):
            if attn is not None:
                attn.set_processor(ExportJointAttnProcessor())
    return transformer


class TransformerStage(torch.nn.Module):
    """SD3Transformer2DModel in diffusers' call: the velocity for the latents."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = prepare_transformer(transformer)

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
        return self.transformer(hidden_states=hidden_states, timestep=timestep,
                                encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, return_dict=False)[0]


def component_classes(folder: Path) -> dict[str, type]:
    """The components this checkpoint has (text_encoder_3 only when saved with it)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    present = _components(folder)
    loaders = {"text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
               "text_encoder_3": T5EncoderModel, "transformer": SD3Transformer2DModel, "vae": AutoencoderKL}
    return {name: cls for name, cls in loaders.items() if name in present or name != "text_encoder_3"}


def read_configs(folder: Path) -> dict[str, Any]:
    """Every component's config, no weights read (see export/sd.py)."""
    quiet_library_progress()
    return {name: read_config(folder, name, cls, NEEDS) for name, cls in component_classes(folder).items()}


def load_modules(folder: Path) -> dict[str, torch.nn.Module]:
    """Every component loaded at once (for comparisons against torch)."""
    quiet_library_progress()
    return {name: load_module(folder, name, cls, NEEDS) for name, cls in component_classes(folder).items()}


def load_stage(folder: Path, name: str, model: dict[str, Any], inputs: SampleInputs) -> StageModule:
    """Stage `name` with only its own component loaded."""
    component = STAGE_COMPONENTS[name]
    quiet_library_progress()
    module = load_module(folder, component, component_classes(folder)[component], NEEDS)
    return stage_module(name, module, model, inputs)


def stage_facts(name: str, model: dict[str, Any]) -> dict[str, Any]:
    """What a stage records about itself: T5's precision rule (families/t5.py)."""
    return t5.stage_facts() if name == sd3.TEXT_ENCODER_3 else {}


def finish_component(path: Path, name: str) -> None:
    """A copied T5 tokenizer folder gets a tokenizer.json when it has only spiece.model."""
    if name == sd3.TOKENIZER_OF[sd3.TEXT_ENCODER_3]:
        t5_export.ensure_tokenizer_json(path)


def model_facts(folder: Path, configs: dict[str, Any]) -> dict[str, Any]:
    """What the runtime needs to know about the checkpoint, in plain JSON types, from
    the components' configs (`read_configs`)."""
    encoders = tuple(r for r in (sd3.TEXT_ENCODER, sd3.TEXT_ENCODER_2, sd3.TEXT_ENCODER_3) if r in configs)
    lengths = {_max_length(folder, sd3.TOKENIZER_OF[r], configs[r]) for r in sd3.CLIP_ENCODERS}
    if len(lengths) != 1:
        raise DiffrtError(f"{folder}: the CLIP tokenizers pad to different lengths {sorted(lengths)}; SD3 "
                          "concatenates both encoders' hidden states, which needs one length")
    transformer, vae = configs["transformer"], configs["vae"]
    clip_1, clip_2 = configs[sd3.TEXT_ENCODER], configs[sd3.TEXT_ENCODER_2]
    pooled = int(clip_1.projection_dim) + int(clip_2.projection_dim)
    if pooled != transformer.pooled_projection_dim:
        raise DiffrtError(f"{folder / 'transformer'}: pooled_projection_dim={transformer.pooled_projection_dim}, "
                          f"but the CLIP encoders' projections add up to {pooled}")
    if int(clip_1.hidden_size) + int(clip_2.hidden_size) > transformer.joint_attention_dim:
        raise DiffrtError(f"{folder / 'transformer'}: joint_attention_dim={transformer.joint_attention_dim} is "
                          "narrower than the two CLIP encoders' hidden states together")
    if sd3.TEXT_ENCODER_3 in configs and configs[sd3.TEXT_ENCODER_3].d_model != transformer.joint_attention_dim:
        raise DiffrtError(f"{folder / 'text_encoder_3'}: d_model={configs[sd3.TEXT_ENCODER_3].d_model}, the "
                          f"transformer takes {transformer.joint_attention_dim}-wide text states")
    vae_scale_factor = 2 ** (len(vae.block_out_channels) - 1)
    facts = {
        "text_encoders": list(encoders),
        "text_max_length": lengths.pop(),
        "text_hidden_size": int(clip_1.hidden_size),
        "text_hidden_size_2": int(clip_2.hidden_size),
        "projection_dim": int(clip_1.projection_dim),
        "projection_dim_2": int(clip_2.projection_dim),
        "joint_attention_dim": int(transformer.joint_attention_dim),
        "pooled_projection_dim": int(transformer.pooled_projection_dim),
        "latent_channels": int(transformer.in_channels),
        "patch_size": int(transformer.patch_size),
        "sample_size": int(transformer.sample_size),
        "pos_embed_max_size": int(transformer.pos_embed_max_size),
        "num_layers": int(transformer.num_layers),
        "num_attention_heads": int(transformer.num_attention_heads),
        "attention_head_dim": int(transformer.attention_head_dim),
        "dual_attention_layers": [int(i) for i in (transformer.dual_attention_layers or ())],
        "vae_scale_factor": vae_scale_factor,
        "vae_scaling_factor": float(vae.scaling_factor),
        "size_multiple": vae_scale_factor * int(transformer.patch_size),
        "vae_decoder_channels": int(vae.block_out_channels[0]),
        "vae_mid_attention": bool(getattr(vae, "mid_block_add_attention", True)),
        **vae_latent_facts(vae),
    }
    if sd3.TEXT_ENCODER_3 in configs:
        facts.update(t5_export.t5_facts(configs[sd3.TEXT_ENCODER_3], "t5_"))
    # built as the family's typed facts: a misspelled or missing fact fails here, at export
    return facts_to_json(sd3.Facts(**facts))


def _transformer_stage(module: torch.nn.Module, model: dict[str, Any], inputs: SampleInputs) -> StageModule:
    def feeds(batch: int, latent: tuple[int, int], text: int) -> dict[str, torch.Tensor]:
        return {"hidden_states": inputs.randn(batch, model["latent_channels"], *latent),
                "timestep": torch.full((batch,), 501.0),
                "encoder_hidden_states": inputs.randn(batch, text, model["joint_attention_dim"]),
                "pooled_projections": inputs.randn(batch, model["pooled_projection_dim"])}

    return StageModule(TransformerStage(module), tuple(feeds(2, TRACE_LATENT, TRACE_TEXT).values()),
                       feeds(1, CHECK_LATENT, CHECK_TEXT))


def stage_module(name: str, module: torch.nn.Module, model: dict[str, Any], inputs: SampleInputs) -> StageModule:
    """Stage `name`'s wrapper around its loaded component, with trace inputs and check
    inputs of another shape (build the stages in the family's order: one generator)."""
    if name in sd3.CLIP_ENCODERS:
        stage = inputs.text_encoder(TextEncoderStage(module, with_projection=True), module.config.vocab_size)
    elif name == sd3.TEXT_ENCODER_3:
        stage = t5_export.t5_stage(module, inputs.gen, STAGE_COMPONENTS[name])
    elif name == sd3.DENOISER:
        stage = _transformer_stage(module, model, inputs)
    elif name == sd3.VAE_DECODER:
        stage = inputs.vae_decoder(module)
    else:
        stage = inputs.vae_encoder(module)
    return replace(stage, weights=module, component=STAGE_COMPONENTS[name])


def stage_modules(modules: dict[str, torch.nn.Module], model: dict[str, Any]) -> dict[str, StageModule]:
    """Every stage's wrapper over already loaded components (`load_modules`)."""
    inputs = SampleInputs(model)
    return {name: stage_module(name, modules[STAGE_COMPONENTS[name]], model, inputs) for name in sd3.stages(model)}
