"""`diffrt bench`: latency of the pipeline and of each stage, for people who compare numbers.

    from diffrt.bench import BenchConfig, bench, summarize
    report = bench("out/sd15", [BenchConfig("ort"), BenchConfig("openvino")], request_for, runs=10)

What it does, in this order:

1. loads every configuration (backend x graph precision) once, each its own Pipeline,
   all alive at once (so their memory adds up: bench configurations one at a time where
   they do not fit together);
2. warm-up: `warmup` calls per configuration, timed but kept apart from the statistics
   (first calls allocate, compile shapes and fill caches);
3. `runs` rounds; each round times one call of every configuration, in an order that
   alternates (round 0: A B C, round 1: C B A, ...), so that a machine that slows down or
   speeds up during the run (thermal, neighbours) does not favour whichever went first;
4. per configuration and stage (text encoders, denoiser, each denoiser call, VAE decoder,
   end to end): n, min, max, mean, standard deviation, p50/p90/p99 and the spread
   (max - min) / p50; images/s (images per call / end-to-end p50) and denoiser
   iterations/s (calls / denoiser-total p50).

Percentiles interpolate linearly between the two nearest ranks (numpy's default,
`statistics.quantiles(method="inclusive")`): with fewer than ~100 runs p99 is close to
the max, and the table says how many runs each number rests on.

Prompts: one fixed prompt, or a prompt set (one per line) that the runs cycle through,
the same prompt for every configuration within a round. Seeds: run i uses seed + i.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffrt.errors import DiffrtError

STAGES = ("text_encoder", "denoiser", "denoiser_call", "vae_decoder", "total")
PERCENTILES = (50, 90, 99)
PACKAGES = ("diffrt", "numpy", "onnxruntime", "openvino", "tokenizers", "tensorrt", "cupy-cuda12x", "cupy-cuda13x")


@dataclass(frozen=True)
class BenchConfig:
    """One configuration: a backend and which of the artifact's graphs it runs."""

    backend: str
    graph_precision: str | None = None
    """"fp32", "fp16", "bf16", "int8" (`diffrt quantize`'s stages) or None (the backend's own choice)."""
    options: tuple[tuple[str, Any], ...] = ()
    """Backend options (-O KEY=VALUE), the same for every configuration of a run."""
    cache: str | None = None
    """The requests' step cache, e.g. "deepcache:3" (None: off; diffrt.runtime.step_cache)."""

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.graph_precision or 'default'}" + (f"/{self.cache}" if self.cache else "")


def configs_from(backends: str, precisions: str | None, options: Mapping[str, Any] | None = None,
                 caches: str | None = None) -> list[BenchConfig]:
    """'ort,openvino' x 'fp32,bf16' (x 'off,deepcache:3') -> the configurations, in that
    order (every combination)."""
    names = [b.strip() for b in backends.split(",") if b.strip()]
    if not names:
        raise DiffrtError("--backend: name at least one backend, e.g. --backend ort,openvino")
    graphs: list[str | None] = [None]
    if precisions:
        graphs = [None if p.strip() == "default" else p.strip() for p in precisions.split(",") if p.strip()]
        bad = [p for p in graphs if p not in (None, "fp32", "fp16", "bf16", "int8")]
        if bad or not graphs:
            raise DiffrtError(f"--precision {precisions!r}: a comma-separated list of default, fp32, fp16, bf16, int8")
    configs = [BenchConfig(b, g, tuple(sorted((options or {}).items())), c) for b in names for g in graphs
               for c in _caches(caches)]
    if len(set(configs)) != len(configs):
        raise DiffrtError(f"--backend {backends!r} --precision {precisions!r} --cache {caches!r} names a "
                          "configuration twice")
    return configs


def _caches(caches: str | None) -> list[str | None]:
    """'off,deepcache:3' -> [None, 'deepcache:3'] (each checked as a request's cache= is)."""
    from diffrt.runtime.step_cache import parse

    if not caches:
        return [None]
    parsed = [parse(c.strip()) for c in caches.split(",") if c.strip()]
    if not parsed:
        raise DiffrtError(f"--cache {caches!r}: a comma-separated list like off,deepcache:3")
    return [None if c is None else str(c) for c in parsed]


def read_prompts(path: str | Path) -> list[str]:
    """A prompt set: one prompt per line; blank lines and lines starting with '#' skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DiffrtError(f"--prompts {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DiffrtError(f"--prompts {path}: no prompts in it (one per line)")
    return prompts


# -- statistics ------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ascending values, linear between the nearest ranks."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(values: Iterable[float]) -> dict[str, float | int]:
    """n, min, max, mean, stdev (sample; 0 for one value), p50/p90/p99, spread."""
    data = sorted(float(v) for v in values)
    if not data:
        return {"n": 0}
    n = len(data)
    mean = sum(data) / n
    stdev = math.sqrt(sum((v - mean) ** 2 for v in data) / (n - 1)) if n > 1 else 0.0
    out: dict[str, float | int] = {"n": n, "min": data[0], "max": data[-1], "mean": mean, "stdev": stdev}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(data, q)
    out["spread"] = (data[-1] - data[0]) / out["p50"] if out["p50"] > 0 else 0.0
    return out


def stage_values(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """Per stage, the recorded seconds of every run (each denoiser call counts alone)."""
    values: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for run in runs:
        for stage in ("text_encoder", "denoiser", "vae_decoder", "total"):
            if stage in run:
                values[stage].append(float(run[stage]))
        values["denoiser_call"].extend(float(s) for s in run.get("denoiser_calls", ()))
    return values


def summarize_runs(runs: Sequence[Mapping[str, Any]], images_per_call: int) -> dict[str, Any]:
    """Statistics per stage plus throughput, from the runs' recorded timings."""
    stats = {stage: summarize(values) for stage, values in stage_values(runs).items()}
    total, denoiser = stats["total"], stats["denoiser"]
    calls = len(runs[0].get("denoiser_calls", ())) if runs else 0
    return {
        "stages": stats,
        "images_per_s": images_per_call / total["p50"] if total.get("n") and total["p50"] > 0 else None,
        "denoiser_it_per_s": calls / denoiser["p50"] if denoiser.get("n") and denoiser["p50"] > 0 else None,
        "denoiser_calls_per_run": calls,
    }


def round_order(configs: Sequence[Any], round_index: int) -> list[Any]:
    """Round 0 in the given order, round 1 reversed, and so on."""
    return list(configs) if round_index % 2 == 0 else list(reversed(configs))


# -- running ---------------------------------------------------------------------------


def artifact_id(folder: str | Path) -> dict[str, str]:
    """What identifies the artifact measured: its manifest's sha256 (the manifest lists
    every file's sha256, so this names the weights too) and its folder."""
    manifest = Path(folder) / "manifest.json"
    return {"folder": str(folder), "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}


def machine() -> dict[str, Any]:
    """The CPU (model, flags this code cares about, cores usable), OS and library versions."""
    from diffrt.runtime.cpu import cpu_info, installed_versions

    cpu = cpu_info()
    return {"cpu": cpu.model, "cpu_flags": sorted(cpu.flags), "cores_usable": cpu.logical_cores,
            "machine": cpu.machine, "python": platform.python_version(), "platform": platform.platform(),
            "versions": installed_versions(PACKAGES)}


def bench(
    folder: str | Path,
    configs: Sequence[BenchConfig],
    request_for: Callable[[Any, str, int], Any],
    prompts: Sequence[str],
    runs: int = 5,
    warmup: int = 1,
    load: Callable[..., Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time `configs` side by side on one artifact.

    `request_for(pipe, prompt, run_index)` builds the Request of one call (the same
    settings for every configuration); `load(folder, config)` opens a pipeline (default:
    `Pipeline.load` with the config's backend, graph precision and options)."""
    if runs < 1 or warmup < 0:
        raise DiffrtError(f"runs must be >= 1 and warmup >= 0; got runs={runs}, warmup={warmup}")
    say = progress or (lambda _text: None)
    load = load or _load
    pipes: dict[BenchConfig, Any] = {}
    records: dict[BenchConfig, dict[str, Any]] = {}
    try:
        for config in configs:
            t0 = time.perf_counter()
            pipes[config] = load(folder, config)
            records[config] = {"load_seconds": time.perf_counter() - t0, "describe": pipes[config].backend.describe(),
                               "warmup": [], "runs": [], "order": []}
            say(f"{config.name}: loaded in {records[config]['load_seconds']:.2f}s ({records[config]['describe']})")
        images_per_call = None
        for i in range(warmup):
            for config in round_order(configs, i):
                timings, images = _call(pipes[config], request_for, prompts[i % len(prompts)], i, config.cache)
                records[config]["warmup"].append(timings)
                images_per_call = images
                say(f"warm-up {i + 1}/{warmup} {config.name}: {timings['total']:.3f}s")
        for i in range(runs):
            for position, config in enumerate(round_order(configs, i)):
                timings, images = _call(pipes[config], request_for, prompts[i % len(prompts)], warmup + i,
                                        config.cache)
                records[config]["runs"].append(timings)
                records[config]["order"].append(position)
                images_per_call = images
                say(f"run {i + 1}/{runs} {config.name}: {timings['total']:.3f}s")
    finally:
        for pipe in pipes.values():
            pipe.close()
    results = {}
    for config in configs:
        record = records[config]
        results[config.name] = {
            "backend": config.backend, "graph_precision": config.graph_precision, "options": dict(config.options),
            "cache": config.cache,
            "describe": record["describe"], "load_seconds": record["load_seconds"],
            "warmup_total_seconds": [t["total"] for t in record["warmup"]],
            "runs": record["runs"], "position_in_round": record["order"],
            **summarize_runs(record["runs"], images_per_call or 1),
        }
    return {"artifact": artifact_id(folder), "machine": machine(), "runs": runs, "warmup": warmup,
            "prompts": list(prompts), "images_per_call": images_per_call, "configs": results}


def _load(folder: str | Path, config: BenchConfig) -> Any:
    from diffrt.runtime.pipeline import Pipeline

    return Pipeline.load(folder, backend=config.backend, graph_precision=config.graph_precision,
                         **dict(config.options))


def _call(pipe: Any, request_for: Callable[[Any, str, int], Any], prompt: str, index: int,
          cache: str | None = None) -> tuple[dict, int]:
    request = request_for(pipe, prompt, index)
    if cache is not None:  # the configuration's step cache on the shared request
        from diffrt.runtime.step_cache import check_request

        request = dataclasses.replace(request, cache=check_request(pipe, request, cache))
    output = pipe.generate([request])[0]
    timings = {k: v for k, v in output.timings.items() if isinstance(v, (int, float, list))}
    return timings, len(output.images)


# -- the table -------------------------------------------------------------------------


def table(report: Mapping[str, Any]) -> str:
    """Markdown: one row per configuration and stage, the columns of the peer harness's
    table where they mean the same (e2e, images/s, denoiser s/call, VAE s)."""
    m = report["machine"]
    head = (f"Machine: {m['cpu']} ({m['machine']}, {m['cores_usable']} cores usable; "
            f"{' '.join(m['cpu_flags']) or 'no listed SIMD flags'}); artifact {report['artifact']['folder']} "
            f"(manifest sha256 {report['artifact']['manifest_sha256'][:16]}); {report['runs']} timed runs after "
            f"{report['warmup']} warm-up, order alternating per round")
    lines = [head, "",
             "| config | images/s | denoiser it/s | stage | n | p50 s | p90 s | p99 s | min s | max s | spread |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["configs"].items():
        for j, stage in enumerate(STAGES):
            s = r["stages"][stage]
            if not s.get("n"):
                continue
            head = (f"| {name} | {_num(r['images_per_s'], 4)} | {_num(r['denoiser_it_per_s'], 3)} " if j == 0
                    else "| | | ")
            lines.append(f"{head}| {stage} | {s['n']} | {s['p50']:.4f} | {s['p90']:.4f} | {s['p99']:.4f} | "
                         f"{s['min']:.4f} | {s['max']:.4f} | {100 * s['spread']:.1f}% |")
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


__all__ = ["BenchConfig", "bench", "configs_from", "percentile", "read_prompts", "round_order", "summarize",
           "summarize_runs", "table"]
