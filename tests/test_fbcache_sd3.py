"""First-Block Cache on SD3 / SD3.5 (`diffrt export --step-cache fbcache`, `cache="fbcache:T"`).

The reference is diffusers' own FirstBlockCache (`apply_first_block_cache` with
FirstBlockCacheConfig) on StableDiffusion3Pipeline's transformer: same tiny weights,
prompt and latents; we assert 1e-4 on the [0, 1] image scale like the other SD3 parity
tests (measured ~1e-6), the same number of steps on which the blocks after the first
did not run, and that those skips move diffusers' image by far more than the
tolerance (so the comparison tells a cached schedule from an uncached one).

The tiny transformer gets a third block, so that there is a block between the first
and the last (the SD3.5-medium-like kind of diffrt.export.tiny has two).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sentencepiece", reason="the tiny T5 tokenizer is trained with sentencepiece (export extra)")
torch = pytest.importorskip("torch")

from diffrt.errors import DiffrtError  # noqa: E402
from diffrt.runtime.pipeline import Pipeline  # noqa: E402
from diffrt.runtime.step_cache import check  # noqa: E402

TOLERANCE = 1e-4
STEPS = 12


@pytest.fixture(scope="module")
def sd3_cached(tmp_path_factory):
    """(checkpoint, artifact with --step-cache fbcache, plain artifact) of a tiny SD3.5-medium-like
    model whose transformer has three blocks (the first MMDiT-X, the last context_pre_only)."""
    from diffusers import SD3Transformer2DModel

    from diffrt.export import export
    from diffrt.export.tiny import make_tiny_sd3

    checkpoint = make_tiny_sd3(tmp_path_factory.mktemp("ckpt-sd3-fbcache") / "checkpoint", kind="sd3")
    config = dict(SD3Transformer2DModel.load_config(checkpoint / "transformer"), num_layers=3)
    torch.manual_seed(3)
    SD3Transformer2DModel.from_config(config).save_pretrained(checkpoint / "transformer")
    cached = tmp_path_factory.mktemp("fbcache-sd3") / "artifact"
    export(checkpoint, cached, step_cache="fbcache")
    plain = tmp_path_factory.mktemp("plain-sd3") / "artifact"
    export(checkpoint, plain)
    return checkpoint, cached, plain


def _reference(checkpoint):
    import diffusers

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _with_first_block_cache(pipe, threshold: float) -> list:
    """diffusers' FirstBlockCache on the pipeline's transformer; returns a list that gets
    one entry per step on which the last block computed.

    Two things diffusers 0.42 leaves to the caller on SD3: StableDiffusion3Pipeline enters
    no cache context (FluxPipeline does), so one context holds for the whole call, both
    CFG rows in each transformer call as the pipeline batches them; and FBCBlockHook
    subtracts the first block's encoder output from the last block's, which SD3's last
    (context_pre_only) block returns as None (a TypeError). Its forward is wrapped to
    return its encoder input in that place: SD3Transformer2DModel drops the encoder
    stream after the last block, so nothing the output reads changes."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    last = pipe.transformer.transformer_blocks[-1]
    assert last.context_pre_only
    original = last.forward

    def forward(*args, **kwargs):
        encoder, hidden = original(*args, **kwargs)
        return kwargs["encoder_hidden_states"] if encoder is None else encoder, hidden

    last.forward = forward  # before the hook, which wraps the forward it finds
    computed: list = []
    last.norm1.register_forward_hook(lambda *args: computed.append(1))  # runs only when the block computes
    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=threshold))
    _set_cache_context(pipe.transformer, CacheContext("cond"))
    return computed


def _latents(seed: int):
    return torch.randn((1, 16, 16, 24), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@pytest.mark.parametrize(("threshold", "guidance"), [(0.35, 4.0), (0.3, 1.0)])
def test_sd3_first_block_cache_matches_diffusers(sd3_cached, threshold, guidance):
    """With CFG (guidance 4: both rows in one transformer call, one decision for both, as
    diffusers decides) and without (guidance 1). The steps' relative changes nearest to
    these thresholds are 0.012 and 0.016 away (measured in diffusers): far beyond the
    float differences between torch and ONNX Runtime on any CPU."""
    checkpoint, artifact, _ = sd3_cached
    latents = _latents(1)
    call = dict(prompt="a photo of a cat", height=32, width=48, output_type="np", num_inference_steps=STEPS,
                guidance_scale=guidance)
    ref = _reference(checkpoint)
    uncached = ref(latents=latents, **call).images
    computed = _with_first_block_cache(ref, threshold)
    theirs = ref(latents=latents, **call).images
    with Pipeline.load(artifact) as pipe:
        result = pipe(latents=latents.numpy(), cache=f"fbcache:{threshold}", **call)
    diff = float(np.abs(result.images - theirs).max())
    skipped = STEPS - len(computed)
    print(f"fbcache:{threshold} guidance {guidance}: diffusers skipped {skipped} of {STEPS} steps, diffrt "
          f"{result.timings['cached_steps']}; max abs difference {diff:.2e}; "
          f"cached vs uncached {np.abs(theirs - uncached).max():.2e}")
    assert 0 < skipped < STEPS - 1  # some steps skipped, not all: both paths of the hook ran
    assert np.abs(theirs - uncached).max() > 10 * TOLERANCE  # the skips move the image
    assert result.timings["cached_steps"] == skipped
    assert diff <= TOLERANCE


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_cache_off_is_bit_identical_to_a_plain_export(sd3_cached, guidance):
    """The head and tail graphs are extra stages: with the cache off the artifact runs
    the same transformer graph as a plain export, to the same bits."""
    _, artifact, plain_artifact = sd3_cached
    latents = _latents(2).numpy()
    call = dict(prompt="a lamp", height=32, width=48, output_type="np", num_inference_steps=4,
                guidance_scale=guidance)
    with Pipeline.load(artifact) as pipe, Pipeline.load(plain_artifact) as plain:
        assert pipe.manifest.stages["transformer"].files == plain.manifest.stages["transformer"].files
        off = pipe(latents=latents, cache="off", **call)
        before = plain(latents=latents, **call).images
    assert off.timings.get("cached_steps") is None
    assert np.array_equal(off.images, before)


def test_errors_name_the_families_and_the_export_flag(sd3_cached, tiny_checkpoint, tmp_path):
    from types import SimpleNamespace

    from diffrt.export import export

    _, artifact, plain_artifact = sd3_cached
    with Pipeline.load(plain_artifact) as pipe:
        with pytest.raises(DiffrtError, match="--step-cache fbcache") as info:
            pipe.request("a cat", cache="fbcache:0.3")
        assert "\n" not in str(info.value)
    with Pipeline.load(artifact) as pipe:
        with pytest.raises(DiffrtError, match="DeepCache is for UNet models"):
            pipe.request("a cat", cache="deepcache:2")
    unet_artifact = SimpleNamespace(family="sd", stages={})
    with pytest.raises(DiffrtError, match="for Flux and SD3 transformers") as info:
        check(unet_artifact, "unet", "fbcache:0.3")
    assert "\n" not in str(info.value)
    with pytest.raises(DiffrtError, match="made for Flux and SD3 models") as info:
        export(tiny_checkpoint("sd15"), tmp_path / "out", step_cache="fbcache")
    assert "\n" not in str(info.value)
