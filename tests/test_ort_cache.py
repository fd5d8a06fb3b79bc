"""The ORT backend's optimized-graph cache: the first session saves ORT's optimized
graph under engines/ort/<key>; later ones load it with optimizations off."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import copy_artifact

from diffrt.artifacts import read_manifest
from diffrt.runtime.backends import get_backend
from diffrt.runtime.backends import ort as ort_backend


def _feeds(rng=np.random.default_rng(0)):
    return {"sample": rng.standard_normal((2, 4, 12, 20), dtype=np.float32),
            "timestep": np.array([10.0, 700.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}


@pytest.fixture()
def artifact(exported, tmp_path):
    return copy_artifact(exported("sd15"), tmp_path / "art")


@pytest.fixture()
def opened(monkeypatch):
    """Records (graph path, optimization level) of every ORT session created."""
    seen = []
    real = ort_backend.create_session

    def spy(path, spec, providers, options, *args):
        seen.append((str(path), options.graph_optimization_level))
        return real(path, spec, providers, options, *args)

    monkeypatch.setattr(ort_backend, "create_session", spy)
    return seen


def test_second_open_loads_the_optimized_graph(artifact, opened):
    spec = read_manifest(artifact).stage("unet-fused")
    feeds = _feeds()
    first = get_backend("ort").open(artifact, spec).context().run(feeds)["out_sample"]
    entries = list((artifact / "engines" / "ort").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.onnx").is_file() and (entries[0] / "meta.json").is_file()
    second = get_backend("ort").open(artifact, spec).context().run(feeds)["out_sample"]
    assert opened[0] == (str(artifact / spec.graph_path), ort_backend.ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert opened[1] == (str(entries[0] / "model.onnx"), ort_backend.ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_array_equal(first, second)
    uncached = get_backend("ort", disk_cache=False).open(artifact, spec).context().run(feeds)["out_sample"]
    np.testing.assert_array_equal(first, uncached)


def test_cache_key_covers_what_changes_the_graph(artifact, monkeypatch):
    spec = read_manifest(artifact).stage("unet")
    backend = get_backend("ort")
    base = ort_backend.cache_key(backend.cache_fields(spec))
    other_file = spec.__class__(**{**spec.__dict__, "files": (spec.files[0].__class__(
        spec.files[0].path, spec.files[0].size, "0" * 64),)})
    assert ort_backend.cache_key(backend.cache_fields(other_file)) != base
    monkeypatch.setattr(ort_backend.ort, "__version__", "0.0.1")
    assert ort_backend.cache_key(backend.cache_fields(spec)) != base
    monkeypatch.undo()
    from diffrt.runtime.cpu import CpuInfo

    monkeypatch.setattr(ort_backend, "cpu_info", lambda: CpuInfo("Other CPU", frozenset({"avx2"}), 2, "x86_64"))
    assert ort_backend.cache_key(backend.cache_fields(spec)) != base


def test_damaged_entry_is_rebuilt(artifact, opened, caplog):
    spec = read_manifest(artifact).stage("unet")
    feeds = _feeds()
    expected = get_backend("ort").open(artifact, spec).context().run(feeds)["out_sample"]
    entry = next((artifact / "engines" / "ort").iterdir())
    graph = entry / "model.onnx"
    graph.write_bytes(b"\0" * graph.stat().st_size)  # same size: only loading notices
    got = get_backend("ort").open(artifact, spec).context().run(feeds)["out_sample"]
    np.testing.assert_array_equal(got, expected)
    assert "unusable" in caplog.text and "rebuilding" in caplog.text
    assert opened[-1][1] == ort_backend.ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # optimized again
    assert graph.stat().st_size > 0 and graph.read_bytes()[:4] != b"\0\0\0\0"


def test_unwritable_cache_root_still_runs(artifact, caplog):
    (artifact / "blocked").write_text("a file where the cache folder would be")
    spec = read_manifest(artifact).stage("text_encoder")
    session = get_backend("ort", cache_dir=artifact / "blocked" / "engines").open(artifact, spec).context()
    out = session.run({"input_ids": np.zeros((1, 77), np.int64)})
    assert out["last_hidden_state"].shape == (1, 77, 32)
    assert "cannot be written" in caplog.text


def test_external_data_graph_round_trips(tiny_checkpoint, tmp_path, monkeypatch, opened):
    """A UNet over 2 GB: the optimized graph is saved with one external-data file too."""
    from diffrt.export import export, onnx_graph

    monkeypatch.setattr(onnx_graph, "_PROTOBUF_LIMIT", 0)
    out = tmp_path / "ext"
    export(tiny_checkpoint("sd15"), out)
    spec = read_manifest(out).stage("unet-fused")
    assert len(spec.files) == 2
    feeds = _feeds()
    first = get_backend("ort").open(out, spec).context().run(feeds)["out_sample"]
    entry = next((out / "engines" / "ort").iterdir())
    assert (entry / "model.onnx.data").stat().st_size > (entry / "model.onnx").stat().st_size
    second = get_backend("ort").open(out, spec).context().run(feeds)["out_sample"]
    assert opened[-1][1] == ort_backend.ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    np.testing.assert_array_equal(first, second)
