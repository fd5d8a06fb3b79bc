"""Schedulers on part of a plan, against diffusers (torch, CPU): img2img's `strength`
(timesteps, the noised start, and sampling from it), the SDXL base/refiner cut-offs,
Euler's custom sigmas, and add_noise on device arrays.

Expected values come from diffusers itself: its pipelines' own `get_timesteps`
methods (called on a stand-in pipeline holding the diffusers scheduler), the
scheduler's `add_noise` and `step` after the `set_begin_index` those methods make.
Tolerances are tests/test_schedulers.py's (RTOL 1e-5 of the sample's magnitude, ATOL
1e-6, the reasoning is there).
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (export extra)")
diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers (export extra)")

from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (  # noqa: E402
    StableDiffusionImg2ImgPipeline,
)
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import (  # noqa: E402
    StableDiffusion3Img2ImgPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (  # noqa: E402
    StableDiffusionXLImg2ImgPipeline,
)
from test_schedulers import (  # noqa: E402
    CONFIGS,
    DDPM_NAMES,
    SHAPE,
    TorchNoise,
    close,
    duplicate_first_timestep,
    model_outputs,
    reference,
)

from diffrt.runtime import arrays  # noqa: E402
from diffrt.runtime.schedulers import (  # noqa: E402
    SCHEDULER_NAMES,
    TAKES_SIGMAS,
    denoising_window,
    make_scheduler,
    plan_window,
    strength_window,
)

STRENGTHS = (0.3, 0.6, 0.9)
WINDOW_STEPS = (10, 25)
# NVIDIA's "Align Your Steps" 10-step schedule for SD 1.5 (published sigmas, final 0 appended)
AYS_SD15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029, 0.0]


def get_timesteps(pipeline_class, ref, n: int, strength: float, **kwargs):
    """diffusers' own img2img step selection on `ref` (it also calls ref.set_begin_index)."""
    timesteps, _ = pipeline_class.get_timesteps(SimpleNamespace(scheduler=ref), n, strength, "cpu", **kwargs)
    return timesteps


def latents(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE, dtype=np.float32)


def sample_both(run, ref, ref_timesteps, x: np.ndarray, x_ref, seed: int, what: str):
    """Both loops from their own start over the same model outputs and noise; every step compared."""
    assert len(run.timesteps) == len(ref_timesteps), what
    ref_generator = torch.Generator().manual_seed(seed)
    noise = TorchNoise(seed)
    step_kwargs = {"generator": ref_generator} if "generator" in inspect.signature(ref.step).parameters else {}
    for i, (t, output) in enumerate(zip(ref_timesteps, model_outputs(len(ref_timesteps), seed + 1), strict=True)):
        if hasattr(ref, "scale_model_input"):
            close(run.scale_model_input(x, i), ref.scale_model_input(x_ref, t).numpy(), f"{what} scale i={i}")
        x_ref = ref.step(torch.from_numpy(output), t, x_ref, **step_kwargs).prev_sample
        scale = float(np.abs(x).max())
        x = run.step(output, i, x, noise)
        close(x, x_ref.numpy(), f"{what} step i={i} t={float(t)}", scale)
    assert torch.equal(noise.generator.get_state(), ref_generator.get_state()), what
    return x, x_ref


def check_timesteps(ours: np.ndarray, theirs) -> None:
    theirs = theirs.numpy()
    assert ours.dtype == np.float32
    if theirs.dtype.kind == "i":
        np.testing.assert_array_equal(ours, theirs.astype(np.float32))
    else:  # Karras / continuous / custom-sigma timesteps come from log sigmas: ulp-level differences
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def strength_cases():
    for config_id, config in CONFIGS.items():
        for name in DDPM_NAMES:
            for n in WINDOW_STEPS:
                if name == "lcm" and n > config.get("original_inference_steps", 50):
                    continue
                if name == "pndm" and not config.get("skip_prk_steps") and n < 4:
                    continue
                for strength in STRENGTHS:
                    yield pytest.param(name, config_id, n, strength, id=f"{name}-{config_id}-{n}-{strength}")


def img2img_parity(name: str, config: dict, n: int, strength: float, sigmas=None, seed: int = 0) -> None:
    """SD img2img with this scheduler: timesteps, the noised start, then every step."""
    scheduler = make_scheduler(name, config)
    ref = reference(name, config)
    if sigmas is None:
        ref.set_timesteps(n)
    else:
        ref.set_timesteps(sigmas=sigmas)
    ref_timesteps = get_timesteps(StableDiffusionImg2ImgPipeline, ref, n, strength)
    begin, end = strength_window(n, strength, order=scheduler.order)
    run = scheduler.plan(None if sigmas is not None else n, begin=begin, end=end, sigmas=sigmas)
    check_timesteps(run.timesteps, ref_timesteps)

    x0, noise = latents(seed), latents(seed + 1)
    start_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ref_timesteps[:1].repeat(SHAPE[0]))
    start = run.add_noise(x0, noise, 0)
    close(start, start_ref.numpy(), "add_noise")
    sample_both(run, ref, ref_timesteps, start, start_ref, seed + 2, f"strength {strength}")


@pytest.mark.parametrize(("name", "config_id", "n", "strength"), list(strength_cases()))
def test_img2img_strength_matches_diffusers(name: str, config_id: str, n: int, strength: float):
    img2img_parity(name, CONFIGS[config_id], n, strength)


# -- the strength rule itself -------------------------------------------------------------------


@pytest.mark.parametrize("n", (1, 2, 3, 7, 10, 25, 50))
@pytest.mark.parametrize(("pipeline_class", "rule"), [(StableDiffusionImg2ImgPipeline, "sd"),
                                                      (StableDiffusion3Img2ImgPipeline, "sd3")])
def test_strength_rule_matches_diffusers_get_timesteps(n: int, pipeline_class, rule: str):
    """Over a grid of strengths (0.3 and 0.35 of 10 steps are where the two rules differ,
    by float rounding and int()), including an order-2 scheduler (Heun: every timestep but
    the first is visited twice)."""
    for class_name in ("EulerDiscreteScheduler", "HeunDiscreteScheduler"):
        ref = getattr(diffusers, class_name)()
        ref.set_timesteps(n)
        for strength in np.linspace(0.0, 1.0, 41).tolist() + [0.3, 0.35, 0.7]:
            ref_timesteps = get_timesteps(pipeline_class, ref, n, strength)
            if len(ref_timesteps) == 0:
                with pytest.raises(ValueError, match="no step"):
                    strength_window(n, strength, order=ref.order, rule=rule)
                continue
            begin, end = strength_window(n, strength, order=ref.order, rule=rule)
            assert end is None
            assert begin == len(ref.timesteps) - len(ref_timesteps), (class_name, strength)
            assert begin == ref.begin_index


@pytest.mark.parametrize("strength", (-0.1, 1.5, "0.5", True, None))
def test_strength_must_be_a_fraction(strength):
    with pytest.raises(ValueError, match="strength must be a number between 0 and 1"):
        strength_window(10, strength)


def test_strength_rule_name_checked():
    with pytest.raises(ValueError, match="rule='flux' is not supported; choose one of: sd, sd3"):
        strength_window(10, 0.5, rule="flux")


# -- the base/refiner cut-offs ----------------------------------------------------------------------


def handoff_cases():
    for config_id in ("sd15", "sdxl_leading", "trailing", "sd2_v", "lcm_dreamshaper", "cosine_dpm"):
        for name in DDPM_NAMES:
            if name == "pndm":
                continue  # cannot start late: test_pndm_refuses_a_late_start
            for n, fraction in ((10, 0.8), (7, 0.5), (25, 0.3)):
                if duplicate_first_timestep(name, CONFIGS[config_id], n):
                    continue  # diffusers' base loop fails there: test_duplicate_first_timestep_crashes_diffusers
                yield pytest.param(name, config_id, n, fraction, id=f"{name}-{config_id}-{n}-{fraction}")


@pytest.mark.parametrize(("name", "config_id", "n", "fraction"), list(handoff_cases()))
def test_base_refiner_handoff_matches_diffusers(name: str, config_id: str, n: int, fraction: float):
    """The base runs up to denoising_end, the refiner on from denoising_start (SDXL img2img's
    get_timesteps), each side continuing its own latents; the base's end must be where
    diffusers' refiner begins."""
    config = CONFIGS[config_id]
    scheduler = make_scheduler(name, config)
    full = scheduler.plan(n)
    begin, end = denoising_window(full.timesteps, config.get("num_train_timesteps", 1000), denoising_start=fraction)
    base_begin, base_end = denoising_window(full.timesteps, config.get("num_train_timesteps", 1000),
                                            denoising_end=fraction)
    ref_refiner = reference(name, config)
    ref_refiner.set_timesteps(n)
    refiner_timesteps = get_timesteps(StableDiffusionXLImg2ImgPipeline, ref_refiner, n, 0.3, denoising_start=fraction)
    assert (begin, end) == (len(full.timesteps) - len(refiner_timesteps), len(full.timesteps))
    assert (base_begin, base_end) == (0, begin)

    ref_base = reference(name, config)
    ref_base.set_timesteps(n)
    base = scheduler.plan(n, end=base_end)
    check_timesteps(base.timesteps, ref_base.timesteps[:base_end])
    x = latents(4) * np.float32(base.init_noise_sigma)
    x_ref = torch.from_numpy(latents(4)) * ref_base.init_noise_sigma
    x, x_ref = sample_both(base, ref_base, ref_base.timesteps[:base_end], x, x_ref, 5, "base")
    refiner = plan_window(scheduler, n, denoising_start=fraction)
    check_timesteps(refiner.timesteps, refiner_timesteps)
    sample_both(refiner, ref_refiner, refiner_timesteps, x, x_ref, 7, "refiner")


def test_pndm_refuses_a_late_start():
    with pytest.raises(ValueError, match="cannot start part-way"):
        plan_window(make_scheduler("pndm", CONFIGS["sd15"]), 10, denoising_start=0.5)


@pytest.mark.parametrize(("start", "end", "message"), [
    (0.0, None, "denoising_start must be a number between 0 and 1"),
    (None, 1.0, "denoising_end must be a number between 0 and 1"),
    (0.8, 0.5, "denoising_start=0.8 must be below denoising_end=0.5"),
    (0.5, 0.55, "no step of the 4-step schedule"),
])
def test_denoising_window_errors(start, end, message):
    timesteps = make_scheduler("euler", CONFIGS["sd15"]).plan(4).timesteps
    with pytest.raises(ValueError, match=message):
        denoising_window(timesteps, 1000, start, end)


# -- custom sigmas ----------------------------------------------------------------------------------


CUSTOM_SIGMAS = {
    "ays_sd15": AYS_SD15,
    "geometric_7": np.geomspace(12.0, 0.05, 7).tolist() + [0.0],
    "one_step": [14.6, 0.0],
}


def custom_sigma_cases():
    for config_id in ("sd15", "sdxl_leading", "trailing", "euler_karras_continuous_v"):
        for sigmas_id, sigmas in CUSTOM_SIGMAS.items():
            for strength in (1.0, *STRENGTHS):
                if int((len(sigmas) - 1) * strength) > 0:  # else no step is left (test_strength_rule_...)
                    yield pytest.param(config_id, sigmas_id, strength, id=f"{config_id}-{sigmas_id}-{strength}")


@pytest.mark.parametrize(("config_id", "sigmas_id", "strength"), list(custom_sigma_cases()))
def test_euler_custom_sigmas_match_diffusers(config_id: str, sigmas_id: str, strength: float):
    sigmas = CUSTOM_SIGMAS[sigmas_id]
    n = len(sigmas) - 1
    if strength == 1.0:  # the whole plan: diffusers' text-to-image loop from init_noise_sigma
        config = CONFIGS[config_id]
        ref = reference("euler", config)
        ref.set_timesteps(sigmas=sigmas)
        run = make_scheduler("euler", config).plan(sigmas=sigmas)
        check_timesteps(run.timesteps, ref.timesteps)
        np.testing.assert_allclose(run.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=0)
        assert run.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
        x, x_ref = latents(0) * np.float32(run.init_noise_sigma), torch.from_numpy(latents(0)) * ref.init_noise_sigma
        sample_both(run, ref, ref.timesteps, x, x_ref, 1, "custom sigmas")
    else:
        img2img_parity("euler", CONFIGS[config_id], n, strength, sigmas=sigmas)


def test_takes_sigmas_names_the_diffusers_classes_that_do():
    for name in SCHEDULER_NAMES:
        scheduler = make_scheduler(name, {})
        accepts = "sigmas" in inspect.signature(getattr(diffusers, scheduler.class_name).set_timesteps).parameters
        assert (name in TAKES_SIGMAS) == accepts == scheduler.takes_sigmas, name


@pytest.mark.parametrize("name", [name for name in SCHEDULER_NAMES if name not in TAKES_SIGMAS])
def test_sigmas_refused_by_the_others(name: str):
    with pytest.raises(ValueError) as error:
        make_scheduler(name, CONFIGS["sd15"]).plan(10, sigmas=AYS_SD15)
    assert str(error.value).endswith("choose one of: euler, flow_match_euler")
    assert "sigmas=" in str(error.value)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_inference_steps": 5, "sigmas": AYS_SD15}, "sigmas= gives 11 steps"),
    ({"sigmas": [1.0]}, "at least 2 numbers"),
    ({"sigmas": [3.0, float("nan"), 0.0]}, "finite numbers >= 0, got nan"),
    ({"sigmas": [3.0, -1.0, 0.0]}, "finite numbers >= 0, got -1.0"),
    ({"sigmas": [[3.0, 0.0]]}, "got shape"),
    ({"sigmas": "3, 0"}, "list of numbers"),
    ({"num_inference_steps": 10, "mu": 0.5}, "mu= is not supported"),
])
def test_plan_argument_errors(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        make_scheduler("euler", CONFIGS["sd15"]).plan(**kwargs)


@pytest.mark.parametrize(("begin", "end"), [(-1, None), (10, None), (5, 5), (0, 11), (1.0, None), (0, True)])
def test_window_bounds(begin, end):
    with pytest.raises(ValueError, match="begin="):
        make_scheduler("ddim", CONFIGS["sd15"]).plan(10, begin=begin, end=end)


# -- add_noise on device arrays -----------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_add_noise_stays_on_the_array_type(name: str):
    """A CPU torch tensor stands in for a GPU array (tests/test_device_arrays.py): the noised
    start must stay a float32 tensor and agree with the numpy result."""
    run = make_scheduler(name, CONFIGS["sd15"]).plan(10, begin=4)
    x0, noise = latents(0), latents(1)
    on_numpy = run.add_noise(x0, noise, 0)
    on_torch = run.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), 0)
    assert isinstance(on_torch, torch.Tensor) and on_torch.dtype == torch.float32
    assert type(on_numpy) is np.ndarray and on_numpy.dtype == np.float32
    scale = float(np.abs(on_numpy).max())
    assert float(np.abs(arrays.to_host(on_torch) - on_numpy).max()) <= 1e-6 * scale
