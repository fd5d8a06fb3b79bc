"""DeepCache's two UNet graphs (`diffrt export SRC OUT --step-cache deepcache[:BRANCH]`).

Beside the plain UNet (which stays, and is what uncached requests run), an artifact
exported with a step cache gets:

- `unet-deepcache-full` (variant "deepcache-full"): the whole UNet, also outputting
  `deepcache_feature`, the hidden state entering the cache branch's layer of the up path;
- `unet-deepcache-shallow` (variant "deepcache-shallow"): the UNet's shallow path only,
  taking `deepcache_feature` in place of everything below it.

Which layers the shallow path keeps follows the `DeepCache` package's DeepCacheSDHelper
(DeepCache/extension/deepcache.py), which on a cached step reuses every module output
below the branch. Branch b names block B = b // 3 and layer L = b % 3, both counted
from the UNet's outer end: down blocks before B run, and down block B's first L layers;
the mid block and deeper down blocks do not; up block n-1-B runs from its layer
nres-1-L on (layers counted from its last), its upsampler and every later up block run.
Branch 0 (the default) keeps conv_in and the last up block's last layer only.

The graphs are diffusers' own forward with the skipped modules' forwards swapped for
identities (their outputs feed only other skipped modules, so the exporter drops the
dead ops) and the module producing the branch's input swapped for the feature: the
shallow graph holds only the shallow path's ops and weights (tests/test_step_cache.py
counts them). Both are checked against torch like every stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from diffrt.artifacts import TensorSpec
from diffrt.errors import DiffrtError
from diffrt.export.forward_swap import swapped_forwards
from diffrt.runtime.step_cache import DEEPCACHE, FACT, FEATURE, FULL_VARIANT, SHALLOW_VARIANT

LAYERS_PER_BRANCH_BLOCK = 3  # the helper's `cache_branch_id % 3`


@dataclass(frozen=True)
class Layout:
    """Where branch b cuts the UNet: down block `block`, its first `layer` layers kept;
    the feature enters up block `up_block`'s resnet `up_layer` (forward order)."""

    branch: int
    block: int
    layer: int
    up_block: int
    up_layer: int


def parse_option(value: str | None) -> int | None:
    """--step-cache: 'deepcache' (branch 0) or 'deepcache:B' -> B; None -> None."""
    if value is None:
        return None
    kind, _, branch = value.strip().lower().partition(":")
    if kind != DEEPCACHE or (branch and not branch.isdigit()):
        raise DiffrtError(f"--step-cache {value!r}: use deepcache or deepcache:BRANCH (e.g. deepcache:0, the "
                          "shallowest cache branch, DeepCache's default)")
    return int(branch or 0)


def layout(unet: torch.nn.Module, branch: int) -> Layout:
    """Branch b of this UNet, as DeepCacheSDHelper's set_params(cache_branch_id=b) reads it."""
    block, layer = divmod(branch, LAYERS_PER_BRANCH_BLOCK)
    count = len(unet.up_blocks)
    if block >= count or layer >= len(unet.up_blocks[count - 1 - block].resnets):
        raise DiffrtError(f"--step-cache deepcache:{branch}: this UNet has {count} up blocks of "
                          f"{len(unet.up_blocks[-1].resnets)} layers; use a branch from 0 to "
                          f"{count * LAYERS_PER_BRANCH_BLOCK - 1} whose layer (branch % 3) exists")
    up_block = count - 1 - block
    return Layout(branch, block, layer, up_block, len(unet.up_blocks[up_block].resnets) - 1 - layer)


def _producer(unet: torch.nn.Module, where: Layout) -> torch.nn.Module:
    """The module whose output enters the branch's up layer (the feature)."""
    up = unet.up_blocks[where.up_block]
    if where.up_layer > 0:
        attentions = getattr(up, "attentions", None)
        return attentions[where.up_layer - 1] if attentions else up.resnets[where.up_layer - 1]
    return unet.up_blocks[where.up_block - 1] if where.up_block > 0 else unet.mid_block


def _hidden(args: tuple, kwargs: dict) -> Any:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _identity(*args: Any, **kwargs: Any) -> Any:
    return _hidden(args, kwargs)


def _identity_attention(*args: Any, **kwargs: Any) -> Any:
    return (_hidden(args, kwargs),)  # called with return_dict=False, read as [0]


def _skipped_down_block(block: torch.nn.Module):
    """A down block that does not run: its hidden state and skip outputs are its input
    (they feed only up layers that do not run either)."""
    outputs = len(block.resnets) + len(getattr(block, "downsamplers", None) or ())

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = _hidden(args, kwargs)
        return hidden, (hidden,) * outputs
    return forward


def _swapped(unet: torch.nn.Module, where: Layout, feature: torch.Tensor) -> contextlib.AbstractContextManager:
    """The UNet's forward runs the shallow path of `where` on `feature` while inside."""
    pairs: list[tuple[torch.nn.Module, Any]] = []

    def swap(module: torch.nn.Module, forward) -> None:
        pairs.append((module, forward))

    for index, block in enumerate(unet.down_blocks):
        if index > where.block or (index == where.block and where.layer == 0):
            swap(block, _skipped_down_block(block))
        elif index == where.block:
            for j, resnet in enumerate(block.resnets):
                if j >= where.layer:
                    swap(resnet, _identity)
            for j, attention in enumerate(getattr(block, "attentions", None) or ()):
                if j >= where.layer:
                    swap(attention, _identity_attention)
            for downsampler in getattr(block, "downsamplers", None) or ():
                swap(downsampler, _identity)
    if unet.mid_block is not None:
        swap(unet.mid_block, _identity)
    for block in unet.up_blocks[:where.up_block]:
        swap(block, _identity)
    up = unet.up_blocks[where.up_block]
    if where.up_layer > 0:  # the layers before the branch's answer the feature (their concats are dead)
        for resnet in up.resnets[:where.up_layer]:
            swap(resnet, lambda *a, **k: feature)
        for attention in (getattr(up, "attentions", None) or ())[:where.up_layer]:
            swap(attention, lambda *a, **k: (feature,))
    else:
        swap(_producer(unet, where), lambda *a, **k: feature)
    return swapped_forwards(pairs)


class FullUNet(torch.nn.Module):
    """The family's UNet stage, also returning the branch's feature (a forward hook on
    the module producing it)."""

    def __init__(self, stage: torch.nn.Module, unet: torch.nn.Module, where: Layout):
        super().__init__()
        self.stage, self.where = stage, where
        self._producer = _producer(unet, where)

    def forward(self, *inputs: torch.Tensor):
        kept: list[torch.Tensor] = []
        handle = self._producer.register_forward_hook(
            lambda module, args, output: kept.append(output[0] if isinstance(output, tuple) else output))
        try:
            out = self.stage(*inputs)
        finally:
            handle.remove()
        return out, kept[-1]


class ShallowUNet(torch.nn.Module):
    """The family's UNet stage on its shallow path, the branch's feature as last input.

    `fixed`: stage inputs the shallow path does not read (e.g. the text embeddings when
    no attention block is left on it), by position, given a fixed example instead: the
    exporter drops inputs nothing reads, so the graph and its spec leave them out."""

    def __init__(self, stage: torch.nn.Module, unet: torch.nn.Module, where: Layout,
                 fixed: dict[int, torch.Tensor] | None = None):
        super().__init__()
        self.stage, self.where = stage, where
        self._unet = [unet]  # not a second registered copy: `stage` holds it
        self._fixed = dict(fixed or {})

    def forward(self, *inputs: torch.Tensor):
        given = iter(inputs[:-1])
        count = len(inputs) - 1 + len(self._fixed)
        args = [self._fixed[k] if k in self._fixed else next(given) for k in range(count)]
        with _swapped(self._unet[0], self.where, inputs[-1]):
            return self.stage(*args)


def _unread(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> set[int]:
    """Positions of the inputs (all but the last, the feature) the output does not
    depend on (autograd on the trace inputs)."""
    leaves = [t.detach().clone().float().requires_grad_(True) for t in inputs]
    with torch.enable_grad():
        out = module(*leaves)
    grads = torch.autograd.grad(out.float().sum(), leaves, allow_unused=True)
    return {k for k, g in enumerate(grads[:-1]) if g is None}


def _feature_spec(where: Layout, channels: int) -> TensorSpec:
    """Branch 0 with a layer before it keeps the latents' resolution: the same dim names
    bind it (so a backend compiling at load sees its shape); deeper ones get their own."""
    same = where.block == 0 and where.up_layer > 0
    dims = ("latent_height", "latent_width") if same else ("deepcache_height", "deepcache_width")
    return TensorSpec(FEATURE, "float32", ("batch", channels, *dims))


def full_stage(stage, io: tuple, branch: int):
    """(StageModule, inputs, outputs, facts) of the full graph."""
    where = layout(stage.weights, branch)
    module = FullUNet(stage.module, stage.weights, where)
    with torch.no_grad():
        feature = module(*stage.trace_inputs)[1]
    inputs, outputs = io
    spec = (inputs, (*outputs, _feature_spec(where, int(feature.shape[1]))))
    return dataclasses.replace(stage, module=module), spec, _facts(where)


def shallow_stage(stage, io: tuple, branch: int):
    """(StageModule, inputs, outputs, facts) of the shallow graph: trace and check
    inputs with the feature the full UNet gives for them."""
    where = layout(stage.weights, branch)
    full = FullUNet(stage.module, stage.weights, where)
    names = list(stage.check_inputs)
    with torch.no_grad():
        trace_feature = full(*stage.trace_inputs)[1]
        check_feature = full(*stage.check_inputs.values())[1]
    unread = _unread(ShallowUNet(stage.module, stage.weights, where), (*stage.trace_inputs, trace_feature))
    module = ShallowUNet(stage.module, stage.weights, where, {k: stage.trace_inputs[k] for k in unread})
    inputs, outputs = io
    kept = [k for k in range(len(stage.trace_inputs)) if k not in unread]
    feature = _feature_spec(where, int(trace_feature.shape[1]))
    checked = dataclasses.replace(stage, module=module,
                                  trace_inputs=(*(stage.trace_inputs[k] for k in kept), trace_feature),
                                  check_inputs={**{names[k]: stage.check_inputs[names[k]] for k in kept},
                                                FEATURE: check_feature})
    return checked, ((*(inputs[k] for k in kept), feature), outputs), _facts(where)


def _facts(where: Layout) -> dict[str, Any]:
    return {FACT: {"branch": where.branch, "block": where.block, "layer": where.layer}}


def export_stages(fam, folder, staging, opset: int, model: dict[str, Any], branch: int,
                  loras=()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Export and check the full and the shallow graph (each from its own load of the
    UNet, freed before the next); returns (stage specs, check feeds) by stage name."""
    import importlib

    from diffrt.artifacts import StageSpec
    from diffrt.export import _export_torch_stage

    if fam.DENOISER != "unet":
        raise DiffrtError(f"--step-cache deepcache is for UNet models (SD 1.x/2.x, SDXL); this is {fam.NAME}")
    torch_side = importlib.import_module(fam.EXPORT_MODULE)
    io = fam.stage_io(model)[fam.DENOISER]
    specs, feeds = {}, {}
    for index, (variant, make) in enumerate(((FULL_VARIANT, full_stage), (SHALLOW_VARIANT, shallow_stage)), 1):
        # its own seeded inputs: the plain stages' draws stay as they were
        stage = torch_side.load_stage(folder, fam.DENOISER, model, torch_side.SampleInputs(model, seed=100 + index))
        built, (inputs, outputs), facts = make(stage, io, branch)
        del stage
        name = f"{fam.DENOISER}-{variant}"
        spec = StageSpec(name=name, inputs=inputs, outputs=outputs, role=fam.DENOISER, variant=variant, facts=facts)
        held = [built]  # handed over, not kept: the exporter frees the module before its check
        del built
        specs[name], feeds[name] = _export_torch_stage(spec, held.pop, staging, opset, f"[{DEEPCACHE} {index}/2]",
                                                       loras)
    return specs, feeds


FUSED_PREFIX = "fused-attention+"  # as the LoRA-branch variants name theirs


def derive_fused(stages: dict[str, Any], feeds: dict[str, Any], staging) -> dict[str, Any]:
    """Fused-attention graphs of the DeepCache stages (variants.py makes them for the
    default variants only), as ONNX Runtime runs the plain UNet's; a shallow graph with
    no attention block left (branch 0 of a UNet whose last up block has none) keeps its
    portable graph only. The half-precision pass then covers them like every fp32 stage."""
    import logging
    import time

    from diffrt.export.passes import fuse_attention
    from diffrt.export.variants import FUSED_TOLERANCE, _checked, _mapped

    log = logging.getLogger(__name__)
    derived = {}
    for source in [s for s in stages.values() if s.variant in (FULL_VARIANT, SHALLOW_VARIANT)]:
        name = f"{source.name}-fused"
        t0 = time.perf_counter()
        files, report = fuse_attention(staging / source.name, staging / name)
        if report.found == 0:
            import shutil

            shutil.rmtree(staging / name, ignore_errors=True)
            log.info("%s: no attention block on its path: portable graph only", source.name)
            continue
        if not report.complete:
            raise RuntimeError(f"{source.name}: fused {report.fused} of {report.found} attention blocks "
                               f"({'; '.join(report.not_fused) or 'none found'})")
        spec = dataclasses.replace(source, name=name, variant=FUSED_PREFIX + source.variant,
                                   passes=(*source.passes, "fuse_attention"))
        spec = _mapped(spec, source, staging, report.initializers)
        derived[name] = _checked(spec, source, files, staging, feeds[source.name], "ort", FUSED_TOLERANCE)
        log.info("%s: %d attention blocks fused in %.1fs, max abs error vs %s %.2e", name, report.fused,
                 time.perf_counter() - t0, source.name, derived[name].max_abs_error)
    return derived


__all__ = ["FullUNet", "Layout", "ShallowUNet", "derive_fused", "export_stages", "full_stage", "layout",
           "parse_option", "shallow_stage"]
