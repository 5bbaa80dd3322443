"""What the Ray front ends share: the optional import of Ray, connecting to a cluster, threads per worker.

Nothing here imports Ray at module import time: :func:`require_ray` does, on first use, and turns a missing
installation into one clear line.
"""

from __future__ import annotations

import os
from typing import Any

from ..jobs import Unavailable

INSTALL_HINT = "pip install 'kandinsky[ray]'"


class RayUnavailable(Unavailable):
    """Ray (with Serve and Data) is not installed."""


def require_ray(what: str = "kandinsky.ray") -> Any:
    """The ``ray`` module (with ``ray.serve`` and ``ray.data`` importable), or :class:`RayUnavailable` saying how to
    install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - checked here, used by callers
        import ray.serve  # noqa: F401
    except ModuleNotFoundError as exc:
        missing = exc.name or "ray"
        raise RayUnavailable(f"{what} needs Ray with Serve and Data (the '{missing}' package is missing): "
                             f"{INSTALL_HINT}") from None
    return ray


WORKER_NICENESS = 0  # the niceness of the workers of a cluster this package starts (Ray's own default: 15)


def connect(address: str | None = None, *, num_cpus: float | None = None, temp_dir: str | None = None,
            quiet: bool = True, worker_niceness: int | None = WORKER_NICENESS) -> bool:
    """Connect this process to Ray: ``address`` ``auto`` (a cluster started with ``ray start`` on this machine),
    ``ray://HOST:10001`` (Ray Client) or ``HOST:PORT`` (the GCS address); None starts a local cluster (with
    ``num_cpus``). Returns True when this call started (and so owns) the cluster; nothing is done when this
    process is already connected.

    A local cluster's workers (model replicas, the HTTP proxy, Ray Data actors) run at ``worker_niceness`` (0: the
    priority of ``kandinsky serve`` and of any other program; None: Ray's default of 15, under which every other
    busy process on the machine takes the CPU from the model first). A cluster started with ``ray start`` keeps
    its own setting (``RAY_worker_niceness=0 ray start ...`` to change it)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": "WARNING" if quiet else "INFO", "log_to_driver": not quiet,
                              "ignore_reinit_error": True}
    if address:
        ray.init(address=address, **kwargs)
        return False
    if num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    if temp_dir is not None:
        kwargs["_temp_dir"] = temp_dir
    if worker_niceness is not None:
        kwargs["_system_config"] = {"worker_niceness": int(worker_niceness)}
    ray.init(include_dashboard=False, **kwargs)
    return True


def default_threads(num_cpus: float, num_gpus: float = 0.0) -> int:
    """Threads per model worker when none are given: its whole CPUs (at least 1)."""
    return max(1, int(num_cpus))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads for this process (Ray starts actors with ``OMP_NUM_THREADS`` = their whole CPUs,
    1 for fractional ones, which torch would otherwise follow); returns the count in use."""
    import torch

    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for libraries that read it later
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()
