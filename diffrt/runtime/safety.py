"""The safety checker at run time (torch-free): CLIP image preprocessing, the concept
scores and flags, and what a policy does to a flagged image.

An artifact exported with `--safety-checker` has a `safety_checker` stage (diffusers'
StableDiffusionSafetyChecker up to its cosine similarities, diffrt/export/safety.py)
and a `feature_extractor/preprocessor_config.json`. After decoding, the batch is
preprocessed as transformers' CLIPImageProcessor does it (PIL backend: the images as
diffusers hands them to it, 8-bit; shortest side resized with PIL, centre crop,
rescale, normalize), scored by the stage, and judged here with diffusers' own rule:
per image, score = round(cosine - threshold + adjustment, 3), where the adjustment
becomes 0.01 once a "special care" concept scored above 0; an image is flagged when
any concept's score is above 0.

Policies: "off" (the stage is not run), "flag" (images unchanged, flags reported),
"blur" (flagged images blurred), "block" (flagged images black, as diffusers returns them).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from diffrt.errors import DiffrtError

logger = logging.getLogger(__name__)

SAFETY_CHECKER = "safety_checker"  # the stage's name and role
FEATURE_EXTRACTOR = "feature_extractor"  # the component folder holding the preprocessing config
PREPROCESSOR_CONFIG = "preprocessor_config.json"
INPUT = "clip_input"
SPECIAL_OUTPUT = "special_cos_dist"
CONCEPT_OUTPUT = "concept_cos_dist"
POLICIES = ("off", "flag", "blur", "block")
DEFAULT_POLICY = "flag"
# diffusers raises the concept scores by this once a special-care concept is found
SPECIAL_ADJUSTMENT = 0.01
# blur radius as a fraction of the image's longer side: enough to hide content, as a preview
BLUR_FRACTION = 1 / 24


@dataclass(frozen=True)
class Preprocessing:
    """What a CLIPImageProcessor config asks for (the fields diffusers' checkpoints use)."""

    shortest_edge: int | None  # None: no resize
    resample: int
    crop: tuple[int, int] | None  # (height, width); None: no crop
    rescale_factor: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None


@dataclass(frozen=True)
class Verdict:
    """One image's result: flagged, and diffusers' rounded scores per concept (> 0: crossed)."""

    flagged: bool
    concept_scores: tuple[float, ...]
    special_scores: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {"flagged": self.flagged, "concept_scores": list(self.concept_scores),
                "special_scores": list(self.special_scores)}


# The backends that run the stage from its ONNX graph (TensorRT needs an engine `diffrt build`
# does not make for it; the torch backend runs the source checkpoint's modules only).
BACKENDS = ("ort", "openvino")


def check_policy(policy: str | None, available: bool, backend: str | None = None) -> str:
    """The policy to run: None -> "flag" where the artifact has the stage (and `backend`
    runs it), else "off"; naming one other than "off" where it cannot run is a one-line error."""
    if policy is not None and policy not in POLICIES:
        raise DiffrtError(f"safety={policy!r}; choose one of: {', '.join(POLICIES)}")
    if available and backend is not None and backend not in BACKENDS:
        if policy in (None, "off"):
            if policy is None:
                logger.warning("the artifact's safety checker runs on %s, not %s: images are not checked",
                               " or ".join(BACKENDS), backend)
            return "off"
        raise DiffrtError(f"safety={policy!r}: the safety checker runs on the {' or '.join(BACKENDS)} backend, "
                          f"not {backend}; use one of those or safety='off'")
    if policy is None:
        return DEFAULT_POLICY if available else "off"
    if policy != "off" and not available:
        raise DiffrtError(f"safety={policy!r}: this artifact has no safety checker; export it with "
                          "--safety-checker FOLDER, or use safety='off'")
    return policy


def _size(value: Any, key: str) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping) and key in value:
        return int(value[key])
    return None


def read_preprocessing(path: Path) -> Preprocessing:
    """A CLIPImageProcessor preprocessor_config.json, or a one-line error naming the file."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DiffrtError(f"{path}: cannot read it as JSON ({exc})") from None
    size, crop = config.get("size", 224), config.get("crop_size", 224)
    shortest = _size(size, "shortest_edge")
    if config.get("do_resize", True) and shortest is None:
        raise DiffrtError(f"{path}: size={size!r}; the safety checker's preprocessing resizes the shortest "
                          "edge ({'shortest_edge': N}), as CLIPImageProcessor does")
    crop_hw = (crop, crop) if isinstance(crop, int) else (_size(crop, "height"), _size(crop, "width"))
    if config.get("do_center_crop", True) and None in crop_hw:
        raise DiffrtError(f"{path}: crop_size={crop!r}; give {{'height': H, 'width': W}}")
    normalize = config.get("do_normalize", True)
    return Preprocessing(
        shortest_edge=shortest if config.get("do_resize", True) else None,
        resample=int(config.get("resample", 3)),
        crop=crop_hw if config.get("do_center_crop", True) else None,
        rescale_factor=float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None,
        mean=tuple(config.get("image_mean", (0.48145466, 0.4578275, 0.40821073))) if normalize else None,
        std=tuple(config.get("image_std", (0.26862954, 0.26130258, 0.27577711))) if normalize else None,
    )


def _resize(image: Image.Image, shortest: int, resample: int) -> Image.Image:
    # transformers' get_resize_output_image_size(default_to_square=False): the long side truncated
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    size = (shortest, new_long) if width <= height else (new_long, shortest)
    return image.resize(size, resample=resample)


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    top, left = (pixels.shape[0] - height) // 2, (pixels.shape[1] - width) // 2
    if top < 0 or left < 0:  # CLIPImageProcessor pads with zeros; a resize to the crop size never needs it
        padded = np.zeros((max(height, pixels.shape[0]), max(width, pixels.shape[1]), pixels.shape[2]), pixels.dtype)
        t, l_ = max(-top, 0), max(-left, 0)
        padded[t:t + pixels.shape[0], l_:l_ + pixels.shape[1]] = pixels
        pixels, top, left = padded, max(top, 0), max(left, 0)
    return pixels[top:top + height, left:left + width]


def preprocess(images: np.ndarray, config: Preprocessing) -> np.ndarray:
    """float NHWC in [0, 1] (the decoded batch) -> the checker's NCHW float32 input.
    Images go through 8 bits first, as diffusers hands the checker PIL images."""
    pixels = (images * 255).round().astype(np.uint8)
    out = []
    for image in pixels:
        if config.shortest_edge is not None:
            image = np.asarray(_resize(Image.fromarray(image), config.shortest_edge, config.resample))
        if config.crop is not None:
            image = _center_crop(image, *config.crop)
        x = image.astype(np.float32)
        if config.rescale_factor is not None:
            x = (image.astype(np.float64) * config.rescale_factor).astype(np.float32)
        if config.mean is not None:
            x = (x - np.asarray(config.mean, np.float32)) / np.asarray(config.std, np.float32)
        out.append(x.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def judge(special: np.ndarray, concept: np.ndarray, facts: Mapping[str, Any]) -> list[Verdict]:
    """Cosines (batch, concepts) -> one Verdict per image, with diffusers' arithmetic:
    float32 cosines minus the (float32) thresholds, rounded to 3 decimals, in order,
    the adjustment raised by the first special-care concept found."""
    special_w = np.asarray(facts["special_thresholds"], np.float32)
    concept_w = np.asarray(facts["concept_thresholds"], np.float32)
    verdicts = []
    for special_row, concept_row in zip(special.astype(np.float32), concept.astype(np.float32)):
        adjustment, special_scores = 0.0, []
        for cos, threshold in zip(special_row, special_w):
            score = round(cos - float(threshold) + adjustment, 3)
            special_scores.append(round(float(score), 3))  # the float32 score, printed as diffusers rounds it
            if score > 0:
                adjustment = SPECIAL_ADJUSTMENT
        concept_scores = [round(float(round(cos - float(threshold) + adjustment, 3)), 3)
                          for cos, threshold in zip(concept_row, concept_w)]
        verdicts.append(Verdict(any(s > 0 for s in concept_scores), tuple(concept_scores), tuple(special_scores)))
    return verdicts


def apply_policy(images: np.ndarray, verdicts: Sequence[Verdict], policy: str) -> np.ndarray:
    """float NHWC in [0, 1] with the flagged images blurred or blacked out (a copy)."""
    flagged = [i for i, v in enumerate(verdicts) if v.flagged]
    if policy in ("off", "flag") or not flagged:
        return images
    images = images.copy()
    for i in flagged:
        images[i] = 0.0 if policy == "block" else blur(images[i])
    return images


def blur(image: np.ndarray) -> np.ndarray:
    radius = max(2.0, max(image.shape[:2]) * BLUR_FRACTION)
    pil = Image.fromarray((image * 255).round().astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(pil, dtype=np.float32) / np.float32(255.0)


def load_preprocessing(folder: Path, facts: Mapping[str, Any]) -> Preprocessing:
    return read_preprocessing(Path(folder) / facts["preprocessor_config"])


def run_checker(context: Any, preprocessing: Preprocessing, images: np.ndarray, to_device, to_host) -> list[Verdict]:
    """The decoded batch (float NHWC in [0, 1], on the host) -> one Verdict per image."""
    outputs = context.run({INPUT: to_device(preprocess(images, preprocessing))})
    return judge(to_host(outputs[SPECIAL_OUTPUT]), to_host(outputs[CONCEPT_OUTPUT]), context.spec.facts)
