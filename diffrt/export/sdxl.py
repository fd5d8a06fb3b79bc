"""The torch side of the SDXL family: read the components' configs, load one stage's
module at a time, wrap it for export, make trace and check inputs. IO names and shapes
come from diffrt.families.sdxl; the VAE and tiny-VAE stages are SD's (export/sd.py),
and so is the one-stage-at-a-time loading it describes."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from diffrt.errors import DiffrtError
from diffrt.export.checkpoint import quiet_library_progress, read_json, read_model_index
from diffrt.export.sd import (  # noqa: F401 - load_tiny_vae and friends are this module's too
    SampleInputs,
    StageModule,
    first_attention_level,
    load_module,
    load_tiny_vae,
    read_config,
    tiny_vae_facts,
    tiny_vae_stage,
    vae_latent_facts,
)
from diffrt.export.textual_inversion import reserve_token_rows
from diffrt.families import sdxl
from diffrt.families.base import facts_to_json

logger = logging.getLogger(__name__)


class TextEncoderStage(torch.nn.Module):
    """Penultimate hidden states (SDXL's conditioning; no final layer norm), for the
    bigG encoder (CLIPTextModelWithProjection) the projected pooled `text_embeds`, and
    skip_hidden_states (batch, layers, seq, hidden): entry k is hidden_states[-(k + 2)],
    diffusers' SDXL conditioning at clip_skip=k (chosen per call, no re-export)."""

    def __init__(self, text_encoder: torch.nn.Module, with_projection: bool, with_skip: bool = False):
        super().__init__()
        self.text_encoder = text_encoder
        self.with_projection = with_projection
        self.with_skip = with_skip  # SDXL's stages; SD3 (which reuses this wrapper) declares no such output

    def forward(self, input_ids):
        out = self.text_encoder(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        outputs = (out.hidden_states[-2], out.text_embeds) if self.with_projection else (out.hidden_states[-2],)
        if self.with_skip:  # the penultimate first, down to the embeddings
            outputs += (torch.stack(out.hidden_states[-2::-1], dim=1),)
        return outputs if len(outputs) > 1 else outputs[0]


def text_encoder_stage(encoder: torch.nn.Module, role: str) -> torch.nn.Module:
    """The export wrapper of a text encoder role (the torch backend builds its stages so):
    the bigG encoder (text_encoder_2) also gives its projected pooled embeds."""
    return TextEncoderStage(encoder, with_projection=role == sdxl.TEXT_ENCODER_2, with_skip=True)


class UNetStage(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, timestep_cond=None):
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False,
        )[0]


def _components(folder: Path) -> dict[str, str]:
    """component -> class name, for the components model_index.json says exist (a
    refiner lists text_encoder and tokenizer as [null, null])."""
    index = read_model_index(folder)
    return {k: v[1] for k, v in index.items()
            if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is not None and v[1] is not None}


NEEDS = "an SDXL checkpoint needs text_encoder_2/, unet/ and vae/ (and text_encoder/ unless it is a refiner)"
# The checkpoint folder each stage's module is loaded from.
STAGE_COMPONENTS = {sdxl.TEXT_ENCODER: "text_encoder", sdxl.TEXT_ENCODER_2: "text_encoder_2",
                    sdxl.DENOISER: "unet", sdxl.VAE_DECODER: "vae", sdxl.VAE_ENCODER: "vae"}


def component_classes(folder: Path) -> dict[str, type]:
    """The components this checkpoint has (a refiner has no text_encoder) and their classes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    present = _components(folder)
    loaders = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection,
               "unet": UNet2DConditionModel, "vae": AutoencoderKL}
    required = ("text_encoder_2", "unet", "vae")
    return {name: cls for name, cls in loaders.items() if name in present or name in required}


def read_configs(folder: Path) -> dict[str, Any]:
    """Every component's config, no weights read (see export/sd.py)."""
    quiet_library_progress()
    return {name: read_config(folder, name, cls, NEEDS) for name, cls in component_classes(folder).items()}


def load_modules(folder: Path) -> dict[str, torch.nn.Module]:
    """Every component loaded at once (for comparisons against torch; the exporter
    loads one stage's at a time, `load_stage`)."""
    quiet_library_progress()
    return {name: load_module(folder, name, cls, NEEDS) for name, cls in component_classes(folder).items()}


def load_stage(folder: Path, name: str, model: dict[str, Any], inputs: SampleInputs) -> StageModule:
    """Stage `name` with only its own component loaded."""
    component = STAGE_COMPONENTS[name]
    quiet_library_progress()
    module = load_module(folder, component, component_classes(folder)[component], NEEDS)
    return stage_module(name, module, model, inputs)


def _max_length(folder: Path, tokenizer: str, text_config) -> int:
    path = folder / tokenizer / "tokenizer_config.json"
    length = read_json(path).get("model_max_length") if path.is_file() else None
    if not isinstance(length, int) or length > text_config.max_position_embeddings:
        length = int(text_config.max_position_embeddings)
    return length


def model_facts(folder: Path, configs: dict[str, Any]) -> dict[str, Any]:
    """What the runtime needs to know about the checkpoint, in plain JSON types, from
    the components' configs (`read_configs`)."""
    index = read_model_index(folder)
    encoders = tuple(r for r in (sdxl.TEXT_ENCODER, sdxl.TEXT_ENCODER_2) if r in configs)
    lengths = {_max_length(folder, sdxl.TOKENIZER_OF[r], configs[r]) for r in encoders}
    if len(lengths) != 1:
        raise DiffrtError(f"{folder}: the tokenizers pad to different lengths {sorted(lengths)}; SDXL concatenates "
                          "both encoders' hidden states, which needs one length")
    unet_config, vae_config = configs["unet"], configs["vae"]
    text_2 = configs[sdxl.TEXT_ENCODER_2]
    projection = int(text_2.projection_dim)
    if unet_config.addition_embed_type != "text_time":
        raise DiffrtError(f"{folder / 'unet'}: addition_embed_type={unet_config.addition_embed_type!r}; an SDXL UNet "
                          "conditions on 'text_time'")
    # the added-condition embedding's input width (add_embedding.linear_1.in_features)
    time_ids, rest = divmod(unet_config.projection_class_embeddings_input_dim - projection,
                            unet_config.addition_time_embed_dim)
    pipeline = "img2img" if index["_class_name"] == sdxl.REFINER_CLASS else "text2img"
    aesthetic = bool(index.get("requires_aesthetics_score", False))
    if rest or time_ids != (5 if aesthetic else 6):
        raise DiffrtError(f"{folder / 'unet'}: its added-condition embedding takes {time_ids} time ids "
                          f"(requires_aesthetics_score={aesthetic} means {5 if aesthetic else 6}); "
                          "model_index.json and the UNet disagree")
    vae_scale_factor = 2 ** (len(vae_config.block_out_channels) - 1)
    level, heads = first_attention_level(unet_config)
    facts = {
        "text_encoders": list(encoders),
        "text_max_length": lengths.pop(),
        "text_hidden_size_2": int(text_2.hidden_size),
        "projection_dim": projection,
        "cross_attention_dim": int(unet_config.cross_attention_dim),
        "time_ids": int(time_ids),
        "pipeline": pipeline,
        "requires_aesthetics_score": aesthetic,
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", pipeline == "text2img")),
        "latent_channels": int(unet_config.in_channels),
        "time_cond_proj_dim": unet_config.time_cond_proj_dim,
        "sample_size": int(unet_config.sample_size),
        "vae_scale_factor": vae_scale_factor,
        "vae_scaling_factor": float(vae_config.scaling_factor),
        # SDXL's VAE overflows in fp16: diffusers runs it in fp32 (force_upcast); so do we
        "vae_force_upcast": bool(getattr(vae_config, "force_upcast", True)),
        "size_multiple": max(8, vae_scale_factor),
        "num_upsamplers": len(unet_config.block_out_channels) - 1,
        "upcast_attention": bool(unet_config.upcast_attention),
        "vae_decoder_channels": int(vae_config.block_out_channels[0]),
        "vae_mid_attention": bool(getattr(vae_config, "mid_block_add_attention", True)),
        "unet_first_attention_level": level,
        "unet_first_attention_heads": heads,
        "unet_first_channels": int(unet_config.block_out_channels[0]),
        **vae_latent_facts(vae_config),
    }
    facts["text_num_layers_2"] = int(text_2.num_hidden_layers)
    if sdxl.TEXT_ENCODER in configs:
        facts["text_hidden_size"] = int(configs[sdxl.TEXT_ENCODER].hidden_size)
        facts["text_num_layers"] = int(configs[sdxl.TEXT_ENCODER].num_hidden_layers)
    # built as the family's typed facts: a misspelled or missing fact fails here, at export
    return facts_to_json(sdxl.Facts(**facts))


def stage_module(name: str, module: torch.nn.Module, model: dict[str, Any], inputs: SampleInputs) -> StageModule:
    """Stage `name`'s wrapper around its loaded component, with trace inputs and check
    inputs of a different shape. `inputs` draws from one generator: build the stages
    in the family's order to get the same inputs every time."""
    f = model["vae_scale_factor"]

    def added(batch: int, h: int, w: int) -> dict[str, torch.Tensor]:
        # original size, crop top-left, then the target size or (refiner) an aesthetic score
        time_ids = [h * f, w * f, 0, 0] + ([6.0] if model["requires_aesthetics_score"] else [h * f, w * f])
        return {"text_embeds": inputs.randn(batch, model["projection_dim"]),
                "time_ids": torch.tensor([time_ids] * batch, dtype=torch.float32)}

    if name in (sdxl.TEXT_ENCODER, sdxl.TEXT_ENCODER_2):
        reserve_token_rows(module)  # room for textual-inversion tokens loaded at run time
        stage = inputs.text_encoder(TextEncoderStage(module, name == sdxl.TEXT_ENCODER_2, with_skip=True),
                                    module.config.vocab_size)
    elif name == sdxl.DENOISER:
        stage = inputs.unet(UNetStage(module), added)
    elif name == sdxl.VAE_DECODER:
        stage = inputs.vae_decoder(module)
    else:
        stage = inputs.vae_encoder(module)
    return replace(stage, weights=module, component=STAGE_COMPONENTS[name])


def stage_modules(modules: dict[str, torch.nn.Module], model: dict[str, Any]) -> dict[str, StageModule]:
    """Every stage's wrapper over already loaded components (`load_modules`)."""
    inputs = SampleInputs(model)
    return {name: stage_module(name, modules[STAGE_COMPONENTS[name]], model, inputs)
            for name in (*model["text_encoders"], sdxl.DENOISER, sdxl.VAE_DECODER, sdxl.VAE_ENCODER)}
