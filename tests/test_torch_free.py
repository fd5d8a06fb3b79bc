"""The runtime must never pull in torch, diffusers or transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

HEAVY = ("torch", "diffusers", "transformers", "optimum")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_import_runtime_is_torch_free():
    result = _run(f"""
        import sys, diffrt, diffrt.runtime, diffrt.runtime.backends.ort, diffrt.cli
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        assert not heavy, heavy
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_generating_on_ort_is_torch_free(exported, tmp_path):
    folder = exported("sd15")
    result = _run(f"""
        import sys
        from diffrt import Pipeline
        pipe = Pipeline.load({str(folder)!r}, backend="ort")
        for scheduler in ("pndm", "ddim", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_karras", "lcm"):
            out = pipe("a cat", num_inference_steps=2, seed=0, scheduler=scheduler)
        out.images[0].save({str(tmp_path / "x.png")!r})
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        assert not heavy, heavy
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert (tmp_path / "x.png").stat().st_size > 0


def test_sdxl_base_and_refiner_on_ort_are_torch_free(exported, tmp_path):
    base, refiner = exported("sdxl"), exported("sdxl-refiner")
    result = _run(f"""
        import sys
        from diffrt import Pipeline
        base, refiner = Pipeline.load({str(base)!r}), Pipeline.load({str(refiner)!r})
        for preset in ("sdxl-turbo", "sdxl-lightning-4step", "lcm-sdxl-4step"):
            base("a cat", preset=preset, height=64, width=64, seed=0)
        out = base("a cat", num_inference_steps=4, seed=0, refiner=refiner)
        out.images[0].save({str(tmp_path / "x.png")!r})
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        assert not heavy, heavy
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
    assert (tmp_path / "x.png").stat().st_size > 0
