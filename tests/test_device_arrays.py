"""The runtime's hot path on arrays that are not numpy: what keeps latents on a GPU.

On a GPU the schedulers step CuPy arrays (TensorRT, ONNX Runtime CUDA) or torch
tensors (the torch backend). No GPU here, so a CPU torch tensor stands in for a
foreign array type: every scheduler runs its whole loop on torch tensors and must
stay a torch tensor at every step (a silent trip through numpy is what would cost a
host round trip on a GPU) and agree with the numpy run. numpy stays the reference;
its parity with diffusers is tests/test_schedulers.py.

Tolerance: torch's CPU kernels divide by a scalar as a multiply by its reciprocal, so
single steps differ from numpy's by ~1 ulp; over a 25-step loop 1e-5 of the sample's
magnitude bounds it, far below any semantic difference (>= 1e-3).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from diffrt.runtime import arrays  # noqa: E402
from diffrt.runtime.schedulers import SCHEDULER_NAMES, make_scheduler  # noqa: E402

SD15 = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False,
}
CONFIGS = {
    "sd15": SD15,
    "v_clip": {**SD15, "prediction_type": "v_prediction", "clip_sample": True, "clip_sample_range": 1.0},
    "prk": {**SD15, "skip_prk_steps": False, "timestep_spacing": "trailing"},
}
SHAPE = (2, 4, 8, 8)


class HostNoise:
    """Per-run numpy noise, the same stream for both runs."""

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)

    def standard_normal(self, size, dtype=np.float32):
        return self._rng.standard_normal(size, dtype=dtype)


def run_loop(name: str, config: dict, steps: int, to_array) -> list:
    run = make_scheduler(name, config).plan(steps)
    rng = np.random.default_rng(1)
    x = to_array((rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(run.init_noise_sigma)))
    noise = HostNoise(2)
    outputs = np.random.default_rng(3).standard_normal((len(run.timesteps), *SHAPE), dtype=np.float32)
    trace = []
    for i in range(len(run.timesteps)):
        model_input = run.scale_model_input(x, i)
        x = run.step(to_array(outputs[i]) + model_input * np.float32(0.01), i, x, noise)
        trace.append((model_input, x))
    return trace


@pytest.mark.parametrize("config_id", list(CONFIGS))
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_schedulers_step_torch_tensors_like_numpy(name: str, config_id: str):
    config = CONFIGS[config_id]
    steps = 25 if name != "lcm" else 4
    reference = run_loop(name, config, steps, lambda a: a)
    on_torch = run_loop(name, config, steps, torch.from_numpy)
    for i, ((ref_in, ref_x), (t_in, t_x)) in enumerate(zip(reference, on_torch, strict=True)):
        for ref, ours, what in ((ref_in, t_in, "scale_model_input"), (ref_x, t_x, "step")):
            assert isinstance(ours, torch.Tensor), f"{name} {what} i={i} left torch: {type(ours)}"
            assert ours.dtype == torch.float32, f"{name} {what} i={i}: {ours.dtype}"
            scale = float(np.abs(ref).max()) + 1e-6
            diff = float(np.abs(ours.numpy().astype(np.float64) - ref).max())
            assert diff <= 1e-5 * scale, f"{name} {what} i={i}: diff {diff:.3g} of scale {scale:.3g}"


def test_numpy_path_is_untouched():
    """numpy in, numpy out: the CPU path keeps numpy arrays and numpy's own math."""
    run = make_scheduler("euler", SD15).plan(4)
    x = np.ones(SHAPE, dtype=np.float32)
    assert arrays.namespace(x) is np
    out = run.step(np.zeros(SHAPE, dtype=np.float32), 0, x)
    assert type(out) is np.ndarray and out.dtype == np.float32


def test_noise_follows_the_sample_device():
    from diffrt.runtime.schedulers.common import draw_noise

    like = torch.zeros(SHAPE)
    noise = draw_noise(HostNoise(0), like, "euler_ancestral", 0)
    assert isinstance(noise, torch.Tensor) and noise.shape == like.shape and noise.dtype == torch.float32
    np.testing.assert_array_equal(noise.numpy(), HostNoise(0).standard_normal(SHAPE))


def test_to_host_and_like_round_trip():
    host = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    tensor = arrays.like(host, torch.zeros(1))
    assert isinstance(tensor, torch.Tensor)
    np.testing.assert_array_equal(arrays.to_host(tensor), host)
    assert arrays.like(host, np.zeros(1)) is host
    assert arrays.to_host(host) is host


class DLPackOnly:
    """An array of some other library, seen only through the DLPack protocol (as a CuPy
    array is by the torch backend, or a torch tensor by the TensorRT backend)."""

    def __init__(self, array):
        self._array = array
        self.shape = array.shape

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_dlpack_hand_off_shares_memory():
    """A session of one library takes another library's array through DLPack, without
    a copy: the torch backend's input conversion, on a DLPack-only array."""
    from diffrt.torch_backend import _as_tensor

    source = np.arange(6, dtype=np.float32)
    tensor = _as_tensor(DLPackOnly(source))
    assert isinstance(tensor, torch.Tensor)
    source[0] = 42.0
    assert float(tensor[0]) == 42.0  # the same memory
    np.testing.assert_array_equal(arrays.to_host(tensor), source)
