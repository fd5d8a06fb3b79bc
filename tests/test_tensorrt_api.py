"""Every TensorRT name our code uses exists in the current TensorRT Python bindings.

No GPU and no TensorRT libraries here: the names come from the `tensorrt-cu13-bindings`
wheel (downloaded by .ci/run into the CI venv, or by this test into pytest's cache),
without loading it. Its extension module registers every class, method, property and
enum member with pybind11, which passes each name to the registration call as a C
string: the code loads the string's address with a RIP-relative `lea`. So the names are
the identifiers that the extension's code points at in .rodata. This reads exactly
those (not every string in the file: a name the linker merged into the tail of a longer
string, like "serialize" inside "deserialize", is still found, and a word that occurs
only inside a docstring is not).

The check is per name, not per class, except for enum members: pybind11 registers an
enum's members one after another, so the members of one enum form one run of
consecutive UPPER_CASE names in that order; a member we use must be in the run of a
member the enum is known to have (ANCHORS). That catches `trt.BuilderFlag.BF16` in
TensorRT 11, where BF16 remains only a DataType.
"""

from __future__ import annotations

import ast
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = (ROOT / "diffrt/build/tensorrt.py", ROOT / "diffrt/runtime/tensorrt_engines.py",
           ROOT / "diffrt/runtime/backends/tensorrt.py", ROOT / "diffrt/runtime/backends/tensorrt_runner.py")
# Pinned, as .ci/run pins it: the version this check was written against. Bump both on
# purpose (a newer TensorRT may remove a name we use; that is what this test is for).
WHEEL = "tensorrt-cu13-bindings==11.4.0.106"
WHEEL_GLOB = "tensorrt_cu13_bindings-11.4.0.106-*x86_64.whl"
PLATFORM = "manylinux_2_28_x86_64"  # the scan below reads x86-64 code, whatever machine runs the test
# Variables (or attributes) that hold TensorRT objects in the checked files, and what they are.
OBJECTS = {
    "builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser", "config": "IBuilderConfig",
    "opt_profile": "IOptimizationProfile", "timing": "ITimingCache", "tensor": "ITensor", "errors": "ParserError",
    "runtime": "Runtime", "engine": "ICudaEngine", "context": "IExecutionContext", "refitter": "Refitter",
}
OTHER_MODULES = ("cupy", "cp", "np", "numpy")
# Methods whose result is a TensorRT object used directly (`config.get_timing_cache().serialize()`).
RETURNS = {"get_timing_cache": "ITimingCache", "get_input": "ITensor", "get_error": "ParserError"}
# A member each enum we use is known to have, to find the enum's run of members.
ANCHORS = {"BuilderFlag": "REFIT", "DataType": "FLOAT", "MemoryPoolType": "WORKSPACE", "TensorIOMode": "INPUT",
           "NetworkDefinitionCreationFlag": "STRONGLY_TYPED", "Severity": "WARNING"}
_LEA = re.compile(rb"[\x48\x4c]\x8d[\x05\x0d\x15\x1d\x25\x2d\x35\x3d](....)", re.S)
_IDENT = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*\x00")
_ENUM_MEMBER = re.compile(r"[A-Z][A-Z0-9_]*")


# -- the wheel ----------------------------------------------------------------------------

def _wheel_dirs(cache_dir: Path) -> list[Path]:
    given = os.environ.get("DIFFRT_TRT_BINDINGS")
    return [Path(given)] if given else [Path(sys.prefix) / "trt-bindings", cache_dir]


def find_wheel(cache_dir: Path) -> Path:
    for place in _wheel_dirs(cache_dir):
        if place.is_file():
            return place
        wheels = sorted(place.glob(WHEEL_GLOB)) if place.is_dir() else []
        if wheels:
            return wheels[-1]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--platform",
               PLATFORM, "--dest", str(cache_dir), WHEEL]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    wheels = sorted(cache_dir.glob(WHEEL_GLOB))
    if result.returncode != 0 or not wheels:
        pytest.fail(f"cannot get the {WHEEL} wheel ({' '.join(command)} said: {result.stderr.strip()[-500:]}); "
                    "it is on PyPI: download it, then set DIFFRT_TRT_BINDINGS to the file")
    return wheels[-1]


def _sections(data: bytes) -> dict[str, tuple[int, int, int]]:
    """ELF64 little-endian section name -> (address, file offset, size)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1 or struct.unpack_from("<H", data, 0x12)[0] != 0x3E:
        raise ValueError("not an x86-64 ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * entsize) for i in range(count)]
    names_offset = headers[names_index][4]
    out = {}
    for name, _type, _flags, addr, offset, size in headers:
        start = names_offset + name
        out[data[start:data.index(b"\0", start)].decode()] = (addr, offset, size)
    return out


def registered_names(extension: bytes) -> list[str]:
    """The identifiers the extension's code loads from .rodata, in code order (x86-64)."""
    sections = _sections(extension)
    text_addr, text_off, text_size = sections[".text"]
    ro_addr, ro_off, ro_size = sections[".rodata"]
    text = extension[text_off:text_off + text_size]
    names = []
    for match in _LEA.finditer(text):
        target = text_addr + match.end() + struct.unpack("<i", match.group(1))[0]
        if ro_addr <= target < ro_addr + ro_size:
            ident = _IDENT.match(extension, ro_off + target - ro_addr)
            if ident:
                names.append(ident.group()[:-1].decode())
    return names


class Bindings:
    """What a tensorrt bindings wheel defines."""

    def __init__(self, wheel: Path):
        with zipfile.ZipFile(wheel) as archive:
            members = archive.namelist()
            extension = next(m for m in members if re.fullmatch(r"[^/]+/tensorrt[^/]*\.so", m))
            sequence = registered_names(archive.read(extension))
            python = [ast.parse(archive.read(m)) for m in members if m.endswith("/__init__.py")]
        self.version = re.search(r"-(\d+(?:\.\d+)+)-", wheel.name).group(1)
        self.names = set(sequence)
        for tree in python:  # names the package's Python part defines (__version__, Logger.Severity, ...)
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    self.names.add(node.name)
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    self.names.add(node.attr)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    self.names.add(node.id)
        self.runs: list[set[str]] = []  # runs of consecutive UPPER_CASE names: enum members
        run: list[str] = []
        for name in [*sequence, ""]:
            if _ENUM_MEMBER.fullmatch(name):
                run.append(name)
            elif run:
                self.runs.append(set(run))
                run = []

    def problems(self, uses: list[tuple[str, str]]) -> list[str]:
        out = []
        for where, dotted in uses:
            parts = dotted.split(".")
            missing = [p for p in parts[1:] if p not in self.names]
            if missing:
                out.append(f"{where}: {dotted}: {', '.join(missing)} not in TensorRT {self.version}")
                continue
            owner, member = parts[-2], parts[-1]
            if dotted.startswith("trt.") and len(parts) >= 3 and _ENUM_MEMBER.fullmatch(member):
                anchor = ANCHORS.get(owner)
                if anchor is None:
                    out.append(f"{where}: {dotted}: add an anchor member of {owner} to ANCHORS in this test")
                elif not any(member in run and anchor in run for run in self.runs):
                    out.append(f"{where}: {dotted}: {member} is not a member of {owner} in TensorRT {self.version}")
        return out


# -- what our code uses ------------------------------------------------------------------------

def _chain(node: ast.AST) -> list[str] | None:
    """trt.A.B -> ["trt", "A", "B"]; None when the chain is not rooted at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def _holder(node: ast.AST) -> str | None:
    """The TensorRT class of the object `node` evaluates to, from OBJECTS / RETURNS."""
    if isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Name):
        return OBJECTS.get(node.id)
    if isinstance(node, ast.Attribute):
        chain = _chain(node)
        if chain and chain[0] in OTHER_MODULES:  # cupy.cuda.runtime is not a trt.Runtime
            return None
        return OBJECTS.get(node.attr)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return RETURNS.get(node.func.attr)
    return None


def tensorrt_uses(source: str, filename: str = "<source>") -> list[tuple[str, str]]:
    """(file:line, dotted name) of every TensorRT name the source uses: attribute chains
    on the `trt` module, and attributes of objects that OBJECTS/RETURNS say are TensorRT's
    (written as Class.attribute)."""
    tree = ast.parse(source)
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    uses = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        where = f"{filename}:{node.lineno}"
        chain = _chain(node)
        if chain and chain[0] == "trt":
            if id(node) not in inner:  # the whole chain once, not each prefix
                uses.append((where, ".".join(chain)))
            continue
        holder = _holder(node.value)
        if holder is not None:
            uses.append((where, f"trt.{holder}.{node.attr}"))
    return uses


@pytest.fixture(scope="module")
def bindings(request) -> Bindings:
    cache_dir = Path(request.config.cache.mkdir("tensorrt-bindings"))
    return Bindings(find_wheel(cache_dir))


def our_uses() -> list[tuple[str, str]]:
    return [use for path in CHECKED for use in tensorrt_uses(path.read_text(encoding="utf-8"), path.name)]


def test_every_tensorrt_name_we_use_exists_in_the_current_bindings(bindings):
    uses = our_uses()
    used = {dotted for _, dotted in uses}
    # the checker sees the API it is meant to check (a walk that found nothing would pass vacuously)
    for expected in ("trt.Builder", "trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED", "trt.OnnxParser",
                     "trt.OnnxParser.parse_from_file", "trt.IBuilderConfig.set_timing_cache",
                     "trt.ITimingCache.serialize", "trt.Builder.build_serialized_network",
                     "trt.IBuilderConfig.builder_optimization_level", "trt.BuilderFlag.REFIT",
                     "trt.Runtime.deserialize_cuda_engine", "trt.IExecutionContext.execute_async_v3",
                     "trt.IExecutionContext.set_tensor_address", "trt.IExecutionContext.set_input_shape",
                     "trt.ICudaEngine.get_tensor_name", "trt.ICudaEngine.num_io_tensors", "trt.ParserError.desc",
                     # refit (TensorRTModel.update_weights)
                     "trt.Refitter", "trt.Refitter.set_named_weights", "trt.Refitter.get_missing_weights",
                     "trt.Refitter.refit_cuda_engine", "trt.ICudaEngine.refittable", "trt.Weights",
                     "trt.DataType.BF16", "trt.ICudaEngine.create_execution_context"):
        assert expected in used, expected
    assert bindings.problems(uses) == []


def test_the_checker_reports_removed_apis(bindings):
    removed = """
config.set_flag(trt.BuilderFlag.FP16)
config.set_flag(trt.BuilderFlag.BF16)
config.max_workspace_size = 1 << 30
engine = builder.build_engine(network, config)
name = engine.get_binding_name(0)
context.execute_async_v2(bindings, stream)
network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
"""
    problems = bindings.problems(tensorrt_uses(removed))
    assert len(problems) == 7, problems
    assert any("trt.BuilderFlag.FP16: FP16 not in TensorRT" in p for p in problems)
    assert any("trt.BuilderFlag.BF16: BF16 is not a member of BuilderFlag" in p for p in problems)
    assert any("build_engine" in p for p in problems) and any("EXPLICIT_BATCH" in p for p in problems)
    current = """
config.set_flag(trt.BuilderFlag.REFIT)
ok = context.execute_async_v3(stream.ptr)
dtype = trt.DataType.BF16
"""
    assert bindings.problems(tensorrt_uses(current)) == []
    assert "FP16" not in bindings.names and "serialize" in bindings.names  # a tail-merged name is found
