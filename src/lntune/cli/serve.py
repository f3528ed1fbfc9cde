"""``lntune serve``: an HTTP server for one base model and every adapter in a folder (see docs/serving.md)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lntune.cli.common import CLIError, default_model_path, load_tokenizer, say
from lntune.serve.config import TASK_TYPES, ServeConfig, default_max_length

#: The base model's name in the API when no --model is given.
DEFAULT_MODEL_ID = "all-MiniLM-L6-v2"
#: What lntune train writes by default, and so what lntune serve serves by default.
DEFAULT_ADAPTERS = "lntune-output"


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
        "--task", choices=sorted(TASK_TYPES), help="default: the adapters' task (lntune_run.json), else the model's"
    )
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, metavar="PORT", help="default: 8000")
    parser.add_argument("--max-batch-size", type=int, default=32, metavar="N", help="samples per forward (default: 32)")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        metavar="MS",
        help="how long a request waits for others to batch with (default: 5)",
    )
    parser.add_argument(
        "--max-resident",
        type=int,
        default=10_000,
        metavar="N",
        help="adapters kept loaded, least recently used unloaded (10000)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help="most tokens per input; longer ones are refused (default: the model's)",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("LNTUNE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/ (default: $LNTUNE_API_KEY; none if unset)",
    )


def build_service(args: argparse.Namespace):
    """Check the options, load the base model and return the `ServingService` they describe.

    Example:
        >>> service = build_service(build_parser().parse_args(["serve", "--adapters", "adapters"]))
    """
    try:
        from lntune.serve import ServingService
        from lntune.serve.catalog import infer_task, recorded_base_model
    except ImportError as exc:
        missing = f"lntune serve needs the serve extra ({exc.name} is missing)"
        raise CLIError(f"{missing}: pip install 'lntune[serve]'.") from None
    for name in ("max_batch_size", "max_resident", "max_length", "port"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "port" else 1):
            raise CLIError(f"--{name.replace('_', '-')} must be positive, got {value}.")
    if args.max_wait_ms < 0:
        raise CLIError(f"--max-wait-ms must not be negative, got {args.max_wait_ms}.")
    adapters = Path(args.adapters)
    if not adapters.is_dir():
        hint = " (lntune train writes it; run it first)" if args.adapters == DEFAULT_ADAPTERS else ""
        raise CLIError(f"--adapters {adapters}: no such folder{hint}; pass --adapters DIR, a folder of adapters.")
    model_path = args.model or recorded_base_model(adapters) or default_model_path()
    try:
        packaged = default_model_path()
    except CLIError:  # the demo extra (with the packaged model) is not installed
        packaged = None
    tokenizer = load_tokenizer(model_path)
    try:
        task = args.task or infer_task(adapters, model_path)
        config = ServeConfig(
            model_path=model_path,
            model_id=DEFAULT_MODEL_ID if model_path == packaged else Path(model_path).name,
            adapters_dir=adapters,
            task=task,
            max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            max_resident=args.max_resident,
            max_length=args.max_length or default_max_length(model_path),
            api_key=args.api_key or None,
        )
        return ServingService.from_config(config, tokenizer)
    except (OSError, ValueError) as exc:
        raise CLIError(f"--model {model_path}: cannot serve it: {exc}") from None


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
