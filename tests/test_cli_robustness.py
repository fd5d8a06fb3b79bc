"""The CLI under conditions a user does not plan for: a reader that goes away, folders
it cannot write, memory limits, conflicting flags, a demo pointed at the wrong folder.
Each ends with the work done or one line and exit 2, never a traceback."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_artifact
from PIL import Image


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffrt.cli", *args], capture_output=True, text=True, timeout=600,
                          **kwargs)


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _address_space_limit(nbytes: int):
    """preexec_fn: the child runs under `ulimit -v`."""
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))


def test_a_reader_that_goes_away_does_not_lose_the_image(exported, tmp_path):
    """`diffrt generate ... 2>&1 | head -n 1`: the pipe closes after the first line; the
    run still writes its image and ends normally."""
    out = tmp_path / "x.png"
    read, write = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "diffrt.cli", "generate", str(exported("sd15")), "a cat",
                             "--steps", "2", "-o", str(out)], stdout=write, stderr=write)
    os.close(write)
    with os.fdopen(read, "rb") as reader:
        first = reader.readline()
    assert proc.wait(timeout=600) == 0
    assert first and Image.open(out).size == (64, 64)


@pytest.mark.parametrize("make_out", [
    lambda tmp: tmp / "a-file" / "out",  # a "folder" that is a regular file
    lambda tmp: Path("/proc/diffrt-out"),  # a file system nobody can create folders in
])
def test_export_into_an_unwritable_place_is_one_line(tiny_checkpoint, tmp_path, make_out):
    (tmp_path / "a-file").write_text("not a folder")
    line = error_line(cli("export", str(tiny_checkpoint("sd15")), str(make_out(tmp_path))))
    assert str(make_out(tmp_path).parent) in line, line


def test_a_request_over_the_address_space_limit_is_refused_before_loading(exported, tmp_path):
    """`ulimit -v` counts: MemAvailable alone would let this through (and the process die)."""
    folder = copy_artifact(exported("sd15"), tmp_path / "artifact")
    (folder / "unet" / "model.onnx").write_bytes(b"x" * (folder / "unet" / "model.onnx").stat().st_size)
    line = error_line(cli("generate", str(folder), "a cat", "-n", "4000", "--steps", "1", "-o", str(tmp_path / "x.png"),
                          preexec_fn=_address_space_limit(4 * 2**30)))
    assert "64x64 with 4000 image(s) needs at least" in line and "available" in line, line


def test_a_backend_allocation_failure_is_one_line(exported, tmp_path):
    """A request under the up-front bound that the backend still cannot allocate (the
    bound is a lower bound): one line with the request's size, exit 2."""
    line = error_line(cli("generate", str(exported("sd15")), "a cat", "-n", "1500", "--steps", "1",
                          "-o", str(tmp_path / "x.png"), preexec_fn=_address_space_limit(4 * 2**30)))
    assert "64x64 with 1500 image(s) did not fit in memory" in line and "ran out of memory on inputs" in line, line
    assert "use a smaller size or fewer images" in line


def test_conflicting_verify_flags_are_refused(exported):
    result = cli("generate", str(exported("sd15")), "a cat", "--no-verify", "--verify-full")
    assert result.returncode == 2 and "not allowed with argument" in result.stderr, result.stderr


def test_demo_with_bad_settings_builds_nothing(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    line = error_line(cli("demo", "--steps", "0", "-o", str(tmp_path / "d.png"), env={**os.environ, "TMPDIR": str(temp)}))
    assert "num_inference_steps (--steps) must be an integer >= 1" in line
    line = error_line(cli("demo", "--scheduler", "heun", "-o", str(tmp_path / "d.png"),
                          env={**os.environ, "TMPDIR": str(temp)}))
    assert "unknown scheduler 'heun'" in line
    assert list(temp.iterdir()) == []  # no work folder made, none left behind


def test_demo_dir_never_nests_inside_another_folder(exported, tmp_path):
    artifact = copy_artifact(exported("sd15"), tmp_path / "artifact")
    line = error_line(cli("demo", "--dir", str(artifact), "-o", str(tmp_path / "d.png")))
    assert "holds an exported artifact; give a new or empty folder" in line
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    line = error_line(cli("demo", "--dir", str(tmp_path / "mine"), "-o", str(tmp_path / "d.png")))
    assert "holds files the demo did not make" in line
    assert sorted(p.name for p in artifact.iterdir()) == sorted(p.name for p in exported("sd15").iterdir()
                                                                  if p.name != "engines")


def test_serve_without_the_serve_extra_names_it(exported):
    """A runtime-only install has no fastapi/pydantic: one line naming the extra."""
    code = ("import sys; sys.modules['pydantic'] = None; from diffrt.cli import main; "
            f"sys.exit(main(['serve', {str(exported('sd15'))!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    line = error_line(result)
    assert "diffrt serve needs pydantic" in line and "'.[serve]'" in line, line


def test_serve_port_problems_are_one_line_before_loading(exported, tmp_path):
    pytest.importorskip("fastapi")
    folder = copy_artifact(exported("sd15"), tmp_path / "artifact")
    (folder / "unet" / "model.onnx").write_bytes(b"x" * (folder / "unet" / "model.onnx").stat().st_size)
    assert "--port must be from 1 to 65535, got 99999" in error_line(cli("serve", str(folder), "--port", "99999"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = error_line(cli("serve", str(folder), "--port", str(port)))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "choose another --port" in line, line
