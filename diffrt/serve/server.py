"""Running the app: load the artifact, then serve it with uvicorn (or on Ray Serve, see
ray_app.py). `diffrt serve` calls `serve_http` / `serve_ray`.

Shutdown (SIGTERM or Ctrl-C): uvicorn stops accepting connections, waits for the
requests in flight (queued or running) to be answered, then the app's lifespan drains
the batch worker and the process exits 0.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from diffrt.errors import DiffrtError
from diffrt.serve.schemas import ServeConfig, check_api_key

logger = logging.getLogger(__name__)


def load_pipeline(folder: str | Path, backend: str = "ort", verify: bool | str = True,
                  backend_options: dict[str, Any] | None = None, workers: int = 1,
                  loras: dict[str, Path] | None = None, safety: str | None = None):
    """The pipeline a server runs; `safety`: the safety-checker policy every request gets
    (None: "flag" where the artifact has a checker)."""
    from diffrt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(folder, backend=backend, verify=verify, workers=workers, loras=loras, safety=safety,
                         **(backend_options or {}))
    if pipe.family.takes_image(pipe.manifest.model):
        pipe.close()
        raise DiffrtError(f"{folder} is an SDXL refiner (it continues a base model's latents); serve a base artifact")
    return pipe


def model_name(folder: str | Path) -> str:
    return Path(folder).resolve().name


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol with a request-head timeout. uvicorn closes a keep-alive
    connection that stays idle after a response, but waits forever for the head of a
    request that was never sent or never finished (a half-open connection holds a
    socket and a file descriptor): close a connection that has not sent a complete
    request head `seconds` after it opened or after its previous response."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            timer = getattr(self, "_head_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            timer = getattr(self, "_head_timer", None)
            if timer is not None:
                timer.cancel()
            cycle = self.cycle  # a complete request head starts a new cycle

            def expire() -> None:
                idle = self.cycle is cycle and (cycle is None or cycle.response_complete)
                if idle and not self.transport.is_closing():
                    self.transport.close()

            self._head_timer = self.loop.call_later(seconds, expire)

    return HeaderTimeoutProtocol


def uvicorn_config(app: Any, config: ServeConfig, host: str, port: int, log_level: str = "info", **options: Any):
    """The uvicorn settings every diffrt server uses (the CLI's and the tests')."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                          http=header_timeout_protocol(config.header_timeout_s),
                          timeout_keep_alive=config.keep_alive_s, **options)


def serve_http(pipeline: Any, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT, then finish what is in flight."""
    import uvicorn

    from diffrt.serve.app import create_app

    app = create_app(pipeline, config)
    settings = uvicorn_config(app, config, host, port, log_level, timeout_graceful_shutdown=config.timeout_s + 30)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured SIGTERM once drained (the process would die of
            # it); a drained shutdown exits 0 instead
            getattr(self, "_captured_signals", []).clear()

    DrainingServer(settings).run()
    print("diffrt serve: shut down; every request in flight was answered", file=sys.stderr)


def check_port_free(host: str, port: int) -> None:
    """One line if `host:port` cannot be listened on (in use, or a host this machine does
    not have), instead of printing the URL and then uvicorn's error."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise DiffrtError(f"--host {host}: {exc.strerror or exc}; use an address of this machine, e.g. 127.0.0.1")
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise DiffrtError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port "
                              "or stop what uses it") from None


def _require_serve_extra(ray: bool) -> None:
    import importlib.util

    names = ("fastapi", "uvicorn", "prometheus_client") + (("ray",) if ray else ())
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        extra = "'ray[serve]'" if ray and missing == ["ray"] else "-e '.[serve]'"
        raise DiffrtError(f"diffrt serve needs {', '.join(missing)}: pip install {extra}")


def api_keys(given: list[str] | None, key_file: str | None) -> tuple[str, ...]:
    """Every key `diffrt serve` accepts: --api-key (repeatable; visible in `ps`), the
    lines of --api-key-file (blank lines and # comments skipped) and $DIFFRT_API_KEY."""
    import os

    keys = [(key, "--api-key") for key in given or ()]
    if key_file:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DiffrtError(f"--api-key-file {key_file}: cannot read it ({exc})") from None
        from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise DiffrtError(f"--api-key-file {key_file} holds no key (one key per line; # starts a comment)")
        keys += [(key, f"--api-key-file {key_file}") for key in from_file]
    if os.environ.get("DIFFRT_API_KEY"):
        keys.append((os.environ["DIFFRT_API_KEY"], "$DIFFRT_API_KEY"))
    return tuple(dict.fromkeys(check_api_key(key, source) for key, source in keys))


def lora_files(given: list[str] | None, folder: str | None) -> dict[str, Path]:
    """--lora NAME=FILE (repeatable) and the *.safetensors of --lora-dir DIR (named
    after the file) -> {name: file}; a name given twice is a one-line error."""
    loras: dict[str, Path] = {}
    pairs = []
    if folder is not None:
        if not Path(folder).is_dir():
            raise DiffrtError(f"--lora-dir {folder}: not a folder; give a folder of .safetensors LoRA files")
        pairs += [(path.stem, path) for path in sorted(Path(folder).glob("*.safetensors"))]
        if not pairs:
            raise DiffrtError(f"--lora-dir {folder} holds no .safetensors file")
    for item in given or ():
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise DiffrtError(f"--lora {item!r}: use NAME=FILE, e.g. --lora style=style.safetensors")
        pairs.append((name, Path(file)))
    for name, path in pairs:
        if name in loras:
            raise DiffrtError(f"LoRA name {name!r} is given twice ({loras[name]} and {path}); rename one")
        loras[name] = path
    return loras


def serve_from_args(args: Any, backend_options: dict[str, Any]) -> None:
    """`diffrt serve`: check the options, load the artifact (errors are one line),
    then serve until SIGTERM (uvicorn) or Ctrl-C (Ray)."""
    _require_serve_extra(args.ray)
    if not 1 <= args.port <= 65535:
        raise DiffrtError(f"--port must be from 1 to 65535, got {args.port}")
    for name in ("workers", "max_batch", "max_queue", "max_n", "max_steps", "max_size", "max_prompt_chars"):
        if getattr(args, name) < 1:
            raise DiffrtError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.batch_wait_ms >= 0:
        raise DiffrtError(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")
    for name in ("timeout_s", "max_cost"):
        if not 0 < getattr(args, name) < float("inf"):
            raise DiffrtError(f"--{name.replace('_', '-')} must be a number > 0, got {getattr(args, name)}")
    ray_only = [n for n in ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests",
                            "autoscaling_config", "ray_address") if getattr(args, n) is not None]
    if ray_only and not args.ray:
        raise DiffrtError(f"--{ray_only[0].replace('_', '-')} is a Ray option; add --ray")
    loras = lora_files(getattr(args, "lora", None), getattr(args, "lora_dir", None))
    if loras and args.ray:
        raise DiffrtError("--lora/--lora-dir are not supported with --ray yet; serve them without --ray")
    folder = Path(args.out)
    keys = api_keys(args.api_key, args.api_key_file)
    config = ServeConfig(model_name=args.model_name or model_name(folder), workers=args.workers,
                         max_batch=args.max_batch,
                         batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue, timeout_s=args.timeout_s,
                         api_keys=keys, max_n=args.max_n, max_steps=args.max_steps, max_side=args.max_size,
                         max_cost=args.max_cost, max_prompt_chars=args.max_prompt_chars, warmup=args.warmup)
    verify = {"stamp": True, "size": False}.get(args.verify, args.verify)
    if args.ray:
        from diffrt.serve import ray_app

        from diffrt.artifacts import read_manifest

        read_manifest(folder)  # a bad folder fails here, in one line, not in every replica
        autoscaling = ray_app.autoscaling_config(args.min_replicas, args.max_replicas, args.target_ongoing_requests,
                                                 args.autoscaling_config)
        print(f"diffrt serve: Ray Serve at http://{args.host}:{args.port}/ ({args.replicas or 'autoscaled'} "
              f"replica(s) of {config.model_name}); Ctrl-C stops", file=sys.stderr)
        ray_app.start(str(folder), config, host=args.host, port=args.port, address=args.ray_address, blocking=True,
                      backend=args.backend, verify=verify, backend_options=backend_options,
                      num_replicas=args.replicas, autoscaling=autoscaling, safety=getattr(args, "safety", None))
        return
    check_port_free(args.host, args.port)  # before the minutes a real-size load takes
    pipe = load_pipeline(folder, backend=args.backend, verify=verify, backend_options=backend_options,
                         workers=args.workers, loras=loras, safety=getattr(args, "safety", None))
    check_port_free(args.host, args.port)  # and again: taken while loading
    workers = f" ({args.workers} workers)" if args.workers > 1 else ""
    print(f"diffrt serve: {config.model_name}{workers} on http://{args.host}:{args.port}/ (playground at /, "
          f"OpenAI API at /v1){f'; API key required ({len(keys)} keys)' if keys else ''}", file=sys.stderr)
    serve_http(pipe, config, host=args.host, port=args.port, log_level="debug" if args.verbose else "warning")
