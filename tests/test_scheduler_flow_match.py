"""Flow matching (SD3, Flux) against diffusers' FlowMatchEulerDiscreteScheduler (torch, CPU):
static shift, dynamic shift with mu, custom sigmas, and img2img's strength (SD3/Flux rule,
scale_noise, sampling from the noised start).

Each case runs the loop the way diffusers' SD3 / Flux pipelines do: set_timesteps(n,
sigmas=, mu=), latents = plain noise (no init_noise_sigma), step(model_output, t, x) with
the same model output arrays on both sides, each side feeding back its own sample.
Tolerances are tests/test_schedulers.py's (RTOL 1e-5 / ATOL 1e-6).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (export extra)")
diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers (export extra)")

from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux_img2img import FluxImg2ImgPipeline  # noqa: E402
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import (  # noqa: E402
    StableDiffusion3Img2ImgPipeline,
)
from test_scheduler_windows import get_timesteps, latents  # noqa: E402
from test_schedulers import close, model_outputs  # noqa: E402

from diffrt.runtime.schedulers import make_scheduler, scheduler_name_for, strength_window  # noqa: E402
from diffrt.runtime.schedulers.flow_match_euler import DEFAULTS  # noqa: E402

CONFIGS = {
    # stabilityai/stable-diffusion-3-medium-diffusers
    "sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
            "num_train_timesteps": 1000, "shift": 3.0},
    # black-forest-labs/FLUX.1-dev
    "flux_dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
                 "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                 "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
    # black-forest-labs/FLUX.1-schnell
    "flux_schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
                     "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                     "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False},
    # the linear resolution-dependent shift, a short training schedule
    "linear_dynamic": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 100,
                       "use_dynamic_shifting": True, "time_shift_type": "linear", "base_shift": 0.95,
                       "max_shift": 2.05, "base_image_seq_len": 1024, "max_image_seq_len": 4096},
    "shift_2_5": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 2.5},
}
DYNAMIC = {config_id for config_id, config in CONFIGS.items() if config.get("use_dynamic_shifting")}
STEP_COUNTS = (1, 2, 4, 28, 50)
IMAGE_SEQ_LENS = (256, 1024, 4096)  # Flux at 256x256, 512x512, 1024x1024: (h // 16) * (w // 16)


def reference(config: dict):
    return diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)


def reference_mu(config: dict, image_seq_len: int) -> float:
    """mu as diffusers' Flux pipeline computes it from the scheduler config."""
    ref = reference(config)
    return calculate_shift(image_seq_len, ref.config.get("base_image_seq_len", 256),
                           ref.config.get("max_image_seq_len", 4096), ref.config.get("base_shift", 0.5),
                           ref.config.get("max_shift", 1.15))


def flux_sigmas(n: int) -> list[float]:
    """The custom sigmas diffusers' Flux pipeline passes (before the scheduler shifts them)."""
    return np.linspace(1.0, 1 / n, n).tolist()


def check_plan(run, ref) -> None:
    """Bit-identical: the same float64 numpy schedule, then float32 IEEE arithmetic on both sides."""
    assert run.timesteps.dtype == np.float32 and run.sigmas.dtype == np.float32
    np.testing.assert_array_equal(run.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(run.sigmas, ref.sigmas.numpy())


def sample_both(run, ref, ref_timesteps, x: np.ndarray, x_ref, seed: int, what: str) -> None:
    assert len(run.timesteps) == len(ref_timesteps), what
    for i, (t, output) in enumerate(zip(ref_timesteps, model_outputs(len(ref_timesteps), seed), strict=True)):
        assert run.scale_model_input(x, i) is x  # the SD3/Flux pipelines feed latents as they are
        x_ref = ref.step(torch.from_numpy(output), t, x_ref).prev_sample
        scale = float(np.abs(x).max())
        x = run.step(output, i, x)
        close(x, x_ref.numpy(), f"{what} step i={i} t={float(t)}", scale)


def parity(config: dict, n: int | None, sigmas=None, mu=None, seed: int = 0) -> None:
    ref = reference(config)
    ref.set_timesteps(n, sigmas=sigmas, mu=mu)
    run = make_scheduler("flow_match_euler", config).plan(n, sigmas=sigmas, mu=mu)
    check_plan(run, ref)
    start = latents(seed)
    sample_both(run, ref, ref.timesteps, start * np.float32(run.init_noise_sigma), torch.from_numpy(start),
                seed + 1, "full")


def cases():
    for config_id in CONFIGS:
        mus = [reference_mu(CONFIGS[config_id], seq) for seq in IMAGE_SEQ_LENS] if config_id in DYNAMIC else [None]
        for mu_index, mu in enumerate(mus):
            for n in STEP_COUNTS:
                yield pytest.param(config_id, n, mu, id=f"{config_id}-{n}-mu{mu_index if mu is not None else '-'}")


@pytest.mark.parametrize(("config_id", "n", "mu"), list(cases()))
def test_default_schedule_matches_diffusers(config_id: str, n: int, mu: float | None):
    parity(CONFIGS[config_id], n, mu=mu)


@pytest.mark.parametrize(("config_id", "n", "mu"), list(cases()))
def test_custom_sigmas_match_diffusers(config_id: str, n: int, mu: float | None):
    """Flux's own sigma list (linear in t, shifted by the scheduler), with n=None as diffusers'
    retrieve_timesteps passes it, and an uneven list."""
    parity(CONFIGS[config_id], None, sigmas=flux_sigmas(n), mu=mu)
    uneven = (np.geomspace(1.0, 0.02, n) if n > 1 else np.array([0.9])).tolist()
    parity(CONFIGS[config_id], n, sigmas=uneven, mu=mu, seed=3)


@pytest.mark.parametrize("config_id", ["flux_schnell", "sd3"])
def test_mu_is_ignored_without_dynamic_shifting(config_id: str):
    """Flux's pipeline passes mu whatever the config; diffusers ignores it when static."""
    parity(CONFIGS[config_id], 4, mu=reference_mu(CONFIGS[config_id], 4096))


@pytest.mark.parametrize("config_id", sorted(DYNAMIC))
@pytest.mark.parametrize("image_seq_len", (*IMAGE_SEQ_LENS, 64 * 48))
def test_mu_for_is_diffusers_calculate_shift(config_id: str, image_seq_len: int):
    scheduler = make_scheduler("flow_match_euler", CONFIGS[config_id])
    assert scheduler.needs_mu
    assert scheduler.mu_for(image_seq_len) == pytest.approx(reference_mu(CONFIGS[config_id], image_seq_len), rel=1e-12)


def test_dynamic_shifting_needs_mu():
    with pytest.raises(ValueError, match="mu"):  # diffusers refuses too
        reference(CONFIGS["flux_dev"]).set_timesteps(4)
    with pytest.raises(ValueError, match="use_dynamic_shifting needs mu="):
        make_scheduler("flow_match_euler", CONFIGS["flux_dev"]).plan(4)
    with pytest.raises(ValueError, match="mu=nan is not supported"):
        make_scheduler("flow_match_euler", CONFIGS["flux_dev"]).plan(4, mu=float("nan"))
    assert not make_scheduler("flow_match_euler", CONFIGS["sd3"]).needs_mu


def test_mu_for_needs_the_shift_keys():
    scheduler = make_scheduler("flow_match_euler", {**CONFIGS["flux_dev"], "max_shift": None})
    with pytest.raises(ValueError, match="max_shift is None"):
        scheduler.mu_for(1024)


# -- img2img -------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline_class", [StableDiffusion3Img2ImgPipeline, FluxImg2ImgPipeline])
@pytest.mark.parametrize("config_id", ["sd3", "flux_dev", "flux_schnell"])
@pytest.mark.parametrize("strength", (0.3, 0.6, 0.9))
@pytest.mark.parametrize("n", (4, 10, 28))
def test_img2img_strength_matches_diffusers(pipeline_class, config_id: str, strength: float, n: int):
    """SD3/Flux img2img: get_timesteps (the "sd3" rule), scale_noise at the first
    timestep, then every step from that start."""
    config = CONFIGS[config_id]
    mu = reference_mu(config, 1024) if config_id in DYNAMIC else None
    sigmas = flux_sigmas(n) if pipeline_class is FluxImg2ImgPipeline else None
    ref = reference(config)
    ref.set_timesteps(n if sigmas is None else None, sigmas=sigmas, mu=mu)
    ref_timesteps = get_timesteps(pipeline_class, ref, n, strength)
    scheduler = make_scheduler("flow_match_euler", config)
    begin, end = strength_window(n, strength, order=scheduler.order, rule="sd3")
    run = scheduler.plan(n, begin=begin, end=end, sigmas=sigmas, mu=mu)
    np.testing.assert_array_equal(run.timesteps, ref_timesteps.numpy())

    x0, noise = latents(5), latents(6)
    start_ref = ref.scale_noise(torch.from_numpy(x0), ref_timesteps[:1].repeat(x0.shape[0]), torch.from_numpy(noise))
    start = run.add_noise(x0, noise, 0)
    close(start, start_ref.numpy(), "scale_noise")
    sample_both(run, ref, ref_timesteps, start, start_ref, 7, f"strength {strength}")


# -- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_id", list(CONFIGS))
def test_config_matches_diffusers_from_config(config_id: str):
    ours = make_scheduler("flow_match_euler", CONFIGS[config_id])
    ref = reference(CONFIGS[config_id])
    assert set(ours.config) == set(DEFAULTS)
    assert dict(ours.config) == {key: ref.config[key] for key in DEFAULTS}
    assert ours.class_name == ref.__class__.__name__ == CONFIGS[config_id]["_class_name"]
    assert ours.order == ref.order


@pytest.mark.parametrize("config_id", list(CONFIGS))
def test_config_round_trip(config_id: str):
    ours = make_scheduler("flow_match_euler", CONFIGS[config_id])
    saved = json.loads(json.dumps({"_class_name": ours.class_name, **ours.config}))
    assert scheduler_name_for(saved["_class_name"], saved) == "flow_match_euler"
    again = make_scheduler("flow_match_euler", saved)
    assert dict(again.config) == dict(ours.config)
    mu = 0.8 if again.needs_mu else None
    np.testing.assert_array_equal(again.plan(10, mu=mu).timesteps, ours.plan(10, mu=mu).timesteps)
