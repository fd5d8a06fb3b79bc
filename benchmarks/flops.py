"""FLOPs of a checkpoint's UNet (one call) and VAE decoder, counted once with
torch.utils.flop_counter.FlopCounterMode and stored as JSON for benchmarks/compare.py.

    python benchmarks/flops.py --checkpoint DIR --out benchmarks/results/flops_sd15.json \
        [--unet 1x256x256,2x256x256,...] [--vae 1x256x256,...]

SD1.x/2.x, SDXL and SD3 checkpoints (the defaults follow the checkpoint: SDXL's and SD3's
are 512 and 1024). An SD3 checkpoint's denoiser is its MMDiT transformer (counted under
"unet", the harness's name for the denoiser) on 77 CLIP + 256 T5 text tokens (diffusers'
default max_sequence_length; a checkpoint without T5 is fed zeros of that length). SDXL's UNet also takes its added conditions, the pooled text embedding
(text_encoder_2's projection_dim) and the time ids; a UNet whose added conditions this
script does not know is stored as null with the reason ("unet_error"), never guessed.

Each entry is BATCHxHEIGHTxWIDTH in image pixels. The modules are built from the
checkpoint's unet/config.json and vae/config.json on the meta device: no weights, no
arithmetic, seconds per entry. That also makes the count include attention: on CPU
tensors torch runs scaled_dot_product_attention as a fused flash kernel that
FlopCounterMode does not count (0 FLOPs), while on meta tensors it decomposes into the
two batched matmuls (QK^T and AV). So these figures are higher than a count taken on
CPU tensors (SD1.5 UNet at 512x512, batch 2: 1.607 vs 1.35 TFLOP), and they are the
right ones for achieved-FLOP/s: every runner does that attention arithmetic.
Counted: matmul, convolution and attention (2 FLOPs per multiply-add); not elementwise ops.
An existing file is extended, never recounted, when its configs match.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_UNET = ("1x256x256", "2x256x256", "1x512x512", "2x512x512")
DEFAULT_VAE = ("1x256x256", "1x512x512")
DEFAULT_UNET_SDXL = ("1x512x512", "2x512x512", "1x1024x1024", "2x1024x1024")
DEFAULT_VAE_SDXL = ("1x512x512", "1x1024x1024")
_IGNORED_CONFIG_KEYS = ("_name_or_path", "_diffusers_version", "_class_name", "_use_default_values")


def shape_key(batch: int, height: int, width: int) -> str:
    return f"b{batch}-{width}x{height}"


def parse_shape(text: str) -> tuple[int, int, int]:
    batch, height, width = (int(p) for p in text.lower().split("x"))
    return batch, height, width


SD3_TEXT_TOKENS = 77 + 256


def is_sd3(checkpoint: Path) -> bool:
    return (checkpoint / "transformer" / "config.json").is_file()


def config_fingerprint(checkpoint: Path) -> str:
    """Hash of the architecture (denoiser + vae configs), so a stored count is reused only
    for the same model."""
    digest = hashlib.sha256()
    for component in ("transformer" if is_sd3(checkpoint) else "unet", "vae"):
        config = json.loads((checkpoint / component / "config.json").read_text())
        config = {k: v for k, v in config.items() if k not in _IGNORED_CONFIG_KEYS}
        digest.update(json.dumps(config, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def read_flops(path: Path, checkpoint: Path) -> dict[str, Any] | None:
    """The stored counts when they are for this checkpoint's architecture, else None."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if data.get("config_fingerprint") == config_fingerprint(checkpoint) else None


def missing(data: dict[str, Any] | None, unet: list[tuple[int, int, int]], vae: list[tuple[int, int, int]]) -> bool:
    if data is None:
        return True
    return (any(shape_key(*s) not in data["unet"] for s in unet)
            or any(shape_key(*s) not in data["vae_decoder"] for s in vae))


def is_sdxl(checkpoint: Path) -> bool:
    """An SDXL checkpoint: its UNet takes text_time added conditions."""
    config = json.loads((checkpoint / "unet" / "config.json").read_text())
    return config.get("addition_embed_type") == "text_time"


def added_conditions(checkpoint: Path, unet_config: dict[str, Any]) -> tuple[int, int] | None:
    """(pooled text embedding width, number of time ids) of an SDXL UNet (None: no added
    conditions). Raises ValueError, one line, when the shapes cannot be told for sure."""
    kind = unet_config.get("addition_embed_type")
    if kind is None:
        return None
    if kind != "text_time":
        raise ValueError(f"UNet addition_embed_type {kind!r}: only SDXL's 'text_time' is counted")
    encoder = checkpoint / "text_encoder_2" / "config.json"
    if not encoder.is_file():
        raise ValueError(f"no {encoder}: the pooled text embedding's width is unknown")
    text_embeds = int(json.loads(encoder.read_text())["projection_dim"])
    rest = int(unet_config["projection_class_embeddings_input_dim"]) - text_embeds
    per_id = int(unet_config["addition_time_embed_dim"])
    if rest <= 0 or rest % per_id:
        raise ValueError(f"projection_class_embeddings_input_dim - projection_dim = {rest}, not a multiple of "
                         f"addition_time_embed_dim {per_id}")
    return text_embeds, rest // per_id


def count(checkpoint: Path, unet_shapes: list[tuple[int, int, int]], vae_shapes: list[tuple[int, int, int]],
          previous: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    sd3 = is_sd3(checkpoint)
    denoiser_class = SD3Transformer2DModel if sd3 else UNet2DConditionModel
    unet_config = denoiser_class.load_config(checkpoint / ("transformer" if sd3 else "unet"))
    vae_config = AutoencoderKL.load_config(checkpoint / "vae")
    with torch.device("meta"):
        unet = denoiser_class.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    data = previous or {
        "method": "torch.utils.flop_counter.FlopCounterMode on meta tensors (see benchmarks/flops.py)",
        "torch": torch.__version__,
        "config_fingerprint": config_fingerprint(checkpoint),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "vae_decoder_parameters": sum(p.numel() for p in vae.decoder.parameters()) + sum(
            p.numel() for p in (vae.post_quant_conv.parameters() if vae.post_quant_conv is not None else ())),
        "unet": {},
        "vae_decoder": {},
    }

    def flops_of(fn) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return int(counter.get_total_flops())

    text_dim = unet.config.joint_attention_dim if sd3 else unet.config.cross_attention_dim
    try:
        added = None if sd3 else added_conditions(checkpoint, unet_config)
    except ValueError as exc:
        added, data["unet_error"] = None, str(exc)
    for batch, height, width in unet_shapes:
        key = shape_key(batch, height, width)
        if key not in data["unet"]:
            if data.get("unet_error"):  # not counted rather than counted wrong
                data["unet"][key] = None
                continue
            sample = torch.empty(batch, unet.config.in_channels, height // factor, width // factor, device="meta")
            timestep = torch.full((batch,), 500.0, device="meta")
            text = torch.empty(batch, SD3_TEXT_TOKENS if sd3 else 77, text_dim, device="meta")
            if sd3:
                pooled = torch.empty(batch, unet.config.pooled_projection_dim, device="meta")
                data["unet"][key] = flops_of(lambda: unet(sample, text, pooled, timestep))
                continue
            kwargs = {}
            if added is not None:  # SDXL: pooled embedding of the second encoder + size/crop time ids
                kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, added[0], device="meta"),
                                               "time_ids": torch.empty(batch, added[1], device="meta")}
            data["unet"][key] = flops_of(lambda: unet(sample, timestep, text, **kwargs))
    for batch, height, width in vae_shapes:
        key = shape_key(batch, height, width)
        if key not in data["vae_decoder"]:
            latent = torch.empty(batch, vae.config.latent_channels, height // factor, width // factor, device="meta")
            data["vae_decoder"][key] = flops_of(lambda: vae.decode(latent))
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a diffusers SD or SDXL folder (unet/, vae/; SDXL: text_encoder_2/ too)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--unet", help="BATCHxHEIGHTxWIDTH,... (default: SD "
                        f"{','.join(DEFAULT_UNET)}; SDXL {','.join(DEFAULT_UNET_SDXL)})")
    parser.add_argument("--vae", help=f"BATCHxHEIGHTxWIDTH,... (default: SD {','.join(DEFAULT_VAE)}; "
                        f"SDXL {','.join(DEFAULT_VAE_SDXL)})")
    args = parser.parse_args(argv)
    sdxl = is_sd3(args.checkpoint) or is_sdxl(args.checkpoint)  # SD3 takes SDXL's sizes
    if args.unet is None:
        args.unet = ",".join(DEFAULT_UNET_SDXL if sdxl else DEFAULT_UNET)
    if args.vae is None:
        args.vae = ",".join(DEFAULT_VAE_SDXL if sdxl else DEFAULT_VAE)
    unet = [parse_shape(s) for s in args.unet.split(",") if s]
    vae = [parse_shape(s) for s in args.vae.split(",") if s]
    previous = read_flops(args.out, args.checkpoint)
    if missing(previous, unet, vae):
        data = count(args.checkpoint, unet, vae, previous)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
