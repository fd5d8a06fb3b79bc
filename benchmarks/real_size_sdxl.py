"""Real-size SDXL benchmark: build -> export -> generate on ORT and OpenVINO, with
random weights, offline.

    python benchmarks/real_size_sdxl.py [--workdir /tmp/diffrt-real-size-sdxl] [--size 1024x1024]
                                        [--steps 4] [--phases build,export,generate-ort,generate-openvino]

1. build:    a random-weight checkpoint with SDXL base 1.0's real architecture (UNet
             2.57B params with 10-block transformers, CLIP ViT-L/14 and OpenCLIP bigG/14
             text encoders, the SDXL VAE with force_upcast, SDXL's Euler scheduler
             config, the real CLIP BPE vocabulary with each tokenizer's own pad token),
             saved as fp32 safetensors with save_pretrained.
2. export:   `diffrt.export.export(...)` (fp32, with fused-attention graphs); the UNet
             (~10 GB) and the bigG encoder (~2.8 GB) go through the external-data path.
             One stage's module at a time: each stage's load, export, weight map and
             check are steps of their own, and the report names the largest stage's
             fp32 parameter bytes (`largest_stage`), the bar for the phase's peak RSS.
3. generate-ort / generate-openvino: `Pipeline.load(..., backend=...)` and one image
             with the sdxl-lightning-4step recipe (Euler, trailing spacing, no CFG).

Each phase runs in its own subprocess (`--phase NAME`), so each phase's peak RSS is its
own; inside a phase, the RSS high-water mark is read at every sub-step (export stages
from the exporter's log, pipeline stages from the generation callback). "No weights
held twice" is read off these numbers: a phase's peak against the bytes of the stages
it holds. Random weights: the speed and memory are real, the images are noise.
Reuses the machinery of real_size_sd15.py. Prints a table and writes
benchmarks/results/real_size_sdxl.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import real_size_sd15 as common  # noqa: E402 - the shared phase machinery

DEFAULT_RESULTS = HERE / "results" / "real_size_sdxl.json"
DEFAULT_WORKDIR = Path("/tmp/diffrt-real-size-sdxl")
MARKER = ".diffrt-real-size-sdxl"
PHASES = ("build", "export", "generate-ort", "generate-openvino")
PRESET = "sdxl-lightning-4step"

# --- SDXL base 1.0's architecture (stabilityai/stable-diffusion-xl-base-1.0 config.json files) --

UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
)
VAE_CONFIG = {**common.VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
TEXT_ENCODER_CONFIG = common.TEXT_ENCODER_CONFIG  # CLIP ViT-L/14
TEXT_ENCODER_2_CONFIG = dict(  # OpenCLIP ViT-bigG/14's text tower, with its projection
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    projection_dim=1280,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)
SCHEDULER_CLASS = "EulerDiscreteScheduler"
SCHEDULER_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                    "num_train_timesteps": 1000, "interpolation_type": "linear", "prediction_type": "epsilon",
                    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
                    "clip_sample": False}


def build_checkpoint(folder: Path, seed: int, tracker: common.StepTracker) -> dict[str, Any]:
    """Write a random-weight SDXL-size StableDiffusionXLPipeline to `folder` (fp32 safetensors)."""
    import tempfile

    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from diffrt.export.clip_vocab import find_clip_bpe_vocab, write_real_clip_tokenizer

    info: dict[str, Any] = {}
    tracker.start("tokenizers")
    bpe = find_clip_bpe_vocab()
    if bpe is None:
        raise SystemExit("error: no CLIP BPE vocabulary; pip install --no-deps clip-anytorch (it ships one)")
    tokenizers = {}
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):  # SDXL's two pad tokens
        with tempfile.TemporaryDirectory() as tmp:
            write_real_clip_tokenizer(Path(tmp), bpe, pad_token=pad)
            tokenizers[name] = CLIPTokenizer.from_pretrained(tmp)
    info["tokenizer"] = f"real CLIP BPE vocabulary from {bpe}"

    def text_config(config: dict, tokenizer) -> CLIPTextConfig:
        return CLIPTextConfig(**{**config, "vocab_size": max(config["vocab_size"], len(tokenizer))},
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)

    tracker.start("random init (2 text encoders, UNet, VAE)")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config(TEXT_ENCODER_CONFIG, tokenizers["tokenizer"]))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(TEXT_ENCODER_2_CONFIG, tokenizers["tokenizer_2"]))
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(**VAE_CONFIG)
    scheduler = getattr(diffusers, SCHEDULER_CLASS).from_config(SCHEDULER_CONFIG)
    for name, module in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2), ("unet", unet),
                         ("vae", vae)):
        info[f"{name}_params"] = sum(p.numel() for p in module.parameters())

    tracker.start("save_pretrained (fp32 safetensors)")
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizers["tokenizer"],
        tokenizer_2=tokenizers["tokenizer_2"], unet=unet, scheduler=scheduler,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    info["checkpoint_bytes"] = common.folder_size(folder)
    return info


def phase_build(args: argparse.Namespace) -> dict[str, Any]:
    checkpoint = args.workdir / "checkpoint"
    if checkpoint.exists():
        shutil.rmtree(checkpoint)  # ours: the work folder carries this script's marker
    tracker = common.StepTracker()
    tracker.start("imports")
    t0 = time.perf_counter()
    info = build_checkpoint(checkpoint, args.seed, tracker)
    return {"seconds": round(time.perf_counter() - t0, 3), **info, "steps": tracker.close()}


class StageLogWatcher(common.ExportLogWatcher):
    """real_size_sd15's watcher, plus the exporter's per-stage loading and weight-map
    steps, so each stage's module load and parameter mapping is a row of its own."""

    _MORE = re.compile(r"^\[\d+/\d+\] ([\w-]+): (loading its torch module|mapping its torch parameters)")

    def emit(self, record: logging.LogRecord) -> None:
        match = self._MORE.match(record.getMessage())
        if match is None:
            super().emit(record)
            return
        now = time.perf_counter()
        self.messages.append((now, record.getMessage()))
        name, what = match.groups()
        self.tracker.start(f"{name}: load its torch module" if what.startswith("loading")
                           else f"{name}: weight map (hash parameters, read initializers)", now)


def phase_export(args: argparse.Namespace) -> dict[str, Any]:
    import diffrt.export

    checkpoint, artifact = args.workdir / "checkpoint", args.workdir / "artifact"
    if not (checkpoint / "model_index.json").is_file():
        raise SystemExit(f"error: {checkpoint} has no checkpoint; run the build phase first")
    tracker = common.StepTracker()
    watcher = StageLogWatcher(tracker)
    logging.getLogger("diffrt").addHandler(watcher)
    tracker.start("import torch + diffusers, read the configs")
    t0 = time.perf_counter()
    try:
        manifest = diffrt.export.export(checkpoint, artifact, overwrite=True)
    finally:
        logging.getLogger("diffrt").removeHandler(watcher)
    seconds = time.perf_counter() - t0
    steps = tracker.close()
    stages = {name: {"files": {f.path: f.size for f in stage.files}, "max_abs_error": stage.max_abs_error,
                     "reference": stage.reference}
              for name, stage in manifest.stages.items()}
    # the bar for the peak: the fp32 parameters of the largest torch module a stage was exported from
    weights = {name: _parameter_bytes(artifact, stage) for name, stage in manifest.stages.items()
               if stage.reference == "torch"}
    largest = max(weights, key=weights.get)
    return {"seconds": round(seconds, 3), "stages": stages, "artifact_bytes": common.folder_size(artifact),
            "stage_parameter_bytes": weights, "largest_stage": {"name": largest, "parameter_bytes": weights[largest]},
            "steps": steps}


def _parameter_bytes(artifact: Path, stage) -> int:
    """fp32 bytes of the torch parameters the stage's weight map lists (unused ones included)."""
    import math

    from diffrt.weights import weight_map

    return sum(4 * math.prod(e.shape) for e in weight_map(artifact, stage).entries.values())


def phase_generate(args: argparse.Namespace, backend: str) -> dict[str, Any]:
    import numpy as np

    from diffrt.runtime.images import to_pil
    from diffrt.runtime.pipeline import Pipeline

    artifact = args.workdir / "artifact"
    height, width = args.size
    tracker = common.StepTracker()
    load_log = common._Recorder()
    logging.getLogger("diffrt").addHandler(load_log)
    tracker.start(f"Pipeline.load (verify hashes + {backend} compile/sessions)")
    t0 = time.perf_counter()
    pipe = Pipeline.load(artifact, backend=backend, prepare={"height": height, "width": width, "guidance_scale": 0.0})
    load_seconds = time.perf_counter() - t0
    logging.getLogger("diffrt").removeHandler(load_log)
    session_seconds = {m.group(1): float(m.group(2)) for _, msg in load_log.messages
                       if (m := re.match(r"loaded (\S+) .*in ([\d.]+)s", msg))}
    weights = {name: sum(f.size for f in s.spec.files) for name, s in pipe.models.items()}
    tracker.start("text encoders + UNet call 1")
    with pipe:
        result = pipe(common.PROMPT, preset=PRESET, num_inference_steps=args.steps, height=height, width=width,
                      seed=args.seed, output_type="np", callback=common.unet_call_steps(tracker))
        settings = result.settings
        backend_name = pipe.backend.describe()
    tracker.end()
    images = result.images
    image_path = args.workdir / f"image-{backend}-{width}x{height}-{args.steps}steps.png"
    to_pil(images)[0].save(image_path)
    timings = {k: ([round(s, 3) for s in v] if isinstance(v, list) else round(v, 3)) for k, v in result.timings.items()}
    return {
        "backend": backend_name,
        "load_seconds": round(load_seconds, 3),
        "load_session_seconds": session_seconds,
        "stage_weight_bytes": weights,
        "settings": {"prompt": common.PROMPT, "preset": PRESET, "scheduler": settings.scheduler,
                     "steps": settings.num_inference_steps, "guidance_scale": settings.guidance_scale,
                     "height": height, "width": width, "seed": args.seed},
        "timings": timings,
        "image": str(image_path),
        "image_finite": bool(np.isfinite(images).all()),
        "image_mean_std": [round(float(images.mean()), 4), round(float(images.std()), 4)],
        "steps": tracker.close(),
    }


PHASE_FUNCTIONS = common.backend_phases(phase_build, phase_export, phase_generate)


def print_table(report: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str, str, float | None]] = []
    for name, phase in report["phases"].items():
        rows.append((*common._phase_row(f"{name} (total)", phase, phase.get("process_seconds_in_phase", 0.0)), None))
        rows += [(*common._step_row(f"  {s['name']}", s), s.get("sampled_max_anon_gib")) for s in phase["steps"]
                 if s["seconds"] >= 0.05 or s["set_new_peak"]]
        if name.startswith("generate"):
            weights = sum(phase["stage_weight_bytes"].values()) / 2**30
            rows.append((f"  (weights of the stages loaded: {weights:.2f} GiB)", "", "", "", None))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'what':<{width}}  {'seconds':>8}  {'peak RSS GiB':>12}  {'anon GiB':>8}  {'others CPU':>10}")
    print("-" * (width + 48))
    for label, seconds, rss, others, value in rows:
        print(f"{label:<{width}}  {seconds:>8}  {rss:>12}  {'' if value is None else f'{value:.2f}':>8}  {others:>10}")
    print("peak RSS: the (sub-)phase's RSS high-water mark at its end; * = this sub-step raised it.")
    print("anon: the largest anonymous RSS sampled during the sub-step (RSS minus file-backed pages of mapped "
          "weight files, which the kernel can drop and re-read).")


def print_report(path: Path) -> int:
    print_table(json.loads(path.read_text()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"work folder (default {DEFAULT_WORKDIR})")
    parser.add_argument("--steps", type=int, default=4, help="num_inference_steps (default 4, the recipe's)")
    parser.add_argument("--size", type=common._size, default=(1024, 1024),
                        help="WIDTHxHEIGHT of the image (default 1024x1024)")
    parser.add_argument("--seed", type=int, default=0, help="weights and noise seed (default 0)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated phases (default {','.join(PHASES)}); e.g. 'generate-ort' reuses "
                             "the artifact already in --workdir")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help=f"JSON report (default {DEFAULT_RESULTS})")
    parser.add_argument("--table-from", type=Path, metavar="JSON", help="print the table of an earlier report and exit")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--result-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.table_from:
        return print_report(args.table_from)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    args.workdir = args.workdir.expanduser().resolve()
    if args.phase:
        return common.run_phase_here(args, PHASE_FUNCTIONS)
    phases = common.chosen_phases(parser, args.phases, PHASES)
    common.claim_workdir(args.workdir, MARKER, "benchmarks/real_size_sdxl.py")
    report = common.new_report("real_size_sdxl", args.workdir)

    def keeps_earlier(previous: dict[str, Any]) -> bool:
        if previous.get("benchmark") != "real_size_sdxl":
            return False
        report["earlier_runs"] = previous.get("earlier_runs", []) + [
            {k: previous.get(k) for k in ("command", "date_utc", "machine")}]
        return True

    return common.run_phases(args, phases, report, args.results, Path(__file__), print_table, keeps_earlier)

if __name__ == "__main__":
    sys.exit(main())
