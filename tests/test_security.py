"""Tampering with an artifact, with real edited files (issue 15, items 7-10): an altered
engine cache entry never runs, a forged or copied verification record is not trusted,
manifest paths cannot leave the artifact folder, and a file the manifest does not list
cannot change what the runtime reads. Each attack is first shown to work on the
unprotected path (the altered file really changes the output), so that a test passing
means the protection held, not that the attack was a no-op."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import copy_artifact

from diffrt.artifacts import STAMPS_NAME, read_manifest
from diffrt.errors import ArtifactError
from diffrt.runtime.pipeline import Pipeline
from diffrt.stamps import STAMP_KEY_ENV, stat_stamp
from diffrt.verification import verify_files

CALL = {"prompt": "a red cat", "num_inference_steps": 2, "seed": 0, "output_type": "np"}


@pytest.fixture()
def artifact(exported, tmp_path):
    return copy_artifact(exported("sd15"), tmp_path / "art")


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffrt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def generate(folder, **load):
    with Pipeline.load(folder, **load) as pipe:
        return pipe(**CALL).images


def ort_entry(folder, stage):
    """The engines/ort/<key>/ entry built for `stage`."""
    for entry in (folder / "engines" / "ort").iterdir():
        if json.loads((entry / "meta.json").read_text())["fields"]["stage"] == stage:
            return entry
    raise AssertionError(f"no ort entry for {stage}")


def negate_largest_weight(graph):
    """Flip the sign of the largest-magnitude float of the graph's largest float
    initializer, in place: a valid graph of exactly the same size, one weight changed."""
    model = onnx.load(str(graph), load_external_data=False)
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and t.raw_data]
    tensor = max(weights, key=lambda t: len(t.raw_data))
    values = np.frombuffer(tensor.raw_data, np.float32)
    data = bytearray(graph.read_bytes())
    start = data.find(tensor.raw_data)
    assert start >= 0 and data.find(tensor.raw_data, start + 1) < 0
    data[start + 4 * int(np.argmax(np.abs(values))) + 3] ^= 0x80  # the sign bit (little-endian float32)
    size = graph.stat().st_size
    graph.write_bytes(bytes(data))
    assert graph.stat().st_size == size


def run_graph(graph, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


UNET_FEEDS = {"sample": np.random.default_rng(0).standard_normal((2, 4, 32, 32), dtype=np.float32),
              "timestep": np.array([10.0, 700.0], np.float32),
              "encoder_hidden_states": np.random.default_rng(1).standard_normal((2, 77, 32), dtype=np.float32)}


# -- 7. engine cache entries are verified like the artifact's own files ------------------

@pytest.mark.parametrize("verify", ["stamp", "full"])
def test_a_same_size_altered_ort_graph_never_runs(artifact, tmp_path, caplog, verify):
    expected = generate(artifact, disk_cache=False)  # the artifact's own graphs, no cache involved
    generate(artifact)  # builds the engines/ort entries (and stamps them)
    graph = ort_entry(artifact, "unet-fused") / "model.onnx"
    original = shutil.copy(graph, tmp_path / "original.onnx")
    negate_largest_weight(graph)
    assert not np.allclose(run_graph(graph, UNET_FEEDS), run_graph(original, UNET_FEEDS), atol=1e-4)  # it bites
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        got = generate(artifact, verify=verify)
    assert "does not match its sha256 in meta.json" in caplog.text and "rebuilding" in caplog.text
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_verify_full_hashes_engines_that_stamps_vouch_for(artifact, monkeypatch):
    import diffrt.runtime.engine_cache as engine_cache

    generate(artifact)  # entries published and stamped
    hashed = []
    real = engine_cache.sha256_file
    monkeypatch.setattr(engine_cache, "sha256_file", lambda path, *a: hashed.append(path) or real(path, *a))
    generate(artifact)
    assert hashed == []  # stamped at publish: the default load reads no engine twice
    generate(artifact, verify="full")
    entries = {p.parent.name for p in hashed}
    assert len(entries) == 3 and all(p.parent.parent.name == "ort" for p in hashed)  # text, unet, vae entries


def test_an_altered_openvino_blob_is_never_imported(exported, tmp_path, monkeypatch):
    from diffrt.runtime.backends import get_backend
    from diffrt.runtime.backends import openvino as ovb

    folder, spec = exported("sd15"), read_manifest(exported("sd15")).stage("unet")
    profile = {"batch": 2, "latent_height": 32, "latent_width": 32}

    def open_unet():
        return get_backend("openvino", precision="fp32", cache_dir=tmp_path).open(folder, spec,
                                                                                  profile=profile).context()

    expected = open_unet().run(UNET_FEEDS)["out_sample"]
    blob = next((tmp_path / "openvino").iterdir()) / "model.blob"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    imported = []
    real = ovb.import_blob
    monkeypatch.setattr(ovb, "import_blob", lambda core, path, config: imported.append(path) or real(core, path, config))
    np.testing.assert_array_equal(open_unet().run(UNET_FEEDS)["out_sample"], expected)
    assert imported == []  # recompiled, never imported the altered blob
    assert open_unet().run(UNET_FEEDS)["out_sample"].shape == expected.shape and len(imported) == 1  # rebuilt entry


def test_an_altered_tensorrt_engine_is_not_found(exported, tmp_path):
    """TensorRT engines are looked up through the same cache (no GPU needed to check that)."""
    from diffrt.build.tensorrt import plan_build
    from diffrt.runtime.engine_cache import EngineCache
    from diffrt.runtime.tensorrt_engines import (ENGINE_NAME, PROFILE_NAME, BuildOptions, GpuInfo, engine_fields,
                                                 engine_key, find_engines)

    plan = plan_build(exported("sd15"), batch="1")
    spec, profile, gpu = plan.specs["unet"], plan.profiles["unet"], GpuInfo("NVIDIA H200", "9.0")
    cache = EngineCache(tmp_path, "tensorrt")

    def write(folder):
        (folder / ENGINE_NAME).write_bytes(b"serialized engine")
        (folder / PROFILE_NAME).write_text(json.dumps(profile.to_json()))

    entry = cache.publish(engine_key(spec, profile, "11.4.0", gpu, BuildOptions()),
                          engine_fields(spec, profile, "11.4.0", gpu, BuildOptions()), write)
    assert [e.path for e in find_engines(cache, spec, "11.4.0", gpu)] == [entry]
    (entry / ENGINE_NAME).write_bytes(b"serialized ENGINE")  # same size
    assert find_engines(cache, spec, "11.4.0", gpu) == [] and not entry.exists()


def test_inspect_verify_checks_engines(artifact):
    generate(artifact)
    healthy = cli("inspect", artifact, "--verify")
    assert healthy.returncode == 0 and "engines: 3 cache entries" in healthy.stdout, healthy.stderr
    negate_largest_weight(ort_entry(artifact, "unet-fused") / "model.onnx")
    assert cli("inspect", artifact).returncode == 0  # sizes only
    line = error_line(cli("inspect", artifact, "--verify"))
    assert "1 of 3 engine cache entries" in line and "model.onnx does not match its sha256 in meta.json" in line


# -- 8. verification stamps cannot be forged or copied --------------------------------------

def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_forged_stamp_is_not_trusted(artifact):
    stamps = artifact / "engines" / STAMPS_NAME
    manifest = read_manifest(artifact)
    verify_files(artifact, manifest, "stamp", stamps_path=stamps)
    graph = artifact / "unet-fused" / "model.onnx"
    flip_a_byte(graph)
    # the attacker rewrites the record to describe the changed file (what used to pass)
    record = json.loads(stamps.read_text())
    record["unet-fused/model.onnx"]["stat"] = stat_stamp(graph)
    stamps.write_text(json.dumps(record))
    with pytest.raises(ArtifactError, match="unet-fused/model.onnx does not match its sha256"):
        verify_files(artifact, manifest, "stamp", stamps_path=stamps)
    with pytest.raises(ArtifactError, match="unet-fused/model.onnx does not match its sha256"):
        Pipeline.load(artifact)


def _count_hashes(monkeypatch):
    import diffrt.verification as verification

    hashed = []
    real = verification.sha256_file
    monkeypatch.setattr(verification, "sha256_file", lambda path, *a: hashed.append(path) or real(path, *a))
    return hashed


def test_stamps_made_under_another_key_are_not_trusted(artifact, tmp_path, monkeypatch):
    """A record copied from another machine or account, or made with the attacker's own key."""
    stamps = artifact / "engines" / STAMPS_NAME
    manifest = read_manifest(artifact)
    monkeypatch.setenv(STAMP_KEY_ENV, str(tmp_path / "their.key"))
    verify_files(artifact, manifest, "stamp", stamps_path=stamps)
    monkeypatch.setenv(STAMP_KEY_ENV, str(tmp_path / "our.key"))
    hashed = _count_hashes(monkeypatch)
    verify_files(artifact, manifest, "stamp", stamps_path=stamps)
    assert len(hashed) == len(manifest.all_files())  # nothing trusted
    hashed.clear()
    verify_files(artifact, manifest, "stamp", stamps_path=stamps)
    assert hashed == []  # now stamped under our key


def test_the_key_is_private_and_a_shared_key_switches_stamps_off(artifact, tmp_path, monkeypatch, caplog):
    key = tmp_path / "keys" / "stamp.key"
    monkeypatch.setenv(STAMP_KEY_ENV, str(key))
    stamps = artifact / "engines" / STAMPS_NAME
    manifest = read_manifest(artifact)
    verify_files(artifact, manifest, "stamp", stamps_path=stamps)
    assert key.stat().st_size == 32 and key.stat().st_mode & 0o777 == 0o600
    key.chmod(0o644)  # readable by every account: anyone could forge stamps with it
    hashed = _count_hashes(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        verify_files(artifact, manifest, "stamp", stamps_path=stamps)
    assert len(hashed) == len(manifest.all_files())
    assert f"verification stamps are off: {key}" in caplog.text and "chmod 600" in caplog.text


def test_stamps_of_earlier_versions_are_hashed_once_again(artifact, monkeypatch):
    """verified.json as diffrt wrote it before stamps had a MAC: trusted after one hash."""
    stamps = artifact / "engines" / STAMPS_NAME
    manifest = read_manifest(artifact)
    old = {r.path: {"stat": stat_stamp(artifact / r.path), "sha256": r.sha256} for r in manifest.all_files()}
    stamps.parent.mkdir()
    stamps.write_text(json.dumps(old))
    hashed = _count_hashes(monkeypatch)
    verify_files(artifact, manifest, "stamp", stamps_path=stamps)
    assert len(hashed) == len(manifest.all_files())
    hashed.clear()
    verify_files(artifact, manifest, "stamp", stamps_path=stamps)
    assert hashed == []


# -- 9. manifest paths stay inside the artifact folder ----------------------------------------

def _point_unet_at(artifact, path, record=None):
    data = json.loads((artifact / "manifest.json").read_text())
    entry = data["stages"]["unet"]["files"][0]
    entry["path"] = path
    if record is not None:
        entry.update(size=record.stat().st_size)
    (artifact / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("where", ["parent", "absolute", "inner-dotdot"])
def test_paths_outside_the_folder_are_refused(artifact, tmp_path, where):
    # a perfect copy outside, with the recorded size and hash: only its place is wrong
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(artifact / "unet" / "model.onnx", outside / "model.onnx")
    path = {"parent": "../outside/model.onnx", "absolute": str(outside / "model.onnx"),
            "inner-dotdot": "unet/../../outside/model.onnx"}[where]
    _point_unet_at(artifact, path)
    with pytest.raises(ArtifactError, match=r"entry stages\.unet\.files\[0\]\.path = .* (absolute|plain relative)"):
        read_manifest(artifact)
    line = error_line(cli("inspect", artifact))
    assert "stages.unet.files[0].path" in line


def test_a_system_file_is_neither_read_nor_described(artifact):
    _point_unet_at(artifact, "/etc/passwd")
    line = error_line(cli("inspect", artifact, "--verify"))
    assert "stages.unet.files[0].path = '/etc/passwd' is an absolute path" in line
    assert f"{os.path.getsize('/etc/passwd')} bytes" not in line


@pytest.mark.parametrize("linked", ["unet-fused", "tokenizer", "scheduler/scheduler_config.json"])
def test_links_out_of_the_folder_are_refused(artifact, tmp_path, linked):
    # the link leads to an identical copy: hashes match, only the link is wrong
    target = tmp_path / "elsewhere" / linked
    target.parent.mkdir(parents=True)
    shutil.move(artifact / linked, target)
    os.symlink(target, artifact / linked)
    with pytest.raises(ArtifactError, match=f"entry .*{linked.split('/')[0]}.*is a symbolic link"):
        Pipeline.load(artifact)
    assert "is a symbolic link" in error_line(cli("inspect", artifact))


def test_a_linked_manifest_is_refused(artifact, tmp_path):
    shutil.move(artifact / "manifest.json", tmp_path / "manifest.json")
    os.symlink(tmp_path / "manifest.json", artifact / "manifest.json")
    with pytest.raises(ArtifactError, match="manifest.json is a symbolic link"):
        read_manifest(artifact)


def test_the_scheduler_config_is_read_inside_the_folder_only(artifact, tmp_path):
    """The CLI reads it to check a request before loading (before any verification)."""
    from diffrt.runtime.request import read_scheduler_config

    config = artifact / "scheduler" / "scheduler_config.json"
    os.replace(config, tmp_path / "config.json")
    os.symlink("/etc/passwd", config)
    with pytest.raises(ArtifactError, match="is a symbolic link"):
        read_scheduler_config(artifact)


# -- 10. files the manifest does not list are not read -----------------------------------------

def test_an_added_tokenizer_file_is_refused(artifact):
    from diffrt.runtime.tokenizers import CLIPTokenizer

    before = CLIPTokenizer.from_dir(artifact / "tokenizer")(["a red cat"])
    (artifact / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))
    after = CLIPTokenizer.from_dir(artifact / "tokenizer")(["a red cat"])
    assert not np.array_equal(before, after)  # the file changes what the text encoder sees
    with pytest.raises(ArtifactError, match=r"tokenizer/special_tokens_map\.json is not listed in manifest\.json"):
        Pipeline.load(artifact)
    assert "special_tokens_map.json is not listed" in error_line(cli("inspect", artifact))


def test_every_file_the_runtime_reads_is_in_the_manifest(artifact, monkeypatch):
    """Whatever the tokenizer and scheduler readers open is a listed file (spied on open)."""
    import builtins
    import io

    listed = {str(artifact / r.path) for r in read_manifest(artifact).all_files()}
    opened = []
    real_open, real_io_open = builtins.open, io.open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)  # pathlib's read_text
    with Pipeline.load(artifact, verify="size", disk_cache=False) as pipe:
        pipe(**CALL)
    inside = {p for p in opened if p.startswith(str(artifact) + os.sep)}
    assert any("tokenizer" in p for p in inside) and any("scheduler" in p for p in inside)
    assert inside <= listed | {str(artifact / "manifest.json")}, inside - listed


def test_a_manifest_that_records_no_scheduler_files_still_loads(artifact, caplog):
    """Decided: a folder the runtime reads that the manifest records nothing of (diffrt
    always recorded them; a hand-made manifest may not) is read unverified, with a warning."""
    data = json.loads((artifact / "manifest.json").read_text())
    del data["components"]["scheduler"]
    (artifact / "manifest.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="diffrt"):
        images = generate(artifact)
    assert images.shape == (1, 64, 64, 3)
    assert "records no files of scheduler/: they are read unverified" in caplog.text
