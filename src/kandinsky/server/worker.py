"""The one model worker: a bounded queue of tasks, progress events with previews, cancellation.

A :class:`Task` is one request's :class:`~kandinsky.jobs.Job` in the queue, with its state, events and result.
One thread owns the model and runs one task at a time. Requests add tasks to a bounded queue (a full queue is
refused with :class:`QueueFull`); each task keeps an append-only list of events (``queued``, ``started``,
``progress``, ``preview``, then one of ``done``/``failed``/``cancelled``) that the SSE stream replays and
follows. Cancelling a queued task removes it; cancelling a running one stops it at its next sampler step.

A task that raises fails alone (``failed`` with the message; running out of memory says so) and the thread goes
on to the next one. Stopping the server drains the worker: new jobs are refused, queued ones end ``cancelled``
(their waiting requests answer 503), the running one may finish within a grace period and is cancelled after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import secrets
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from typing import Any

from .. import metadata
from ..jobs import Job, JobError
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


class ShuttingDown(Exception):
    """The server is stopping and takes no new jobs (answered 503)."""

    retry_after = 30

    def __init__(self) -> None:
        super().__init__("the server is shutting down and takes no new jobs; retry on its next start")


# The request field of each job field that a route names differently (a JobError names the job's field).
REQUEST_FIELDS = {
    "v1": {"negative": "negative_prompt", "guidance": "guidance_scale", "prior_guidance": "prior_guidance_scale",
           "num": "num_images"},
    "a1111": {"negative": "negative_prompt", "guidance": "cfg_scale", "num": "batch_size", "image": "init_images[0]",
              "strength": "denoising_strength", "sampler": "sampler_name"},
}
SHUTDOWN_REASON = "the server is shutting down"


def request_error(exc: JobError, kind: str) -> FieldError:
    """``exc`` naming the request's field (``guidance`` is ``guidance_scale`` in /v1, ``cfg_scale`` in A1111)."""
    field = REQUEST_FIELDS.get(kind, {}).get(exc.field, exc.field)
    message = exc.message
    if field != exc.field and (message.startswith(exc.field + " ") or message.startswith(exc.field + ":")):
        message = field + message[len(exc.field):]
    return FieldError(field, message)


def out_of_memory(exc: BaseException) -> bool:
    """True for host (MemoryError) or accelerator (torch's OutOfMemoryError) memory exhaustion."""
    return isinstance(exc, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__)


OUT_OF_MEMORY = ("out of memory: the server ran out of memory running this job; try a smaller size, fewer images "
                 "or fewer steps")


def release_memory() -> None:
    """Return what a failed job left behind (collect its cycles, empty the CUDA cache)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


class JobCancelled(Exception):
    """Raised from the progress callback to stop a running task."""


class Watch:
    """An awaitable wake-up for one coroutine whenever a task changes (set from the worker thread)."""

    def __init__(self, task: Task) -> None:
        self.task, self.loop, self.event = task, asyncio.get_running_loop(), asyncio.Event()

    def notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop may be closed at shutdown
            self.loop.call_soon_threadsafe(self.event.set)

    async def wait(self, timeout: float) -> None:
        """Return at the next change (or any change since the last call), or after ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()


class Task:
    """One request's work: its job, state, progress, events and result."""

    def __init__(self, job: Job, kind: str = "v1") -> None:
        self.id = secrets.token_hex(8)
        self.mode, self.job, self.kind = job.mode, job, kind
        self.state = QUEUED
        self.created, self.started, self.finished = time.time(), None, None
        self.progress: dict[str, Any] = {"stage": None, "done": 0, "total": 0, "fraction": 0.0}
        self.preview: str | None = None
        self.result: list[dict[str, Any]] | None = None
        self.error: str | None = None
        self.status = 200  # HTTP status for a synchronous request: 422 bad input, 500 crash, 409 cancelled,
        # 503 out of memory or cancelled by the server's shutdown
        self.error_field: str | None = None  # the request field a 422 names
        self.cancel_requested = False
        self.cancel_reason: tuple[str, int] | None = None  # why and with what status a cancellation ends it
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
        """Drop the images of all but the last preview event (a finished task is kept for a while)."""
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
        """Wait until the task has finished (done, failed or cancelled)."""
        with self.watch() as w:
            while not self.finished_state:
                await w.wait(poll)

    def summary(self, position: int | None = None, result: bool = True) -> dict[str, Any]:
        """The task as ``GET /v1/jobs/{id}`` shows it."""
        out: dict[str, Any] = {"id": self.id, "mode": self.mode, "state": self.state, "progress": dict(self.progress),
                               "queue_position": position, "created": self.created, "started": self.started,
                               "finished": self.finished, "error": self.error, "preview": self.preview}
        if result:
            out["result"] = self.response() if self.state == DONE else None
        return out

    def response(self) -> dict[str, Any]:
        """The result of a finished task, as the synchronous routes answer it."""
        images = self.result or []
        return {"id": self.id, "mode": self.mode, "seed": images[0]["seed"] if images else self.job.seed,
                "images": images,
                "timings": {"queued_s": round((self.started or self.created) - self.created, 3),
                            "run_s": round((self.finished or time.time()) - (self.started or self.created), 3)}}


class Progress:
    """The progress callback of one running task: counts steps, throttles previews, raises on cancellation."""

    wants_latents = True

    def __init__(self, task: Task, worker: Worker, plan: dict[str, Any]) -> None:
        self.task, self.worker, self.plan = task, worker, plan
        self.base = 0  # steps of the finished sampling loops
        self.stage: str | None = None
        self.done = 0
        self.fraction = 0.0
        self.every = worker.config.preview_every

    def check(self) -> None:
        """Raise :class:`JobCancelled` if the task was cancelled (for engines doing long work between steps)."""
        if self.task.cancel_requested:
            raise JobCancelled()

    def __call__(self, stage: str, done: int, total: int, latents: Any = None) -> None:
        task = self.task
        self.check()
        if stage != self.stage or done <= self.done:  # a new sampling loop began
            self.base += self.done
        self.stage, self.done = stage, done
        units = self.base + done
        expected = max(self.plan.get("units") or 1, units + (0 if done >= total else 1))
        self.fraction = max(self.fraction, min(0.99, units / expected))
        task.progress = {"stage": stage, "done": done, "total": total, "fraction": round(self.fraction, 4)}
        task.emit("progress", dict(task.progress))
        every = self.every or max(1, total // 10)
        if stage == "decoder" and latents is not None and done < total and done % every == 0:
            try:
                img = self.worker.engine.preview(task.mode, latents, self.plan["width"], self.plan["height"],
                                                 fraction=done / total)
            except Exception:  # noqa: BLE001 - a preview must never fail a task
                log.debug("preview failed", exc_info=True)
                img = None
            if img is not None:
                task.preview = b64(png_bytes(img))
                task.emit("preview", {"stage": stage, "done": done, "total": total, "image": task.preview})


class Worker:
    """The model thread and its bounded queue."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self.model_state, self.model_error = "loading", None
        self.jobs: dict[str, Task] = {}
        self.current: Task | None = None
        self.counts = {"submitted": 0, "refused": 0, "done": 0, "failed": 0, "cancelled": 0}
        self._pending: deque[Task] = deque()
        self._finished: deque[str] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._draining = False
        self._thread: threading.Thread | None = None
        self._mean_run = 5.0  # seconds, a running mean of task durations (for Retry-After)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the model thread (it loads the model first)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kandinsky-worker", daemon=True)
            self._thread.start()

    def drain(self, grace: float) -> None:
        """Begin a graceful stop: refuse new jobs, cancel the queued ones now (their waiting requests answer 503)
        and let the running one finish for up to ``grace`` seconds before cancelling it at its next step."""
        with self._cond:
            self._draining = True
            pending, self._pending = list(self._pending), deque()
            running = self.current
            self._cond.notify_all()
        for task in pending:
            self._finish(task, CANCELLED, "cancelled", {"reason": SHUTDOWN_REASON, "status": 503})
        if running is None:
            return
        if grace <= 0:
            self._cancel_running(running, SHUTDOWN_REASON, 503)
        else:
            log.info("waiting up to %g s for job %s to finish", grace, running.id)
            timer = threading.Timer(grace, self._cancel_running, (running, SHUTDOWN_REASON, 503))
            timer.daemon = True
            timer.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is queued and running, and stop the thread (waiting at most ``timeout`` seconds)."""
        with self._cond:
            self._stop = self._draining = True
            pending, self._pending = list(self._pending), deque()
            running = self.current
            self._cond.notify_all()
        for task in pending:
            self._finish(task, CANCELLED, "cancelled", {"reason": SHUTDOWN_REASON, "status": 503})
        if running is not None:
            self._cancel_running(running, SHUTDOWN_REASON, 503)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the model worker did not stop within %g s", timeout)

    def _cancel_running(self, task: Task, reason: str, status: int) -> None:
        with self._cond:
            if task.state == RUNNING and not task.cancel_requested:
                task.cancel_reason = (reason, status)
                task.cancel_requested = True

    @property
    def draining(self) -> bool:
        """True once the server has begun to stop (no new jobs are taken)."""
        return self._draining

    @property
    def ready(self) -> bool:
        """True once the model is loaded."""
        return self.model_state == "ready"

    # ------------------------------------------------------------------ requests

    def submit(self, job: Job, kind: str = "v1") -> Task:
        """Queue a job as a new task, or raise :class:`QueueFull`."""
        with self._cond:
            if self._stop or self._draining:
                raise ShuttingDown()
            if len(self._pending) >= self.config.queue_size:
                self.counts["refused"] += 1
                running = 1 if self.current is not None else 0
                retry = max(1, math.ceil(self._mean_run * (len(self._pending) + running) / 2))
                raise QueueFull(self.config.queue_size, retry)
            task = Task(job, kind)
            self.jobs[task.id] = task
            self._pending.append(task)
            self.counts["submitted"] += 1
            position = len(self._pending)
            self._cond.notify_all()
        task.emit("queued", {"position": position})
        return task

    def get(self, job_id: str) -> Task | None:
        """A task by id (finished tasks are kept until ``keep_jobs`` newer ones have finished)."""
        return self.jobs.get(job_id)

    def position(self, task: Task) -> int | None:
        """1 for the next task to run, None when not queued."""
        with self._cond:
            for i, queued in enumerate(self._pending):
                if queued is task:
                    return i + 1
        return None

    def cancel(self, task: Task) -> None:
        """Cancel a queued task now, or a running one at its next step; finished tasks are left as they are."""
        with self._cond:
            if task in self._pending:
                self._pending.remove(task)
                queued = True
            else:
                queued = False
                if task.state == RUNNING:
                    task.cancel_requested = True
        if queued:
            self._finish(task, CANCELLED, "cancelled", {"reason": "cancelled while queued"})

    def queue_info(self) -> dict[str, Any]:
        """Queue length, capacity and the running task (for /healthz)."""
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
        except Exception as exc:  # noqa: BLE001 - reported by /healthz and by every task
            self.model_state, self.model_error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("the model failed to load: %s", self.model_error)
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                task = self._pending.popleft()
                self.current = task
                task.started = time.time()
                task.emit("started", {}, state=RUNNING)
            try:
                self._run(task)
            except Exception as exc:  # noqa: BLE001 - failing the failure (out of memory again...): keep serving
                log.error("task %s could not be finished:\n%s", task.id, traceback.format_exc())
                if not task.finished_state:
                    with contextlib.suppress(Exception):
                        task.status, task.error, task.finished = 500, f"{type(exc).__name__}: {exc}", time.time()
                        task.emit("failed", {"error": f"{type(exc).__name__}: {exc}", "status": 500}, state=FAILED)
            finally:
                with self._cond:
                    self.current = None

    def _run(self, task: Task) -> None:
        if self.model_state != "ready":
            task.status = 503
            self._finish(task, FAILED, "failed", {"error": f"the model is not available: {self.model_error}",
                                                 "status": 503})
            return
        oom = None
        try:
            plan = plan_job(self.engine, task.job, self.config, task.kind)
            results = self.engine.run(task.job, Progress(task, self, plan))
            images = []
            for i, (img, record) in enumerate(results):
                images.append({"image": b64(png_bytes(img, record)), "seed": record.get("seed"),
                               "index": record.get("index", i), "width": img.width, "height": img.height,
                               "parameters": metadata.build_parameters(record), "record": record})
            del results
            task.result = images
        except JobCancelled:
            reason, status = task.cancel_reason or ("cancelled while running", 409)
            self._finish(task, CANCELLED, "cancelled", {"reason": reason, "status": status})
            return
        except JobError as exc:  # bad input the pipeline found (FieldError included)
            error = request_error(exc, task.kind)
            task.status, task.error_field = 422, error.field
            self._finish(task, FAILED, "failed", {"error": str(error), "field": error.field, "status": 422})
            return
        except ValueError as exc:  # the pipeline's own checks of its arguments
            task.status, task.error_field = 422, "body"
            self._finish(task, FAILED, "failed", {"error": f"body: {exc}", "field": "body", "status": 422})
            return
        except Exception as exc:  # noqa: BLE001 - one task's crash must not stop the worker
            if not out_of_memory(exc):
                log.error("task %s failed:\n%s", task.id, traceback.format_exc())
                task.status = 500
                self._finish(task, FAILED, "failed", {"error": f"{type(exc).__name__}: {exc}", "status": 500})
                return
            oom = f"{type(exc).__name__}: {exc}"
        if oom is not None:  # out of the except block: the failed call's frames (and tensors) are gone
            log.error("task %s ran out of memory (%s)", task.id, oom)
            task.status, task.result = 503, None
            release_memory()
            self._finish(task, FAILED, "failed", {"error": OUT_OF_MEMORY, "status": 503})
            return
        self._mean_run = 0.7 * self._mean_run + 0.3 * (time.time() - (task.started or task.created))
        task.progress = {**task.progress, "fraction": 1.0}
        self._finish(task, DONE, "done", task.response())

    def _finish(self, task: Task, state: str, event: str, data: dict[str, Any]) -> None:
        task.finished = time.time()
        if state == FAILED:
            task.error = data.get("error")
        elif state == CANCELLED:
            task.error = data.get("reason")
            task.status = data.get("status", 409)
        task.job = task.job.replace(image=None, mask=None, items=None)  # drop the uploads
        task.compact()
        with self._cond:
            if self.current is task:  # before the event: whoever it wakes sees the worker idle
                self.current = None
            self.counts[state] += 1
            self._finished.append(task.id)
            while len(self._finished) > self.config.keep_jobs:
                self.jobs.pop(self._finished.popleft(), None)
        task.emit(event, data, state=state)


def plan_job(engine: Engine, job: Job, config: ServerConfig, kind: str = "v1") -> dict[str, Any]:
    """The engine's plan of ``job``, checked against the limits. An A1111 request has no say over the prior's
    steps unless it sends the ``prior_steps`` extension: the model's default, capped at ``max_steps``."""
    plan = engine.plan(job)
    most = config.limits.max_steps
    if kind == "a1111" and job.prior_steps is None and (plan.get("prior_steps") or 0) > most:
        job.prior_steps = most
        plan = engine.plan(job)
    check_plan(plan, job, config)
    return plan


def check_plan(plan: dict[str, Any], job: Job, config: ServerConfig) -> None:
    """The limits on the resolved job (sizes from the model's defaults or the input image included)."""
    limits = config.limits
    w, h = plan["width"], plan["height"]
    if w * h > limits.max_pixels:
        field = "width" if job.width else "image" if job.image is not None else "width"
        raise FieldError(field, f"{w}×{h} = {w * h} pixels is over the limit of {limits.max_pixels}")
    for key in ("steps",) if job.mode == "variations" else ("steps", "prior_steps"):  # variations: no prior
        if plan.get(key) and plan[key] > limits.max_steps:
            raise FieldError(key, f"{plan[key]} is over the limit of {limits.max_steps}")
