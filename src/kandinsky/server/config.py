"""Server settings: the limits, the queue and access, and their command-line options.

This module imports nothing heavy, so the ``kandinsky`` parser can add the ``serve`` options without FastAPI.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any

API_KEY_ENV = "KANDINSKY_API_KEY"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860


@dataclass
class Limits:
    """Caps on what one request may ask for; every one is configurable (``kandinsky serve --help``)."""

    max_pixels: int = 1024 * 1024  # output width × height
    max_steps: int = 200  # decoder and prior steps
    max_images: int = 4  # images per request (num_images; A1111: batch_size × n_iter)
    max_items: int = 16  # mix items
    max_body_bytes: int = 32 * 2**20  # one request body
    max_upload_bytes: int = 16 * 2**20  # one uploaded image, after base64 decoding
    max_upload_pixels: int = 4096 * 4096  # one uploaded image's width × height, read from its header

    def as_dict(self) -> dict[str, int]:
        """The limits as a JSON-ready dict (``GET /v1/models`` reports them)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ServerConfig:
    """Everything :func:`kandinsky.server.app.create_app` needs besides the model."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    queue_size: int = 16  # jobs waiting (the running one not counted); a full queue answers 429
    api_key: str | None = None  # when set, every route but /healthz and the page needs ``Bearer <key>``
    keep_jobs: int = 64  # finished jobs kept (with their images) for GET /v1/jobs/{id}; the oldest go first
    preview_every: int = 0  # decoder steps between previews; 0 = about ten per job
    log_level: str = "info"
    threads: int | None = None  # torch intra-op threads of the model worker (None: torch's default)
    lora_dir: str | None = None  # LoRA adapters offered by name (server/loras.py)
    shutdown_grace: float = 15.0  # seconds the running job may take to finish on SIGTERM/Ctrl+C before it is cancelled
    limits: Limits = field(default_factory=Limits)


def _positive(name: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text}")
    return value


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The ``kandinsky serve`` options (the model options are the CLI's own ``--model/--prior/...``)."""
    g = p.add_argument_group("server")
    g.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}, this machine only; anything else should "
                        "come with --api-key)")
    g.add_argument("--port", type=_positive("port"), default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    g.add_argument("--queue-size", type=_positive("queue size"), default=ServerConfig.queue_size,
                   help="jobs that may wait for the model; when full, requests get 429 with Retry-After "
                        f"(default {ServerConfig.queue_size})")
    g.add_argument("--api-key", metavar="KEY", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /healthz and the web page "
                        f"(default: ${API_KEY_ENV}, else no key)")
    g.add_argument("--keep-jobs", type=_positive("keep jobs"), default=ServerConfig.keep_jobs,
                   help=f"finished jobs kept for GET /v1/jobs/ID (default {ServerConfig.keep_jobs})")
    g.add_argument("--preview-every", type=int, default=0, metavar="N",
                   help="decoder steps between live previews (default 0: about ten per image)")
    g.add_argument("--threads", type=_positive("threads"), default=None, metavar="N",
                   help="CPU threads for the model (default: torch's choice; 1 is faster on a machine whose cores "
                        "are busy with other work)")
    g.add_argument("--shutdown-grace", type=_seconds, default=ServerConfig.shutdown_grace, metavar="SECONDS",
                   help="on SIGTERM or Ctrl+C, queued jobs are cancelled at once and the running one may finish for "
                        f"this long before it is cancelled too (default {ServerConfig.shutdown_grace:g}; a second "
                        "signal cancels it at once)")
    g.add_argument("--lora-dir", metavar="DIR", default=None,
                   help="LoRA adapters offered by name: DIR/NAME/ (peft or diffusers files) or DIR/NAME.safetensors; "
                        "GET /v1/models lists them, requests choose them with 'loras' (A1111: <lora:NAME:SCALE>)")
    g.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    c = p.add_argument_group("limits (per request)")
    d = Limits()
    c.add_argument("--max-pixels", type=_positive("max pixels"), default=d.max_pixels,
                   help=f"output width × height (default {d.max_pixels})")
    c.add_argument("--max-steps", type=_positive("max steps"), default=d.max_steps,
                   help=f"decoder or prior steps (default {d.max_steps})")
    c.add_argument("--max-images", type=_positive("max images"), default=d.max_images,
                   help=f"images per request (default {d.max_images})")
    c.add_argument("--max-items", type=_positive("max items"), default=d.max_items,
                   help=f"prompts and images in one mix (default {d.max_items})")
    c.add_argument("--max-body-bytes", type=_positive("max body bytes"), default=d.max_body_bytes,
                   help=f"request body size; larger bodies get 413 (default {d.max_body_bytes})")
    c.add_argument("--max-upload-bytes", type=_positive("max upload bytes"), default=d.max_upload_bytes,
                   help=f"one uploaded image's file size (default {d.max_upload_bytes})")
    c.add_argument("--max-upload-pixels", type=_positive("max upload pixels"), default=d.max_upload_pixels,
                   help=f"one uploaded image's width × height, checked before decoding (default {d.max_upload_pixels})")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """A :class:`ServerConfig` from parsed ``serve`` options (the API key falls back to the environment)."""
    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits) if getattr(args, f.name, None)})
    api_key = getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or None
    return ServerConfig(host=getattr(args, "host", DEFAULT_HOST), port=getattr(args, "port", DEFAULT_PORT),
                        queue_size=getattr(args, "queue_size", ServerConfig.queue_size), api_key=api_key,
                        keep_jobs=getattr(args, "keep_jobs", ServerConfig.keep_jobs),
                        preview_every=max(0, getattr(args, "preview_every", 0) or 0),
                        log_level=getattr(args, "log_level", "info"), threads=getattr(args, "threads", None),
                        shutdown_grace=getattr(args, "shutdown_grace", ServerConfig.shutdown_grace), limits=limits,
                        lora_dir=getattr(args, "lora_dir", None))
