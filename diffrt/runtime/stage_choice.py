"""Which of an artifact's stages a generation opens: per runtime role, the graph
precision and attention form the backend prefers (or the caller names), int8 stages
where asked for, and every other VAE decoder variant in that precision. Pipeline.load
and `diffrt build` (TensorRT) make the same choice through `select_stages`."""

from __future__ import annotations

from diffrt.artifacts import DEFAULT_VARIANT, FUSED_VARIANT, PRECISIONS, Manifest, StageSpec
from diffrt.errors import ArtifactError, DiffrtError

INT8 = "int8"  # the precision of the stages `diffrt quantize` adds (chosen only when asked for)
ATTENTION_FORMS = ("fused", "portable")


def decoder_key(family, variant: str) -> str:
    return family.VAE_DECODER if variant == DEFAULT_VARIANT else f"{family.VAE_DECODER}:{variant}"


def select_stages(manifest: Manifest, family, backend, graph_precision: str | None,
                   attention: str | None) -> dict[str, StageSpec]:
    """The stages a generation opens: one per runtime role in the backend's preferred
    graph precision and attention form (or as asked), plus every other VAE decoder
    variant the artifact holds in that precision (chosen per call with `vae=`)."""
    if attention not in (None, *ATTENTION_FORMS):
        raise DiffrtError(f"attention={attention!r}; choose one of: {', '.join(ATTENTION_FORMS)}")
    if graph_precision is not None:
        if graph_precision not in PRECISIONS:
            raise DiffrtError(f"graph_precision={graph_precision!r}; choose one of: {', '.join(PRECISIONS)}")
        if graph_precision not in backend.graph_precisions:
            raise DiffrtError(f"backend {backend.name!r} cannot run {graph_precision} graphs; it runs: "
                              f"{', '.join(backend.graph_precisions)}")
    if graph_precision == INT8:
        return with_int8(manifest, select_stages(manifest, family, backend, None, attention))
    precisions = [graph_precision] if graph_precision else list(backend.graph_precisions)
    precisions = [p for p in precisions if p in manifest.precisions] or precisions
    fused = attention == "fused" or (attention is None and backend.fused_attention)
    specs = {}
    for role in family.runtime_roles(manifest.model):
        has_fused = any(s.variant == FUSED_VARIANT for s in manifest.variants(role))
        if attention == "fused" and role in family.ATTENTION_ROLES and not has_fused:
            raise ArtifactError(f"this artifact has no fused-attention {role} graph; export it with a diffrt that "
                                "fuses attention (the default), or use attention='portable'")
        variant = FUSED_VARIANT if fused and has_fused else DEFAULT_VARIANT
        kept_fp32 = family.keeps_fp32(manifest.model, manifest.select(role, variant))  # e.g. SDXL's VAE
        specs[role] = manifest.select(role, variant, [*precisions, "fp32"] if kept_fp32 else precisions)
    for spec in manifest.variants(family.VAE_DECODER):
        if spec.variant not in (DEFAULT_VARIANT, FUSED_VARIANT) and spec.precision == specs[family.VAE_DECODER].precision:
            specs[decoder_key(family, spec.variant)] = spec
    return specs


def with_int8(manifest: Manifest, specs: dict[str, StageSpec]) -> dict[str, StageSpec]:
    """`specs` with each role's int8 stage (`diffrt quantize`) where the artifact has one,
    in the chosen attention form or else the portable one; the other roles as chosen."""
    int8 = {(s.role, s.variant): s for s in manifest.stages.values() if s.precision == INT8}
    if not int8:
        raise ArtifactError("this artifact has no int8 stages; add them with `diffrt quantize OUT` (the int8 extra "
                            "for --method weights|hybrid), or choose another graph precision")
    return {key: int8.get((spec.role, spec.variant), int8.get((spec.role, DEFAULT_VARIANT), spec))
            for key, spec in specs.items()}
