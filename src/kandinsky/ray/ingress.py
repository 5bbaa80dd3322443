"""The HTTP side: every ingress replica serves the ``kandinsky serve`` FastAPI application itself (the ``/v1`` API,
the AUTOMATIC1111 subset, ``/healthz``, the web page, limits, the API key), with its worker replaced by
:class:`ProxyWorker`, which keeps nothing locally and asks the job store (:mod:`kandinsky.ray.store`) instead.

So a job submitted through one replica can be followed (``GET /v1/jobs/ID``, its event stream), cancelled and
collected through any other. Each answer carries ``X-Kandinsky-Replica``, the ingress replica that gave it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..jobs import Job
from ..server.config import ServerConfig
from ..server.worker import FAILED, Task
from .remote import RemoteEngine

STORE = "jobs"  # the deployment-scoped actor's name
CALL_TIMEOUT = 60.0  # seconds for a call to the store (it answers in milliseconds unless it is gone)


def _unwrap(exc: BaseException) -> BaseException:
    """The store's own exception (``QueueFull``...) inside a Ray task error."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class ProxyTask(Task):
    """A job as the store last described it, with the :class:`~kandinsky.server.worker.Task` interface the routes
    use (``summary``, ``response``, ``events_since``, ``watch``, ``wait``)."""

    def __init__(self, worker: ProxyWorker, snap: dict[str, Any]) -> None:  # no Task.__init__: nothing local
        self._worker = worker
        self._lock = threading.Lock()
        self._watches: set[Any] = set()
        self._events: list[tuple[int, str, dict[str, Any]]] | None = None
        self.apply(snap)

    def apply(self, snap: dict[str, Any]) -> None:
        """Take a newer description from the store (events are appended where they continue)."""
        for key, value in snap.items():
            if key not in ("events", "since", "seed"):
                setattr(self, key, value)
        self.job = Job(mode=snap["mode"], seed=snap["seed"])
        if "events" in snap:
            new = [tuple(e) for e in snap["events"]]
            since = snap.get("since", 0)
            with self._lock:
                if self._events is None or since == 0:
                    self._events = new if since == 0 else None
                else:
                    self._events = self._events[:since] + new

    @property
    def events(self) -> list[tuple[int, str, dict[str, Any]]]:  # type: ignore[override]
        """Every event so far (fetched from the store on first use)."""
        if self._events is None:
            snap = self._worker._call("get", self.id, True)
            if snap is not None:
                self.apply(snap)
        return list(self._events or [])

    def events_since(self, index: int) -> list[tuple[int, str, dict[str, Any]]]:
        """Events numbered ``index`` and later."""
        return self.events[index:]

    @contextlib.contextmanager
    def watch(self) -> Iterator[RemoteWatch]:
        """Wake-ups on new events (long polls on the store)."""
        yield RemoteWatch(self)

    async def wait(self, poll: float = 30.0) -> None:
        """Wait until the job has finished (done, failed or cancelled)."""
        while not self.finished_state:
            snap = await self._worker._acall("follow", self.id, 0, poll, True)
            if snap is None:
                self.state, self.status, self.error = FAILED, 500, "the job store no longer knows this job"
                return
            self.apply(snap)


class RemoteWatch:
    """:class:`~kandinsky.server.worker.Watch` for a :class:`ProxyTask`: ``wait`` returns at the next event."""

    def __init__(self, task: ProxyTask) -> None:
        self.task = task

    async def wait(self, timeout: float) -> None:
        """Return when the store has events beyond those seen, or after ``timeout`` seconds."""
        task = self.task
        known = len(task._events) if task._events is not None else 0
        snap = await task._worker._acall("follow", task.id, known, timeout)
        if snap is None:
            task.state, task.status, task.error = FAILED, 500, "the job store no longer knows this job"
            return
        task.apply(snap)


class ProxyWorker:
    """The :class:`~kandinsky.server.worker.Worker` interface the routes use, answered by the job store actor."""

    def __init__(self, config: ServerConfig, store: Any = None) -> None:
        self.config = config
        self._store = store
        self._engine = RemoteEngine()
        self._status: tuple[Any, dict[str, Any]] | None = None

    # ------------------------------------------------------------------ the store

    def _actor(self) -> Any:
        if self._store is None:
            from ray import serve

            deadline = time.monotonic() + CALL_TIMEOUT
            while True:
                try:
                    self._store = serve.get_deployment_actor(STORE)
                    break
                except ValueError:  # being (re)created
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        return self._store

    def _call(self, method: str, *args: Any) -> Any:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        for attempt in range(2):
            try:
                return ray.get(getattr(self._actor(), method).remote(*args), timeout=CALL_TIMEOUT)
            except RayTaskError as exc:
                raise _unwrap(exc) from None
            except RayActorError:
                if attempt:
                    raise
                self._store = None  # restarted by Serve: look it up again
        raise AssertionError("unreachable")

    async def _acall(self, method: str, *args: Any) -> Any:
        from ray.exceptions import RayActorError, RayTaskError

        for attempt in range(2):
            try:
                return await getattr(self._actor(), method).remote(*args)
            except RayTaskError as exc:
                raise _unwrap(exc) from None
            except RayActorError:
                if attempt:
                    raise
                self._store = None
        raise AssertionError("unreachable")

    def _state(self) -> dict[str, Any]:
        """The store's status, asked once per request (the asyncio task that handles it): ``/healthz`` reads
        four values of one status, a submission two (``draining``, ``ready``), and a later request never sees an
        older one."""
        try:
            owner = asyncio.current_task()
        except RuntimeError:
            owner = None
        if owner is None or self._status is None or self._status[0] is not owner:
            self._status = (owner, self._call("status"))
        return self._status[1]

    # ------------------------------------------------------------------ the Worker interface

    def __getattr__(self, name: str) -> Any:
        """Any other plain attribute of the worker (``draining``...), read from the store's."""
        if name.startswith("_"):
            raise AttributeError(name)
        return self._call("attribute", name)

    def start(self) -> None:
        """Nothing to start: the store runs the jobs."""

    def stop(self, timeout: float = 10.0) -> None:
        """Nothing to stop: jobs belong to the store, not to this replica (one replica stopping, when Serve scales
        the ingress down, must not stop the others' jobs)."""

    def drain(self, grace: float = 0.0) -> None:
        """Nothing to drain, for the same reason."""

    @property
    def engine(self) -> RemoteEngine:
        """The model's description (for planning and ``info``), fetched once it is loaded."""
        if self._engine.description is None:
            description = self._call("describe")
            if description is not None:
                self._engine.apply(description)
        return self._engine

    @property
    def draining(self) -> bool:
        """True once the store's worker has begun to stop (no new jobs are taken)."""
        return bool(self._state().get("draining"))

    @property
    def model_state(self) -> str:
        return self._state()["model"]

    @property
    def model_error(self) -> str | None:
        return self._state()["error"]

    @property
    def counts(self) -> dict[str, int]:
        return self._state()["counts"]

    @property
    def ready(self) -> bool:
        """True once the model is loaded."""
        return self.model_state == "ready"

    def queue_info(self) -> dict[str, Any]:
        """Queue length, capacity, the running jobs and the slots (for /healthz)."""
        return self._state()["queue"]

    def submit(self, job: Job, kind: str = "v1") -> ProxyTask:
        """Queue a job in the store (``QueueFull`` when full)."""
        self._status = None
        return ProxyTask(self, self._call("submit", job, kind))

    def get(self, job_id: str) -> ProxyTask | None:
        """A job by id (None when unknown or forgotten)."""
        snap = self._call("get", job_id)
        return None if snap is None else ProxyTask(self, snap)

    @property
    def jobs(self) -> dict[str, ProxyTask]:
        """Every job the store remembers (without results)."""
        return {s["id"]: ProxyTask(self, s) for s in self._call("jobs")}

    def position(self, task: ProxyTask) -> int | None:
        """The queue position the store gave with the task."""
        return task.position

    def cancel(self, task: ProxyTask) -> None:
        """Cancel a job (queued: now; running: at its next step)."""
        snap = self._call("cancel", task.id)
        if snap is not None:
            task.apply(snap)

    @property
    def current(self) -> ProxyTask | None:
        """The longest-running job."""
        snap = self._call("current")
        return None if snap is None else ProxyTask(self, snap)


class ReplicaHeader:
    """ASGI middleware: ``X-Kandinsky-Replica: NAME`` on every answer."""

    def __init__(self, app: Any, name: str) -> None:
        self.app, self.value = app, name.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-kandinsky-replica", self.value)]}
            await send(message)

        await self.app(scope, receive, tagged)


def create_app(config: ServerConfig, worker: ProxyWorker, replica: str = "") -> Any:
    """The ``kandinsky serve`` application (:func:`kandinsky.server.app.create_app`) on ``worker``, each answer
    tagged with ``replica``."""
    from ..server import app as server_app

    app = server_app.create_app(config, worker._engine, worker=worker)
    if replica:
        app.add_middleware(ReplicaHeader, name=replica)
    return app


class IngressReplica:
    """An ingress replica (wrapped by ``@serve.ingress()``; the application is built in the replica).
    ``model``: the model deployment's handle (unused here: binding it makes it part of the application)."""

    def __init__(self, model: Any, config: ServerConfig) -> None:
        self.config = config

    def __serve_build_asgi_app__(self) -> Any:
        from ray import serve

        replica = serve.get_replica_context().replica_id.unique_id
        return create_app(self.config, ProxyWorker(self.config), replica)
