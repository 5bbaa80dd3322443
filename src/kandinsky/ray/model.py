"""The model deployment: each replica owns one pipeline (a :class:`~kandinsky.server.engine.PipelineEngine`) and
runs jobs sent by the job store, reporting every sampler step back to it.

Progress: each step is sent to the store's ``report`` (one small actor call, not waited for; decoder steps carry the
first latent row, for previews); when an answer says the job was cancelled, the run stops at its next step.
With ``max_batch_size`` > 1, compatible txt2img jobs arriving together (within ``batch_wait_timeout_s``) share one
decoder loop through ``@serve.batch`` (:mod:`kandinsky.ray.batching`); other jobs run alone, one at a time.
"""

from __future__ import annotations

import asyncio
import os
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
    """The replica side of progress: sends each step to the job store without waiting for it (the store runs
    them in order), and raises ``JobCancelled`` at the first step after the store has answered that the job was
    cancelled. :meth:`flush` waits for the reports still on their way (before the result goes back)."""

    wants_latents = True
    most_pending = 8  # reports in flight before a step waits for the oldest (if the store falls behind)

    def __init__(self, store: Any, key: str, where: dict[str, Any] | None = None) -> None:
        self.store, self.key, self.where = store, key, where
        self.cancelled = False
        self._pending: list[Any] = []

    def __call__(self, stage: str, done: int, total: int, latents: Any = None) -> None:
        import ray

        from ..server.worker import JobCancelled

        if self._pending:
            ready, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)
            if len(self._pending) >= self.most_pending:
                ready.append(self._pending.pop(0))
            if not all(ray.get(ready)):
                self.cancelled = True
        if self.cancelled:
            raise JobCancelled()
        row = None
        if stage == "decoder" and getattr(latents, "ndim", 0) == 4:
            row = latents[:1].detach().float().cpu().clone()
        if self.store is not None:
            where, self.where = self.where, None  # sent with the first step only
            self._pending.append(self.store.report.remote(self.key, stage, done, total, row, where))

    def flush(self) -> None:
        """Wait until the store has taken every report sent (so that they come before the job's end)."""
        import ray

        pending, self._pending = self._pending, []
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=60)


def _replica_id() -> str | None:
    """This Serve replica's id (None outside Serve)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a replica (tests, direct use)
        return None


class ModelReplica:
    """One Serve replica: loads the model once (``choice``) with ``threads`` torch threads, then runs jobs."""

    def __init__(self, choice: ModelChoice | None = None, threads: int | None = None, max_batch_size: int = 1,
                 batch_wait_timeout_s: float = 0.05) -> None:
        self.threads = set_threads(threads)
        self.engine = PipelineEngine(choice or ModelChoice())
        self.engine.load()
        self.description = describe(self.engine)
        self.where = {"replica": _replica_id(), "pid": os.getpid()}
        self.description["pid"] = os.getpid()
        self.batch_sizes: Counter[int] = Counter()
        self._batched = None
        if max_batch_size > 1:
            from ray import serve

            self._batched = serve.batch(max_batch_size=max_batch_size,
                                        batch_wait_timeout_s=batch_wait_timeout_s)(self._run_batch)

    def describe(self) -> dict[str, Any]:
        """The model, as :class:`~kandinsky.ray.remote.RemoteEngine` needs it (and this replica's pid)."""
        return self.description

    def stats(self) -> dict[str, Any]:
        """Batch sizes run so far (``{size: count}``), the pid and the thread count."""
        return {"batch_sizes": dict(self.batch_sizes), "pid": os.getpid(), "threads": self.threads}

    async def run(self, job: Job, key: str, store: Any) -> list[tuple[Any, dict[str, Any]]]:
        """Run one job, reporting progress to ``store`` under ``key``; (image, record) pairs."""
        from ..server.worker import JobCancelled

        if self._batched is not None and batch_key(self.engine.pipe, job) is not None:
            out = await self._batched((job, key, store))
            if isinstance(out, _Cancelled):
                raise JobCancelled()
            return out
        return await asyncio.to_thread(self._run_one, job, key, store)

    def _run_one(self, job: Job, key: str, store: Any) -> list[tuple[Any, dict[str, Any]]]:
        self.batch_sizes[1] += 1
        reporter = StoreReporter(store, key, self.where)
        try:
            return [tuple(o) for o in self.engine.run(job, reporter)]
        finally:
            reporter.flush()

    async def _run_batch(self, items: list[tuple[Job, str, Any]]) -> list[Any]:
        return await asyncio.to_thread(self._run_groups, items)

    def _run_groups(self, items: list[tuple[Job, str, Any]]) -> list[Any]:
        """Group compatible jobs and run each group with one decoder loop (a group of one runs alone)."""
        from ..server.worker import JobCancelled

        groups: dict[Any, list[int]] = {}
        for i, (job, _, _) in enumerate(items):
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
            reporters = [StoreReporter(items[i][2], items[i][1], self.where) for i in members]

            def progress(j: int, stage: str, done: int, total: int, latents: Any,
                         reporters: list[StoreReporter] = reporters) -> None:
                try:
                    reporters[j](stage, done, total, latents)
                except JobCancelled:  # the others go on; this caller's images are dropped at the end
                    pass

            self.batch_sizes[len(members)] += 1
            try:
                with self.engine._lock:  # the engine's own lock: one pipeline call at a time
                    outputs = run_batched(self.engine.pipe, [items[i][0] for i in members], self.engine.model,
                                          progress)
            finally:
                for reporter in reporters:
                    reporter.flush()
            for j, i in enumerate(members):
                results[i] = _Cancelled() if reporters[j].cancelled else [tuple(o) for o in outputs[j]]
        return results
