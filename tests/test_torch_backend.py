"""The torch backend (diffrt.torch_backend): the source checkpoint's
modules behind the ONNX stages' IO contract, on the CPU in fp32 here.

Tolerances (fp32 torch vs fp32 ONNX Runtime, on the tiny random-weight models):
- one stage, same inputs: max abs output difference <= 1e-4 * max(1, max |output|)
  (the export's own check allows 1e-3; measured 1e-7..4e-6).
- a whole generation, image on [0, 1]: <= 1e-4 against the ORT pipeline and against
  diffusers' own pipeline (the bar of test_pipeline_parity; measured ~1e-6).
- bf16 on the CPU against fp32: <= 0.1 (a broken cast or a module left in fp32 would
  show as 0 or as garbage; measured ~1e-2). GPU fp16/bf16 kernels are not checked here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import copy_artifact
from diffrt.artifacts import read_manifest
from diffrt.errors import DiffrtError
from diffrt.runtime.backends import get_backend
from diffrt.runtime.pipeline import Pipeline
from diffrt.runtime.tokenizers import CLIPTokenizer

from test_pipeline_parity import TOLERANCE, TorchNoise, _diffusers_pipeline, _diffusers_scheduler, _latents

STAGE_TOLERANCE = 1e-4
DIMS = {"batch": 2, "latent_height": 6, "latent_width": 10, "height": 12, "width": 20, "text_length": 77}


def _feeds(folder, spec, seed=0):
    """Realistic inputs for a stage: token ids from its tokenizer, random latents and
    embeddings, a fractional timestep, the time ids of a 64x64 image."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for tensor in spec.inputs:
        shape = tuple(d if isinstance(d, int) else DIMS[d] for d in tensor.shape)
        if tensor.name == "input_ids":
            tokenizer = "tokenizer_2" if spec.role == "text_encoder_2" else "tokenizer"
            feeds[tensor.name] = CLIPTokenizer.from_dir(folder / tokenizer)(["a photo of a cat", "a dog, 4k"])
        elif tensor.name == "timestep":
            feeds[tensor.name] = np.array([957.25, 3.5], dtype=np.float32)
        elif tensor.name == "time_ids":
            row = [64, 64, 0, 0, 64, 64][: shape[1] - 1] + [6.0 if shape[1] == 5 else 64]
            feeds[tensor.name] = np.array([row] * shape[0], dtype=np.float32)
        else:
            feeds[tensor.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


@pytest.mark.parametrize("kind", ["sd15", "sd2", "lcm", "sdxl", "sdxl-refiner"])
def test_each_stage_matches_ort(exported, kind):
    folder = exported(kind)
    manifest = read_manifest(folder)
    torch_backend, ort_backend = get_backend("torch"), get_backend("ort", disk_cache=False)
    roles = [*manifest.model.get("text_encoders", ["text_encoder"]), "unet", "vae_decoder"]
    for role in roles:
        spec = manifest.select(role, "default", "fp32")
        feeds = _feeds(folder, spec)
        with torch_backend.open(folder, spec) as model, ort_backend.open(folder, spec) as reference_model:
            ours, reference = model.context(), reference_model.context()
            got = ours.run(feeds)
            want = reference.run(feeds)
            again = ours.run({k: torch.from_numpy(v) for k, v in feeds.items()})  # torch tensors in, too
        assert list(got) == [t.name for t in spec.outputs]
        for name, value in got.items():
            assert isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.device.type == "cpu"
            assert value.shape == want[name].shape
            scale = float(np.abs(want[name]).max())
            diff = float(np.abs(value.numpy() - want[name]).max())
            print(f"{kind} {spec.name}.{name}: max abs difference vs ORT {diff:.2e} (max |output| {scale:.2g})")
            assert diff <= STAGE_TOLERANCE * max(1.0, scale), f"{kind} {spec.name}.{name}: {diff}"
            assert torch.equal(again[name], value)


PIPELINE_CASES = [("sd15", "pndm", 7.5), ("sd2", "ddim", 7.5), ("lcm", "lcm", 8.5), ("sdxl", "euler", 5.0),
                  ("sdxl", "dpmpp_2m", 1.0)]


@pytest.mark.parametrize(("kind", "scheduler", "guidance"), PIPELINE_CASES)
def test_pipeline_matches_ort_and_diffusers(exported, tiny_checkpoint, kind, scheduler, guidance):
    """Two prompts x two images (CFG where guidance > 1), the same latents and injected
    noise for the three: the torch backend, the ORT backend and diffusers."""
    folder = exported(kind)
    prompts, negatives = ["a photo of a cat", "(((masterpiece))), a dog, 4k"], ["blurry", ""]
    latents = _latents((4, 4, 24, 32), seed=1)  # 48 high, 64 wide
    kw = dict(num_inference_steps=4, guidance_scale=guidance, num_images_per_prompt=2, height=48, width=64)
    if kind != "lcm":
        kw["negative_prompt"] = negatives
    images = {}
    for backend in ("torch", "ort"):
        with Pipeline.load(folder, backend=backend) as pipe:
            images[backend] = pipe(prompts, latents=latents.numpy(), scheduler=scheduler, output_type="np",
                                   generator=TorchNoise(7), **kw).images
    ref = _diffusers_pipeline(tiny_checkpoint(kind))
    ref.scheduler = _diffusers_scheduler(scheduler, ref.scheduler.config)
    images["diffusers"] = ref(prompts, latents=latents, output_type="np", generator=torch.Generator().manual_seed(7),
                              **kw).images
    assert isinstance(images["torch"], np.ndarray) and images["torch"].dtype == np.float32
    for other in ("ort", "diffusers"):
        diff = float(np.abs(images["torch"] - images[other]).max())
        print(f"{kind}/{scheduler}: torch backend vs {other}: max abs image difference {diff:.2e}")
        assert images["torch"].shape == images[other].shape
        assert diff <= TOLERANCE, f"{kind}/{scheduler} vs {other}: {diff} > {TOLERANCE}"


def test_batched_requests_and_refiner_hand_off_match_ort(exported):
    """Batched requests (per-row guidance on the device) and base + refiner in latent
    space: the torch backend's images equal the ORT backend's."""
    calls = [dict(prompt="a cat", guidance_scale=7.5, seed=1, num_inference_steps=3, output_type="np"),
             dict(prompt="a dog", negative_prompt="blurry", guidance_scale=3.0, seed=2, num_inference_steps=3,
                  output_type="np")]
    images = {}
    for backend in ("torch", "ort"):
        with Pipeline.load(exported("sd15"), backend=backend) as pipe:
            batched = [out.images for out in pipe.generate([pipe.request(**call) for call in calls])]
        with Pipeline.load(exported("sdxl"), backend=backend) as base, \
                Pipeline.load(exported("sdxl-refiner"), backend=backend) as refiner:
            refined = base("a cat", num_inference_steps=4, seed=0, refiner=refiner, output_type="np").images
        images[backend] = [*batched, refined]
    for what, ours, theirs in zip(("batch[0]", "batch[1]", "refiner"), images["torch"], images["ort"], strict=True):
        diff = float(np.abs(ours - theirs).max())
        print(f"{what}: torch backend vs ort: max abs image difference {diff:.2e}")
        assert ours.shape == theirs.shape and diff <= TOLERANCE, f"{what}: {diff}"


def test_to_device_and_to_host():
    backend = get_backend("torch", device="cpu")
    assert (backend.name, backend.device, backend.graph_precisions) == ("torch", "cpu", ("fp32",))
    assert backend.fuses_attention_itself and not backend.fused_attention
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    host.flags.writeable = False
    on_device = backend.to_device(host)
    assert isinstance(on_device, torch.Tensor) and on_device.dtype == torch.float32
    np.testing.assert_array_equal(backend.to_host(on_device), host)
    assert backend.to_device(np.array([[1, 2]], dtype=np.int64)).dtype == torch.int64
    assert backend.to_host(torch.ones(2, dtype=torch.bfloat16)).dtype == np.float32
    assert backend.describe().startswith(f"torch {torch.__version__} (cpu, fp32")


def test_generation_keeps_torch_tensors_on_the_device(exported):
    """The device-array path: after the conditioning is built (on the host, once), the
    denoiser and the decoder are fed torch tensors, never numpy arrays."""
    with Pipeline.load(exported("sdxl"), backend="torch") as pipe:
        fed: dict[str, set] = {}
        for key, session in pipe._contexts.items():
            real = session.run

            def spy(feeds, key=key, real=real):
                for name, value in feeds.items():
                    fed.setdefault(f"{key}.{name}", set()).add(type(value).__name__)
                return real(feeds)

            session.run = spy
        pipe("a cat", num_inference_steps=3, guidance_scale=5.0, height=48, width=64, seed=0, scheduler="euler")
    device_fed = {k: v for k, v in fed.items() if k.split(".")[0] in ("unet", "vae_decoder")}
    assert set(device_fed) == {"unet.sample", "unet.timestep", "unet.encoder_hidden_states", "unet.text_embeds",
                               "unet.time_ids", "vae_decoder.latent_sample"}
    assert all(types == {"Tensor"} for types in device_fed.values()), device_fed


def test_bf16_on_cpu_close_to_fp32_and_sdxl_vae_stays_fp32(exported):
    folder = exported("sdxl")
    kw = dict(num_inference_steps=3, guidance_scale=5.0, seed=0, scheduler="euler", output_type="np")
    with Pipeline.load(folder, backend="torch", dtype="fp32") as pipe:
        fp32 = pipe("a cat", **kw).images
    with Pipeline.load(folder, backend="torch", dtype="bf16") as pipe:
        assert pipe.models["unet"].dtype == torch.bfloat16
        assert pipe.models["vae_decoder"].dtype == torch.float32  # force_upcast, as the half artifacts
        assert "bf16" in pipe.backend.describe()
        bf16 = pipe("a cat", **kw).images
    diff = float(np.abs(bf16 - fp32).max())
    print(f"sdxl bf16 vs fp32 on the CPU: max abs image difference {diff:.2e}")
    assert 0 < diff <= 0.1


def _with_source(folder, tmp_path, path):
    art = copy_artifact(folder, tmp_path / "artifact")
    data = json.loads((art / "manifest.json").read_text())
    data["source"]["path"] = str(path)
    (art / "manifest.json").write_text(json.dumps(data))
    return art


def test_missing_source_checkpoint_is_one_line(exported, tiny_checkpoint, tmp_path):
    gone = tmp_path / "moved-away"
    art = _with_source(exported("sd15"), tmp_path, gone)
    with pytest.raises(DiffrtError) as info:
        Pipeline.load(art, backend="torch")
    message = str(info.value)
    assert "\n" not in message and str(gone) in message
    assert "torch backend runs the source checkpoint" in message and "ONNX files are not enough" in message
    Pipeline.load(art, backend="ort").close()  # the ONNX backends do not need it
    with Pipeline.load(art, backend="torch", source=str(tiny_checkpoint("sd15"))) as pipe:  # moved: source=
        assert pipe("a cat", num_inference_steps=2, seed=0, output_type="np").images.shape == (1, 64, 64, 3)


def test_changed_source_checkpoint(exported, tiny_checkpoint):
    sd15, sdxl = exported("sd15"), exported("sdxl")
    cases = [  # (artifact, source given, options, what the one-line error says)
        (sd15, tiny_checkpoint("lcm"), {}, "holds a LatentConsistencyModelPipeline"),
        (sdxl, tiny_checkpoint("sdxl-lcm"), {}, "time_cond_proj_dim"),  # caught by the config facts
        (sd15, tiny_checkpoint("sd2"), {"verify_source": "true"}, "has changed since the artifact was exported"),
    ]
    for artifact, source, options, says in cases:
        with pytest.raises(DiffrtError) as info:
            Pipeline.load(artifact, backend="torch", source=str(source), **options)
        assert says in str(info.value) and "\n" not in str(info.value), str(info.value)
    # the same architecture with other weights passes the cheap default checks (documented)
    Pipeline.load(sd15, backend="torch", source=str(tiny_checkpoint("sd2"))).close()
    Pipeline.load(sd15, backend="torch", verify_source=True).close()  # its own checkpoint hashes equal


@pytest.mark.parametrize(("options", "says"), [
    ({"dtype": "fp8"}, "dtype='fp8'; choose one of: fp32, fp16, bf16"),
    ({"device": "tpu9"}, "device='tpu9'"),
    ({"cuda_graphs": True, "device": "cpu"}, "cuda_graphs=true needs device=cuda"),
    ({"compile": "maybe"}, "compile='maybe'; use true or false"),
    ({"compile_mode": "fastest"}, "compile_mode='fastest'"),
    ({"precision": "fp16"}, "has no option 'precision'"),
])
def test_option_errors_are_one_line(options, says):
    with pytest.raises(DiffrtError) as info:
        get_backend("torch", **options)
    assert says in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message; this machine has CUDA")
def test_cuda_without_cuda_is_one_line():
    with pytest.raises(DiffrtError, match="sees no CUDA device") as info:
        get_backend("torch", device="cuda")
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def tiny_vae_artifact(tiny_checkpoint, tmp_path_factory):
    from diffrt.export import export
    from diffrt.export.tiny import make_tiny_taesd

    taesd = make_tiny_taesd(tmp_path_factory.mktemp("taesd") / "taesd")
    out = tmp_path_factory.mktemp("torch-tiny-vae") / "artifact"
    export(tiny_checkpoint("sd15"), out, tiny_vae=taesd, fused_attention=False)
    return out, taesd


def test_tiny_vae_needs_its_folder(tiny_vae_artifact):
    folder, taesd = tiny_vae_artifact
    kw = dict(num_inference_steps=2, seed=0, output_type="np", vae="tiny")
    with Pipeline.load(folder, backend="torch") as pipe:
        pipe("a cat", num_inference_steps=2, seed=0, output_type="np")  # the full VAE works without it
        with pytest.raises(DiffrtError, match="tiny_vae=PATH") as info:
            pipe("a cat", **kw)
        assert "\n" not in str(info.value)
    with Pipeline.load(folder, backend="torch", tiny_vae=str(taesd)) as pipe:
        ours = pipe("a cat", **kw).images
    with Pipeline.load(folder, backend="ort") as pipe:
        theirs = pipe("a cat", **kw).images
    diff = float(np.abs(ours - theirs).max())
    print(f"tiny VAE: torch vs ORT max abs image difference {diff:.2e}")
    assert diff <= TOLERANCE


def test_models_load_only_what_the_stage_needs(exported):
    folder = exported("sd15")
    manifest = read_manifest(folder)
    backend = get_backend("torch")
    decoder = backend.open(folder, manifest.select("vae_decoder", "default", "fp32"))
    vae = decoder.module.vae
    assert vae.encoder is None and vae.decoder is not None
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in vae.attn_processors.values())
    unet = backend.open(folder, manifest.select("unet", "default", "fp32")).module.unet
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())
    context = decoder.context()
    decoder.close()
    with pytest.raises(DiffrtError, match="closed"):
        context.run({"latent_sample": np.zeros((1, 4, 4, 4), np.float32)})


def test_choosing_another_backend_does_not_import_torch():
    code = textwrap.dedent("""
        import sys
        from diffrt.runtime.backends import get_backend
        get_backend("ort")
        assert "diffrt.torch_backend" not in sys.modules and "torch" not in sys.modules
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_missing_library_is_the_registrys_one_line_error():
    code = textwrap.dedent("""
        import sys
        sys.modules["diffusers"] = None  # as if not installed
        from diffrt.errors import DiffrtError
        from diffrt.runtime.backends import get_backend
        try:
            get_backend("torch")
        except DiffrtError as exc:
            print(exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines() == [
        "backend 'torch' needs diffusers, which is not installed here; pip install 'diffrt[torch]' "
        "(and a torch build for your device)"], result.stderr
