"""The HTTP server and web page: ``kandinsky serve``.

A FastAPI application on uvicorn: one model worker thread running jobs from a bounded queue, the ``/v1`` JSON
API (documented at ``/docs`` and ``/openapi.json``), the AUTOMATIC1111-compatible ``/sdapi/v1`` subset, live
progress as Server-Sent Events with previews, and a web page at ``/``. FastAPI is imported only when the server
is used (``pip install 'kandinsky[server]'``).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..jobs import ModelChoice, add_model_arguments
from .config import Limits, ServerConfig, add_serve_arguments, config_from_args

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["Limits", "ServerConfig", "add_serve_arguments", "build_parser", "config_from_args", "create_app", "main",
           "serve"]


def create_app(config: ServerConfig | None = None, engine: Any = None, worker: Any = None) -> FastAPI:
    """The FastAPI application (see :func:`kandinsky.server.app.create_app`)."""
    from .app import create_app as _create

    return _create(config, engine, worker)


def _loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m kandinsky.server`` (those of ``kandinsky serve``: the server's and the model's)."""
    p = argparse.ArgumentParser(prog="python -m kandinsky.server",
                                description="Run the HTTP server and web page (the same as `kandinsky serve`).")
    add_serve_arguments(p)
    add_model_arguments(p)
    return p


def main(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """Run the server until interrupted. ``argv``: the ``kandinsky serve`` options, or their parsed namespace."""
    if isinstance(argv, argparse.Namespace):
        args = argv
    else:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    from .engine import PipelineEngine

    config = config_from_args(args)
    if not _loopback(config.host) and not config.api_key:
        print(f"kandinsky serve: warning: listening on {config.host} without an API key; anyone who can reach "
              "this machine can use it (pass --api-key)", file=sys.stderr)
    app = create_app(config, PipelineEngine(ModelChoice.from_options(args)))
    shown = f"[{config.host}]" if ":" in config.host else config.host
    print(f"kandinsky serve: http://{shown}:{config.port}/  (API docs at /docs; Ctrl+C to stop)", file=sys.stderr)
    serve(app, config)
    return 0


def serve(app: FastAPI, config: ServerConfig) -> None:
    """Run ``app`` on uvicorn until SIGINT or SIGTERM, then stop gracefully (see :class:`GracefulServer`)."""
    from .runner import GracefulServer

    GracefulServer.for_app(app, config).run()
