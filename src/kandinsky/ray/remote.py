"""The model as seen from outside its replicas: a :class:`~kandinsky.server.engine.PipelineEngine` whose pipeline
is a description (defaults, compat, latent-to-RGB maps) and whose ``run`` calls the model deployment.

The server's worker needs an engine that can ``plan`` a job (resolved sizes and steps, for limits and progress),
describe the model (``info``), make previews from latents and ``run`` jobs. :class:`RemoteEngine` does the first
three with :class:`PipelineEngine`'s own code on a :class:`PlanPipe` (the replica's :func:`describe`), and the
last through the Serve deployment handle; progress comes back through :meth:`RemoteEngine.report`.
"""

from __future__ import annotations

import secrets
import threading
from typing import Any

from ..jobs import Job, ModelChoice
from ..server.engine import PipelineEngine, Report, fit_latent_rgb

PARTS = ("decoder", "inpaint")


class ReplicaLost(RuntimeError):
    """The model replica running a job stopped before answering (a crash, a killed process, a lost node)."""


class PlanPipe:
    """What planning, ``info`` and previews read from a pipeline, without its weights: the folders' recorded
    defaults, ``compat``, whether an inpainting model is there, the device and dtype (see :func:`describe`)."""

    def __init__(self, description: dict[str, Any]) -> None:
        self.compat = description["compat"]
        self.device, self.dtype = description["device"], description["dtype"]
        self.inpaint_model = True if description["inpaint"] else None
        self._defaults = description["defaults"]

    @property
    def original(self) -> bool:
        """As :attr:`Kandinsky21.original`."""
        return self.compat == "original"

    def defaults(self, part: str = "decoder") -> dict[str, Any]:
        """As :meth:`Kandinsky21.defaults`."""
        return dict(self._defaults.get(part) or {})

    def resolve(self, part: str, preset: str | None = None, **given: Any) -> dict[str, Any]:
        """:meth:`Kandinsky21.resolve` itself, on these defaults."""
        from ..pipeline import Kandinsky21

        return Kandinsky21.resolve(self, part, preset, **given)  # type: ignore[arg-type]


def describe(engine: PipelineEngine) -> dict[str, Any]:
    """What a :class:`RemoteEngine` needs to know of a loaded engine's model (plain data, sent between processes).
    Fits the latent-to-RGB preview maps now if the engine has not yet."""
    import torch

    pipe = engine.pipe
    for part in PARTS:
        parts = pipe.decoder if part == "decoder" else pipe.inpaint_model
        if parts is not None and part not in engine._rgb:
            engine._rgb[part] = fit_latent_rgb(parts.movq, pipe.device, pipe.dtype)
    return {"model": dict(engine.model), "compat": pipe.compat, "device": str(pipe.device),
            "dtype": str(pipe.dtype).removeprefix("torch."), "inpaint": pipe.inpaint_model is not None,
            "defaults": {"decoder": pipe.defaults("decoder"), "prior": pipe.defaults("prior")},
            "rgb": {k: v.tolist() for k, v in engine._rgb.items()}, "threads": torch.get_num_threads()}


class RemoteEngine(PipelineEngine):
    """The server's :class:`~kandinsky.server.engine.Engine` for a model that lives in a Serve deployment.

    ``handle``: a callable returning the deployment handle (resolved lazily, in the process that runs jobs);
    ``store``: the actor handle the replicas report progress to. Without them (the ingress side) it can only
    plan and describe, from a description given to :meth:`apply`.
    """

    def __init__(self, handle: Any = None, store: Any = None) -> None:
        super().__init__(ModelChoice())
        self._handle, self._store = handle, store
        self.description: dict[str, Any] | None = None
        self.reports: dict[str, Report] = {}
        self.placements: dict[str, dict[str, Any]] = {}  # running job id -> the replica running it
        self._jobs: dict[str, str] = {}  # run key -> job id
        self._load_lock = threading.Lock()

    def apply(self, description: dict[str, Any]) -> None:
        """Take a replica's :func:`describe` as this engine's model."""
        import torch

        self._rgb = {k: torch.tensor(v) for k, v in description["rgb"].items()}
        self.model = dict(description["model"])
        self.pipe = PlanPipe(description)
        self.description = description

    def load(self) -> None:
        """Ask a replica to describe the model (waits until one is up; once for all worker threads)."""
        with self._load_lock:
            if self.description is None:
                self.apply(self._handle().describe.remote().result())

    def info(self) -> dict[str, Any]:
        """:meth:`PipelineEngine.info`, with the threads per replica."""
        out = super().info()
        if self.description is not None:
            out["threads_per_replica"] = self.description.get("threads")
        return out

    def run(self, job: Job, report: Report) -> list[tuple[Any, dict[str, Any]]]:
        """Run a job on a replica; its progress arrives through :meth:`report`. A replica that dies mid-job fails
        the job with :class:`ReplicaLost` (not retried: a job that kills its replica would kill the next one)."""
        from ray.exceptions import RayTaskError

        from ..server.worker import JobCancelled

        key = secrets.token_hex(8)
        self.reports[key] = report
        task = getattr(report, "task", None)  # the worker's Progress knows its task
        if task is not None:
            self._jobs[key] = task.id
        try:
            every = getattr(report, "every", None)  # the worker's Progress: its preview period
            return self._handle().run.remote(job, key, self._store, every).result()
        except RayTaskError as exc:  # the replica's code raised: raise that error itself
            cause = exc.cause if isinstance(exc.cause, BaseException) else None
            if isinstance(cause, JobCancelled) or type(cause).__name__ == "JobCancelled":
                raise JobCancelled() from None
            if cause is None:
                raise
            raise cause from None
        except Exception as exc:  # noqa: BLE001 - anything else means the replica is gone
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ReplicaLost(f"the model replica running this job stopped ({type(exc).__name__}: {first}); "
                              "the job was not retried, submit it again") from None
        finally:
            self.reports.pop(key, None)
            self.placements.pop(self._jobs.pop(key, ""), None)

    def report(self, key: str, stage: str, done: int, total: int, latents: Any = None,
               where: dict[str, Any] | None = None) -> bool:
        """Progress from a replica (``where``: which one; ``latents`` a tensor or a numpy array); False tells it to
        stop (the job was cancelled, or is unknown here)."""
        from ..server.worker import JobCancelled

        target = self.reports.get(key)
        if target is None:
            return False
        if latents is not None and not hasattr(latents, "detach"):  # numpy, as StoreReporter sends it
            import torch

            latents = torch.tensor(latents)  # a copy: what Ray hands over may be read-only
        if where is not None and key in self._jobs:
            self.placements[self._jobs[key]] = where
        try:
            target(stage, done, total, latents)
        except JobCancelled:
            return False
        return True
