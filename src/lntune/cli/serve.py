"""``lntune serve``: an HTTP server for one base model and every adapter in a folder (see docs/serving.md).

The port is bound before anything is announced (and the bound socket handed to uvicorn, so nothing can take
it in between): a port in use is one line on stderr and exit code 2. The server listens at once and loads
the model in the background (``/ready`` answers 503 until it is loaded); a model that fails to load stops
the server with one line and exit code 2. SIGTERM and Ctrl-C (SIGINT) finish the requests in flight, then
exit as the signal would: 143 (SIGTERM) and 130 (Ctrl-C), as shells report them.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys

from lntune.cli.arguments import non_negative_float, port, positive_float, positive_int
from lntune.cli.common import CLIError, Interrupted, say
from lntune.errors import InputError
from lntune.serve.config import DEFAULT_ADAPTERS, MAX_BATCH_TOKENS, MAX_QUEUE, ServeConfig
from lntune.tasks import SERVED_TASKS

#: The options that are `lntune.serve.config.ServeConfig` fields of the same name.
_SETTINGS = (
    "max_batch_size",
    "max_wait_ms",
    "max_resident",
    "max_length",
    "api_key",
    "max_batch_tokens",
    "max_queue",
    "request_timeout",
    "preload",
    "kv_cache_tokens",
    "continuous_batching",
    "allow_any_adapter_path",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lntune serve``."""
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="local Transformers model folder (default: the one lntune train recorded, else packaged all-MiniLM-L6-v2)",
    )
    parser.add_argument(
        "--adapters",
        metavar="DIR",
        default=DEFAULT_ADAPTERS,
        help="folder of adapter folders, or one adapter folder (default: lntune-output, what lntune train writes)",
    )
    parser.add_argument(
        "--task", choices=SERVED_TASKS, help="default: the adapters' task (lntune_run.json), else the model's"
    )
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    parser.add_argument("--port", type=port, default=8000, metavar="PORT", help="default: 8000 (0: any free port)")
    parser.add_argument(
        "--max-batch-size", type=positive_int, default=32, metavar="N", help="samples per forward (default: 32)"
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        metavar="N",
        help=f"tokens per forward: the inputs' lengths summed (default: {MAX_BATCH_TOKENS}); generation: tokens "
        "packed into one engine step (default: 256 on a CPU, 4096 on a GPU)",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=non_negative_float,
        default=5.0,
        metavar="MS",
        help="how long a request waits for others to batch with (default: 5)",
    )
    parser.add_argument(
        "--max-queue",
        type=positive_int,
        default=MAX_QUEUE,
        metavar="N",
        help=f"inputs waiting at most; beyond, 429 with Retry-After (default: {MAX_QUEUE})",
    )
    parser.add_argument(
        "--request-timeout",
        type=positive_float,
        metavar="S",
        help="seconds a request may take; past it 504, its waiting inputs dropped (default: none)",
    )
    parser.add_argument(
        "--max-resident",
        type=positive_int,
        default=10_000,
        metavar="N",
        help="adapters kept loaded, least recently used unloaded (10000)",
    )
    parser.add_argument(
        "--max-length",
        type=positive_int,
        metavar="N",
        help="most tokens per input; an adapter's inputs are cut at its recorded max_length, at most this "
        "(default: the model's)",
    )
    parser.add_argument(
        "--preload", action="store_true", help="load every adapter of --adapters at start, before /ready"
    )
    parser.add_argument(
        "--kv-cache-tokens",
        type=positive_int,
        metavar="N",
        help="generation: KV cache capacity in tokens (default: 16384 on a CPU; sized from free memory on a GPU)",
    )
    parser.add_argument(
        "--no-continuous-batching",
        dest="continuous_batching",
        action="store_false",
        help="generation in static batches (one generate per batch) instead of continuous batching",
    )
    parser.add_argument(
        "--allow-any-adapter-path",
        action="store_true",
        help="let POST /v1/adapters and /v1/load_lora_adapter load folders outside --adapters (off: refused)",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("LNTUNE_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $LNTUNE_API_KEY; none if unset)",
    )


def _config(args: argparse.Namespace) -> ServeConfig:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        missing = f"lntune serve needs the serve extra ({exc.name} is missing)"
        raise CLIError(f"{missing}: pip install 'lntune[serve]'.") from None
    settings = {name: getattr(args, name) for name in _SETTINGS}
    return ServeConfig.resolve(args.adapters, model=args.model, task=args.task, **settings)


def bind(host: str, port_number: int) -> socket.socket:
    """A listening TCP socket on ``host:port_number``; a port in use or an address that cannot be bound is a
    `CLIError` naming it.

    Example:
        >>> bind("127.0.0.1", 0).getsockname()[1] > 0
        True
    """
    try:
        infos = socket.getaddrinfo(host, port_number, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CLIError(f"--host {host}: cannot resolve it ({exc.strerror}).") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over TIME_WAIT
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CLIError(
                f"--port {port_number}: the port is in use on {host} (another server?); stop it, or pass another "
                "--port (0: any free port)."
            ) from None
        raise CLIError(f"--host {host} --port {port_number}: cannot listen there ({exc.strerror}).") from None
    sock.set_inheritable(True)
    return sock


def _log_to_stderr() -> None:
    """lntune serve's own log lines (adapters left out, loading, preload progress) as plain lines on stderr."""
    log = logging.getLogger("lntune.serve")
    if not any(getattr(h, "_lntune", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._lntune = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def run_serve(args: argparse.Namespace) -> None:
    """``lntune serve``: serve until SIGTERM or Ctrl-C, then finish the requests in flight and exit.

    Example:
        >>> run_serve(build_parser().parse_args(["serve", "--port", "8000"]))
    """
    config = _config(args)
    import uvicorn

    from lntune.serve import ServingService, create_app

    _log_to_stderr()
    sock = bind(args.host, args.port)
    service = ServingService.deferred(config)
    found = len(service.catalog.names())  # discovery: adapters that cannot be served are named here, once
    host, bound_port = sock.getsockname()[:2]
    address = f"[{host}]" if ":" in host else host
    say(
        f"lntune serve: {config.model_id} ({config.task}) with the adapters in {config.adapters_dir} "
        f"({found} found), on http://{address}:{bound_port}; loading the model (GET /ready says when it is ready)"
    )
    server = uvicorn.Server(uvicorn.Config(create_app(service), access_log=False, log_level="info"))

    def failed(exc: BaseException) -> None:
        server.should_exit = True

    service.on_failure = failed
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        raise Interrupted("stopped (Ctrl-C); the requests in flight were answered.") from None
    finally:
        sock.close()
    if service.load_error is not None:
        error = service.load_error
        if isinstance(error, InputError):
            raise error
        raise CLIError(f"--model {config.model_path}: cannot serve it: {error}") from None
