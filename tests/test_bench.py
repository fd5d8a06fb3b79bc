"""`diffrt bench`: its statistics recomputed here from the per-run times it records
(numpy and the statistics module, not diffrt's code), warm-up kept apart, alternating
order, the machine and artifact identity, and one-line errors."""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import subprocess
import sys

import numpy as np
import pytest

from diffrt.bench import configs_from, round_order, summarize, summarize_runs
from diffrt.errors import DiffrtError


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffrt.cli", *args], capture_output=True, text=True, timeout=600)


def reference_stats(values):
    """What every number of a stage should be, computed by numpy and statistics."""
    data = np.asarray(values, dtype=np.float64)
    p50 = float(np.percentile(data, 50))
    return {"n": len(values), "min": float(data.min()), "max": float(data.max()), "mean": statistics.fmean(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0, "p50": p50,
            "p90": float(np.percentile(data, 90)), "p99": float(np.percentile(data, 99)),
            "spread": float((data.max() - data.min()) / p50)}


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 101])
def test_statistics_equal_numpy_and_the_statistics_module(n):
    rng = random.Random(n)
    values = [rng.lognormvariate(0, 0.5) for _ in range(n)]
    got = summarize(values)
    expected = reference_stats(values)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    if n >= 2:  # the statistics module's own percentile definition agrees
        cuts = statistics.quantiles(values, n=100, method="inclusive")
        assert got["p90"] == pytest.approx(cuts[89]) and got["p99"] == pytest.approx(cuts[98])


def test_each_denoiser_call_counts_alone_and_throughput_uses_the_medians():
    runs = [{"text_encoder": 0.1, "denoiser": 0.9, "denoiser_calls": [0.2, 0.3, 0.4], "vae_decoder": 0.5, "total": 1.6},
            {"text_encoder": 0.2, "denoiser": 1.2, "denoiser_calls": [0.3, 0.4, 0.5], "vae_decoder": 0.4, "total": 2.0},
            {"text_encoder": 0.3, "denoiser": 0.6, "denoiser_calls": [0.1, 0.2, 0.3], "vae_decoder": 0.3, "total": 1.4}]
    got = summarize_runs(runs, images_per_call=2)
    assert got["stages"]["denoiser_call"]["n"] == 9
    assert got["stages"]["denoiser_call"]["p50"] == pytest.approx(0.3)
    assert got["images_per_s"] == pytest.approx(2 / 1.6)  # median total of 1.4, 1.6, 2.0
    assert got["denoiser_it_per_s"] == pytest.approx(3 / 0.9)


def test_order_alternates_and_configurations_are_every_pair():
    configs = configs_from("ort,openvino", "default,fp32")
    assert [c.name for c in configs] == ["ort/default", "ort/fp32", "openvino/default", "openvino/fp32"]
    assert round_order("abc", 0) == list("abc") and round_order("abc", 1) == list("cba")
    for bad in ("fp64", ",", "fp32,fp32"):
        with pytest.raises(DiffrtError, match="--precision"):
            configs_from("ort", bad)


def cpu_model() -> str:
    for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def test_cli_bench_records_runs_whose_statistics_recompute(exported, tmp_path):
    folder = exported("sd15")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red cube\n\na blue sphere\n", encoding="utf-8")
    out = tmp_path / "bench.json"
    result = cli("bench", str(folder), "--steps", "2", "--scheduler", "ddim", "--runs", "3", "--warmup", "1",
                 "--backend", "ort,openvino",
                 "--prompts", str(prompts), "--json", str(out), "--no-verify")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["prompts"] == ["a red cube", "a blue sphere"]
    assert report["artifact"]["manifest_sha256"] == hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    if cpu_model():
        assert report["machine"]["cpu"] == cpu_model()
    assert report["machine"]["versions"]["onnxruntime"]
    assert list(report["configs"]) == ["ort/default", "openvino/default"]
    for position, (name, r) in enumerate(report["configs"].items()):
        assert len(r["runs"]) == 3 and len(r["warmup_total_seconds"]) == 1
        assert r["position_in_round"] == [position, 1 - position, position]  # A B, B A, A B
        for stage, key in (("total", "total"), ("denoiser", "denoiser"), ("vae_decoder", "vae_decoder")):
            expected = reference_stats([run[key] for run in r["runs"]])
            for field, value in expected.items():
                assert r["stages"][stage][field] == pytest.approx(value, rel=1e-9), (name, stage, field)
        calls = [c for run in r["runs"] for c in run["denoiser_calls"]]
        assert len(calls) == 6 and r["stages"]["denoiser_call"]["p90"] == pytest.approx(np.percentile(calls, 90))
        assert r["images_per_s"] == pytest.approx(1 / np.median([run["total"] for run in r["runs"]]))
        # the warm-up is not among the timed runs' statistics
        assert r["stages"]["total"]["n"] == 3
        assert f"| {name} |" in result.stdout
    assert "| total | 3 |" in result.stdout


@pytest.mark.parametrize(("args", "fragment"), [
    (("--runs", "0"), "--runs must be an integer >= 1"),
    (("--warmup", "-1"), "--warmup must be an integer >= 0"),
    (("--precision", "fp64"), "--precision 'fp64'"),
    (("--prompts", "/nonexistent/prompts.txt"), "--prompts /nonexistent/prompts.txt: cannot read it"),
])
def test_cli_bench_bad_arguments_are_one_line(exported, args, fragment):
    result = cli("bench", str(exported("sd15")), "--steps", "1", "--no-verify", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
