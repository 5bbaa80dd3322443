"""Load test of ``kandinsky serve``: N requests from C concurrent clients on loopback, with the bundled model.

Starts its own server (``python -m kandinsky serve`` on a free port, a small queue so that some requests are
refused) unless ``--url`` points at a running one. The requests mix the three ways of calling it: ``/v1/txt2img``
waiting for the image, ``/v1/txt2img?async=true`` then polling ``/v1/jobs/{id}``, and A1111's
``/sdapi/v1/txt2img``. A refused request (429) is retried after its Retry-After.

Checks: every accepted request completes and every refusal is a 429 (nothing else); no request is lost or
answered twice (one result per request, each with its own seed and a job id used once; the server's own counters
agree); the server's memory (RSS) stays flat. Prints throughput and p50/p95 latency.

    python bench/server_load.py --requests 50 --clients 8
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (Linux), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Load:
    """The clients' shared bookkeeping."""

    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.url, self.args = url, args
        self.lock = threading.Lock()
        self.next = 0
        self.results: dict[int, dict[str, Any]] = {}  # request number -> its one result
        self.duplicates: list[int] = []
        self.latency: list[float] = []
        self.status = Counter()
        self.errors: list[str] = []

    def take(self) -> int | None:
        with self.lock:
            if self.next >= self.args.requests:
                return None
            self.next += 1
            return self.next - 1

    def client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.args.timeout) as c:
            while (n := self.take()) is not None:
                start = time.perf_counter()
                try:
                    result = self.one(c, n)
                except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                    with self.lock:
                        self.errors.append(f"request {n}: {type(exc).__name__}: {exc}")
                    continue
                with self.lock:
                    if n in self.results:
                        self.duplicates.append(n)
                    self.results[n] = result
                    self.latency.append(time.perf_counter() - start)

    def one(self, c: httpx.Client, n: int) -> dict[str, Any]:
        """Request ``n`` until it is accepted, then its result: {seed, job id or None, route}."""
        seed = 10_000 + n
        route = ("sync", "async", "a1111")[n % 3]
        body = {"prompt": f"request {n}: a red circle on a blue background", "seed": seed,
                "steps": self.args.steps, "prior_steps": self.args.prior_steps}
        while True:
            if route == "a1111":
                r = c.post("/sdapi/v1/txt2img", json={"prompt": body["prompt"], "seed": seed, "steps": self.args.steps,
                                                      "width": 64, "height": 64, "cfg_scale": 4})
            else:
                r = c.post("/v1/txt2img" + ("?async=true" if route == "async" else ""), json=body)
            with self.lock:
                self.status[r.status_code] += 1
            if r.status_code != 429:
                break
            time.sleep(min(float(r.headers.get("Retry-After", 1)), self.args.max_wait))
        if route == "async":
            if r.status_code != 202:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            job_id = r.json()["id"]
            while True:
                status = c.get(f"/v1/jobs/{job_id}").json()
                if status["state"] in ("done", "failed", "cancelled"):
                    break
                time.sleep(0.05)
            if status["state"] != "done":
                raise RuntimeError(f"job {job_id} {status['state']}: {status['error']}")
            out = status["result"]
        else:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            out = r.json()
        if route == "a1111":
            info = json.loads(out["info"])
            return {"seed": info["all_seeds"][0], "job": None, "route": route, "images": len(out["images"]),
                    "asked": seed}
        return {"seed": out["images"][0]["seed"], "job": out["id"], "route": route, "images": len(out["images"]),
                "asked": seed}


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "kandinsky", "serve", "--port", str(port), "--queue-size", str(args.queue_size),
           "--log-level", "warning"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            state = httpx.get(url + "/healthz", timeout=2).json()["model"]
            if state == "ready":
                return
            if state == "failed":
                raise SystemExit("the server's model failed to load")
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--queue-size", type=int, default=4, help="of the server this starts (default 4)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prior-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="the server's --threads")
    p.add_argument("--url", help="a running server instead of starting one (memory is then not measured)")
    p.add_argument("--timeout", type=float, default=600.0, help="per HTTP request, seconds")
    p.add_argument("--max-wait", type=float, default=2.0, help="longest sleep after a 429, seconds")
    p.add_argument("--max-growth-mb", type=float, default=100.0, help="RSS growth that counts as not flat")
    args = p.parse_args()

    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args)
    try:
        wait_ready(url, proc)
        pid = proc.pid if proc is not None else None
        with httpx.Client(base_url=url, timeout=args.timeout) as c:  # warm up: first calls pay one-time costs
            for seed in (1, 2):
                c.post("/v1/txt2img", json={"prompt": "warm-up", "seed": seed, "steps": args.steps,
                                            "prior_steps": args.prior_steps}).raise_for_status()
            c.post("/sdapi/v1/txt2img", json={"prompt": "warm-up", "steps": args.steps, "width": 64,
                                              "height": 64}).raise_for_status()
            before_counts = c.get("/healthz").json()["counts"]
        rss_before = rss_mb(pid) if pid else None
        samples: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                if pid and (m := rss_mb(pid)) is not None:
                    samples.append(m)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        load = Load(url, args)
        start = time.perf_counter()
        clients = [threading.Thread(target=load.client) for _ in range(args.clients)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
        time.sleep(0.5)
        rss_after = rss_mb(pid) if pid else None
        with httpx.Client(base_url=url, timeout=30) as c:
            counts = c.get("/healthz").json()["counts"]
        delta = {k: counts[k] - before_counts.get(k, 0) for k in counts}
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    accepted = load.status[200] + load.status[202]
    refused = load.status[429]
    other = {k: v for k, v in load.status.items() if k not in (200, 202, 429)}
    jobs = [r["job"] for r in load.results.values() if r["job"]]
    problems = list(load.errors)
    if len(load.results) != args.requests:
        problems.append(f"{args.requests - len(load.results)} requests lost (no result)")
    if load.duplicates:
        problems.append(f"requests answered twice: {load.duplicates}")
    if len(jobs) != len(set(jobs)):
        problems.append("a job id was returned for two requests")
    wrong = [n for n, r in load.results.items() if r["seed"] != r["asked"] or r["images"] != 1]
    if wrong:
        problems.append(f"results with the wrong seed or image count: {wrong}")
    if other:
        problems.append(f"statuses other than 200/202/429: {other}")
    if delta["submitted"] != accepted or delta["done"] != args.requests or delta["refused"] != refused:
        problems.append(f"the server's counters disagree: {delta} vs {accepted} accepted, {refused} refused")
    if delta["failed"] or delta["cancelled"]:
        problems.append(f"jobs failed or were cancelled: {delta}")
    flat = None
    if rss_before is not None and rss_after is not None:
        flat = rss_after - rss_before <= args.max_growth_mb
        if not flat:
            problems.append(f"memory grew by {rss_after - rss_before:.0f} MiB")

    lat = load.latency
    print(f"{args.requests} requests from {args.clients} clients, queue size {args.queue_size}, "
          f"{args.steps} decoder + {args.prior_steps} prior steps, 64×64, server threads {args.threads or 'default'}"
          f" (pid {os.getpid()} drove it)")
    print(f"  routes: {dict(Counter(r['route'] for r in load.results.values()))}")
    print(f"  accepted {accepted}, refused with 429: {refused}, completed {len(load.results)}, "
          f"server counters {delta}")
    print(f"  wall {wall:.1f} s, throughput {args.requests / wall:.2f} images/s")
    if lat:
        print(f"  latency (first try to image, retries included): p50 {percentile(lat, .5):.2f} s, "
              f"p95 {percentile(lat, .95):.2f} s, max {max(lat):.2f} s, mean {statistics.mean(lat):.2f} s")
    if rss_before is not None:
        peak = max(samples) if samples else rss_after
        print(f"  server RSS: before {rss_before:.0f} MiB, peak {peak:.0f} MiB, after {rss_after:.0f} MiB "
              f"({'flat' if flat else 'NOT flat'})")
    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        return 1
    print("OK: every accepted request completed, every refusal was a 429, none lost or duplicated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
