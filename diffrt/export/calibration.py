"""Calibration inputs for int8 quantization, drawn from the pipeline itself.

The fp32 pipeline runs a few steps on each of a list of prompts (the list that ships
with diffrt, diffrt/data/calibration_prompts.txt, or the user's) and the inputs of the
stages being quantized are recorded as they are fed: the denoiser's sample, timestep
and text conditioning at every step (noise levels from the first step to the last),
the text encoders' token ids. No dataset is downloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from diffrt.errors import DiffrtError

logger = logging.getLogger(__name__)

PROMPTS_RESOURCE = "data/calibration_prompts.txt"


def default_prompts() -> list[str]:
    """The ~32 varied prompts that ship with diffrt."""
    return _parse(resources.files("diffrt").joinpath(PROMPTS_RESOURCE).read_text(encoding="utf-8"))


def read_prompts(path: str | Path | None) -> list[str]:
    """Prompts from a file (one per line; blank lines and '#' comments skipped), or the
    shipped list when `path` is None."""
    if path is None:
        return default_prompts()
    try:
        prompts = _parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DiffrtError(f"--prompts {path}: cannot be read ({exc}); give a text file with one prompt per line") \
            from None
    if len(prompts) < 2:
        raise DiffrtError(f"--prompts {path}: holds {len(prompts)} prompt(s); give at least 2 (one per line), "
                          "some to calibrate and one to measure the error on")
    return prompts


def _parse(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@dataclass(frozen=True)
class CalibrationSettings:
    """How the calibration inputs are drawn: `steps` denoising steps per prompt at
    `height` x `width` with the artifact's default scheduler and guidance."""

    steps: int = 4
    height: int = 256
    width: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 50:
            raise DiffrtError(f"--calibration-steps {self.steps}: use 1 to 50")

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "height": self.height, "width": self.width, "seed": self.seed}


class _Recording:
    """A context that records (a host copy of) every feed before running it."""

    def __init__(self, inner, sink: list[dict[str, np.ndarray]], to_host):
        self._inner, self._sink, self._to_host = inner, sink, to_host

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        self._sink.append({k: np.array(self._to_host(v), copy=True) for k, v in feeds.items()})
        return self._inner.run(feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextmanager
def recording(pipe, roles: Sequence[str]) -> Iterator[dict[str, list[dict[str, np.ndarray]]]]:
    """While inside, every run of these roles' stages on `pipe` records its feeds."""
    contexts = pipe._contexts  # the pipeline's own per-role contexts (one worker: this thread)
    saved = {role: contexts[role] for role in roles}
    records: dict[str, list[dict[str, np.ndarray]]] = {role: [] for role in roles}
    try:
        for role in roles:
            contexts[role] = _Recording(saved[role], records[role], pipe._to_host)
        yield records
    finally:
        contexts.update(saved)


def collect(folder: Path, roles: Sequence[str], prompts: Sequence[str],
            settings: CalibrationSettings, cache_dir: Path) -> dict[str, list[dict[str, np.ndarray]]]:
    """Run the fp32 pipeline (ONNX Runtime, portable attention) on `prompts`; the feeds
    each role's stage got, in order, all prompts together."""
    from diffrt.runtime.pipeline import Pipeline

    records: dict[str, list[dict[str, np.ndarray]]] = {role: [] for role in roles}
    with Pipeline.load(folder, backend="ort", verify="size", cache_dir=cache_dir, attention="portable",
                       graph_precision="fp32", prepare={"height": settings.height, "width": settings.width}) as pipe:
        for index, prompt in enumerate(prompts):
            with recording(pipe, roles) as got:
                pipe(prompt, num_inference_steps=settings.steps, seed=settings.seed + index,
                     height=settings.height, width=settings.width, output_type="latent")
            for role in roles:
                records[role].extend(got[role])
    logger.info("calibration: %s", ", ".join(f"{r}: {len(v)} inputs" for r, v in records.items()))
    return records


__all__ = ["CalibrationSettings", "collect", "default_prompts", "read_prompts", "recording"]
