"""Load and soak benchmark of `diffrt serve` over HTTP on 127.0.0.1.

Load: for each server setting (--max-batch 1, i.e. no batching, and --max-batch N) and
each concurrency level, closed-loop clients send the same-shaped request for a fixed
count; reports throughput (images/s) and latency percentiles (p50/p90/p99) to one JSON
file under benchmarks/results/.

    python benchmarks/serve_load.py ARTIFACT [--concurrency 1,2,4,8] [--requests 24]
    python benchmarks/serve_load.py --tiny            # builds a tiny random SD model (export extra)

Soak: a bounded run of mixed valid and invalid traffic; reports the 5xx count, the
server's RSS growth and lost requests (sent but never answered):

    python benchmarks/serve_load.py --tiny --soak-minutes 10
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_util import request  # noqa: E402

from diffrt.runtime.cpu import cpu_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, artifact: str, *options: str):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "diffrt.cli", "-q", "serve", artifact, "--port",
                                      str(self.port), "--max-queue", "1000", *options],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if request(self.port, "GET", "/readyz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not get ready in 120s")
            time.sleep(0.1)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def load_level(port: int, body: dict, concurrency: int, count: int) -> dict:
    latencies: list[float] = []
    errors: list[int] = []
    lock = threading.Lock()
    todo = list(range(count))

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            t0 = time.perf_counter()
            status, _, answer = request(port, "POST", "/v1/generate", {**body, "seed": i}, timeout=600)
            with lock:
                (latencies if status == 200 else errors).append(time.perf_counter() - t0 if status == 200 else status)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    images = len(latencies) * body.get("n", 1)
    return {"concurrency": concurrency, "requests": count, "ok": len(latencies), "errors": errors,
            "seconds": round(wall, 3), "images_per_s": round(images / wall, 3),
            "latency_s": {p: round(percentile(latencies, q), 3) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))}
            if latencies else {}}


def run_load(artifact: str, args) -> dict:
    body = {"prompt": "a photo of a cat", "num_inference_steps": args.steps, "size": args.size}
    runs = []
    for max_batch in (1, args.max_batch):
        server = Server(artifact, "--max-batch", str(max_batch), "--batch-wait-ms", str(args.batch_wait_ms))
        try:
            load_level(server.port, body, 1, 2)  # warm the shapes
            for concurrency in args.concurrency:
                result = {"max_batch": max_batch, **load_level(server.port, body, concurrency, args.requests)}
                print(json.dumps(result), flush=True)
                runs.append(result)
        finally:
            server.stop()
    return {"request": body, "batch_wait_ms": args.batch_wait_ms, "runs": runs}


SOAK_BODIES = [
    ({"prompt": "a cat", "num_inference_steps": 2, "size": "64x64"}, 200),
    ({"prompt": "a dog", "num_inference_steps": 1, "size": "32x32", "n": 2, "output_format": "jpeg"}, 200),
    ({"prompt": ""}, 400),
    ({"prompt": "x", "size": "63x64"}, 400),
    ({"prompt": "x", "scheduler": "nope"}, 400),
    (b"{broken", 400),
]


def run_soak(artifact: str, args) -> dict:
    server = Server(artifact, "--max-batch", str(args.max_batch))
    sent = answered = fivexx = unexpected = 0
    lock = threading.Lock()
    end = time.monotonic() + args.soak_minutes * 60
    rss = [rss_mb(server.proc.pid)]
    rng = random.Random(0)

    def client():
        nonlocal sent, answered, fivexx, unexpected
        while time.monotonic() < end:
            body, expect = rng.choice(SOAK_BODIES)
            with lock:
                sent += 1
            try:
                status = request(server.port, "POST", "/v1/generate", body, timeout=600)[0]
            except OSError:
                continue
            with lock:
                answered += 1
                fivexx += status >= 500
                unexpected += status != expect

    threads = [threading.Thread(target=client) for _ in range(args.soak_clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        rss.append(rss_mb(server.proc.pid))
    for t in threads:
        t.join()
    exit_code = server.stop()
    result = {"minutes": args.soak_minutes, "clients": args.soak_clients, "sent": sent, "answered": answered,
              "lost": sent - answered, "5xx": fivexx, "unexpected_status": unexpected,
              "rss_mb_start": round(rss[0], 1), "rss_mb_end": round(rss[-1], 1),
              "rss_mb_growth": round(rss[-1] - rss[1] if len(rss) > 2 else 0.0, 1),
              "rss_mb_max": round(max(rss), 1), "server_exit_code": exit_code}
    print(json.dumps(result), flush=True)
    return result


def tiny_artifact(folder: Path) -> str:
    from diffrt.export import export
    from diffrt.export.tiny import make_tiny_sd

    export(make_tiny_sd(folder / "checkpoint"), folder / "artifact")
    return str(folder / "artifact")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", nargs="?", help="artifact folder (or --tiny)")
    parser.add_argument("--tiny", action="store_true", help="build and serve a tiny random SD model (64x64)")
    parser.add_argument("--concurrency", default="1,2,4,8", help="client counts (default 1,2,4,8)")
    parser.add_argument("--requests", type=int, default=24, help="requests per level (default 24)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--max-batch", type=int, default=8, help="the batched server's --max-batch (default 8)")
    parser.add_argument("--batch-wait-ms", type=float, default=10)
    parser.add_argument("--soak-minutes", type=float, default=None, help="run the soak instead of the load test")
    parser.add_argument("--soak-clients", type=int, default=4)
    parser.add_argument("-o", "--output", default=None, help="result JSON (default benchmarks/results/serve_*.json)")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if not args.artifact and not args.tiny:
        parser.error("give an ARTIFACT folder or --tiny")
    with tempfile.TemporaryDirectory(prefix="diffrt-serve-load-") as tmp:
        artifact = args.artifact or tiny_artifact(Path(tmp))
        machine = {"cpu": cpu_info().describe(), "cores": __import__("os").cpu_count(), "python": platform.python_version()}
        if args.soak_minutes is not None:
            report = {"kind": "soak", "machine": machine, "artifact": "tiny sd15 (random weights)" if args.tiny else args.artifact,
                      **run_soak(artifact, args)}
            default = RESULTS / "serve_soak.json"
        else:
            report = {"kind": "load", "machine": machine, "artifact": "tiny sd15 (random weights)" if args.tiny else args.artifact,
                      **run_load(artifact, args)}
            default = RESULTS / "serve_load.json"
    out = Path(args.output) if args.output else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
