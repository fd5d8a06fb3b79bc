"""Give an exported artifact LoRA branches: `diffrt lora-branches OUT --rank 16`
(or `diffrt export SRC OUT --lora-branches 16`).

For each fp32 UNet graph of the artifact (the portable one and the fused-attention
one) and each CLIP text encoder, a new stage `<name>-lora` (variant "lora-branches" /
"fused-attention+lora-branches", same role) is written beside it by diffrt.export.passes.lora_branches:
the same weights (hard-linked external data, the same weight map), plus one low-rank
branch per targeted Linear with its factors as batched inputs. The plain stages stay:
a pipeline loaded with `lora_branches=False` runs them as before. The manifest is
rewritten atomically at the end; a failure leaves it as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from diffrt.artifacts import (
    FileRecord,
    StageSpec,
    TensorSpec,
    file_record,
    read_manifest,
    write_manifest,
)
from diffrt.errors import DiffrtError
from diffrt.families import get_family
from diffrt.runtime.lora_branches import BRANCH_OF, FACT

logger = logging.getLogger(__name__)


def check_options(rank: int, targets: str) -> None:
    """A rank and a target set the pass accepts (one line otherwise)."""
    from diffrt.export.passes.lora_branches import TARGETS

    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 1024:
        raise DiffrtError(f"LoRA branch rank {rank!r}: use an integer from 1 to 1024 (e.g. 16, 32)")
    if targets not in TARGETS:
        raise DiffrtError(f"--lora-targets {targets!r}: choose one of {', '.join(TARGETS)}")


def add_branch_stages(folder: str | Path, rank: int, targets: str = "attention") -> list[StageSpec]:
    """Add the LoRA-branch stages to the artifact in `folder`; returns them."""
    from diffrt.export import weight_map
    from diffrt.export.passes.lora_branches import add_lora_branches
    from diffrt.export.passes.stage import InitializerChanges
    from diffrt.weights import read_weight_map

    check_options(rank, targets)
    folder = Path(folder)
    manifest = read_manifest(folder)
    family = get_family(manifest.family)
    if family.DENOISER != "unet":
        raise DiffrtError(f"{folder}: LoRA branches are for UNet models (SD 1.x/2.x, SDXL); this is {manifest.family}")
    roles = (family.DENOISER, *family.TOKENIZER_OF)  # the UNet and the CLIP text encoders
    sources = [s for r in roles for s in manifest.variants(r) if s.precision == "fp32" and s.variant in BRANCH_OF]
    have = [s.name for r in roles for s in manifest.variants(r) if s.variant in BRANCH_OF.values()]
    if have:
        raise DiffrtError(f"{folder} already has LoRA-branch stages ({', '.join(have)}); export again for another "
                          "rank or targets")
    if any(s.weight_map is None for s in sources):
        raise DiffrtError(f"{folder}: its UNet or text encoder has no weight map (exported by an older diffrt); "
                          "re-export it")
    added: list[StageSpec] = []
    try:
        for source in sources:
            name = f"{source.name}-lora"
            weights = read_weight_map(folder / source.weight_map.path)
            # a text encoder runs once per request: every Linear of its layers (attention and MLP) gets one
            chosen = targets if source.role == family.DENOISER else "transformer"
            files, report = add_lora_branches(folder / source.name, folder / name, weights, rank, chosen)
            inputs = [TensorSpec(f"{prefix}{m}", "float32", ("batch", *dims))
                      for m, (i, o) in report.modules.items()
                      for prefix, dims in (("lora_down.", (i, rank)), ("lora_up.", (rank, o)))]
            records = [file_record(folder, files[0])]
            if len(files) > 1:  # the source's bytes, hard-linked: its record, under the new path
                records.append(FileRecord(files[1].relative_to(folder).as_posix(), source.files[1].size,
                                          source.files[1].sha256))
            mapped = weight_map.derive(weights, name, InitializerChanges())
            spec = dataclasses.replace(
                source, name=name, variant=BRANCH_OF[source.variant], inputs=(*source.inputs, *inputs),
                files=tuple(records), passes=(*source.passes, f"lora_branches:{chosen}:{rank}"),
                facts={**source.facts, FACT: {"rank": rank, "targets": chosen, "ignored": list(report.ignored),
                                              "modules": {m: list(d) for m, d in report.modules.items()}}},
                reference=source.name, max_abs_error=None,
                weight_map=weight_map.write(folder / name, folder, mapped))
            added.append(spec)
            logger.info("%s: %d LoRA branches of rank %d (%s)%s", name, len(report.modules), rank, chosen,
                        f"; {len(report.skipped)} targeted layers without one" if report.skipped else "")
        stages = {**manifest.stages, **{s.name: s for s in added}}
        write_manifest(folder, dataclasses.replace(manifest, stages=stages))
    except BaseException:
        for spec in added:
            shutil.rmtree(folder / spec.name, ignore_errors=True)
        raise
    return added


__all__ = ["add_branch_stages", "check_options"]
