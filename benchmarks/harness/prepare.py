"""One-time preparation in the work folder, reused by later runs when complete:

- the checkpoint and diffrt's export of it, in WORKDIR/sd15 (SD1.5 size, through
  benchmarks/real_size_sd15.py's build and export phases: ~30 s + ~2 min, 8 GiB of disk),
  WORKDIR/sdxl (SDXL size, through benchmarks/real_size_sdxl.py's: ~15 min, 15 GiB of
  memory, 28 GB of disk), WORKDIR/sd35m (SD3.5-medium size without T5, through
  benchmarks/real_size_sd3.py's), or WORKDIR/tiny, WORKDIR/tiny-sdxl and
  WORKDIR/tiny-sd35m for --tiny (`python harness/prepare.py tiny DIR [sd15|sdxl|sd35m]`);
- a copy of the checkpoint for the peers, readable by their older transformers: its
  tokenizer/ and tokenizer_2/ also have vocab.json and merges.txt (transformers 5 saves
  tokenizer.json only; transformers 4.x's slow CLIPTokenizer needs the two files), and
  its text encoders' weights carry the "text_model." prefix that transformers 5.24 no
  longer writes for a CLIPTextModel (transformers 4.57 and 5.5 load such a file as a
  randomly initialised text encoder, with only a warning). SDXL's text_encoder_2, a
  CLIPTextModelWithProjection, is saved with the prefix already, and its
  "text_projection.weight" sits beside "text_model.*", so it keeps its name;
- each peer's own conversion (optimum's ONNX / OpenVINO export, optimum-intel's hybrid
  int8 one), made by its runner script's --prepare under the peer's venv;
- diffrt's artifact variants (specs.ARTIFACT_VARIANTS: int8 after `diffrt quantize`,
  the DeepCache export), WORKDIR/MODEL/artifact-int8 and artifact-deepcache;
- the initial latents, one .npy per (size, batch), the same for every runner.

Every step runs in a subprocess, so the harness process itself never imports torch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # this file also runs as a script (the tiny build), without the harness package
    from harness.specs import ArtifactVariant

BENCHMARKS = Path(__file__).resolve().parent.parent
COMPLETE = ".complete"
REAL_SIZE_SCRIPTS = {"sd15": "real_size_sd15.py", "sdxl": "real_size_sdxl.py", "sd35m": "real_size_sd3.py"}
# Bump when make_peer_checkpoint changes: peer checkpoints and peer exports made from an
# older one are rebuilt. 3: tokenizer_2/ and text_encoder_2/ (SDXL).
PEER_CHECKPOINT_VERSION = 3
TOKENIZERS = ("tokenizer", "tokenizer_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# Keys a CLIPTextModel(WithProjection) state dict has at its top level in the layout every
# transformers before 5.24 reads; any other key belongs under "text_model.".
TOP_LEVEL_KEYS = ("text_model.", "text_projection.")


def model_folder(model: str, tiny: bool) -> str:
    """The work folder's subfolder for a model: its checkpoint, exports, peer exports."""
    if tiny:
        return "tiny" if model == "sd15" else f"tiny-{model}"
    return model


@dataclass(frozen=True)
class Models:
    model: str
    """"sd15" or "sdxl" (harness/specs.py MODELS)."""
    folder: Path
    checkpoint: Path
    artifact: Path
    peer_checkpoint: Path
    vae_scale_factor: int
    latent_channels: int
    prepare_seconds: float
    """Seconds spent building/exporting in this run (0 when reused)."""


def prepare_models(workdir: Path, tiny: bool, log, model: str = "sd15") -> Models:
    if model not in REAL_SIZE_SCRIPTS:
        raise ValueError(f"model {model!r}; choose one of {', '.join(REAL_SIZE_SCRIPTS)}")
    folder = workdir / model_folder(model, tiny)
    checkpoint, artifact = folder / "checkpoint", folder / "artifact"
    started = time.perf_counter()
    if not ((artifact / "manifest.json").is_file() and (checkpoint / "model_index.json").is_file()):
        if tiny:
            cmd = [sys.executable, str(Path(__file__).resolve()), "tiny", str(folder), model]
        else:  # the real-size build + export, with its own report beside the models
            cmd = [sys.executable, str(BENCHMARKS / REAL_SIZE_SCRIPTS[model]), "--phases", "build,export",
                   "--workdir", str(folder), "--results", str(folder / "build-export.json")]
        what = f"{'tiny' if tiny else 'real-size'} {model}"
        log(f"preparing the {what} checkpoint and its diffrt export: {' '.join(cmd)}")
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    peer_checkpoint = folder / "peer-checkpoint"
    if _read_json(peer_checkpoint / COMPLETE).get("version") != PEER_CHECKPOINT_VERSION:
        make_peer_checkpoint(checkpoint, peer_checkpoint)
    facts = json.loads((artifact / "manifest.json").read_text())["model"]
    return Models(model, folder, checkpoint, artifact, peer_checkpoint, int(facts["vae_scale_factor"]),
                  int(facts["latent_channels"]), round(time.perf_counter() - started, 3))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def make_peer_checkpoint(checkpoint: Path, out: Path) -> None:
    """`out`: the checkpoint's folders as symlinks (the same weight files), except
    tokenizer/ and tokenizer_2/ (copied, plus vocab.json and merges.txt from
    tokenizer.json) and text_encoder/ and text_encoder_2/ when their keys need it (the
    same tensors, keys prefixed "text_model." where they are neither that nor
    "text_projection.")."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for entry in checkpoint.iterdir():
        if entry.name in TOKENIZERS and entry.is_dir():
            shutil.copytree(entry, out / entry.name)
            write_slow_tokenizer_files(out / entry.name)
        elif entry.name in TEXT_ENCODERS and entry.is_dir() and needs_prefix(entry):
            write_prefixed_text_encoder(entry, out / entry.name)
        elif entry.is_dir():
            (out / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
        else:
            shutil.copy2(entry, out / entry.name)
    (out / COMPLETE).write_text(json.dumps({"version": PEER_CHECKPOINT_VERSION}))


def needs_prefix(src: Path) -> bool:
    """Whether a text encoder folder's weights have keys outside TOP_LEVEL_KEYS (read from
    the safetensors headers only: SD3's CLIPTextModelWithProjection encoders, saved in
    bf16, which numpy cannot load, are already in the old layout and are linked as they are)."""
    from safetensors import safe_open

    for weights in sorted(src.glob("*.safetensors")):
        with safe_open(weights, framework="numpy") as f:
            if any(not key.startswith(TOP_LEVEL_KEYS) for key in f.keys()):
                return True
    return False


def write_prefixed_text_encoder(src: Path, out: Path, prefix: str = "text_model.") -> None:
    """Copy a CLIPTextModel(WithProjection) folder, renaming weights "embeddings..." ->
    "text_model.embeddings..." (the layout every transformers before 5.24 reads); keys
    already in that layout (TOP_LEVEL_KEYS: "text_model.*", a projection's
    "text_projection.weight") keep their names. Tensors are copied bit for bit."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors"))
    renamed: dict[str, str] = {}
    for weights in sorted(src.glob("*.safetensors")):
        tensors = load_file(weights)
        names = {k: k if k.startswith(TOP_LEVEL_KEYS) else prefix + k for k in tensors}
        renamed.update(names)
        save_file({names[k]: v for k, v in tensors.items()}, out / weights.name, metadata={"format": "pt"})
        del tensors
    index = out / "model.safetensors.index.json"
    if index.is_file():  # a sharded checkpoint: its weight map names the tensors too
        data = json.loads(index.read_text())
        data["weight_map"] = {renamed.get(k, k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def write_slow_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt (the BPE files CLIP's slow tokenizer reads) from the
    fast tokenizer's tokenizer.json, unless they are there already."""
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")


def prepare_peer(python: Path, script: Path, peer_checkpoint: Path, out: Path, log_path: Path,
                 timeout: float) -> dict[str, Any]:
    """Run `script --prepare` once (skipped when `out` is complete). Returns
    {"seconds", "peak_rss_gib", "reused"} or raises RuntimeError with one line."""
    done = _read_json(out / COMPLETE)
    if done.get("peer_checkpoint_version") == PEER_CHECKPOINT_VERSION:
        return {"reused": True, **done}
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        try:
            proc = subprocess.run([str(python), str(script), "--prepare", str(peer_checkpoint), str(out)],
                                  stdout=subprocess.PIPE, stderr=log, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"prepare: no result within {timeout:.0f}s (log {log_path})") from None
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"prepare: {script.name} --prepare exited with status {proc.returncode} (log {log_path})")
    result = json.loads(lines[-1])
    record = {"seconds": round(result["seconds"], 3), "peak_rss_gib": round(result["peak_rss_gib"], 3),
              "peer_checkpoint_version": PEER_CHECKPOINT_VERSION}
    (out / COMPLETE).write_text(json.dumps(record))
    return {"reused": False, **record}


class VariantUnavailable(Exception):
    """diffrt cannot make this artifact variant (a command or flag it lacks yet): one line."""


LINK_BYTES = 16 * 2**20  # files at least this big are hard-linked into a copied export, not copied


def prepare_variant(models: Models, variant: ArtifactVariant, log_path: Path, timeout: float) -> Path:
    """The artifact a variant runner loads, made once beside the plain export (reused
    while its COMPLETE marker records the same diffrt arguments; made again when the
    variant's arguments change): `diffrt ARGS` on the checkpoint, or on a copy of the
    export (small files copied, weights hard-linked: a tool that writes new files leaves
    the plain export as it was). Raises VariantUnavailable with the CLI's own last
    line when diffrt cannot make it."""
    out = models.folder / variant.folder
    places = {"CHECKPOINT": str(models.checkpoint), "OUT": str(out)}
    cmd = [sys.executable, "-m", "diffrt.cli", *(places.get(a, a) for a in variant.command)]
    if _read_json(out / COMPLETE).get("command", [])[3:] == cmd[3:]:  # made by the same diffrt arguments
        return out
    shutil.rmtree(out, ignore_errors=True)
    if variant.copy_export:
        shutil.copytree(models.artifact, out, symlinks=True, copy_function=_copy_or_link)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VariantUnavailable(f"diffrt {variant.command[0]}: no result within {timeout:.0f}s") from None
        log.write(proc.stderr)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise VariantUnavailable(f"diffrt {variant.command[0]} (for {variant.folder}): {last_line(proc.stderr)}")
    (out / COMPLETE).write_text(json.dumps({"command": cmd}))
    return out


def last_line(stderr: bytes) -> str:
    """The CLI's one-line error: its last non-empty stderr line, without argparse's prefix."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    text = lines[-1] if lines else "no message"
    for prefix in ("diffrt: error: ", "error: "):
        text = text.removeprefix(prefix)
    return text[:300]


def _copy_or_link(src: str, dst: str) -> None:
    if Path(src).stat().st_size >= LINK_BYTES:
        try:
            Path(dst).hardlink_to(src)
            return
        except OSError:  # another file system: copy
            pass
    shutil.copy2(src, dst)


def write_latents(folder: Path, channels: int, height: int, width: int, batch: int, seed: int) -> Path:
    """Standard-normal initial latents for (size, batch); every runner scales them by its
    scheduler's initial sigma, as diffusers does with `latents=`."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"latents-{width}x{height}-b{batch}-seed{seed}.npy"
    if not path.is_file():
        rng = np.random.default_rng(seed)
        np.save(path, rng.standard_normal((batch, channels, height, width), dtype=np.float32))
    return path


def _make_tiny(folder: Path, model: str = "sd15") -> None:
    """Child process: a tiny random-weight SD1.x, SDXL or SD3 (without T5, like the
    real-size one) checkpoint and its diffrt export (with a tiny VAE decoder too, for the
    tiny-VAE runner; SD3's 16-channel latents have none here)."""
    from diffrt.export import export
    from diffrt.export.tiny import make_tiny_sd, make_tiny_sd3, make_tiny_sdxl, make_tiny_taesd

    folder.mkdir(parents=True, exist_ok=True)
    if model == "sd35m":
        export(make_tiny_sd3(folder / "checkpoint", kind="sd3-no-t5"), folder / "artifact", overwrite=True)
        return
    make = make_tiny_sdxl if model == "sdxl" else make_tiny_sd
    checkpoint = make(folder / "checkpoint", kind=model)
    export(checkpoint, folder / "artifact", overwrite=True, tiny_vae=make_tiny_taesd(folder / "taesd"))


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] != "tiny" or sys.argv[3:] not in ([], ["sd15"], ["sdxl"], ["sd35m"]):
        raise SystemExit("usage: python benchmarks/harness/prepare.py tiny DIR [sd15|sdxl|sd35m]")
    _make_tiny(Path(sys.argv[2]), *sys.argv[3:])
