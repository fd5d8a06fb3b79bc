"""The CLI's main paths, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffrt.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def test_demo_runs_the_whole_path_offline(tmp_path):
    env_out = tmp_path / "demo.png"
    result = cli("demo", "--dir", str(tmp_path / "work"), "-o", str(env_out), "--steps", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    image = Image.open(env_out)
    assert image.size == (128, 128)
    assert "timings: text_encoder" in result.stdout and "vae_decoder" in result.stdout
    assert "[2/4] unet: exporting to ONNX" in result.stderr  # export progress is shown
    assert "denoising: 4/4 steps" in result.stderr  # generation progress (plain lines: stderr is a pipe)
    assert "\r" not in result.stderr
    artifact = tmp_path / "work" / "artifact"
    assert (artifact / "manifest.json").is_file()
    # it says where it left its files and what to try next
    assert f"kept in {tmp_path / 'work'}" in result.stdout
    assert f'next: diffrt generate {artifact} "a prompt"' in result.stdout


def test_generate_inspect_bench(exported, tmp_path):
    folder = str(exported("sd15"))
    out = tmp_path / "cat.png"
    result = cli("generate", folder, "a cat", "--negative", "blurry", "--steps", "3", "--cfg", "6", "--seed", "1",
                 "--size", "80x48", "-n", "2", "--scheduler", "euler", "-o", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    for i in range(2):
        assert Image.open(tmp_path / f"cat-{i}.png").size == (80, 48)
    assert "euler, 3 steps, guidance 6, seed 1" in result.stderr
    assert f"wrote {tmp_path / 'cat-1.png'} (seed 2)" in result.stdout

    result = cli("generate", folder, "a cat", "--preset", "lcm-4step", "--seed", "1", "-o", str(out), "--overwrite")
    assert result.returncode == 0 and "lcm, 4 steps, guidance 1" in result.stderr, result.stderr[-3000:]

    result = cli("inspect", folder)
    assert result.returncode == 0 and "StableDiffusionPipeline" in result.stdout
    assert "unet-fused [unet, fused-attention, fp32, passes fuse_attention]" in result.stdout

    report_path = tmp_path / "bench.json"
    result = cli("bench", folder, "--steps", "2", "--runs", "2", "--scheduler", "ddim", "--no-verify",
                 "--json", str(report_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["runs"] == 2 and report["settings"]["num_inference_steps"] == 2
    run = report["configs"]["ort/default"]
    assert run["denoiser_calls_per_run"] == 2 and len(run["runs"]) == 2 and run["stages"]["total"]["p50"] > 0


def test_sdxl_presets_and_refiner_from_the_cli(exported, tmp_path):
    base, refiner = str(exported("sdxl")), str(exported("sdxl-refiner"))
    out = tmp_path / "turbo.png"
    result = cli("generate", base, "a cat", "--preset", "sdxl-turbo", "--size", "64x48", "--seed", "3", "-o", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(out).size == (64, 48)
    assert "euler_ancestral, 1 steps, guidance 0" in result.stderr
    # the same image from the API: the preset's trailing spacing reached the sampler
    from diffrt.runtime.pipeline import Pipeline

    with Pipeline.load(base) as pipe:
        api = pipe("a cat", preset="sdxl-turbo", height=48, width=64, seed=3).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api))

    out = tmp_path / "refined.png"
    result = cli("generate", base, "a cat", "--prompt-2", "oil painting", "--steps", "5", "--seed", "1",
                 "--refiner", refiner, "--high-noise-frac", "0.6", "-o", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refiner from 0.6" in result.stderr
    assert "5 steps: base 3 calls" in result.stdout and "refiner 2 calls" in result.stdout
    assert Image.open(out).size == (64, 64)


def test_sdxl_cli_errors(exported, tmp_path):
    base, refiner = str(exported("sdxl")), str(exported("sdxl-refiner"))
    for args, fragment in (
        (("--high-noise-frac", "0.5"), "give --refiner OUT2 too"),
        (("--refiner", base), "not a refiner"),
        (("--refiner", refiner, "--high-noise-frac", "1.2"), "between 0 and 1"),
        (("--refiner", refiner, "--scheduler", "pndm"), "cannot start part-way"),
    ):
        result = cli("generate", base, "a cat", *args, "-o", str(tmp_path / "x.png"))
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and fragment in errors[0], result.stderr[-2000:]
    result = cli("generate", refiner, "a cat", "-o", str(tmp_path / "x.png"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and f"--refiner {refiner}" in errors[0], result.stderr[-2000:]
    assert "generating" not in result.stderr  # refused before loading anything
    assert not (tmp_path / "x.png").exists()


def test_refiner_memory_is_checked_with_the_refiners_own_request(exported, monkeypatch):
    """`generate --refiner` checks each model's memory with the request that model
    runs: the base's (denoising_end) and the refiner's (denoising_start), not the
    base's twice."""
    import argparse

    from diffrt import cli as cli_module
    from diffrt.runtime import request as request_module

    checked = []
    monkeypatch.setattr(request_module, "check_memory",
                        lambda manifest, request, **_: checked.append((manifest.pipeline_class, request)))
    args = argparse.Namespace(prompt="a cat", negative=None, size=None, steps=5, cfg=None, seed=1, scheduler=None,
                              preset=None, vae=None, prompt_2=None, negative_2=None,
                              refiner=str(exported("sdxl-refiner")), high_noise_frac=0.6)
    cli_module._prepare_request(args, exported("sdxl"), batch=1)
    (base_class, base), (refiner_class, refiner) = checked
    assert base_class == "StableDiffusionXLPipeline" and refiner_class == "StableDiffusionXLImg2ImgPipeline"
    assert (base.denoising_start, base.denoising_end) == (None, 0.6)
    assert (refiner.denoising_start, refiner.denoising_end) == (0.6, None)
