"""First-Block Cache's two transformer graphs for Flux (`diffrt export SRC OUT --step-cache fbcache`).

diffusers' FirstBlockCache (hooks/first_block_cache.py, `transformer.enable_cache(
FirstBlockCacheConfig(threshold=...))`) runs the first transformer block every step and
compares its residual (output - input hidden states) with the one of the last step that
ran every block: when the relative mean absolute change is at most the threshold, the
other blocks are skipped and the hidden states the first block gives plus the residual
the other blocks added last time go to the output layers. Two graphs, beside the plain
transformer (which uncached requests run):

- `transformer-fbcache-head` (variant "fbcache-head"): embeddings, the first block and,
  on `fbcache_tail_residual` (the cached residual of the other blocks), the output
  layers: `out_sample` (the skipped step's answer), `fbcache_first_residual`,
  `fbcache_hidden` and `fbcache_encoder` (the first block's outputs);
- `transformer-fbcache-tail` (variant "fbcache-tail"): every other block and the output
  layers on the head's outputs: `out_sample` and `fbcache_tail_residual`.

As in diffrt/export/deepcache.py, the graphs are diffusers' own forward with the blocks
that do not run swapped for identities (the exporter drops their ops).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from diffrt.artifacts import TensorSpec
from diffrt.errors import DiffrtError
from diffrt.export.forward_swap import swapped_forwards
from diffrt.runtime.step_cache import (
    FB_ENCODER,
    FB_FIRST_RESIDUAL,
    FB_HIDDEN,
    FB_TAIL_RESIDUAL,
    FBCACHE,
    HEAD_VARIANT,
    TAIL_VARIANT,
)


def _blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks in diffusers' FirstBlockCache order: double-stream, then single-stream."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def _passthrough(*args: Any, **kwargs: Any) -> Any:
    return kwargs["encoder_hidden_states"], kwargs["hidden_states"]


class HeadTransformer(torch.nn.Module):
    """The stage's transformer running its first block only; inputs: the stage's, then
    the cached tail residual; outputs: out_sample (as if the other blocks added that
    residual), the first block's residual, its hidden and encoder outputs."""

    def __init__(self, stage: torch.nn.Module, transformer: torch.nn.Module):
        super().__init__()
        self.stage = stage
        self._transformer = [transformer]

    def forward(self, *inputs: torch.Tensor):
        blocks = _blocks(self._transformer[0])
        first, residual = blocks[0], inputs[-1]
        kept: dict[str, torch.Tensor] = {}
        original = first.forward

        def head(*args: Any, **kwargs: Any) -> Any:
            encoder, hidden = original(*args, **kwargs)
            kept.update(hidden=hidden, encoder=encoder, first=hidden - kwargs["hidden_states"])
            return encoder, hidden + residual  # the encoder stream's residual never reaches the output

        with swapped_forwards([(first, head), *((b, _passthrough) for b in blocks[1:])]):
            out = self.stage(*inputs[:-1])
        return out, kept["first"], kept["hidden"], kept["encoder"]


class TailTransformer(torch.nn.Module):
    """The stage's transformer from its second block on, the first block's outputs as
    its last two inputs; outputs: out_sample and the residual the blocks added."""

    def __init__(self, stage: torch.nn.Module, transformer: torch.nn.Module,
                 fixed: dict[int, torch.Tensor] | None = None):
        super().__init__()
        self.stage = stage
        self._transformer = [transformer]
        self._fixed = dict(fixed or {})

    def forward(self, *inputs: torch.Tensor):
        blocks = _blocks(self._transformer[0])
        hidden, encoder = inputs[-2], inputs[-1]
        given = iter(inputs[:-2])
        args = [self._fixed[k] if k in self._fixed else next(given) for k in range(len(inputs) - 2 + len(self._fixed))]
        kept: dict[str, torch.Tensor] = {}
        last, original = blocks[-1], blocks[-1].forward

        def tail(*a: Any, **k: Any) -> Any:
            out_encoder, out_hidden = original(*a, **k)
            kept["hidden"] = out_hidden
            return out_encoder, out_hidden

        with swapped_forwards([(blocks[0], lambda *a, **k: (encoder, hidden)), (last, tail)]):
            out = self.stage(*args)
        return out, kept["hidden"] - hidden


def _unread(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], own: int) -> set[int]:
    """Positions among all but the last `own` inputs the outputs do not depend on."""
    leaves = [t.detach().clone().float().requires_grad_(True) for t in inputs]
    with torch.enable_grad():
        outs = module(*leaves)
    total = sum(o.float().sum() for o in (outs if isinstance(outs, tuple) else (outs,)))
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return {k for k, g in enumerate(grads[:-own]) if g is None}


def _token_spec(name: str, inner: int) -> TensorSpec:
    return TensorSpec(name, "float32", ("batch", "image_tokens", inner))


def head_stage(stage, io: tuple):
    """(StageModule, (inputs, outputs), facts) of the head graph."""
    transformer = stage.weights
    inner = int(transformer.inner_dim)
    text = io[0][1].shape[1]  # the text length's dim name
    module = HeadTransformer(stage.module, transformer)
    trace_residual = torch.zeros(stage.trace_inputs[0].shape[0], stage.trace_inputs[0].shape[1], inner)
    check_residual = torch.randn(*stage.check_inputs["hidden_states"].shape[:2], inner,
                                 generator=torch.Generator().manual_seed(5)) * 0.1
    inputs, outputs = io
    spec = ((*inputs, _token_spec(FB_TAIL_RESIDUAL, inner)),
            (*outputs, _token_spec(FB_FIRST_RESIDUAL, inner), _token_spec(FB_HIDDEN, inner),
             TensorSpec(FB_ENCODER, "float32", ("batch", text, inner))))
    built = dataclasses.replace(stage, module=module, trace_inputs=(*stage.trace_inputs, trace_residual),
                                check_inputs={**stage.check_inputs, FB_TAIL_RESIDUAL: check_residual})
    return built, spec, {FBCACHE: {"blocks": len(_blocks(transformer))}}


def tail_stage(stage, io: tuple):
    """(StageModule, (inputs, outputs), facts) of the tail graph, traced and checked on
    the first block's outputs for the same inputs."""
    transformer = stage.weights
    inner = int(transformer.inner_dim)
    text = io[0][1].shape[1]
    head = HeadTransformer(stage.module, transformer)
    names = list(stage.check_inputs)

    def first_outputs(feeds):
        residual = torch.zeros(feeds[0].shape[0], feeds[0].shape[1], inner)
        with torch.no_grad():
            _, _, hidden, encoder = head(*feeds, residual)
        return hidden, encoder

    trace_extra = first_outputs(stage.trace_inputs)
    check_extra = first_outputs(tuple(stage.check_inputs.values()))
    unread = _unread(TailTransformer(stage.module, transformer), (*stage.trace_inputs, *trace_extra), 2)
    module = TailTransformer(stage.module, transformer, {k: stage.trace_inputs[k] for k in unread})
    kept = [k for k in range(len(stage.trace_inputs)) if k not in unread]
    inputs, outputs = io
    built = dataclasses.replace(
        stage, module=module, trace_inputs=(*(stage.trace_inputs[k] for k in kept), *trace_extra),
        check_inputs={**{names[k]: stage.check_inputs[names[k]] for k in kept}, FB_HIDDEN: check_extra[0],
                      FB_ENCODER: check_extra[1]})
    spec = ((*(inputs[k] for k in kept), _token_spec(FB_HIDDEN, inner),
             TensorSpec(FB_ENCODER, "float32", ("batch", text, inner))),
            (*outputs, _token_spec(FB_TAIL_RESIDUAL, inner)))
    return built, spec, {FBCACHE: {"blocks": len(_blocks(transformer))}}


def export_stages(fam, folder, staging, opset: int, model: dict[str, Any], loras=()) -> tuple[dict, dict]:
    """Export and check the head and the tail graph (each from its own load)."""
    import importlib

    from diffrt.artifacts import StageSpec
    from diffrt.export import _export_torch_stage

    if fam.NAME != "flux":
        raise DiffrtError(f"--step-cache fbcache is for Flux models; this is {fam.NAME}")
    torch_side = importlib.import_module(fam.EXPORT_MODULE)
    io = fam.stage_io(model)[fam.DENOISER]
    specs, feeds = {}, {}
    for index, (variant, make) in enumerate(((HEAD_VARIANT, head_stage), (TAIL_VARIANT, tail_stage)), 1):
        stage = torch_side.load_stage(folder, fam.DENOISER, model, torch_side.SampleInputs(model, seed=200 + index))
        built, (inputs, outputs), facts = make(stage, io)
        del stage
        name = f"{fam.DENOISER}-{variant}"
        spec = StageSpec(name=name, inputs=inputs, outputs=outputs, role=fam.DENOISER, variant=variant, facts=facts)
        held = [built]
        del built
        specs[name], feeds[name] = _export_torch_stage(spec, held.pop, staging, opset, f"[{FBCACHE} {index}/2]",
                                                       loras)
    return specs, feeds


__all__ = ["HeadTransformer", "TailTransformer", "export_stages", "head_stage", "tail_stage"]
