"""Compiled models and contexts (backends/base.py): contexts of one model run at the
same time on one copy of the weights, `Pipeline.worker()` views share the models, and
`update_weights` gives what the same graph computes with the new values written into
its file (the oracle: onnx edits a copy of the graph, a fresh session runs it)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import copy_artifact

from diffrt.artifacts import read_manifest
from diffrt.errors import DiffrtError
from diffrt.runtime.backends import get_backend
from diffrt.runtime.backends.initializers import read_initializers, read_values
from diffrt.runtime.pipeline import Pipeline

onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402

BACKENDS = [("ort", {}), ("ort", {"io_binding": True}), ("openvino", {"precision": "fp32"})]
IMAGE = dict(num_inference_steps=2, height=64, width=64, scheduler="euler", output_type="np")


def _unet_feeds(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, 4, 32, 32), dtype=np.float32),
            "timestep": np.full((batch,), 10.0 + 100 * seed, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, 32), dtype=np.float32)}


def _backend(name, options, **more):
    if name == "openvino":
        pytest.importorskip("openvino")
    return get_backend(name, disk_cache=False, **options, **more)


def _edited(folder, stage, values, tmp_path):
    """A copy of the artifact whose `stage` graph has `values` written into it."""
    copy = copy_artifact(folder, tmp_path / "edited")
    path = copy / read_manifest(copy).stage(stage).graph_path
    model = onnx.load(str(path))
    for initializer in model.graph.initializer:
        if initializer.name in values:
            initializer.CopyFrom(numpy_helper.from_array(values[initializer.name], initializer.name))
    onnx.save(model, str(path))
    return copy


def _initializer_kinds(path):
    """One float initializer per (op type, input position) that reads one: a Conv's
    weight and bias, a MatMul's or Gemm's weight, a norm's scale, ..., and its new value."""
    model = onnx.load(str(path))
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    chosen = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            array = values.get(name)
            if array is not None and array.dtype == np.float32 and array.size > 1:
                chosen.setdefault((node.op_type, position), name)
    return {name: (values[name] * -1.5 + 0.01).astype(np.float32) for name in chosen.values()}


# -- contexts ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "options"), BACKENDS)
def test_contexts_of_one_model_run_at_once_and_compute_what_one_computes_alone(exported, name, options):
    folder = exported("sd15")
    spec = read_manifest(folder).stage("unet")
    model = _backend(name, options).open(folder, spec, profile={"batch": 2, "latent_height": 32, "latent_width": 32})
    feeds = [_unet_feeds(seed) for seed in range(6)]
    alone = model.context()
    expected = [alone.run(f)["out_sample"] for f in feeds]
    meet, got = threading.Barrier(2, timeout=60), {}

    def work(index):
        context = model.context()
        meet.wait()  # both start together, each on its own context
        got[index] = [context.run(f)["out_sample"] for f in feeds[index::2]]
        context.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(got) == [0, 1]
    for index in (0, 1):
        for out, want in zip(got[index], expected[index::2], strict=True):
            np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(alone.run(feeds[0])["out_sample"], expected[0])  # others' close left it working
    model.close()
    with pytest.raises(DiffrtError, match="closed"):
        alone.run(feeds[0])


@pytest.mark.parametrize(("name", "options"), BACKENDS)
def test_a_worker_shares_the_models_and_gives_the_same_images(exported, name, options, monkeypatch):
    pipe = Pipeline.load(exported("sd15"), backend=name, workers=2, **options)
    opened = []
    monkeypatch.setattr(type(pipe.backend), "open", lambda *a, **k: opened.append(a) or pytest.fail("opened"))
    worker = pipe.worker()
    assert opened == [] and dict(worker.models) == dict(pipe.models)
    np.testing.assert_array_equal(worker("a cat", seed=3, **IMAGE).images, pipe("a cat", seed=3, **IMAGE).images)
    worker.close()  # its contexts only
    assert pipe("a dog", seed=1, **IMAGE).images.shape == (1, 64, 64, 3)
    other = pipe.worker()
    pipe.close()  # the models: its workers fail with a one-line error
    with pytest.raises(DiffrtError, match="closed"):
        other("a cat", seed=3, **IMAGE)


def test_openvino_compiles_one_stream_per_worker(exported):
    pytest.importorskip("openvino")
    for workers in (1, 2):
        with Pipeline.load(exported("sd15"), backend="openvino", precision="fp32", workers=workers,
                           disk_cache=False) as pipe:
            compiled = next(iter(pipe.models["unet"].compiled_models().values()))
            assert compiled.get_property("NUM_STREAMS") == workers  # as OpenVINO reports it
    assert get_backend("openvino", workers=2, num_streams=3).settings.num_streams == 3  # an explicit one wins
    with pytest.raises(DiffrtError, match="workers must be an integer >= 1"):
        Pipeline.load(exported("sd15"), workers=0)


# -- update_weights ---------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "options"), [b for b in BACKENDS if not b[1].get("io_binding")])
@pytest.mark.parametrize("stage", ["unet-fused", "unet", "vae_decoder", "text_encoder"])
def test_each_kind_of_initializer_takes_its_new_value(exported, tmp_path, name, options, stage):
    """For one initializer of each (op, input) kind in the graph (for ORT, Conv weights
    are the ones its NchwcTransformer would have kept), the stage computes with the
    new value exactly what the graph with that value written in computes (ORT: within
    1e-5, its blocked Conv layout is off for a session with new weights)."""
    folder = exported("sd15")
    manifest = read_manifest(folder)
    spec = manifest.stage(stage)
    if name == "openvino" and stage not in ("unet", "vae_decoder"):
        pytest.skip("OpenVINO: the UNet and the VAE hold every kind of initializer use (each one compiles twice)")
    kinds = _initializer_kinds(folder / spec.graph_path)
    feeds = {"unet": _unet_feeds(1), "vae_decoder": {"latent_sample": _unet_feeds(2)["sample"][:1]},
             "text_encoder": {"input_ids": np.random.default_rng(3).integers(0, 99, (2, 77)).astype(np.int64)}}
    feeds = feeds[spec.role]
    output = spec.outputs[0].name
    model = _backend(name, options).open(folder, spec)
    context = model.context()
    before = context.run(feeds)[output]
    tolerance = 1e-5 if name == "ort" else 0.0
    for initializer, value in kinds.items():
        model.update_weights({initializer: value})
        edited = _edited(folder, stage, {initializer: value}, tmp_path / initializer.replace("/", "_"))
        want = _backend(name, options).open(edited, spec).context().run(feeds)[output]
        np.testing.assert_allclose(context.run(feeds)[output], want, rtol=0, atol=tolerance, err_msg=initializer)
        model.update_weights({initializer: numpy_helper.to_array(_initializer(folder / spec.graph_path, initializer))})
    assert len(kinds) >= 3, kinds
    np.testing.assert_allclose(context.run(feeds)[output], before, rtol=0, atol=tolerance)  # all put back


def _initializer(path, name):
    return next(i for i in onnx.load(str(path)).graph.initializer if i.name == name)


@pytest.mark.parametrize(("name", "options"), [("ort", {}), ("openvino", {"precision": "fp32"})])
def test_updates_add_up_reach_every_worker_and_equal_the_edited_artifact(exported, tmp_path, name, options):
    folder = exported("sd15")
    spec = read_manifest(folder).stage("unet")
    kinds = list(_initializer_kinds(folder / spec.graph_path).items())[:2]
    edited = _edited(folder, "unet", dict(kinds), tmp_path)
    with Pipeline.load(edited, backend=name, attention="portable", verify=False, **options) as reference:
        want = reference("a cat", seed=5, **IMAGE).images
    with Pipeline.load(folder, backend=name, attention="portable", workers=2, **options) as pipe:
        worker = pipe.worker()
        before = worker("a cat", seed=5, **IMAGE).images
        for initializer, value in kinds:  # one at a time: the second keeps the first
            pipe.models["unet"].update_weights({initializer: value})
        got = [p("a cat", seed=5, **IMAGE).images for p in (pipe, worker)]
        worker.close()
    assert float(np.abs(before - want).max()) > 1e-3  # the new weights matter
    for images in got:
        np.testing.assert_allclose(images, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("name", "options"), [("ort", {}), ("openvino", {"precision": "fp32"})])
def test_wrong_weights_are_one_line_errors_and_change_nothing(exported, name, options):
    folder = exported("sd15")
    spec = read_manifest(folder).stage("unet")
    model = _backend(name, options).open(folder, spec)
    context = model.context()
    before = context.run(_unet_feeds())["out_sample"]
    weight = next(iter(_initializer_kinds(folder / spec.graph_path)))
    shape = read_initializers(folder / spec.graph_path)[weight].shape
    for weights, needle in (({"nope": np.zeros(3, np.float32)}, "has no initializer 'nope'"),
                            ({weight: np.zeros((1, *shape), np.float32)}, "the new value [1, "),
                            ({weight: np.zeros(shape, np.float16)}, "is float32, the new value float16"),
                            ({}, "no weights")):
        with pytest.raises(DiffrtError) as info:
            model.update_weights(weights)
        assert needle in str(info.value) and "\n" not in str(info.value)
    np.testing.assert_array_equal(context.run(_unet_feeds())["out_sample"], before)


def test_the_torch_backend_says_it_does_not_update_weights(exported):
    pytest.importorskip("torch")
    backend = get_backend("torch")
    assert backend.updates_weights is False
    spec = read_manifest(exported("sd15")).select("unet", "default", "fp32")
    with pytest.raises(DiffrtError, match="source checkpoint's modules"):
        backend.open(exported("sd15"), spec).update_weights({"x": np.zeros(1, np.float32)})


# -- the initializer table, read without onnx ------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_initializers_are_read_as_onnx_reads_them(exported, tmp_path, kind):
    """Names, shapes and dtypes of every initializer of every graph (fp32, fp16, bf16 and
    fused variants), and their values, inline and in an external data file."""
    folder = exported(kind)
    manifest = read_manifest(folder)
    for spec in manifest.stages.values():
        path = folder / spec.graph_path
        model = onnx.load(str(path))
        expected = {i.name: (tuple(i.dims), onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name
                             if i.data_type != onnx.TensorProto.BFLOAT16 else "bfloat16")
                    for i in model.graph.initializer}
        table = read_initializers(path)
        assert {n: (i.shape, i.dtype) for n, i in table.items()} == expected, spec.name
    spec = manifest.stage("unet")
    model = onnx.load(str(folder / spec.graph_path))
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    external = tmp_path / "external" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(model, str(external), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    for path in (folder / spec.graph_path, external):
        read = read_values(path, list(values))
        assert all(np.array_equal(read[n], values[n]) for n in values)
