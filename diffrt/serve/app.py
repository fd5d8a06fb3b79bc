"""The HTTP API (FastAPI): OpenAI-compatible images (generations and edits), the full generate endpoint, jobs
with progress for the playground, health, readiness and metrics.

    app = create_app(Pipeline.load(folder), ServeConfig(model_name="sd15"))

`pipeline` is anything with the Pipeline's batching contract: `manifest`,
`request(**call) -> Request` (validated once, at submission), `batch_key(request)` and
`generate(requests, progress)`, and with `config.workers` > 1 `worker()` (another view
on the same weights with its own contexts) and `close()`. One worker thread per view
runs it (see batching.py for the queue order); the event loop only validates, queues,
waits and encodes images in a thread pool.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import io
import logging
import os
import socket
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from diffrt.errors import DiffrtError
from diffrt.serve.batching import BatchScheduler, Job, QueueFull
from diffrt.serve.edits import edit_call, parse_form
from diffrt.serve.jobs import JobRecord, JobStore
from diffrt.serve.metrics import Metrics
from diffrt.serve.schemas import (
    ApiError,
    GenerateRequest,
    ImagesRequest,
    ServeConfig,
    check_api_key,
    check_cost,
    images_to_generate,
    make_call,
    runtime_error,
    validation_error,
)

logger = logging.getLogger(__name__)

PUBLIC_PATHS = ("/healthz", "/readyz", "/")  # "/" is the static playground page; its API calls need the key
REPLICA = f"{socket.gethostname()}:{os.getpid()}"
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "npy": "application/x-npy"}
WARMUP_CALL = {"prompt": "warm-up", "num_inference_steps": 1, "seed": 0, "output_type": "np"}
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection before the answer"
OWNER = "diffrt_key"  # the ASGI scope's state entry: the index of the API key a request used


def warmup_call(manifest: Any) -> dict[str, Any]:
    """The warm-up generation; an inpainting checkpoint (an SD UNet that takes more
    channels than the VAE gives: it runs only with a picture and a mask) inpaints a
    small grey picture instead."""
    from diffrt.families import get_family

    family = get_family(manifest.family)
    facts = family.facts(manifest.model)
    if family.inpainting(facts) != "unet":
        return WARMUP_CALL
    from PIL import Image

    side = 8 * int(facts.size_multiple)
    return {**WARMUP_CALL, "image": Image.new("RGB", (side, side), (128, 128, 128)),
            "mask_image": Image.new("L", (side, side), 255), "height": side, "width": side,
            "strength": 1.0}  # one step: SDXL inpainting's default strength (0.9999) would leave none


def _safety_of(result: Any, index: int) -> dict[str, Any]:
    """Image `index`'s safety-checker result (when the checker ran): its flag, as
    diffusers names it, and its per-concept scores (> 0: the concept was detected)."""
    verdicts = getattr(result, "safety", None)
    if not verdicts:
        return {}
    verdict = verdicts[index]
    return {"nsfw_content_detected": verdict.flagged,
            "safety_scores": {"concepts": list(verdict.concept_scores), "special": list(verdict.special_scores)}}


def encode_images(images: np.ndarray, fmt: str) -> list[str]:
    """float32 NHWC in [0, 1] -> base64 strings: PNG/JPEG/WebP (8-bit, diffusers'
    rounding), or NPY (the float32 array itself, lossless, for exact comparisons)."""
    out = []
    for image in np.asarray(images, dtype=np.float32):
        buffer = io.BytesIO()
        if fmt == "npy":
            np.save(buffer, image, allow_pickle=False)
        else:
            from PIL import Image

            pixels = (image * 255).round().astype(np.uint8)
            options = {"quality": 95} if fmt in ("jpeg", "webp") else {}
            Image.fromarray(pixels).save(buffer, format=fmt.upper(), **options)
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def _settings(settings: Any) -> dict[str, Any]:
    if settings is None:
        return {}
    data = dataclasses.asdict(settings)
    data["scheduler_config"] = dict(data.get("scheduler_config") or ())
    return data


def _timings(timings: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in timings.items() if isinstance(v, (int, float))}
    if isinstance(timings.get("denoiser_calls"), list):
        out["denoiser_calls"] = len(timings["denoiser_calls"])
    return out


class Server:
    """The state one app serves from: the pipeline, its scheduler, metrics and jobs."""

    def __init__(self, pipeline: Any, config: ServeConfig):
        for key in config.keys:
            check_api_key(key, "the server's configuration")
        if isinstance(config.workers, bool) or not isinstance(config.workers, int) or config.workers < 1:
            raise DiffrtError(f"workers must be an integer >= 1, got {config.workers!r}")
        self.pipeline, self.config = pipeline, config
        self.size_multiple = int(pipeline.manifest.model.get("size_multiple", 8))
        # the first worker runs the pipeline itself; each other one a view on the same
        # compiled models with contexts of its own (closed when the server stops)
        self.views = [pipeline.worker() for _ in range(config.workers - 1)]
        self.scheduler = BatchScheduler([view.generate for view in (pipeline, *self.views)], config.max_batch,
                                        config.batch_wait_ms, config.max_queue,
                                        warmup=self._warmup if config.warmup else None,
                                        on_batch=lambda *a: self.metrics.observe_batch(*a))
        self.metrics = Metrics(lambda: self.scheduler.depth, lambda: float(self.is_ready),
                               lambda: len(self.scheduler.running))
        self.jobs = JobStore(config.max_jobs, config.max_job_bytes, config.job_ttl_s)
        self._job_tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
        self.draining = False

    @property
    def is_ready(self) -> bool:
        return self.scheduler.ready.is_set() and self.scheduler.warmup_error is None and not self.draining

    def _warmup(self, generate) -> None:
        t0 = time.perf_counter()
        generate([self.pipeline.request(**warmup_call(self.pipeline.manifest))], None)
        logger.info("warm-up generation in %.2fs", time.perf_counter() - t0)

    def stop(self) -> None:
        """Drain the queue, then close the worker views (the pipeline is the caller's)."""
        self.draining = True
        self.scheduler.stop()
        for view in self.views:
            view.close()

    # -- one generation -----------------------------------------------------------------

    def submit(self, body: GenerateRequest, call: dict[str, Any] | None = None) -> Job:
        """Validate and queue `body` (or `call`, its pipeline call built already: an edit's)."""
        if not self.scheduler.ready.is_set():
            raise ApiError(503, "the model is still loading; retry shortly (see /readyz)", None, "not_ready",
                           {"Retry-After": "5"})
        if self.scheduler.warmup_error is not None:
            raise ApiError(503, f"the model failed its warm-up generation: {self.scheduler.warmup_error}",
                           None, "not_ready")
        call = make_call(body, self.config, self.size_multiple) if call is None else call
        try:
            request = self.pipeline.request(**call)  # validated once, here; the worker runs it as it is
            key = self.pipeline.batch_key(request)
        except DiffrtError as exc:
            raise runtime_error(exc) from None
        # the limits hold for what a preset or the checkpoint's defaults fill in too
        settings = request.settings
        if settings.num_inference_steps > self.config.max_steps:
            raise ApiError(400, f"num_inference_steps must be at most {self.config.max_steps}; "
                                f"{settings.num_inference_steps} (the default) is more: give it",
                           "num_inference_steps")
        for name in ("height", "width"):
            if getattr(settings, name) > self.config.max_side:
                raise ApiError(400, f"{name} must be at most {self.config.max_side}; "
                                    f"{getattr(settings, name)} (the default) is more: give size", "size")
        check_cost(settings.num_inference_steps, settings.height, settings.width, body.n, self.config)
        try:
            return self.scheduler.submit(request, key, body.n)
        except QueueFull as exc:
            raise ApiError(429, str(exc), None, "queue_full", {"Retry-After": str(exc.retry_after_s)}) from None

    async def wait(self, job: Job, request: Request | None) -> Any:
        """The job's PipelineOutput; 504 past the timeout, None if the client left.
        Either way the job is abandoned: out of the queue, or its batch stops between
        denoiser steps once no request in it is wanted."""
        deadline = job.enqueued + self.config.timeout_s
        while not job.future.done():
            remaining = deadline - self.scheduler.clock()
            if remaining <= 0:
                self.scheduler.cancel(job)
                raise ApiError(504, f"the request took longer than the server's timeout of "
                                    f"{self.config.timeout_s:g}s", None, "timeout")
            await asyncio.wait([job.future], timeout=min(remaining, 0.25))
            if not job.future.done() and request is not None and await request.is_disconnected():
                state = job.state
                self.scheduler.cancel(job)
                logger.info("request %d: the client disconnected while it was %s; abandoned", job.id, state)
                return None
        if job.future.cancelled():
            return None
        exc = job.future.exception()
        if isinstance(exc, DiffrtError):
            raise runtime_error(exc)
        if exc is not None:
            raise ApiError(500, f"generation failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                           None, "generation_failed")
        return job.future.result()

    async def respond(self, job: Job, body: GenerateRequest, result: Any) -> dict[str, Any]:
        images = await asyncio.to_thread(encode_images, result.images, body.output_format)
        seed = result.seed
        return {
            "created": int(time.time()), "model": self.config.model_name,
            "images": [{"b64": b64, "seed": None if seed is None else seed + i, "format": body.output_format,
                        "media_type": MEDIA_TYPES[body.output_format], **_safety_of(result, i)}
                       for i, b64 in enumerate(images)],
            "seed": seed, "settings": _settings(result.settings), "timings": _timings(result.timings),
            "batch": {"images": job.batch_size},
        }

    # -- jobs (the playground's progress) -------------------------------------------------

    def start_job(self, body: GenerateRequest, owner: Any) -> dict[str, Any]:
        if not self.jobs.room_for(owner):
            raise ApiError(429, f"{self.config.max_jobs} of your jobs are queued or running; wait for them",
                           None, "too_many_jobs", {"Retry-After": str(self.scheduler.retry_after())})
        job = self.submit(body)
        record = JobRecord(f"job-{job.id}-{os.urandom(8).hex()}", job, body, owner)
        self.jobs.add(record)
        task = asyncio.get_running_loop().create_task(self._finish_job(record))
        self._job_tasks.add(task)
        task.add_done_callback(self._job_tasks.discard)
        return self.job_status(record.id, owner)

    async def _finish_job(self, record: JobRecord) -> None:
        result = error = None
        try:
            output = await self.wait(record.job, None)
            result = await self.respond(record.job, record.body, output) if output else None
        except ApiError as exc:
            error = exc.body()["error"]
        except Exception as exc:  # noqa: BLE001 - reported to the poller
            error = {"message": f"{type(exc).__name__}: {exc}", "type": "server_error"}
        self.jobs.finish(record, result, error)

    def job_status(self, job_id: str, owner: Any) -> dict[str, Any]:
        record = self.jobs.get(job_id, owner)
        if record is None:
            raise ApiError(404, f"no job {job_id!r} of yours (finished jobs are kept {self.config.job_ttl_s:g}s, "
                                "within the server's per-key limits)", "id", "job_not_found")
        job: Job = record.job
        status = "failed" if record.error else "done" if record.result else \
            "cancelled" if job.state == "cancelled" else "running" if job.state in ("running", "done") else job.state
        return {"id": record.id, "status": status, "step": job.step, "total": job.total,
                "result": record.result, "error": record.error}


class Guard:
    """Pure ASGI middleware: API keys (the index of the key used goes to the scope's
    state, for the jobs' owners), body size limit (413) and read timeout (408), per-route
    metrics, and the replica header (x-diffrt-replica: host:pid)."""

    def __init__(self, app, server: Server, routes):
        self.app, self.server, self.routes = app, server, routes
        # compared as bytes: the header arrives as bytes, and a key is ASCII (check_api_key)
        self.keys = [key.encode("ascii") for key in server.config.keys]

    def endpoint_of(self, scope) -> str:
        for route in self.routes():
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route.path
        return "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        endpoint = self.endpoint_of(scope)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-diffrt-replica", REPLICA.encode())]
            await send(message)

        try:
            error = self._refuse(scope)
            if error is None and scope["method"] in ("POST", "PUT", "PATCH"):
                receive, error = await self._read_body(scope, receive)
                if receive is None:
                    status[0] = CLIENT_CLOSED  # the client left while sending the body: not a server error
                    return
            if error is not None:
                response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
                return await response(scope, receive, send_with_header)
            await self.app(scope, receive, send_with_header)
        finally:
            self.server.metrics.observe_request(endpoint, status[0], time.perf_counter() - t0)

    def _refuse(self, scope) -> ApiError | None:
        """None if the request may go on (and its key's index noted), else the 401."""
        if not self.keys or scope["path"] in PUBLIC_PATHS:
            return None
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        token = token.strip()
        matches = [hmac.compare_digest(token, key) for key in self.keys]  # every key: no early exit
        if scheme.lower() != b"bearer" or not any(matches):
            return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                            "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        scope.setdefault("state", {})[OWNER] = matches.index(True)
        return None

    async def _read_body(self, scope, receive):
        """The whole body (bounded), replayed to the app; over the limit: 413, after
        reading on (discarding) up to 16x the limit so the client sees the answer; a
        body that stalls: 408; a client that leaves: (None, None)."""
        config = self.server.config
        limit = config.max_body_bytes
        too_large = ApiError(413, f"the request body is larger than {limit} bytes", "body", "body_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > 16 * limit:
            return receive, too_large
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), config.body_timeout_s)
            except asyncio.TimeoutError:
                return receive, ApiError(408, f"the request body stalled for {config.body_timeout_s:g}s; "
                                              "send it whole", "body", "body_timeout")
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            if not message.get("more_body", False) or size > 16 * limit:
                break
        if size > limit:
            return receive, too_large
        body, sent = b"".join(chunks), [False]

        async def replay():
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None


def create_app(pipeline: Any, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    server = Server(pipeline, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        yield
        await asyncio.to_thread(server.stop)

    app = FastAPI(title="diffrt", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(Guard, server=server, routes=lambda: app.routes)

    def error_response(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, str(exc.detail), None, code))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        logger.exception("unhandled error in %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}", None, "internal_error"))

    @app.post("/v1/images/generations")
    async def images_generations(body: ImagesRequest, request: Request):
        generate = images_to_generate(body, config)
        return await openai_images(server.submit(generate), generate, request)

    @app.post("/v1/images/edits")
    async def images_edits(request: Request):
        form = parse_form(await request.body(), request.headers.get("content-type", ""))
        generate, call = await asyncio.to_thread(edit_call, form, config, server.size_multiple)  # decodes images
        return await openai_images(server.submit(generate, call), generate, request)

    async def openai_images(job: Job, generate: GenerateRequest, request: Request):
        """The OpenAI Images API's answer to a queued generation or edit."""
        result = await server.wait(job, request)
        if result is None:
            return Response(status_code=499)
        encoded = await asyncio.to_thread(encode_images, result.images, generate.output_format)
        s = result.settings
        return {"created": int(time.time()), "data": [{"b64_json": b64, **_safety_of(result, i)}
                                                      for i, b64 in enumerate(encoded)],
                "output_format": generate.output_format, "size": f"{s.width}x{s.height}" if s else None}

    @app.post("/v1/generate")
    async def generate(body: GenerateRequest, request: Request):
        job = server.submit(body)
        result = await server.wait(job, request)
        if result is None:
            return Response(status_code=499)
        return await server.respond(job, body, result)

    def owner(request: Request) -> Any:
        return request.scope.get("state", {}).get(OWNER)

    @app.post("/v1/jobs", status_code=202)
    async def start_job(body: GenerateRequest, request: Request):
        return server.start_job(body, owner(request))

    @app.get("/v1/jobs/{job_id}")
    async def job_status(job_id: str, request: Request):
        return server.job_status(job_id, owner(request))

    @app.get("/v1/models")
    async def models():
        manifest = pipeline.manifest
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": 0, "owned_by": "diffrt",
            "family": manifest.family, "pipeline_class": manifest.pipeline_class, "defaults": manifest.defaults,
            "presets": sorted(getattr(pipeline, "presets", {}) or {}), "size_multiple": server.size_multiple,
            "limits": {"max_n": config.max_n, "max_steps": config.max_steps, "max_side": config.max_side,
                       "max_batch": config.max_batch, "max_cost": config.max_cost,
                       "max_prompt_chars": config.max_prompt_chars}}]}

    @app.get("/v1/loras")
    async def loras():
        loaded = getattr(pipeline, "loras", {}) or {}
        return {"object": "list", "data": [{
            "id": name, "object": "lora", "file": Path(lora.path).name, "sha256": lora.sha256,
            "layout": lora.layout, "components": list(lora.components), "layers": len(lora.layers)}
            for name, lora in sorted(loaded.items())]}

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz():
        return {"status": "alive"}

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz():
        if server.is_ready:
            return {"status": "ready", "model": config.model_name}
        reason = "draining" if server.draining else \
            f"warm-up failed: {server.scheduler.warmup_error}" if server.scheduler.warmup_error else "loading"
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    page = resources.files("diffrt.serve").joinpath("static/playground.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(page)

    return app
