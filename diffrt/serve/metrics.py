"""Prometheus metrics of one server (its own registry, so several apps can live in one
process, as in the tests). Exposed at GET /metrics in the text format.

    diffrt_requests_total{endpoint,status}       requests answered, by route and HTTP status
                                                 (499: the client left before the answer)
    diffrt_request_seconds{endpoint}             end-to-end latency (histogram)
    diffrt_queue_depth                           requests waiting for a batch
    diffrt_running_requests                      requests in the batch being generated
    diffrt_batch_images                          images per pipeline batch (histogram)
    diffrt_batch_requests                        requests per pipeline batch (histogram)
    diffrt_stage_seconds{stage}                  per-stage time of each batch: text_encoder,
                                                 denoiser, vae_decoder, total (histogram)
    diffrt_batch_failures_total                  pipeline runs that raised (a failed batch of
                                                 several requests is re-run one request at a
                                                 time; each run counts)
    diffrt_batches_cancelled_total               batches stopped between steps: every request
                                                 in them was abandoned (timed out, client gone)
    diffrt_images_generated_total                images returned by the pipeline
    diffrt_images_flagged_total                  of those, images the safety checker flagged
    diffrt_ready                                 1 once the pipeline is loaded and warmed up
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from diffrt.serve.batching import Cancelled

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, float("inf"))
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, float("inf"))
STAGES = ("text_encoder", "denoiser", "vae_decoder", "total")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], float], ready: Callable[[], float],
                 running: Callable[[], float] = lambda: 0.0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("diffrt_requests", "HTTP requests answered", ("endpoint", "status"), registry=r)
        self.latency = Histogram("diffrt_request_seconds", "End-to-end request latency", ("endpoint",),
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("diffrt_queue_depth", "Requests waiting for a batch", registry=r)
        self.queue_depth.set_function(queue_depth)
        self.running = Gauge("diffrt_running_requests", "Requests in the batch being generated", registry=r)
        self.running.set_function(running)
        self.ready = Gauge("diffrt_ready", "1 once the pipeline is loaded and warmed up", registry=r)
        self.ready.set_function(ready)
        self.batch_images = Histogram("diffrt_batch_images", "Images per pipeline batch", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.batch_requests = Histogram("diffrt_batch_requests", "Requests per pipeline batch",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.stage = Histogram("diffrt_stage_seconds", "Per-stage seconds of each batch", ("stage",),
                               buckets=LATENCY_BUCKETS, registry=r)
        self.failures = Counter("diffrt_batch_failures", "Pipeline runs that raised", registry=r)
        self.cancelled = Counter("diffrt_batches_cancelled", "Batches stopped: all their requests abandoned",
                                 registry=r)
        self.images = Counter("diffrt_images_generated", "Images generated", registry=r)
        self.flagged = Counter("diffrt_images_flagged", "Images the safety checker flagged", registry=r)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, jobs: list, seconds: float, outcome: Any) -> None:
        self.batch_requests.observe(len(jobs))
        self.batch_images.observe(sum(job.images for job in jobs))
        if isinstance(outcome, Cancelled):
            self.cancelled.inc()
            return
        if isinstance(outcome, BaseException):
            self.failures.inc()
            return
        timings = outcome[0].timings if outcome else {}
        for stage in STAGES:
            value = timings.get(stage)
            if isinstance(value, (int, float)):
                self.stage.labels(stage).observe(float(value))
        self.images.inc(sum(job.images for job in jobs))
        self.flagged.inc(sum(sum(getattr(o, "nsfw_content_detected", None) or ()) for o in outcome))

    def render(self) -> bytes:
        return generate_latest(self.registry)
