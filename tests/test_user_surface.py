"""What a new user meets in the first hour: shareable artifacts, one-line errors for
every mistake (checked before the model loads), honest steps, quiet output, seeds that
reproduce, truncation warnings, and an --help that explains every option."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import copy_artifact
from PIL import Image

from diffrt.artifacts import current_umask, file_mode, read_manifest
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.runtime.pipeline import Pipeline


def cli(*args: str, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffrt.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def pipe(exported):
    return Pipeline.load(exported("sd15"))


@pytest.fixture()
def corrupted_unet(exported, tmp_path):
    """A copy of the sd15 artifact whose UNet graph has one flipped byte (same size):
    loading it fails at hashing, so an error about anything else proves the setting
    was checked before the model was loaded."""
    folder = tmp_path / "corrupt"
    copy_artifact(exported("sd15"), folder)
    path = folder / "unet" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return folder


# -- artifacts are shareable ----------------------------------------------------------

def _modes(folder):
    return {p.relative_to(folder).as_posix(): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_export_gives_every_file_the_umask_mode(tiny_checkpoint, tmp_path, umask):
    out = tmp_path / "art"
    code = f"import os; os.umask({umask}); from diffrt.export import export; export({str(tiny_checkpoint('sd15'))!r}, {str(out)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    files, folders = 0o666 & ~umask, 0o777 & ~umask
    modes = _modes(out)
    assert modes["manifest.json"] == files  # was 0600 (mkstemp) before
    for path, mode in modes.items():
        assert mode == (folders if (out / path).is_dir() else files), (path, oct(mode))


def test_atomic_write_follows_umask(tmp_path):
    from diffrt.artifacts import atomic_write_text

    atomic_write_text(tmp_path / "x.json", "{}")
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == file_mode() == 0o666 & ~current_umask()


def test_unreadable_manifest_says_permission_denied(exported, monkeypatch):
    from pathlib import Path

    real = Path.read_text

    def deny(self, *args, **kwargs):
        if self.name == "manifest.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", deny)
    with pytest.raises(ArtifactError, match="manifest.json: permission denied; this account cannot read") as info:
        read_manifest(exported("sd15"))
    assert "not valid JSON" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_stage_file_says_permission_denied(exported, tmp_path):
    folder = tmp_path / "copy"
    copy_artifact(exported("sd15"), folder)
    (folder / "unet" / "model.onnx").chmod(0o000)
    with pytest.raises(ArtifactError, match="unet/model.onnx: permission denied"):
        Pipeline.load(folder)


# -- one line, exit 2, before the model is loaded -------------------------------------

@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--seed", "-1"], "seed must be an integer from 0 to"),
        (["--size", "100000x100000"], "100000x100000 with 1 image(s) needs at least"),
        (["--scheduler", "heun"], "unknown scheduler 'heun'"),
        (["--steps", "0"], "num_inference_steps must be an integer >= 1"),
        (["--cfg", "-1"], "guidance_scale must be a finite number >= 0"),
        (["-n", "0"], "num_images_per_prompt (-n) must be an integer >= 1"),
        (["--preset", "turbo"], "unknown preset 'turbo'"),
        (["--steps", "1000000"], "num_inference_steps=1000000 is not supported; allowed: 1..1000"),
    ],
)
def test_settings_are_checked_before_loading(corrupted_unet, tmp_path, args, fragment):
    result = cli("generate", str(corrupted_unet), "a cat", *args, "-o", str(tmp_path / "x.png"))
    line = error_line(result)
    assert fragment in line, line
    assert "sha256" not in line  # the corrupted UNet was never opened
    assert not (tmp_path / "x.png").exists()


def test_impossible_size_names_the_estimate(exported, tmp_path):
    line = error_line(cli("generate", str(exported("sd15")), "a cat", "--size", "100000x100000",
                          "-o", str(tmp_path / "x.png")))
    assert "GiB of memory (VAE decoder activations)" in line and "available; use a smaller size" in line


def _graph_tensors(path, pick, feeds) -> list[np.ndarray]:
    """Run an ONNX graph on ONNX Runtime with the tensors `pick(graph)` names exposed
    (after its own outputs)."""
    import onnx
    import onnxruntime as ort

    graph = onnx.load(path)
    names = [o.name for o in graph.graph.output] + pick(graph.graph)
    graph.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names[len(graph.graph.output):])
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, feeds)


def _softmax_outputs(graph) -> list[str]:
    return [n.output[0] for n in graph.node if n.op_type == "Softmax"]


def test_memory_terms_are_the_tensors_the_exported_graphs_make(exported):
    """Each term of the up-front memory bound, from a really exported artifact's manifest
    (not a facts dict the test writes), equals the tensor it stands for, measured by
    running the artifact's portable graphs on ONNX Runtime with those tensors exposed.
    (An exporter that misspelled a fact once made the UNet's term silently zero.)"""
    from diffrt.families import sd

    folder = exported("sd15")
    manifest = read_manifest(folder)
    model = manifest.model
    size = 96  # the tiny VAE halves: a 48x48 latent, 576 tokens at the UNet's attention level
    latent = size // int(model["vae_scale_factor"])
    rng = np.random.default_rng(0)
    rows = 2  # one image with CFG: uncond + cond rows
    unet_feeds = {
        "sample": rng.standard_normal((rows, int(model["latent_channels"]), latent, latent), dtype=np.float32),
        "timestep": np.full((rows,), 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal(
            (rows, int(model["text_max_length"]), int(model["cross_attention_dim"])), dtype=np.float32)}

    unet = folder / manifest.stage("unet").graph_path
    scores = max(t.nbytes for t in _graph_tensors(unet, _softmax_outputs, unet_feeds)[1:])
    conv_in = _graph_tensors(unet, lambda g: [next(n for n in g.node if n.op_type == "Conv").output[0]],
                             unet_feeds)[1].nbytes
    decoder = folder / manifest.stage("vae_decoder").graph_path
    decoder_feeds = {"latent_sample": unet_feeds["sample"][:1]}
    image, *vae_softmax = _graph_tensors(decoder, _softmax_outputs, decoder_feeds)
    conv_out_input = _graph_tensors(decoder, lambda g: [[n for n in g.node if n.op_type == "Conv"][-1].input[0]],
                                    decoder_feeds)[1].nbytes
    hidden = _graph_tensors(folder / manifest.stage("text_encoder").graph_path, lambda g: [],
                            {"input_ids": rng.integers(0, 100, (rows, int(model["text_max_length"])))})[0].nbytes

    terms = sd.activation_terms(model, size, size, 1, do_cfg=True, attention_scores=True)
    assert terms == {
        "unet_attention_scores": scores,
        "unet_skip_activations": 2 * conv_in,  # conv_in's output and the first resnet's, same shape
        "vae_decoder_activations": 2 * conv_out_input + image.nbytes,
        "vae_attention_scores": max(t.nbytes for t in vae_softmax),
        "text_encoder_activations": 2 * hidden,
    }
    fused = sd.activation_terms(model, size, size, 1, do_cfg=True, attention_scores=False)
    assert "unet_attention_scores" not in fused and "vae_attention_scores" not in fused  # fused graphs hold none
    # artifacts exported before the fact's name was fixed still count the UNet's scores
    legacy = {k: v for k, v in model.items() if k != "unet_first_attention_level"}
    legacy["unetfirst_attention_level"] = model["unet_first_attention_level"]
    assert sd.activation_terms(legacy, size, size, 1, do_cfg=True, attention_scores=True) == terms


def test_api_rejects_bad_seeds(pipe):
    for seed in (-1, 1.5, "a", True, 2**63):
        with pytest.raises(DiffrtError, match="seed must be an integer from 0 to") as info:
            pipe("a cat", seed=seed, num_inference_steps=1)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize(("make_path", "fragment"), [
    (lambda tmp: tmp / "a-file" / "x.png", "a-file is not a folder"),  # a folder that is a regular file
    (lambda tmp: tmp / "missing" / "x.png", "missing does not exist; create the folder first"),
    (lambda tmp: "/proc/x.png", "cannot write in /proc"),
    (lambda tmp: tmp / "dir.png", "dir.png is a folder; name an image file"),
])
def test_unwritable_output_fails_before_generating(corrupted_unet, tmp_path, make_path, fragment):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "dir.png").mkdir()
    line = error_line(cli("generate", str(corrupted_unet), "a cat", "-o", str(make_path(tmp_path)), "--overwrite"))
    assert fragment in line, line
    assert not (tmp_path / "missing").exists()  # no folder made behind the user's back


def test_existing_output_is_not_overwritten_silently(exported, tmp_path):
    out = tmp_path / "x.png"
    out.write_bytes(b"precious")
    line = error_line(cli("generate", str(exported("sd15")), "a cat", "--steps", "1", "-o", str(out)))
    assert "x.png already exists; pass --overwrite" in line
    assert out.read_bytes() == b"precious"
    result = cli("generate", str(exported("sd15")), "a cat", "--steps", "1", "-o", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(out).size == (64, 64)
    # -n 2 -o y.png writes y-0.png and y-1.png, and checks both up front
    (tmp_path / "y-1.png").write_bytes(b"precious")
    line = error_line(cli("generate", str(exported("sd15")), "a cat", "-n", "2", "-o", str(tmp_path / "y.png")))
    assert "y-1.png already exists" in line and not (tmp_path / "y-0.png").exists()


def test_export_and_demo_without_the_export_extra(tmp_path):
    """A runtime-only install: torch cannot be imported."""
    fake = tmp_path / "no-torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError(\"No module named 'torch'\", name='torch')\n")
    env = {**os.environ, "PYTHONPATH": str(fake)}
    for args in (["export", str(tmp_path), str(tmp_path / "out")], ["demo", "-o", str(tmp_path / "d.png")]):
        line = error_line(cli(*args, env=env))
        assert "needs the export extra" in line and "pip install torch==2.13.0" in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "d.png").exists()


def test_inspect_into_a_closed_pipe(exported):
    """`diffrt inspect OUT | head -0`: the reader is gone before diffrt writes."""
    proc = subprocess.Popen([sys.executable, "-m", "diffrt.cli", "inspect", str(exported("sd15"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr


# -- inspect checks what it describes ---------------------------------------------------

def test_inspect_checks_sizes_and_hashes(exported, tmp_path):
    healthy = cli("inspect", str(exported("sd15")), "--verify")
    assert healthy.returncode == 0 and "checked (sizes and sha256): ok" in healthy.stdout, healthy.stderr

    folder = tmp_path / "copy"
    copy_artifact(exported("sd15"), folder)
    graph = folder / "vae_decoder" / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[100] ^= 0xFF
    graph.write_bytes(bytes(data))
    assert cli("inspect", str(folder)).returncode == 0  # sizes match; hashing is --verify
    line = error_line(cli("inspect", str(folder), "--verify"))
    assert "1 of" in line and "vae_decoder/model.onnx does not match its sha256" in line

    text = folder / "text_encoder" / "model.onnx"
    text.write_bytes(text.read_bytes()[:100])
    result = cli("inspect", str(folder))
    line = error_line(result)
    assert "text_encoder/model.onnx has 100 bytes" in line
    assert "problem:" in result.stdout


# -- steps mean steps; quiet means quiet ------------------------------------------------

def test_pndm_reports_the_steps_asked_for(exported, tmp_path):
    result = cli("generate", str(exported("sd15")), "a cat", "--steps", "5", "--scheduler", "pndm", "--seed", "0",
                 "-o", str(tmp_path / "x.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pndm, 5 steps" in result.stderr and "denoising: 5/5 steps" in result.stderr
    assert "6/6" not in result.stderr
    assert "(5 steps, 6 denoiser calls," in result.stdout


def test_callback_counts_requested_steps(pipe):
    seen = []
    pipe("a cat", num_inference_steps=4, scheduler="pndm", seed=0, callback=lambda s, n: seen.append((s, n)))
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]  # 5 calls for 4 steps
    seen.clear()
    pipe("a cat", num_inference_steps=3, scheduler="ddim", seed=0, callback=lambda s, n: seen.append((s, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("position", ["before", "after"])
def test_quiet_silences_progress(exported, tmp_path, position):
    args = ["generate", str(exported("sd15")), "a cat", "--steps", "2", "--seed", "3", "-o", str(tmp_path / "q.png")]
    args = ["-q", *args] if position == "before" else [*args, "-q"]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    assert "wrote" in result.stdout and "(seed 3)" in result.stdout


def test_export_output_is_not_noisy(tiny_checkpoint, tmp_path):
    result = cli("export", str(tiny_checkpoint("lcm")), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    for noise in ("accelerate", "torchvision", "Writing model shards", "Warning", "\r"):
        assert noise not in result.stderr, (noise, result.stderr)
    assert result.stderr.count("[2/4] unet: done") == 1
    assert result.stdout.startswith(f"wrote {tmp_path / 'out'} (6 stages") and "unet" not in result.stdout
    quiet = cli("export", "-q", str(tiny_checkpoint("lcm")), str(tmp_path / "out2"))
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


# -- reproducibility ----------------------------------------------------------------------

def test_a_generation_without_seed_reports_the_one_it_used(pipe):
    first = pipe("a cat", num_inference_steps=2, scheduler="euler_ancestral", output_type="np")
    assert isinstance(first.seed, int)
    again = pipe("a cat", num_inference_steps=2, scheduler="euler_ancestral", output_type="np", seed=first.seed)
    np.testing.assert_array_equal(first.images, again.images)
    other = pipe("a cat", num_inference_steps=2, scheduler="euler_ancestral", output_type="np", seed=first.seed + 1)
    assert np.max(np.abs(other.images - first.images)) > 1e-3


@pytest.mark.parametrize("scheduler", ["ddim", "euler_ancestral", "lcm"])
def test_an_image_does_not_depend_on_its_batch(pipe, scheduler):
    """Image i of a batch seeded s equals the image generated alone with seed s + i,
    stochastic samplers included (their injected noise is per image too)."""
    kwargs = dict(num_inference_steps=3, scheduler=scheduler, output_type="np", guidance_scale=3.0)
    batch = pipe("a cat", num_images_per_prompt=3, seed=10, **kwargs)
    for i in range(3):
        alone = pipe("a cat", seed=10 + i, **kwargs)
        assert np.max(np.abs(batch.images[i] - alone.images[0])) <= 1e-5, (scheduler, i)


def test_cli_without_seed_prints_a_seed_that_reproduces(exported, tmp_path):
    folder = str(exported("sd15"))
    result = cli("generate", folder, "a cat", "--steps", "2", "-o", str(tmp_path / "a.png"))
    assert result.returncode == 0, result.stderr
    seed = int(result.stdout.split("(seed ")[1].split(")")[0])
    again = cli("generate", folder, "a cat", "--steps", "2", "--seed", str(seed), "-o", str(tmp_path / "b.png"))
    assert again.returncode == 0, again.stderr
    a, b = (np.asarray(Image.open(tmp_path / name)) for name in ("a.png", "b.png"))
    np.testing.assert_array_equal(a, b)


# -- long prompts ---------------------------------------------------------------------------

def test_long_prompt_truncation_is_announced(tiny_checkpoint, exported, caplog):
    from transformers import CLIPTokenizer as Reference

    from diffrt.runtime.tokenizers import CLIPTokenizer

    prompt = " ".join(["a red cat sitting on a mat"] * 20)
    ours = CLIPTokenizer.from_dir(exported("sd15") / "tokenizer")
    reference = Reference.from_pretrained(tiny_checkpoint("sd15") / "tokenizer")
    total = len(reference(prompt, truncation=False)["input_ids"])
    assert total > 77
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        ids = ours([prompt, "a short one"])
    np.testing.assert_array_equal(ids[0], reference(prompt, truncation=True, max_length=77)["input_ids"])
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1, warnings  # the short prompt is not truncated
    assert f"the prompt has {total}; the last {total - 77} were dropped" in warnings[0]


def test_cli_shows_the_truncation_warning(exported, tmp_path):
    prompt = " ".join(["a red cat sitting on a mat"] * 20)
    result = cli("generate", str(exported("sd15")), prompt, "--steps", "1", "-q", "-o", str(tmp_path / "x.png"))
    assert result.returncode == 0 and "prompt truncated" in result.stderr, result.stderr


# -- help ---------------------------------------------------------------------------------------

def test_every_option_has_help():
    import argparse

    from diffrt.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("diffrt", parser), *subparsers.choices.items()]:
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help, (name, action.dest)
    generate = subparsers.choices["generate"]
    backend = next(a for a in generate._actions if a.dest == "backend")
    assert "ort" in backend.help and "tensorrt" in backend.help


def test_help_runs():
    result = cli("generate", "--help")
    assert result.returncode == 0 and "--overwrite" in result.stdout and "seed+i" in result.stdout
    assert textwrap.dedent(result.stdout).count("--backend") >= 1
