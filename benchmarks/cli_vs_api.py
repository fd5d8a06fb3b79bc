"""Is a denoiser call slower from `diffrt generate` than from the Python API?

    python benchmarks/cli_vs_api.py ARTIFACT [--size 256x256] [--steps 6] [--rounds 4]

Runs the same generation (same artifact, size, steps, scheduler, seed) alternately as
`diffrt generate` and as `Pipeline.load(...)(...)` in a fresh Python process, round
after round, so machine drift hits both alike, and prints each run's median seconds
per denoiser call and the CLI/API ratio of their medians. Both are separate processes
started the same way, so the comparison includes everything the CLI adds (argument
parsing, logging setup, progress output).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from diffrt.runtime.cpu import cpu_info

API_SCRIPT = textwrap.dedent("""
    import json, statistics, sys
    from diffrt import Pipeline
    folder, height, width, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    with Pipeline.load(folder, verify=False) as pipe:
        result = pipe("a cat", num_inference_steps=steps, height=height, width=width, seed=0,
                      scheduler="ddim", output_type="np")
    print(json.dumps({"per_call": statistics.median(result.timings["denoiser_calls"])}))
""")


def run_cli(folder: str, height: int, width: int, steps: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "diffrt.cli", "generate", folder, "a cat", "--steps", str(steps), "--size",
           f"{width}x{height}", "--seed", "0", "--scheduler", "ddim", "--no-verify", "-o", str(out), "--overwrite"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(re.search(r"([\d.]+)s/call", result.stdout).group(1))


def run_api(folder: str, height: int, width: int, steps: int) -> float:
    cmd = [sys.executable, "-c", API_SCRIPT, folder, str(height), str(width), str(steps)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["per_call"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--size", default="256x256", help="WIDTHxHEIGHT (default 256x256)")
    parser.add_argument("--steps", type=int, default=6, help="DDIM steps = denoiser calls (default 6)")
    parser.add_argument("--rounds", type=int, default=4, help="CLI and API runs each, alternating (default 4)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    print(f"CPU: {cpu_info().describe()}; load average at start {os.getloadavg()[0]:.2f}")
    cli, api = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            cli.append(run_cli(args.artifact, height, width, args.steps, Path(tmp) / "x.png"))
            api.append(run_api(args.artifact, height, width, args.steps))
            print(f"round {i + 1}: cli {cli[-1]:.4f} s/call, api {api[-1]:.4f} s/call "
                  f"(load {os.getloadavg()[0]:.2f}, {time.strftime('%H:%M:%S')})")
    ratio = statistics.median(cli) / statistics.median(api)
    print(f"median s/call: cli {statistics.median(cli):.4f}, api {statistics.median(api):.4f}, cli/api {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
