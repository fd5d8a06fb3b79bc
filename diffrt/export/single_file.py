"""Single-file checkpoints (the original LDM / A1111 `.safetensors` layout most
community models ship as): `diffrt export model.safetensors OUT --config FOLDER`.

diffusers' `from_single_file` converts the file's weights into the pipeline class and
component configs of FOLDER (a diffusers pipeline folder of the same architecture,
e.g. a saved stable-diffusion-v1-5; its tokenizer and scheduler are used as they are)
with `local_files_only=True`: nothing is fetched from a hub. The converted pipeline is
saved as a diffusers folder in a temporary directory beside OUT, exported from there
like any other, and removed. The whole checkpoint is in memory once while it
converts (not one stage at a time as from a folder).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from diffrt.errors import DiffrtError

logger = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".ckpt")
NEEDS_CONFIG = ("a single-file checkpoint needs --config DIFFUSERS_FOLDER (a diffusers pipeline folder of the "
                "same architecture, with model_index.json: its configs, tokenizer and scheduler are used)")


def is_single_file(src: str | os.PathLike) -> bool:
    return Path(src).expanduser().is_file()


def convert(src: str | os.PathLike, config: str | os.PathLike | None, workdir: Path) -> Path:
    """`src` converted into a diffusers folder under `workdir` (which the caller removes)."""
    path = Path(src).expanduser()
    if config is None:
        raise DiffrtError(f"{path}: {NEEDS_CONFIG}")
    if path.suffix not in SUFFIXES:
        raise DiffrtError(f"{path}: not a checkpoint file (expected {' or '.join(SUFFIXES)}); pass a "
                          "single-file checkpoint or a diffusers folder")
    config_dir = Path(config).expanduser()
    if not (config_dir / "model_index.json").is_file():
        raise DiffrtError(f"--config {config_dir}: not a diffusers pipeline folder (no model_index.json); "
                          f"{NEEDS_CONFIG}")
    import diffusers

    from diffrt.export.checkpoint import quiet_library_progress, read_model_index

    quiet_library_progress()
    class_name = read_model_index(config_dir)["_class_name"]
    pipeline_class = getattr(diffusers, class_name, None)
    if pipeline_class is None or not hasattr(pipeline_class, "from_single_file"):
        raise DiffrtError(f"--config {config_dir}: a {class_name}, which diffusers cannot load from a single file")
    logger.info("converting %s with %s's configs (%s.from_single_file) ...", path, config_dir, class_name)
    try:
        pipe = pipeline_class.from_single_file(str(path), config=str(config_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds for a file it cannot map
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DiffrtError(f"{path}: diffusers cannot load it as a {class_name} single-file checkpoint with "
                          f"--config {config_dir} ({type(exc).__name__}: {first}); is it a checkpoint of that "
                          "architecture?") from None
    folder = workdir / "diffusers"
    pipe.save_pretrained(folder)
    del pipe
    return folder


def export_single_file(src: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike | None,
                       **options) -> object:
    """Convert, export (diffrt.export.export with `options`), remove the converted folder.
    The manifest's source names the single file."""
    from diffrt.export import export

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.single-file-", dir=out.parent))
    try:
        folder = convert(src, config, workdir)
        return export(folder, out, source_id=str(src), **options)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


__all__ = ["export_single_file", "is_single_file"]
