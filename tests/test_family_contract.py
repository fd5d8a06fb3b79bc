"""The typed family contract (diffrt/families/base.py): every registered family
satisfies the Family protocol, reads its model facts strictly from a real export, and
the runtime validates a request once."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import copy_artifact

from diffrt.artifacts import read_manifest
from diffrt.errors import ArtifactError, DiffrtError
from diffrt.families import FAMILIES
from diffrt.families.base import Family
from diffrt.runtime.pipeline import Pipeline

KINDS = {"sd": "sd15", "sdxl": "sdxl"}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_satisfies_the_protocol(name):
    family = FAMILIES[name]
    assert isinstance(family, Family), [m for m in dir(Family) if not m.startswith("_") and not hasattr(family, m)]
    assert dataclasses.is_dataclass(family.Facts) and family.Facts.__dataclass_params__.frozen
    assert dataclasses.is_dataclass(family.Options) and family.Options.__dataclass_params__.frozen


@pytest.mark.parametrize("name", sorted(KINDS))
def test_an_exported_manifest_reads_as_typed_facts(exported, name):
    """Every key the exporter wrote is a field of the family's facts (none dropped), and
    a misspelled or missing fact is refused by name, not silently defaulted."""
    family = FAMILIES[name]
    model = read_manifest(exported(KINDS[name])).model
    facts = family.facts(model)
    fields = {f.name for f in dataclasses.fields(family.Facts)}
    assert set(model) <= fields
    for key, value in model.items():
        got = getattr(facts, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    misspelled = {**{k: v for k, v in model.items() if k != "vae_scale_factor"}, "vae_scalefactor": 8}
    with pytest.raises(ArtifactError, match="vae_scalefactor are not .*Facts facts"):
        family.facts(misspelled)
    with pytest.raises(ArtifactError, match="model facts vae_scale_factor are missing"):
        family.facts({k: v for k, v in model.items() if k != "vae_scale_factor"})


def test_a_family_option_of_another_family_is_refused_by_name(exported):
    with Pipeline.load(exported("sdxl")) as pipe:
        with pytest.raises(DiffrtError, match="original_sise: not an option of SDXL artifacts; they take prompt_2"):
            pipe.request("a cat", original_sise=(64, 64))
        request = pipe.request("a cat", prompt_2="oil", original_size=(80, 96))
    assert request.options.prompt_2 == ("oil",) and request.options.original_size == (80, 96)


def test_a_request_is_validated_once(exported, monkeypatch):
    """The scheduler is built once per request (when it is validated) and the generation
    runs the request as it is: no second construction, no re-validation."""
    from diffrt.runtime import request as request_module

    built = []
    real = request_module.make_scheduler
    monkeypatch.setattr(request_module, "make_scheduler", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    with Pipeline.load(exported("sd15")) as pipe:
        request = pipe.request("a cat", num_inference_steps=2, scheduler="euler", output_type="np")
        assert built == ["euler"]
        pipe.generate([request, dataclasses.replace(request, seed=request.seed + 7)])
        pipe("a dog", num_inference_steps=2, scheduler="ddim", output_type="np")
    assert built == ["euler", "ddim"]


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda m: m["model"].__setitem__("vae_scale_factor", 0), "vae_scale_factor must be a positive integer, got 0"),
    (lambda m: m.__setitem__("stages", list(m["stages"].values())), "is malformed"),
    (lambda m: m["stages"]["unet"].__setitem__("files", []), "stage unet lists no files"),
])
def test_a_malformed_manifest_is_one_line(exported, tmp_path, edit, fragment):
    folder = copy_artifact(exported("sd15"), tmp_path / "artifact")
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=fragment) as info:
        Pipeline.load(folder)
    assert "\n" not in str(info.value)


def test_a_deeply_nested_manifest_is_one_line(exported, tmp_path):
    folder = copy_artifact(exported("sd15"), tmp_path / "artifact")
    (folder / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ArtifactError, match="nested too deeply"):
        read_manifest(folder)


def test_latent_shapes_come_from_the_vae(exported):
    """The initial noise has the VAE's latent channels (a 9-channel inpainting UNet takes
    more): the request's latents are checked against that shape."""
    with Pipeline.load(exported("sd15")) as pipe:
        shape = pipe.family.latent_shape(pipe.facts, 2, 64, 48)
        assert shape == (2, pipe.facts.noise_channels, 32, 24)
        with pytest.raises(DiffrtError, match=r"latents must have shape \(2, 4, 32, 24\)"):
            pipe.request("a cat", num_images_per_prompt=2, height=64, width=48, latents=np.zeros((2, 9, 32, 24)))


def test_no_family_is_named_outside_the_family_and_export_files():
    """The loop, requests, backends, server and CLI ask the family (its functions and
    facts), never which family it is: a new family is a new file, not a new branch."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "diffrt"
    branch = re.compile(r"\b(NAME|\.family|family)\s*(==|!=)|\bNAME\s+(not\s+)?in\b|[\"'](sd|sdxl|sd3|flux)[\"']\s*(==|!=)")
    files = [*(root / "runtime").rglob("*.py"), *(root / "serve").rglob("*.py"), root / "cli.py",
             root / "torch_backend.py", *(root / "build").rglob("*.py")]
    found = [f"{path.relative_to(root)}:{n}: {line.strip()}" for path in files
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
             if branch.search(line) and "CLASS_NAME ==" not in line]
    assert found == []
