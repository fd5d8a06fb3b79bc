"""The harness side of the runner protocol (benchmarks/peers/worker.py): start a runner
script under its venv's python, send JSON-line requests, read replies, and collect the
process's own peak RSS (wait4) when it exits. Also the shared machine's CPU accounting,
so a slow run next to a busy neighbour can be told apart from a slow runner."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness.specs import KINDS, PEERS, RunnerSpec

GIB = 2**30
NOT_INSTALLED = "not installed (run bash benchmarks/peers/setup.sh)"


def runner_python(spec: RunnerSpec, venv_root: Path) -> Path | None:
    """The python that runs `spec`: this one for main-venv runners, else the peer's venv
    (None when that venv is missing)."""
    venv = KINDS[spec.kind].venv
    if venv is None:
        return Path(sys.executable)
    python = venv_root / venv / "bin" / "python"
    return python if python.exists() else None


def runner_script(spec: RunnerSpec) -> Path:
    return PEERS / KINDS[spec.kind].script


class WorkerError(Exception):
    """The worker died, timed out, or replied with something that is not the protocol."""


class Worker:
    """One runner process. `request()` returns the reply dict (ok true or false)."""

    def __init__(self, spec: RunnerSpec, python: Path, log_path: Path, env: dict[str, str] | None = None):
        self.spec = spec
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([str(python), str(runner_script(spec))], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, env=env)
        self.peak_rss_gib: float | None = None
        self.cpu_seconds: float | None = None

    def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise WorkerError(f"the worker exited{self._status_text(10.0)}; see its log") from None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.kill()
            raise WorkerError(f"no reply within {timeout:.0f}s; the worker was killed")
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"the worker exited{self._status_text(10.0)}; see its log")
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            raise WorkerError(f"not a protocol line: {line[:200]!r}") from None

    def cpu_seconds_now(self) -> float:
        """user + system CPU seconds of the worker so far (/proc/PID/stat)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def close(self, timeout: float = 60.0) -> None:
        """Ask the worker to exit, reap it, and keep its peak RSS (its own ru_maxrss)."""
        if self.proc.returncode is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"cmd": "exit"}\n')
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            if not self._reap(timeout):
                self.kill()
        self._log.close()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            self._reap(30.0)

    def _reap(self, timeout: float) -> bool:
        """wait4 (not Popen.poll, which would reap without the rusage) until it exits."""
        deadline = time.perf_counter() + timeout
        while self.proc.returncode is None:
            try:
                pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            except ChildProcessError:
                return True
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.peak_rss_gib = usage.ru_maxrss * 1024 / GIB
                self.cpu_seconds = usage.ru_utime + usage.ru_stime
                return True
            if time.perf_counter() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _status_text(self, timeout: float) -> str:
        self._reap(timeout)
        status = self.proc.returncode
        if status is None:
            return ""
        return f" with status {status}" + (" (SIGKILL: out of memory?)" if status == -9 else "")


def machine_busy_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return float("inf")
