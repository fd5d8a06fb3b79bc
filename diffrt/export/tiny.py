"""Tiny random-weight diffusers checkpoints, made locally and offline.

Used by `diffrt demo` and the tests: the same module classes and code paths as the
real checkpoints (CLIP text encoder, UNet2DConditionModel, AutoencoderKL, a CLIP BPE
tokenizer, the checkpoint's scheduler config), with small widths so that export and
generation take seconds on a CPU.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

KINDS = ("sd15", "sd2", "lcm")


def make_tiny_taesd(folder: str | Path, seed: int = 0) -> Path:
    """A tiny random-weight AutoencoderTiny (the TAESD architecture) that decodes the
    tiny SD checkpoints' 4-channel latents with the same 2x upscale."""
    from diffusers import AutoencoderTiny

    from diffrt.export.checkpoint import quiet_library_progress

    quiet_library_progress()
    torch.manual_seed(seed)
    vae = AutoencoderTiny(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                          num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)
    vae.save_pretrained(folder)
    return Path(folder)

_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
_SCHEDULERS = {
    # runwayml/stable-diffusion-v1-5's scheduler_config.json
    "sd15": ("PNDMScheduler", {**_SD_BETAS, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                               "trained_betas": None, "clip_sample": False}),
    # stabilityai/stable-diffusion-2-1's (v-prediction)
    "sd2": ("DDIMScheduler", {**_SD_BETAS, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False,
                              "prediction_type": "v_prediction", "trained_betas": None}),
    # SimianLuo/LCM_Dreamshaper_v7's
    "lcm": ("LCMScheduler", {**_SD_BETAS, "set_alpha_to_one": True, "steps_offset": 1, "clip_sample": False,
                             "original_inference_steps": 50, "prediction_type": "epsilon", "trained_betas": None,
                             "timestep_spacing": "leading"}),
}


# The UNet shape every tiny checkpoint shares: two levels, cross-attention in the lower one.
_TINY_UNET = dict(in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32)


def _tiny_kl_vae(sample_size: int, **config):
    """A tiny AutoencoderKL: 4 latent channels, downsampling by 2 (images are
    sample_size * 2 pixels); `config` adds the family's own keys (scaling factor, ...)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
                         norm_num_groups=32, sample_size=sample_size * 2, **config)


def make_tiny_sd(folder: str | Path, kind: str = "sd15", seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny random-weight pipeline of `kind` to `folder` with save_pretrained.

    sd15: StableDiffusionPipeline, PNDM, epsilon, pad token "<|endoftext|>".
    sd2:  StableDiffusionPipeline, DDIM v-prediction, linear projections, pad token "!".
    lcm:  LatentConsistencyModelPipeline, LCM scheduler, UNet with time_cond_proj_dim.
    The default image is sample_size * 2 pixels square (the tiny VAE downsamples by 2).
    """
    import diffusers
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffrt.export.checkpoint import quiet_library_progress
    from diffrt.export.clip_vocab import write_tiny_clip_tokenizer

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(KINDS)}")
    folder = Path(folder)
    quiet_library_progress()
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_clip_tokenizer(Path(tmp), pad_token="!" if kind == "sd2" else "<|endoftext|>")
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=3,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="gelu" if kind == "sd2" else "quick_gelu",
        )
    )
    unet = UNet2DConditionModel(
        **_TINY_UNET,
        sample_size=sample_size,
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if kind == "sd2" else 8,
        use_linear_projection=kind == "sd2",
        time_cond_proj_dim=32 if kind == "lcm" else None,
    )
    vae = _tiny_kl_vae(sample_size)
    class_name, config = _SCHEDULERS[kind]
    scheduler = getattr(diffusers, class_name).from_config(config)
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    if kind == "lcm":
        pipe = diffusers.LatentConsistencyModelPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                        requires_safety_checker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.save_pretrained(folder)
    logger.info("wrote a tiny random-weight %s checkpoint to %s", kind, folder)
    return folder


def make_tiny_sd_inpaint(folder: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """A tiny StableDiffusionInpaintPipeline with a dedicated 9-channel inpainting UNet
    (latents, mask, masked-image latents in; 4 channels out), otherwise the sd15 kind:
    PNDM, epsilon, the same text encoder and VAE shapes."""
    import diffusers
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        base = diffusers.StableDiffusionPipeline.from_pretrained(make_tiny_sd(Path(tmp) / "sd15", "sd15", seed,
                                                                              sample_size))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**{**_TINY_UNET, "in_channels": 9}, sample_size=sample_size, cross_attention_dim=32,
                                attention_head_dim=8)
    pipe = diffusers.StableDiffusionInpaintPipeline(vae=base.vae, text_encoder=base.text_encoder,
                                                    tokenizer=base.tokenizer, unet=unet, scheduler=base.scheduler,
                                                    safety_checker=None, feature_extractor=None,
                                                    requires_safety_checker=False)
    pipe.save_pretrained(folder)
    logger.info("wrote a tiny random-weight 9-channel inpainting checkpoint to %s", folder)
    return folder


SDXL_KINDS = ("sdxl", "sdxl-lcm", "sdxl-refiner")
# stabilityai/stable-diffusion-xl-base-1.0's (and the refiner's) scheduler_config.json
_SDXL_SCHEDULER = {**_SD_BETAS, "interpolation_type": "linear", "prediction_type": "epsilon", "sample_max_value": 1.0,
                   "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
                   "trained_betas": None, "use_karras_sigmas": False, "clip_sample": False}


def make_tiny_sdxl(folder: str | Path, kind: str = "sdxl", seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny random-weight SDXL pipeline of `kind` to `folder` with save_pretrained.

    sdxl:         StableDiffusionXLPipeline: CLIP text encoder (quick_gelu, pad
                  "<|endoftext|>") + a bigG-like CLIPTextModelWithProjection (gelu, pad
                  "!"), a UNet with text_time added conditions (6 time ids), SDXL's
                  Euler scheduler config, a VAE with SDXL's scaling factor and force_upcast.
    sdxl-lcm:     the same with an LCM-distilled UNet (time_cond_proj_dim), as
                  latent-consistency/lcm-sdxl is used.
    sdxl-refiner: StableDiffusionXLImg2ImgPipeline: the second encoder only, a UNet on
                  its hidden states with aesthetic-score time ids (5), no zeroed negatives.
    """
    import diffusers
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from diffrt.export.checkpoint import quiet_library_progress
    from diffrt.export.clip_vocab import write_tiny_clip_tokenizer

    if kind not in SDXL_KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(SDXL_KINDS)}")
    folder = Path(folder)
    quiet_library_progress()
    torch.manual_seed(seed)
    tokenizers = {}
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_clip_tokenizer(Path(tmp), pad_token=pad)
            tokenizers[name] = CLIPTokenizer.from_pretrained(tmp)

    def text_config(tokenizer, act: str, hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37,
                              num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=77,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, hidden_act=act, projection_dim=16)

    refiner = kind == "sdxl-refiner"
    text_encoder = None if refiner else CLIPTextModel(text_config(tokenizers["tokenizer"], "quick_gelu", 32))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizers["tokenizer_2"], "gelu", 24))
    time_ids = 5 if refiner else 6
    unet = UNet2DConditionModel(
        **_TINY_UNET,
        sample_size=sample_size,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=time_ids * 8 + 16,
        cross_attention_dim=24 if refiner else 32 + 24,
        time_cond_proj_dim=32 if kind == "sdxl-lcm" else None,
    )
    vae = _tiny_kl_vae(sample_size, scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE config
    scheduler = diffusers.EulerDiscreteScheduler.from_config(_SDXL_SCHEDULER)
    parts = dict(vae=vae, text_encoder_2=text_encoder_2, tokenizer_2=tokenizers["tokenizer_2"], unet=unet,
                 scheduler=scheduler)
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**parts, text_encoder=None, tokenizer=None,
                                                          requires_aesthetics_score=True,
                                                          force_zeros_for_empty_prompt=False)
    else:
        pipe = diffusers.StableDiffusionXLPipeline(**parts, text_encoder=text_encoder,
                                                   tokenizer=tokenizers["tokenizer"])
    pipe.save_pretrained(folder)
    logger.info("wrote a tiny random-weight %s checkpoint to %s", kind, folder)
    return folder


def make_tiny_sdxl_inpaint(folder: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """A tiny StableDiffusionXLInpaintPipeline with a dedicated 9-channel inpainting UNet
    (as diffusers/stable-diffusion-xl-1.0-inpainting-0.1: the sdxl kind's encoders, VAE
    and scheduler, its UNet config with 9 input channels, new random weights)."""
    import diffusers
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        base = diffusers.StableDiffusionXLPipeline.from_pretrained(make_tiny_sdxl(Path(tmp) / "sdxl", "sdxl", seed,
                                                                                  sample_size))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    pipe = diffusers.StableDiffusionXLInpaintPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=base.scheduler, requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder)
    logger.info("wrote a tiny random-weight 9-channel SDXL inpainting checkpoint to %s", folder)
    return folder


FLUX_KINDS = ("flux", "flux-dev")
# black-forest-labs/FLUX.1-schnell's and FLUX.1-dev's scheduler_config.json
_FLUX_SCHEDULERS = {
    "flux": {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
             "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False},
    "flux-dev": {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                 "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
}


def make_tiny_flux(folder: str | Path, kind: str = "flux", seed: int = 0, sample_size: int | None = None) -> Path:
    """Write a tiny random-weight FluxPipeline of `kind` to `folder` with save_pretrained.

    flux:     schnell-style: no guidance embedding, the static-shift scheduler config.
    flux-dev: dev-style: a guidance embedding, dynamic shifting (mu from the image size).
    Both: a CLIP text encoder (its pooled output is used), a T5 v1.1-style encoder with a
    trained tiny SentencePiece tokenizer, a FluxTransformer2DModel (1 double-stream and 2
    single-stream blocks, 2 heads of 16 with QK RMSNorm and rotary axes 4+6+6), and a
    16-channel AutoencoderKL without quant convs, with FLUX.1's scaling and shift factors
    (downsampling by 2, so images are multiples of 4 pixels). `sample_size` is unused:
    FluxPipeline's default size is fixed (128 latent pixels).
    """
    import diffusers
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffrt.export.checkpoint import quiet_library_progress
    from diffrt.export.clip_vocab import write_tiny_clip_tokenizer
    from diffrt.export.t5 import tiny_t5_encoder, write_tiny_t5_tokenizer

    if kind not in FLUX_KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(FLUX_KINDS)}")
    folder = Path(folder)
    quiet_library_progress()
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_clip_tokenizer(Path(tmp), pad_token="<|endoftext|>")
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
        tokenizer_2 = write_tiny_t5_tokenizer(Path(tmp) / "t5", seed=seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="quick_gelu", projection_dim=32))
    text_encoder_2 = tiny_t5_encoder(len(tokenizer_2), d_model=32, seed=seed)
    torch.manual_seed(seed + 1)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=kind == "flux-dev", axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=16,
                        norm_num_groups=32, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(_FLUX_SCHEDULERS[kind])
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                  text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(folder)
    logger.info("wrote a tiny random-weight %s checkpoint to %s", kind, folder)
    return folder


SD3_KINDS = ("sd3", "sd3-no-t5")
# stabilityai/stable-diffusion-3.5-medium's (and -large's) scheduler_config.json
_SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}


def make_tiny_sd3(folder: str | Path, kind: str = "sd3", seed: int = 0, sample_size: int = 32) -> Path:
    """Write a tiny random-weight StableDiffusion3Pipeline of `kind` to `folder`.

    sd3:       SD3.5-medium's kind: CLIP-L-like (quick_gelu, pad "<|endoftext|>") and
               CLIP-G-like (gelu, pad "!") encoders with projections, a T5 v1.1 encoder
               with a trained SentencePiece tokenizer, an MMDiT-X transformer (a second
               self-attention in layer 0, QK RMS norm), a 16-channel VAE with SD3's
               scaling and shift factors, SD3.5's flow-match scheduler config (shift 3).
    sd3-no-t5: SD3.5-large's kind (no extra self-attention) saved without
               text_encoder_3 / tokenizer_3, as diffusers allows.
    The default image is sample_size * 2 pixels square (the VAE downsamples by 2).
    """
    import diffusers
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from diffrt.export.checkpoint import quiet_library_progress
    from diffrt.export.clip_vocab import write_tiny_clip_tokenizer
    from diffrt.export.t5 import tiny_t5_encoder, write_tiny_t5_tokenizer

    if kind not in SD3_KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(SD3_KINDS)}")
    folder = Path(folder)
    quiet_library_progress()
    torch.manual_seed(seed)
    clip = {}
    for name, pad, act, hidden in (("", "<|endoftext|>", "quick_gelu", 32), ("_2", "!", "gelu", 24)):
        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_clip_tokenizer(Path(tmp), pad_token=pad)
            tokenizer = CLIPTokenizer.from_pretrained(tmp)
        config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37,
                                num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=77,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, hidden_act=act, projection_dim=hidden)
        clip[f"tokenizer{name}"], clip[f"text_encoder{name}"] = tokenizer, CLIPTextModelWithProjection(config)
    joint = 64  # T5's width; CLIP's 32 + 24 are zero-padded to it
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=joint, caption_projection_dim=32, pooled_projection_dim=32 + 24,
        out_channels=16, pos_embed_max_size=64, dual_attention_layers=(0,) if kind == "sd3" else (),
        qk_norm="rms_norm")
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=16,
                        norm_num_groups=32, sample_size=sample_size * 2, scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(_SD3_SCHEDULER)
    text_encoder_3 = tokenizer_3 = None
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "sd3":
            tokenizer_3 = write_tiny_t5_tokenizer(Path(tmp), seed=seed)
            text_encoder_3 = tiny_t5_encoder(len(tokenizer_3), d_model=joint, seed=seed)
        pipe = diffusers.StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                                  text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, **clip)
        pipe.save_pretrained(folder)
        if kind == "sd3":  # SD3 checkpoints carry the SentencePiece model beside tokenizer.json
            shutil.copy(Path(tmp) / "spiece.model", folder / "tokenizer_3" / "spiece.model")
    logger.info("wrote a tiny random-weight %s checkpoint to %s", kind, folder)
    return folder


# Every `diffrt demo --kind`: its builder and the family its export is.
DEMO_KINDS = {**{kind: ("sd", make_tiny_sd) for kind in KINDS},
              **{kind: ("sdxl", make_tiny_sdxl) for kind in SDXL_KINDS},
              **{kind: ("flux", make_tiny_flux) for kind in FLUX_KINDS},
              **{kind: ("sd3", make_tiny_sd3) for kind in SD3_KINDS}}


def make_tiny(folder: str | Path, kind: str, seed: int = 0, sample_size: int = 32) -> Path:
    """The tiny checkpoint of any kind (DEMO_KINDS)."""
    if kind not in DEMO_KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(DEMO_KINDS)}")
    return DEMO_KINDS[kind][1](folder, kind=kind, seed=seed, sample_size=sample_size)
