"""Bad input: a one-line error naming what was wrong and what to do; no traceback,
no half-written folder, nothing already done is lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import copy_artifact

from diffrt.errors import ArtifactError, DiffrtError
from diffrt.runtime.pipeline import Pipeline


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffrt.cli", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture()
def artifact_copy(exported, tmp_path):
    folder = tmp_path / "copy"
    copy_artifact(exported("sd15"), folder)
    return folder


@pytest.fixture(scope="module")
def pipe(exported):
    return Pipeline.load(exported("sd15"))


# -- the Python API ---------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"height": 60}, "height must be a positive multiple of 8"),
        ({"width": 0}, "width must be a positive multiple of 8"),
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer >= 1"),
        ({"num_inference_steps": 2.5}, "num_inference_steps must be an integer >= 1"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
        ({"scheduler": "heun"}, "unknown scheduler 'heun'"),
        ({"preset": "turbo"}, "unknown preset 'turbo'; choose one of: full-30step, lcm-4step"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt must be an integer >= 1"),
        ({"output_type": "pt"}, "output_type='pt'; choose one of: pil, np"),
        ({"negative_prompt": ["a", "b"]}, "negative_prompt must be a string or a list of 1 strings"),
        ({"latents": [[1.0]]}, "latents must have shape (1, 4, 32, 32)"),
    ],
)
def test_api_rejects_bad_arguments(pipe, kwargs, fragment):
    with pytest.raises(DiffrtError) as info:
        pipe("a cat", **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_unknown_scheduler_lists_choices(pipe):
    with pytest.raises(DiffrtError, match="choose one of: ddim, pndm, euler"):
        pipe.resolve(scheduler="nope")


def test_unknown_backend(exported):
    with pytest.raises(DiffrtError, match="backend 'tensorrt' needs tensorrt and cupy, which are not installed here"):
        Pipeline.load(exported("sd15"), backend="tensorrt")
    with pytest.raises(DiffrtError, match="unknown backend 'cuda'; choose one of: ort"):
        Pipeline.load(exported("sd15"), backend="cuda")


# -- artifact folders -------------------------------------------------------------

def test_missing_stage_file(artifact_copy):
    (artifact_copy / "unet-fused" / "model.onnx").unlink()  # the UNet graph the ort backend opens
    with pytest.raises(ArtifactError, match=r"unet-fused/model.onnx is missing.*re-export"):
        Pipeline.load(artifact_copy)


def test_corrupted_stage_file_same_size(artifact_copy):
    path = artifact_copy / "vae_decoder-fused" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"vae_decoder-fused/model.onnx does not match its sha256"):
        Pipeline.load(artifact_copy)


def test_truncated_file(artifact_copy):
    path = artifact_copy / "text_encoder" / "model.onnx"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"text_encoder/model.onnx has 100 bytes"):
        Pipeline.load(artifact_copy)


def test_missing_tokenizer_file(artifact_copy):
    victim = sorted((artifact_copy / "tokenizer").iterdir())[0]
    victim.unlink()
    with pytest.raises(ArtifactError, match=f"tokenizer/{victim.name} is missing"):
        Pipeline.load(artifact_copy)


def test_newer_manifest_version(artifact_copy):
    path = artifact_copy / "manifest.json"
    data = json.loads(path.read_text())
    data["manifest_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="manifest_version 99, newer than this diffrt reads.*upgrade diffrt"):
        Pipeline.load(artifact_copy)


def test_corrupted_manifest(artifact_copy):
    (artifact_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json is not valid JSON"):
        Pipeline.load(artifact_copy)


def test_not_an_artifact_folder(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        Pipeline.load(tmp_path)


# -- the CLI: one line, exit status 2 -----------------------------------------------

def test_cli_generate_bad_size(exported, tmp_path):
    result = cli("generate", str(exported("sd15")), "a cat", "--size", "60x64", "-o", str(tmp_path / "x.png"))
    assert_one_line_error(result, "width must be a positive multiple of 8, got 60")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--steps", "0"], ["num_inference_steps must be an integer >= 1"]),
        (["--scheduler", "heun"], ["unknown scheduler 'heun'"]),
        (["--preset", "turbo"], ["unknown preset 'turbo'"]),
        (["--backend", "tensorrt"], ["backend 'tensorrt' needs tensorrt"]),
    ],
)
def test_cli_generate_bad_options(exported, tmp_path, args, fragments):
    result = cli("generate", str(exported("sd15")), "a cat", *args, "-o", str(tmp_path / "x.png"))
    assert_one_line_error(result, *fragments)


def test_cli_generate_missing_folder(tmp_path):
    result = cli("generate", str(tmp_path / "nope"), "a cat", "-o", str(tmp_path / "x.png"))
    assert_one_line_error(result, "no such folder", "diffrt export")


def test_cli_corrupted_artifact(artifact_copy):
    (artifact_copy / "unet-fused" / "model.onnx").write_bytes(b"garbage")
    result = cli("generate", str(artifact_copy), "a cat", "-o", str(artifact_copy / "x.png"))
    assert_one_line_error(result, "unet-fused/model.onnx has 7 bytes")


def test_cli_export_unsupported_pipeline(tmp_path):
    src = tmp_path / "kandinsky"
    src.mkdir()
    (src / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    result = cli("export", str(src), str(tmp_path / "out"))
    assert_one_line_error(result, "'KandinskyV22Pipeline' is not supported", "StableDiffusionPipeline",
                          "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")
    assert not (tmp_path / "out").exists()


def test_cli_export_not_a_diffusers_folder(tmp_path):
    assert_one_line_error(cli("export", str(tmp_path), str(tmp_path / "out")), "no model_index.json")


def test_cli_export_offline_hub_id(tmp_path):
    env_result = subprocess.run(
        [sys.executable, "-m", "diffrt.cli", "export", "nobody-here/not-a-model", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert_one_line_error(env_result, "could not download 'nobody-here/not-a-model'", "local diffusers folder")
    assert not (tmp_path / "out").exists()


def test_cli_export_existing_out(exported, tiny_checkpoint):
    result = cli("export", str(tiny_checkpoint("sd15")), str(exported("sd15")))
    assert_one_line_error(result, "already exists", "--overwrite")


def test_cli_export_bad_precision(tiny_checkpoint, tmp_path):
    result = cli("export", str(tiny_checkpoint("sd15")), str(tmp_path / "o"), "--precision", "fp8")
    assert_one_line_error(result, "--precision fp8: use fp32, fp16, bf16")


def test_cli_bad_size_syntax(exported):
    result = cli("generate", str(exported("sd15")), "a cat", "--size", "big")
    assert result.returncode == 2 and "--size 'big': use WIDTHxHEIGHT" in result.stderr


def test_export_bad_scheduler_config_fails_before_exporting(tiny_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("sd15"), src)
    path = src / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "timestep_spacing": "bogus"}))
    result = cli("export", str(src), str(tmp_path / "out"))
    assert_one_line_error(result, "scheduler_config.json", "timestep_spacing='bogus' is not supported")
    assert "exporting to ONNX" not in result.stderr and not (tmp_path / "out").exists()


def test_export_unimplemented_scheduler_class_falls_back(tiny_checkpoint, tmp_path):
    from diffrt.export import export

    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint("sd15"), src)
    path = src / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": "UniPCMultistepScheduler"}))
    out = tmp_path / "out"
    export(src, out)
    assert json.loads((out / "manifest.json").read_text())["defaults"]["scheduler"] == "dpmpp_2m"
    # --overwrite replaces a finished folder with a new complete one
    before = (out / "manifest.json").read_text()
    export(tiny_checkpoint("sd15"), out, overwrite=True)
    after = json.loads((out / "manifest.json").read_text())
    assert after["defaults"]["scheduler"] == "pndm" and (out / "manifest.json").read_text() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
