"""Real-size SD1.5 benchmark: build -> export -> generate, with random weights, offline.

    python benchmarks/real_size_sd15.py [--workdir /tmp/diffrt-real-size] [--steps 2] [--size 512x512]

1. build:    a random-weight checkpoint with SD1.5's real architecture (UNet 860M params,
             CLIP ViT-L/14 text encoder, the SD VAE, SD1.5's PNDM scheduler config, the
             real CLIP tokenizer), saved in fp32 safetensors with save_pretrained.
2. export:   `diffrt.export.export(...)`; the fp32 UNet is > 2 GB, so this exercises the
             external-data path (unet/model.onnx + unet/model.onnx.data).
3. generate: `Pipeline.load(..., backend="ort")` and one image, saved as a PNG.

Each phase runs in its own subprocess of this script (`--phase NAME`), so each phase's
peak RSS (getrusage ru_maxrss) is its own. Inside a phase, the RSS high-water mark is
also read at every sub-step boundary (export stages from the exporter's log, pipeline
stages from the generation callback), which says which sub-step set the peak.
Prints a table and writes benchmarks/results/real_size_sd15.json.

The work folder holds only what this script writes (checkpoint/, artifact/, image-*.png,
phase-*.json); a non-empty folder without this script's marker file is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "real_size_sd15.json"
DEFAULT_WORKDIR = Path("/tmp/diffrt-real-size")
MARKER = ".diffrt-real-size-sd15"
PHASES = ("build", "export", "generate")
PROMPT = "a photo of an astronaut riding a horse on mars"
PACKAGES = ("diffrt", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "numpy", "tokenizers",
            "safetensors", "pillow", "clip-anytorch")
GIB = 2**30

# --- SD1.5's architecture (runwayml/stable-diffusion-v1-5's config.json files) -------

UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    center_input_sample=False,
    mid_block_scale_factor=1,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)
TEXT_ENCODER_CONFIG = dict(  # CLIP ViT-L/14's text tower; token ids come from the tokenizer
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
# madebyollin/taesd's config.json: the tiny decoder (AutoencoderTiny) for SD 1.x/2.x latents.
# Random weights here (no hub): its speed and memory are real, its images are not.
TAESD_CONFIG = dict(
    in_channels=3, out_channels=3, encoder_block_out_channels=(64, 64, 64, 64),
    decoder_block_out_channels=(64, 64, 64, 64), act_fn="relu", upsample_fn="nearest", latent_channels=4,
    upsampling_scaling_factor=2, num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1),
    latent_magnitude=3, latent_shift=0.5, scaling_factor=1.0,
)
# runwayml/stable-diffusion-v1-5's scheduler_config.json (as in diffrt/export/tiny.py)
SCHEDULER_CLASS = "PNDMScheduler"
SCHEDULER_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                    "steps_offset": 1, "trained_betas": None, "clip_sample": False}


# --- memory ------------------------------------------------------------------------


def peak_rss_gib() -> float:
    """This process's peak RSS so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def current_anon_rss_gib() -> float:
    """The anonymous part of the RSS (RssAnon): memory only this process holds. The rest
    of the RSS is file-backed pages of memory-mapped files (weights read in place from
    model.onnx.data or a compiled blob), which the kernel can drop and re-read."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024 / GIB
    return 0.0


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuWindow:
    """How much CPU other processes took while a span of this benchmark ran: the
    machine is shared, so a slow step next to a busy neighbour is not the runtime's fault."""

    def __init__(self):
        self.t0, self.self0, self.machine0 = time.perf_counter(), self_cpu_seconds(), machine_busy_cpu_seconds()

    def others_share(self, self_cpu: float | None = None) -> float:
        """Other processes' CPU seconds / (wall seconds * cores) since the window opened."""
        wall = time.perf_counter() - self.t0
        mine = (self_cpu_seconds() - self.self0) if self_cpu is None else self_cpu
        others = max(0.0, machine_busy_cpu_seconds() - self.machine0 - mine)
        return round(others / max(wall * (os.cpu_count() or 1), 1e-9), 3)


class StepTracker:
    """Times named sub-steps of a phase and attributes memory to them.

    For each sub-step: wall seconds, the process's RSS high-water mark when it ended
    (if that rose during the step, the step set the new peak), the largest RSS a
    sampling thread saw during it (a lower bound: a C call that holds the GIL, such as
    protobuf parsing, hides from the sampler, never from the high-water mark), and the
    share of the machine's CPU that other processes used meanwhile.
    """

    def __init__(self, interval_s: float = 0.1):
        self.steps: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
        self._thread.start()

    def _sample(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            rss, anon = current_rss_gib(), current_anon_rss_gib()
            with self._lock:
                if self._current is not None:
                    self._current["sampled_max_rss_gib"] = max(self._current["sampled_max_rss_gib"], rss)
                    self._current["sampled_max_anon_gib"] = max(self._current["sampled_max_anon_gib"], anon)

    def start(self, name: str, at: float | None = None) -> None:
        at = time.perf_counter() if at is None else at
        self.end(at)
        rss = current_rss_gib()
        with self._lock:
            self._current = {"name": name, "t0": at, "peak_before_gib": peak_rss_gib(), "sampled_max_rss_gib": rss,
                             "sampled_max_anon_gib": current_anon_rss_gib(), "cpu": CpuWindow()}

    def end(self, at: float | None = None) -> None:
        at = time.perf_counter() if at is None else at
        with self._lock:
            step, self._current = self._current, None
        if step is None:
            return
        peak = peak_rss_gib()
        self.steps.append({
            "name": step["name"],
            "seconds": round(at - step.pop("t0"), 3),
            "peak_rss_after_gib": round(peak, 3),
            "set_new_peak": peak > step.pop("peak_before_gib") + 0.01,
            "sampled_max_rss_gib": round(max(step["sampled_max_rss_gib"], current_rss_gib()), 3),
            "sampled_max_anon_gib": round(max(step["sampled_max_anon_gib"], current_anon_rss_gib()), 3),
            "others_cpu_share": step["cpu"].others_share(),
        })

    def close(self) -> list[dict[str, Any]]:
        self.end()
        self._stop.set()
        self._thread.join()
        return self.steps


def unet_call_steps(tracker: StepTracker):
    """A generation callback that prints each UNet call and opens the tracker's next
    sub-step ("UNet call N", then "vae_decoder"). Called after every UNet call with the
    requested steps done (PNDM: one call more than steps)."""
    started, calls = time.perf_counter(), [0]

    def on_step(step: int, total: int) -> None:
        calls[0] += 1
        print(f"  UNet call {calls[0]}: {step}/{total} steps done ({time.perf_counter() - started:.1f}s)",
              file=sys.stderr, flush=True)
        tracker.start("vae_decoder" if step == total else f"UNet call {calls[0] + 1}")

    return on_step


class ExportLogWatcher(logging.Handler):
    """Turns the exporter's progress log lines into StepTracker steps.

    Parses the messages of diffrt/export/__init__.py and variants.py: "[i/n] NAME:
    exporting to ONNX", "[i/n] NAME: checking against torch", "[i/n] NAME: done in ...",
    "NAME: N attention blocks fused in ...", "NAME: fp16 in ...", "export finished".
    Each step is named by what starts it; after the last torch stage come the derived
    graphs (fused attention, half precision), then copying, hashing and the manifest.
    """

    _STAGE = re.compile(r"^\[\d+/\d+\] ([\w-]+): (exporting to ONNX|checking against torch|done in)")
    _DERIVED = re.compile(r"^([\w-]+): (\d+ attention blocks fused|fp16|bf16) in")

    def __init__(self, tracker: StepTracker):
        super().__init__(level=logging.INFO)
        self.tracker = tracker
        self.messages: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        now = time.perf_counter()
        message = record.getMessage()
        self.messages.append((now, message))
        match = self._STAGE.match(message)
        derived = self._DERIVED.match(message)
        if match:
            name, what = match.groups()
            if what.startswith("exporting"):
                self.tracker.start(f"{name}: torch.onnx.export + save", now)
            elif what.startswith("checking"):
                self.tracker.start(f"{name}: check vs torch (onnxruntime)", now)
            else:
                self.tracker.start(f"after {name}: next graph pass, or copy tokenizer + scheduler, hash, manifest",
                                   now)
        elif derived:
            self.tracker.start(f"after {derived.group(1)} (pass + check): next pass, or copy, hash, manifest", now)
        elif message.startswith("export finished"):
            self.tracker.end(now)


# --- phases (each runs in its own subprocess) --------------------------------------


def build_checkpoint(folder: Path, seed: int, tracker: StepTracker) -> dict[str, Any]:
    """Write a random-weight SD1.5-size StableDiffusionPipeline to `folder` (fp32 safetensors)."""
    import tempfile

    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffrt.export.clip_vocab import find_clip_bpe_vocab, write_real_clip_tokenizer, write_tiny_clip_tokenizer

    info: dict[str, Any] = {}
    tracker.start("tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        bpe = find_clip_bpe_vocab()
        if bpe is not None:
            write_real_clip_tokenizer(Path(tmp), bpe)
            info["tokenizer"] = f"real CLIP BPE vocabulary from {bpe}"
        else:
            write_tiny_clip_tokenizer(Path(tmp))
            info["tokenizer"] = ("TINY fallback vocabulary: no package ships bpe_simple_vocab_16e6.txt.gz "
                                 "(pip install --no-deps clip-anytorch for the real one)")
            print(f"WARNING: {info['tokenizer']}", file=sys.stderr)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    info["tokenizer_vocab_size"] = len(tokenizer)

    # 1. Modules, each initialised from the same fixed seed so a rerun gives the same weights.
    tracker.start("random init (text encoder, UNet, VAE)")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **{**TEXT_ENCODER_CONFIG, "vocab_size": max(TEXT_ENCODER_CONFIG["vocab_size"], len(tokenizer))},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**VAE_CONFIG)
    scheduler = getattr(diffusers, SCHEDULER_CLASS).from_config(SCHEDULER_CONFIG)
    for name, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        info[f"{name}_params"] = sum(p.numel() for p in module.parameters())

    # 2. Save as a diffusers pipeline, fp32 safetensors.
    tracker.start("save_pretrained (fp32 safetensors)")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    info["checkpoint_bytes"] = folder_size(folder)
    tracker.start("tiny VAE (TAESD architecture), random weights")
    diffusers.AutoencoderTiny(**TAESD_CONFIG).save_pretrained(folder.parent / "taesd")
    return info


def phase_build(args: argparse.Namespace) -> dict[str, Any]:
    checkpoint = args.workdir / "checkpoint"
    for folder in (checkpoint, args.workdir / "taesd"):
        if folder.exists():
            shutil.rmtree(folder)  # ours: the work folder carries this script's marker
    tracker = StepTracker()
    tracker.start("imports")
    t0 = time.perf_counter()
    info = build_checkpoint(checkpoint, args.seed, tracker)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), **info, "steps": tracker.close()}


def phase_export(args: argparse.Namespace) -> dict[str, Any]:
    import diffrt.export

    checkpoint, artifact = args.workdir / "checkpoint", args.workdir / "artifact"
    if not (checkpoint / "model_index.json").is_file():
        raise SystemExit(f"error: {checkpoint} has no checkpoint; run the build phase first")
    tracker = StepTracker()
    watcher = ExportLogWatcher(tracker)
    logging.getLogger("diffrt").addHandler(watcher)
    tracker.start("import torch + diffusers, load checkpoint")
    t0 = time.perf_counter()
    try:
        # artifact/ is ours (marker); the taesd/ beside checkpoint/ becomes the opt-in tiny decoder
        taesd = args.workdir / "taesd"
        manifest = diffrt.export.export(checkpoint, artifact, overwrite=True,
                                        tiny_vae=taesd if taesd.is_dir() else None)
    finally:
        logging.getLogger("diffrt").removeHandler(watcher)
    seconds = time.perf_counter() - t0
    steps = tracker.close()

    external = artifact / "unet" / "model.onnx.data"
    assert external.is_file(), f"{external} is missing: the >2 GB UNet was not saved with external data"
    def seconds_of(prefix: str) -> float:
        return round(sum(s["seconds"] for s in steps if s["name"].startswith(prefix)), 3)

    stages = {}
    for name, stage in manifest.stages.items():
        onnx_seconds, check_seconds = seconds_of(f"{name}: torch.onnx.export"), seconds_of(f"{name}: check")
        stages[name] = {
            "files": {f.path: f.size for f in stage.files},
            "max_abs_error_vs_torch": stage.max_abs_error,
            "onnx_export_seconds": onnx_seconds,
            "check_seconds": check_seconds,
            "total_seconds": round(onnx_seconds + check_seconds, 3),
        }
    return {"seconds": round(seconds, 3), "stages": stages, "artifact_bytes": folder_size(artifact),
            "external_data_bytes": external.stat().st_size, "steps": steps}


def phase_generate(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    from diffrt.runtime.images import to_pil
    from diffrt.runtime.pipeline import Pipeline

    artifact = args.workdir / "artifact"
    height, width = args.size
    tracker = StepTracker()
    load_log = _Recorder()
    logging.getLogger("diffrt").addHandler(load_log)
    tracker.start("Pipeline.load (verify hashes + 3 ORT sessions)")
    t0 = time.perf_counter()
    pipe = Pipeline.load(artifact, backend="ort")
    load_seconds = time.perf_counter() - t0
    logging.getLogger("diffrt").removeHandler(load_log)
    session_seconds = {m.group(1): float(m.group(2)) for _, msg in load_log.messages
                       if (m := re.match(r"loaded (\w+) in ([\d.]+)s", msg))}
    hash_seconds = (load_log.messages[0][0] - t0) if load_log.messages else None

    tracker.start("text_encoder + UNet call 1")
    with pipe:
        result = pipe(PROMPT, num_inference_steps=args.steps, height=height, width=width, seed=args.seed,
                      output_type="np", callback=unet_call_steps(tracker))
    tracker.end()
    images = result.images
    finite = bool(np.isfinite(images).all())
    image_path = args.workdir / f"image-{width}x{height}-{args.steps}steps.png"
    to_pil(images)[0].save(image_path)
    timings = {k: ([round(s, 3) for s in v] if isinstance(v, list) else round(v, 3)) for k, v in result.timings.items()}
    return {
        "load_seconds": round(load_seconds, 3),
        "load_verify_hashes_seconds": None if hash_seconds is None else round(hash_seconds, 3),
        "load_session_seconds": session_seconds,
        "settings": {"prompt": PROMPT, "steps": args.steps, "height": height, "width": width, "seed": args.seed,
                     "scheduler": pipe.manifest.defaults["scheduler"],
                     "guidance_scale": pipe.manifest.defaults["guidance_scale"]},
        "timings": timings,
        "image": str(image_path),
        "image_finite": finite,
        "image_mean_std": [round(float(images.mean()), 4), round(float(images.std()), 4)],
        "steps": tracker.close(),
    }


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.INFO)
        self.messages: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((time.perf_counter(), record.getMessage()))


PHASE_FUNCTIONS = {"build": phase_build, "export": phase_export, "generate": phase_generate}


def run_phase_here(args: argparse.Namespace, functions: dict[str, Any] | None = None) -> int:
    """Child side: run one phase (of `functions`, default this script's), write its result
    (with this process's peak RSS) as JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    started = time.perf_counter()
    result = (functions or PHASE_FUNCTIONS)[args.phase](args)
    result["process_seconds_in_phase"] = round(time.perf_counter() - started, 3)
    result["peak_rss_gib"] = round(peak_rss_gib(), 3)
    args.result_json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def backend_phases(build, export, generate) -> dict[str, Any]:
    """The phase table of a script that builds, exports, then generates on ORT and OpenVINO."""
    return {"build": build, "export": export, "generate-ort": lambda args: generate(args, "ort"),
            "generate-openvino": lambda args: generate(args, "openvino")}


def chosen_phases(parser: argparse.ArgumentParser, text: str, known: tuple[str, ...]) -> list[str]:
    """--phases as a list; an unknown name is a usage error."""
    phases = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in phases if p not in known]
    if unknown:
        parser.error(f"--phases: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return phases


def new_report(benchmark: str, workdir: Path, **fields: Any) -> dict[str, Any]:
    return {"benchmark": benchmark, **fields, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_info(),
            "workdir": str(workdir), "phases": {}}


def run_phases(args: argparse.Namespace, phases: list[str], report: dict[str, Any], results: Path, script: Path,
               table, keeps_earlier=None) -> int:
    """Parent side: each phase in its own interpreter, the report written after every
    phase (long runs); with `keeps_earlier(previous_report)` true, the phases of an
    earlier report at `results` that this run does not repeat are kept (phases run
    separately accumulate in one report)."""
    started = time.perf_counter()
    if keeps_earlier is not None and results.is_file():
        previous = json.loads(results.read_text())
        if keeps_earlier(previous):
            report["phases"] = {k: v for k, v in previous.get("phases", {}).items() if k not in phases}
    results.parent.mkdir(parents=True, exist_ok=True)
    for name in phases:
        report["phases"][name] = run_phase_subprocess(name, args, script=script)
        results.write_text(json.dumps(report, indent=2) + "\n")
    report["total_wall_seconds"] = round(time.perf_counter() - started, 3)
    table(report)
    results.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {results}")
    return 0


def run_phase_subprocess(name: str, args: argparse.Namespace, script: Path | None = None) -> dict[str, Any]:
    """Parent side: run `name` in a fresh interpreter (of `script`, default this one);
    its own ru_maxrss is its phase peak."""
    result_json = args.workdir / f"phase-{name}.json"
    result_json.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(script or __file__).resolve()), "--phase", name, "--workdir", str(args.workdir),
           "--steps", str(args.steps), "--size", f"{args.size[1]}x{args.size[0]}", "--seed", str(args.seed),
           "--result-json", str(result_json)]
    print(f"\n=== phase {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    window = CpuWindow()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    others_share = window.others_share(self_cpu=usage.ru_utime + usage.ru_stime)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        hint = " (killed by SIGKILL: out of memory?)" if proc.returncode == -9 else ""
        raise SystemExit(f"error: phase {name} failed with status {proc.returncode}{hint}; "
                         f"peak RSS {usage.ru_maxrss * 1024 / GIB:.2f} GiB")
    result = json.loads(result_json.read_text())
    result["subprocess_wall_seconds"] = round(wall, 3)  # includes interpreter start and imports
    result["wait4_peak_rss_gib"] = round(usage.ru_maxrss * 1024 / GIB, 3)
    result["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)
    result["others_cpu_share"] = others_share
    print(f"=== phase {name}: {wall:.1f}s, peak RSS {result['peak_rss_gib']:.2f} GiB", file=sys.stderr, flush=True)
    return result


# --- report ------------------------------------------------------------------------


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def gemm_fp32_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 matmul throughput through numpy's BLAS: the machine's
    dense-compute ceiling, to read the pipeline's seconds against."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return round(2 * n**3 / best / 1e9, 1)


def machine_info() -> dict[str, Any]:
    from diffrt.runtime.cpu import installed_versions

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = round(int(line.split()[1]) * 1024 / GIB, 1)
    except OSError:
        pass
    versions = installed_versions(PACKAGES)
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": mem_total,
        "gpu": None,
        "cpu_flags": sorted(f for f in _cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c"))),
        "gemm_fp32_gflops_numpy": gemm_fp32_gflops(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _step_row(label: str, step: dict[str, Any] | None, seconds: float | None = None) -> tuple[str, str, str, str]:
    seconds = step["seconds"] if seconds is None and step else seconds
    rss = others = ""
    if step:
        rss = f"{step['peak_rss_after_gib']:.2f}{' *' if step['set_new_peak'] else ''}"
        others = f"{100 * step['others_cpu_share']:.0f}%"
    return label, "" if seconds is None else f"{seconds:.1f}", rss, others


def _phase_row(label: str, phase: dict[str, Any], seconds: float) -> tuple[str, str, str, str]:
    return label, f"{seconds:.1f}", f"{phase['peak_rss_gib']:.2f}", f"{100 * phase['others_cpu_share']:.0f}%"


def print_table(report: dict[str, Any]) -> None:
    phases = report["phases"]
    rows: list[tuple[str, str, str, str]] = []
    for name, label in (("build", "build checkpoint"), ("export", "export")):
        if name in phases:
            rows.append(_phase_row(f"{label} (total)", phases[name], phases[name]["seconds"]))
            rows += [_step_row(f"  {s['name']}", s) for s in phases[name]["steps"]
                     if s["seconds"] >= 0.05 or s["set_new_peak"]]
    if "generate" in phases:
        g = phases["generate"]
        t, steps = g["timings"], g["steps"]  # steps: load, UNet call 1 (+ text encoder), call 2, ..., vae_decoder
        rows.append(_phase_row("generate phase (load + 1 image)", g, g["process_seconds_in_phase"]))
        rows.append(_step_row("  Pipeline.load", steps[0], g["load_seconds"]))
        if g.get("load_verify_hashes_seconds") is not None:
            rows.append(("    verify sha256 of every file", f"{g['load_verify_hashes_seconds']:.1f}", "", ""))
        rows += [(f"    ORT session {n}", f"{sec:.1f}", "", "") for n, sec in g["load_session_seconds"].items()]
        rows.append(("  text_encoder", f"{t['text_encoder']:.2f}", "", ""))
        unet_calls = t.get("denoiser_calls", t.get("denoiser_steps", []))  # older reports: denoiser_steps
        rows.append((f"  denoiser: {len(unet_calls)} UNet calls, batch 2 (CFG)", f"{t['denoiser']:.1f}", "", ""))
        for i, seconds in enumerate(unet_calls, 1):
            rows.append(_step_row(f"    UNet call {i}", steps[i] if i < len(steps) else None, seconds))
        rows.append(_step_row("  vae_decoder", steps[-1], t["vae_decoder"]))
        rows.append(("  total (pipe call)", f"{t['total']:.1f}", "", ""))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'what':<{width}}  {'seconds':>8}  {'peak RSS GiB':>12}  {'others CPU':>10}")
    print("-" * (width + 38))
    for name, seconds, rss, others in rows:
        print(f"{name:<{width}}  {seconds:>8}  {rss:>12}  {others:>10}")
    print("peak RSS: the (sub-)phase's RSS high-water mark at its end; * = this sub-step raised it.")
    print("others CPU: share of the machine's CPU that other processes used meanwhile (the machine is shared).")


# --- CLI ---------------------------------------------------------------------------


def _size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' or one number -> (height, width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: use WIDTHxHEIGHT, e.g. 512x512") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or any(p <= 0 or p % 8 for p in parts):
        raise argparse.ArgumentTypeError(f"--size {text!r}: use WIDTHxHEIGHT, positive multiples of 8")
    return parts[1], parts[0]


def claim_workdir(workdir: Path, marker: str = MARKER, script: str = "benchmarks/real_size_sd15.py") -> None:
    """Use `workdir` only if it is new, empty, or was made by `script` (its `marker` file)."""
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / marker).is_file():
        raise SystemExit(f"error: {workdir} is not empty and was not made by this script; pass another --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / marker).write_text(f"made by {script}; it may replace checkpoint/ and artifact/\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"work folder (default {DEFAULT_WORKDIR})")
    parser.add_argument("--steps", type=int, default=2, help="num_inference_steps for the image (default 2)")
    parser.add_argument("--size", type=_size, default=(512, 512), help="WIDTHxHEIGHT of the image (default 512x512)")
    parser.add_argument("--seed", type=int, default=0, help="weights and noise seed (default 0)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help="comma-separated phases to run (default build,export,generate); "
                             "e.g. 'generate' reuses the artifact already in --workdir")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                        help=f"JSON report (default {DEFAULT_RESULTS})")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: run one phase here
    parser.add_argument("--result-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    args.workdir = args.workdir.expanduser().resolve()
    if args.phase:
        return run_phase_here(args)

    phases = chosen_phases(parser, args.phases, PHASES)
    claim_workdir(args.workdir)
    return run_phases(args, phases, new_report("real_size_sd15", args.workdir), args.results, Path(__file__),
                      print_table)

if __name__ == "__main__":
    sys.exit(main())
