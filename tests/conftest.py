"""Shared fixtures: tiny random-weight diffusers checkpoints and their exports, built
once per test session (seconds each)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

KINDS = ("sd15", "sd2", "lcm")  # and diffrt.export.tiny.SDXL_KINDS


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(kind) -> folder of a saved diffusers pipeline (cached per kind)."""
    from diffrt.export.tiny import SDXL_KINDS, make_tiny_sd, make_tiny_sdxl

    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            make = make_tiny_sdxl if kind in SDXL_KINDS else make_tiny_sd
            cache[kind] = make(tmp_path_factory.mktemp(f"ckpt-{kind}") / "checkpoint", kind=kind)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def exported(tiny_checkpoint, tmp_path_factory):
    """exported(kind) -> artifact folder of the tiny checkpoint of that kind (cached)."""
    from diffrt.export import export

    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            out = tmp_path_factory.mktemp(f"art-{kind}") / "artifact"
            export(tiny_checkpoint(kind), out)
            cache[kind] = out
        return cache[kind]

    return get


def copy_artifact(src: Path, dst: Path) -> Path:
    """A private copy of a shared test artifact, without the engines/ cache folder that
    loads write into it (stamps, compiled engines), so a test starts from a clean export."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("engines"))
    return dst


@pytest.fixture(scope="session", autouse=True)
def _stamp_key(tmp_path_factory):
    """Verification stamps are keyed by a per-account secret (diffrt/stamps.py): tests,
    and the processes they start, use their own key, never the one in ~/.config."""
    os.environ["DIFFRT_STAMP_KEY_FILE"] = str(tmp_path_factory.mktemp("stamp-key") / "stamp.key")


@pytest.fixture(autouse=True)
def _run_in_a_temp_folder(tmp_path, monkeypatch):
    """The CLI writes out.png / demo.png into the working folder by default: run every
    test (and the subprocesses it starts) in its own temp folder, never the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("diffrt").setLevel(logging.WARNING)
    yield


def bf16_instructions() -> list[str]:
    """The bf16 dot-product instructions this CPU has, read straight from /proc/cpuinfo
    (not through diffrt's own CPU detection, which the tests check)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    flags = next((line.partition(":")[2].split() for line in text.splitlines()
                  if line.lower().startswith(("flags", "features"))), [])
    return [f for f in ("avx512_bf16", "amx_bf16", "bf16") if f in flags]


# Tests that compute in bf16 for real; on other CPUs they are skipped with what is missing.
requires_bf16_cpu = pytest.mark.skipif(
    not bf16_instructions(),
    reason="computing in bf16 needs AVX512_BF16 or AMX_BF16 (x86) or BF16 (ARM), which this CPU lacks",
)
