"""Model families: which stages exist, their IO, how conditioning is built, defaults
and presets. Torch-free: both the exporter and the runtime import these.

A new family (sdxl, sd3, flux) arrives as one new file here plus its export module;
the runtime's denoising loop asks the family for its conditioning and latent layout.
"""

from __future__ import annotations

from diffrt.errors import DiffrtError
from diffrt.families import flux, sd, sd3, sdxl
from diffrt.families.presets import Preset

FAMILIES = {sd.NAME: sd, sdxl.NAME: sdxl, flux.NAME: flux, sd3.NAME: sd3}


def family_for_pipeline_class(class_name: str):
    """The family module that exports a diffusers pipeline class, or a one-line error."""
    for family in FAMILIES.values():
        if class_name in family.PIPELINE_CLASSES:
            return family
    supported = sorted(c for f in FAMILIES.values() for c in f.PIPELINE_CLASSES)
    raise DiffrtError(f"pipeline class {class_name!r} is not supported; supported: {', '.join(supported)}")


def get_family(name: str):
    if name not in FAMILIES:
        raise DiffrtError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


__all__ = ["FAMILIES", "Preset", "family_for_pipeline_class", "get_family"]
