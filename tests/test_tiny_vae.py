"""The opt-in fast decoder: an AutoencoderTiny (TAESD format) exported beside the full
VAE and chosen per call, checked against diffusers' AutoencoderTiny."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from diffrt.artifacts import read_manifest
from diffrt.errors import DiffrtError
from diffrt.runtime.pipeline import Pipeline

TOLERANCE = 1e-4  # fp32 graph vs fp32 torch; the design's bar is 2e-3


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    from diffrt.export.tiny import make_tiny_taesd

    return make_tiny_taesd(tmp_path_factory.mktemp("taesd") / "taesd")


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, taesd, tmp_path_factory):
    from diffrt.export import export

    out = tmp_path_factory.mktemp("tiny-vae") / "artifact"
    export(tiny_checkpoint("sd15"), out, tiny_vae=taesd)
    return out


def test_tiny_decoder_stage_matches_diffusers(artifact, taesd):
    from diffusers import AutoencoderTiny

    spec = read_manifest(artifact).select("vae_decoder", "tiny")
    assert spec.name == "vae_decoder-tiny" and spec.facts["scaling_factor"] == 1.0
    assert spec.max_abs_error <= TOLERANCE and spec.reference == "torch"
    reference = AutoencoderTiny.from_pretrained(taesd).eval()
    latents = torch.randn(3, 4, 20, 12, generator=torch.Generator().manual_seed(5)) * 3
    with torch.no_grad():
        want = reference.decode(latents).sample.numpy()
    session = ort.InferenceSession(str(artifact / spec.graph_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"latent_sample": latents.numpy()})[0]
    assert got.shape == want.shape == (3, 3, 40, 24)
    assert np.max(np.abs(got - want)) <= TOLERANCE


def test_pipeline_with_tiny_vae_matches_diffusers(artifact, tiny_checkpoint, taesd):
    """diffusers' documented TAESD use: `pipe.vae = AutoencoderTiny.from_pretrained(...)`."""
    from diffusers import AutoencoderTiny, DiffusionPipeline

    reference = DiffusionPipeline.from_pretrained(tiny_checkpoint("sd15"), safety_checker=None,
                                                  requires_safety_checker=False)
    reference.vae = AutoencoderTiny.from_pretrained(taesd)
    reference.scheduler = __import__("diffusers").DDIMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    theirs = reference("a cat", num_inference_steps=3, guidance_scale=6.0, latents=latents, output_type="np").images
    with Pipeline.load(artifact) as pipe:
        ours = pipe("a cat", num_inference_steps=3, guidance_scale=6.0, scheduler="ddim", latents=latents.numpy(),
                    output_type="np", vae="tiny").images
        full = pipe("a cat", num_inference_steps=3, guidance_scale=6.0, scheduler="ddim", latents=latents.numpy(),
                    output_type="np").images
    assert np.max(np.abs(ours - theirs)) <= TOLERANCE
    assert np.max(np.abs(full - theirs)) > 1e-2  # the default decoder is the full VAE, a different image


def test_tiny_vae_must_be_exported(exported):
    with Pipeline.load(exported("sd15")) as pipe, pytest.raises(
            DiffrtError, match="vae='tiny': this artifact has VAE decoders default; export with --tiny-vae PATH"):
        pipe("a cat", vae="tiny")


def test_cli_vae_tiny(artifact, tmp_path):
    out = tmp_path / "x.png"
    result = subprocess.run([sys.executable, "-m", "diffrt.cli", "generate", str(artifact), "a cat", "--steps", "2",
                             "--vae", "tiny", "--seed", "1", "-o", str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and out.is_file(), result.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "diffrt.cli", "generate", str(artifact), "a cat", "--vae", "big",
                             "-o", str(tmp_path / "y.png")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "vae='big': this artifact has VAE decoders default, tiny" in result.stderr


def test_mismatched_tiny_vae_is_refused_before_exporting(tiny_checkpoint, tmp_path, caplog):
    from diffusers import AutoencoderTiny

    from diffrt.export import export

    wrong = tmp_path / "taesd-8x"
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).save_pretrained(wrong)
    with caplog.at_level(logging.INFO, logger="diffrt"), pytest.raises(
            DiffrtError, match="decodes 4-channel latents upscaled 8x, this checkpoint has 4 channels and a 2x VAE"):
        export(tiny_checkpoint("sd15"), tmp_path / "out", tiny_vae=wrong)
    assert "exporting to ONNX" not in caplog.text and not (tmp_path / "out").exists()
