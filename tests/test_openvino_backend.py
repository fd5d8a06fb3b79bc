"""The OpenVINO backend on the exporter's ONNX files: images against diffusers, the
precision choice, static shapes compiled per shape, the on-disk engine cache, fused
attention, errors. Parity tests force precision="fp32": on a CPU with AMX or
AVX512-BF16 the default is bf16, which is checked separately with a looser bound.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import weakref
from dataclasses import replace

import numpy as np
import pytest
from conftest import bf16_instructions, copy_artifact, requires_bf16_cpu

pytest.importorskip("openvino")

import torch  # noqa: E402 - after the skip: the oracle side

from diffrt.artifacts import read_manifest  # noqa: E402
from diffrt.errors import ArtifactError, DiffrtError  # noqa: E402
from diffrt.runtime import cpu as cpu_module  # noqa: E402
from diffrt.runtime.backends import get_backend  # noqa: E402
from diffrt.runtime.backends import openvino as ovb  # noqa: E402
from diffrt.runtime.engine_cache import cache_key  # noqa: E402
from diffrt.runtime.pipeline import Pipeline  # noqa: E402

# OpenVINO fp32 vs diffusers on the tiny models measured 1.2e-6..5.4e-6 (CPU kernels
# differ from torch's only in summation order), so the parity suite's bound holds.
TOLERANCE = 1e-4
# bf16 keeps 8 bits of mantissa. Not measurable here (AVX2 only): as a pessimistic
# stand-in, diffusers run entirely in torch bf16 differs from fp32 by 1.4e-2 (max) on
# the same case (OpenVINO keeps more of the graph in fp32). 5e-2 still fails a broken graph.
BF16_TOLERANCE = 5e-2
DETERMINISTIC = ("ddim", "pndm", "euler", "dpmpp_2m", "dpmpp_2m_karras")

UNET_PROFILE = {"batch": 2, "latent_height": 32, "latent_width": 32, "text_length": 77}  # one prompt chunk


# -- the oracle (the minimal parts of tests/test_pipeline_parity.py) -----------------

def _diffusers_scheduler(name: str, config):
    import diffusers

    classes = {
        "ddim": ("DDIMScheduler", {}),
        "pndm": ("PNDMScheduler", {}),
        "euler": ("EulerDiscreteScheduler", {}),
        "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
        "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    }
    class_name, overrides = classes[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


class TorchNoise:
    """standard_normal drawn from a seeded torch Generator: the noise diffusers injects
    for LCM steps when given a torch Generator with the same seed."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def standard_normal(self, shape, dtype=np.float32):
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32).numpy().astype(dtype)


def _latents(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@pytest.fixture(scope="module")
def artifact(exported, tmp_path_factory):
    """artifact(kind) -> a copy of the tiny export, so that the engines this module
    builds (in the default place, ARTIFACT/engines/openvino/) stay out of the shared one."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = tmp_path_factory.mktemp(f"ov-{kind}") / "artifact"
            copy_artifact(exported(kind), cache[kind])
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint, artifact):
    from diffusers import DiffusionPipeline

    cache = {}

    def get(kind):
        if kind not in cache:
            ref = DiffusionPipeline.from_pretrained(tiny_checkpoint(kind), safety_checker=None,
                                                   requires_safety_checker=False)
            ref.set_progress_bar_config(disable=True)
            ours = Pipeline.load(artifact(kind), backend="openvino", precision="fp32")
            cache[kind] = (ours, ref, ref.scheduler.config)
        ours, ref, config = cache[kind]
        ref.scheduler = getattr(__import__("diffusers"), config["_class_name"]).from_config(config)
        return ours, ref

    return get


def _compare(ours, theirs, label, tolerance=TOLERANCE):
    diff = float(np.max(np.abs(ours - theirs)))
    print(f"openvino {label}: max abs image difference {diff:.2e}")
    assert ours.shape == theirs.shape
    assert diff <= tolerance, f"{label}: {diff} > {tolerance}"


# -- parity with diffusers ---------------------------------------------------------------

@pytest.mark.parametrize(("kind", "scheduler"),
                         [("sd15", s) for s in DETERMINISTIC] + [("sd2", "ddim"), ("sd2", "dpmpp_2m")])
def test_sd_matches_diffusers(pipes, kind, scheduler):
    ours, ref = pipes(kind)
    assert ours.backend.describe().endswith("(CPU, fp32 inference precision)")
    ref.scheduler = _diffusers_scheduler(scheduler, ref.scheduler.config)
    steps = 8 if scheduler != "pndm" else 12
    prompts, negatives = ["a photo of a cat", "(((masterpiece))), a dog, 4k"], ["blurry", ""]
    latents = _latents((4, 4, 32, 32))
    theirs = ref(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=7.5,
                 num_images_per_prompt=2, latents=latents, output_type="np").images
    got = ours(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=7.5,
               num_images_per_prompt=2, latents=latents.numpy(), scheduler=scheduler, output_type="np").images
    _compare(got, theirs, f"{kind} {scheduler}")


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_matches_diffusers(pipes, steps):
    ours, ref = pipes("lcm")
    latents = _latents((2, 4, 32, 32), seed=2)
    theirs = ref("a cat in a hat", num_inference_steps=steps, guidance_scale=8.5, num_images_per_prompt=2,
                 latents=latents, generator=torch.Generator().manual_seed(7), output_type="np").images
    got = ours("a cat in a hat", num_inference_steps=steps, num_images_per_prompt=2, latents=latents.numpy(),
               generator=TorchNoise(7), output_type="np").images
    _compare(got, theirs, f"lcm {steps}-step")


def test_alternating_sizes_compile_once_per_shape(pipes, artifact, monkeypatch):
    """With max_shapes=2: 64x64, then 80x48, then both again: one compile (or cache
    load) per new (stage, shape), none when a size comes back; every image equal to diffusers'.
    Pipeline.load prepares the checkpoint's default shape (64x64, CFG) already."""
    _, ref = pipes("sd15")
    ours = Pipeline.load(artifact("sd15"), backend="openvino", precision="fp32", max_shapes=2)
    loads = []
    real = ours.backend.load_compiled
    monkeypatch.setattr(ours.backend, "load_compiled", lambda folder, spec, shapes, weights=None:
                        loads.append(spec.name) or real(folder, spec, shapes, weights))
    ref.scheduler = _diffusers_scheduler("euler", ref.scheduler.config)
    references = {}
    for height, width in [(64, 64), (48, 80), (64, 64), (48, 80)]:
        latents = _latents((1, 4, height // 2, width // 2), seed=3)
        if (height, width) not in references:
            references[height, width] = ref("a red car", num_inference_steps=3, guidance_scale=5.0, height=height,
                                            width=width, latents=latents, output_type="np").images
        got = ours("a red car", num_inference_steps=3, guidance_scale=5.0, height=height, width=width,
                   latents=latents.numpy(), scheduler="euler", output_type="np").images
        _compare(got, references[height, width], f"sd15 euler {width}x{height}")
    # 64x64 (and the text encoder's CFG batch 2) were compiled at load; 80x48 once, here.
    assert sorted(loads) == ["unet", "vae_decoder"]


# -- precision -------------------------------------------------------------------------

AVX2_CPU = cpu_module.CpuInfo("AMD EPYC 7B12", frozenset({"avx2", "fma", "f16c"}), 2, "x86_64")
AMX_CPU = cpu_module.CpuInfo("Intel(R) Xeon(R) Platinum 8481C",
                             frozenset({"avx2", "avx512f", "amx_tile", "amx_bf16", "avx512_bf16"}), 2, "x86_64")
ZEN4_CPU = cpu_module.CpuInfo("AMD EPYC 9B14", frozenset({"avx2", "avx512f", "avx512_bf16"}), 2, "x86_64")


@pytest.mark.parametrize(
    ("cpu", "capabilities", "expected"),
    [
        (AVX2_CPU, ["FP32", "INT8", "BIN", "EXPORT_IMPORT"], "fp32"),
        (AMX_CPU, ["FP32", "BF16", "FP16", "INT8", "BIN", "EXPORT_IMPORT"], "bf16"),
        (ZEN4_CPU, ["FP32", "BF16", "INT8", "BIN", "EXPORT_IMPORT"], "bf16"),
        (AMX_CPU, ["FP32", "INT8"], "fp32"),  # the CPU has bf16 but this OpenVINO cannot use it
    ],
)
def test_default_precision_follows_the_cpu(monkeypatch, cpu, capabilities, expected):
    monkeypatch.setattr(ovb, "cpu_info", lambda: cpu)
    monkeypatch.setattr(ovb, "device_capabilities", lambda core: capabilities)
    backend = get_backend("openvino")
    assert backend.precision == expected
    assert backend.describe() == f"openvino {ovb.VERSION} (CPU, {expected} inference precision)"
    assert get_backend("openvino", precision="fp32").precision == "fp32"  # the override


def test_default_precision_on_this_machine():
    """Our default is what OpenVINO's CPU plugin itself defaults to on this CPU (its
    INFERENCE_PRECISION_HINT with nothing set): bf16 where the CPU computes bf16, else f32."""
    own_default = ovb.ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    expected = {ovb.ov.Type.bf16: "bf16", ovb.ov.Type.f32: "fp32"}[own_default]
    assert get_backend("openvino").precision == expected
    assert (expected == "bf16") == bool(bf16_instructions()), (expected, bf16_instructions())


@requires_bf16_cpu
def test_bf16_runs_where_the_cpu_has_it(artifact, tiny_checkpoint):
    from diffusers import DiffusionPipeline

    ours = Pipeline.load(artifact("sd15"), backend="openvino")  # the default here: bf16
    assert ours.backend.precision == "bf16"
    ref = DiffusionPipeline.from_pretrained(tiny_checkpoint("sd15"), safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = _diffusers_scheduler("euler", ref.scheduler.config)
    latents = _latents((1, 4, 32, 32), seed=5)
    theirs = ref("a boat", num_inference_steps=4, guidance_scale=5.0, latents=latents, output_type="np").images
    got = ours("a boat", num_inference_steps=4, guidance_scale=5.0, latents=latents.numpy(), scheduler="euler",
               output_type="np").images
    compiled = next(iter(ours.models["unet"].compiled_models().values()))
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ovb.ov.Type.bf16
    _compare(got, theirs, "sd15 euler bf16", BF16_TOLERANCE)


# -- static shapes, profiles, fused attention ----------------------------------------------

def _unet_feeds(batch=2, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, 4, size, size), dtype=np.float32),
            "timestep": np.full((batch,), 500.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, 32), dtype=np.float32)}


def test_full_profile_compiles_at_open_and_attention_is_fused(exported, tmp_path, monkeypatch):
    import onnx

    folder = exported("sd15")
    spec = read_manifest(folder).stage("unet")
    backend = get_backend("openvino", precision="fp32", cache_dir=tmp_path)
    # Names the stage does not use (height/width are the VAE's) are ignored.
    session = backend.open(folder, spec, profile={**UNET_PROFILE, "height": 64, "width": 64})
    compiled = session.compiled_models()
    assert list(compiled) == [((2, 4, 32, 32), (2,), (2, 77, 32))]
    softmaxes = sum(n.op_type == "Softmax" for n in onnx.load(str(folder / spec.graph_path)).graph.node)
    ops = ovb.attention_ops(next(iter(compiled.values())))
    print(f"tiny sd15 UNet: {softmaxes} Softmax in the ONNX graph; OpenVINO: {ops.fused} fused, {ops.unfused} unfused")
    assert softmaxes > 0 and ops.fused == softmaxes and ops.unfused == 0
    # The same count after a second start imports the blob (the runtime graph of an
    # imported model no longer names the ops a node fused).
    monkeypatch.setattr(ovb, "compile_graph", _no_compile)
    again = get_backend("openvino", precision="fp32", cache_dir=tmp_path).open(folder, spec, profile=UNET_PROFILE)
    assert ovb.attention_ops(next(iter(again.compiled_models().values()))) == ops
    assert f"{softmaxes} fused attention, 0 unfused softmax" in again.describe_graph()


def test_vae_attention_is_fused(exported):
    folder = exported("sd15")
    spec = read_manifest(folder).stage("vae_decoder")
    session = get_backend("openvino", precision="fp32", disk_cache=False).open(
        folder, spec, profile={"batch": 1, "latent_height": 32, "latent_width": 32})
    ops = ovb.attention_ops(next(iter(session.compiled_models().values())))
    assert ops.fused >= 1 and ops.unfused == 0


def test_partial_profile_compiles_on_first_run(exported):
    folder = exported("sd15")
    spec = read_manifest(folder).stage("unet")
    backend = get_backend("openvino", precision="fp32", disk_cache=False)
    session = backend.open(folder, spec, profile={"batch": 2})
    assert session.compiled_models() == {}
    out = session.context().run(_unet_feeds())["out_sample"]
    assert out.shape == (2, 4, 32, 32) and out.dtype == np.float32
    assert len(session.compiled_models()) == 1


def test_graph_with_external_data(exported, tmp_path):
    """Graphs over 2 GB come as model.onnx + model.onnx.data: OpenVINO reads the data
    file beside the graph. Same weights moved out of the graph -> the same outputs."""
    import onnx

    from diffrt.artifacts import file_record

    folder = exported("sd15")
    spec = read_manifest(folder).stage("unet")
    copy = tmp_path / "artifact"
    (copy / "unet").mkdir(parents=True)
    model = onnx.load(str(folder / spec.graph_path))
    onnx.save_model(model, str(copy / "unet" / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    files = tuple(file_record(copy, copy / "unet" / name) for name in ("model.onnx", "model.onnx.data"))
    assert files[1].size > files[0].size  # the weights did move
    external = replace(spec, files=files)
    backend = get_backend("openvino", precision="fp32", cache_dir=tmp_path / "engines")
    inline = backend.open(folder, spec).context().run(_unet_feeds())["out_sample"]
    moved = backend.open(copy, external).context().run(_unet_feeds())["out_sample"]
    np.testing.assert_allclose(moved, inline, rtol=0, atol=1e-6)


def test_max_shapes_drops_the_least_recently_used(exported, monkeypatch):
    folder = exported("sd15")
    spec = read_manifest(folder).stage("unet")
    backend = get_backend("openvino", precision="fp32", disk_cache=False, max_shapes=2)
    loads, held, refs = [], [], []
    real = backend.load_compiled

    def load_compiled(f, s, shapes, weights=None):
        loads.append(shapes["sample"])
        held.append(len(session.compiled_models()))  # the memory a compile adds comes on top of these
        # ... and nothing else keeps a dropped model alive (a weight copy each): all freed by now.
        held.append(sum(ref() is not None for ref in refs) - len(session.compiled_models()))
        compiled = real(f, s, shapes, weights)
        refs.append(weakref.ref(compiled))
        return compiled

    monkeypatch.setattr(backend, "load_compiled", load_compiled)
    session = backend.open(folder, spec)
    context = session.context()
    first = context.run(_unet_feeds(size=16))["out_sample"]
    for size in (24, 16, 32, 16):  # 32 evicts 24 (16 was used more recently)
        context.run(_unet_feeds(size=size))
    assert [s[2] for s in loads] == [16, 24, 32]
    assert held == [0, 0, 1, 0, 1, 0]  # 24 was dropped, and freed, before 32 compiled
    assert [k[0][2] for k in session.compiled_models()] == [32, 16]
    np.testing.assert_array_equal(context.run(_unet_feeds(size=16))["out_sample"], first)


# -- the engine cache ------------------------------------------------------------------

def test_cache_key_changes_exactly_with_what_changes_the_blob(exported):
    spec = read_manifest(exported("sd15")).stage("unet")
    shapes = {"sample": (2, 4, 32, 32), "timestep": (2,), "encoder_hidden_states": (2, 77, 32)}
    base = cache_key(ovb.cache_fields(spec, shapes, "fp32", AVX2_CPU, "2026.4.1-x"))
    same = [
        ovb.cache_fields(spec, dict(reversed(list(shapes.items()))), "fp32", AVX2_CPU, "2026.4.1-x"),
        ovb.cache_fields(replace(spec, max_abs_error=1.0), shapes, "fp32", AVX2_CPU, "2026.4.1-x"),
        # threads follow the cores at import time, they are not in the blob
        ovb.cache_fields(spec, shapes, "fp32", replace(AVX2_CPU, logical_cores=16), "2026.4.1-x"),
    ]
    assert all(cache_key(f) == base for f in same)
    hashes = replace(spec.files[0], sha256="0" * 64)
    different = [
        ovb.cache_fields(spec, {**shapes, "sample": (2, 4, 32, 24)}, "fp32", AVX2_CPU, "2026.4.1-x"),
        ovb.cache_fields(spec, {k: (1, *v[1:]) for k, v in shapes.items()}, "fp32", AVX2_CPU, "2026.4.1-x"),
        ovb.cache_fields(spec, shapes, "bf16", AVX2_CPU, "2026.4.1-x"),
        ovb.cache_fields(spec, shapes, "fp32", AVX2_CPU, "2026.4.2-x"),
        ovb.cache_fields(replace(spec, files=(hashes,)), shapes, "fp32", AVX2_CPU, "2026.4.1-x"),
        ovb.cache_fields(spec, shapes, "fp32", ZEN4_CPU, "2026.4.1-x"),
        ovb.cache_fields(spec, shapes, "fp32", replace(AVX2_CPU, flags=AVX2_CPU.flags | {"avx512f"}), "2026.4.1-x"),
    ]
    keys = [cache_key(f) for f in different]
    assert base not in keys and len(set(keys)) == len(keys)


def _open_unet(folder, cache_dir, **options):
    spec = read_manifest(folder).stage("unet")
    backend = get_backend("openvino", precision="fp32", cache_dir=cache_dir, **options)
    return backend.open(folder, spec, profile=UNET_PROFILE)


def _no_compile(*args, **kwargs):
    raise AssertionError("compiled although the engine cache has this key")


def test_second_start_imports_instead_of_compiling(exported, tmp_path, monkeypatch, caplog):
    folder = exported("sd15")
    first = _open_unet(folder, tmp_path, num_threads=2)
    expected = first.context().run(_unet_feeds())["out_sample"]
    entries = list((tmp_path / "openvino").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.blob").is_file()
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["fields"]["precision"] == "fp32" and meta["fields"]["inputs"]["sample"] == [2, 4, 32, 32]

    monkeypatch.setattr(ovb, "compile_graph", _no_compile)
    with caplog.at_level(logging.INFO, logger="diffrt"):
        second = _open_unet(folder, tmp_path, num_threads=1)
    assert "openvino engine cache hit" in caplog.text
    np.testing.assert_array_equal(second.context().run(_unet_feeds())["out_sample"], expected)
    # Thread settings are not in the key: the importing backend's own apply.
    compiled = next(iter(second.compiled_models().values()))
    assert compiled.get_property("INFERENCE_NUM_THREADS") == 1


def test_blob_is_written_by_openvino_and_older_entries_still_import(exported, tmp_path, monkeypatch):
    """A miss compiles with OpenVINO's CACHE_DIR inside the entry being built, so the blob
    is written by OpenVINO (header line + exported model), never held in Python memory;
    the entry gets the umask's file mode, and keeps no scratch folder. A blob without the
    header (what export_model() gives, as earlier diffrt versions stored) imports too."""
    from diffrt.artifacts import file_mode

    folder = exported("sd15")
    first = _open_unet(folder, tmp_path)
    expected = first.context().run(_unet_feeds())["out_sample"]
    entry = next((tmp_path / "openvino").iterdir())
    blob = entry / "model.blob"
    assert sorted(p.name for p in entry.iterdir()) == ["attention.json", "meta.json", "model.blob"]
    assert blob.read_bytes()[:5] == b"<?xml" and ovb.blob_header_size(blob) > 0
    assert blob.stat().st_mode & 0o777 == file_mode()

    compiled = next(iter(first.compiled_models().values()))
    headerless = tmp_path / "headerless.blob"
    headerless.write_bytes(compiled.export_model().getbuffer())
    assert ovb.blob_header_size(headerless) == 0
    assert blob.read_bytes()[ovb.blob_header_size(blob):] == headerless.read_bytes()
    # imported with the backend's own settings (fp32 here): with none, OpenVINO would
    # run the import at the CPU's default precision (bf16 where the CPU has it)
    imported = ovb.import_blob(ovb.ov.Core(), headerless, ovb.CompileSettings("fp32").properties())
    out = imported.create_infer_request().infer(_unet_feeds())
    np.testing.assert_array_equal(out[imported.output(0)], expected)


def test_default_cache_is_in_the_artifact(exported, tmp_path):
    folder = copy_artifact(exported("sd15"), tmp_path / "artifact")
    spec = read_manifest(folder).stage("unet")
    get_backend("openvino", precision="fp32").open(folder, spec, profile=UNET_PROFILE)
    entries = list((folder / "engines" / "openvino").iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()


@pytest.mark.parametrize("damage", ["blob", "meta", "truncated"])
def test_corrupt_entry_is_rebuilt(exported, tmp_path, monkeypatch, caplog, damage):
    folder = exported("sd15")
    expected = _open_unet(folder, tmp_path).context().run(_unet_feeds())["out_sample"]
    entry = next((tmp_path / "openvino").iterdir())
    blob = entry / "model.blob"
    if damage == "blob":  # same size, so only the import notices
        blob.write_bytes(b"\0" * blob.stat().st_size)
    elif damage == "meta":
        (entry / "meta.json").write_text("{not json")
    else:
        blob.write_bytes(blob.read_bytes()[:1000])
    compiles = []
    real = ovb.compile_graph
    monkeypatch.setattr(ovb, "compile_graph", lambda *a: compiles.append(1) or real(*a))
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        session = _open_unet(folder, tmp_path)
    assert len(compiles) == 1
    assert "is unusable" in caplog.text and "rebuilding" in caplog.text
    np.testing.assert_array_equal(session.context().run(_unet_feeds())["out_sample"], expected)
    # ... and the rebuilt entry is good: a third start imports it.
    monkeypatch.setattr(ovb, "compile_graph", _no_compile)
    np.testing.assert_array_equal(_open_unet(folder, tmp_path).context().run(_unet_feeds())["out_sample"], expected)


def test_unwritable_cache_root_runs_without_a_cache(exported, tmp_path, caplog):
    """A root whose parent is a regular file cannot be created, even by root (chmod
    would not stop root)."""
    folder = exported("sd15")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    root = blocker / "engines"
    manifest = read_manifest(folder)
    backend = get_backend("openvino", precision="fp32", cache_dir=root)
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        unet = backend.open(folder, manifest.stage("unet"), profile=UNET_PROFILE)
        backend.open(folder, manifest.stage("vae_decoder"),
                     profile={"batch": 1, "latent_height": 32, "latent_width": 32})
    warnings = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 1, caplog.text  # said once per root, not per stage
    assert unet.context().run(_unet_feeds())["out_sample"].shape == (2, 4, 32, 32)
    assert blocker.is_file()


# -- errors -------------------------------------------------------------------------------

def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"precision": "int8"}, "precision='int8'; choose one of: fp32, bf16, fp16"),
        ({"num_threads": -1}, "num_threads must be an integer >= 0"),
        ({"num_streams": 0}, "num_streams must be an integer >= 1"),
        ({"performance_hint": "fast"}, "performance_hint='fast'; choose one of: latency, throughput"),
        ({"max_shapes": 0}, "max_shapes must be an integer >= 1"),
    ],
)
def test_bad_options_are_one_line_errors(options, fragment):
    with pytest.raises(DiffrtError) as exc_info:
        get_backend("openvino", **options)
    assert fragment in _one_line(exc_info)


def test_precision_the_cpu_cannot_run_is_refused(monkeypatch):
    monkeypatch.setattr(ovb, "device_capabilities", lambda core: ["FP32", "INT8", "BIN", "EXPORT_IMPORT"])
    with pytest.raises(DiffrtError) as exc_info:
        get_backend("openvino", precision="bf16")
    message = _one_line(exc_info)
    assert "OpenVINO cannot run bf16 on this CPU" in message and "use precision='fp32'" in message


def test_pipeline_load_passes_the_error_through(exported):
    with pytest.raises(DiffrtError) as exc_info:
        Pipeline.load(exported("sd15"), backend="openvino", precision="int4")
    assert "precision='int4'" in _one_line(exc_info)


@pytest.mark.parametrize("content", [b"garbage", None])
@pytest.mark.parametrize("at_open", [True, False])
def test_corrupt_graph_is_a_one_line_error(exported, tmp_path, content, at_open):
    folder = tmp_path / "artifact"
    copy_artifact(exported("sd15"), folder)
    spec = read_manifest(folder).stage("unet")
    graph = folder / spec.graph_path
    graph.write_bytes(content if content is not None else graph.read_bytes()[:100_000])  # garbage / truncated
    backend = get_backend("openvino", precision="fp32", disk_cache=False)
    with pytest.raises(ArtifactError) as exc_info:
        if at_open:
            backend.open(folder, spec, profile=UNET_PROFILE)
        else:
            backend.open(folder, spec).context().run(_unet_feeds())
    message = _one_line(exc_info)
    assert str(graph) in message and "cannot be loaded by OpenVINO" in message and "re-export" in message


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"sample": np.zeros((2, 3, 32, 32), np.float32)},
         "input 'sample' has shape (2, 3, 32, 32), expected (batch, 4, latent_height, latent_width)"),
        ({"timestep": np.zeros((3,), np.float32)}, "input 'timestep' has batch=3, another input has batch=2"),
        ({"encoder_hidden_states": np.zeros((2, 77), np.float32)}, "input 'encoder_hidden_states' has shape (2, 77)"),
    ],
)
def test_wrong_feed_shapes_are_one_line_errors(exported, change, fragment):
    folder = exported("sd15")
    backend = get_backend("openvino", precision="fp32", disk_cache=False)
    session = backend.open(folder, read_manifest(folder).stage("unet")).context()
    with pytest.raises(DiffrtError) as exc_info:
        session.run({**_unet_feeds(), **change})
    assert fragment in _one_line(exc_info)


def test_bad_profile_value(exported):
    folder = exported("sd15")
    with pytest.raises(DiffrtError) as exc_info:
        backend = get_backend("openvino", disk_cache=False)
        backend.open(folder, read_manifest(folder).stage("unet"), profile={"batch": 0})
    assert "profile['batch'] must be a positive integer, got 0" in _one_line(exc_info)


# -- torch-free ------------------------------------------------------------------------------

def test_generating_on_openvino_is_torch_free(exported, tmp_path):
    folder = tmp_path / "artifact"
    copy_artifact(exported("sd15"), folder)
    code = f"""
        import sys
        from diffrt import Pipeline
        pipe = Pipeline.load({str(folder)!r}, backend="openvino", precision="fp32")
        for scheduler in ("pndm", "euler", "lcm"):
            out = pipe("a cat", num_inference_steps=2, seed=0, scheduler=scheduler)
        out.images[0].save({str(tmp_path / "x.png")!r})
        heavy = [m for m in ("torch", "diffusers", "transformers", "optimum") if m in sys.modules]
        assert not heavy, heavy
        assert "openvino" in sys.modules
        print("ok")
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    assert (tmp_path / "x.png").stat().st_size > 0
    assert len(list((folder / "engines" / "openvino").iterdir())) == 3  # text encoder, UNet, VAE decoder
