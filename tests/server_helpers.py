"""Helpers shared by the server tests that run ``python -m kandinsky.server`` as a real process.

A :class:`ServerProcess` starts the server on a free loopback port with its output in a log file (never a pipe
that could fill and block it), waits for the model, reads the process's resident memory, and stops it with a
signal, returning the exit code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Any, timeout: float = 120.0, what: str = "condition", every: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def sse_events(client: httpx.Client, path: str) -> list[tuple[str, dict[str, Any]]]:
    """Read an event stream to its end: [(event, data)]."""
    out = []
    with client.stream("GET", path) as resp:
        assert resp.status_code == 200, resp.status_code
        assert resp.headers["content-type"].startswith("text/event-stream")
        event, data = None, ""
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif line == "" and event:
                out.append((event, json.loads(data)))
                event, data = None, ""
    return out


def rss_bytes(pid: int) -> int:
    """The resident set size of a process (Linux: ``VmRSS`` of ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class ServerProcess:
    """``python -m kandinsky.server ARGS`` on 127.0.0.1 and a free port, its output in ``log``."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        src = str(ROOT / "src")
        environment["PYTHONPATH"] = src + os.pathsep + environment.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kandinsky.server", "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environment)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until /healthz reports the model loaded (fails if the process exits first)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
                try:
                    health = c.get("/healthz").json()
                except httpx.HTTPError:
                    health = None
                if health and health["model"] != "loading":
                    assert health["model"] == "ready", health
                    return health
                time.sleep(0.1)
        raise AssertionError(f"the server did not become ready in {timeout} s:\n{self.output()}")

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit code, waiting at most ``timeout`` seconds (``subprocess.TimeoutExpired`` after)."""
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        """Stop the process however it takes (SIGTERM, then SIGKILL after 30 s); its exit code."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            return self.proc.returncode
        finally:
            self._log_file.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
