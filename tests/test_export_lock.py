"""One exporter per OUT (issue 15, item 11): a second export into the same OUT is
refused while the first runs, publishing never removes a folder the export did not
expect to replace, and a killed export's staging folder is removed by the next export
into the same parent. The first exporter is a real process, paused mid-export on a
pipe (no timing: it waits until the test writes a line)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffrt.errors import DiffrtError
from diffrt.export import _apply_umask_modes as REAL_APPLY_MODES
from diffrt.verification import load_artifact

# A real export in its own process that stops, holding its lock, right before it
# writes the artifact, until a line arrives on stdin.
PAUSED_EXPORT = """
import sys
import diffrt.export as export_module

real = export_module._export_into

def paused(*args, **kwargs):
    print("exporting", flush=True)
    sys.stdin.readline()
    return real(*args, **kwargs)

export_module._export_into = paused
export_module.export(sys.argv[1], sys.argv[2])
print("done", flush=True)
"""


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffrt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def paused_export(src: Path, out: Path) -> subprocess.Popen:
    """Start an exporter and return once it holds OUT's lock and is inside the export."""
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_EXPORT, str(src), str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line == "exporting\n", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def resume(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(input="\n", timeout=300)
    assert proc.returncode == 0 and out == "done\n", err[-3000:]
    return out, err


def test_a_second_export_into_the_same_out_is_refused(tiny_checkpoint, tmp_path):
    src, out = tiny_checkpoint("sd15"), tmp_path / "art"
    first = paused_export(src, out)
    try:
        line = error_line(cli("export", src, out))
        assert f"another export into {out} is running (process {first.pid})" in line
        line = error_line(cli("export", src, out, "--overwrite"))
        assert "another export into" in line
        assert not out.exists()
    finally:
        if first.poll() is None:
            resume(first)
    load_artifact(out, check_hashes="full")  # the first export finished, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no lock file or staging left behind


def test_a_killed_exports_staging_folder_is_removed_by_the_next_export(tiny_checkpoint, tmp_path, quick_export):
    src = tiny_checkpoint("sd15")
    killed = paused_export(src, tmp_path / "killed")
    killed.kill()
    killed.communicate(timeout=60)
    orphan = tmp_path / f".killed.partial-{killed.pid}"
    assert orphan.is_dir()  # what SIGKILL leaves
    running = paused_export(src, tmp_path / "running")  # alive: its staging folder must stay
    try:
        live = tmp_path / f".running.partial-{running.pid}"
        assert live.is_dir()
        quick_export(src, tmp_path / "other")
        assert not orphan.exists() and live.is_dir()
    finally:
        resume(running)
    load_artifact(tmp_path / "running", check_hashes="full")
    assert not live.exists()


@pytest.fixture()
def quick_export(monkeypatch):
    """export() with its publishing and locking, but a one-file artifact instead of the
    ONNX export (what publishing does does not depend on the contents)."""
    import diffrt.export as export_module

    def write(staging, *args, **kwargs):
        (staging / "manifest.json").write_text("{}")
        return None

    monkeypatch.setattr(export_module, "_export_into", write)
    return export_module.export


def _during_export(monkeypatch, action):
    """Run `action()` inside the export, after the artifact is written, before publishing."""
    import diffrt.export as export_module

    def then_act(folder):
        REAL_APPLY_MODES(folder)
        action()

    monkeypatch.setattr(export_module, "_apply_umask_modes", then_act)


def test_a_folder_that_appears_at_out_during_the_export_is_not_removed(tiny_checkpoint, tmp_path, monkeypatch,
                                                                         quick_export):
    out = tmp_path / "art"

    def someone_writes_there():
        out.mkdir()
        (out / "notes.txt").write_text("mine")

    _during_export(monkeypatch, someone_writes_there)
    with pytest.raises(DiffrtError, match="appeared while exporting"):
        quick_export(tiny_checkpoint("sd15"), out)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # our staging folder is gone

    # an empty folder is not silently replaced either (a plain rename would replace it)
    empty = tmp_path / "empty-out"
    _during_export(monkeypatch, empty.mkdir)
    with pytest.raises(DiffrtError, match="appeared while exporting"):
        quick_export(tiny_checkpoint("sd15"), empty)
    assert empty.is_dir() and not any(empty.iterdir())


def test_overwrite_replaces_only_the_artifact_it_found(tiny_checkpoint, tmp_path, monkeypatch, quick_export):
    out = tmp_path / "art"
    quick_export(tiny_checkpoint("sd15"), out)
    inode = out.stat().st_ino

    def swap_in_another_folder():
        os.rename(out, tmp_path / "moved")
        out.mkdir()
        (out / "notes.txt").write_text("mine")

    _during_export(monkeypatch, swap_in_another_folder)
    with pytest.raises(DiffrtError, match="was replaced or removed while exporting"):
        quick_export(tiny_checkpoint("sd15"), out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (tmp_path / "moved").stat().st_ino == inode
    _during_export(monkeypatch, lambda: None)

    # --overwrite refuses what is not an artifact (nor empty): it would delete it
    with pytest.raises(DiffrtError, match="not a diffrt artifact folder .* remove it yourself"):
        quick_export(tiny_checkpoint("sd15"), out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
