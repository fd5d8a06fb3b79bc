"""Runner: diffrt on its exported artifact (main venv). One diffrt configuration per
process: options {"load": Pipeline.load kwargs, "call": extra pipe(...) kwargs}.

A configuration this diffrt cannot run (a backend not built or not installed, an option
the pipeline does not take yet) is reported "unavailable" with the error's one line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from worker import Unavailable, load_latents, serve  # noqa: E402

from diffrt import __version__  # noqa: E402
from diffrt.errors import DiffrtError  # noqa: E402
from diffrt.runtime.pipeline import Pipeline  # noqa: E402


class DiffrtRunner:
    def __init__(self, artifact: str, options: dict[str, Any]):
        self.load_kwargs = dict(options.get("load") or {})
        self.call_kwargs = dict(options.get("call") or {})
        self.warmup_new_shapes = bool(options.get("warmup_new_shapes"))
        self.shapes_seen: set[tuple[int, int, int, bool]] = set()
        self.pipe = Pipeline.load(artifact, **self.load_kwargs)
        describe = getattr(self.pipe.backend, "describe", None)
        self.info = {"diffrt": __version__, "backend": describe() if describe else self.load_kwargs.get("backend"),
                     "load_kwargs": self.load_kwargs, "call_kwargs": self.call_kwargs}

    def prepare(self, request: dict[str, Any]) -> None:
        """Backends that compile per shape (OpenVINO) compile on the first call at a new
        shape; with `warmup_new_shapes`, one untimed 1-step call at that shape does it here
        (the worker reports it as setup_seconds), so a cell's timed runs are steady state."""
        shape = (request["height"], request["width"], request["batch"], request["guidance_scale"] > 1.0)
        if shape in self.shapes_seen:
            return
        self.shapes_seen.add(shape)
        if self.warmup_new_shapes and len(self.shapes_seen) > 1:  # the very first call is the cold start
            self._call({**request, "steps": 1})

    def generate(self, request: dict[str, Any]):
        result = self._call(request)
        t = result.timings
        calls = t["denoiser_calls"] if "denoiser_calls" in t else t["denoiser_steps"]  # renamed in diffrt 0.1
        stages = {"text_encoder": t["text_encoder"], "denoiser_steps": list(calls), "vae_decoder": t["vae_decoder"]}
        return result.images, stages

    def _call(self, request: dict[str, Any]):
        # A preset (e.g. sdxl-lightning-4step) brings its scheduler config overrides; the
        # explicit scheduler, steps and guidance equal the preset's.
        preset = {"preset": request["preset"]} if request.get("preset") else {}
        try:
            return self.pipe(
                request["prompt"],
                num_inference_steps=request["steps"],
                guidance_scale=request["guidance_scale"],
                height=request["height"],
                width=request["width"],
                num_images_per_prompt=request["batch"],
                scheduler=request["scheduler"],
                latents=load_latents(request),
                seed=request["seed"],
                output_type="np",
                **preset,
                **self.call_kwargs,
            )
        except TypeError as exc:
            if "unexpected keyword argument" in str(exc):  # an option this diffrt does not take yet
                raise Unavailable(str(exc)) from None
            raise


def load(artifact: str, options: dict[str, Any]) -> DiffrtRunner:
    try:
        return DiffrtRunner(artifact, options)
    except TypeError as exc:  # e.g. a backend option this backend does not take
        if "unexpected keyword argument" in str(exc):
            raise Unavailable(str(exc)) from None
        raise


if __name__ == "__main__":
    sys.exit(serve(load, unavailable_errors=(DiffrtError,)))
