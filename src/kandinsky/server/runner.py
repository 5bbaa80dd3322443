"""uvicorn with a graceful stop: on SIGTERM or Ctrl+C the model worker drains before the connections close.

uvicorn alone, on a signal, stops accepting connections, waits for the open ones, then runs the lifespan shutdown;
requests waiting for queued jobs would hold it up to its timeout and then be dropped without an answer. Here the
first signal also drains the worker at once: queued jobs end ``cancelled`` (their waiting requests answer 503,
their event streams end with a ``cancelled`` event), new jobs are refused with 503, and the running job may finish
within ``shutdown_grace`` seconds before it is cancelled at its next step; a second signal cancels it at once.
The process then exits with status 0 (uvicorn would re-raise the signal and die of it).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from types import FrameType
from typing import Any

import uvicorn

from .config import ServerConfig

log = logging.getLogger("kandinsky.server")
STOP_MARGIN = 5.0  # seconds beyond the grace period for the last answers to be sent


class GracefulServer(uvicorn.Server):
    """A :class:`uvicorn.Server` that drains ``worker`` (a :class:`~kandinsky.server.worker.Worker`) on a signal."""

    def __init__(self, config: uvicorn.Config, worker: Any, grace: float) -> None:
        super().__init__(config)
        self.worker, self.grace = worker, grace
        self._signals = 0

    @classmethod
    def for_app(cls, app: Any, config: ServerConfig, **uvicorn_options: Any) -> GracefulServer:
        """The server for an app made by :func:`~kandinsky.server.app.create_app` with ``config``."""
        grace = max(0.0, float(config.shutdown_grace))
        options = {"host": config.host, "port": config.port, "log_level": config.log_level,
                   "timeout_graceful_shutdown": int(grace + STOP_MARGIN + 0.999), **uvicorn_options}
        return cls(uvicorn.Config(app, **options), app.state.worker, grace)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        grace = self.grace if self._signals == 1 else 0.0
        if self._signals == 1:
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            log.warning("%s: stopping; queued jobs are cancelled, the running one has %g s to finish", name, grace)
        # the worker takes locks: drain it from a thread, not inside the signal handler
        threading.Thread(target=self.worker.drain, args=(grace,), name="kandinsky-drain", daemon=True).start()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().shutdown(sockets)
        finally:
            captured = getattr(self, "_captured_signals", None)  # uvicorn re-raises these after serving
            if isinstance(captured, list):
                captured.clear()  # a graceful stop exits 0 instead of dying of the re-raised signal
