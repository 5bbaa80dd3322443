"""The job store: one actor, shared by every ingress replica, holding the server's own queue and job records.

It runs :class:`kandinsky.server.worker.Worker` — the bounded queue, ``429`` with ``Retry-After``, task events,
progress with previews, cancellation, ``keep_jobs`` — unchanged but for one thing: :class:`PoolWorker` runs as
many tasks at once as the model deployment can take (``slots``), each on a replica through
:class:`~kandinsky.ray.remote.RemoteEngine`. Ingress replicas read and change jobs only through this actor
(:mod:`kandinsky.ray.ingress`), so any replica can answer for any job, and a job never depends on the replica
that accepted it. It is a Serve *deployment-scoped actor* of the ingress deployment: Serve starts it with the
application, restarts it if it dies (its records are then lost) and removes it with the application.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from typing import Any

from ..jobs import Job
from ..server.config import ServerConfig
from ..server.worker import DONE, Task, Worker
from .remote import RemoteEngine


class PoolWorker(Worker):
    """:class:`~kandinsky.server.worker.Worker` with ``slots`` threads taking tasks from the one queue.

    ``current`` is per thread for the worker's own bookkeeping; read from any other thread it is the
    longest-running task (what ``/sdapi/v1/progress`` shows)."""

    def __init__(self, engine: Any, config: ServerConfig, slots: int) -> None:
        self._running: dict[int, Task] = {}
        self._mine = threading.local()
        super().__init__(engine, config)
        self.slots = max(1, int(slots))
        self._threads: list[threading.Thread] = []

    @property
    def current(self) -> Task | None:  # type: ignore[override]
        if getattr(self._mine, "worker", False):
            return self._running.get(threading.get_ident())
        running = sorted(self._running.values(), key=lambda t: t.started or t.created)
        return running[0] if running else None

    @current.setter
    def current(self, task: Task | None) -> None:
        if task is None:
            self._running.pop(threading.get_ident(), None)
        else:
            self._running[threading.get_ident()] = task

    def running(self) -> list[Task]:
        """The tasks running now (sent to a replica, or waiting in the deployment's queue for one)."""
        return list(self._running.values())

    def start(self) -> None:
        """Start the ``slots`` threads (each waits for the model description first)."""
        if self._threads:
            return
        for i in range(self.slots):
            thread = threading.Thread(target=self._slot, name=f"kandinsky-slot-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _slot(self) -> None:
        self._mine.worker = True
        self._loop()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is queued and running, and stop the threads."""
        with self._cond:
            for task in self.running():
                task.cancel_requested = True
        super().stop(0)
        for thread in self._threads:
            thread.join(timeout)

    def queue_info(self) -> dict[str, Any]:
        """The server's queue information, plus the slots and every running job with the model replica running it
        (``{"replica": ID, "pid": PID}``, None until its first step)."""
        info = super().queue_info()
        placements = getattr(self.engine, "placements", {})
        info.update(slots=self.slots, running_jobs={t.id: placements.get(t.id) for t in self.running()})
        return info


def snapshot(worker: Worker, task: Task, *, result: bool = True, events: bool = False,
             since: int = 0) -> dict[str, Any]:
    """A task as plain data for :class:`kandinsky.ray.ingress.ProxyTask`: every public attribute but the job and
    the events (so fields the server adds to ``Task`` travel too), the seed, the queue position, events from
    ``since`` if asked."""
    out = {k: v for k, v in vars(task).items() if not k.startswith("_") and k not in ("job", "events")}
    out.update(seed=task.job.seed, position=worker.position(task))
    if not (result and task.state == DONE):
        out["result"] = None
    if events:
        out["events"] = task.events_since(since)
        out["since"] = since
    return out


class JobStore:
    """The actor (asynchronous: long polls wait without holding a thread). ``model_deployment``: the name of the
    model deployment in this application; ``slots``: jobs sent to it at once."""

    def __init__(self, config: ServerConfig, model_deployment: str, slots: int, app_name: str | None = None) -> None:
        import ray
        from ray import serve

        if app_name is None:
            app_name = serve.get_deployment_actor_context().app_name
        handle: list[Any] = []

        def model() -> Any:
            if not handle:
                handle.append(serve.get_deployment_handle(model_deployment, app_name))
            return handle[0]

        self.engine = RemoteEngine(model, ray.get_runtime_context().current_actor)
        self.worker = PoolWorker(self.engine, replace(config, threads=None), slots)
        self.worker.start()

    # ------------------------------------------------------------------ what the ingress asks

    async def describe(self) -> dict[str, Any] | None:
        """The model's description once a replica has given it (None while loading)."""
        return self.engine.description

    async def status(self) -> dict[str, Any]:
        """The model's state, the queue, the counts (``/healthz``) and whether the worker is draining (read before
        every submission: one call answers both)."""
        w = self.worker
        return {"model": w.model_state, "error": w.model_error, "queue": w.queue_info(), "counts": dict(w.counts),
                "draining": w.draining}

    async def attribute(self, name: str) -> Any:
        """A plain attribute of the worker (``draining``...: what the server's routes read and this module does not
        know by name)."""
        value = getattr(self.worker, name)
        if callable(value):
            raise AttributeError(f"the job store's {name} is a method, not a value")
        return value

    async def submit(self, job: Job, kind: str = "v1") -> dict[str, Any]:
        """Queue a job (``QueueFull`` when the queue is full)."""
        return snapshot(self.worker, self.worker.submit(job, kind))

    async def get(self, job_id: str, events: bool = False) -> dict[str, Any] | None:
        """A job, or None if unknown (or forgotten)."""
        task = self.worker.get(job_id)
        return None if task is None else snapshot(self.worker, task, events=events)

    async def jobs(self) -> list[dict[str, Any]]:
        """Every job remembered, without results."""
        return [snapshot(self.worker, t, result=False) for t in list(self.worker.jobs.values())]

    async def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a job (queued: now; running: at its next step)."""
        task = self.worker.get(job_id)
        if task is None:
            return None
        await asyncio.to_thread(self.worker.cancel, task)
        return snapshot(self.worker, task)

    async def current(self) -> dict[str, Any] | None:
        """The longest-running job, if any."""
        task = self.worker.current
        return None if task is None else snapshot(self.worker, task)

    async def follow(self, job_id: str, known: int, timeout: float, until_done: bool = False
                     ) -> dict[str, Any] | None:
        """Wait (at most ``timeout`` seconds) for events after the first ``known`` ones, or with ``until_done``
        for the job to finish; then the job, with its events from ``known`` unless ``until_done``."""
        task = self.worker.get(job_id)
        if task is None:
            return None
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, timeout)
        with task.watch() as watch:
            while not task.finished_state and (until_done or len(task.events_since(known)) == 0):
                left = end - loop.time()
                if left <= 0:
                    break
                await watch.wait(left)
        return snapshot(self.worker, task, events=not until_done, since=known)

    # ------------------------------------------------------------------ what the replicas tell

    async def report(self, key: str, steps: list[tuple[str, int, int, Any]],
                     where: dict[str, Any] | None = None) -> bool:
        """A replica's progress on the job ``key``: its steps since the last call, in order, each
        ``(stage, done, total, latents or None)``; False: stop (cancelled)."""
        for stage, done, total, latents in steps:
            if not self.engine.report(key, stage, done, total, latents, where):
                return False
            where = None
        return True
