"""The model deployment: each replica owns one pipeline (a :class:`~kandinsky.server.engine.PipelineEngine`) and
runs jobs sent by the job store, reporting every sampler step back to it.

Progress: steps go to the store's ``report`` without waiting for it, one call in flight at a time (so that they
arrive in order), several steps in one call when they come faster than :attr:`StoreReporter.interval` or while
the previous call is on its way: the store still sees every step, in order, and a 25 ms step of a small model does
not pay for an actor call each. Decoder steps the store will preview carry the first latent row. When an answer
says the job was cancelled, the run stops at its next step.
With ``max_batch_size`` > 1, compatible txt2img jobs arriving together (within ``batch_wait_timeout_s``) share one
decoder loop through ``@serve.batch`` (:mod:`kandinsky.ray.batching`); other jobs run alone, one at a time.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from typing import Any

from ..jobs import Job, ModelChoice
from ..server.engine import PipelineEngine
from .batching import batch_key, run_batched
from .common import set_threads
from .remote import describe


class _Cancelled:
    """A batched caller's result when it was cancelled mid-batch (``@serve.batch`` results cannot raise)."""


class StoreReporter:
    """The replica side of progress: sends steps to the job store without waiting for it, one call in flight at a
    time (an asynchronous actor does not run calls in the order they were sent; one at a time, they arrive in
    order), and raises ``JobCancelled`` at the first step after the store has answered that the job was cancelled.

    Steps that come while a call is in flight, or sooner than :attr:`interval` after the last call, wait for the
    next one; the first step and the last of each sampling loop go as soon as nothing is in flight. So a slow
    model reports each step at once, and a 25 ms step of a small one does not pay for an actor call each.
    :meth:`flush` sends what is left and waits until the store has taken it (before the result goes back).

    ``preview_every``: the store's preview period (its ``Progress.every``: 0 for about ten per loop), so that only
    the decoder steps it makes a preview of carry a latent row (copied off the device, as a float32 numpy array);
    None sends one with every decoder step."""

    wants_latents = True
    interval = 0.1  # seconds: steps closer together than this share one call

    def __init__(self, store: Any, key: str, where: dict[str, Any] | None = None,
                 preview_every: int | None = None, interval: float | None = None) -> None:
        self.store, self.key, self.where = store, key, where
        self.preview_every = preview_every
        if interval is not None:
            self.interval = float(interval)
        self.cancelled = False
        self.calls = 0  # report calls made (for tests and benchmarks)
        self._in_flight: Any = None  # the answer of the call on its way
        self._steps: list[tuple[str, int, int, Any]] = []
        self._sent: float | None = None  # time of the last call

    def wants_row(self, stage: str, done: int, total: int) -> bool:
        """True when the store makes a preview of this step (and so needs its latents)."""
        if stage != "decoder":
            return False
        if self.preview_every is None:
            return True
        every = self.preview_every or max(1, total // 10)  # the store's Progress rule
        return done < total and done % every == 0

    def __call__(self, stage: str, done: int, total: int, latents: Any = None) -> None:
        from ..server.worker import JobCancelled

        self._collect()
        if self.cancelled:
            raise JobCancelled()
        if self.store is None:
            return
        row = None
        if getattr(latents, "ndim", 0) == 4 and self.wants_row(stage, done, total):
            row = latents[:1].detach().float().cpu().clone().numpy()  # numpy travels without torch's pickling
        self._steps.append((stage, done, total, row))
        now = time.monotonic()
        if self._in_flight is None and (self._sent is None or done >= total or now - self._sent >= self.interval):
            self._send(now)

    def _send(self, now: float) -> None:
        steps, self._steps = self._steps, []
        where, self.where = self.where, None  # sent with the first call only
        self._in_flight = self.store.report.remote(self.key, steps, where)
        self._sent = now
        self.calls += 1

    def _collect(self, timeout: float = 0.0) -> None:
        """Take the answer of the call in flight if it has come (waiting up to ``timeout`` seconds); False:
        cancelled."""
        if self._in_flight is None:
            return
        import ray

        ready, _ = ray.wait([self._in_flight], timeout=timeout)
        if ready:
            self._in_flight = None
            if not ray.get(ready[0]):
                self.cancelled = True

    def flush(self) -> None:
        """Send the steps not sent yet and wait until the store has taken every report (so that they come before
        the job's end). Never raises: a store that is gone only loses the progress."""
        from ray.exceptions import RayError

        try:
            self._collect(timeout=60)
            if self._steps and self.store is not None and self._in_flight is None:
                self._send(time.monotonic())
                self._collect(timeout=60)
        except RayError:
            pass


def _replica_id() -> str | None:
    """This Serve replica's id (None outside Serve)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a replica (tests, direct use)
        return None


class ModelReplica:
    """One Serve replica: loads the model once (``choice``) with ``threads`` torch threads, then runs jobs
    (reporting progress at most every ``progress_interval_s`` seconds while a loop's steps come faster)."""

    def __init__(self, choice: ModelChoice | None = None, threads: int | None = None, max_batch_size: int = 1,
                 batch_wait_timeout_s: float = 0.05, progress_interval_s: float = StoreReporter.interval) -> None:
        self.threads = set_threads(threads)
        self.progress_interval_s = progress_interval_s
        self.engine = PipelineEngine(choice or ModelChoice())
        self.engine.load()
        self.description = describe(self.engine)
        self.where = {"replica": _replica_id(), "pid": os.getpid()}
        self.description["pid"] = os.getpid()
        self.batch_sizes: Counter[int] = Counter()
        self.run_threads: int | None = None  # torch threads seen by the last job's thread
        self.report_calls = 0  # progress calls to the job store so far
        self.busy_s = 0.0  # seconds in pipeline calls so far
        self.busy_cpu_s = 0.0  # CPU seconds of the threads that made them
        self._batched = None
        if max_batch_size > 1:
            from ray import serve

            self._batched = serve.batch(max_batch_size=max_batch_size,
                                        batch_wait_timeout_s=batch_wait_timeout_s)(self._run_batch)

    def describe(self) -> dict[str, Any]:
        """The model, as :class:`~kandinsky.ray.remote.RemoteEngine` needs it (and this replica's pid)."""
        return self.description

    def stats(self) -> dict[str, Any]:
        """Batch sizes run so far (``{size: count}``), the pid, the thread count (as set, and as seen by the
        thread that ran the last job), the progress calls made to the job store and the seconds spent in
        pipeline calls, wall and CPU (what a request's time through Serve is compared with)."""
        return {"batch_sizes": dict(self.batch_sizes), "pid": os.getpid(), "threads": self.threads,
                "run_threads": self.run_threads, "report_calls": self.report_calls, "busy_s": self.busy_s,
                "busy_cpu_s": self.busy_cpu_s}

    async def run(self, job: Job, key: str, store: Any, preview_every: int | None = None
                  ) -> list[tuple[Any, dict[str, Any]]]:
        """Run one job, reporting progress to ``store`` under ``key`` (latents for the store's previews, made
        every ``preview_every`` decoder steps; see :class:`StoreReporter`); (image, record) pairs."""
        from ..server.worker import JobCancelled

        if self._batched is not None and batch_key(self.engine.pipe, job) is not None:
            out = await self._batched((job, key, store, preview_every))
            if isinstance(out, _Cancelled):
                raise JobCancelled()
            return out
        return await asyncio.to_thread(self._run_one, job, key, store, preview_every)

    def _run_one(self, job: Job, key: str, store: Any, preview_every: int | None = None
                 ) -> list[tuple[Any, dict[str, Any]]]:
        import torch

        self.batch_sizes[1] += 1
        self.run_threads = torch.get_num_threads()  # in the thread that runs the job, not the constructor's
        reporter = StoreReporter(store, key, self.where, preview_every, self.progress_interval_s)
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return [tuple(o) for o in self.engine.run(job, reporter)]
        finally:
            self.busy_s += time.perf_counter() - start
            self.busy_cpu_s += time.thread_time() - cpu
            reporter.flush()
            self.report_calls += reporter.calls

    async def _run_batch(self, items: list[tuple[Job, str, Any, int | None]]) -> list[Any]:
        return await asyncio.to_thread(self._run_groups, items)

    def _run_groups(self, items: list[tuple[Job, str, Any, int | None]]) -> list[Any]:
        """Group compatible jobs and run each group with one decoder loop (a group of one runs alone)."""
        import torch

        from ..server.worker import JobCancelled

        self.run_threads = torch.get_num_threads()
        groups: dict[Any, list[int]] = {}
        for i, (job, *_) in enumerate(items):
            groups.setdefault(batch_key(self.engine.pipe, job), []).append(i)
        results: list[Any] = [None] * len(items)
        for members in groups.values():
            if len(members) == 1:
                i = members[0]
                try:
                    results[i] = self._run_one(*items[i])
                except JobCancelled:
                    results[i] = _Cancelled()
                continue
            reporters = [StoreReporter(items[i][2], items[i][1], self.where, items[i][3], self.progress_interval_s)
                         for i in members]

            def progress(j: int, stage: str, done: int, total: int, latents: Any,
                         reporters: list[StoreReporter] = reporters) -> None:
                try:
                    reporters[j](stage, done, total, latents)
                except JobCancelled:  # the others go on; this caller's images are dropped at the end
                    pass

            self.batch_sizes[len(members)] += 1
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                with self.engine._lock:  # the engine's own lock: one pipeline call at a time
                    outputs = run_batched(self.engine.pipe, [items[i][0] for i in members], self.engine.model,
                                          progress)
            finally:
                self.busy_s += time.perf_counter() - start
                self.busy_cpu_s += time.thread_time() - cpu
                for reporter in reporters:
                    reporter.flush()
                    self.report_calls += reporter.calls
            for j, i in enumerate(members):
                results[i] = _Cancelled() if reporters[j].cancelled else [tuple(o) for o in outputs[j]]
        return results
