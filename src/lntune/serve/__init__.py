"""``lntune serve``: one base model, many LN tuning adapters, one HTTP server (FastAPI + uvicorn).

Requests name their adapter in ``model`` (the base model's name means none); requests for any mix of
adapters are joined into one mixed-adapter forward. Needs the ``serve`` extra (``pip install
'lntune[serve]'``); importing this package does not, so the command line works without it. See
docs/serving.md.

>>> from lntune.serve import ServeConfig, ServingService, create_app
>>> app = create_app(ServingService.from_config(ServeConfig(model_path, "base", adapters_dir, "seq-cls"), tokenizer))
"""

from __future__ import annotations

from lntune.serve.config import ServeConfig

__all__ = ["ServeConfig", "ServingService", "create_app"]


def __getattr__(name: str):
    # FastAPI and prometheus-client come with the serve extra: import them only when used.
    if name == "create_app":
        from lntune.serve.app import create_app

        return create_app
    if name == "ServingService":
        from lntune.serve.service import ServingService

        return ServingService
    raise AttributeError(f"module 'lntune.serve' has no attribute {name!r}")
