"""What benchmarks/compare.py runs: the workloads and the runner table.

Adding a diffrt configuration is one line in RUNNERS: a name, Pipeline.load kwargs and
extra pipe(...) kwargs. A configuration this diffrt cannot run yet (backend not built or
not installed, an option the pipeline does not take) is reported "not available: <the
error's one line>", never as a number.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent.parent
PEERS = BENCHMARKS / "peers"
PROMPT = "a photo of an astronaut riding a horse on mars"
SEED = 0


@dataclass(frozen=True)
class Workload:
    """One generation recipe, the same for every runner."""

    name: str
    scheduler: str
    """diffrt's scheduler name; peers map it to the diffusers class (peers/diffusers_api.py)."""
    steps: int
    guidance_scale: float
    height: int
    width: int
    batches: tuple[int, ...]
    """num_images_per_prompt values to time (one call each)."""
    deterministic: bool
    """The scheduler injects no noise, so all runners' images must agree (checked)."""
    model: str = "sd15"
    """The checkpoint it runs on, a key of MODELS; one run of the harness uses one model."""
    preset: str | None = None
    """The diffrt preset it is (passed as pipe(preset=...)); scheduler, steps and guidance
    above equal the preset's, so the peers, which know no presets, get the same recipe."""
    scheduler_config: tuple[tuple[str, Any], ...] = ()
    """Overrides of the checkpoint's scheduler config (the preset's own, e.g. trailing
    timestep spacing): peers apply them with SchedulerClass.from_config(config, **overrides)."""

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def denoiser_batch(self, batch: int) -> int:
        """Rows in each denoiser call: uncond + cond when CFG is on."""
        return batch * (2 if self.cfg else 1)

    def describe(self) -> str:
        cfg = f"CFG {self.guidance_scale:g}" if self.cfg else "no CFG"
        scheduler = self.scheduler + "".join(f", {k}={v}" for k, v in self.scheduler_config)
        text = f"{scheduler}, {self.steps} steps, {cfg}, {self.width}x{self.height}"
        return f"{self.preset} preset ({text})" if self.preset else text

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "preset": self.preset, "scheduler": self.scheduler,
                "scheduler_config": dict(self.scheduler_config), "steps": self.steps,
                "guidance_scale": self.guidance_scale, "height": self.height, "width": self.width,
                "batches": list(self.batches), "deterministic": self.deterministic, "cfg": self.cfg}


MODELS = {  # what a run's model is, as the report names it (real size, --tiny)
    "sd15": ("SD1.5-size random weights (benchmarks/real_size_sd15.py)",
             "tiny random-weight SD1.x (diffrt.export.tiny)"),
    "sdxl": ("SDXL-size random weights (benchmarks/real_size_sdxl.py)",
             "tiny random-weight SDXL (diffrt.export.tiny.make_tiny_sdxl)"),
    "sd35m": ("SD3.5-medium-size random weights without T5 (benchmarks/real_size_sd3.py)",
              "tiny random-weight SD3 without T5 (diffrt.export.tiny.make_tiny_sd3, sd3-no-t5)"),
}
# Models whose fp32 weights are ~13-14 GB: their runners get RunnerSpec.sdxl_memory_gib.
LARGE_MODELS = ("sdxl", "sd35m")

# W1: distilled (LCM, 4 steps, no CFG); W2: full-step (DPM++ 2M, 20 steps, CFG 7.5), both
# on SD1.5. W3: SDXL, the sdxl-lightning-4step recipe (Euler, trailing spacing, 4 steps,
# no CFG; Euler injects no noise, so the images are compared). W4/W5: SD3.5-medium.
WORKLOADS = {
    "W1-256": Workload("W1-256", "lcm", 4, 1.0, 256, 256, (1, 4), deterministic=False),
    "W1-512": Workload("W1-512", "lcm", 4, 1.0, 512, 512, (1,), deterministic=False),
    "W2-256": Workload("W2-256", "dpmpp_2m", 20, 7.5, 256, 256, (1,), deterministic=True),
    "W3-512": Workload("W3-512", "euler", 4, 0.0, 512, 512, (1,), deterministic=True, model="sdxl",
                       preset="sdxl-lightning-4step", scheduler_config=(("timestep_spacing", "trailing"),)),
    # SD3.5-medium, flow-match Euler (static shift 3): the turbo recipe (4 steps, no CFG) and
    # the full one (28 steps, CFG 4.5, the sd35 preset for an MMDiT-X transformer).
    "W4-512": Workload("W4-512", "flow_match_euler", 4, 0.0, 512, 512, (1,), deterministic=True, model="sd35m",
                       preset="sd35-large-turbo-4step"),
    "W5-512": Workload("W5-512", "flow_match_euler", 28, 4.5, 512, 512, (1,), deterministic=True, model="sd35m",
                       preset="sd35"),
}
DEFAULT_WORKLOADS = tuple(name for name, w in WORKLOADS.items() if w.model == "sd15")
QUICK_WORKLOADS = ("W1-256",)
TINY_SIZE_DIVISOR = 8  # --tiny: 32x32 and 64x64 images on the tiny checkpoint (VAE factor 2)


def tiny_workload(workload: Workload) -> Workload:
    return replace(workload, height=workload.height // TINY_SIZE_DIVISOR, width=workload.width // TINY_SIZE_DIVISOR)


@dataclass(frozen=True)
class Kind:
    """How a family of runners is started: its script, its venv (None: the main venv's
    python, sys.executable) and which model folder it loads."""

    script: str
    venv: str | None
    model: str
    """"artifact" (diffrt's export), "checkpoint" (the diffusers folder) or "peer" (the
    runner's own conversion, made once by `SCRIPT --prepare`)."""


KINDS = {
    "diffrt": Kind("run_diffrt.py", None, "artifact"),
    "diffusers": Kind("run_diffusers.py", None, "checkpoint"),
    # diffusers with the DeepCache package, in its own venv (the main venv's diffusers and
    # transformers pins plus DeepCache; `bash benchmarks/peers/setup.sh ROOT diffusers-deepcache`)
    "diffusers-deepcache": Kind("run_diffusers.py", "diffusers-deepcache", "checkpoint"),
    "optimum-onnx": Kind("run_optimum_onnx.py", "optimum-onnx", "peer"),
    "optimum-intel": Kind("run_optimum_intel.py", "optimum-intel", "peer"),
    # optimum-intel's own hybrid int8 quantization of its export (its own peer model folder)
    "optimum-intel-int8": Kind("run_optimum_intel_int8.py", "optimum-intel", "peer"),
}


@dataclass(frozen=True)
class ArtifactVariant:
    """A diffrt artifact other than the plain export, made once beside it
    (harness/prepare.py prepare_variant): `diffrt ARGS` run on the checkpoint ("export")
    or on a copy of the export ("quantize")."""

    folder: str
    command: tuple[str, ...]
    """diffrt's CLI arguments; CHECKPOINT and OUT are replaced by the folders."""
    copy_export: bool
    """OUT starts as a copy of the plain export (big weight files hard-linked)."""


ARTIFACT_VARIANTS = {
    # int8 denoiser (and text encoders) added to a copy of the export by `diffrt quantize`
    # (static QDQ, the default method; the groups kept in float named rather than measured by
    # --exclude auto, which quantizes the SD1.5-size UNet once per candidate group: ~20 min more)
    "int8": ArtifactVariant("artifact-int8", ("quantize", "OUT", "--exclude",
                                              "conv_in,conv_out,time_embedding,attention_scores"), copy_export=True),
    # optimum-intel's recipe by diffrt: weight-only int8 linear layers, convolutions fully
    # int8 (NNCF), attention's activation MatMuls kept float (OpenVINO fuses attention then);
    # 2 calibration steps per prompt
    "int8-hybrid": ArtifactVariant("artifact-int8-hybrid", ("quantize", "OUT", "--method", "hybrid", "--exclude",
                                                            "conv_in,conv_out,time_embedding,attention_scores",
                                                            "--calibration-steps", "2"), copy_export=True),
    # the deep/shallow UNet graphs DeepCache needs, from `diffrt export --step-cache deepcache`
    "deepcache": ArtifactVariant("artifact-deepcache",
                                 ("export", "CHECKPOINT", "OUT", "--step-cache", "deepcache", "--overwrite"),
                                 copy_export=False),
}


@dataclass(frozen=True)
class RunnerSpec:
    name: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)
    """Given to the runner's load(); for diffrt {"load": Pipeline.load kwargs, "call": pipe kwargs}."""
    description: str = ""
    requires_bf16: bool = False
    """Runs only where the CPU has bf16 instructions (cpu_info().has_bf16)."""
    cache_option: str | None = None
    """Where in `options` the harness puts the runner's engine-cache folder ("load.cache_dir"
    = options["load"]["cache_dir"]); None: the runner has no engine cache, so a start with a
    warm cache is not measured separately."""
    decoder: str = "full"
    """"full": the checkpoint's VAE decoder, like every peer; "tiny": TAESD, a different
    decoder (other FLOPs, another image), so its VAE FLOP/s and image are not compared."""
    denoiser: str = "full"
    """"full": every denoiser call is the whole UNet; "cached": a step cache (DeepCache)
    runs most calls through part of it, so its calls have no FLOP count and no FLOP/s."""
    memory_gib: float = 6.0
    """Peak RSS to expect at SD1.5 size, 256x256 (fp32 weights are 4 GiB); another runner
    process starts only while this much (plus room for the live ones to grow) is free."""
    sdxl_memory_gib: float = 16.0
    """The same at SDXL size, 512x512 (W3-512): fp32 weights are 13.9 GB (UNet 10.3, the
    bigG text encoder 2.8), so on a 24 GiB machine SDXL runners run one at a time.
    diffrt-ort measured 13.8 GiB through its UNet calls at 1024x1024 (17.2 with the
    1024x1024 VAE decode; benchmarks/results/real_size_sdxl.json); the other runners'
    16 is an estimate (weights + activations)."""

    artifact: str | None = None
    """A diffrt runner's artifact: None, the plain export; else a key of ARTIFACT_VARIANTS
    (made once; when diffrt cannot make it, the runner is "not available: <why>")."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"runner {self.name!r}: kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.artifact is not None and (self.kind != "diffrt" or self.artifact not in ARTIFACT_VARIANTS):
            raise ValueError(f"runner {self.name!r}: artifact {self.artifact!r} needs kind diffrt and one of "
                             f"{', '.join(ARTIFACT_VARIANTS)}")

    def memory_gib_for(self, model: str) -> float:
        return self.sdxl_memory_gib if model in LARGE_MODELS else self.memory_gib

    def options_with_cache(self, cache_dir: Path) -> dict[str, Any]:
        options = {k: dict(v) if isinstance(v, dict) else v for k, v in self.options.items()}
        if self.cache_option:
            *parents, key = self.cache_option.split(".")
            target = options
            for parent in parents:
                target = target.setdefault(parent, {})
            target[key] = str(cache_dir)
        return options


def diffrt(name: str, description: str, load: dict[str, Any], call: dict[str, Any] | None = None,
           cache_option: str | None = None, memory_gib: float = 6.0, sdxl_memory_gib: float = 16.0,
           warmup_new_shapes: bool = False, decoder: str = "full", artifact: str | None = None,
           denoiser: str = "full") -> RunnerSpec:
    """A diffrt configuration. `warmup_new_shapes`: the backend compiles per shape, so
    each new shape gets one untimed 1-step call first (reported as setup time).
    `artifact`: a key of ARTIFACT_VARIANTS, for a mode the plain export lacks."""
    options = {"load": load, "call": call or {}, "warmup_new_shapes": warmup_new_shapes}
    return RunnerSpec(name, "diffrt", options, description, cache_option=cache_option, memory_gib=memory_gib,
                      sdxl_memory_gib=sdxl_memory_gib, decoder=decoder, artifact=artifact, denoiser=denoiser)


RUNNERS = {r.name: r for r in (
    # diffrt configurations: one line each.
    # Its engine cache: ORT's optimized graphs (engines/ort/<key>), so it starts twice too.
    diffrt("diffrt-ort", "diffrt, onnxruntime CPU, fp32", {"backend": "ort"}, cache_option="load.cache_dir"),
    # OpenVINO: 10.7 GiB peak measured at SD1.5 size, 256x256, compiling one shape (7.9 from a warm cache).
    # SDXL size: 20.7 GiB at load (compiling), 22.3 after a 1024x1024 VAE decode, measured by
    # benchmarks/real_size_sdxl.py (results/real_size_sdxl.json, AVX2 machine, fp32); the load peak stays at 512x512.
    diffrt("diffrt-openvino", "diffrt, OpenVINO, default precision (bf16 where the CPU has it)",
           {"backend": "openvino"}, cache_option="load.cache_dir", memory_gib=11.0, sdxl_memory_gib=21.0,
           warmup_new_shapes=True),
    diffrt("diffrt-openvino-tiny-vae", "diffrt, OpenVINO, tiny VAE decoder", {"backend": "openvino"},
           {"vae": "tiny"}, cache_option="load.cache_dir", memory_gib=11.0, sdxl_memory_gib=21.0,
           warmup_new_shapes=True, decoder="tiny"),
    # Less work per image, its error in the report's image columns: int8 denoiser
    # (`diffrt quantize`, then Pipeline.load(graph_precision="int8")) and DeepCache (the deep
    # branch's output reused on 2 of every 3 steps; cache= on the request).
    diffrt("diffrt-int8-ort", "diffrt, onnxruntime CPU, int8 denoiser (diffrt quantize)",
           {"backend": "ort", "graph_precision": "int8"}, cache_option="load.cache_dir", artifact="int8"),
    diffrt("diffrt-int8-openvino", "diffrt, OpenVINO, int8 denoiser (diffrt quantize)",
           {"backend": "openvino", "graph_precision": "int8"}, cache_option="load.cache_dir", memory_gib=11.0,
           sdxl_memory_gib=21.0, warmup_new_shapes=True, artifact="int8"),
    # both at once: int8 denoiser and the tiny decoder (where the VAE decode is most of an LCM image)
    diffrt("diffrt-int8-openvino-tiny-vae", "diffrt, OpenVINO, int8 denoiser, tiny VAE decoder",
           {"backend": "openvino", "graph_precision": "int8"}, {"vae": "tiny"}, cache_option="load.cache_dir",
           memory_gib=11.0, sdxl_memory_gib=21.0, warmup_new_shapes=True, decoder="tiny", artifact="int8"),
    diffrt("diffrt-int8-hybrid-openvino", "diffrt, OpenVINO, int8 denoiser (diffrt quantize --method hybrid)",
           {"backend": "openvino", "graph_precision": "int8"}, cache_option="load.cache_dir", memory_gib=11.0,
           sdxl_memory_gib=21.0, warmup_new_shapes=True, artifact="int8-hybrid"),
    diffrt("diffrt-deepcache", "diffrt, onnxruntime CPU, fp32, DeepCache interval 3 (cache=\"deepcache:3\")",
           {"backend": "ort"}, {"cache": "deepcache:3"}, cache_option="load.cache_dir", artifact="deepcache",
           denoiser="cached"),
    diffrt("diffrt-deepcache-openvino", "diffrt, OpenVINO, default precision, DeepCache interval 3",
           {"backend": "openvino"}, {"cache": "deepcache:3"}, cache_option="load.cache_dir", memory_gib=11.0,
           sdxl_memory_gib=21.0, warmup_new_shapes=True, artifact="deepcache", denoiser="cached"),
    # What users would pick instead.
    RunnerSpec("diffusers-fp32", "diffusers", {"dtype": "fp32"}, "diffusers + torch CPU, fp32"),
    RunnerSpec("diffusers-bf16", "diffusers", {"dtype": "bf16"}, "diffusers + torch CPU, bf16", requires_bf16=True),
    # The DeepCache package's own helper (what its README shows for Stable Diffusion).
    RunnerSpec("diffusers-deepcache", "diffusers-deepcache",
               {"dtype": "fp32", "deepcache": {"cache_interval": 3, "cache_branch_id": 0}},
               "diffusers + torch CPU, fp32, DeepCache package (DeepCacheSDHelper, interval 3, branch 0)",
               denoiser="cached"),
    RunnerSpec("optimum-onnx", "optimum-onnx", {}, "optimum-onnx ORTStableDiffusion(XL/3)Pipeline (onnxruntime CPU)"),
    # Measured at SD1.5 size, 256x256, on the AVX2 machine: 8.2-8.7 GiB (12.4 starting from a warm cache).
    # SDXL: estimated as diffrt-openvino's measured compile peak (not measured for optimum-intel).
    RunnerSpec("optimum-intel", "optimum-intel", {}, "optimum-intel OVStableDiffusion(XL/3)Pipeline, dynamic shapes",
               cache_option="cache_dir", memory_gib=9.0, sdxl_memory_gib=21.0),
    RunnerSpec("optimum-intel-static", "optimum-intel", {"static": True},
               "optimum-intel OVStableDiffusion(XL/3)Pipeline, reshaped to static shapes + compile()",
               cache_option="cache_dir", memory_gib=9.0, sdxl_memory_gib=21.0),
    # Its own fast mode: hybrid int8 (NNCF), calibrated on benchmarks/peers/calibration_prompts.txt.
    RunnerSpec("optimum-intel-int8", "optimum-intel-int8", {},
               "optimum-intel, hybrid int8 quantization (OVWeightQuantizationConfig(bits=8, quant_method=\"hybrid\", "
               "num_samples=64)), dynamic shapes", cache_option="cache_dir", memory_gib=9.0, sdxl_memory_gib=21.0),
    RunnerSpec("optimum-intel-int8-static", "optimum-intel-int8", {"static": True},
               "optimum-intel, hybrid int8 quantization, reshaped to static shapes + compile()",
               cache_option="cache_dir", memory_gib=9.0, sdxl_memory_gib=21.0),
)}
