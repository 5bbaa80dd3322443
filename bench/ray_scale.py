"""Throughput and per-request overhead of kandinsky on Ray, on this machine (bundled model, 64x64).

0. Overhead: one request (64x64, bundled model, ``--steps`` decoder and 2 prior steps, a fixed seed), sequential,
   ``--repeat`` times after a warm-up, three ways with the same torch thread count (``--threads``, the replica's):
   (a) ``PipelineEngine.run`` (what a model replica calls) in a plain process of its own, no Ray, no HTTP,
   (b) ``POST /v1/txt2img`` to a ``kandinsky serve`` subprocess (adds HTTP, the queue, previews and the PNG/base64
   answer), (c) the same request through Ray Serve with 1 model replica. The three run interleaved (a, b, c, a,
   b, c...) so that a change in the machine's load hits all three alike; medians, overhead (c - a) / a and
   (c - b) / b, and where (c)'s extra time goes (the answer's ``run_s``: from the job's start to its end in the
   job store / server).
1. Serve: the same workload (``--requests`` synchronous ``POST /v1/txt2img``, ``--concurrency`` at a time) on 1 model
   replica, then on 2 (one torch thread each); images/s, p50/p95 latency, and the scaling efficiency
   (throughput with 2 replicas / (2 x throughput with 1)).
2. Batches: ``kandinsky ray batch`` (``--actors`` actors, one thread each) against ``kandinsky generate --prompts``
   (one process, with one thread, then with torch's default threads) on the same prompts file, end to end
   (start-up and model loading included) and for the rendering alone (from the first to the last image written).

    python bench/ray_scale.py                    # everything, a local Ray of all CPUs
    python bench/ray_scale.py --requests 16 --part serve --json
    python bench/ray_scale.py --part overhead --repeat 30

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


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


# ================================================================================================ overhead


def _png_pixels(b64png: str) -> bytes:
    import base64
    import hashlib
    import io

    import PIL.Image

    return hashlib.sha256(PIL.Image.open(io.BytesIO(base64.b64decode(b64png))).convert("RGB").tobytes()).digest()


def engine_worker(threads: int) -> int:
    """``--engine-worker``: load the bundled model with ``threads`` torch threads, then for each JSON request line
    on stdin run it with ``PipelineEngine.run`` (what a model replica calls) and answer ``{"s": seconds,
    "pixels": sha256 of the RGB pixels}``."""
    import hashlib

    import torch

    from kandinsky.jobs import Job, ModelChoice
    from kandinsky.server.engine import PipelineEngine

    torch.set_num_threads(threads)
    engine = PipelineEngine(ModelChoice())
    engine.load()
    for line in sys.stdin:
        body = json.loads(line)
        job = Job(mode="txt2img", prompt=body["prompt"], seed=body["seed"], width=body["width"],
                  height=body["height"], steps=body["steps"], prior_steps=body["prior_steps"])
        t0, c0 = time.perf_counter(), time.thread_time()
        (img, _), = engine.run(job, lambda *a, **k: None)
        dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
        digest = hashlib.sha256(img.convert("RGB").tobytes()).hexdigest()
        print(json.dumps({"s": dt, "cpu": cpu, "pixels": digest}), flush=True)
    return 0


def _wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server at {url} exited ({proc.returncode})")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).json().get("model") == "ready":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server at {url} was not ready within {timeout} s")


class CpuMeter:
    """CPU seconds used so far by each process below this one (Linux ``/proc``; empty elsewhere), leaving out the
    ``exclude`` pids and what they started: with a local cluster, that is every Ray process (GCS, raylet, the
    Serve controller, proxy and replicas, the job store, the agents)."""

    def __init__(self, exclude: tuple[int, ...] = ()) -> None:
        self.exclude = set(exclude)
        self.names: dict[int, str] = {}
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def _stat(pid: int) -> list[str] | None:
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        return raw[raw.rindex(")") + 2:].split()  # fields from the state on (the name may hold spaces)

    def _name(self, pid: int) -> str:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return "?"
        first = argv[0]
        if first.startswith("ray::"):  # Ray's process title: ray::Class[.method running now]
            return first.split()[0].split(".")[0]
        script = next((a for a in argv[1:] if a.endswith(".py")), None)
        return Path(script or first).name

    def sample(self) -> dict[int, float]:
        """{pid: CPU seconds (user + system)} of the processes below this one."""
        if not Path("/proc/self/stat").exists():
            return {}
        parent: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = self._stat(int(entry.name))
                if fields is not None:
                    pid = int(entry.name)
                    parent[pid] = int(fields[1])
                    cpu[pid] = (int(fields[11]) + int(fields[12])) / self.tick
        me, out = os.getpid(), {}
        for pid in cpu:
            p, chain = pid, []
            while p in parent and p != me and p not in self.exclude and p > 1:
                chain.append(p)
                p = parent[p]
            if p == me and pid not in self.exclude and chain:
                out[pid] = cpu[pid]
                name = self._name(pid)
                if name != "?":
                    self.names[pid] = name
        return out

    @staticmethod
    def delta(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
        return {pid: after[pid] - before.get(pid, 0.0) for pid in after}


def _pid_cpu(pid: int) -> float:
    fields = CpuMeter._stat(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / CpuMeter().tick


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """(a) in process, (b) ``kandinsky serve`` over HTTP, (c) Ray Serve over HTTP: the same request, interleaved."""
    import httpx
    from ray import serve

    from kandinsky.ray.app import MODEL_DEPLOYMENT, ServeOptions, build_app
    from kandinsky.server import Limits, ServerConfig

    threads = args.threads
    body = {"prompt": "a red cat on a blue sofa", "seed": 7, "width": 64, "height": 64, "steps": args.steps,
            "prior_steps": 2}
    out: dict[str, Any] = {"threads": threads, "repeat": args.repeat, "request": body, "load_before": load()}

    # (a) PipelineEngine.run in a plain process (no Ray, no HTTP), the replica's thread count
    engine = subprocess.Popen([sys.executable, __file__, "--engine-worker", "--threads", str(threads)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    engine_cpu: list[float] = []

    def run_a() -> tuple[float, None, bytes]:
        engine.stdin.write(json.dumps(body) + "\n")
        engine.stdin.flush()
        line = engine.stdout.readline()
        if not line:
            raise SystemExit(f"the engine process exited ({engine.wait()})")
        answer = json.loads(line)
        engine_cpu.append(answer["cpu"])
        return answer["s"], None, bytes.fromhex(answer["pixels"])

    # (b) kandinsky serve, a subprocess with the same threads
    port_b = _free_port()
    url_b = f"http://127.0.0.1:{port_b}"
    server = subprocess.Popen([sys.executable, "-m", "kandinsky", "serve", "--host", "127.0.0.1", "--port",
                               str(port_b), "--threads", str(threads), "--log-level", "warning"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # (c) Ray Serve, 1 model replica
    port_c = 18766
    url_c = f"http://127.0.0.1:{port_c}"
    options = ServeOptions(server=ServerConfig(log_level="warning", limits=Limits(max_steps=1000)), replicas=1,
                           num_cpus_per_replica=args.cpus_per_replica, threads_per_replica=threads,
                           num_cpus_per_ingress=0.05, progress_interval_s=args.progress_interval)
    clients: list[httpx.Client] = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port_c})
        serve.run(build_app(options), name="kandinsky", route_prefix="/")
        _wait_ready(url_b, server)
        _wait_ready(url_c)

        def poster(url: str) -> Any:
            client = httpx.Client(base_url=url, timeout=600)
            clients.append(client)

            def run() -> tuple[float, float, bytes]:
                t0 = time.perf_counter()
                r = client.post("/v1/txt2img", json=body)
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    raise SystemExit(f"{url}: {r.status_code} {r.text[:300]}")
                answer = r.json()
                return dt, answer["timings"]["run_s"], _png_pixels(answer["images"][0]["image"])

            return run

        ways = {"a_engine": run_a, "b_kandinsky_serve": poster(url_b), "c_ray_serve": poster(url_c)}
        times: dict[str, list[float]] = {k: [] for k in ways}
        run_s: dict[str, list[float]] = {k: [] for k in ways}
        pixels: dict[str, bytes] = {}
        for _ in range(args.warmup):
            for way in ways.values():
                way()
        out["load_start"] = load()
        print(f"overhead: {args.repeat} rounds of (a, b, c), {threads} torch thread(s) each; load {out['load_start']}",
              flush=True)
        # CPU seconds: (a) and (b) their own process, Ray's processes in every window (in those of (a) and (b)
        # they are idle: their background rate)
        model = serve.get_deployment_handle(MODEL_DEPLOYMENT, "kandinsky")
        stats_before = model.stats.remote().result(timeout_s=60)
        meter = CpuMeter(exclude=(engine.pid, server.pid))
        own = {"a_engine": engine.pid, "b_kandinsky_serve": server.pid}
        own_cpu = dict.fromkeys(ways, 0.0)
        ray_cpu: dict[str, dict[int, float]] = {k: {} for k in ways}
        for _ in range(args.repeat):
            for name, way in ways.items():
                before, mine = meter.sample(), _pid_cpu(own[name]) if name in own else 0.0
                dt, rs, px = way()
                own_cpu[name] += (_pid_cpu(own[name]) - mine) if name in own else 0.0
                for pid, used in meter.delta(before, meter.sample()).items():
                    ray_cpu[name][pid] = ray_cpu[name].get(pid, 0.0) + used
                times[name].append(dt)
                if rs is not None:
                    run_s[name].append(rs)
                pixels.setdefault(name, px)
        out["load_after"] = load()
        n = args.repeat
        stats_after = model.stats.remote().result(timeout_s=60)
        out["c_replica"] = {  # inside the model replica, per request: its pipeline call, its progress calls
            "pipeline_mean_s": round((stats_after["busy_s"] - stats_before["busy_s"]) / n, 4),
            "pipeline_thread_cpu_mean_s": round((stats_after["busy_cpu_s"] - stats_before["busy_cpu_s"]) / n, 4),
            "report_calls": round((stats_after["report_calls"] - stats_before["report_calls"]) / n, 2),
            "threads": stats_after["threads"], "run_threads": stats_after["run_threads"]}
        out["c_ray_serve_mean_s"] = round(statistics.mean(times["c_ray_serve"]), 4)
        out["a_engine_mean_s"] = round(statistics.mean(times["a_engine"]), 4)
        out["a_engine_thread_cpu_mean_s"] = round(statistics.mean(engine_cpu[-n:]), 4)
        idle_wall = sum(sum(times[k]) for k in own)
        idle_cores = sum(sum(ray_cpu[k].values()) for k in own) / idle_wall if idle_wall else 0.0
        by_name: dict[str, float] = {}
        for pid, used in ray_cpu["c_ray_serve"].items():
            name = meter.names.get(pid, str(pid))
            by_name[name] = by_name.get(name, 0.0) + used / n
        ray_total = sum(ray_cpu["c_ray_serve"].values()) / n
        out["cpu_per_request_s"] = {
            "a_engine": round(own_cpu["a_engine"] / n, 4),
            "b_kandinsky_serve": round(own_cpu["b_kandinsky_serve"] / n, 4),
            "c_ray_processes": round(ray_total, 4),
            "c_ray_processes_less_idle": round(ray_total - idle_cores * statistics.mean(times["c_ray_serve"]), 4),
            "c_by_process": {k: round(v, 4) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1]) if v >= 0.0005}}
        out["ray_idle_cores"] = round(idle_cores, 4)
        out["same_image"] = len(set(pixels.values())) == 1
        replica_threads = httpx.get(f"{url_c}/v1/models", timeout=10).json()["models"][0].get("threads_per_replica")
        out["replica_threads"] = replica_threads
    finally:
        for client in clients:
            client.close()
        server.terminate()
        engine.stdin.close()
        for proc in (server, engine):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        serve.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    a, b, c = med["a_engine"], med["b_kandinsky_serve"], med["c_ray_serve"]
    for name in ways:
        out[name] = {"median_s": round(med[name], 4), "p10_s": round(percentile(times[name], 0.1), 4),
                     "p90_s": round(percentile(times[name], 0.9), 4)}
        if run_s[name]:
            out[name]["run_median_s"] = round(statistics.median(run_s[name]), 4)
    out["overhead_vs_in_process"] = round((c - a) / a, 4)
    out["overhead_vs_kandinsky_serve"] = round((c - b) / b, 4)
    out["serve_vs_in_process"] = round((b - a) / a, 4)
    for name in ways:
        r = out[name]
        extra = f", job run {r['run_median_s']:.3f} s" if "run_median_s" in r else ""
        print(f"  {name}: median {r['median_s']:.3f} s (p10 {r['p10_s']:.3f}, p90 {r['p90_s']:.3f}){extra}",
              flush=True)
    cpu = out["cpu_per_request_s"]
    if cpu["c_ray_processes"]:
        parts = ", ".join(f"{k.removeprefix('ray::')} {v * 1000:.0f}" for k, v in cpu["c_by_process"].items())
        print(f"  CPU per request: (a) {cpu['a_engine'] * 1000:.0f} ms, (b) {cpu['b_kandinsky_serve'] * 1000:.0f} ms, "
              f"(c) {cpu['c_ray_processes'] * 1000:.0f} ms in Ray's processes "
              f"({cpu['c_ray_processes_less_idle'] * 1000:.0f} ms less their idle rate of "
              f"{out['ray_idle_cores']:.3f} cores): {parts}", flush=True)
    rep = out.get("c_replica")
    if rep:
        print(f"  (c) inside the replica: pipeline call {rep['pipeline_mean_s']:.3f} s, its thread's CPU "
              f"{rep['pipeline_thread_cpu_mean_s']:.3f} s (means; (a) {out['a_engine_mean_s']:.3f} s and "
              f"{out['a_engine_thread_cpu_mean_s']:.3f} s; (c) end to end {out['c_ray_serve_mean_s']:.3f} s), "
              f"{rep['report_calls']:g} progress calls per request, torch threads {rep['run_threads']}", flush=True)
    print(f"  Ray Serve overhead: {out['overhead_vs_in_process']:+.1%} vs in process ({(c - a) * 1000:+.0f} ms), "
          f"{out['overhead_vs_kandinsky_serve']:+.1%} vs kandinsky serve ({(c - b) * 1000:+.0f} ms); kandinsky serve "
          f"vs in process {out['serve_vs_in_process']:+.1%}; same image: {out['same_image']}; replica threads "
          f"{replica_threads}; load {out['load_start']} -> {out['load_after']}", flush=True)
    return out


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
                                   threads_per_replica=1, num_cpus_per_ingress=0.05,
                                   progress_interval_s=args.progress_interval)
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
    from kandinsky.ray.app import ServeOptions

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64, help="requests / prompt lines (default 64)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    p.add_argument("--steps", type=int, default=20, help="decoder steps per image (default 20)")
    p.add_argument("--actors", type=int, default=2, help="kandinsky ray batch actors (default 2)")
    p.add_argument("--cpus-per-replica", type=float, default=0.9,
                   help="Ray CPUs per replica/actor (default 0.9: two fit on 2 CPUs with the ingress)")
    p.add_argument("--repeat", type=int, default=20, help="overhead: rounds of (a, b, c) measured (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="overhead: rounds before measuring (default 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="overhead: torch threads of each of (a), (b) and the replica of (c) (default 1)")
    p.add_argument("--part", choices=("all", "overhead", "serve", "batch"), default="all")
    p.add_argument("--progress-interval", type=float, default=ServeOptions.progress_interval_s,
                   help=f"Serve's progress_interval_s (default {ServeOptions.progress_interval_s})")
    p.add_argument("--worker-niceness", type=int, default=0,
                   help="niceness of the local cluster's workers (default 0, as `kandinsky ray serve` starts them; "
                        "-1: Ray's default, 15)")
    p.add_argument("--engine-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the results as one JSON object too")
    args = p.parse_args()
    if args.engine_worker:
        return engine_worker(args.threads)

    import ray

    from kandinsky.ray.common import connect

    niceness = None if args.worker_niceness < 0 else args.worker_niceness
    print(f"machine: {os.cpu_count()} CPUs ({cpu_model()}), load average {load()}; Ray workers at niceness "
          f"{'15 (Ray default)' if niceness is None else niceness}", flush=True)
    connect(None, num_cpus=os.cpu_count(), worker_niceness=niceness)  # as `kandinsky ray serve` starts one
    results: dict[str, Any] = {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "worker_niceness": niceness,
                               "requests": args.requests, "steps": args.steps, "load_start": load()}
    try:
        if args.part in ("all", "overhead"):
            results["overhead"] = bench_overhead(args)
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
