"""Throughput of kandinsky on Ray, on this machine (bundled model, 64x64).

1. Serve: the same workload (``--requests`` synchronous ``POST /v1/txt2img``, ``--concurrency`` at a time) on 1 model
   replica, then on 2 (one torch thread each); images/s, p50/p95 latency, and the scaling efficiency
   (throughput with 2 replicas / (2 x throughput with 1)).
2. Batches: ``kandinsky ray batch`` (``--actors`` actors, one thread each) against ``kandinsky generate --prompts``
   (one process, with one thread, then with torch's default threads) on the same prompts file, end to end
   (start-up and model loading included) and for the rendering alone (from the first to the last image written).

    python bench/ray_scale.py                    # everything, a local Ray of all CPUs
    python bench/ray_scale.py --requests 16 --part serve --json

Prints the load average before and after: on a shared machine the numbers are only as good as it is idle.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local benchmark cluster


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ================================================================================================ Serve


def serve_run(url: str, requests: int, concurrency: int, steps: int) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            while True:
                with lock:
                    k = next(counter, None)
                if k is None:
                    return
                t0 = time.perf_counter()
                r = c.post("/v1/txt2img", json={"prompt": f"a painting number {k}", "seed": k, "steps": steps,
                                                "prior_steps": 2})
                dt = time.perf_counter() - t0
                with lock:
                    (latencies.append(dt) if r.status_code == 200 else failures.append(r.text[:200]))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"images": len(latencies), "failed": len(failures), "wall_s": round(wall, 2),
            "images_per_s": round(len(latencies) / wall, 3),
            "p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "p95_s": round(percentile(latencies, 0.95), 3) if latencies else None}


def bench_serve(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    from ray import serve

    from kandinsky.ray.app import ServeOptions, build_app
    from kandinsky.server import Limits, ServerConfig

    port = 18765
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    try:
        for replicas in (1, 2):
            options = ServeOptions(server=ServerConfig(queue_size=args.requests, log_level="warning",
                                                       limits=Limits(max_steps=1000)),
                                   replicas=replicas, num_cpus_per_replica=args.cpus_per_replica,
                                   threads_per_replica=1, num_cpus_per_ingress=0.05)
            serve.run(build_app(options), name="kandinsky", route_prefix="/")
            with httpx.Client(base_url=url, timeout=600) as c:
                while c.get("/healthz").json()["model"] != "ready":
                    time.sleep(0.2)
            serve_run(url, 2 * replicas, replicas, args.steps)  # warm every replica
            before = load()
            result = serve_run(url, args.requests, args.concurrency, args.steps)
            result.update(load_before=before, load_after=load())
            out[f"{replicas}_replica"] = result
            print(f"serve, {replicas} replica(s) x 1 thread: {result['images_per_s']} images/s, p50 "
                  f"{result['p50_s']} s, p95 {result['p95_s']} s ({result['images']} images, {result['failed']} "
                  f"failed; load {before} -> {result['load_after']})", flush=True)
            serve.delete("kandinsky")
    finally:
        serve.shutdown()
    one, two = out["1_replica"]["images_per_s"], out["2_replica"]["images_per_s"]
    out["scaling_efficiency"] = round(two / (2 * one), 3) if one else None
    print(f"serve scaling efficiency (2 replicas vs 2 x 1): {out['scaling_efficiency']}", flush=True)
    return out


# ================================================================================================ batches


def _render_span(folder: Path) -> float:
    times = [p.stat().st_mtime for p in folder.glob("*.png")]
    return max(times) - min(times) if len(times) > 1 else 0.0


def bench_batch(args: argparse.Namespace, address: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kandinsky-bench-") as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("".join(f'{{"prompt": "a painting number {k}", "seed": {k}}}\n'
                                   for k in range(args.requests)), encoding="utf-8")
        common = ["--steps", str(args.steps), "--prior-steps", "2", "-q"]
        runs = {
            "kandinsky_ray_batch": [sys.executable, "-m", "kandinsky", "ray", "batch", str(prompts), "--out",
                                    str(Path(tmp) / "ray"), "--address", address, "--replicas", str(args.actors),
                                    "--num-cpus-per-replica", str(args.cpus_per_replica), "--threads-per-replica",
                                    "1", *common],
            "kandinsky_generate_prompts_1_thread": [sys.executable, "-m", "kandinsky", "generate", "--prompts",
                                                    str(prompts), "-o", str(Path(tmp) / "cli1"), *common],
            "kandinsky_generate_prompts": [sys.executable, "-m", "kandinsky", "generate", "--prompts", str(prompts),
                                           "-o", str(Path(tmp) / "cli"), *common],
        }
        for name, cmd in runs.items():
            before = load()
            env = {**os.environ, "OMP_NUM_THREADS": "1"} if name.endswith("1_thread") else None
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t0
            if r.returncode != 0:
                raise SystemExit(f"{name} failed: {r.stderr[-2000:]}")
            folder = Path(cmd[cmd.index("--out" if "--out" in cmd else "-o") + 1])
            images = len(list(folder.glob("*.png")))
            span = _render_span(folder)
            out[name] = {"images": images, "wall_s": round(wall, 2), "images_per_s": round(images / wall, 3),
                         "render_s": round(span, 2),
                         "render_images_per_s": round((images - 1) / span, 3) if span else None,
                         "load_before": before, "load_after": load()}
            print(f"{name}: {images} images in {wall:.1f} s end to end ({images / wall:.2f} images/s); rendering "
                  f"{out[name]['render_images_per_s']} images/s (load {before} -> {out[name]['load_after']})",
                  flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64, help="requests / prompt lines (default 64)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--steps", type=int, default=20, help="decoder steps per image (default 20)")
    p.add_argument("--actors", type=int, default=2, help="kandinsky ray batch actors (default 2)")
    p.add_argument("--cpus-per-replica", type=float, default=0.9,
                   help="Ray CPUs per replica/actor (default 0.9: two fit on 2 CPUs with the ingress)")
    p.add_argument("--part", choices=("all", "serve", "batch"), default="all")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object too")
    args = p.parse_args()

    import ray

    print(f"machine: {os.cpu_count()} CPUs, load average {load()}", flush=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    results: dict[str, Any] = {"cpus": os.cpu_count(), "requests": args.requests, "steps": args.steps,
                               "load_start": load()}
    try:
        if args.part in ("all", "serve"):
            results["serve"] = bench_serve(args)
        if args.part in ("all", "batch"):
            results["batch"] = bench_batch(args, ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()
    results["load_end"] = load()
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
