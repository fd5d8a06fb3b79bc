"""Real-size SD3.5-medium benchmark: build -> export -> generate on ORT and OpenVINO, with
random weights, offline.

    python benchmarks/real_size_sd3.py [--workdir /tmp/diffrt-real-size-sd3] [--size 512x512]
                                       [--steps 4] [--phases build,export,generate-ort,generate-openvino]

1. build:    a random-weight StableDiffusion3Pipeline with SD3.5-medium's real
             transformer (SD3Transformer2DModel, 24 MMDiT-X layers, 24 heads of 64, the
             extra self-attention in layers 0-12, QK RMS norm: 2.24B parameters), CLIP
             ViT-L/14 and OpenCLIP bigG/14 text encoders with projections, SD3's
             16-channel VAE (scaling 1.5305, shift 0.0609), SD3.5's flow-match config
             (shift 3.0), the real CLIP BPE vocabulary; saved WITHOUT text_encoder_3 (T5-XXL,
             4.76B parameters, 19 GB in fp32, does not fit beside the rest on a 24 GiB
             machine; diffusers allows dropping it, and the runtime feeds zeros in its
             place exactly as diffusers does). Saved in bf16 safetensors, as Stability
             ships SD3.5 (6.8 GB instead of 13.5; the exporter loads it in fp32).
2. export:   `diffrt.export.export(...)` (fp32, fused-attention graphs unless
             --no-fused-attention); the transformer (~9.9 GB) and the bigG encoder go
             through the external-data path. The fused-attention pass writes a full copy
             of the transformer's weights before hard-linking it to the portable graph's:
             ~10 GB more disk at that moment.
3. generate-ort / generate-openvino: `Pipeline.load(..., backend=..., disk_cache=False)`
             and one image with the sd35-large-turbo-4step recipe (4 steps, no CFG) at
             --size. No engine cache is written (ORT's optimized graph and OpenVINO's
             compiled blob of the transformer would be another ~10 GB of disk each).

Each phase runs in its own subprocess, so each phase's peak RSS is its own (the machinery
of real_size_sd15.py / real_size_sdxl.py). Random weights: the speed and memory are real,
the images are noise. Writes benchmarks/results/real_size_sd3.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import real_size_sd15 as common  # noqa: E402 - the shared phase machinery
import real_size_sdxl as xl  # noqa: E402 - its export phase, watcher and table

DEFAULT_RESULTS = HERE / "results" / "real_size_sd3.json"
DEFAULT_WORKDIR = Path("/tmp/diffrt-real-size-sd3")
MARKER = ".diffrt-real-size-sd3"
PHASES = ("build", "export", "generate-ort", "generate-openvino")
PRESET = "sd35-large-turbo-4step"
NO_FUSED_ENV = "DIFFRT_BENCH_SD3_NO_FUSED"

# stabilityai/stable-diffusion-3.5-medium's transformer/config.json
TRANSFORMER_CONFIG = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                          num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                          pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                          dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# SD3's vae/config.json: SD's KL VAE widths with 16 latent channels and no quant convs
VAE_CONFIG = {**common.VAE_CONFIG, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305,
              "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}


def build_checkpoint(folder: Path, seed: int, tracker: common.StepTracker) -> dict[str, Any]:
    import tempfile

    import diffusers
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from diffrt.export.clip_vocab import find_clip_bpe_vocab, write_real_clip_tokenizer

    info: dict[str, Any] = {"text_encoder_3": "left out (T5-XXL; zeros in its place, as diffusers)"}
    tracker.start("tokenizers")
    bpe = find_clip_bpe_vocab()
    if bpe is None:
        raise SystemExit("error: no CLIP BPE vocabulary; pip install --no-deps clip-anytorch (it ships one)")
    tokenizers = {}
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        with tempfile.TemporaryDirectory() as tmp:
            write_real_clip_tokenizer(Path(tmp), bpe, pad_token=pad)
            tokenizers[name] = CLIPTokenizer.from_pretrained(tmp)

    def text_config(config: dict, tokenizer) -> CLIPTextConfig:
        return CLIPTextConfig(**{**config, "vocab_size": max(config["vocab_size"], len(tokenizer))},
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)

    tracker.start("random init (2 text encoders, transformer, VAE)")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(text_config(common.TEXT_ENCODER_CONFIG, tokenizers["tokenizer"]))
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(xl.TEXT_ENCODER_2_CONFIG, tokenizers["tokenizer_2"]))
    torch.manual_seed(seed + 2)
    transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(**VAE_CONFIG)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    for name, module in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2),
                         ("transformer", transformer), ("vae", vae)):
        info[f"{name}_params"] = sum(p.numel() for p in module.parameters())

    tracker.start("save_pretrained (bf16 safetensors)")
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizers["tokenizer"], text_encoder_2=text_encoder_2, tokenizer_2=tokenizers["tokenizer_2"],
        text_encoder_3=None, tokenizer_3=None)
    pipe.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
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


def transformer_steps(tracker: common.StepTracker):
    """A generation callback naming each denoiser call as a step of its own."""
    def callback(done: int, total: int) -> None:
        tracker.start(f"transformer call {done + 1}" if done < total else "VAE decode")
    return callback


def attention_counts(pipe, artifact: Path) -> dict[str, Any]:
    """How the transformer's attention runs: in the ONNX graph the backend was given
    (MultiHeadAttention = fused for ONNX Runtime, Softmax = unfused), and for OpenVINO in
    its compiled model (what its CPU plugin fused itself)."""
    import onnx

    session = pipe.models["transformer"]
    nodes = onnx.load(str(artifact / session.spec.graph_path), load_external_data=False).graph.node
    counts: dict[str, Any] = {"graph": session.spec.name,
                              "graph_multi_head_attention": sum(n.op_type == "MultiHeadAttention" for n in nodes),
                              "graph_softmax": sum(n.op_type == "Softmax" for n in nodes)}
    compiled = getattr(session, "compiled_models", None)
    if compiled is not None:
        from diffrt.runtime.backends import openvino as ovb

        counts["openvino_compiled"] = [ovb.attention_ops(c).to_json() for c in compiled().values()]
    return counts


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
    pipe = Pipeline.load(artifact, backend=backend, prepare={"height": height, "width": width, "guidance_scale": 0.0},
                         disk_cache=False)
    load_seconds = time.perf_counter() - t0
    logging.getLogger("diffrt").removeHandler(load_log)
    session_seconds = {m.group(1): float(m.group(2)) for _, msg in load_log.messages
                       if (m := re.match(r"loaded (\S+) .*in ([\d.]+)s", msg))}
    weights = {name: sum(f.size for f in s.spec.files) for name, s in pipe.models.items()}
    tracker.start("text encoders + transformer call 1")
    with pipe:
        result = pipe(common.PROMPT, preset=PRESET, num_inference_steps=args.steps, height=height, width=width,
                      seed=args.seed, output_type="np", callback=transformer_steps(tracker))
        settings = result.settings
        backend_name = pipe.backend.describe()
        graphs = {name: s.spec.name for name, s in pipe.models.items()}
        attention = attention_counts(pipe, artifact)
    tracker.end()
    images = result.images
    image_path = args.workdir / f"image-{backend}-{width}x{height}-{args.steps}steps.png"
    to_pil(images)[0].save(image_path)
    timings = {k: ([round(s, 3) for s in v] if isinstance(v, list) else round(v, 3)) for k, v in result.timings.items()}
    return {
        "backend": backend_name, "graphs": graphs, "transformer_attention": attention,
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


def phase_export(args: argparse.Namespace) -> dict[str, Any]:
    """real_size_sdxl.py's export phase, with or without the fused-attention graphs."""
    import diffrt.export

    if args.fused_attention:
        return xl.phase_export(args)
    original = diffrt.export.export
    diffrt.export.export = lambda *a, **kw: original(*a, **{**kw, "fused_attention": False})
    try:
        return {**xl.phase_export(args), "fused_attention": False}
    finally:
        diffrt.export.export = original


PHASE_FUNCTIONS = common.backend_phases(phase_build, phase_export, phase_generate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"work folder (default {DEFAULT_WORKDIR})")
    parser.add_argument("--steps", type=int, default=4, help="num_inference_steps (default 4, the recipe's)")
    parser.add_argument("--size", type=common._size, default=(512, 512), help="WIDTHxHEIGHT (default 512x512)")
    parser.add_argument("--seed", type=int, default=0, help="weights and noise seed (default 0)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated phases (default {','.join(PHASES)})")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help=f"JSON report (default {DEFAULT_RESULTS})")
    parser.add_argument("--table-from", type=Path, metavar="JSON", help="print the table of an earlier report and exit")
    parser.add_argument("--no-fused-attention", dest="fused_attention", action="store_false",
                        default=os.environ.get(NO_FUSED_ENV) != "1",
                        help="export without the fused-attention graphs (ORT then runs the portable ones)")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--result-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.table_from:
        return xl.print_report(args.table_from)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    args.workdir = args.workdir.expanduser().resolve()
    if args.phase:
        return common.run_phase_here(args, PHASE_FUNCTIONS)
    phases = common.chosen_phases(parser, args.phases, PHASES)
    common.claim_workdir(args.workdir, MARKER, "benchmarks/real_size_sd3.py")
    if not args.fused_attention:  # the phase subprocesses take the same arguments; this one through the environment
        os.environ[NO_FUSED_ENV] = "1"
    report = common.new_report("real_size_sd3", args.workdir, fused_attention=args.fused_attention)
    return common.run_phases(args, phases, report, args.results, Path(__file__), xl.print_table,
                             keeps_earlier=lambda previous: previous.get("benchmark") == "real_size_sd3")

if __name__ == "__main__":
    sys.exit(main())
