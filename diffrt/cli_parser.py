"""The `diffrt` command line's parser: every subcommand, flag, default and help text.

diffrt/cli.py runs the commands; this module only describes them (argparse), so the
help a user reads and the checks argparse makes live in one place.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping

from diffrt import __version__


def _size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (or one number for a square) -> (height, width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: use WIDTHxHEIGHT, e.g. 512x512") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--size {text!r}: use WIDTHxHEIGHT, e.g. 512x768")
    width, height = parts
    return height, width


def _common_options() -> argparse.ArgumentParser:
    """-q/--verbose, accepted before or after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress output (results and errors still print)")
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logs, and the warnings and progress bars of torch/diffusers/transformers")
    return common


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    """Which backend runs which of the artifact's graphs, and how its files are checked
    at load: generate, bench and serve."""
    from diffrt.runtime.backends import backend_names

    p.add_argument("--backend", default="ort",
                   help=f"inference backend: {', '.join(backend_names())} (each needs its library: "
                        "onnxruntime, openvino, TensorRT + CuPy, torch + diffusers); default ort")
    p.add_argument("-O", "--backend-option", action="append", metavar="KEY=VALUE",
                   help="a backend option, repeatable: ort: intra_op_num_threads; openvino: precision=fp32|bf16|fp16, "
                        "num_threads, num_streams, performance_hint=latency|throughput")
    p.add_argument("--graph-precision", default=None, choices=("fp32", "fp16", "bf16", "int8"),
                   help="which of the artifact's graphs to run (default: the backend's choice; ort: fp32 on a CPU); "
                        "int8: the stages `diffrt quantize` added")
    p.add_argument("--attention", default=None, choices=("fused", "portable"),
                   help="fused or portable attention graphs (default: ort fused, openvino portable)")
    verify = p.add_mutually_exclusive_group()
    verify.add_argument("--no-verify", action="store_const", const="size", dest="verify", default="stamp",
                        help="check file sizes only, not sha256 (by default files are hashed once, then again "
                             "only when they change)")
    verify.add_argument("--verify-full", action="store_const", const="full", dest="verify",
                        help="hash every file of the stages loaded, even those verified before")


def _add_generation_args(p: argparse.ArgumentParser, with_prompt: bool = True) -> None:
    from diffrt.runtime.schedulers import SCHEDULER_NAMES

    if with_prompt:
        p.add_argument("prompt", help="what to draw")
    p.add_argument("--negative", default=None, help="negative prompt (what to avoid; used with CFG)")
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: preset / checkpoint)")
    p.add_argument("--cfg", type=float, default=None, help="guidance_scale (<= 1 disables classifier-free guidance)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the first image (image i uses seed+i); default: random, printed")
    p.add_argument("--scheduler", default=None, help=f"one of: {', '.join(SCHEDULER_NAMES)} (default: the checkpoint's)")
    p.add_argument("--preset", default=None,
                   help="a named recipe: SD full-30step, lcm-4step; SDXL full-30step, sdxl-turbo, "
                        "sdxl-lightning-4step, lcm-sdxl-4step")
    p.add_argument("--vae", default=None,
                   help="VAE decoder: default (the checkpoint's), or tiny if exported with --tiny-vae (faster, rougher)")
    p.add_argument("--cache", default=None, metavar="SPEC",
                   help="step cache: off (default), deepcache:N (the full UNet every N steps, its shallow part "
                        "between) or fbcache:T (Flux, SD3: the blocks after the first skipped while its residual moves "
                        "by at most T); needs an artifact exported with --step-cache; bench: a comma list "
                        "compared side by side, e.g. off,deepcache:3")
    _add_backend_args(p)


def _add_lora_branch_args(p: argparse.ArgumentParser, rank_flag: str) -> None:
    required = rank_flag == "--rank"
    p.add_argument(rank_flag, dest="rank" if required else "lora_branches", type=int, required=required,
                   default=None, metavar="RANK",
                   help="also write UNet graphs with unmerged LoRA branches of this rank (the most a request's "
                        "LoRAs add up to per layer, e.g. 16), so requests with different LoRAs share a batch"
                   if not required else "the branches' rank: the most a request's LoRAs add up to per layer")
    p.add_argument("--lora-targets", default="attention", choices=("attention", "transformer"),
                   help="UNet layers given a branch: attention projections (default) or every Linear of the "
                        "transformer blocks (CLIP text encoders: always attention and MLP)")


def build_parser(commands: Mapping[str, Callable[[argparse.Namespace], None]], description: str) -> argparse.ArgumentParser:
    """The whole command line; `commands` maps each subcommand to the function that runs it."""
    common = _common_options()
    parser = argparse.ArgumentParser(prog="diffrt", description=description, parents=[common])
    parser.add_argument("--version", action="version", version=f"diffrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("export", parents=[common], help="export a diffusers checkpoint to an artifact folder")
    p.add_argument("src", help="local diffusers folder (with model_index.json), hub id 'org/name', or a "
                               "single-file checkpoint with --config")
    p.add_argument("out", help="artifact folder to write (appears only when complete)")
    p.add_argument("--family", default="auto", help="model family: sd or sdxl; auto: from model_index.json")
    p.add_argument("--precision", default="fp32",
                   help="fp32 (default), or fp16, bf16, fp16,bf16: half-precision graphs beside the fp32 ones, "
                        "checked against them (fp32 is always exported); int8 in the list (e.g. fp32,int8) then runs "
                        "`diffrt quantize OUT` (static int8 UNet)")
    p.add_argument("--no-fused-attention", dest="fused_attention", action="store_false",
                   help="do not add the fused-attention UNet/VAE graphs (what the ort backend runs by default)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 14..20 (default 17)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new one is done)")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:STRENGTH]",
                   help="a LoRA .safetensors fused into the exported weights (strength default 1); repeatable")
    p.add_argument("--tiny-vae", default=None, metavar="PATH",
                   help="also export this AutoencoderTiny (TAESD) folder as a fast decoder, chosen with --vae tiny")
    p.add_argument("--safety-checker", default=None, metavar="FOLDER",
                   help="also export this saved StableDiffusionSafetyChecker folder ('checkpoint': SRC's own "
                        "safety_checker/), run after decoding with diffrt generate --safety")
    p.add_argument("--step-cache", default=None, metavar="deepcache[:BRANCH]|fbcache",
                   help="also export the UNet as DeepCache's full and shallow graphs, for generate --cache "
                        "deepcache:N (BRANCH: the cache branch, default 0, DeepCache's shallowest); fbcache (Flux, SD3): "
                        "the transformer as First-Block Cache's head and tail graphs, for --cache fbcache:T")
    p.add_argument("--controlnet", action="append", default=None, metavar="FOLDER",
                   help="also export this saved diffusers ControlNetModel folder (and the UNet taking its residuals), "
                        "used with diffrt generate --control-image; repeatable (several ControlNets at once)")
    p.add_argument("--config", default=None, metavar="DIFFUSERS_FOLDER",
                   help="SRC is a single-file checkpoint (.safetensors/.ckpt, original layout): the diffusers "
                        "folder of its architecture (configs, tokenizer, scheduler; nothing is downloaded)")
    p.add_argument("--textual-inversion", action="append", default=None, metavar="FILE[:TOKEN]",
                   help="bake a textual-inversion embedding (.safetensors or A1111 .pt) into the text encoder(s), "
                        "under TOKEN (default: the file's); repeatable")
    _add_lora_branch_args(p, "--lora-branches")
    p.set_defaults(func=commands["export"])

    p = sub.add_parser("lora-branches", parents=[common],
                       help="add LoRA-branch UNet graphs to an artifact (per-row LoRAs: mixed-LoRA batches)")
    p.add_argument("out", help="artifact folder written by `diffrt export`")
    _add_lora_branch_args(p, "--rank")
    p.set_defaults(func=commands["lora-branches"])

    p = sub.add_parser("quantize", parents=[common],
                       help="add int8 stages (denoiser; text encoders with --stages) beside the fp32 ones")
    p.add_argument("out", help="artifact folder written by `diffrt export`")
    p.add_argument("--method", default="static", choices=("dynamic", "static", "weights", "hybrid"),
                   help="dynamic, static (ONNX Runtime: int8 MatMul weights / calibrated QDQ, default), weights, "
                        "hybrid (NNCF, the int8 extra: weight-only / optimum-intel's hybrid)")
    p.add_argument("--stages", default=None, help="roles to quantize, comma-separated (default: the denoiser), "
                   "e.g. unet,text_encoder")
    p.add_argument("--prompts", default=None, help="calibration prompts, one per line (default: the list that "
                   "ships with diffrt); the last 4 measure the error")
    p.add_argument("--exclude", default="auto", help="node groups kept in float: auto (measured, default), none, "
                   "or a list of time_embedding,time_emb_proj,conv_in,conv_out,attention_scores,text_projection")
    p.add_argument("--calibration-steps", type=int, default=None, help="denoising steps per prompt (default 4)")
    p.add_argument("--calibration-size", type=_size, default=None, help="WIDTHxHEIGHT of the calibration runs "
                   "(default: the checkpoint's size, at most 256)")
    p.set_defaults(func=commands["quantize"])

    p = sub.add_parser("generate", parents=[common], help="generate images from an artifact folder")
    p.add_argument("out", help="artifact folder written by `diffrt export`")
    _add_generation_args(p)
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the checkpoint's)")
    p.add_argument("-n", type=int, default=1, help="images per prompt; -o x.png then writes x-0.png, x-1.png, ...")
    p.add_argument("-o", "--output", default="out.png", help="image file to write (default out.png)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--safety", default=None, choices=("flag", "blur", "block", "off"),
                   help="with an artifact exported with --safety-checker: report flagged images (flag, the default), "
                        "blur or black them out (blur, block), or skip the check (off)")
    p.add_argument("--prompt-2", default=None, help="SDXL: the second text encoder's prompt (default: the prompt)")
    p.add_argument("--negative-2", default=None,
                   help="SDXL: the second text encoder's negative prompt (default: --negative)")
    p.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="SD/SDXL: condition on the text encoder's state N layers before the usual one "
                        "(diffusers' clip_skip; prompts only, not negative prompts)")
    p.add_argument("--weighted-prompts", nargs="?", const="compel", default=None, choices=("compel", "a1111"),
                   metavar="SYNTAX",
                   help="SD/SDXL: read weights in the prompts as compel does, (words)1.3 word+ word- (SYNTAX "
                        "compel, the default), or (words:1.3) [words] (a1111); prompts over 75 tokens are chunked "
                        "where the UNet takes a longer text (docs/prompt_weighting.md)")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:STRENGTH]",
                   help="a LoRA .safetensors merged at run time (strength default 1); repeatable")
    p.add_argument("--image", default=None, metavar="PATH",
                   help="img2img: start from this RGB picture (PNG/JPEG; the output takes its size, rounded down to "
                        "a multiple of the VAE's scale factor, unless --size)")
    p.add_argument("--strength", type=float, default=None,
                   help="with --image: how much of the schedule to redo, in (0, 1] (default diffusers': SD 0.8, "
                        "SDXL 0.3, SD3 and Flux 0.6)")
    p.add_argument("--mask", default=None, metavar="PATH",
                   help="with --image: inpaint where this mask is white (default strength as diffusers' inpainting "
                        "pipelines: SD 1.0, SDXL 0.9999, SD3 and Flux 0.6; the checkpoint's size)")
    p.add_argument("--control-image", action="append", default=None, metavar="PATH",
                   help="with an artifact exported with --controlnet: the control image of each ControlNet, in "
                        "export order ('none' for one not used); the size defaults to the first one's")
    p.add_argument("--control-scale", type=float, nargs="+", default=None, metavar="X",
                   help="controlnet_conditioning_scale: one for all ControlNets or one per ControlNet (default 1)")
    p.add_argument("--control-start", type=float, nargs="+", default=None, metavar="S",
                   help="control_guidance_start: the fraction of the steps where the ControlNets start (default 0)")
    p.add_argument("--control-end", type=float, nargs="+", default=None, metavar="E",
                   help="control_guidance_end: the fraction of the steps where they stop (default 1)")
    p.add_argument("--guess-mode", action="store_true",
                   help="diffusers' guess_mode: ControlNets on the conditional rows only, residuals ramped")
    p.add_argument("--padding-mask-crop", type=int, default=None, metavar="N",
                   help="with --mask: inpaint only the mask's bounding box padded by N pixels, at the output size, "
                        "then paste it back into the whole picture (diffusers' padding_mask_crop)")
    p.add_argument("--refiner", default=None, metavar="OUT2",
                   help="SDXL: an exported refiner artifact that denoises the last part of the schedule")
    p.add_argument("--high-noise-frac", type=float, default=None,
                   help="with --refiner: the fraction of the schedule the base denoises (default 0.8)")
    p.set_defaults(func=commands["generate"])

    p = sub.add_parser("bench", parents=[common], help="time the pipeline stages (JSON + table)")
    p.add_argument("out", help="artifact folder written by `diffrt export`")
    _add_generation_args(p, with_prompt=False)
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, multiples of 8 (default: the checkpoint's)")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--runs", type=int, default=5, help="timed runs (rounds) per configuration (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="calls per configuration before the timed ones, kept out of the statistics (default 1)")
    p.add_argument("--precision", default=None, metavar="LIST",
                   help="graph precisions to compare, comma-separated: default, fp32, fp16, bf16, int8 (with --backend "
                        "ort,openvino: every pair); default: the backend's choice")
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse", help="the prompt of every run")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="a prompt set, one per line: runs cycle through it (the same prompt for every "
                        "configuration within a round)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write everything (machine, artifact hash, every run's timings, statistics) here")
    p.set_defaults(func=commands["bench"])

    p = sub.add_parser("inspect", parents=[common], help="describe an artifact folder and check its files")
    p.add_argument("out", help="artifact folder")
    p.add_argument("--verify", action="store_true",
                   help="also hash every file against the manifest and every engine cache entry against its "
                        "meta.json (slower)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="the engine cache to check (default OUT/engines)")
    p.set_defaults(func=commands["inspect"])

    p = sub.add_parser("build", parents=[common], help="build TensorRT engines for an artifact (NVIDIA GPU)")
    p.add_argument("out", help="artifact folder written by `diffrt export`")
    p.add_argument("--backend", default="tensorrt", choices=("tensorrt",),
                   help="the backend to build for (only tensorrt builds ahead of time; ort and openvino "
                        "compile at load)")
    p.add_argument("--batch", default=None, metavar="N|LO-HI", help="images per request, e.g. 1-4 (default 1)")
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT (default: the checkpoint's)")
    p.add_argument("--min-size", type=_size, default=None, help="smallest WIDTHxHEIGHT, with --max-size")
    p.add_argument("--max-size", type=_size, default=None, help="largest WIDTHxHEIGHT, with --min-size")
    p.add_argument("--static", action="store_true", help="one fixed shape (min = opt = max): fastest, for it only")
    p.add_argument("--text-chunks", type=int, default=3, metavar="N",
                   help="SD/SDXL UNet: weighted prompts of up to N chunks of 75 tokens (default 3; 1 with --static)")
    p.add_argument("--precision", default=None, choices=("fp16", "bf16", "fp32"),
                   help="which of the artifact's graphs to build (default: fp16 if exported, then bf16, fp32)")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level 0-5 (default 3)")
    p.add_argument("--workspace-gib", type=float, default=None, help="TensorRT workspace limit in GiB "
                   "(default: TensorRT's)")
    p.add_argument("--refittable", action="store_true", help="engines whose weights can be replaced later (LoRA)")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="engine cache root (default OUT/engines); give the same to generate with -O cache_dir=DIR")
    p.set_defaults(func=commands["build"])

    p = sub.add_parser("demo", parents=[common], help="tiny random checkpoint -> export -> image, offline")
    p.add_argument("--dir", default=None, help="work folder, kept afterwards (default: a new temp folder)")
    p.add_argument("--kind", default="sd15",
                   choices=("sd15", "sd2", "lcm", "sdxl", "flux", "flux-dev", "sd3", "sd3-no-t5"),
                   help="which tiny model (default sd15)")
    p.add_argument("-o", "--output", default="demo.png", help="image file to write (default demo.png)")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    _add_generation_args(p, with_prompt=False)
    p.set_defaults(func=commands["demo"])

    p = sub.add_parser("serve", parents=[common], help="serve an artifact over HTTP (OpenAI-compatible; the serve extra)")
    p.add_argument("out", help="artifact folder written by `diffrt export`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    _add_backend_args(p)
    p.add_argument("--model-name", default=None, help="the model id clients name (default: the folder's name)")
    p.add_argument("--lora", action="append", default=None, metavar="NAME=FILE",
                   help="a LoRA .safetensors requests can name ({\"loras\": {NAME: strength}}); repeatable")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="load every DIR/*.safetensors as a LoRA named after its file")
    p.add_argument("--workers", type=int, default=1,
                   help="batches run at once, each by its own worker thread on one copy of the weights "
                        "(default 1; OpenVINO: one stream each)")
    p.add_argument("--max-batch", type=int, default=4, help="images per pipeline batch (default 4; 1: no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long a request waits for others to batch with (default 10)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429 (default 64)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per-request timeout, queued + running (504)")
    p.add_argument("--max-n", type=int, default=4, help="images per request (default 4)")
    p.add_argument("--max-steps", type=int, default=100, help="num_inference_steps limit (default 100)")
    p.add_argument("--max-size", type=int, default=2048, help="height and width limit in pixels (default 2048)")
    p.add_argument("--max-cost", type=float, default=256.0, metavar="MPX_STEPS",
                   help="per-request work limit: steps x height x width x images / 1e6, defaults included "
                        "(default 256; 30 steps of four 1024x1024 images is 126); beyond: 400")
    p.add_argument("--max-prompt-chars", type=int, default=4000,
                   help="longest prompt or negative prompt in characters (default 4000); beyond: 400")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY'; repeatable: each key's jobs are private to it. "
                        "Visible in `ps`: prefer --api-key-file or $DIFFRT_API_KEY (every key given is accepted)")
    p.add_argument("--api-key-file", default=None, metavar="PATH",
                   help="a file of API keys, one per line (# comments)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up generation")
    p.add_argument("--safety", default=None, choices=("flag", "blur", "block", "off"),
                   help="with an artifact exported with --safety-checker: flag images in the answer (the default), "
                        "also blur or black them out (blur, block), or skip the check (off)")
    p.add_argument("--ray", action="store_true", help="deploy on Ray Serve (ray[serve]), one replica per device")
    p.add_argument("--replicas", type=int, default=None, help="with --ray: a fixed number of replicas")
    p.add_argument("--min-replicas", type=int, default=None, help="with --ray: autoscaling lower bound")
    p.add_argument("--max-replicas", type=int, default=None, help="with --ray: autoscaling upper bound")
    p.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="with --ray: autoscaling target of ongoing requests per replica")
    p.add_argument("--autoscaling-config", default=None, metavar="JSON",
                   help="with --ray: more of Ray Serve's autoscaling_config, as JSON")
    p.add_argument("--ray-address", default=None, help="with --ray: an existing cluster (default: start a local one)")
    p.set_defaults(func=commands["serve"])
    return parser
