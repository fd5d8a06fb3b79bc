"""Decoded VAE output -> images, exactly as diffusers' VaeImageProcessor.postprocess."""

from __future__ import annotations

import numpy as np
from PIL import Image


def postprocess(decoded: np.ndarray) -> np.ndarray:
    """VAE output (NCHW, [-1, 1]) -> float32 NHWC in [0, 1]."""
    images = np.clip(decoded / np.float32(2.0) + np.float32(0.5), 0.0, 1.0)
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1), dtype=np.float32)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """float NHWC in [0, 1] -> PIL images (diffusers' numpy_to_pil rounding)."""
    pixels = (images * 255).round().astype(np.uint8)
    return [Image.fromarray(p) for p in pixels]
