"""``lntune serve``: an HTTP server for one base model and every adapter in a folder (see docs/serving.md)."""

from __future__ import annotations

import argparse
import os

from lntune.cli.arguments import non_negative_float, port, positive_int
from lntune.cli.common import CLIError, say
from lntune.errors import InputError
from lntune.serve.config import DEFAULT_ADAPTERS, ServeConfig
from lntune.tasks import SERVED_TASKS

#: The options that are `lntune.serve.config.ServeConfig` fields of the same name.
_SETTINGS = ("max_batch_size", "max_wait_ms", "max_resident", "max_length", "api_key", "max_batch_tokens",
             "kv_cache_tokens", "continuous_batching")  # fmt: skip


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
    parser.add_argument("--port", type=port, default=8000, metavar="PORT", help="default: 8000")
    parser.add_argument(
        "--max-batch-size", type=positive_int, default=32, metavar="N", help="samples per forward (default: 32)"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=non_negative_float,
        default=5.0,
        metavar="MS",
        help="how long a request waits for others to batch with (default: 5)",
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
        help="most tokens per input; longer ones are refused (default: the model's)",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=positive_int,
        metavar="N",
        help="generation: most tokens packed into one engine step (default: 256 on a CPU, 4096 on a GPU)",
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
        "--api-key",
        metavar="KEY",
        default=os.environ.get("LNTUNE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/ (default: $LNTUNE_API_KEY; none if unset)",
    )


def build_service(args: argparse.Namespace):
    """The `ServingService` the options describe (its base model loaded); bad options raise `CLIError`.

    Example:
        >>> service = build_service(build_parser().parse_args(["serve", "--adapters", "adapters"]))
    """
    try:
        from lntune.serve import ServingService
    except ImportError as exc:
        missing = f"lntune serve needs the serve extra ({exc.name} is missing)"
        raise CLIError(f"{missing}: pip install 'lntune[serve]'.") from None
    settings = {name: getattr(args, name) for name in _SETTINGS}
    config = ServeConfig.resolve(args.adapters, model=args.model, task=args.task, **settings)
    try:
        return ServingService.from_config(config)
    except InputError:
        raise
    except (OSError, ValueError) as exc:
        raise CLIError(f"--model {config.model_path}: cannot serve it: {exc}") from None


def run_serve(args: argparse.Namespace) -> None:
    """``lntune serve``: serve until SIGTERM or Ctrl-C, then finish the requests in flight and exit.

    Example:
        >>> run_serve(build_parser().parse_args(["serve", "--port", "8000"]))
    """
    service = build_service(args)
    import uvicorn

    from lntune.serve import create_app

    config = service.config
    say(
        f"lntune serve: {config.model_id} ({config.task}) with the adapters in {config.adapters_dir} "
        f"({len(service.catalog.names())} found), on http://{args.host}:{args.port}"
    )
    server = uvicorn.Config(create_app(service), host=args.host, port=args.port, access_log=False, log_level="info")
    uvicorn.Server(server).run()
