"""Helpers shared by the server tests: a real uvicorn in a thread (:func:`running`), a fake engine whose steps
the test releases one by one (:class:`GateEngine`), SSE reading, and ``python -m kandinsky.server`` as a real
process (:class:`ServerProcess`: a free loopback port, its output in a log file (never a pipe that could fill and
block it), its resident memory, and its exit code after a signal).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import PIL.Image
import uvicorn

from kandinsky.jobs import Job

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_for(predicate: Any, timeout: float = 120.0, what: str = "condition", every: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def sse_events(client: httpx.Client, path: str, first: threading.Event | None = None
               ) -> list[tuple[str, dict[str, Any]]]:
    """Read an event stream to its end: [(event, data)]; ``first`` is set once the first event has arrived."""
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
                if first is not None:
                    first.set()
    return out


class GateEngine:
    """A model stand-in: each step waits for ``step()`` from the test, so jobs run exactly when told."""

    def __init__(self, steps: int = 3) -> None:
        self.steps = steps
        self.tokens = threading.Semaphore(0)
        self.running = threading.Event()

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.tokens.release()

    def load(self) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {"name": "gate", "modes": ["txt2img"]}

    def plan(self, job: Job) -> dict[str, Any]:
        return {"width": job.width or 8, "height": job.height or 8, "steps": self.steps,
                "prior_steps": 1, "units": self.steps}

    def run(self, job: Job, report: Any) -> list[tuple[PIL.Image.Image, dict[str, Any]]]:
        self.running.set()
        try:
            for i in range(self.steps):
                while not self.tokens.acquire(timeout=0.05):
                    report.check()  # lets a cancellation through while waiting
                report("decoder", i + 1, self.steps, None)
        finally:
            self.running.clear()
        record = {"mode": job.mode, "prompt": job.prompt, "seed": job.seed, "width": 8, "height": 8}
        return [(PIL.Image.new("RGB", (8, 8), (200, 30, 30)), record)]

    def preview(self, mode: str, latents: Any, width: int, height: int, fraction: float = 1.0) -> None:
        return None


def rss_bytes(pid: int) -> int:
    """The resident set size of a process (Linux: ``VmRSS`` of ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class ServerProcess:
    """``python -m kandinsky.server ARGS`` (``cli``: ``python -m kandinsky serve ARGS``) on 127.0.0.1 and a free
    port, its output in ``log``."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, cli: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 - closed in stop()
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        src = str(ROOT / "src")
        environment["PYTHONPATH"] = src + os.pathsep + environment.get("PYTHONPATH", "")
        command = ["kandinsky", "serve"] if cli else ["kandinsky.server"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *command, "--host", "127.0.0.1", "--port", str(self.port), *args],
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
