"""Jobs and the one model worker: a bounded queue, progress events with previews, cancellation.

One thread owns the model and runs one job at a time. Requests add jobs to a bounded queue (a full queue is
refused with :class:`QueueFull`); each job keeps an append-only list of events (``queued``, ``started``,
``progress``, ``preview``, then one of ``done``/``failed``/``cancelled``) that the SSE stream replays and
follows. Cancelling a queued job removes it; cancelling a running one stops it at its next sampler step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from typing import Any

from .. import metadata
from .config import ServerConfig
from .engine import Engine
from .images import FieldError, b64, png_bytes

log = logging.getLogger("kandinsky.server")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
TERMINAL = (DONE, FAILED, CANCELLED)


class QueueFull(Exception):
    """The queue holds ``capacity`` jobs already; try again after ``retry_after`` seconds."""

    def __init__(self, capacity: int, retry_after: int) -> None:
        super().__init__(f"the queue is full ({capacity} jobs waiting); retry after {retry_after} s")
        self.capacity, self.retry_after = capacity, retry_after


class JobCancelled(Exception):
    """Raised from the progress callback to stop a running job."""


class Watch:
    """An awaitable wake-up for one coroutine whenever a job changes (set from the worker thread)."""

    def __init__(self, job: Job) -> None:
        self.job, self.loop, self.event = job, asyncio.get_running_loop(), asyncio.Event()

    def notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop may be closed at shutdown
            self.loop.call_soon_threadsafe(self.event.set)

    async def wait(self, timeout: float) -> None:
        """Return at the next change (or any change since the last call), or after ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()


class Job:
    """One request's work: its spec, state, progress, events and result."""

    def __init__(self, mode: str, spec: dict[str, Any], kind: str = "v1") -> None:
        self.id = secrets.token_hex(8)
        self.mode, self.spec, self.kind = mode, spec, kind
        self.state = QUEUED
        self.created, self.started, self.finished = time.time(), None, None
        self.progress: dict[str, Any] = {"stage": None, "done": 0, "total": 0, "fraction": 0.0}
        self.preview: str | None = None
        self.result: list[dict[str, Any]] | None = None
        self.error: str | None = None
        self.status = 200  # HTTP status for a synchronous request: 422 bad input, 500 crash, 409 cancelled
        self.cancel_requested = False
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._watches: set[Watch] = set()

    @property
    def finished_state(self) -> bool:
        """True once done, failed or cancelled."""
        return self.state in TERMINAL

    def emit(self, event: str, data: dict[str, Any], state: str | None = None) -> None:
        """Append an event (and change state) atomically, then wake the watchers."""
        with self._lock:
            if state is not None:
                self.state = state
            self.events.append((len(self.events), event, data))
            watches = list(self._watches)
        for w in watches:
            w.notify()

    def compact(self) -> None:
        """Drop the images of all but the last preview event (a finished job is kept for a while)."""
        with self._lock:
            previews = [i for i, (_, event, _) in enumerate(self.events) if event == "preview"]
            for i in previews[:-1]:
                seq, event, data = self.events[i]
                self.events[i] = (seq, event, {k: v for k, v in data.items() if k != "image"})

    def events_since(self, index: int) -> list[tuple[int, str, dict[str, Any]]]:
        """Events numbered ``index`` and later."""
        with self._lock:
            return self.events[index:]

    @contextlib.contextmanager
    def watch(self) -> Iterator[Watch]:
        """Wake-ups on every change while the block runs (must be used inside the event loop)."""
        w = Watch(self)
        with self._lock:
            self._watches.add(w)
        try:
            yield w
        finally:
            with self._lock:
                self._watches.discard(w)

    async def wait(self, poll: float = 30.0) -> None:
        """Wait until the job has finished (done, failed or cancelled)."""
        with self.watch() as w:
            while not self.finished_state:
                await w.wait(poll)

    def summary(self, position: int | None = None, result: bool = True) -> dict[str, Any]:
        """The job as ``GET /v1/jobs/{id}`` shows it."""
        out: dict[str, Any] = {"id": self.id, "mode": self.mode, "state": self.state, "progress": dict(self.progress),
                               "queue_position": position, "created": self.created, "started": self.started,
                               "finished": self.finished, "error": self.error, "preview": self.preview}
        if result:
            out["result"] = self.response() if self.state == DONE else None
        return out

    def response(self) -> dict[str, Any]:
        """The result of a finished job, as the synchronous routes answer it."""
        images = self.result or []
        return {"id": self.id, "mode": self.mode, "seed": images[0]["seed"] if images else self.spec.get("seed"),
                "images": images,
                "timings": {"queued_s": round((self.started or self.created) - self.created, 3),
                            "run_s": round((self.finished or time.time()) - (self.started or self.created), 3)}}


class Progress:
    """The progress callback of one running job: counts steps, throttles previews, raises on cancellation."""

    wants_latents = True

    def __init__(self, job: Job, worker: Worker, plan: dict[str, Any]) -> None:
        self.job, self.worker, self.plan = job, worker, plan
        self.base = 0  # steps of the finished sampling loops
        self.stage: str | None = None
        self.done = 0
        self.fraction = 0.0
        self.every = worker.config.preview_every

    def check(self) -> None:
        """Raise :class:`JobCancelled` if the job was cancelled (for engines doing long work between steps)."""
        if self.job.cancel_requested:
            raise JobCancelled()

    def __call__(self, stage: str, done: int, total: int, latents: Any = None) -> None:
        job = self.job
        self.check()
        if stage != self.stage or done <= self.done:  # a new sampling loop began
            self.base += self.done
        self.stage, self.done = stage, done
        units = self.base + done
        expected = max(self.plan.get("units") or 1, units + (0 if done >= total else 1))
        self.fraction = max(self.fraction, min(0.99, units / expected))
        job.progress = {"stage": stage, "done": done, "total": total, "fraction": round(self.fraction, 4)}
        job.emit("progress", dict(job.progress))
        every = self.every or max(1, total // 10)
        if stage == "decoder" and latents is not None and done < total and done % every == 0:
            try:
                img = self.worker.engine.preview(job.mode, latents, self.plan["width"], self.plan["height"],
                                                 fraction=done / total)
            except Exception:  # noqa: BLE001 - a preview must never fail a job
                log.debug("preview failed", exc_info=True)
                img = None
            if img is not None:
                job.preview = b64(png_bytes(img))
                job.emit("preview", {"stage": stage, "done": done, "total": total, "image": job.preview})


class Worker:
    """The model thread and its bounded queue."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self.model_state, self.model_error = "loading", None
        self.jobs: dict[str, Job] = {}
        self.current: Job | None = None
        self.counts = {"submitted": 0, "refused": 0, "done": 0, "failed": 0, "cancelled": 0}
        self._pending: deque[Job] = deque()
        self._finished: deque[str] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._mean_run = 5.0  # seconds, a running mean of job durations (for Retry-After)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the model thread (it loads the model first)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kandinsky-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is queued and running, and stop the thread."""
        with self._cond:
            self._stop = True
            pending, self._pending = list(self._pending), deque()
            if self.current is not None:
                self.current.cancel_requested = True
            self._cond.notify_all()
        for job in pending:
            self._finish(job, CANCELLED, "cancelled", {"reason": "server shutting down"})
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def ready(self) -> bool:
        """True once the model is loaded."""
        return self.model_state == "ready"

    # ------------------------------------------------------------------ requests

    def submit(self, mode: str, spec: dict[str, Any], kind: str = "v1") -> Job:
        """Queue a job, or raise :class:`QueueFull`."""
        with self._cond:
            if self._stop:
                raise QueueFull(self.config.queue_size, 5)
            if len(self._pending) >= self.config.queue_size:
                self.counts["refused"] += 1
                running = 1 if self.current is not None else 0
                retry = max(1, math.ceil(self._mean_run * (len(self._pending) + running) / 2))
                raise QueueFull(self.config.queue_size, retry)
            job = Job(mode, spec, kind)
            self.jobs[job.id] = job
            self._pending.append(job)
            self.counts["submitted"] += 1
            position = len(self._pending)
            self._cond.notify_all()
        job.emit("queued", {"position": position})
        return job

    def get(self, job_id: str) -> Job | None:
        """A job by id (finished jobs are kept until ``keep_jobs`` newer ones have finished)."""
        return self.jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """1 for the next job to run, None when not queued."""
        with self._cond:
            for i, queued in enumerate(self._pending):
                if queued is job:
                    return i + 1
        return None

    def cancel(self, job: Job) -> None:
        """Cancel a queued job now, or a running one at its next step; finished jobs are left as they are."""
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                queued = True
            else:
                queued = False
                if job.state == RUNNING:
                    job.cancel_requested = True
        if queued:
            self._finish(job, CANCELLED, "cancelled", {"reason": "cancelled while queued"})

    def queue_info(self) -> dict[str, Any]:
        """Queue length, capacity and the running job (for /healthz)."""
        with self._cond:
            return {"pending": len(self._pending), "capacity": self.config.queue_size,
                    "running": self.current.id if self.current is not None else None}

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        restore = None
        if self.config.threads:
            import torch

            restore = torch.get_num_threads()
            torch.set_num_threads(self.config.threads)
        try:
            self._serve()
        finally:
            if restore is not None:
                import torch

                torch.set_num_threads(restore)

    def _serve(self) -> None:
        try:
            self.engine.load()
            self.model_state = "ready"
            log.info("model ready")
        except Exception as exc:  # noqa: BLE001 - reported by /healthz and by every job
            self.model_state, self.model_error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("the model failed to load: %s", self.model_error)
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._pending.popleft()
                self.current = job
                job.started = time.time()
                job.emit("started", {}, state=RUNNING)
            try:
                self._run(job)
            finally:
                with self._cond:
                    self.current = None

    def _run(self, job: Job) -> None:
        if self.model_state != "ready":
            job.status = 503
            self._finish(job, FAILED, "failed", {"error": f"the model is not available: {self.model_error}",
                                                 "status": 503})
            return
        try:
            plan = self.engine.plan(job.spec)
            check_plan(plan, job.spec, self.config)
            results = self.engine.run(job.spec, Progress(job, self, plan))
            images = []
            for i, (img, record) in enumerate(results):
                images.append({"image": b64(png_bytes(img, record)), "seed": record.get("seed"),
                               "index": record.get("index", i), "width": img.width, "height": img.height,
                               "parameters": metadata.build_parameters(record), "record": record})
            job.result = images
        except JobCancelled:
            self._finish(job, CANCELLED, "cancelled", {"reason": "cancelled while running"})
            return
        except ValueError as exc:  # bad input the pipeline found (FieldError included)
            job.status = 422
            self._finish(job, FAILED, "failed", {"error": str(exc), "status": 422})
            return
        except Exception as exc:  # noqa: BLE001 - one job's crash must not stop the worker
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            job.status = 500
            self._finish(job, FAILED, "failed", {"error": f"{type(exc).__name__}: {exc}", "status": 500})
            return
        self._mean_run = 0.7 * self._mean_run + 0.3 * (time.time() - (job.started or job.created))
        job.progress = {**job.progress, "fraction": 1.0}
        self._finish(job, DONE, "done", job.response())

    def _finish(self, job: Job, state: str, event: str, data: dict[str, Any]) -> None:
        job.finished = time.time()
        if state == FAILED:
            job.error = data.get("error")
        elif state == CANCELLED:
            job.error = data.get("reason")
            job.status = 409
        job.spec = {"mode": job.mode, "seed": job.spec.get("seed")}  # drop the uploads
        job.compact()
        with self._cond:
            if self.current is job:  # before the event: whoever it wakes sees the worker idle
                self.current = None
            self.counts[state] += 1
            self._finished.append(job.id)
            while len(self._finished) > self.config.keep_jobs:
                self.jobs.pop(self._finished.popleft(), None)
        job.emit(event, data, state=state)


def check_plan(plan: dict[str, Any], spec: dict[str, Any], config: ServerConfig) -> None:
    """The limits on the resolved job (sizes from the model's defaults or the input image included)."""
    limits = config.limits
    w, h = plan["width"], plan["height"]
    if w * h > limits.max_pixels:
        field = "width" if spec.get("width") else "image" if spec.get("image") is not None else "width"
        raise FieldError(field, f"{w}×{h} = {w * h} pixels is over the limit of {limits.max_pixels}")
    for key in ("steps", "prior_steps"):
        if plan.get(key) and plan[key] > limits.max_steps:
            raise FieldError(key, f"{plan[key]} is over the limit of {limits.max_steps}")
