"""The measurement schedule: which runner processes are alive, which run comes next.

Each available runner gets one long-lived worker process: load with an empty engine
cache, then the first image (cold start), which is also its warm-up. As many workers as
free memory allows are alive at once (a "group": the next one starts only while its
memory estimate plus room for the live ones to grow is available); within a group the runs go
cell by cell, round-robin: run 1 of a cell on every runner, then run 2, ..., with the
runner order rotated each round, so machine drift hits all of them alike (and no runner
switches shapes between the runs of a cell). Groups follow one another
when memory is short. A runner with an engine cache then starts once more, with the
cache its first process left behind (cold start with a warm cache); then that cache is
deleted (disk: a few GB per compiled shape).

Budgets keep the whole thing inside the time the caller gives: a cell (runner x
workload x batch) gets runs after its first only while its runs so far plus one more
fit in `cell_budget_s`, and after `deadline` only first runs start (no further runs, no
warm-cache starts). Every skipped run is recorded with its reason.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.specs import KINDS, PROMPT, SEED, RunnerSpec, Workload
from harness.workers import (Worker, WorkerError, machine_busy_cpu_seconds, mem_available_gib, runner_python,
                             self_cpu_seconds)


@dataclass(frozen=True)
class Cell:
    workload: Workload
    batch: int

    @property
    def key(self) -> str:
        return f"{self.workload.name}/b{self.batch}"


@dataclass
class Plan:
    cells: list[Cell]
    runs: int
    cell_budget_s: float
    deadline: float
    """time.perf_counter() after which no run starts."""
    run_timeout_s: float
    memory_gib: float | None
    """Memory one runner process may reach (None: each runner's own estimate for the
    cells' model, spec.memory_gib_for)."""
    growth_gib: float
    """Room kept free for each live runner to grow into (larger sizes, batch 4)."""
    workdir: Path
    venv_root: Path
    model_dirs: dict[str, Path]
    """"artifact" / "checkpoint" / a peer kind / "artifact:VARIANT" -> the folder its runners load."""
    latents: dict[tuple[int, int, int], Path]
    """(height, width, batch) -> .npy of initial latents."""
    vae_scale_factor: int
    log: Callable[[str], None]
    sequence: list[tuple[str, str, int]] = field(default_factory=list)
    """(runner, cell, run) in the order the runs happened: the round-robin, for the record."""
    after_group: Callable[[list[list[str]]], None] | None = None
    """Called with the groups so far each time a group is done (its warm starts included):
    compare.py writes what is measured so far, so a run stopped midway leaves it."""

    @property
    def model(self) -> str:
        """The checkpoint every cell runs on (one model per run of the harness)."""
        return self.cells[0].workload.model


@dataclass
class RunnerState:
    spec: RunnerSpec
    result: dict[str, Any]
    worker: Worker | None = None
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)


def model_dir(plan: Plan, spec: RunnerSpec) -> Path:
    model = KINDS[spec.kind].model
    if spec.artifact is not None:  # a diffrt artifact variant (int8, DeepCache)
        return plan.model_dirs[f"artifact:{spec.artifact}"]
    return plan.model_dirs[spec.kind if model == "peer" else model]


def request_for(plan: Plan, cell: Cell, image_out: Path | None) -> dict[str, Any]:
    w = cell.workload
    return {"cmd": "generate", "prompt": PROMPT, "preset": w.preset, "scheduler": w.scheduler,
            "scheduler_config": dict(w.scheduler_config), "steps": w.steps, "guidance_scale": w.guidance_scale,
            "height": w.height, "width": w.width, "batch": cell.batch, "seed": SEED,
            "latents": str(plan.latents[(w.height, w.width, cell.batch)]),
            "vae_scale_factor": plan.vae_scale_factor, "image_out": str(image_out) if image_out else None}


def set_status(state: RunnerState, reply: dict[str, Any], during: str) -> None:
    if reply.get("kind") == "unavailable":
        state.result["status"] = f"not available: {reply['error']}"
    else:
        state.result["status"] = f"failed: {during}: {reply.get('error', 'no reply')}"


# --- one process ---------------------------------------------------------------------


def start(plan: Plan, state: RunnerState, cache: str) -> dict[str, Any] | None:
    """Spawn, load and make the first image. Returns the cold-start record, or None when
    the runner cannot run (its status says why; the process is closed)."""
    spec = state.spec
    cache_dir = plan.workdir / "engine-cache" / spec.name
    if cache == "empty":
        shutil.rmtree(cache_dir, ignore_errors=True)
    if spec.cache_option:
        cache_dir.mkdir(parents=True, exist_ok=True)
    python = runner_python(spec, plan.venv_root)
    assert python is not None
    log_path = plan.workdir / "logs" / f"{spec.name}.log"
    worker = Worker(spec, python, log_path, env=_worker_env())
    state.worker = worker
    cell = plan.cells[0]
    try:
        options = spec.options_with_cache(cache_dir)
        if spec.kind == "diffrt":  # compile for the first cell's shape at load, as optimum-intel-static reshapes
            w = cell.workload
            options["load"] = {**options["load"], "prepare": {
                "height": w.height, "width": w.width, "num_images": 1, "guidance_scale": w.guidance_scale}}
        load = worker.request({"cmd": "load", "model": str(model_dir(plan, spec)), "options": options},
                              plan.run_timeout_s)
        ready = time.perf_counter() - worker.started
        if not load["ok"]:
            set_status(state, load, "load")
            return stop(state, "main" if cache == "empty" else "warm-start")
        state.result["info"] = load["info"]
        first = worker.request(request_for(plan, Cell(cell.workload, 1), None), plan.run_timeout_s)
        if not first["ok"]:
            set_status(state, first, "first image")
            return stop(state, "main" if cache == "empty" else "warm-start")
    except WorkerError as exc:
        state.result["status"] = f"failed: {exc}"
        return stop(state, "main" if cache == "empty" else "warm-start")
    state.result["info"].update(first.get("info") or {})
    return {"engine_cache": cache, "workload": cell.workload.name,
            "spawn_to_ready_seconds": round(ready, 3), "load_seconds": round(load["seconds"], 3),
            "setup_seconds": round(first["setup_seconds"], 3), "first_image_seconds": round(first["seconds"], 3),
            "total_seconds": round(ready + first["setup_seconds"] + first["seconds"], 3)}


def stop(state: RunnerState, role: str) -> None:
    """Close the worker and keep what its process cost (wall time, peak RSS, CPU)."""
    worker = state.worker
    if worker is None:
        return None
    worker.close()
    state.worker = None
    state.result["processes"].append({
        "role": role, "wall_seconds": round(time.perf_counter() - worker.started, 3),
        "peak_rss_gib": None if worker.peak_rss_gib is None else round(worker.peak_rss_gib, 3),
        "cpu_seconds": None if worker.cpu_seconds is None else round(worker.cpu_seconds, 1),
        "exit_status": worker.proc.returncode})
    return None


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = "1"  # every model is local; never wait on a network
    return env


# --- runs ------------------------------------------------------------------------------


def skip_reason(plan: Plan, runs: list[dict[str, Any]], run_index: int) -> str | None:
    """Why run `run_index` (0-based) of a cell is skipped, or None. The first run of every
    cell always happens: a cell without one would have no number at all."""
    if run_index == 0:
        return None
    if time.perf_counter() > plan.deadline:
        return "total time budget spent"
    if runs:
        spent = sum(r["seconds"] for r in runs)
        if spent + statistics.median(r["seconds"] for r in runs) > plan.cell_budget_s:
            return f"cell budget ({plan.cell_budget_s:g} s) spent"
    return None


def measure(plan: Plan, state: RunnerState, cell: Cell, run_index: int) -> None:
    record = state.cells.setdefault(cell.key, {"workload": cell.workload.name, "batch": cell.batch, "runs": [],
                                               "skipped": [], "errors": []})
    reason = skip_reason(plan, record["runs"], run_index)
    if reason:
        record["skipped"].append({"run": run_index + 1, "reason": reason})
        return
    image = None
    if run_index == 0:
        image = plan.workdir / "images" / state.spec.name / f"{cell.workload.name}-b{cell.batch}.npy"
        image.parent.mkdir(parents=True, exist_ok=True)
        record["image"] = str(image)
    worker = state.worker
    assert worker is not None
    plan.sequence.append((state.spec.name, cell.key, run_index + 1))
    t0, machine0 = time.perf_counter(), machine_busy_cpu_seconds()
    worker0, self0 = worker.cpu_seconds_now(), self_cpu_seconds()
    try:
        reply = worker.request(request_for(plan, cell, image), plan.run_timeout_s)
    except WorkerError as exc:  # the process is gone: keep the cells it finished, skip the rest
        record["errors"].append({"run": run_index + 1, "kind": "worker died", "error": str(exc)})
        state.result["died"] = f"{cell.key} run {run_index + 1}: {exc}"
        plan.log(f"  {state.spec.name} {cell.key} run {run_index + 1}: {exc}")
        stop(state, "main")
        return
    wall = time.perf_counter() - t0
    others = (machine_busy_cpu_seconds() - machine0) - (worker.cpu_seconds_now() - worker0) - (self_cpu_seconds() - self0)
    if not reply["ok"]:
        record["errors"].append({"run": run_index + 1, "kind": reply["kind"], "error": reply["error"]})
        plan.log(f"  {state.spec.name} {cell.key} run {run_index + 1}: {reply['kind']}: {reply['error']}")
        return
    stages = reply["stages"]
    record["runs"].append({
        "run": run_index + 1, "seconds": round(reply["seconds"], 4), "setup_seconds": round(reply["setup_seconds"], 4),
        "text_encoder_seconds": round(stages["text_encoder"], 4),
        "denoiser_step_seconds": [round(s, 4) for s in stages["denoiser_steps"]],
        "vae_decoder_seconds": round(stages["vae_decoder"], 4),
        "others_cpu_share": round(max(0.0, others) / max(wall * (os.cpu_count() or 1), 1e-9), 3),
        "rss_gib": round(reply["rss_gib"], 3), "peak_rss_gib": round(reply["peak_rss_gib"], 3)})
    state.result["info"].update(reply.get("info") or {})
    plan.log(f"  {state.spec.name:<26} {cell.key:<10} run {run_index + 1}: {reply['seconds']:.2f} s")


def run_group(plan: Plan, group: list[RunnerState]) -> None:
    """Cell by cell (each shape once: no backend recompiles or reloads between a cell's
    runs), and round-robin across the runners within a cell."""
    for cell in plan.cells:
        for run_index in range(plan.runs):
            shift = run_index % len(group)
            for state in group[shift:] + group[:shift]:
                if state.worker is not None:
                    measure(plan, state, cell, run_index)


# --- the whole schedule -------------------------------------------------------------


def run_all(plan: Plan, states: list[RunnerState]) -> list[list[str]]:
    """Measure every state whose status is "ok" so far; returns the groups (names)."""
    pending = [s for s in states if s.result["status"] == "ok"]
    groups: list[list[str]] = []
    while pending:
        group: list[RunnerState] = []
        while pending:
            need = (plan.memory_gib or pending[0].spec.memory_gib_for(plan.model)) + plan.growth_gib * len(group)
            if mem_available_gib() < need:
                if group:
                    break
                if not _wait_for_memory(plan, need):
                    state = pending.pop(0)
                    state.result["status"] = (f"not run: {mem_available_gib():.1f} GiB of memory available, "
                                              f"{need:g} GiB needed")
                    continue
            state = pending.pop(0)
            plan.log(f"{state.spec.name}: start (empty engine cache), load + first image")
            cold = start(plan, state, "empty")
            if cold is None:
                plan.log(f"{state.spec.name}: {state.result['status']}")
                continue
            state.result["cold_start"]["empty_cache"] = cold
            plan.log(f"{state.spec.name}: cold start {cold['total_seconds']:.1f} s")
            group.append(state)
        if not group:
            continue
        groups.append([s.spec.name for s in group])
        run_group(plan, group)
        for state in group:
            state.result["cells"] = state.cells
            if state.worker is not None:
                stop(state, "main")
        for state in group:
            if state.spec.cache_option and state.result["status"] == "ok":
                warm_start(plan, state)
            # A compiled SD1.5 UNet is ~3.4 GB per shape: drop each runner's engines once
            # it is done, so the disk holds only the live group's.
            shutil.rmtree(plan.workdir / "engine-cache" / state.spec.name, ignore_errors=True)
        if plan.after_group is not None and pending:
            plan.after_group(groups)
    return groups


def warm_start(plan: Plan, state: RunnerState) -> None:
    if time.perf_counter() > plan.deadline:
        state.result["cold_start"]["warm_cache"] = "not measured: total time budget spent"
        return
    plan.log(f"{state.spec.name}: start again (warm engine cache)")
    record = start(plan, state, "warm")
    if record is None:  # it ran before, so this is a failure, not a missing backend
        state.result["cold_start"]["warm_cache"] = f"failed: {state.result['status']}"
        state.result["status"] = "ok"
        return
    stop(state, "warm-start")
    state.result["cold_start"]["warm_cache"] = record


def _wait_for_memory(plan: Plan, need: float, wait_s: float = 120.0) -> bool:
    deadline = time.perf_counter() + wait_s
    while time.perf_counter() < deadline:
        if mem_available_gib() >= need:
            return True
        time.sleep(5)
    return mem_available_gib() >= need
