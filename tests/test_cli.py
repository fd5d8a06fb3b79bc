"""The CLI's main paths, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

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

    result = cli("bench", folder, "--steps", "2", "--runs", "2", "--scheduler", "ddim", "--no-verify")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout[: result.stdout.index("\n| stage")])
    assert report["runs"] == 2 and report["settings"]["num_inference_steps"] == 2
    assert report["denoiser_calls"] == 2 and report["median_seconds"]["denoiser_per_call"] > 0
    assert report["median_seconds"]["total"] > 0
