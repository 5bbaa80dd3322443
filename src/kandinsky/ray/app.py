"""The Ray Serve application: ``kandinsky serve``'s HTTP API in front of a model deployment of N replicas.

Deployments (one application, default name ``kandinsky``):

* ``KandinskyServer`` — the ingress: the ``kandinsky serve`` FastAPI application (``@serve.ingress``), with the
  job store as a deployment-scoped actor (:mod:`kandinsky.ray.ingress`, :mod:`kandinsky.ray.store`);
* ``KandinskyModel`` — the model: each replica owns one pipeline (:mod:`kandinsky.ray.model`), ``num_replicas``
  fixed or autoscaled between a minimum and a maximum, with CPUs, GPUs and threads per replica.

:func:`build_app` makes the application from :class:`ServeOptions`; :func:`app_builder` is the import path for
``serve run`` / ``serve deploy`` configs (``kandinsky.ray.app:app_builder``, see deploy/serve_config.yaml).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..jobs import ModelChoice
from ..server.config import API_KEY_ENV, Limits, ServerConfig
from .common import default_threads, require_ray

APP_NAME = "kandinsky"
MODEL_DEPLOYMENT = "KandinskyModel"
INGRESS_DEPLOYMENT = "KandinskyServer"


@dataclass
class ServeOptions:
    """How to deploy: the model, the server's settings (limits, queue, API key) and the replicas.

    ``replicas`` is a fixed count; ``min_replicas``/``max_replicas`` (both given) autoscale instead, on the jobs
    waiting per replica. ``threads_per_replica`` defaults to the whole CPUs of a replica (at least 1).
    ``max_batch_size`` > 1 batches compatible txt2img requests (default: 1, off, on CPU replicas; 4 on GPU
    replicas), waiting up to ``batch_wait_timeout_s`` for a batch to fill. ``progress_interval_s``: a replica's
    sampler steps closer together than this reach the job store in one call (see
    :class:`~kandinsky.ray.model.StoreReporter`).
    """

    model: ModelChoice = field(default_factory=ModelChoice)
    server: ServerConfig = field(default_factory=ServerConfig)
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    threads_per_replica: int | None = None
    max_batch_size: int | None = None
    batch_wait_timeout_s: float = 0.05
    progress_interval_s: float = 0.1
    ingress_replicas: int = 1
    num_cpus_per_ingress: float = 0.1
    max_ongoing_per_ingress: int = 256  # open requests per ingress replica (waiting ones and event streams count)

    def validate(self) -> ServeOptions:
        """Check the counts; returns self. Raises ValueError naming the option."""
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both --min-replicas and --max-replicas (autoscaling), or --replicas")
        for name in ("replicas", "ingress_replicas", "max_ongoing_per_ingress"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.autoscaling and not (0 <= self.min_replicas <= self.max_replicas and self.max_replicas >= 1):
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                             f"{self.min_replicas} and {self.max_replicas}")
        for name in ("num_cpus_per_replica", "num_gpus_per_replica", "num_cpus_per_ingress", "batch_wait_timeout_s",
                     "progress_interval_s"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.threads_per_replica is not None and self.threads_per_replica < 1:
            raise ValueError(f"threads_per_replica must be at least 1, got {self.threads_per_replica}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        return self

    @property
    def autoscaling(self) -> bool:
        """True when the replica count is a range."""
        return self.max_replicas is not None

    def threads(self) -> int:
        """Torch threads per model replica."""
        return self.threads_per_replica or default_threads(self.num_cpus_per_replica, self.num_gpus_per_replica)

    def batch_size(self) -> int:
        """Requests batched together (1: no batching)."""
        if self.max_batch_size is not None:
            return int(self.max_batch_size)
        return 4 if self.num_gpus_per_replica > 0 else 1

    def slots(self) -> int:
        """Jobs the job store sends to the model deployment at once: every replica busy (at the maximum scale),
        each with a full batch."""
        return (self.max_replicas if self.autoscaling else self.replicas) * self.batch_size()

    def model_deployment_options(self) -> dict[str, Any]:
        """``serve.deployment`` options of the model deployment."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus_per_replica}
        if self.num_gpus_per_replica:
            actor["num_gpus"] = self.num_gpus_per_replica
        out: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": self.batch_size(),
                               "health_check_period_s": 10, "graceful_shutdown_timeout_s": 20,
                               "max_constructor_retry_count": 3}  # a model that cannot load fails the deploy soon
        if self.autoscaling:
            out["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                         "initial_replicas": max(1, self.min_replicas or 0),
                                         "target_ongoing_requests": self.batch_size(),
                                         "upscale_delay_s": 5, "downscale_delay_s": 120}
        else:
            out["num_replicas"] = self.replicas
        return out

    @classmethod
    def from_mapping(cls, args: Mapping[str, Any]) -> ServeOptions:
        """From one flat mapping of option names (a serve config's ``args``): these fields, the model's
        (``model``, ``prior``, ``device``, ``dtype``...), the server's (``queue_size``, ``api_key``, ``keep_jobs``,
        ``preview_every``, ``lora_dir``...) and the limits (``max_pixels``...). Unknown names are refused."""
        own = {f.name for f in fields(cls)} - {"model", "server"}
        model_keys = {f.name for f in fields(ModelChoice)}
        server_keys = {f.name for f in fields(ServerConfig)} - {"limits", "threads"}  # queue_size, api_key...
        limit_keys = {f.name for f in fields(Limits)}
        unknown = sorted(set(args) - own - model_keys - server_keys - limit_keys)
        if unknown:
            raise ValueError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; use "
                             f"{', '.join(sorted(own | model_keys | server_keys | limit_keys))}")
        limits = Limits(**{k: v for k, v in args.items() if k in limit_keys})
        server = replace(ServerConfig(), limits=limits, **{k: v for k, v in args.items() if k in server_keys})
        if not server.api_key:
            server.api_key = os.environ.get(API_KEY_ENV) or None
        return cls(model=ModelChoice(**{k: v for k, v in args.items() if k in model_keys}), server=server,
                   **{k: v for k, v in args.items() if k in own}).validate()


def build_app(options: ServeOptions | None = None) -> Any:
    """The Serve application (``serve.run(build_app(...))``)."""
    ray = require_ray("kandinsky ray serve")
    from ray import serve
    from ray.serve.config import DeploymentActorConfig

    from .ingress import STORE, IngressReplica
    from .model import ModelReplica
    from .store import JobStore

    options = (options or ServeOptions()).validate()
    model = serve.deployment(ModelReplica, name=MODEL_DEPLOYMENT, **options.model_deployment_options()).bind(
        options.model, options.threads(), options.batch_size(), options.batch_wait_timeout_s,
        options.progress_interval_s)
    store = DeploymentActorConfig(name=STORE, actor_class=ray.remote(JobStore), actor_options={"num_cpus": 0},
                                  init_kwargs={"config": options.server, "model_deployment": MODEL_DEPLOYMENT,
                                               "slots": options.slots()})
    ingress = serve.deployment(serve.ingress()(IngressReplica), name=INGRESS_DEPLOYMENT,
                               num_replicas=options.ingress_replicas,
                               max_ongoing_requests=options.max_ongoing_per_ingress,
                               ray_actor_options={"num_cpus": options.num_cpus_per_ingress},
                               deployment_actors=[store])
    return ingress.bind(model, options.server)


def app_builder(args: dict[str, Any]) -> Any:
    """The application for a Serve config file (``import_path: kandinsky.ray.app:app_builder``); ``args`` as in
    :meth:`ServeOptions.from_mapping`."""
    return build_app(ServeOptions.from_mapping(args or {}))


def deploy(options: ServeOptions, name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Start Serve's HTTP proxies on ``options.server.host``/``port`` (if Serve is not already running on this
    cluster), deploy the application and wait until it is running; returns its URL."""
    require_ray("kandinsky ray serve")
    from ray import serve

    host, port = options.server.host, options.server.port
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(options), name=name, route_prefix=route_prefix)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{route_prefix.rstrip('/')}/"


def status(name: str = APP_NAME) -> dict[str, Any]:
    """The application's state and its deployments' replicas, as ``serve status`` reports them (``{}`` when
    the application is not deployed)."""
    require_ray("kandinsky ray status")
    from ray import serve

    apps = serve.status().applications
    if name not in apps:
        return {}
    app = apps[name]
    return {"name": name, "status": str(app.status.value if hasattr(app.status, "value") else app.status),
            "message": app.message,
            "deployments": {d: {"status": str(getattr(s.status, "value", s.status)),
                                "replicas": {str(getattr(k, "value", k)): v for k, v in s.replica_states.items()},
                                "message": s.message}
                            for d, s in app.deployments.items()}}
