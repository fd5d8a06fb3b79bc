"""Summaries and the three outputs of benchmarks/compare.py: JSON (everything, raw runs
included), a markdown table, and a PNG chart (when matplotlib is installed)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from harness.specs import WORKLOADS, Workload


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def _gflops(flops: int | None, seconds: float | None) -> float | None:
    if not flops or not seconds:
        return None
    return round(flops / seconds / 1e9, 1)


def _pct(gflops: float | None, peak: Any) -> float | None:
    if gflops is None or not isinstance(peak, (int, float)) or peak <= 0:
        return None
    return round(100 * gflops / peak, 1)


def summarize_cell(cell: dict[str, Any], workload: Workload, flops: dict[str, Any], gemm: dict[str, Any],
                   runs_planned: int, decoder: str = "full", denoiser: str = "full") -> dict[str, Any]:
    """Medians over the runs (the denoiser: over every step of every run), throughput and
    achieved FLOP/s against the machine's GEMM peaks. The VAE's FLOP counts are the
    checkpoint's decoder's: a runner with another `decoder` gets no VAE FLOP/s; one whose
    `denoiser` is "cached" (most calls run part of the UNet) gets no denoiser FLOP/s."""
    runs = cell["runs"]
    batch = cell["batch"]
    e2e = _median([r["seconds"] for r in runs])
    step = _median([s for r in runs for s in r["denoiser_step_seconds"]])
    vae = _median([r["vae_decoder_seconds"] for r in runs])
    key = f"-{workload.width}x{workload.height}"
    unet_flops = flops.get("unet", {}).get(f"b{workload.denoiser_batch(batch)}{key}") if denoiser == "full" else None
    vae_flops = flops.get("vae_decoder", {}).get(f"b{batch}{key}") if decoder == "full" else None
    fp32_peak = max((v for v in (gemm.get("numpy_fp32_gflops"), gemm.get("torch_fp32_gflops"))
                     if isinstance(v, (int, float))), default=None)
    bf16_peak = gemm.get("torch_bf16_gflops")
    denoiser_gflops, vae_gflops = _gflops(unet_flops, step), _gflops(vae_flops, vae)
    return {
        "runs_done": len(runs),
        "runs_planned": runs_planned,
        "skipped": sorted({s["reason"] for s in cell["skipped"]}),
        "errors": sorted({f"{e['kind']}: {e['error']}" for e in cell["errors"]}),
        "e2e_median_seconds": e2e,
        "e2e_min_seconds": min((r["seconds"] for r in runs), default=None),
        "e2e_max_seconds": max((r["seconds"] for r in runs), default=None),
        # from the unrounded median: e2e is rounded to 0.1 ms, 0.3% of a tiny model's 35 ms call
        "images_per_second": round(batch / statistics.median(r["seconds"] for r in runs), 4) if e2e else None,
        "text_encoder_median_seconds": _median([r["text_encoder_seconds"] for r in runs]),
        "denoiser_step_median_seconds": step,
        "denoiser_calls_per_image_run": len(runs[0]["denoiser_step_seconds"]) if runs else None,
        "vae_decoder_median_seconds": vae,
        "denoiser_call_flops": unet_flops,
        "vae_decoder_flops": vae_flops,
        "denoiser_gflops_per_second": denoiser_gflops,
        "denoiser_pct_of_fp32_gemm": _pct(denoiser_gflops, fp32_peak),
        "denoiser_pct_of_bf16_gemm": _pct(denoiser_gflops, bf16_peak),
        "vae_gflops_per_second": vae_gflops,
        "vae_pct_of_fp32_gemm": _pct(vae_gflops, fp32_peak),
        "vae_pct_of_bf16_gemm": _pct(vae_gflops, bf16_peak),
        "others_cpu_share_max": max((r["others_cpu_share"] for r in runs), default=None),
        "peak_rss_gib": max((r["peak_rss_gib"] for r in runs), default=None),
    }


def image_error(image: Any, reference: Any) -> dict[str, Any]:
    """How far `image` is from `reference` (arrays on the [0, 1] scale, same shape): max
    abs difference and PSNR in dB (10 log10(1 / MSE), peak 1; "identical" when the MSE
    is 0), or {"shape": "..."} when the shapes differ."""
    import numpy as np

    image, reference = np.asarray(image, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if image.shape != reference.shape:
        return {"shape": f"shape {image.shape} vs {reference.shape}"}
    mse = float(np.mean((image - reference) ** 2))
    psnr: float | str = "identical" if mse == 0.0 else round(10.0 * math.log10(1.0 / mse), 2)
    return {"max_abs_diff": float(np.abs(image - reference).max()), "psnr_db": psnr}


def comparable(workload: str, same_noise: bool) -> bool:
    """Whether the runners' images of a workload can be compared: a scheduler that injects
    no noise always; LCM's (which draws fresh noise at each step) only when every runner
    drew diffrt's per-image noise (`same_noise`: runs from before that drew from each
    runner's own RNG, so their W1 images differ by design)."""
    return workload in WORKLOADS and (WORKLOADS[workload].deterministic or same_noise)


def image_agreement(runners: dict[str, dict[str, Any]], reference_order: tuple[str, ...],
                    same_noise: bool = False) -> dict[str, Any]:
    """Each runner's first image against the reference runner's (the first of
    `reference_order` present: the fp32 diffusers/torch runner, else diffrt-ort fp32) on
    the same prompt, latents and noise: max abs difference and PSNR per runner, so every
    speed has its cost beside it. Runners with another decoder (TAESD) are left out: a
    different image by design."""
    import numpy as np

    out: dict[str, Any] = {}
    for cell_key in sorted({k for r in runners.values() for k in r.get("cells", {})}):
        if not comparable(cell_key.split("/")[0], same_noise):
            continue
        images = {name: r["cells"][cell_key].get("image") for name, r in runners.items()
                  if r.get("cells", {}).get(cell_key, {}).get("runs") and r.get("decoder", "full") == "full"}
        images = {n: p for n, p in images.items() if p and Path(p).is_file()}
        reference = next((n for n in reference_order if n in images), None)
        if reference is None:
            continue
        ref = np.load(images[reference])
        diffs, psnr = {}, {}
        for name, path in images.items():
            error = image_error(np.load(path), ref)
            diffs[name] = error.get("max_abs_diff", error.get("shape"))
            psnr[name] = error.get("psnr_db", error.get("shape"))
        out[cell_key] = {"reference": reference, "max_abs_diff": diffs, "psnr_db": psnr}
    return out


# --- markdown -------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _flops_cell(gflops: Any, pct: Any, pct_bf16: Any) -> str:
    if gflops is None:
        return "–"
    text = f"{gflops:.0f} ({pct:.0f}%" if pct is not None else f"{gflops:.0f} ("
    if pct_bf16 is not None:
        text += f", bf16 {pct_bf16:.0f}%"
    return text + ")"


def workload_title(workload: dict[str, Any]) -> str:
    """"W3-512: sdxl-lightning-4step preset (euler, timestep_spacing=trailing, 4 steps, no
    CFG, 512x512)" from a report's workload entry (reports from before presets have none)."""
    overrides = "".join(f", {k}={v}" for k, v in (workload.get("scheduler_config") or {}).items())
    text = f"{workload['scheduler']}{overrides}, {workload['steps']} steps, " \
           f"{'CFG ' + format(workload['guidance_scale'], 'g') if workload['cfg'] else 'no CFG'}, " \
           f"{workload['width']}x{workload['height']}"
    return f"{workload['name']}: " + (f"{workload['preset']} preset ({text})" if workload.get("preset") else text)


def markdown(report: dict[str, Any]) -> str:
    machine, gemm = report["machine"], report["gemm"]
    gemm_others = ", ".join(f"{100 * m.get('others_cpu_share', 0):.0f}%" for m in gemm.get("measurements", []))
    lines = [f"# diffrt vs peers, side by side ({report['mode']})", ""]
    if report.get("partial"):  # compare.py writes one after each group of runners
        lines += [f"**Partial result** ({report['partial']}): runners marked \"not run yet\" have no numbers.", ""]
    again = (f" (summarized again on {report['reported_again']} from the same runs: "
             f"`python benchmarks/compare.py --report-from compare-{report['mode']}.json`)"
             if report.get("reported_again") else "")
    lines += [f"- Date (UTC): {report['date_utc']}; command: `{report['command']}`{again}",
              f"- Machine: {machine['cpu']['describe']}; {machine['memory_gib']} GiB RAM; load average at start "
              f"{machine['loadavg_at_start']}",
              f"- Dense GEMM (n={gemm.get('n')}, best of the measurements before and after the runners; others' CPU "
              f"during them {gemm_others}): "
              f"numpy fp32 {_fmt(gemm.get('numpy_fp32_gflops'), 1)}, torch fp32 {_fmt(gemm.get('torch_fp32_gflops'), 1)}, "
              f"torch bf16 {_fmt(gemm.get('torch_bf16_gflops'), 1)} GFLOP/s",
              f"- Model: {report['model']['description']}; prompt {report['settings']['prompt']!r}, seed "
              f"{report['settings']['seed']}, the same initial latents for every runner",
              f"- Wall time: {report['wall_seconds']['total']:.0f} s in all ({report['wall_seconds']['prepare']:.0f} s "
              f"preparation, {report['wall_seconds']['measure']:.0f} s measuring); budget "
              f"{report['settings']['budget_minutes']:g} min, cell budget {report['settings']['cell_budget_seconds']:g} s, "
              f"{report['settings']['runs']} runs per cell after the warm-up",
              f"- Round-robin groups (alive at once, alternating run by run): {report['groups']}", ""]
    lines += ["| runner | what | status |", "|---|---|---|"]
    for name, r in report["runners"].items():
        status = f"partial: the worker died at {r['died']}" if r["status"] == "ok" and r.get("died") else r["status"]
        what = r["description"].replace("|", "\\|")  # a "|" would end the table cell
        lines.append(f"| {name} | {what} | {status} |")
    for workload in report["workloads"]:
        w = WORKLOADS.get(workload["name"])
        lines += ["", f"## {workload_title(workload)}", "",
                  "| runner | batch | runs | e2e median s | images/s | image PSNR dB | image max abs | text enc s | "
                  "denoiser s/call | VAE s | denoiser GFLOP/s (% of peak) | VAE GFLOP/s (% of peak) | "
                  "others' CPU max |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in report["runners"].items():
            if r["status"] != "ok":
                lines.append(f"| {name} | | | {r['status']} | | | | | | | | | |")
                continue
            for batch in workload["batches"]:
                key = f"{workload['name']}/b{batch}"
                s = r.get("summary", {}).get(key)
                if s is None:
                    if r.get("died"):
                        lines.append(f"| {name} | {batch} | 0 | not run: the worker died at {r['died']} "
                                     "| | | | | | | | | |")
                    continue
                agreement = report["image_agreement"].get(key, {})
                diff = agreement.get("max_abs_diff", {}).get(name)
                psnr = "reference" if agreement.get("reference") == name else agreement.get("psnr_db", {}).get(name)
                runs = f"{s['runs_done']}/{s['runs_planned']}"
                if s["errors"]:
                    lines.append(f"| {name} | {batch} | {runs} | {'; '.join(s['errors'])} | | | | | | | | | |")
                    continue
                denoiser = _flops_cell(s["denoiser_gflops_per_second"], s["denoiser_pct_of_fp32_gemm"],
                                       s["denoiser_pct_of_bf16_gemm"])
                vae = _flops_cell(s["vae_gflops_per_second"], s["vae_pct_of_fp32_gemm"], s["vae_pct_of_bf16_gemm"])
                if r.get("decoder", "full") != "full":  # another decoder: not the counted FLOPs, not the same image
                    vae = diff = psnr = f"n/a: {r['decoder']} decoder"
                if r.get("denoiser", "full") != "full":  # a step cache: most calls run part of the UNet
                    denoiser = "n/a: step cache"
                others = None if s["others_cpu_share_max"] is None else 100 * s["others_cpu_share_max"]
                lines.append(
                    f"| {name} | {batch} | {runs} | {_fmt(s['e2e_median_seconds'])} | {_fmt(s['images_per_second'], 3)} | "
                    f"{_fmt(psnr, 1)} | {_fmt(diff, 6) if isinstance(diff, float) else _fmt(diff)} | "
                    f"{_fmt(s['text_encoder_median_seconds'], 3)} | {_fmt(s['denoiser_step_median_seconds'], 3)} | "
                    f"{_fmt(s['vae_decoder_median_seconds'])} | {denoiser} | {vae} | {_fmt(others, 0)}% |")
        same_noise = bool(report["settings"].get("same_noise"))
        if w is not None and (w.deterministic or same_noise):
            agreement = {k: v for k, v in report["image_agreement"].items() if k.startswith(workload["name"] + "/")}
            refs = sorted({v["reference"] for v in agreement.values()})
            noise = "" if w.deterministic else " LCM's step noise: diffrt's per-image draws for every runner."
            lines.append(f"\nImage error: each runner's image against {', '.join(refs) or '–'}'s (the fp32 "
                         f"reference) on the same prompt and latents, [0, 1] scale; PSNR = 10 log10(1/MSE).{noise}")
        elif w is not None:
            lines.append("\nImages are not compared: LCM draws fresh noise at each step from each runner's own RNG.")
    lines += ["", "## Cold start and memory", "",
              "| runner | cold start, empty engine cache s | with warm cache s | spawn+imports+load s | "
              "first image s | peak RSS GiB |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in report["runners"].items():
        if r["status"] != "ok":
            continue
        cold = r["cold_start"].get("empty_cache") or {}
        warm = r["cold_start"].get("warm_cache")
        warm_text = _fmt(warm["total_seconds"], 1) if isinstance(warm, dict) else (warm or "–")
        lines.append(f"| {name} | {_fmt(cold.get('total_seconds'), 1)} | {warm_text} | "
                     f"{_fmt(cold.get('spawn_to_ready_seconds'), 1)} | {_fmt(cold.get('first_image_seconds'), 1)} | "
                     f"{_fmt(r.get('peak_rss_gib'))} |")
    notes = [f"- {name} {key}: skipped runs: {', '.join(s['skipped'])}"
             for name, r in report["runners"].items() for key, s in r.get("summary", {}).items() if s["skipped"]]
    lines += ["", "## Notes", "",
              "- e2e: one pipeline call, from prompt to decoded array (no PNG encoding); denoiser s/call: median "
              "over every denoiser call of every run; FLOP/s: benchmarks/flops.py's counts (attention included) "
              "over those medians; % of the dense GEMM peak measured above. A step-cached runner's calls are "
              "mostly partial UNets (its median is theirs): no FLOP/s; compare its e2e.",
              "- image PSNR / max abs: against the fp32 reference runner's image (same prompt, latents and, for "
              "LCM, step noise); an exact fp32 runner is at ~1e-6 max abs.",
              "- others' CPU: share of the machine's CPU that processes other than the runner used during its "
              "runs (the machine may be shared); trust a row only when it is near 0.",
              "- Cold start: process start + imports + load + first image (the warm-up); the OS page cache is not "
              "dropped, so 'empty engine cache' means no compiled engines, not a cold disk.",
              *notes]
    return "\n".join(lines) + "\n"


# --- chart ----------------------------------------------------------------------------


def chart(report: dict[str, Any], path: Path) -> bool:
    """Stacked bars of batch-1 latency by stage, one panel per workload. False when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    workloads = report["workloads"]
    names = list(report["runners"])
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 0.5 * len(names) + 2), squeeze=False)
    colors = {"text encoder": "#8da0cb", "denoiser": "#fc8d62", "VAE decode": "#66c2a5", "other": "#cccccc"}
    for ax, workload in zip(axes[0], workloads, strict=True):
        key = f"{workload['name']}/b1"
        for y, name in enumerate(names):
            r = report["runners"][name]
            s = r.get("summary", {}).get(key)
            if r["status"] != "ok" or not s or s["e2e_median_seconds"] is None:
                ax.text(0, y, "  " + (r["status"] if r["status"] != "ok" else "no runs")[:60], va="center", fontsize=7)
                continue
            steps = s["denoiser_step_median_seconds"] * (s["denoiser_calls_per_image_run"] or 0)
            parts = {"text encoder": s["text_encoder_median_seconds"], "denoiser": steps,
                     "VAE decode": s["vae_decoder_median_seconds"]}
            parts["other"] = max(0.0, s["e2e_median_seconds"] - sum(parts.values()))
            left = 0.0
            for label, value in parts.items():
                ax.barh(y, value, left=left, color=colors[label], label=label if y == 0 else None)
                left += value
            ax.text(left, y, f" {s['e2e_median_seconds']:.2f} s", va="center", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_ylim(len(names) - 0.4, -0.6)  # first runner on top, room for the last row's text
        ax.set_xlabel("seconds (median, batch 1)")
        ax.set_title(f"{workload['name']} ({workload['width']}x{workload['height']}, {workload['steps']} steps)")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"diffrt vs peers ({report['mode']}): {report['machine']['cpu']['describe']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
