"""Parity of diffrt's numpy schedulers with diffusers' (torch, CPU), plus config semantics.

Each parity case runs the whole denoising loop the way diffusers' StableDiffusionPipeline
does (init_noise_sigma, scale_model_input, step with the pipeline's generator), on both
sides, with the same model output arrays at every step and, for noise-injecting
schedulers, the same noise, each side feeding back its own sample.

Tolerance: at every step, max |ours - diffusers| <= RTOL * scale + ATOL, RTOL = 1e-5,
ATOL = 1e-6, where scale is the larger of the step's input and output magnitudes. Betas
and alphas_cumprod are bit-identical, but torch's float32 sqrt/pow/log/exp kernels differ
from numpy's by 1-2 ulp (~1e-7 relative) in the step coefficients; x0 = (x - sigma*eps) /
alpha amplifies that by up to 1/alpha_t (~150 at t=999 of a linear schedule) where x and
sigma*eps cancel, and errors accumulate over up to 59 denoiser calls. The largest measured
difference is ~6e-6 of scale (LCM, 1 step); any semantic difference (a wrong timestep,
sigma, coefficient, order or noise draw) is >= 1e-3.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need torch (export extra)")
diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers (export extra)")

from diffrt.runtime.schedulers import (  # noqa: E402
    SCHEDULER_NAMES,
    ddim,
    dpmpp_2m,
    euler,
    euler_ancestral,
    flow_match_euler,
    lcm,
    make_scheduler,
    pndm,
    scheduler_name_for,
)

RTOL = 1e-5
ATOL = 1e-6
SHAPE = (2, 4, 8, 8)
STEP_COUNTS = (1, 2, 4, 10, 25, 50)

# name -> (diffusers class, from_config overrides the name implies)
REFERENCE = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
    "flow_match_euler": ("FlowMatchEulerDiscreteScheduler", {}),  # its parity: tests/test_scheduler_flow_match.py
}
# the schedulers of DDPM-trained (SD-style) models: the configs below are theirs
DDPM_NAMES = tuple(name for name in SCHEDULER_NAMES if name != "flow_match_euler")
MODULES = {
    "DDIMScheduler": ddim,
    "PNDMScheduler": pndm,
    "EulerDiscreteScheduler": euler,
    "EulerAncestralDiscreteScheduler": euler_ancestral,
    "DPMSolverMultistepScheduler": dpmpp_2m,
    "LCMScheduler": lcm,
    "FlowMatchEulerDiscreteScheduler": flow_match_euler,
}

SD15 = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None, "clip_sample": False,
}
CONFIGS = {
    "sd15": SD15,
    # stabilityai/stable-diffusion-2-1
    "sd2_v": {
        "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
        "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None,
    },
    # stabilityai/stable-diffusion-xl-base-1.0
    "sdxl_leading": {
        "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
    },
    # stabilityai/sdxl-turbo
    "trailing": {
        "_class_name": "EulerAncestralDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "timestep_spacing": "trailing", "trained_betas": None, "use_karras_sigmas": False,
    },
    # DDPM-style linear betas; clip_sample (DDIM's default True) and PNDM's default PRK warm-up
    "linear_linspace_clip": {
        "_class_name": "DDIMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
        "timestep_spacing": "linspace", "clip_sample": True, "clip_sample_range": 1.5,
    },
    # SimianLuo/LCM_Dreamshaper_v7
    "lcm_dreamshaper": {
        "_class_name": "LCMScheduler", "_diffusers_version": "0.22.0.dev0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
        "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000, "original_inference_steps": 50,
        "prediction_type": "epsilon", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
        "set_alpha_to_one": True, "steps_offset": 1, "thresholding": False, "timestep_scaling": 10.0,
        "timestep_spacing": "leading", "trained_betas": None,
    },
    # cosine schedule with DPM's low-SNR clipping and a sigma_min final sigma
    "cosine_dpm": {
        "_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "squaredcos_cap_v2",
        "lambda_min_clipped": -5.1, "final_sigmas_type": "sigma_min",
        "timestep_spacing": "trailing", "lower_order_final": False,
    },
    # a UniPC config: DPM maps solver_type bh2 -> midpoint; unknown keys are ignored
    "unipc_leading": {
        "_class_name": "UniPCMultistepScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "beta_end": 0.012, "solver_type": "bh2", "predict_x0": True, "disable_corrector": [],
        "solver_order": 2, "timestep_spacing": "leading", "steps_offset": 1, "euler_at_final": True,
    },
    # Euler's own Karras sigmas with explicit sigma bounds (which DPM, too, reads from the config),
    # EDM-style continuous timesteps
    "euler_karras_continuous_v": {
        "_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "beta_end": 0.012, "prediction_type": "v_prediction", "use_karras_sigmas": True,
        "timestep_type": "continuous", "final_sigmas_type": "sigma_min", "sigma_min": 0.05, "sigma_max": 12.0,
    },
    "trained_betas_100": {
        "_class_name": "DDIMScheduler", "num_train_timesteps": 100,
        "trained_betas": np.linspace(0.001, 0.15, 100).tolist(), "timestep_spacing": "trailing",
        "clip_sample": False, "original_inference_steps": 20,
    },
}
# prediction_type "sample" for the schedulers that support it
SAMPLE_PREDICTION = {**SD15, "prediction_type": "sample", "timestep_spacing": "trailing"}
SAMPLE_PREDICTION_NAMES = ("ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras", "lcm")


def reference(name: str, config: dict):
    class_name, overrides = REFERENCE[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


def model_outputs(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(count)]


class TorchNoise:
    """A NoiseSource drawing what diffusers' randn_tensor draws from a CPU torch.Generator."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def standard_normal(self, size, dtype=np.float64):
        assert dtype == np.float32
        return torch.randn(tuple(size), generator=self.generator, dtype=torch.float32).numpy()


def close(ours: np.ndarray, ref: np.ndarray, what: str, scale: float = 0.0) -> float:
    """Max abs difference / magnitude, asserted <= RTOL (magnitude: max of |ref| and scale)."""
    assert ours.dtype == np.float32, what
    assert ours.shape == ref.shape, what
    diff = float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max())
    magnitude = max(float(np.abs(ref).max()), scale)
    assert diff <= RTOL * magnitude + ATOL, f"{what}: max abs diff {diff:.3g}, magnitude {magnitude:.3g}"
    return diff / (magnitude + ATOL)


def run_parity(name: str, config: dict, steps: int, seed: int = 0) -> float:
    """Run both full loops; return the largest step difference relative to magnitude."""
    ref = reference(name, config)
    ref.set_timesteps(steps)
    run = make_scheduler(name, config).plan(steps)

    ref_timesteps = ref.timesteps.numpy()
    assert run.timesteps.dtype == np.float32
    if ref_timesteps.dtype.kind == "i":
        np.testing.assert_array_equal(run.timesteps, ref_timesteps.astype(np.float32))
    else:  # Karras / continuous Euler timesteps come from log sigmas: ulp-level differences
        np.testing.assert_allclose(run.timesteps, ref_timesteps, rtol=1e-6, atol=1e-6)
    if hasattr(run, "sigmas"):
        np.testing.assert_allclose(run.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=0)
    ref_sigma0 = float(ref.init_noise_sigma)
    assert run.init_noise_sigma == pytest.approx(ref_sigma0, rel=1e-6)

    latents = np.random.default_rng(seed + 1).standard_normal(SHAPE, dtype=np.float32)
    x = latents * run.init_noise_sigma
    x_ref = torch.from_numpy(latents) * ref.init_noise_sigma
    ref_generator = torch.Generator().manual_seed(seed + 2)
    noise = TorchNoise(seed + 2)
    step_kwargs = {"generator": ref_generator} if "generator" in inspect.signature(ref.step).parameters else {}
    worst = 0.0
    for i, (t, output) in enumerate(zip(ref.timesteps, model_outputs(len(ref_timesteps), seed + 3))):
        close(run.scale_model_input(x, i), ref.scale_model_input(x_ref, t).numpy(), f"scale_model_input i={i}")
        out_ref = ref.step(torch.from_numpy(output), t, x_ref, **step_kwargs)
        x_ref = out_ref.prev_sample
        scale = float(np.abs(x).max())
        x = run.step(output, i, x, noise)
        worst = max(worst, close(x, x_ref.numpy(), f"step i={i} t={float(t)}", scale))
    if name == "lcm":  # the LCM pipeline decodes `denoised`; our last step returns it
        close(x, out_ref.denoised.numpy(), "lcm denoised", scale)
    # same number of draws from the same generator: noise was drawn exactly where diffusers draws it
    assert torch.equal(noise.generator.get_state(), ref_generator.get_state())
    return worst


def duplicate_first_timestep(name: str, config: dict, steps: int) -> bool:
    timesteps = make_scheduler(name, config).plan(steps).timesteps
    return len(timesteps) > 1 and timesteps[0] == timesteps[1]


def parity_cases():
    for config_id, config in CONFIGS.items():
        for name in DDPM_NAMES:
            for steps in STEP_COUNTS:
                if name == "pndm" and not config.get("skip_prk_steps") and steps < 4:
                    continue  # covered by test_pndm_prk_needs_four_steps
                if name == "lcm" and steps > config.get("original_inference_steps", 50):
                    continue
                if duplicate_first_timestep(name, config, steps):
                    continue  # covered by test_duplicate_first_timestep_crashes_diffusers
                yield pytest.param(name, config_id, steps, id=f"{name}-{config_id}-{steps}")


@pytest.mark.parametrize(("name", "config_id", "steps"), list(parity_cases()))
def test_parity_with_diffusers(name: str, config_id: str, steps: int):
    run_parity(name, CONFIGS[config_id], steps)


@pytest.mark.parametrize("name", SAMPLE_PREDICTION_NAMES)
@pytest.mark.parametrize("steps", (1, 4, 25))
def test_parity_sample_prediction(name: str, steps: int):
    run_parity(name, SAMPLE_PREDICTION, steps)


@pytest.mark.parametrize("steps", (1, 2, 3))
def test_pndm_prk_needs_four_steps(steps: int):
    config = CONFIGS["linear_linspace_clip"]
    with pytest.raises(ValueError, match="skip_prk_steps=False"):
        make_scheduler("pndm", config).plan(steps)
    with pytest.raises(ValueError):  # diffusers fails too (a numpy broadcast error)
        reference("pndm", config).set_timesteps(steps)


def test_duplicate_first_timestep_crashes_diffusers():
    """Karras sigmas on the cosine schedule round the first timesteps to the same value.

    diffusers then starts at the *second* occurrence (index_for_timestep) and indexes past
    its sigmas at the last step; we run the schedule as planned.
    """
    config, steps = CONFIGS["cosine_dpm"], 10
    assert duplicate_first_timestep("dpmpp_2m_karras", config, steps)
    ref = reference("dpmpp_2m_karras", config)
    ref.set_timesteps(steps)
    run = make_scheduler("dpmpp_2m_karras", config).plan(steps)
    x = x_ref = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    x_ref = torch.from_numpy(x_ref)
    outputs = model_outputs(steps, seed=1)
    with pytest.raises(IndexError):
        for t, output in zip(ref.timesteps, outputs):
            x_ref = ref.step(torch.from_numpy(output), t, x_ref).prev_sample
    for i, output in enumerate(outputs):
        x = run.step(output, i, x)
    assert np.isfinite(x).all()


# -- schedules -------------------------------------------------------------------------------


@pytest.mark.parametrize("config_id", list(CONFIGS))
@pytest.mark.parametrize("name", ("ddim", "euler", "lcm"))
def test_alphas_cumprod_bit_identical(name: str, config_id: str):
    ours = make_scheduler(name, CONFIGS[config_id])
    np.testing.assert_array_equal(ours.alphas_cumprod, reference(name, CONFIGS[config_id]).alphas_cumprod.numpy())


# -- config semantics ----------------------------------------------------------------------------


@pytest.mark.parametrize("class_name", list(MODULES))
def test_defaults_are_diffusers_init_defaults(class_name: str):
    signature = inspect.signature(getattr(diffusers, class_name).__init__)
    expected = {k: p.default for k, p in signature.parameters.items() if k != "self"}
    assert dict(MODULES[class_name].DEFAULTS) == expected


def jsonable(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


@pytest.mark.parametrize(
    ("name", "config_id"),
    [(name, config_id) for config_id in CONFIGS for name in DDPM_NAMES]
    + [(name, "sample_prediction") for name in SAMPLE_PREDICTION_NAMES],
)
def test_config_matches_diffusers_from_config(name: str, config_id: str):
    config = SAMPLE_PREDICTION if config_id == "sample_prediction" else CONFIGS[config_id]
    ours = make_scheduler(name, config)
    ref = reference(name, config)
    init_keys = set(MODULES[ref.__class__.__name__].DEFAULTS)
    assert set(ours.config) - init_keys <= {"sigma_min", "sigma_max"}
    assert init_keys <= set(ours.config)
    assert {k: jsonable(v) for k, v in ours.config.items()} == {k: jsonable(ref.config[k]) for k in ours.config}
    assert ours.class_name == ref.__class__.__name__
    assert ours.name == name
    assert ours.prediction_type == ref.config.prediction_type


@pytest.mark.parametrize("config_id", list(CONFIGS))
@pytest.mark.parametrize("name", DDPM_NAMES)
def test_config_round_trip(name: str, config_id: str):
    ours = make_scheduler(name, CONFIGS[config_id])
    saved = json.loads(json.dumps({"_class_name": ours.class_name, **ours.config}))
    again = make_scheduler(scheduler_name_for(saved["_class_name"], saved), saved)
    assert again.name == ours.name
    assert dict(again.config) == dict(ours.config)
    np.testing.assert_array_equal(again.plan(10).timesteps, ours.plan(10).timesteps)


def test_missing_keys_take_the_class_defaults():
    # PNDM's SD1.5 config has no timestep_spacing: Euler/DPM default to linspace, DDIM to leading
    assert make_scheduler("euler", SD15).config["timestep_spacing"] == "linspace"
    assert make_scheduler("dpmpp_2m", SD15).config["timestep_spacing"] == "linspace"
    assert make_scheduler("ddim", SD15).config["timestep_spacing"] == "leading"
    assert make_scheduler("ddim", {}).config == dict(ddim.DEFAULTS)
    # diffusers does not read back keys it recorded as defaulted
    config = {**SD15, "steps_offset": 5, "_use_default_values": ["steps_offset"]}
    assert make_scheduler("pndm", config).config["steps_offset"] == 0
    assert reference("pndm", config).config.steps_offset == 0


def test_dpm_name_decides_karras():
    karras_config = {**CONFIGS["cosine_dpm"], "use_karras_sigmas": True}
    assert make_scheduler("dpmpp_2m", karras_config).config["use_karras_sigmas"] is False
    assert make_scheduler("dpmpp_2m_karras", SD15).config["use_karras_sigmas"] is True
    assert make_scheduler("dpmpp_2m_karras", SD15).name == "dpmpp_2m_karras"


def test_dpm_reads_sigma_bounds_carried_over_from_another_config():
    config = CONFIGS["euler_karras_continuous_v"]
    ours = make_scheduler("dpmpp_2m_karras", config).plan(10)
    ref = reference("dpmpp_2m_karras", config)
    ref.set_timesteps(10)
    assert ours.sigmas[0] == pytest.approx(12.0, rel=1e-6)
    assert ref.sigmas[0].item() == pytest.approx(12.0, rel=1e-6)


# -- names -------------------------------------------------------------------------------------


def test_every_scheduler_offered_has_a_diffusers_reference():
    """Each name users can pick is covered by the parity tests above (REFERENCE maps it to
    the diffusers class it must match), and each diffusers class named there exists."""
    assert set(SCHEDULER_NAMES) == set(REFERENCE)
    for class_name, _ in REFERENCE.values():
        assert isinstance(getattr(diffusers, class_name), type), class_name


@pytest.mark.parametrize(
    ("class_name", "config", "expected"),
    [
        ("DDIMScheduler", {}, "ddim"),
        ("PNDMScheduler", SD15, "pndm"),
        ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler"),
        ("EulerAncestralDiscreteScheduler", {}, "euler_ancestral"),
        ("DPMSolverMultistepScheduler", {}, "dpmpp_2m"),
        ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}, "dpmpp_2m"),
        ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "dpmpp_2m_karras"),
        ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "_use_default_values": ["use_karras_sigmas"]},
         "dpmpp_2m"),
        ("LCMScheduler", {}, "lcm"),
        ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, "flow_match_euler"),
    ],
)
def test_scheduler_name_for(class_name: str, config: dict, expected: str):
    assert scheduler_name_for(class_name, config) == expected


def test_scheduler_name_for_unknown_class():
    with pytest.raises(ValueError) as error:
        scheduler_name_for("UniPCMultistepScheduler", {})
    message = str(error.value)
    assert "'UniPCMultistepScheduler'" in message
    for class_name in MODULES:
        assert class_name in message


def test_make_scheduler_unknown_name():
    with pytest.raises(ValueError) as error:
        make_scheduler("heun", SD15)
    assert str(error.value) == (
        "unknown scheduler 'heun'; choose one of: ddim, pndm, euler, euler_ancestral, dpmpp_2m, dpmpp_2m_karras, lcm, "
        "flow_match_euler"
    )


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key", "value"),
    [
        ("ddim", "thresholding", True),
        ("ddim", "rescale_betas_zero_snr", True),
        ("ddim", "timestep_spacing", "uniform"),
        ("ddim", "beta_schedule", "sigmoid"),
        ("ddim", "prediction_type", "flow_prediction"),
        ("pndm", "prediction_type", "sample"),
        ("euler", "interpolation_type", "log_linear"),
        ("euler", "use_exponential_sigmas", True),
        ("euler", "use_beta_sigmas", True),
        ("euler", "final_sigmas_type", "max"),
        ("euler_ancestral", "prediction_type", "sample"),
        ("euler_ancestral", "rescale_betas_zero_snr", True),
        ("dpmpp_2m", "algorithm_type", "sde-dpmsolver++"),
        ("dpmpp_2m", "algorithm_type", "dpmsolver"),
        ("dpmpp_2m", "solver_type", "heun"),
        ("dpmpp_2m", "solver_order", 3),
        ("dpmpp_2m_karras", "thresholding", True),
        ("dpmpp_2m", "variance_type", "learned_range"),
        ("dpmpp_2m", "use_lu_lambdas", True),
        ("dpmpp_2m", "use_flow_sigmas", True),
        ("dpmpp_2m", "prediction_type", "flow_prediction"),
        ("lcm", "thresholding", True),
        ("lcm", "rescale_betas_zero_snr", True),
        ("flow_match_euler", "invert_sigmas", True),
        ("flow_match_euler", "stochastic_sampling", True),
        ("flow_match_euler", "shift_terminal", 0.1),
        ("flow_match_euler", "use_karras_sigmas", True),
        ("flow_match_euler", "use_exponential_sigmas", True),
        ("flow_match_euler", "use_beta_sigmas", True),
        ("flow_match_euler", "time_shift_type", "cosine"),
        ("flow_match_euler", "shift", 0),
        ("flow_match_euler", "shift", "3"),
        ("flow_match_euler", "num_train_timesteps", 0),
    ],
)
def test_unsupported_values(name: str, key: str, value):
    with pytest.raises(ValueError) as error:
        make_scheduler(name, {**SD15, key: value})
    message = str(error.value)
    assert f"{key}={value!r}" in message and "allowed:" in message


def test_trained_betas_length_must_match():
    with pytest.raises(ValueError, match="trained_betas has 3 entries"):
        make_scheduler("ddim", {"trained_betas": [0.1, 0.2, 0.3]})


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", (0, -1, 2.5, True))
def test_plan_rejects_bad_step_counts(name: str, steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_scheduler(name, SD15).plan(steps)


def test_lcm_steps_bounded_by_original_inference_steps():
    with pytest.raises(ValueError, match=r"num_inference_steps=51 .*allowed: 1\.\.50"):
        make_scheduler("lcm", CONFIGS["lcm_dreamshaper"]).plan(51)


def test_noise_injecting_steps_need_rng():
    x = np.zeros(SHAPE, np.float32)
    run = make_scheduler("euler_ancestral", SD15).plan(2)
    with pytest.raises(ValueError, match="rng"):
        run.step(x, 0, x)
    run = make_scheduler("lcm", CONFIGS["lcm_dreamshaper"]).plan(2)
    with pytest.raises(ValueError, match="rng"):
        run.step(x, 0, x)
    assert run.step(x, 1, x).dtype == np.float32  # the last LCM step draws nothing


def test_multistep_runs_enforce_order():
    x = np.zeros(SHAPE, np.float32)
    run = make_scheduler("pndm", SD15).plan(4)
    with pytest.raises(ValueError, match="i=1"):
        run.step(x, 1, x)
    run.step(x, 0, x)
    with pytest.raises(ValueError, match="i=9"):
        run.step(x, 9, x)
    # DPM++ may start at any step (a refiner continuing part-way), then runs in order
    run = make_scheduler("dpmpp_2m", SD15).plan(4)
    run.step(x, 1, x)
    with pytest.raises(ValueError, match="i=3"):
        run.step(x, 3, x)
    run.step(x, 2, x)


# -- immutability and independence ---------------------------------------------------------------


def test_scheduler_is_immutable():
    scheduler = make_scheduler("dpmpp_2m", SD15)
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheduler.alphas_cumprod = None
    with pytest.raises(TypeError):
        scheduler.config["prediction_type"] = "v_prediction"
    with pytest.raises(ValueError):
        scheduler.alphas_cumprod[0] = 0.0
    with pytest.raises(ValueError):
        scheduler.plan(4).timesteps[0] = 0.0


@pytest.mark.parametrize("name", ("pndm", "dpmpp_2m_karras"))
def test_runs_are_independent(name: str):
    scheduler = make_scheduler(name, SD15)
    outputs = model_outputs(11, seed=7)

    def solo() -> np.ndarray:
        run = scheduler.plan(10)
        x = outputs[-1]
        for i in range(len(run.timesteps)):
            x = run.step(outputs[i], i, x)
        return x

    first, second = scheduler.plan(10), scheduler.plan(10)
    x1 = x2 = outputs[-1]
    for i in range(len(first.timesteps)):  # interleaved: no state may leak between runs
        x1 = first.step(outputs[i], i, x1)
        x2 = second.step(outputs[i], i, x2)
    np.testing.assert_array_equal(x1, solo())
    np.testing.assert_array_equal(x2, x1)


def test_runtime_imports_no_torch():
    package = Path(__file__).resolve().parents[1] / "diffrt" / "runtime" / "schedulers"
    imports = re.compile(r"^\s*(import|from)\s+(torch|diffusers|transformers)\b", re.MULTILINE)
    for path in package.glob("*.py"):
        assert not imports.search(path.read_text()), path
    code = "import sys, diffrt.runtime.schedulers; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=package.parents[2])
