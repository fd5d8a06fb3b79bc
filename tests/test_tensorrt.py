"""TensorRT's GPU-free parts, on the CPU: profiles from the requested shapes, engine
keys, the engine cache look-up, the shape check, `diffrt build`'s argument checks and
the error without TensorRT. The TensorRT calls themselves are checked by name in
test_tensorrt_api.py; running them needs an NVIDIA GPU."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_artifact

from diffrt.artifacts import read_manifest
from diffrt.build.tensorrt import build_shapes, parse_batch, plan_build
from diffrt.cli import main
from diffrt.errors import DiffrtError
from diffrt.runtime.engine_cache import EngineCache
from diffrt.runtime.tensorrt_engines import (
    ENGINE_NAME,
    PROFILE_NAME,
    BuildOptions,
    GpuInfo,
    check_shapes,
    choose_engine,
    engine_fields,
    engine_key,
    find_engines,
)

GPU = GpuInfo("NVIDIA H200", "9.0")


def ranges(plan, key):
    """{input: (min, opt, max)} of one stage of a plan."""
    return {r.name: (r.min, r.opt, r.max) for r in plan.profiles[key].inputs}


def test_sd_profiles_double_the_batch_for_cfg(exported):
    plan = plan_build(exported("sd15"), batch="1-4")  # 64x64 default, VAE factor 2: 32x32 latents
    assert list(plan.profiles) == ["text_encoder", "unet", "vae_decoder"]
    assert {s.variant for s in plan.specs.values()} == {"default"}  # portable attention: TensorRT fuses it
    # text: 1 prompt without CFG .. 4 prompts with negatives; opt: 1 prompt with CFG (default guidance 7.5)
    assert ranges(plan, "text_encoder") == {"input_ids": ((1, 77), (2, 77), (8, 77))}
    unet = ranges(plan, "unet")
    assert unet["sample"] == ((1, 4, 32, 32), (2, 4, 32, 32), (8, 4, 32, 32))
    assert unet["timestep"] == ((1,), (2,), (8,))
    # weighted prompts: min/opt one chunk of CLIP's 77 tokens, max --text-chunks (default 3) of them
    assert unet["encoder_hidden_states"] == ((1, 77, 32), (2, 77, 32), (8, 3 * 77, 32))
    longer = ranges(plan_build(exported("sd15"), batch="1-4", text_chunks=5), "unet")
    assert longer["encoder_hidden_states"][2] == (8, 5 * 77, 32)
    assert ranges(plan, "vae_decoder") == {"latent_sample": ((1, 4, 32, 32), (1, 4, 32, 32), (4, 4, 32, 32))}


def test_size_range_and_static(exported):
    folder = exported("sd15")
    plan = plan_build(folder, batch="2", min_size=(48, 64), max_size=(128, 96))  # (height, width)
    sample = ranges(plan, "unet")["sample"]
    assert sample == ((2, 4, 24, 32), (4, 4, 32, 32), (4, 4, 64, 48))  # opt: the default 64x64, inside the range
    static = plan_build(folder, batch="3", size=(80, 48), static=True)
    for profile in static.profiles.values():
        assert profile.static
    assert ranges(static, "unet")["sample"][0] == (6, 4, 40, 24)  # 3 images, CFG, 80x48 pixels
    assert ranges(static, "text_encoder")["input_ids"][0] == (2, 77)  # one prompt (and its negative)
    assert ranges(static, "vae_decoder")["latent_sample"][0] == (3, 4, 40, 24)
    assert ranges(static, "unet")["encoder_hidden_states"][2] == (6, 77, 32)  # static: one chunk of text


def test_lcm_profiles_have_no_cfg_and_take_the_guidance_embedding(exported):
    plan = plan_build(exported("lcm"), batch="1-4")
    unet = ranges(plan, "unet")
    assert unet["sample"] == ((1, 4, 32, 32), (1, 4, 32, 32), (4, 4, 32, 32))
    assert unet["timestep_cond"][2][0] == 4 and len(unet["timestep_cond"][2]) == 2
    assert ranges(plan, "text_encoder")["input_ids"] == ((1, 77), (1, 77), (4, 77))


def test_sdxl_profiles_cover_both_encoders_and_the_added_conditions(exported):
    plan = plan_build(exported("sdxl"), batch="1-2", size=(64, 64))
    assert list(plan.profiles) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder"]
    for role in ("text_encoder", "text_encoder_2"):
        # force_zeros_for_empty_prompt: opt encodes no negative; a negative prompt is covered up to the UNet batch
        assert ranges(plan, role)["input_ids"] == ((1, 77), (1, 77), (4, 77))
    unet = ranges(plan, "unet")
    manifest = read_manifest(exported("sdxl"))
    assert unet["time_ids"] == ((1, manifest.model["time_ids"]), (2, manifest.model["time_ids"]),
                                (4, manifest.model["time_ids"]))
    assert unet["text_embeds"][2] == (4, manifest.model["projection_dim"])
    assert unet["sample"][2] == (4, 4, 32, 32)
    assert [shape[1] for shape in unet["encoder_hidden_states"]] == [77, 77, 3 * 77]  # up to 3 prompt chunks


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch": "0"}, "--batch '0': need 1 <= LO <= HI"),
    ({"batch": "4-1"}, "need 1 <= LO <= HI"),
    ({"batch": "two"}, "use N or LO-HI"),
    ({"size": (64, 60)}, "--size 60x64: width must be a positive multiple of 8"),
    ({"min_size": (128, 128), "max_size": (64, 64)}, "--min-size 128x128 is larger than --max-size 64x64"),
    ({"min_size": (64, 64)}, "--min-size and --max-size go together"),
    ({"size": (64, 64), "min_size": (64, 64), "max_size": (64, 64)}, "either --size or --min-size/--max-size"),
    ({"batch": "1-4", "static": True}, "--static builds one shape"),
    ({"text_chunks": 0}, "--text-chunks 0: use a whole number >= 1"),
])
def test_shapes_are_validated_with_one_line_errors(exported, kwargs, message):
    manifest = read_manifest(exported("sd15"))
    with pytest.raises(DiffrtError, match=None) as info:
        build_shapes(manifest, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_parse_batch():
    assert parse_batch("3") == (3, 3) and parse_batch("1-4") == (1, 4) and parse_batch(2) == (2, 2)


def test_a_precision_the_artifact_lacks_is_refused(exported):
    with pytest.raises(DiffrtError, match="this artifact has fp32 graphs only; re-export with `diffrt export "
                                          "--precision fp16`"):
        plan_build(exported("sd15"), precision="fp16")


def test_engine_key_covers_every_field(exported):
    plan = plan_build(exported("sd15"), batch="1-4")
    spec, profile = plan.specs["unet"], plan.profiles["unet"]
    options = BuildOptions()
    key = engine_key(spec, profile, "11.4.0", GPU, options)
    assert key == engine_key(spec, profile, "11.4.0", GPU, BuildOptions())  # deterministic
    other_plan = plan_build(exported("sd15"), batch="1-2")
    changed = [
        engine_key(dataclasses.replace(spec, files=spec.files[:0]), profile, "11.4.0", GPU, options),
        engine_key(spec, other_plan.profiles["unet"], "11.4.0", GPU, options),
        engine_key(dataclasses.replace(spec, precision="fp16"), profile, "11.4.0", GPU, options),
        engine_key(spec, profile, "10.13.0", GPU, options),
        engine_key(spec, profile, "11.4.0", GpuInfo("NVIDIA L4", "9.0"), options),
        engine_key(spec, profile, "11.4.0", GpuInfo("NVIDIA H200", "10.0"), options),
        engine_key(spec, profile, "11.4.0", GPU, BuildOptions(opt_level=5)),
        engine_key(spec, profile, "11.4.0", GPU, BuildOptions(refit=True)),
        engine_key(spec, profile, "11.4.0", GPU, BuildOptions(workspace_gib=4)),
    ]
    assert key not in changed and len(set(changed)) == len(changed)
    fields = engine_fields(spec, profile, "11.4.0", GPU, options)
    assert fields["recipe"] >= 1 and fields["files"] == [f.sha256 for f in spec.files]
    with pytest.raises(DiffrtError, match="--opt-level 9: use an integer from 0 to 5"):
        BuildOptions(opt_level=9)


def test_shape_outside_the_profile_names_the_shape_and_the_range(exported):
    profile = plan_build(exported("sd15"), batch="1-2").profiles["unet"]
    check_shapes("abc", profile, {"sample": (4, 4, 32, 32), "timestep": (4,)})  # inside
    with pytest.raises(DiffrtError) as info:
        check_shapes("abc", profile, {"sample": (5, 4, 32, 32), "timestep": (5,)})
    message = str(info.value)
    assert "TensorRT engine abc (stage unet): sample shape [5, 4, 32, 32] is outside the built range " \
           "[1-4, 4, 32, 32]" in message
    assert "diffrt build OUT --backend tensorrt" in message and "\n" not in message
    with pytest.raises(DiffrtError, match=r"sample shape \[2, 4, 40, 32\] is outside"):
        check_shapes("abc", profile, {"sample": (2, 4, 40, 32)})


def test_engines_are_found_by_stage_tensorrt_and_gpu_and_chosen_by_profile(exported, tmp_path):
    folder = exported("sd15")
    wide = plan_build(folder, batch="1-4")
    static = plan_build(folder, batch="1", size=(64, 64), static=True)
    spec = wide.specs["unet"]
    cache = EngineCache(tmp_path / "engines", "tensorrt")

    def publish(plan, version="11.4.0", gpu=GPU):
        fields = engine_fields(spec, plan.profiles["unet"], version, gpu, BuildOptions())

        def write(tmp):
            (tmp / ENGINE_NAME).write_bytes(b"plan")
            (tmp / PROFILE_NAME).write_text(json.dumps(plan.profiles["unet"].to_json()))

        return cache.publish(engine_key(spec, plan.profiles["unet"], version, gpu, BuildOptions()), fields, write)

    assert find_engines(cache, spec, "11.4.0", GPU) == []
    wide_entry, static_entry = publish(wide), publish(static)
    publish(wide, version="10.13.0")
    publish(wide, gpu=GpuInfo("NVIDIA L4", "8.9"))
    (cache.folder / "timing.cache").write_bytes(b"x")  # the shared timing cache is not an engine
    engines = find_engines(cache, spec, "11.4.0", GPU)
    assert sorted(e.path for e in engines) == sorted([wide_entry, static_entry])
    assert choose_engine(engines, {"batch": 2, "latent_height": 32, "latent_width": 32}).path == static_entry
    assert choose_engine(engines, {"batch": 6}).path == wide_entry
    assert choose_engine(engines, {"batch": 9}) is None
    assert find_engines(cache, wide.specs["vae_decoder"], "11.4.0", GPU) == []  # another stage's engines


def test_build_checks_its_arguments_before_needing_tensorrt(exported, capsys, monkeypatch):
    folder = str(exported("sd15"))
    for module in ("tensorrt", "cupy"):
        monkeypatch.setitem(sys.modules, module, None)  # as on a machine without them, even where installed
    assert main(["build", folder, "--size", "64x60"]) == 2
    assert "error: --size 64x60: height must be a positive multiple of 8" in capsys.readouterr().err
    assert main(["build", folder, "--batch", "1-4", "--static"]) == 2
    assert "--static builds one shape" in capsys.readouterr().err
    assert main(["build", folder, "--opt-level", "7"]) == 2
    assert "--opt-level 7" in capsys.readouterr().err
    assert main(["build", folder, "--workspace-gib", "-1"]) == 2
    assert "--workspace-gib -1.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build", folder, "--backend", "ort"])  # argparse: only tensorrt builds ahead of time
    capsys.readouterr()
    # valid arguments: the one-line error says what to install
    assert main(["build", folder, "--batch", "1-4", "--size", "64x64", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: building TensorRT engines needs ") and "pip install 'diffrt[tensorrt]'" in err
    assert "\n" not in err


def test_backend_without_tensorrt_says_what_to_install(monkeypatch):
    from diffrt.runtime.backends import get_backend

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.delitem(sys.modules, "diffrt.runtime.backends.tensorrt", raising=False)
    with pytest.raises(DiffrtError) as info:
        get_backend("tensorrt")
    message = str(info.value)
    assert "backend 'tensorrt' needs" in message and "pip install 'diffrt[tensorrt]'" in message
    assert "\n" not in message


# -- the backend and the builder on fake CuPy and TensorRT (tests/fake_gpu.py) ------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    import fake_gpu as fakes

    return fakes.install(monkeypatch)


def _build(folder, cache, size=64):
    from diffrt.build.tensorrt import build_plan

    return build_plan(plan_build(folder, batch="1", size=(size, size)), cache_dir=cache)


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_every_address_handed_to_tensorrt_is_256_byte_aligned(fake_gpu, exported, tmp_path, cuda_graphs):
    """setTensorAddress: "The pointer must have at least 256-byte alignment" (TensorRT's
    NvInferRuntime.h). With CFG the loop feeds row i of a (steps, 2) float32 timestep array,
    8*i bytes into it; the backend must hand TensorRT an aligned copy. The fake context runs
    the graphs (ONNX Runtime) on the memory at the addresses it was given, so the image must
    also be the ORT backend's on the same portable graphs."""
    from diffrt.runtime.pipeline import Pipeline

    folder = exported("sd15")
    _build(folder, tmp_path)
    args = dict(num_inference_steps=4, guidance_scale=7.5, height=64, width=64, seed=1, output_type="np",
                scheduler="euler")
    with Pipeline.load(folder, backend="tensorrt", cache_dir=tmp_path, cuda_graphs=cuda_graphs) as pipe:
        image = pipe("a cat", **args).images
    with Pipeline.load(folder, backend="ort", attention="portable", disk_cache=False) as pipe:
        reference = pipe("a cat", **args).images
    assert {name for name, _ in fake_gpu.addresses} >= {"sample", "timestep", "encoder_hidden_states", "out_sample"}
    misaligned = [(name, hex(pointer)) for name, pointer in fake_gpu.addresses if pointer % 256]
    assert misaligned == []
    np.testing.assert_allclose(image, reference, atol=1e-6)


def test_image_to_image_on_tensorrt_says_where_it_runs(fake_gpu, exported, tmp_path):
    """`diffrt build` builds the text-to-image stages only; the first call that starts from
    a picture must say so, not send the user to rebuild (which would not help)."""
    from diffrt.errors import DiffrtError
    from diffrt.runtime.pipeline import Pipeline

    folder = exported("sd15")
    _build(folder, tmp_path)
    picture = np.full((64, 64, 3), 128, dtype=np.uint8)
    with Pipeline.load(folder, backend="tensorrt", cache_dir=tmp_path) as pipe:
        with pytest.raises(DiffrtError) as info:
            pipe("a cat", image=picture, strength=0.5, num_inference_steps=2, height=64, width=64, output_type="np")
        assert "ort or openvino" in str(info.value) and "\n" not in str(info.value)
        assert "diffrt build" in str(info.value) and "does not build yet" in str(info.value)
        pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np")  # text-to-image still runs


def test_closing_waits_for_the_stream_before_freeing_contexts(fake_gpu, exported, tmp_path):
    from diffrt.runtime.pipeline import Pipeline

    folder = exported("sd15")
    _build(folder, tmp_path)
    pipe = Pipeline.load(folder, backend="tensorrt", cache_dir=tmp_path, cuda_graphs=True)
    pipe("a cat", num_inference_steps=2, height=64, width=64, seed=0, output_type="np")
    used = set(fake_gpu.executed_on)  # the streams of the contexts that ran
    fake_gpu.events.clear()
    pipe.close()
    events = fake_gpu.events
    assert "free context" in events and "free graph" in events  # the close freed them
    # each context waits for its own stream, then frees what it holds: every free comes
    # after a synchronize, and each synchronize is followed by its context's frees
    starts = [i for i, e in enumerate(events) if e.startswith("synchronize")]
    assert starts and starts[0] == 0, events
    segments = [events[a + 1:b] for a, b in zip(starts, [*starts[1:], len(events)], strict=True)]
    assert all("free context" in segment for segment in segments), events
    assert {int(events[i].split()[1]) for i in starts} == used and len(starts) == len(used) == 3, events


def _unet_weight(folder):
    """A UNet initializer that TensorRT-style refitting finds combined with another (a
    Conv's weight, whose bias the fake Refitter then reports missing), its new value, and
    the graph file's copy with that value written in (the oracle, made with onnx)."""
    import onnx
    from onnx import numpy_helper

    spec = read_manifest(folder).stage("unet")
    model = onnx.load(str(folder / spec.graph_path))
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and len(n.input) == 3)
    initializer = next(i for i in model.graph.initializer if i.name == conv.input[1])
    new = (numpy_helper.to_array(initializer) * -1.5).astype(np.float32)
    initializer.CopyFrom(numpy_helper.from_array(new, initializer.name))
    return spec, conv.input[1], conv.input[2], new, model


def test_contexts_run_on_their_own_streams_and_a_refit_reaches_every_context(fake_gpu, exported, tmp_path):
    """Two workers of one pipeline: their contexts enqueue on different streams, on one
    engine per stage (deserialized once). update_weights refits that engine: both workers
    then compute what ONNX Runtime computes on the graph with the new weight written in,
    the Conv's bias (missing to the refitter) supplied from the graph's own value."""
    import onnx

    from diffrt.build.tensorrt import BuildOptions, build_plan
    from diffrt.runtime.backends import get_backend
    from diffrt.runtime.pipeline import Pipeline

    folder = copy_artifact(exported("sd15"), tmp_path / "artifact")
    build_plan(plan_build(folder, batch="1", size=(64, 64), options=BuildOptions(refit=True)), cache_dir=tmp_path)
    spec, name, bias, new, edited = _unet_weight(folder)
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 32, 32), dtype=np.float32),
             "timestep": np.array([10.0, 700.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    with Pipeline.load(folder, backend="tensorrt", cache_dir=tmp_path, workers=2) as pipe:
        other = pipe.worker()
        before = [p._contexts["unet"].run(feeds)["out_sample"].get() for p in (pipe, other)]
        first, second = (set(fake_gpu.executed_on[i::2]) for i in (0, 1))
        assert len(first) == len(second) == 1 and first != second
        pipe.models["unet"].update_weights({name: new})
        after = [p._contexts["unet"].run(feeds)["out_sample"].get() for p in (pipe, other)]
        other.close()
    assert set(fake_gpu.refits[-1]) == {name, bias}
    onnx.save(edited, str(folder / spec.graph_path))  # the oracle: the weight in the graph itself
    reference = get_backend("ort", disk_cache=False).open(folder, spec).context().run(feeds)["out_sample"]
    np.testing.assert_array_equal(before[0], before[1])
    assert np.abs(before[0] - reference).max() > 1e-3  # the new weight matters
    for got in after:
        np.testing.assert_allclose(got, reference, atol=1e-5)


def test_refitting_an_engine_built_without_refit_says_how_to_build_it(fake_gpu, exported, tmp_path):
    from diffrt.runtime.pipeline import Pipeline

    folder = exported("sd15")
    _build(folder, tmp_path)
    spec, name, _, new, _ = _unet_weight(folder)
    with Pipeline.load(folder, backend="tensorrt", cache_dir=tmp_path) as pipe:
        with pytest.raises(DiffrtError) as info:
            pipe.models["unet"].update_weights({name: new})
        with pytest.raises(DiffrtError, match="no initializer 'nope'"):
            pipe.models["unet"].update_weights({"nope": new})
    assert "--refittable" in str(info.value) and "\n" not in str(info.value)


def test_a_foreign_timing_cache_is_not_blamed_for_a_later_failure(fake_gpu, exported, tmp_path):
    from diffrt.build.tensorrt import TIMING_CACHE_NAME

    import fake_gpu as fakes

    timing = tmp_path / "tensorrt" / TIMING_CACHE_NAME
    timing.parent.mkdir(parents=True)
    timing.write_bytes(b"a timing cache from another GPU")
    fake_gpu.fail_build = True  # a build that fails without TensorRT logging why
    with pytest.raises(DiffrtError) as info:
        _build(exported("sd15"), tmp_path)
    assert "could not build stage" in str(info.value) and "see the log above" in str(info.value)
    assert "different device" not in str(info.value)
    fake_gpu.fail_build = False
    assert len(_build(exported("sd15"), tmp_path)) == 3
    assert timing.read_bytes() == fakes.TIMING_CACHE  # replaced by this GPU's


@pytest.mark.parametrize("has_flag", [True, False])
def test_networks_are_strongly_typed_while_the_flag_exists(monkeypatch, exported, tmp_path, has_flag):
    """TensorRT 11 deprecates NetworkDefinitionCreationFlag.STRONGLY_TYPED (kSTRONGLY_TYPED = 0
    in NvInfer.h; every network is strongly typed); a release without it must still build."""
    import fake_gpu as fakes

    record = fakes.install(monkeypatch, strongly_typed_flag=has_flag)
    assert len(_build(exported("sd15"), tmp_path)) == 3
    assert set(record.network_flags) == ({1 << 0} if has_flag else {0})


def test_gpu_check_runs_tensorrt_at_the_size_it_builds_engines_for(fake_gpu, exported, tmp_path):
    """gpu_check builds engines for 128x128, twice the tiny model's default size: the
    pipeline must be prepared for that size, not load for the default and refuse it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    folder = copy_artifact(exported("sd15"), tmp_path / "artifact")  # gpu_check builds into OUT/engines
    baseline = gpu_check.Variant("ort", "ort", {"attention": "portable", "disk_cache": False})
    tensorrt = next(v for v in gpu_check.GPU_VARIANTS if v.label == "tensorrt")
    report = gpu_check.Report(tmp_path / "out", {"models": {}})
    result = gpu_check.check_model("tiny", folder, [baseline, tensorrt], [(3, 7.5)], 128, "cpu",
                                   gpu_check.Budget(None), report)
    entry = result["backends"]["tensorrt"]
    assert entry["status"] == "ok", entry
    assert entry["3steps"]["max_abs_diff_vs_torch"] < 1e-6  # the same graphs, through TensorRT's addresses
