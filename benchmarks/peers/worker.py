"""The worker side of benchmarks/compare.py's runner protocol (stdlib + numpy only).

Every runner script (run_diffrt.py, run_diffusers.py, run_optimum_*.py) runs in its own
process, under its own venv's python, and calls `serve(load_fn)`. The harness talks to it
with JSON lines: one request on stdin, one reply on stdout.

    {"cmd": "load", "model": DIR, "options": {...}}
        -> {"ok": true, "seconds": s, "info": {...}}
    {"cmd": "generate", "prompt": ..., "preset": NAME | null, "scheduler": "lcm"|"dpmpp_2m"|"euler",
     "scheduler_config": {overrides}, "steps": n, "guidance_scale": g, "height": h, "width": w,
     "batch": b, "seed": s, "latents": PATH.npy, "image_out": PATH.npy | null}
        -> {"ok": true, "seconds": s, "setup_seconds": s, "stages": {"text_encoder": s,
            "denoiser_steps": [...], "vae_decoder": s}, "info": {...}, "rss_gib": x, "peak_rss_gib": y}
        (setup_seconds: the runner's optional `prepare(request)`, e.g. a static reshape and
        compile for a new shape, timed apart from the generation itself; preset: diffrt's
        name for the recipe, whose scheduler, overrides, steps and guidance the request
        spells out for the peers)
    {"cmd": "exit"}

A failure replies {"ok": false, "kind": "unavailable" | "failed", "error": ONE line}:
"unavailable" when the runner says the configuration cannot run here (`Unavailable`, an
ImportError, or whatever `unavailable_errors` the script names), "failed" otherwise
(its traceback goes to stderr, the worker's log).

Libraries print to stdout (progress bars, warnings), so the protocol gets a private
copy of fd 1 and fd 1 is pointed at stderr before anything else runs.

`python run_X.py --prepare SRC OUT` converts a checkpoint for that runner instead
(one-time work, e.g. optimum's own ONNX/OpenVINO export) and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

GIB = 2**30


class Unavailable(Exception):
    """This configuration cannot run here (missing backend, unsupported option, CPU lacks bf16)."""


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


class StageTimer:
    """Times a peer pipeline's stages by wrapping its components' call methods.

    `wrap(obj, "forward", "denoiser_steps")` replaces the bound method on the instance
    (torch modules and optimum's session wrappers call `self.forward` from `__call__`,
    diffusers calls `pipe.vae.decode`), so the pipeline's own code is untouched.
    """

    def __init__(self):
        self.calls: dict[str, list[float]] = {}

    def wrap(self, obj: Any, method: str, stage: str) -> None:
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.calls.setdefault(stage, []).append(time.perf_counter() - t0)

        setattr(obj, method, timed)

    def reset(self) -> None:
        self.calls = {}

    def stages(self) -> dict[str, Any]:
        """text_encoder and vae_decoder summed over their calls (CFG encodes twice);
        denoiser_steps: one entry per denoiser call."""
        return {
            "text_encoder": sum(self.calls.get("text_encoder", [])),
            "denoiser_steps": list(self.calls.get("denoiser_steps", [])),
            "vae_decoder": sum(self.calls.get("vae_decoder", [])),
        }


def load_latents(request: dict[str, Any]):
    import numpy as np

    latents = np.load(request["latents"])
    expected = (request["batch"], latents.shape[1], request["height"] // request["vae_scale_factor"],
                request["width"] // request["vae_scale_factor"])
    if latents.shape != expected:
        raise ValueError(f"latents {request['latents']} have shape {latents.shape}, expected {expected}")
    return latents


def save_image(request: dict[str, Any], images) -> None:
    import numpy as np

    if request.get("image_out"):
        np.save(request["image_out"], np.asarray(images, dtype=np.float32))


def _reply(stream, message: dict[str, Any]) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def _failure(exc: BaseException, unavailable_errors: tuple[type[BaseException], ...]) -> dict[str, Any]:
    unavailable = isinstance(exc, (Unavailable, ImportError, *unavailable_errors))
    traceback.print_exc(file=sys.stderr)  # to the worker's log
    # An unavailable configuration's own message is the one line the report shows.
    error = str(exc).strip().splitlines()[0] if unavailable and str(exc).strip() else one_line(exc)
    return {"ok": False, "kind": "unavailable" if unavailable else "failed", "error": error}


def serve(load: Callable[[str, dict[str, Any]], Any],
          prepare: Callable[[str, str], dict[str, Any]] | None = None,
          unavailable_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run the protocol loop. `load(model_dir, options)` returns an object whose
    `generate(request) -> (images NHWC float in [0, 1], stages dict)`, and whose `info`
    (a dict, optional) describes what it runs (versions, precision)."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if len(sys.argv) == 4 and sys.argv[1] == "--prepare":
        if prepare is None:
            raise SystemExit(f"{sys.argv[0]}: this runner needs no preparation")
        t0 = time.perf_counter()
        result = prepare(sys.argv[2], sys.argv[3])
        _reply(protocol, {"ok": True, "seconds": time.perf_counter() - t0, "peak_rss_gib": peak_rss_gib(), **result})
        return 0
    runner = None
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request.get("cmd")
        if cmd == "exit":
            break
        try:
            if cmd == "load":
                t0 = time.perf_counter()
                runner = load(request["model"], request.get("options") or {})
                seconds = time.perf_counter() - t0
                _reply(protocol, {"ok": True, "seconds": seconds, "info": getattr(runner, "info", {}),
                                  "rss_gib": rss_gib(), "peak_rss_gib": peak_rss_gib()})
            elif cmd == "generate":
                if runner is None:
                    raise RuntimeError("generate before load")
                t0 = time.perf_counter()
                if hasattr(runner, "prepare"):  # e.g. a static reshape + compile for this shape
                    runner.prepare(request)
                setup = time.perf_counter() - t0
                t0 = time.perf_counter()
                images, stages = runner.generate(request)
                seconds = time.perf_counter() - t0
                save_image(request, images)
                _reply(protocol, {"ok": True, "seconds": seconds, "setup_seconds": setup, "stages": stages,
                                  "info": getattr(runner, "info", {}), "rss_gib": rss_gib(),
                                  "peak_rss_gib": peak_rss_gib()})
            else:
                raise RuntimeError(f"unknown command {cmd!r}")
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reply; the harness decides
            _reply(protocol, _failure(exc, unavailable_errors))
    return 0
