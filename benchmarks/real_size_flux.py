"""Flux at its real width, fewer blocks: build -> export -> generate on ORT and OpenVINO,
with random weights, offline; the memory of every phase, to extrapolate per block.

    python benchmarks/real_size_flux.py [--units 1] [--t5-layers 2] [--workdir /tmp/diffrt-real-size-flux-u1]
                                        [--size 512x512] [--steps 4]
                                        [--phases build,export,generate-ort,generate-openvino]

FLUX.1's transformer is 19 double-stream and 38 single-stream blocks of width 3072 (24
heads of 128): 19 "units" of one double and two single blocks, 0.623B parameters
each, plus 0.064B of embedders and output layers (11.9B). Its T5-XXL encoder is 24
layers of width 4096 (0.193B each) plus 0.131B of embeddings (4.76B). Neither fits a
24 GiB machine in fp32 (47.6 GB and 19 GB). This benchmark builds the same model with
`--units` units and `--t5-layers` T5 layers, everything else at its real size: CLIP
ViT-L/14 (pooled), FLUX.1's 16-channel VAE (scaling 0.3611, shift 0.1159, no quant
convs), FLUX.1-schnell's scheduler config, the real CLIP BPE vocabulary (a tiny trained
SentencePiece vocabulary for T5: token ids do not change the memory). Two runs at
different --units give the memory per unit (the slope), and the README extrapolates
to 19 units and 24 T5 layers.

1. build:    the random-weight FluxPipeline, saved with save_pretrained as bf16 safetensors
             (as FLUX.1 is distributed; --checkpoint-dtype fp32 for fp32): the exporter
             loads every module in fp32 either way.
2. export:   `diffrt.export.export(...)` (fp32, fused-attention graphs), one stage at a
             time; the peak per stage from the exporter's log.
3. generate-ort / generate-openvino: `Pipeline.load(..., backend=...)` and one image with
             the flux-schnell-4step recipe at --size; records which graphs ran and how
             many attention blocks are fused (ORT: MultiHeadAttention nodes of the fused
             graph; OpenVINO: its compiled model's fused attention nodes).

Each phase runs in its own subprocess, so each phase's peak RSS is its own (the
machinery of real_size_sd15.py / real_size_sdxl.py). Random weights: the speed and
memory are real, the images are noise. Writes benchmarks/results/real_size_flux_u<N>.json.
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
import real_size_sdxl as xl  # noqa: E402 - its export phase, watcher and table

PHASES = ("build", "export", "generate-ort", "generate-openvino")
PRESET = "flux-schnell-4step"
SIZE_FILE = "flux-size.json"  # --units / --t5-layers / --checkpoint-dtype, written for the phase subprocesses

# black-forest-labs/FLUX.1-schnell's transformer/config.json (block counts from --units)
TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24,
                          joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
                          axes_dims_rope=(16, 56, 56))
# its text_encoder_2/config.json: google/t5-v1_1-xxl's encoder (layers from --t5-layers)
T5_CONFIG = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, feed_forward_proj="gated-gelu",
                 relative_attention_num_buckets=32, relative_attention_max_distance=128, tie_word_embeddings=False,
                 dropout_rate=0.0, layer_norm_epsilon=1e-6)
# its vae/config.json: SD's KL VAE widths with 16 latent channels, no quant convs
VAE_CONFIG = {**common.VAE_CONFIG, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611,
              "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True}
SCHEDULER_CONFIG = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}


def read_size(workdir: Path) -> dict[str, Any]:
    return json.loads((workdir / SIZE_FILE).read_text())


def build_checkpoint(folder: Path, seed: int, size: dict[str, Any], tracker: common.StepTracker) -> dict[str, Any]:
    import tempfile

    import diffusers
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from diffrt.export.clip_vocab import find_clip_bpe_vocab, write_real_clip_tokenizer
    from diffrt.export.t5 import write_tiny_t5_tokenizer

    info: dict[str, Any] = {**size}
    tracker.start("tokenizers")
    bpe = find_clip_bpe_vocab()
    if bpe is None:
        raise SystemExit("error: no CLIP BPE vocabulary; pip install --no-deps clip-anytorch (it ships one)")
    with tempfile.TemporaryDirectory() as tmp:
        write_real_clip_tokenizer(Path(tmp), bpe, pad_token="<|endoftext|>")
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
        tokenizer_2 = write_tiny_t5_tokenizer(Path(tmp) / "t5", seed=seed)
    info["tokenizer"] = f"real CLIP BPE vocabulary from {bpe}; a tiny trained T5 vocabulary (ids < 100)"

    tracker.start("random init (CLIP, T5, transformer, VAE)")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        **{**common.TEXT_ENCODER_CONFIG, "vocab_size": max(common.TEXT_ENCODER_CONFIG["vocab_size"], len(tokenizer))},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(seed + 1)
    text_encoder_2 = T5EncoderModel(T5Config(**T5_CONFIG, num_layers=size["t5_layers"]))
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG, num_layers=size["units"],
                                         num_single_layers=2 * size["units"])
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(**VAE_CONFIG)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    for name, module in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2),
                         ("transformer", transformer), ("vae", vae)):
        info[f"{name}_params"] = sum(p.numel() for p in module.parameters())

    tracker.start(f"save_pretrained ({size['checkpoint_dtype']} safetensors)")
    if size["checkpoint_dtype"] == "bf16":  # as black-forest-labs distributes FLUX.1 (the exporter loads fp32)
        for module in (text_encoder, text_encoder_2, transformer, vae):
            module.to(torch.bfloat16)
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                  text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
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
    info = build_checkpoint(checkpoint, args.seed, read_size(args.workdir), tracker)
    return {"seconds": round(time.perf_counter() - t0, 3), **info, "steps": tracker.close()}


def fused_graph_attention(artifact: Path) -> dict[str, int]:
    """MultiHeadAttention and Softmax nodes of the transformer's graphs (no weights read)."""
    import onnx

    from diffrt.artifacts import read_manifest

    manifest = read_manifest(artifact)
    counts = {}
    for name in ("transformer", "transformer-fused"):
        if name in manifest.stages:
            nodes = onnx.load(str(artifact / manifest.stage(name).graph_path), load_external_data=False).graph.node
            counts[name] = {"MultiHeadAttention": sum(n.op_type == "MultiHeadAttention" for n in nodes),
                            "Softmax": sum(n.op_type == "Softmax" for n in nodes)}
    return counts


def phase_export(args: argparse.Namespace) -> dict[str, Any]:
    result = xl.phase_export(args)
    result["attention_nodes"] = fused_graph_attention(args.workdir / "artifact")
    return result


def transformer_steps(tracker: common.StepTracker):
    """A generation callback naming each denoiser call as a step of its own."""
    def callback(done: int, total: int) -> None:
        tracker.start(f"transformer call {done + 1}" if done < total else "VAE decode")
    return callback


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
    pipe = Pipeline.load(artifact, backend=backend, prepare={"height": height, "width": width})
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
        attention = attention_counts(pipe, backend, artifact)
    tracker.end()
    images = result.images
    image_path = args.workdir / f"image-{backend}-{width}x{height}-{args.steps}steps.png"
    to_pil(images)[0].save(image_path)
    timings = {k: ([round(s, 3) for s in v] if isinstance(v, list) else round(v, 3)) for k, v in result.timings.items()}
    return {
        "backend": backend_name, "graphs": graphs, "attention": attention,
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


def attention_counts(pipe, backend: str, artifact: Path) -> dict[str, Any]:
    """How the transformer's attention ran: ORT the fused graph's MultiHeadAttention
    nodes; OpenVINO the fused attention nodes of its compiled model (portable graph)."""
    session = pipe.models["transformer"]
    if backend == "openvino":
        from diffrt.runtime.backends.openvino import attention_ops

        return {"graph": session.spec.name,
                "compiled": [attention_ops(c).to_json() for c in session.compiled_models().values()]}
    return {"graph": session.spec.name, "nodes": fused_graph_attention(artifact).get(session.spec.name)}


PHASE_FUNCTIONS = common.backend_phases(phase_build, phase_export, phase_generate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=1,
                        help="transformer units of 1 double- + 2 single-stream blocks (FLUX.1: 19; default 1)")
    parser.add_argument("--t5-layers", type=int, default=2, help="T5 encoder layers (T5-XXL: 24; default 2)")
    parser.add_argument("--checkpoint-dtype", choices=("bf16", "fp32"), default="bf16",
                        help="the saved checkpoint's weights (default bf16, as FLUX.1 is distributed)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="work folder (default /tmp/diffrt-real-size-flux-u<UNITS>)")
    parser.add_argument("--steps", type=int, default=4, help="num_inference_steps (default 4, the recipe's)")
    parser.add_argument("--size", type=common._size, default=(512, 512), help="WIDTHxHEIGHT (default 512x512)")
    parser.add_argument("--seed", type=int, default=0, help="weights and noise seed (default 0)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated phases (default {','.join(PHASES)})")
    parser.add_argument("--results", type=Path, default=None,
                        help="JSON report (default benchmarks/results/real_size_flux_u<UNITS>.json)")
    parser.add_argument("--table-from", type=Path, metavar="JSON", help="print the table of an earlier report and exit")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--result-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.table_from:
        return xl.print_report(args.table_from)
    if args.steps < 1 or args.units < 1 or args.t5_layers < 1:
        parser.error("--steps, --units and --t5-layers must be >= 1")
    args.workdir = (args.workdir or Path(f"/tmp/diffrt-real-size-flux-u{args.units}")).expanduser().resolve()
    if args.phase:
        return common.run_phase_here(args, PHASE_FUNCTIONS)
    results = args.results or HERE / "results" / f"real_size_flux_u{args.units}.json"
    phases = common.chosen_phases(parser, args.phases, PHASES)
    common.claim_workdir(args.workdir, ".diffrt-real-size-flux", "benchmarks/real_size_flux.py")
    size = {"units": args.units, "t5_layers": args.t5_layers, "checkpoint_dtype": args.checkpoint_dtype}
    if "build" not in phases and (args.workdir / SIZE_FILE).is_file() and read_size(args.workdir) != size:
        raise SystemExit(f"error: {args.workdir} holds a model built with {read_size(args.workdir)}; rerun the build "
                         "phase or give those sizes")
    if "build" in phases:
        (args.workdir / SIZE_FILE).write_text(json.dumps(size) + "\n")
    return common.run_phases(args, phases, common.new_report("real_size_flux", args.workdir, **size), results,
                             Path(__file__), xl.print_table, keeps_earlier=lambda previous: (
                                 previous.get("benchmark") == "real_size_flux" and previous.get("units") == args.units))

if __name__ == "__main__":
    sys.exit(main())
