"""The torch side of the SD family: read the components' configs, load one stage's
module at a time, wrap it for export, make trace and check inputs. IO names and shapes
come from diffrt.families.sd.

The exporter never holds two stages' weights: model facts come from the config.json
files (`read_configs` builds each module on the meta device, so the config has the
defaults a loaded module's would), and `load_stage` loads only the component the stage
needs (the VAE once for its decoder stage, again for its encoder stage).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from diffrt.errors import DiffrtError
from diffrt.export.checkpoint import quiet_library_progress, read_json
from diffrt.export.textual_inversion import reserve_token_rows
from diffrt.families import sd
from diffrt.families.base import facts_to_json

logger = logging.getLogger(__name__)


@dataclass
class StageModule:
    """A stage ready to export: the module, the inputs to trace it with, and inputs
    of another shape to check the exported graph with."""

    module: torch.nn.Module
    trace_inputs: tuple[torch.Tensor, ...]
    check_inputs: dict[str, torch.Tensor]
    weights: torch.nn.Module | None = None
    """The checkpoint module inside `module` whose parameters the weight map names."""
    component: str = ""
    """Its checkpoint folder ("unet", "vae", ...), "tiny_vae" for the --tiny-vae decoder."""


class TextEncoderStage(torch.nn.Module):
    """last_hidden_state, pooler_output, and skip_hidden_states (batch, layers, seq,
    hidden): entry k is the final layer norm of hidden_states[-(k + 1)], diffusers'
    conditioning at clip_skip=k, so clip_skip is chosen per call without a re-export.
    One LayerNorm over the stack; the encoder itself runs once."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids=input_ids, output_hidden_states=True, return_dict=True)
        states = torch.stack(out.hidden_states[:0:-1], dim=1)  # the last layer's first; not the embeddings
        # transformers 5 dropped CLIPTextModel's `text_model` level (4.x: text_model.final_layer_norm)
        norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        skip = norm(states)
        return out.last_hidden_state, out.pooler_output, skip


def text_encoder_stage(encoder: torch.nn.Module, role: str) -> torch.nn.Module:
    """The export wrapper of a text encoder role (the torch backend builds its stages so)."""
    return TextEncoderStage(encoder)


class UNetStage(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None):
        return self.unet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False
        )[0]


class VaeDecoderStage(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class TinyVaeDecoderStage(torch.nn.Module):
    """AutoencoderTiny (the TAESD format) decoding the same scaled latents as the full
    VAE; its output is in [-1, 1] like AutoencoderKL's, so postprocessing is shared."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderStage(torch.nn.Module):
    """Outputs the diagonal Gaussian's parameters (mean and logvar stacked on channels),
    so img2img can sample or take the mode in numpy."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0].parameters


NEEDS = "an SD checkpoint needs text_encoder/, unet/ and vae/"
# The checkpoint folder each stage's module is loaded from.
STAGE_COMPONENTS = {sd.TEXT_ENCODER: "text_encoder", sd.DENOISER: "unet", sd.VAE_DECODER: "vae",
                    sd.VAE_ENCODER: "vae"}


def component_classes() -> dict[str, type]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"text_encoder": CLIPTextModel, "unet": UNet2DConditionModel, "vae": AutoencoderKL}


def read_configs(folder: Path) -> dict[str, Any]:
    """Every component's config, no weights read: what model_facts needs, and a broken
    or missing component found before the first stage is exported."""
    quiet_library_progress()
    return {name: read_config(folder, name, cls, NEEDS) for name, cls in component_classes().items()}


def load_modules(folder: Path) -> dict[str, torch.nn.Module]:
    """Every component loaded at once (for comparisons against torch; the exporter
    loads one stage's at a time, `load_stage`)."""
    quiet_library_progress()
    return {name: load_module(folder, name, cls, NEEDS) for name, cls in component_classes().items()}


def load_stage(folder: Path, name: str, model: dict[str, Any], inputs: SampleInputs) -> StageModule:
    """Stage `name` with only its own component loaded."""
    component = STAGE_COMPONENTS[name]
    quiet_library_progress()
    module = load_module(folder, component, component_classes()[component], NEEDS)
    return stage_module(name, module, model, inputs)


def read_config(folder: Path, name: str, cls, needs: str) -> Any:
    """folder/name's config as `cls.from_pretrained` would give it (defaults filled
    in), without reading the weights; a one-line error like load_module's."""
    path = folder / name
    if not path.is_dir():
        raise DiffrtError(f"{path} is missing; {needs}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise DiffrtError(f"{path} holds no weights (*.safetensors or *.bin); {needs}")
    try:
        if hasattr(cls, "config_class"):  # transformers: the config class knows its defaults
            return cls.config_class.from_pretrained(path)
        with torch.device("meta"):  # diffusers: the module's __init__ fills them in; on meta, no memory
            return cls.from_config(cls.load_config(path)).config
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffrtError(f"cannot load {path} as {cls.__name__}: {first}") from None


def load_module(folder: Path, name: str, cls, needs: str) -> torch.nn.Module:
    """folder/name loaded as `cls` in fp32, for inference; a one-line error when it is
    missing (`needs` says what the family's checkpoints hold) or cannot be loaded."""
    if not (folder / name).is_dir():
        raise DiffrtError(f"{folder / name} is missing; {needs}")
    logger.info("loading %s (%s)", name, cls.__name__)
    try:
        module = cls.from_pretrained(folder, subfolder=name, torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffrtError(f"cannot load {folder / name} as {cls.__name__}: {first}") from None
    return module.eval().requires_grad_(False)


def load_tiny_vae(path: Path, model: dict[str, Any]) -> torch.nn.Module:
    """An AutoencoderTiny (diffusers folder with config.json + weights, e.g. a saved
    madebyollin/taesd) that can decode this checkpoint's latents, or a one-line error."""
    from diffusers import AutoencoderTiny

    quiet_library_progress()
    try:
        vae = AutoencoderTiny.from_pretrained(path, torch_dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffrtError(f"--tiny-vae {path}: cannot load it as an AutoencoderTiny ({first})") from None
    config = vae.config
    factor = config.upsampling_scaling_factor ** (len(config.decoder_block_out_channels) - 1)
    if config.latent_channels != vae_channels(model) or factor != model["vae_scale_factor"]:
        raise DiffrtError(
            f"--tiny-vae {path}: it decodes {config.latent_channels}-channel latents upscaled {factor}x, this "
            f"checkpoint has {vae_channels(model)} channels and a {model['vae_scale_factor']}x VAE; "
            "use the tiny VAE made for this model family (taesd for SD 1.x/2.x, taesdxl for SDXL)"
        )
    return vae.eval().requires_grad_(False)


def tiny_vae_facts(vae: torch.nn.Module) -> dict[str, Any]:
    """The decoder's own latent scaling: diffusers divides latents by the decoding
    VAE's scaling_factor (1.0 for TAESD, which decodes the scaled latents directly)."""
    return {"scaling_factor": float(vae.config.scaling_factor), "shift_factor": float(vae.config.shift_factor or 0.0),
            # for the runtime's memory estimate (families.sd.DECODER_MEMORY_FACTS): no attention
            "vae_decoder_channels": int(vae.config.decoder_block_out_channels[-1]), "vae_mid_attention": False}


def tiny_vae_stage(vae: torch.nn.Module, model: dict[str, Any]) -> StageModule:
    gen = torch.Generator().manual_seed(1)
    channels = vae_channels(model)
    return StageModule(TinyVaeDecoderStage(vae), (torch.randn(2, channels, 5, 7, generator=gen),),
                       {"latent_sample": torch.randn(1, channels, 8, 6, generator=gen)}, weights=vae,
                       component="tiny_vae")


def model_facts(folder: Path, configs: dict[str, Any]) -> dict[str, Any]:
    """What the runtime needs to know about the checkpoint, in plain JSON types, from
    the components' configs (`read_configs`)."""
    text_config = configs["text_encoder"]
    unet_config = configs["unet"]
    vae_config = configs["vae"]
    tokenizer_config = {}
    if (folder / "tokenizer" / "tokenizer_config.json").is_file():
        tokenizer_config = read_json(folder / "tokenizer" / "tokenizer_config.json")
    max_length = tokenizer_config.get("model_max_length")
    if not isinstance(max_length, int) or max_length > text_config.max_position_embeddings:
        max_length = int(text_config.max_position_embeddings)
    vae_scale_factor = 2 ** (len(vae_config.block_out_channels) - 1)
    level, heads = first_attention_level(unet_config)
    # built as the family's typed facts: a misspelled or missing fact fails here, at export
    return facts_to_json(sd.Facts(**{
        "text_max_length": max_length,
        "text_hidden_size": int(text_config.hidden_size),
        "cross_attention_dim": int(unet_config.cross_attention_dim),
        "latent_channels": int(unet_config.in_channels),
        "time_cond_proj_dim": unet_config.time_cond_proj_dim,
        "sample_size": int(unet_config.sample_size),
        "vae_scale_factor": vae_scale_factor,
        "vae_scaling_factor": float(vae_config.scaling_factor),
        # image sizes must be multiples of this (diffusers checks multiples of 8)
        "size_multiple": max(8, vae_scale_factor),
        "num_upsamplers": len(unet_config.block_out_channels) - 1,
        # SD2.x computes attention scores in fp32 (the half-precision pass keeps them so)
        "upcast_attention": bool(unet_config.upcast_attention),
        # for the runtime's up-front memory check (families.sd.min_activation_bytes)
        "vae_decoder_channels": int(vae_config.block_out_channels[0]),
        "vae_mid_attention": bool(getattr(vae_config, "mid_block_add_attention", True)),
        "unet_first_attention_level": level,
        "unet_first_attention_heads": heads,
        "unet_first_channels": int(unet_config.block_out_channels[0]),
        "text_num_layers": int(text_config.num_hidden_layers),
        **vae_latent_facts(vae_config),
    }))


def vae_channels(model: dict[str, Any]) -> int:
    """The VAE's latent channels (an inpainting UNet's `latent_channels` are 9, its VAE's 4)."""
    return int(model.get("vae_latent_channels") or model["latent_channels"])


def vae_latent_facts(vae_config) -> dict[str, Any]:
    """The VAE's latent channels (initial noise and the decoder's input) and the shift
    its latents take before decoding (latents / scaling_factor + shift_factor)."""
    shift = getattr(vae_config, "shift_factor", None)
    return {"vae_latent_channels": int(vae_config.latent_channels),
            "vae_shift_factor": None if shift is None else float(shift)}


def first_attention_level(unet_config) -> tuple[int | None, int | None]:
    """(resolution level, heads) of the UNet's first down block with attention.

    diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads
    when `num_attention_heads` is unset (a historical naming quirk it keeps for SD1.x)."""
    heads = unet_config.num_attention_heads or unet_config.attention_head_dim
    for level, block in enumerate(unet_config.down_block_types):
        if "Attn" in block:
            return level, int(heads[level] if isinstance(heads, (list, tuple)) else heads)
    return None, None


class SampleInputs:
    """Seeded random inputs to trace a stage with and to check its graph with (at
    another shape), shared by the families' torch sides.

    The UNet is traced at latent sizes that are NOT multiples of 2**num_upsamplers:
    that makes diffusers pass explicit `upsample_size`s taken from the skip tensors,
    so the exported graph is correct at every latent size, not only multiples of 8.
    """

    def __init__(self, model: dict[str, Any], seed: int = 0):
        self.model = model
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def ids(self, vocab: int, batch: int) -> torch.Tensor:
        x = torch.randint(0, vocab - 1, (batch, self.model["text_max_length"]), generator=self.gen)
        x[:, -1] = vocab - 1  # an end-of-text token, so pooling is well defined
        return x

    def text_encoder(self, wrapper: torch.nn.Module, vocab: int) -> StageModule:
        return StageModule(wrapper, (self.ids(vocab, 2),), {"input_ids": self.ids(vocab, 1)})

    def unet(self, wrapper: torch.nn.Module, added=None) -> StageModule:
        """`added(batch, h, w)`: the family's extra conditioning inputs, in the wrapper's
        order after encoder_hidden_states (LCM's timestep_cond comes last)."""
        model, up = self.model, 2 ** self.model["num_upsamplers"]

        def feeds(batch: int, h: int, w: int, chunks: int) -> dict[str, torch.Tensor]:
            text = chunks * model["text_max_length"]  # the text length is dynamic (weighted prompts' chunks)
            out = {
                "sample": self.randn(batch, model["latent_channels"], h, w),
                "timestep": torch.full((batch,), 501.0),
                "encoder_hidden_states": self.randn(batch, text, model["cross_attention_dim"]),
                **(added(batch, h, w) if added else {}),
            }
            if model.get("time_cond_proj_dim"):
                out["timestep_cond"] = self.randn(batch, model["time_cond_proj_dim"])
            return out

        # traced at two chunks of text, checked at one: the text axis is exercised too
        return StageModule(wrapper, tuple(feeds(2, up + 1, 2 * up + 1, 2).values()), feeds(1, 2 * up, 3 * up, 1))

    def vae_decoder(self, vae: torch.nn.Module) -> StageModule:
        channels = vae_channels(self.model)
        return StageModule(VaeDecoderStage(vae), (self.randn(2, channels, 5, 7),),
                           {"latent_sample": self.randn(1, channels, 8, 6)})

    def vae_encoder(self, vae: torch.nn.Module) -> StageModule:
        f = self.model["vae_scale_factor"]
        return StageModule(VaeEncoderStage(vae), (self.randn(2, 3, 5 * f, 7 * f),),
                           {"sample": self.randn(1, 3, 8 * f, 6 * f)})


def stage_module(name: str, module: torch.nn.Module, model: dict[str, Any], inputs: SampleInputs) -> StageModule:
    """Stage `name`'s wrapper around its loaded component, with trace inputs and check
    inputs of a different shape. `inputs` draws from one generator: build the stages
    in the family's order to get the same inputs every time."""
    if name == sd.TEXT_ENCODER:
        reserve_token_rows(module)  # room for textual-inversion tokens loaded at run time
        stage = inputs.text_encoder(TextEncoderStage(module), module.config.vocab_size)
    elif name == sd.DENOISER:
        stage = inputs.unet(UNetStage(module))
    elif name == sd.VAE_DECODER:
        stage = inputs.vae_decoder(module)
    else:
        stage = inputs.vae_encoder(module)
    return replace(stage, weights=module, component=STAGE_COMPONENTS[name])


def stage_modules(modules: dict[str, torch.nn.Module], model: dict[str, Any]) -> dict[str, StageModule]:
    """Every stage's wrapper over already loaded components (`load_modules`)."""
    inputs = SampleInputs(model)
    return {name: stage_module(name, modules[STAGE_COMPONENTS[name]], model, inputs) for name in sd.STAGES}
