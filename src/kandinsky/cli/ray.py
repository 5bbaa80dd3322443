"""``kandinsky ray serve | status | batch``: the HTTP server and ``--prompts`` batches on a Ray cluster
(:mod:`kandinsky.ray`; ``pip install 'kandinsky[ray]'``). Ray is imported only when a command runs."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ..jobs import ModelChoice, add_model_arguments
from ..server.config import add_serve_arguments, config_from_args
from .common import EXIT_ERROR, PROG, CLIError, bar, emit, note, print_json, write
from .options import job_options
from .parser import Parser, float_type, gen_flags, int_type, output_flags

EXAMPLES = """examples:
  kandinsky ray serve --replicas 2 --threads-per-replica 4          # a local Ray cluster on this machine
  kandinsky ray serve --address auto --min-replicas 1 --max-replicas 8 --num-gpus-per-replica 1
  kandinsky ray status --address auto
  kandinsky ray batch prompts.txt --out shots/ --replicas 4 --steps 30 --seed 7   # rerun to finish what is left
"""


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray cluster")
    g.add_argument("--address", metavar="ADDR",
                   help="the cluster: 'auto' (one started with `ray start` on this machine), ray://HOST:10001 or "
                        "HOST:6379 (default: start a local cluster for this command)")
    g.add_argument("--num-cpus", type=float_type("num cpus", 0.0, low_open=True), metavar="N",
                   help="CPUs of the local cluster (default: all; only without --address)")


def _replica_flags(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group(f"{what}s")
    g.add_argument("--replicas", type=int_type("replicas", 1), default=1, metavar="N",
                   help=f"{what}s, each with its own pipeline (default 1)")
    g.add_argument("--num-cpus-per-replica", type=float_type("num cpus per replica", 0.0), default=1.0,
                   metavar="C", help=f"CPUs Ray reserves for each {what} (default 1; fractions allowed)")
    g.add_argument("--num-gpus-per-replica", type=float_type("num gpus per replica", 0.0), default=0.0,
                   metavar="G", help=f"GPUs for each {what} (default 0; fractions share a GPU)")
    g.add_argument("--threads-per-replica", type=int_type("threads per replica", 1), metavar="T",
                   help=f"torch threads of each {what} (default: its whole CPUs, at least 1)")


def add_ray_parsers(p: argparse.ArgumentParser) -> None:
    """The ``kandinsky ray`` subcommands (added under the ``ray`` command's parser)."""
    p.epilog = EXAMPLES
    sub = p.add_subparsers(title="ray commands", metavar="RAYCOMMAND", dest="ray_command", parser_class=Parser)

    s = sub.add_parser("serve", help="serve the HTTP API and web page from a Ray Serve application",
                       description="Deploy `kandinsky serve`'s API (/v1, /sdapi/v1, /healthz, the page) on Ray "
                                   "Serve, with the model in replicas; Ctrl+C removes it.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _cluster_flags(s)
    _replica_flags(s, "model replica")
    g = s.add_argument_group("scaling and batching")
    g.add_argument("--min-replicas", type=int_type("min replicas", 0), metavar="A",
                   help="autoscale between A and --max-replicas replicas (instead of --replicas)")
    g.add_argument("--max-replicas", type=int_type("max replicas", 1), metavar="B", help="see --min-replicas")
    g.add_argument("--ingress-replicas", type=int_type("ingress replicas", 1), default=1, metavar="N",
                   help="HTTP replicas (they share the job records; default 1)")
    g.add_argument("--max-batch-size", type=int_type("max batch size", 1), metavar="N",
                   help="batch up to N compatible txt2img requests in one decoder loop (default: 1, off, on CPU "
                        "replicas; 4 with --num-gpus-per-replica)")
    g.add_argument("--batch-wait-timeout", type=float_type("batch wait timeout", 0.0), default=0.05, metavar="S",
                   help="seconds a batch waits to fill (default 0.05)")
    g.add_argument("--name", default="kandinsky", help="the Serve application's name (default kandinsky)")
    add_serve_arguments(s)
    add_model_arguments(s)
    output_flags(s)

    st = sub.add_parser("status", help="the kandinsky application's deployments and replicas on a cluster")
    st.add_argument("--address", metavar="ADDR", default="auto", help="the cluster (default auto)")
    st.add_argument("--name", default="kandinsky", help="the Serve application's name (default kandinsky)")
    output_flags(st)

    b = sub.add_parser("batch", help="render a prompts file with a pool of Ray actors (resumable)",
                       description="Render every line of a prompts file (text, --options or JSON lines, as "
                                   "`kandinsky generate --prompts`) into --out, with a manifest.jsonl. A rerun "
                                   "renders only the images that are missing.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("prompts", metavar="PROMPTS_FILE", help="one job a line")
    b.add_argument("-o", "--out", metavar="DIR", required=True, help="output folder (images and manifest.jsonl)")
    b.add_argument("--mode", choices=("txt2img", "img2img", "inpaint"), default="txt2img",
                   help="what each line is (default txt2img)")
    b.add_argument("--batch-size", type=int_type("batch size", 1), default=1, metavar="B",
                   help="lines per Ray Data batch, the unit of work of an actor (default 1)")
    b.add_argument("--wait-for-actors", type=float_type("wait for actors", 0.0), metavar="S",
                   help="fail if the actors cannot all start within S seconds (default: Ray's)")
    _cluster_flags(b)
    _replica_flags(b, "actor")
    gen_flags(b, out=False)
    b.add_argument("-i", "--image", help="input image for img2img/inpaint lines that name none")
    b.add_argument("--strength", type=float_type("strength", 0.0, 1.0), help="img2img strength")
    b.add_argument("-m", "--mask", help="inpaint mask for lines that name none")
    add_model_arguments(b, speed=True)
    output_flags(b)


def cmd_ray(args: argparse.Namespace) -> int:
    """Run a ``kandinsky ray`` subcommand."""
    command = getattr(args, "ray_command", None)
    if command is None:
        raise CLIError("choose a ray command: serve, status or batch (see `kandinsky ray --help`)")
    return {"serve": cmd_ray_serve, "status": cmd_ray_status, "batch": cmd_ray_batch}[command](args)


def _connect(args: argparse.Namespace) -> tuple[Any, bool]:
    from ..ray.common import connect, require_ray

    ray = require_ray(f"{PROG} ray {args.ray_command}")
    if getattr(args, "address", None) and getattr(args, "num_cpus", None):
        raise CLIError("--num-cpus is for a local cluster; leave it out with --address")
    try:
        started = connect(args.address, num_cpus=getattr(args, "num_cpus", None))
    except ConnectionError as exc:
        raise CLIError(f"cannot connect to the Ray cluster at {args.address}: {exc}") from None
    return ray, started


# ================================================================================================ serve


def serve_options(args: argparse.Namespace) -> Any:
    """:class:`kandinsky.ray.app.ServeOptions` from parsed ``kandinsky ray serve`` options."""
    from ..ray.app import ServeOptions

    config = config_from_args(args)
    config.threads = None
    try:
        return ServeOptions(model=ModelChoice.from_options(args), server=config, replicas=args.replicas,
                            min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                            num_cpus_per_replica=args.num_cpus_per_replica,
                            num_gpus_per_replica=args.num_gpus_per_replica,
                            threads_per_replica=args.threads_per_replica or args.threads,
                            max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout,
                            ingress_replicas=args.ingress_replicas).validate()
    except ValueError as exc:
        raise CLIError(str(exc).replace("_", "-")) from None


def cmd_ray_serve(args: argparse.Namespace) -> int:
    """Deploy, print the URL, wait for Ctrl+C, then remove the application (and the cluster if it was ours)."""
    from ..ray import app as ray_app
    from ..server import _loopback

    options = serve_options(args)
    if not args.address:  # a local cluster sees this machine's folders: refuse missing ones before starting it
        _check_folders(options.model)
    ray, started = _connect(args)
    from ray import serve

    try:
        if not _loopback(options.server.host) and not options.server.api_key:
            write(f"{PROG} ray serve: warning: listening on {options.server.host} without an API key; anyone who "
                  "can reach it can use it (pass --api-key)", sys.stderr)
        count = f"{options.min_replicas}-{options.max_replicas}" if options.autoscaling else options.replicas
        _check_resources(args, options, ray.cluster_resources())
        note(args, f"deploying {args.name}: {count} model replica(s), {options.threads()} thread(s) each ...")
        try:
            url = ray_app.deploy(options, name=args.name)
        except RuntimeError as exc:
            raise CLIError(_deploy_failure(args.name, exc)) from None
        if args.json:
            print_json({"ok": True, "command": "ray serve", "url": url, "app": args.name,
                        "status": ray_app.status(args.name)})
        else:
            print(url, flush=True)
        note(args, f"ray serve: {url}  (API docs at /docs; Ctrl+C to stop)")
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        note(args, "stopping ...")
        return 0
    finally:
        try:
            if started:
                serve.shutdown()
            else:
                serve.delete(args.name)
        finally:
            if started:
                ray.shutdown()


def _check_folders(choice: ModelChoice) -> None:
    from ..weights import hub

    for key, role in (("model", "decoder"), ("prior", "prior"), ("inpaint", "inpaint"), ("original", "original")):
        given = getattr(choice, key)
        if given and not hub.is_hub_id(str(given)) and not Path(given).is_dir():
            raise CLIError(f"{role} model folder not found: {given}")


def _deploy_failure(name: str, exc: BaseException) -> str:
    """Why a deployment failed, from the replicas' own error when Serve reports one."""
    from ..ray import app as ray_app

    reasons = []
    try:
        for deployment, info in (ray_app.status(name).get("deployments") or {}).items():
            lines = [line.strip() for line in (info.get("message") or "").splitlines() if line.strip()]
            if lines:
                reasons.append(f"{deployment}: {lines[-1]}")
    except Exception:  # noqa: BLE001 - the status is a courtesy; the failure itself is reported below
        pass
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"deploying {name} failed: {'; '.join(reasons) or first}"


def _check_resources(args: argparse.Namespace, options: Any, cluster: dict[str, float]) -> None:
    """Warn when the replicas ask for more CPUs or GPUs than the cluster has now (Serve would wait for them)."""
    replicas = options.min_replicas or 1 if options.autoscaling else options.replicas
    need = {"CPU": replicas * options.num_cpus_per_replica + options.ingress_replicas * options.num_cpus_per_ingress,
            "GPU": replicas * options.num_gpus_per_replica}
    for kind, amount in need.items():
        if amount > cluster.get(kind, 0.0) + 1e-9:
            write(f"{PROG} ray serve: warning: the replicas need {amount:g} {kind}s and the cluster has "
                  f"{cluster.get(kind, 0.0):g}; Serve waits until enough join (fewer --replicas or a smaller "
                  f"--num-{kind.lower()}s-per-replica starts now)", sys.stderr)


# ================================================================================================ status


def cmd_ray_status(args: argparse.Namespace) -> int:
    """Print the application's status, its deployments' replicas and the cluster's resources."""
    from ..ray import app as ray_app

    ray, started = _connect(args)
    try:
        info = ray_app.status(args.name)
        resources = {"total": ray.cluster_resources(), "available": ray.available_resources()}
    finally:
        if started:
            ray.shutdown()
    if args.json:
        print_json({"ok": bool(info), "command": "ray status", "app": info or None, "resources": resources})
        return 0 if info else EXIT_ERROR
    if not info:
        raise CLIError(f"no Serve application named {args.name!r} on this cluster (start one with "
                       f"`{PROG} ray serve`)")
    print(f"{info['name']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
    for name, d in info["deployments"].items():
        replicas = ", ".join(f"{n} {state.lower()}" for state, n in d["replicas"].items()) or "no replicas"
        print(f"  {name}: {d['status']}, {replicas}" + (f" ({d['message']})" if d["message"] else ""))
    total, free = resources["total"], resources["available"]
    print(f"cluster: {free.get('CPU', 0):g}/{total.get('CPU', 0):g} CPUs free, "
          f"{free.get('GPU', 0):g}/{total.get('GPU', 0):g} GPUs free")
    return 0


# ================================================================================================ batch


def cmd_ray_batch(args: argparse.Namespace) -> int:
    """Plan the prompts file, render what is missing with a pool of actors, report each line's result."""
    from ..ray import data as ray_data
    from ..ray.common import require_ray

    require_ray(f"{PROG} ray batch")
    start = time.perf_counter()
    defaults = job_options(args, args.mode)
    defaults.pop("seed", None)  # --seed is the base seed here
    plan = ray_data.plan_batch(Path(args.prompts), Path(args.out), mode=args.mode, defaults=defaults,
                               seed=args.seed)
    for line, message in plan.errors:
        write(f"{PROG}: error: {plan.where(line)}: {message}", sys.stderr)
    note(args, f"{len(plan.todo)} line(s) to render ({plan.images} image(s)), {len(plan.done)} done already, "
               f"{len(plan.errors)} bad; base seed {plan.base_seed}")
    images: list[dict[str, Any]] = []
    errors = [{"line": line, "error": message} for line, message in plan.errors]
    if plan.todo:
        ray, started = _connect(args)
        from ray.data import DataContext

        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its progress logs; ours is the bar below
        context = DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        try:
            ds = ray_data.render(plan, choice=ModelChoice.from_options(args), actors=args.replicas,
                                 num_cpus_per_actor=args.num_cpus_per_replica,
                                 num_gpus_per_actor=args.num_gpus_per_replica,
                                 threads_per_actor=args.threads_per_replica, batch_size=args.batch_size,
                                 wait_for_actors_s=args.wait_for_actors)
            progress = bar(args, plan.images, "ray batch", "image")
            for row in ds.iter_rows():
                if row["error"]:
                    errors.append({"line": row["line"], "error": row["error"]})
                    write(f"{PROG}: error: {plan.where(row['line'])}: {row['error']}", sys.stderr)
                    progress.update(len(_files_of(plan, row["line"])))
                    continue
                images.append(dict(row))
                emit(args, f"{row['file']}  (line {row['line']}, seed {row['seed']})")
                progress.update(1)
            progress.close()
        finally:
            if started:
                ray.shutdown()
    note(args, f"ray batch: {len(images)} image(s) written, {len(plan.done)} line(s) done already, "
               f"{len(errors)} failed; manifest {Path(args.out) / ray_data.MANIFEST}")
    if args.json:
        print_json({"ok": not errors, "command": "ray batch", "prompts": args.prompts, "out": args.out,
                    "base_seed": plan.base_seed, "images": images, "done_already": plan.done, "errors": errors,
                    "timings": {"total_s": round(time.perf_counter() - start, 3)}})
    return EXIT_ERROR if errors else 0


def _files_of(plan: Any, line: int) -> list[str]:
    import json

    return next((json.loads(r["files"]) for r in plan.todo if r["line"] == line), [])
