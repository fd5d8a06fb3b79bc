"""First-Block Cache's two transformer graphs for Flux and SD3 / SD3.5 (`diffrt export SRC OUT
--step-cache fbcache`).

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
that do not run swapped for identities (the exporter drops their ops). The blocks are
diffusers' FirstBlockCache order: Flux's double-stream then single-stream blocks, SD3's
joint blocks (whose last, context_pre_only, returns no encoder stream: only the image
stream's residual is cached, the only one the output layers read). The residuals are
image tokens: Flux's input already is tokens; SD3's is latents, which its patch
embedding cuts into (height / patch) x (width / patch) tokens (the stages' facts record
the patch size for the runtime).
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
    FB_FAMILIES,
    FB_FIRST_RESIDUAL,
    FB_HIDDEN,
    FB_TAIL_RESIDUAL,
    FBCACHE,
    HEAD_VARIANT,
    TAIL_VARIANT,
    patch_tokens,
)


def _blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks in diffusers' FirstBlockCache order: Flux's double-stream, then
    single-stream; SD3's joint blocks (it has no single-stream ones)."""
    return [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", ())]


def _tokens(transformer: torch.nn.Module, hidden_states: torch.Tensor) -> int:
    """The image tokens of the transformer's input: Flux's (batch, tokens, channels) is
    packed already; SD3's latents (batch, channels, height, width) are cut into patches."""
    patch = None if hidden_states.dim() == 3 else int(transformer.config.patch_size)
    return patch_tokens(tuple(hidden_states.shape), patch)


def _facts(transformer: torch.nn.Module, hidden_states: torch.Tensor) -> dict[str, Any]:
    """The stages' facts: the block count, and for latent input the patch size the
    runtime counts the residuals' tokens with (diffrt.runtime.step_cache.image_tokens)."""
    facts: dict[str, Any] = {"blocks": len(_blocks(transformer))}
    if hidden_states.dim() == 4:
        facts["patch_size"] = int(transformer.config.patch_size)
    return {FBCACHE: facts}


def _encoder_spec(inputs: tuple[TensorSpec, ...], inner: int) -> TensorSpec:
    """The first block's encoder-stream output: the stage's text tokens (Flux: T5's; SD3:
    CLIP's and T5's joined) at the blocks' width."""
    text = next(t for t in inputs if t.name == "encoder_hidden_states").shape[1]
    return TensorSpec(FB_ENCODER, "float32", ("batch", text, inner))


def _sample(stage) -> torch.Tensor:
    """The trace inputs' hidden_states (the order of check_inputs is the stage's)."""
    return stage.trace_inputs[list(stage.check_inputs).index("hidden_states")]


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


def _shape_sources(specs: tuple[TensorSpec, ...], unread: set[int], given: tuple[TensorSpec, ...],
                   outputs: tuple[TensorSpec, ...]) -> set[int]:
    """Those of the `unread` inputs whose shape alone an output's dims come from (SD3's
    latents: the output layers unpatchify to their height and width; the first block's
    outputs are tokens): no gradient flows from them, yet the graph needs them."""
    carried = {d for k, t in enumerate(specs) if k not in unread for d in t.shape}
    carried |= {d for t in given for d in t.shape}
    wanted = {d for t in outputs for d in t.shape if isinstance(d, str)} - carried
    return {k for k in unread if wanted & set(specs[k].shape)}


def _token_spec(name: str, inner: int) -> TensorSpec:
    return TensorSpec(name, "float32", ("batch", "image_tokens", inner))


def head_stage(stage, io: tuple):
    """(StageModule, (inputs, outputs), facts) of the head graph."""
    transformer = stage.weights
    inner = int(transformer.inner_dim)
    module = HeadTransformer(stage.module, transformer)
    sample, check_sample = _sample(stage), stage.check_inputs["hidden_states"]
    trace_residual = torch.zeros(sample.shape[0], _tokens(transformer, sample), inner)
    check_residual = torch.randn(check_sample.shape[0], _tokens(transformer, check_sample), inner,
                                 generator=torch.Generator().manual_seed(5)) * 0.1
    inputs, outputs = io
    spec = ((*inputs, _token_spec(FB_TAIL_RESIDUAL, inner)),
            (*outputs, _token_spec(FB_FIRST_RESIDUAL, inner), _token_spec(FB_HIDDEN, inner),
             _encoder_spec(inputs, inner)))
    built = dataclasses.replace(stage, module=module, trace_inputs=(*stage.trace_inputs, trace_residual),
                                check_inputs={**stage.check_inputs, FB_TAIL_RESIDUAL: check_residual})
    return built, spec, _facts(transformer, sample)


def tail_stage(stage, io: tuple):
    """(StageModule, (inputs, outputs), facts) of the tail graph, traced and checked on
    the first block's outputs for the same inputs."""
    transformer = stage.weights
    inner = int(transformer.inner_dim)
    head = HeadTransformer(stage.module, transformer)
    names = list(stage.check_inputs)
    at = names.index("hidden_states")

    def first_outputs(feeds):
        residual = torch.zeros(feeds[at].shape[0], _tokens(transformer, feeds[at]), inner)
        with torch.no_grad():
            _, _, hidden, encoder = head(*feeds, residual)
        return hidden, encoder

    trace_extra = first_outputs(stage.trace_inputs)
    check_extra = first_outputs(tuple(stage.check_inputs.values()))
    inputs, outputs = io
    given = (_token_spec(FB_HIDDEN, inner), _encoder_spec(inputs, inner))
    unread = _unread(TailTransformer(stage.module, transformer), (*stage.trace_inputs, *trace_extra), 2)
    unread -= _shape_sources(inputs, unread, given, outputs)
    module = TailTransformer(stage.module, transformer, {k: stage.trace_inputs[k] for k in unread})
    kept = [k for k in range(len(stage.trace_inputs)) if k not in unread]
    built = dataclasses.replace(
        stage, module=module, trace_inputs=(*(stage.trace_inputs[k] for k in kept), *trace_extra),
        check_inputs={**{names[k]: stage.check_inputs[names[k]] for k in kept}, FB_HIDDEN: check_extra[0],
                      FB_ENCODER: check_extra[1]})
    spec = ((*(inputs[k] for k in kept), *given), (*outputs, _token_spec(FB_TAIL_RESIDUAL, inner)))
    return built, spec, _facts(transformer, stage.trace_inputs[at])


def export_stages(fam, folder, staging, opset: int, model: dict[str, Any], loras=()) -> tuple[dict, dict]:
    """Export and check the head and the tail graph (each from its own load)."""
    import importlib

    from diffrt.artifacts import StageSpec
    from diffrt.export import _export_torch_stage

    if fam.NAME not in FB_FAMILIES:
        raise DiffrtError(f"--step-cache fbcache is for {' and '.join(FB_FAMILIES.values())} models; this is "
                          f"{fam.NAME}")
    torch_side = importlib.import_module(fam.EXPORT_MODULE)
    io = fam.stage_io(model)[fam.DENOISER]
    specs, feeds = {}, {}
    for index, (variant, make) in enumerate(((HEAD_VARIANT, head_stage), (TAIL_VARIANT, tail_stage)), 1):
        stage = torch_side.load_stage(folder, fam.DENOISER, model, torch_side.SampleInputs(model, seed=200 + index))
        if len(_blocks(stage.weights)) < 2:
            raise DiffrtError(f"--step-cache fbcache: this {fam.NAME} transformer has one block; First-Block Cache "
                              "skips the blocks after the first, so it needs two or more")
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
