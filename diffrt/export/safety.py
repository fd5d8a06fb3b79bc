"""The torch side of the optional safety-checker stage (`diffrt export --safety-checker`).

diffusers' StableDiffusionSafetyChecker is CLIP's vision tower, a projection, and two
tables of concept embeddings with a threshold each. The exported graph stops at the
cosine similarities between the image embedding and each concept (what the checker
compares with its thresholds); the thresholds go into the stage's facts, and the
runtime applies them, with diffusers' rounding and "special care" adjustment, in
numpy (diffrt.runtime.safety), so flags are decided exactly as diffusers decides them.

The CLIP image preprocessing config (a CLIPImageProcessor's preprocessor_config.json)
is copied into the artifact as the `feature_extractor` component: from FOLDER when it
has one, else from the checkpoint's own feature_extractor/, else CLIP's standard
settings at the vision tower's input size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffrt.artifacts import TensorSpec
from diffrt.errors import DiffrtError
from diffrt.export.checkpoint import quiet_library_progress
from diffrt.export.sd import StageModule
from diffrt.runtime.safety import (
    CONCEPT_OUTPUT,
    FEATURE_EXTRACTOR,
    INPUT,
    PREPROCESSOR_CONFIG,
    SAFETY_CHECKER,
    SPECIAL_OUTPUT,
    read_preprocessing,
)

# `--safety-checker checkpoint`: the source checkpoint's own safety_checker/ folder.
FROM_CHECKPOINT = "checkpoint"
NOT_ONE = ("a saved diffusers StableDiffusionSafetyChecker folder (config.json + weights), "
           f"or '{FROM_CHECKPOINT}' for the checkpoint's own safety_checker/")


class SafetyScoresStage(torch.nn.Module):
    """clip_input -> (special-care cosines, concept cosines), as the checker's forward
    computes them before thresholding."""

    def __init__(self, checker: torch.nn.Module):
        super().__init__()
        self.checker = checker

    def forward(self, clip_input):
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        pooled = self.checker.vision_model(clip_input)[1]
        embeds = self.checker.visual_projection(pooled)
        return (cosine_distance(embeds, self.checker.special_care_embeds),
                cosine_distance(embeds, self.checker.concept_embeds))


def resolve_folder(value: str | Path, checkpoint: Path) -> Path:
    return checkpoint / "safety_checker" if str(value) == FROM_CHECKPOINT else Path(value)


def load_checker(path: Path) -> torch.nn.Module:
    """The StableDiffusionSafetyChecker saved in `path`, or a one-line error."""
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )

    if not (path / "config.json").is_file():
        raise DiffrtError(f"--safety-checker {path}: no config.json there; give {NOT_ONE}")
    quiet_library_progress()
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict) or "vision_config" not in config:  # not a CLIPConfig (e.g. a UNet's)
            kind = config.get("_class_name") or config.get("architectures") if isinstance(config, dict) else None
            raise ValueError(f"its config.json is not a CLIP config{f' (it describes {kind})' if kind else ''}")
        checker, info = StableDiffusionSafetyChecker.from_pretrained(path, torch_dtype=torch.float32,
                                                                     output_loading_info=True)
        if info.get("missing_keys"):  # random weights would check nothing
            raise ValueError(f"its weights lack {len(info['missing_keys'])} of the checker's tensors, e.g. "
                             f"{min(info['missing_keys'])}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffrtError(f"--safety-checker {path}: cannot load it as a StableDiffusionSafetyChecker ({first}); "
                          f"give {NOT_ONE}") from None
    return checker.eval().requires_grad_(False)


def image_size(checker: torch.nn.Module) -> int:
    return int(checker.config.vision_config.image_size)


def stage_io(checker: torch.nn.Module) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    size = image_size(checker)
    return ((TensorSpec(INPUT, "float32", ("batch", 3, size, size)),),
            (TensorSpec(SPECIAL_OUTPUT, "float32", ("batch", int(checker.special_care_embeds.shape[0]))),
             TensorSpec(CONCEPT_OUTPUT, "float32", ("batch", int(checker.concept_embeds.shape[0])))))


def facts(checker: torch.nn.Module) -> dict[str, Any]:
    """The thresholds (float32 values, exact in JSON) and where the preprocessing config is."""
    return {"concept_thresholds": [float(w) for w in checker.concept_embeds_weights.tolist()],
            "special_thresholds": [float(w) for w in checker.special_care_embeds_weights.tolist()],
            "preprocessor_config": f"{FEATURE_EXTRACTOR}/{PREPROCESSOR_CONFIG}"}


def stage(checker: torch.nn.Module) -> StageModule:
    gen = torch.Generator().manual_seed(3)
    size = image_size(checker)
    return StageModule(SafetyScoresStage(checker), (torch.randn(2, 3, size, size, generator=gen),),
                       {INPUT: torch.randn(1, 3, size, size, generator=gen)}, weights=checker,
                       component=SAFETY_CHECKER)


def write_preprocessor(staging: Path, path: Path, checkpoint: Path, checker: torch.nn.Module) -> Path:
    """staging/feature_extractor/preprocessor_config.json, checked: it must crop to the
    size the vision tower takes, and the runtime must be able to follow it."""
    target = staging / FEATURE_EXTRACTOR / PREPROCESSOR_CONFIG
    target.parent.mkdir(parents=True, exist_ok=True)
    size = image_size(checker)
    origin = "CLIP's standard preprocessing"
    for source in (path / PREPROCESSOR_CONFIG, checkpoint / FEATURE_EXTRACTOR / PREPROCESSOR_CONFIG):
        if source.is_file():
            target.write_bytes(source.read_bytes())
            origin = str(source)
            break
    else:  # CLIPImageProcessor's defaults (what SD checkpoints' feature_extractor/ holds), at this tower's size
        target.write_text(json.dumps({
            "image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711]}, indent=2) + "\n", encoding="utf-8")
    preprocessing = read_preprocessing(target)  # a config the runtime cannot follow fails here, at export
    if preprocessing.crop != (size, size):
        raise DiffrtError(f"--safety-checker {path}: its preprocessing ({origin}) crops to "
                          f"{preprocessing.crop[0]}x{preprocessing.crop[1]}, its vision model takes {size}x{size}")
    return target
