"""Scaling out on Ray (``pip install 'kandinsky[ray]'``): ``kandinsky serve`` on Ray Serve, batches on Ray Data.

* :func:`build_app` / :class:`ServeOptions` (:mod:`.app`): the same HTTP API as ``kandinsky serve`` (``/v1``,
  ``/sdapi/v1``, ``/healthz``, the page) from ingress replicas, with the model in a deployment whose replicas each
  own one pipeline. Jobs live in one job store actor (:mod:`.store`) that every ingress replica reads
  (:mod:`.ingress`); replicas report progress to it (:mod:`.model`); compatible requests may be batched
  (:mod:`.batching`). ``kandinsky ray serve`` deploys it; ``deploy/serve_config.yaml`` does with ``serve run``.
* :func:`generate_dataset` (:mod:`.data`): a prompts file rendered by a pool of actors into PNGs and a
  manifest, resumable and exactly once per image. ``kandinsky ray batch`` runs it.

This package imports without Ray; Ray is imported when one of these is used (:func:`.common.require_ray` says how
to install it when it is missing). docs/ray.md explains the deployment.
"""

from __future__ import annotations

from typing import Any

from .common import INSTALL_HINT, RayUnavailable, require_ray

__all__ = ["INSTALL_HINT", "RayUnavailable", "ServeOptions", "app_builder", "build_app", "generate_dataset",
           "require_ray"]

_LAZY = {"ServeOptions": "app", "build_app": "app", "app_builder": "app", "generate_dataset": "data"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
