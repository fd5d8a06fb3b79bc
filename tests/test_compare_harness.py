"""benchmarks/compare.py end to end on the tiny checkpoints.

On the SD1.5 one, with no peer venv installed, the harness must: give diffrt-ort numbers
for every cell, report every peer as "not installed", report diffrt configurations this
diffrt cannot run as "not available: ...", alternate the runners round-robin, feed every
runner the same work (checked: on the deterministic DPM++ 2M workload diffrt-ort's image
equals diffusers' within 1e-4), and write JSON + markdown (+ PNG when matplotlib is
installed). Also checks that the FLOP
counts (on meta tensors) equal a count of the real modules run on CPU with attention
forced through the math path, which FlopCounterMode can see.

The SDXL workload (W3-512, the sdxl-lightning-4step recipe) runs on the tiny SDXL
checkpoint with diffrt-ort and diffusers-fp32, plus optimum-onnx and optimum-intel where
their venvs exist (`bash benchmarks/peers/setup.sh`; CI has none): every runner's image
must equal diffusers' within the same 1e-4 (5e-2 for a runner whose OpenVINO computes in
bf16, its default on a CPU with bf16 instructions). The SD3 workload (W4-512) likewise,
on a tiny SD3 saved without T5, with optimum-intel-static too where its venv exists (its
transformer is reshaped by hand for a call without CFG).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffrt.runtime.cpu import cpu_info

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
RUNNERS = ("diffrt-ort", "diffrt-openvino-tiny-vae", "diffusers-fp32", "diffusers-bf16", "optimum-onnx",
           "optimum-intel", "optimum-intel-static", "diffusers-deepcache", "optimum-intel-int8")
PEERS = ("optimum-onnx", "optimum-intel", "optimum-intel-static", "diffusers-deepcache", "optimum-intel-int8")
CELLS = {"W1-256/b1": (1, 4), "W1-256/b4": (4, 4), "W2-256/b1": (1, 20)}  # batch, denoiser calls
NOT_INSTALLED = "not installed (run bash benchmarks/peers/setup.sh)"
VENVS = Path(os.environ.get("DIFFRT_BENCH_VENVS", Path.home() / ".cache" / "diffrt-bench" / "venvs"))
# The peers' SDXL pipelines, where their venvs are installed. Each first makes its own export
# (optimum-intel's: about a minute on 2 cores), so optimum-intel-static, which would add its
# own load and warm start, is left to the real benchmark.
SDXL_PEERS = tuple(peer for peer in ("optimum-onnx", "optimum-intel") if (VENVS / peer / "bin" / "python").exists())
SDXL_RUNNERS = ("diffrt-ort", "diffusers-fp32", *SDXL_PEERS)
PIPELINES = {"diffusers-fp32": "StableDiffusionXLPipeline", "optimum-onnx": "ORTStableDiffusionXLPipeline",
             "optimum-intel": "OVStableDiffusionXLPipeline"}
# SD3 (W4-512, no CFG): the same peers, plus the statically reshaped optimum-intel, whose
# transformer this harness reshapes itself for a batch without CFG.
SD3_PEERS = (*SDXL_PEERS, *(("optimum-intel-static",) if "optimum-intel" in SDXL_PEERS else ()))
# OpenVINO computes in bf16 where the CPU has bf16 instructions (its default, which the
# optimum-intel runner keeps): bf16 keeps 8 bits of mantissa, so those images get the
# tolerance test_openvino_backend.py uses for diffrt's bf16 OpenVINO runs (diffusers in
# torch bf16 differs from fp32 by 1.4e-2 on its case); a randomly initialised text
# encoder, the mistake this check caught before, differs by 0.25.
BF16_TOLERANCE = 5e-2


def image_tolerance(runner: dict) -> float:
    """1e-4 for an fp32 runner; BF16_TOLERANCE when the runner reports that its compiled
    denoiser computes in bf16 (OpenVINO's own INFERENCE_PRECISION_HINT)."""
    hints = [str(v) for k, v in runner["info"].items() if k.endswith("INFERENCE_PRECISION_HINT")]
    return BF16_TOLERANCE if any("bfloat16" in h for h in hints) else 1e-4


SD3_PIPELINES = {"diffusers-fp32": "StableDiffusion3Pipeline", "optimum-onnx": "ORTStableDiffusion3Pipeline",
                 "optimum-intel": "OVStableDiffusion3Pipeline", "optimum-intel-static": "OVStableDiffusion3Pipeline"}


def _benchmarks_import(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:  # compare.py puts benchmarks/ on the path itself too
        while str(BENCHMARKS) in sys.path:
            sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def report(tiny_checkpoint, exported, tmp_path_factory):
    """One --tiny run of the harness, reusing the session's tiny sd15 checkpoint and export."""
    tmp = tmp_path_factory.mktemp("compare")
    models = tmp / "work" / "tiny"
    models.mkdir(parents=True)
    (models / "checkpoint").symlink_to(tiny_checkpoint("sd15"), target_is_directory=True)
    (models / "artifact").symlink_to(exported("sd15"), target_is_directory=True)
    (tmp / "venvs").mkdir()  # empty: no peer is installed
    results = tmp / "results"
    cmd = [sys.executable, str(BENCHMARKS / "compare.py"), "--tiny", "--workdir", str(tmp / "work"),
           "--results", str(results), "--venv-root", str(tmp / "venvs"), "--runners", ",".join(RUNNERS),
           "--workloads", "W1-256,W2-256", "--runs", "2", "--tag", "test"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((results / "compare-test.json").read_text())
    return data, results, proc


def test_statuses(report):
    data, _, _ = report
    runners = data["runners"]
    assert list(runners) == list(RUNNERS)
    assert runners["diffrt-ort"]["status"] == "ok"
    assert runners["diffusers-fp32"]["status"] == "ok"
    for peer in PEERS:
        assert runners[peer]["status"] == NOT_INSTALLED
        assert runners[peer]["summary"] == {}
    tiny_vae = runners["diffrt-openvino-tiny-vae"]["status"]
    assert tiny_vae.startswith("not available: ") and len(tiny_vae.splitlines()) == 1
    assert runners["diffrt-openvino-tiny-vae"]["summary"] == {}
    if cpu_info().has_bf16:
        assert runners["diffusers-bf16"]["status"] == "ok"
    else:
        assert runners["diffusers-bf16"]["status"] == "not available: CPU has no bf16 instructions"


def test_diffrt_numbers(report):
    data, _, _ = report
    ort = data["runners"]["diffrt-ort"]
    assert set(ort["summary"]) == set(CELLS)
    for key, (batch, calls) in CELLS.items():
        s = ort["summary"][key]
        assert s["runs_done"] >= 1 and s["runs_done"] + len(ort["cells"][key]["skipped"]) == data["settings"]["runs"]
        assert s["errors"] == []
        assert s["e2e_median_seconds"] > 0
        # throughput from what the runner really produced: the images its first run saved
        # (one per requested image) over the median of the raw run times
        made = np.load(ort["cells"][key]["image"]).shape[0]
        assert made == batch
        median = float(np.median([run["seconds"] for run in ort["cells"][key]["runs"]]))
        assert s["images_per_second"] == pytest.approx(made / median, rel=1e-3)
        assert s["denoiser_calls_per_image_run"] == calls
        assert s["text_encoder_median_seconds"] > 0 and s["vae_decoder_median_seconds"] > 0
        assert s["denoiser_call_flops"] > 0 and s["vae_decoder_flops"] > 0
        assert s["denoiser_gflops_per_second"] > 0 and s["vae_gflops_per_second"] > 0
        assert s["denoiser_pct_of_fp32_gemm"] > 0
        for run in ort["cells"][key]["runs"]:
            stages = run["text_encoder_seconds"] + sum(run["denoiser_step_seconds"]) + run["vae_decoder_seconds"]
            # The stages happen inside the timed call; each value is rounded to 0.1 ms on its own.
            rounding = 0.5e-4 * (len(run["denoiser_step_seconds"]) + 3)
            assert stages <= run["seconds"] * 1.001 + rounding
            assert 0 <= run["others_cpu_share"] and run["peak_rss_gib"] > 0
    cold = ort["cold_start"]["empty_cache"]
    # Each of the three is rounded to the millisecond on its own: the sum may be off by up to 1.5 ms.
    assert cold["total_seconds"] >= cold["spawn_to_ready_seconds"] + cold["first_image_seconds"] - 2e-3
    assert cold["spawn_to_ready_seconds"] >= cold["load_seconds"] > 0
    warm = ort["cold_start"]["warm_cache"]  # ORT's optimized graphs, in the harness's cache folder
    assert isinstance(warm, dict) and warm["engine_cache"] == "warm" and warm["total_seconds"] > 0
    assert ort["peak_rss_gib"] > 0 and [p["role"] for p in ort["processes"]] == ["main", "warm-start"]
    assert ort["info"]["backend"].startswith("onnxruntime")


def test_round_robin_and_same_work(report):
    data, _, _ = report
    # diffrt-ort and diffusers-fp32 are alive together (tiny: no memory limit) and alternate run by run.
    assert any({"diffrt-ort", "diffusers-fp32"} <= set(group) for group in data["groups"])
    runs = [(name, run) for name, cell, run in data["sequence"] if cell == "W1-256/b1"]
    by_run = {run: [name for name, r in runs if r == run] for _, run in runs}
    assert {"diffrt-ort", "diffusers-fp32"} <= set(by_run[1]) and {"diffrt-ort", "diffusers-fp32"} <= set(by_run[2])
    positions = {run: [i for i, (_, r) in enumerate(runs) if r == run] for run in by_run}
    assert max(positions[1]) < min(positions[2])  # run 1 of every runner before any run 2
    # DPM++ 2M injects no noise: same latents, same weights -> the same image (design bar 2e-3).
    # LCM draws noise at each step: the peers draw diffrt's (peers/diffusers_api.py), so W1's
    # images agree too (with each runner's own RNG they differed by ~0.5).
    for key in ("W2-256/b1", "W1-256/b1", "W1-256/b4"):
        agreement = data["image_agreement"][key]
        assert agreement["reference"] == "diffusers-fp32"
        assert agreement["max_abs_diff"]["diffrt-ort"] <= 1e-4, key
        # the PSNR column is the saved images' own: recomputed here from the files
        ours, ref = (np.load(data["runners"][n]["cells"][key]["image"]).astype(np.float64)
                     for n in ("diffrt-ort", "diffusers-fp32"))
        mse = float(np.mean((ours - ref) ** 2))
        assert agreement["psnr_db"]["diffrt-ort"] == pytest.approx(10 * np.log10(1 / mse), abs=0.01)
        assert agreement["psnr_db"]["diffrt-ort"] > 60


def test_machine_and_flops_fields(report):
    data, _, _ = report
    cpu = data["machine"]["cpu"]
    assert cpu["model"] and isinstance(cpu["flags"], list) and cpu["has_bf16"] == cpu_info().has_bf16
    gemm = data["gemm"]
    assert gemm["numpy_fp32_gflops"] > 0 and gemm["torch_fp32_gflops"] > 0
    if cpu_info().has_bf16:
        assert gemm["torch_bf16_gflops"] > 0
    else:
        assert gemm["torch_bf16_gflops"] == "not available: CPU has no bf16 instructions"
    assert data["flops"]["unet"] and data["flops"]["vae_decoder"]
    assert data["wall_seconds"]["total"] >= data["wall_seconds"]["measure"] > 0


def test_outputs_written(report):
    data, results, proc = report
    md = (results / "compare-test.md").read_text()
    assert "## W1-256" in md and "## W2-256" in md and "## W1-512" not in md and "## Cold start and memory" in md
    assert NOT_INSTALLED in md and "not available: " in md
    assert md in proc.stdout  # the table is printed too
    png = results / "compare-test.png"
    if importlib.util.find_spec("matplotlib") is None:
        assert not png.exists() and data["chart"].startswith("not drawn")
    else:
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flops_match_a_cpu_count(tiny_checkpoint):
    """Meta-tensor counts == the real tiny modules run on CPU with attention on the math
    path (the fused CPU attention kernel would count 0)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import flops
    finally:
        sys.path.remove(str(BENCHMARKS))
    checkpoint = tiny_checkpoint("sd15")
    counted = flops.count(checkpoint, [(2, 32, 48)], [(1, 32, 48)])
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    vae = AutoencoderKL.from_pretrained(checkpoint / "vae")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    sample = torch.randn(2, 4, 32 // factor, 48 // factor)
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        with FlopCounterMode(display=False) as unet_counter:
            unet(sample, torch.tensor([500.0, 500.0]), text)
        with FlopCounterMode(display=False) as vae_counter:
            vae.decode(sample[:1])
    assert counted["unet"]["b2-48x32"] == unet_counter.get_total_flops() > 0
    assert counted["vae_decoder"]["b1-48x32"] == vae_counter.get_total_flops() > 0


def test_a_worker_that_dies_keeps_the_cells_it_finished(report, tmp_path):
    """A runner killed mid-run (the OOM killer) loses that cell and the ones after it,
    said as such; the cells it finished stay in the report."""
    import copy
    import time
    import types

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from harness import report as report_mod
        from harness import schedule
        from harness.specs import RUNNERS as SPECS
        from harness.specs import WORKLOADS
        from harness.workers import WorkerError
    finally:
        sys.path.remove(str(BENCHMARKS))

    class DyingWorker:
        started, peak_rss_gib, cpu_seconds = time.perf_counter(), 1.0, 1.0
        proc = types.SimpleNamespace(returncode=-9)

        def request(self, request, timeout):
            raise WorkerError("the worker exited with status -9 (SIGKILL: out of memory?)")

        def cpu_seconds_now(self):
            return 0.0

        def close(self):
            pass

    cell = schedule.Cell(WORKLOADS["W2-256"], 1)
    plan = schedule.Plan(cells=[cell], runs=2, cell_budget_s=60, deadline=time.perf_counter() + 60, run_timeout_s=60,
                         memory_gib=None, growth_gib=0, workdir=tmp_path, venv_root=tmp_path, model_dirs={},
                         latents={(256, 256, 1): tmp_path / "latents.npy"}, vae_scale_factor=8, log=lambda _: None)
    state = schedule.RunnerState(SPECS["diffrt-ort"], {"status": "ok", "processes": []}, worker=DyingWorker())
    schedule.run_group(plan, [state])
    assert state.worker is None and state.result["status"] == "ok"
    assert state.result["died"].startswith("W2-256/b1 run 1: the worker exited with status -9")
    assert state.cells["W2-256/b1"]["runs"] == [] and state.cells["W2-256/b1"]["errors"][0]["kind"] == "worker died"
    assert state.result["processes"][0]["exit_status"] == -9

    data = copy.deepcopy(report[0])
    ort = data["runners"]["diffrt-ort"]
    ort["died"] = state.result["died"]
    del ort["summary"]["W2-256/b1"]
    md = report_mod.markdown(data)
    assert "| diffrt-ort | diffrt, onnxruntime CPU, fp32 | partial: the worker died at W2-256/b1 run 1" in md
    assert "| diffrt-ort | 1 | 0 | not run: the worker died at W2-256/b1 run 1" in md
    assert md.count("| diffrt-ort | 1 | 3/") + md.count("| diffrt-ort | 1 | 2/") >= 1  # W1-256/b1 is still there


def test_report_from_an_earlier_json_gives_the_same_summary(report, tmp_path):
    data, results, _ = report
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "compare.py"), "--report-from",
                           str(results / "compare-test.json"), "--results", str(again)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    redone = json.loads((again / "compare-test.json").read_text())
    for name, r in data["runners"].items():
        assert redone["runners"][name]["summary"] == r["summary"]
        assert redone["runners"][name]["decoder"] == ("tiny" if name == "diffrt-openvino-tiny-vae" else "full")
    assert redone["image_agreement"] == data["image_agreement"] and redone["reported_again"]
    assert "summarized again on" in (again / "compare-test.md").read_text()


def test_report_from_a_json_from_before_sdxl(report, tmp_path):
    """Reports written before the SDXL workload have no model name and no preset or
    scheduler_config in their workloads: they are summarized again as SD1.5 runs."""
    data, _, _ = report
    old = json.loads(json.dumps(data))
    del old["model"]["name"]
    del old["settings"]["same_noise"]  # before it, each runner drew LCM's noise from its own RNG
    for workload in old["workloads"]:
        for key in ("model", "preset", "scheduler_config"):
            del workload[key]
    path = tmp_path / "compare-old.json"
    old["mode"] = "old"
    path.write_text(json.dumps(old))
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "compare.py"), "--report-from", str(path),
                           "--results", str(tmp_path / "again")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    redone = json.loads((tmp_path / "again" / "compare-old.json").read_text())
    assert redone["model"]["name"] == "sd15"
    for name, r in data["runners"].items():
        assert redone["runners"][name]["summary"] == r["summary"]
    md = (tmp_path / "again" / "compare-old.md").read_text()
    assert "## W2-256: dpmpp_2m, 20 steps, CFG 7.5, 32x32" in md and "preset" not in md
    assert set(redone["image_agreement"]) == {"W2-256/b1"}  # W1's images are not compared in such a run
    assert "Images are not compared: LCM draws fresh noise" in md


# --- SDXL --------------------------------------------------------------------------------


def test_one_model_per_run_and_its_own_tag():
    compare = _benchmarks_import("compare")
    args = compare.parse_args([])
    assert args.model == "sd15" and args.workload_names == ["W1-256", "W1-512", "W2-256"] and args.tag == "full"
    args = compare.parse_args(["--workloads", "W3-512"])
    assert args.model == "sdxl" and args.workload_names == ["W3-512"] and args.tag == "sdxl"
    assert compare.parse_args(["--workloads", "W3-512", "--tiny"]).tag == "tiny-sdxl"
    assert compare.parse_args(["--workloads", "W3-512", "--runners", "diffrt-ort"]).tag == "sdxl-custom"
    with pytest.raises(SystemExit):
        compare.parse_args(["--workloads", "W1-256,W3-512"])


def test_sdxl_runners_start_one_at_a_time(tmp_path, monkeypatch):
    """The scheduler takes each runner's estimate for the model of the cells: on a 24 GiB
    machine two SD1.5 runners share a group, two SDXL runners (14 GB of weights each) do not."""
    import time

    schedule = _benchmarks_import("harness.schedule")
    specs = _benchmarks_import("harness.specs")
    held = {"sd15": 4.5, "sdxl": 14.0}  # what a live runner holds: its fp32 weights and a little more
    live: list = []

    def fake_start(plan, state, cache):
        state.worker = object()
        live.append(state)
        return {"total_seconds": 1.0}

    def fake_stop(state, role):
        live.remove(state)
        state.worker = None

    monkeypatch.setattr(schedule, "start", fake_start)
    monkeypatch.setattr(schedule, "stop", fake_stop)
    monkeypatch.setattr(schedule, "run_group", lambda plan, group: None)
    monkeypatch.setattr(schedule, "warm_start", lambda plan, state: None)
    groups = {}
    for model, workload in (("sd15", "W1-512"), ("sdxl", "W3-512")):
        monkeypatch.setattr(schedule, "mem_available_gib", lambda model=model: 23.0 - held[model] * len(live))
        plan = schedule.Plan(cells=[schedule.Cell(specs.WORKLOADS[workload], 1)], runs=1, cell_budget_s=60,
                             deadline=time.perf_counter() + 60, run_timeout_s=60, memory_gib=None, growth_gib=2.0,
                             workdir=tmp_path, venv_root=tmp_path, model_dirs={}, latents={}, vae_scale_factor=8,
                             log=lambda _: None)
        states = [schedule.RunnerState(specs.RUNNERS[name], {"status": "ok", "cold_start": {}, "processes": []})
                  for name in ("diffrt-ort", "diffusers-fp32", "optimum-onnx")]
        groups[model] = schedule.run_all(plan, states)
        assert all(s.result["status"] == "ok" for s in states)
    assert groups["sd15"] == [["diffrt-ort", "diffusers-fp32", "optimum-onnx"]]
    assert groups["sdxl"] == [["diffrt-ort"], ["diffusers-fp32"], ["optimum-onnx"]]


def test_a_partial_result_after_each_group_but_the_last(tmp_path, monkeypatch):
    """Runners that go one at a time (SDXL/SD3.5 size: ~10 min each) leave a result after
    each group: the runners done so far as they are, the others "not run yet"; the last
    group leaves none (the final result follows), and the runners' own states are not
    changed by it."""
    import argparse
    import time

    compare = _benchmarks_import("compare")
    schedule = _benchmarks_import("harness.schedule")
    specs = _benchmarks_import("harness.specs")
    prepare = _benchmarks_import("harness.prepare")
    live: list = []

    def fake_start(plan, state, cache):
        state.worker = object()
        live.append(state)
        return {"total_seconds": 1.0}

    def fake_stop(state, role):
        live.remove(state)
        state.worker = None

    monkeypatch.setattr(schedule, "start", fake_start)
    monkeypatch.setattr(schedule, "stop", fake_stop)
    monkeypatch.setattr(schedule, "run_group", lambda plan, group: None)
    monkeypatch.setattr(schedule, "warm_start", lambda plan, state: None)
    monkeypatch.setattr(schedule, "mem_available_gib", lambda: 23.0 - 14.0 * len(live))  # one runner fits
    names = ("diffrt-ort", "diffusers-fp32", "optimum-onnx")
    cells = [schedule.Cell(specs.WORKLOADS["W4-512"], 1)]
    plan = schedule.Plan(cells=cells, runs=1, cell_budget_s=60, deadline=time.perf_counter() + 60, run_timeout_s=60,
                         memory_gib=None, growth_gib=2.0, workdir=tmp_path, venv_root=tmp_path, model_dirs={},
                         latents={}, vae_scale_factor=8, log=lambda _: None)
    states = [schedule.RunnerState(specs.RUNNERS[name], {"status": "ok", "cold_start": {}, "processes": [],
                                                         "cells": {}, "info": {}})
              for name in names]
    args = argparse.Namespace(tag="t", model="sd35m", tiny=False, runs=1, budget_min=1.0, cell_budget=60.0,
                              worker_gib=None, venv_root=tmp_path, workdir=tmp_path)
    models = prepare.Models("sd35m", tmp_path, tmp_path / "checkpoint", tmp_path / "artifact", tmp_path, 8, 16, 0.0)
    written = []
    plan.after_group = lambda groups: written.append(compare.build_result(
        args, "date", cells, states, groups, plan, {}, {}, models, {"started": 0.0, "prepared": 0.0, "finished": 1.0},
        partial=True))
    assert schedule.run_all(plan, states) == [[name] for name in names]
    assert len(written) == 2
    for done, result in enumerate(written, start=1):
        assert "partial" in result
        statuses = [result["runners"][name]["status"] for name in names]
        assert statuses[:done] == ["ok"] * done
        assert all(s.startswith("not run yet") for s in statuses[done:])
    assert [s.result["status"] for s in states] == ["ok"] * 3


def test_peer_checkpoint_of_sdxl(tiny_checkpoint, tmp_path):
    """Both tokenizers get the slow tokenizer's files; both text encoders get the key
    layout transformers 4.x reads: "text_model.*" for everything but SDXL's
    "text_projection.weight" (prefixed, transformers would not find it and would
    initialise the projection at random)."""
    from safetensors.numpy import load_file

    prepare = _benchmarks_import("harness.prepare")
    checkpoint = tiny_checkpoint("sdxl")
    out = tmp_path / "peer-checkpoint"
    prepare.make_peer_checkpoint(checkpoint, out)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        vocab = json.loads((out / tokenizer / "vocab.json").read_text())
        fast = json.loads((checkpoint / tokenizer / "tokenizer.json").read_text())["model"]
        assert vocab == fast["vocab"] and (out / tokenizer / "merges.txt").read_text().startswith("#version")
    for encoder in ("text_encoder", "text_encoder_2"):
        original, copied = (load_file(folder / encoder / "model.safetensors") for folder in (checkpoint, out))
        assert len(copied) == len(original) and all(k.startswith(("text_model.", "text_projection.")) for k in copied)
        for key, tensor in original.items():
            name = key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key
            assert (copied[name] == tensor).all()
    assert "text_projection.weight" in load_file(out / "text_encoder_2" / "model.safetensors")
    assert (out / "unet").is_symlink() and (out / "unet").resolve() == (checkpoint / "unet").resolve()


def test_sdxl_flops_match_a_cpu_count(tiny_checkpoint):
    """The SDXL UNet's count, with its added conditions, equals the real tiny module run on
    CPU with attention on the math path."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    flops = _benchmarks_import("flops")
    checkpoint = tiny_checkpoint("sdxl")
    assert flops.is_sdxl(checkpoint) and not flops.is_sdxl(tiny_checkpoint("sd15"))
    counted = flops.count(checkpoint, [(1, 64, 64)], [])
    unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    projection = json.loads((checkpoint / "text_encoder_2" / "config.json").read_text())["projection_dim"]
    added = {"text_embeds": torch.randn(1, projection), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.randn(1, 4, 32, 32), torch.tensor([500.0]), torch.randn(1, 77, unet.config.cross_attention_dim),
             added_cond_kwargs=added)
    assert counted["unet"]["b1-64x64"] == counter.get_total_flops() > 0
    assert "unet_error" not in counted


@pytest.fixture(scope="module")
def sdxl_report(tiny_checkpoint, exported, tmp_path_factory):
    """One --tiny --workloads W3-512 run, reusing the session's tiny SDXL checkpoint and
    export, with the peers whose venvs are installed."""
    tmp = tmp_path_factory.mktemp("compare-sdxl")
    models = tmp / "work" / "tiny-sdxl"
    models.mkdir(parents=True)
    (models / "checkpoint").symlink_to(tiny_checkpoint("sdxl"), target_is_directory=True)
    (models / "artifact").symlink_to(exported("sdxl"), target_is_directory=True)
    results = tmp / "results"
    cmd = [sys.executable, str(BENCHMARKS / "compare.py"), "--tiny", "--workdir", str(tmp / "work"),
           "--results", str(results), "--venv-root", str(VENVS), "--runners", ",".join(SDXL_RUNNERS),
           "--workloads", "W3-512", "--runs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((results / "compare-tiny-sdxl.json").read_text())  # the default tag of a tiny SDXL run
    return data, results, tmp / "work"


def test_sdxl_workload(sdxl_report):
    data, results, work = sdxl_report
    assert data["mode"] == "tiny-sdxl" and data["model"]["name"] == "sdxl" and "SDXL" in data["model"]["description"]
    assert data["model"]["checkpoint"] == str(work / "tiny-sdxl" / "checkpoint")
    (workload,) = data["workloads"]
    assert workload["preset"] == "sdxl-lightning-4step" and workload["scheduler"] == "euler"
    assert workload["scheduler_config"] == {"timestep_spacing": "trailing"} and workload["steps"] == 4
    assert list(data["runners"]) == list(SDXL_RUNNERS)
    for name, r in data["runners"].items():
        assert r["status"] == "ok", (name, r["status"])
        s = r["summary"]["W3-512/b1"]
        assert s["runs_done"] == 1 and s["errors"] == [] and s["e2e_median_seconds"] > 0
        assert s["denoiser_calls_per_image_run"] == 4
        assert s["text_encoder_median_seconds"] > 0 and s["vae_decoder_median_seconds"] > 0
        assert s["denoiser_call_flops"] > 0 and s["vae_decoder_flops"] > 0 and s["denoiser_gflops_per_second"] > 0
        if name in PIPELINES:
            assert r["info"]["pipeline"] == PIPELINES[name]
    for peer in SDXL_PEERS:  # their own exports, beside the SDXL checkpoint (not the SD1.5 one's)
        kind = data["runners"][peer]["kind"]
        assert (work / "tiny-sdxl" / "peer-models" / kind / "model_index.json").is_file()
    # Euler injects no noise: same latents, same weights, same trailing timesteps -> the same image.
    agreement = data["image_agreement"]["W3-512/b1"]
    assert agreement["reference"] == "diffusers-fp32" and set(agreement["max_abs_diff"]) == set(SDXL_RUNNERS)
    for name, diff in agreement["max_abs_diff"].items():
        assert diff <= image_tolerance(data["runners"][name]), (name, diff)
    md = (results / "compare-tiny-sdxl.md").read_text()
    assert "## W3-512: sdxl-lightning-4step preset (euler, timestep_spacing=trailing, 4 steps, no CFG, 64x64)" in md
    assert "tiny random-weight SDXL" in md
    flops_file = Path(data["flops"]["file"])
    assert flops_file == work / "flops_tiny_sdxl.json" and "b1-64x64" in data["flops"]["unet"]


def test_sd3_flops_match_a_cpu_count(tmp_path):
    """The SD3 transformer's count (77 CLIP + 256 T5 text tokens, pooled projections)
    equals the real tiny module run on CPU with attention on the math path."""
    pytest.importorskip("sentencepiece")
    import torch
    from diffusers import SD3Transformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from diffrt.export.tiny import make_tiny_sd3

    flops = _benchmarks_import("flops")
    checkpoint = make_tiny_sd3(tmp_path / "sd3", kind="sd3-no-t5")
    assert flops.is_sd3(checkpoint)
    counted = flops.count(checkpoint, [(2, 32, 48)], [(1, 32, 48)])
    transformer = SD3Transformer2DModel.from_pretrained(checkpoint / "transformer")
    config = transformer.config
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), FlopCounterMode(display=False) as counter:
        transformer(torch.randn(2, config.in_channels, 16, 24), torch.randn(2, 77 + 256, config.joint_attention_dim),
                    torch.randn(2, config.pooled_projection_dim), torch.tensor([500.0, 500.0]))
    assert counted["unet"]["b2-48x32"] == counter.get_total_flops() > 0
    assert counted["vae_decoder"]["b1-48x32"] > 0


def test_sd3_workload(tmp_path):
    """--tiny --workloads W4-512 on a tiny SD3 without T5 (as the real-size one): diffrt,
    diffusers and the optimum peers whose venvs exist (each on its own export of the
    checkpoint) run the sd35-large-turbo-4step recipe with the same latents and give the
    same image (flow-match Euler injects no noise)."""
    pytest.importorskip("sentencepiece")
    runners = ("diffrt-ort", "diffusers-fp32", *SD3_PEERS)
    cmd = [sys.executable, str(BENCHMARKS / "compare.py"), "--tiny", "--workdir", str(tmp_path / "work"),
           "--results", str(tmp_path / "results"), "--venv-root", str(VENVS), "--runners", ",".join(runners),
           "--workloads", "W4-512", "--runs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "results" / "compare-tiny-sd35m.json").read_text())
    assert data["model"]["name"] == "sd35m" and "SD3" in data["model"]["description"]
    (workload,) = data["workloads"]
    assert (workload["preset"], workload["scheduler"], workload["steps"]) == ("sd35-large-turbo-4step",
                                                                             "flow_match_euler", 4)
    for name, r in data["runners"].items():
        assert r["status"] == "ok", (name, r["status"])
        s = r["summary"]["W4-512/b1"]
        assert s["denoiser_calls_per_image_run"] == 4 and s["denoiser_call_flops"] > 0
    for name, pipeline in SD3_PIPELINES.items():
        if name in runners:
            assert data["runners"][name]["info"]["pipeline"] == pipeline
    if "optimum-intel-static" in runners:  # compiled for the no-CFG batch, not optimum-intel's doubled one
        assert data["runners"]["optimum-intel-static"]["info"]["static"] is True
    agreement = data["image_agreement"]["W4-512/b1"]
    assert agreement["reference"] == "diffusers-fp32" and set(agreement["max_abs_diff"]) == set(runners)
    for name, diff in agreement["max_abs_diff"].items():
        assert diff <= image_tolerance(data["runners"][name]), (name, diff)


# --- speed with its cost: the image-error column and the fast-mode runners -------------


def test_image_error_of_two_known_images():
    """PSNR and max abs of images whose error is known by hand: every value off by 0.1
    but one off by 0.5 in 96 -> MSE (95 * 0.01 + 0.25) / 96 = 0.0125, PSNR 10 log10(80)
    = 19.0309 dB; a copy is "identical"; another shape is said as such."""
    report_mod = _benchmarks_import("harness.report")
    reference = np.zeros((2, 4, 4, 3), dtype=np.float32)
    image = reference + np.float32(0.1)
    image[1, 2, 3, 0] = 0.5
    error = report_mod.image_error(image, reference)
    assert error["max_abs_diff"] == pytest.approx(0.5, abs=1e-7)
    assert error["psnr_db"] == pytest.approx(19.03, abs=0.005)
    assert report_mod.image_error(reference.copy(), reference) == {"max_abs_diff": 0.0, "psnr_db": "identical"}
    assert "shape" in report_mod.image_error(reference[:1], reference)


def test_image_agreement_picks_the_fp32_reference(tmp_path):
    """Against diffusers-fp32 when it ran, else diffrt-ort; a TAESD-decoder runner is left
    out (another image by design); LCM's W1 only when every runner drew the same noise."""
    report_mod = _benchmarks_import("harness.report")
    reference = np.full((1, 4, 4, 3), 0.5, dtype=np.float32)
    images = {"diffusers-fp32": reference, "diffrt-ort": reference + np.float32(0.01),
              "diffrt-int8-ort": reference + np.float32(0.1), "diffrt-openvino-tiny-vae": reference + np.float32(0.3)}
    runners = {}
    for name, image in images.items():
        cells = {}
        for key in ("W1-256/b1", "W2-256/b1"):
            path = tmp_path / f"{name}-{key.replace('/', '-')}.npy"
            np.save(path, image)
            cells[key] = {"runs": [{"seconds": 1.0}], "image": str(path)}
        runners[name] = {"cells": cells, "decoder": "tiny" if "tiny-vae" in name else "full"}
    order = ("diffusers-fp32", "diffrt-ort")
    agreement = report_mod.image_agreement(runners, order, same_noise=True)
    w2 = agreement["W2-256/b1"]
    assert w2["reference"] == "diffusers-fp32" and set(w2["max_abs_diff"]) == set(images) - {"diffrt-openvino-tiny-vae"}
    assert w2["max_abs_diff"]["diffrt-int8-ort"] == pytest.approx(0.1, abs=1e-6)
    assert w2["psnr_db"]["diffrt-int8-ort"] == pytest.approx(20.0, abs=0.01)  # MSE 0.01
    assert w2["psnr_db"]["diffrt-ort"] == pytest.approx(40.0, abs=0.01)  # MSE 1e-4
    assert w2["psnr_db"]["diffusers-fp32"] == "identical"
    assert "W1-256/b1" in agreement and "W1-256/b1" not in report_mod.image_agreement(runners, order)
    del runners["diffusers-fp32"]
    assert report_mod.image_agreement(runners, order)["W2-256/b1"]["reference"] == "diffrt-ort"


def test_fast_mode_runners_are_in_the_table():
    specs = _benchmarks_import("harness.specs")
    for name, artifact in (("diffrt-int8-ort", "int8"), ("diffrt-int8-openvino", "int8"),
                           ("diffrt-deepcache", "deepcache"), ("diffrt-deepcache-openvino", "deepcache")):
        assert specs.RUNNERS[name].kind == "diffrt" and specs.RUNNERS[name].artifact == artifact
    assert specs.RUNNERS["diffrt-int8-ort"].options["load"]["graph_precision"] == "int8"
    assert specs.RUNNERS["diffrt-deepcache"].options["call"] == {"cache": "deepcache:3"}
    assert specs.KINDS[specs.RUNNERS["diffusers-deepcache"].kind].venv == "diffusers-deepcache"
    assert specs.RUNNERS["diffusers-deepcache"].options["deepcache"] == {"cache_interval": 3, "cache_branch_id": 0}
    assert specs.RUNNERS["diffusers-bf16"].requires_bf16
    for name in ("optimum-intel-int8", "optimum-intel-int8-static"):
        assert specs.KINDS[specs.RUNNERS[name].kind].script == "run_optimum_intel_int8.py"
    prompts = (BENCHMARKS / "peers" / "calibration_prompts.txt").read_text().splitlines()
    assert len([p for p in prompts if p.strip()]) >= 8


def test_an_artifact_variant_diffrt_cannot_make_is_not_available(exported, tmp_path):
    """A variant whose diffrt command does not exist (as `diffrt quantize` before int8
    landed) marks its runners "not available: <the CLI's one line>", makes nothing, and
    leaves the plain export as it was; the runners of other variants are untouched."""
    import argparse

    compare = _benchmarks_import("compare")
    specs = _benchmarks_import("harness.specs")
    prepare = _benchmarks_import("harness.prepare")
    schedule = _benchmarks_import("harness.schedule")
    artifact = tmp_path / "tiny" / "artifact"
    artifact.parent.mkdir()
    artifact.symlink_to(exported("sd15"), target_is_directory=True)
    before = sorted(p.name for p in artifact.iterdir())
    models = prepare.Models("sd15", tmp_path / "tiny", tmp_path / "tiny" / "checkpoint", artifact, tmp_path, 2, 4, 0.0)
    missing = specs.ArtifactVariant("artifact-missing", ("no-such-command", "OUT"), copy_export=True)
    original = dict(specs.ARTIFACT_VARIANTS)
    specs.ARTIFACT_VARIANTS["missing"] = missing
    try:
        spec = specs.RunnerSpec("diffrt-missing", "diffrt", {"load": {}, "call": {}}, artifact="missing")
        states = [schedule.RunnerState(spec, {"status": "ok"}),
                  schedule.RunnerState(specs.RUNNERS["diffrt-ort"], {"status": "ok"})]
        args = argparse.Namespace(workdir=tmp_path, run_timeout=300.0)
        assert compare.prepare_variants(states, models, args) == {}
    finally:
        specs.ARTIFACT_VARIANTS.clear()
        specs.ARTIFACT_VARIANTS.update(original)
    status = states[0].result["status"]
    assert status.startswith("not available: diffrt no-such-command (for artifact-missing): ")
    assert "invalid choice: 'no-such-command'" in status and len(status.splitlines()) == 1
    assert states[1].result["status"] == "ok"
    assert not (tmp_path / "tiny" / "artifact-missing").exists()
    assert sorted(p.name for p in artifact.iterdir()) == before


def test_an_artifact_variant_is_made_again_when_its_arguments_change(exported, tmp_path):
    """A variant's artifact is reused while its marker records the same diffrt arguments
    (a file put in it survives), and made again from the export when they change (as when
    a variant gains an --exclude group): never the old artifact timed under the new name."""
    prepare = _benchmarks_import("harness.prepare")
    specs = _benchmarks_import("harness.specs")
    artifact = tmp_path / "tiny" / "artifact"
    artifact.parent.mkdir()
    artifact.symlink_to(exported("sd15"), target_is_directory=True)
    models = prepare.Models("sd15", tmp_path / "tiny", tmp_path / "tiny" / "checkpoint", artifact, tmp_path, 2, 4, 0.0)
    log = tmp_path / "prepare.log"
    first = specs.ArtifactVariant("artifact-inspected", ("inspect", "OUT"), copy_export=True)
    out = prepare.prepare_variant(models, first, log, 300.0)
    assert (out / "manifest.json").is_file() and (out / prepare.COMPLETE).is_file()
    (out / "sentinel").write_text("made by the first arguments")
    assert prepare.prepare_variant(models, first, log, 300.0) == out and (out / "sentinel").is_file()
    changed = specs.ArtifactVariant("artifact-inspected", ("inspect", "OUT", "--verify"), copy_export=True)
    assert prepare.prepare_variant(models, changed, log, 300.0) == out
    assert not (out / "sentinel").exists() and (out / "manifest.json").is_file()
    assert log.read_text().count("$ ") == 2  # run twice, not three times


@pytest.mark.parametrize("options", [{"load": {"backend": "ort", "graph_precision": "int8"}},
                                     {"load": {"backend": "ort"}, "call": {"cache": "deepcache:3"}}],
                         ids=["int8", "deepcache"])
def test_a_mode_the_artifact_lacks_is_not_available(exported, options, tmp_path):
    """diffrt-int8 / diffrt-deepcache on an artifact without int8 or DeepCache graphs (the
    plain export): the runner refuses with one line, reported "not available", never an
    fp32 image timed as the fast mode. (Before those features, the keyword itself was
    refused: also "not available".)"""
    sys.path.insert(0, str(BENCHMARKS / "peers"))
    try:
        run_diffrt = importlib.import_module("run_diffrt")
        worker = importlib.import_module("worker")
    finally:
        sys.path.remove(str(BENCHMARKS / "peers"))
    latents = tmp_path / "latents.npy"
    np.save(latents, np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32))
    request = {"prompt": "a cat", "preset": None, "scheduler": "lcm", "scheduler_config": {}, "steps": 4,
               "guidance_scale": 1.0, "height": 32, "width": 32, "batch": 1, "seed": 0, "latents": str(latents),
               "vae_scale_factor": 2}
    from diffrt.errors import DiffrtError

    with pytest.raises((worker.Unavailable, DiffrtError)) as caught:
        runner = run_diffrt.load(str(exported("sd15")), options)
        runner.generate(request)
    reply = worker._failure(caught.value, (DiffrtError,))
    assert reply["kind"] == "unavailable" and reply["error"] and len(reply["error"].splitlines()) == 1
