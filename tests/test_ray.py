"""kandinsky.ray on a real local Ray cluster (2 CPUs, token auth off, its files under the pytest tmp dir).

Serve (one application for the class: 2 ingress replicas, 2 model replicas of 0.5 CPU and 1 thread, batching
of 2, an API key): every route with the bundled model, both kinds of replica answering, async jobs, SSE and
cancellation through different ingress replicas, batched requests equal to the same requests alone, a model
replica killed mid-job. Then, with Serve shut down (its replicas would starve an actor pool), Ray Data: a
`kandinsky ray batch` process killed in the middle, a resume that renders only the rest, one image per line,
identical to `kandinsky generate` at the same thread count.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'kandinsky[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'kandinsky[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'kandinsky[ray]')")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from kandinsky.ray.app import APP_NAME, MODEL_DEPLOYMENT, ServeOptions, build_app  # noqa: E402
from kandinsky.ray.data import MANIFEST, generate_dataset, sha256_file  # noqa: E402
from kandinsky.server import Limits, ServerConfig  # noqa: E402

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = {"steps": 2, "prior_steps": 1}
LIMITS = Limits(max_pixels=128 * 128, max_steps=200, max_images=2, max_items=3, max_upload_pixels=512 * 512)
REF = {"prompt": "a red cat", "seed": 11, "steps": 3, "prior_steps": 1}  # rendered by every front end
WAIT = 120.0
REPLICA = "x-kandinsky-replica"


# ============================================================================================== helpers


def wait_for(predicate: Any, timeout: float = WAIT, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixels(data: bytes | str | Path) -> np.ndarray:
    raw = Path(data).read_bytes() if isinstance(data, Path) else base64.b64decode(data) if isinstance(data, str) \
        else data
    with PIL.Image.open(io.BytesIO(raw)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def png_b64(img: PIL.Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def sse(client: httpx.Client, path: str) -> tuple[list[tuple[str, dict[str, Any]]], str]:
    """Read an event stream to its end: ([(event, data)], the ingress replica that served it)."""
    out, event, data = [], None, ""
    with client.stream("GET", path) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif line == "" and event:
                out.append((event, json.loads(data)))
                event, data = None, ""
        return out, resp.headers[REPLICA]


def from_other_replica(call: Any, than: str, tries: int = 40) -> httpx.Response:
    """Repeat a request until an ingress replica other than ``than`` answers it."""
    for _ in range(tries):
        r = call()
        if r.headers.get(REPLICA) != than:
            return r
    raise AssertionError(f"only ingress replica {than} answered")


def model_replicas() -> dict[int, dict[str, Any]]:
    """Each model replica's stats, by pid (asked until both answered)."""
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, APP_NAME)
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(30):
        stats = handle.stats.remote().result(timeout_s=60)
        seen[stats["pid"]] = stats
        if len(seen) == 2:
            break
    return seen


# ============================================================================================== deploy files


@pytest.mark.timeout(60)
def test_deploy_files_are_serve_configs_of_this_app() -> None:
    yaml = pytest.importorskip("yaml")
    from ray.serve.schema import ServeDeploySchema

    folder = Path(__file__).resolve().parents[1] / "deploy"
    local = yaml.safe_load((folder / "serve_config.yaml").read_text(encoding="utf-8"))
    service = yaml.safe_load((folder / "kuberay-rayservice.yaml").read_text(encoding="utf-8"))
    assert service["kind"] == "RayService"
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    assert groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert local["http_options"]["host"] == "127.0.0.1"  # loopback unless one chooses otherwise
    for config in (local, yaml.safe_load(service["spec"]["serveConfigV2"])):
        ServeDeploySchema.model_validate(config)
        (application,) = config["applications"]
        assert application["import_path"] == "kandinsky.ray.app:app_builder"
        ServeOptions.from_mapping(application["args"]).validate()


# ============================================================================================== the cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray of 2 CPUs (token auth off, files in the tmp dir); yields its address for other processes."""
    temp = tmp_path_factory.mktemp("ray")
    env = {"RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(temp)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(temp), logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, dict[str, Any]]:
    """REF rendered by `kandinsky generate` with one thread: (pixels, record)."""
    out = tmp_path_factory.mktemp("generate") / "ref.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "kandinsky", "generate", REF["prompt"], "--seed", str(REF["seed"]),
                        "--steps", str(REF["steps"]), "--prior-steps", str(REF["prior_steps"]), "-o", str(out), "-q"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    with PIL.Image.open(out) as img:
        record = json.loads(img.info["kandinsky"])
    return pixels(out), record


NICENESS = """
import os, sys
import ray
from kandinsky.ray.common import connect
assert connect(None, num_cpus=1, temp_dir=sys.argv[1], worker_niceness=None if sys.argv[2] == "ray" else 0)
print(ray.get(ray.remote(lambda: os.nice(0)).remote()))
ray.shutdown()
"""


@pytest.mark.timeout(180)
def test_a_cluster_started_here_runs_its_workers_at_normal_priority(tmp_path_factory: pytest.TempPathFactory
                                                                    ) -> None:
    # Ray starts workers at niceness 15: then any busy program on the machine takes the CPU from the model first
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    seen = {}
    for which in ("ours", "ray"):
        temp = tmp_path_factory.mktemp("n")  # short: Ray's socket paths must fit in 107 bytes
        r = subprocess.run([sys.executable, "-c", NICENESS, str(temp), which], capture_output=True, text=True,
                           env=env, timeout=150)
        assert r.returncode == 0, r.stderr[-2000:]
        seen[which] = int(r.stdout.strip().splitlines()[-1])
    assert seen == {"ours": os.nice(0), "ray": 15}, seen


# ============================================================================================== progress reports


def recorder(stop_at: int | None = None) -> Any:
    """An actor standing for the job store's ``report``: keeps every call (``log``), answers False (stop) from the
    ``stop_at``-th step on. (Defined here so that Ray ships the class itself: workers cannot import this module.)"""

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, list[tuple[str, int, int, Any]], Any]] = []

        async def report(self, key: str, steps: list[tuple[str, int, int, Any]], where: Any = None) -> bool:
            self.calls.append((key, steps, where))
            return stop_at is None or sum(len(c[1]) for c in self.calls) < stop_at

        async def log(self) -> list[tuple[str, list[tuple[str, int, int, Any]], Any]]:
            return self.calls

    actor = ray.remote(num_cpus=0)(Recorder).remote()
    ray.get(actor.log.remote(), timeout=60)  # started
    return actor


LOOPS = [("prior", 2), ("decoder", 20)]


def drive(reporter: Any, pause: float = 0.0, loops: list[tuple[str, int]] = LOOPS) -> list[tuple[str, int, int]]:
    """Call ``reporter`` as the pipeline does (a 4-channel latent with every decoder step, ``pause`` seconds
    apart); the steps called."""
    import torch

    called = []
    for stage, total in loops:
        for done in range(1, total + 1):
            reporter(stage, done, total, torch.full((2, 4, 8, 8), float(done)) if stage == "decoder" else None)
            called.append((stage, done, total))
            time.sleep(pause)
    return called


@pytest.mark.timeout(120)
def test_store_reporter_sends_every_step_in_order_with_fewer_calls(cluster: str) -> None:
    from kandinsky.ray.model import StoreReporter

    for interval, every, pause, most in ((3600.0, 0, 0.0, 4), (0.0, None, 0.0, 22), (0.0, 5, 0.01, 22)):
        store = recorder()
        reporter = StoreReporter(store, "key", {"replica": "r", "pid": 1}, preview_every=every)
        reporter.interval = interval
        called = drive(reporter, pause)
        reporter.flush()
        log = ray.get(store.log.remote())
        # every step once, in order (one call in flight at a time: an async actor may run calls out of order),
        # in fewer calls when they come fast: with a long interval, only the first step, the end of each sampling
        # loop and the flush make one
        assert [s[:3] for _, steps, _ in log for s in steps] == called
        assert 2 <= len(log) == reporter.calls <= most, [len(steps) for _, steps, _ in log]
        assert [where for _, _, where in log] == [{"replica": "r", "pid": 1}] + [None] * (len(log) - 1)
        assert all(key == "key" for key, _, _ in log)
        # latent rows (the first of the batch) only where the store makes a preview: every `every` decoder steps
        # (0: total // 10), never the last; None: every decoder step
        rows = {s[1]: s[3] for _, steps, _ in log for s in steps if s[0] == "decoder" and s[3] is not None}
        want = range(1, 21) if every is None else range(every or 2, 20, every or 2)
        assert sorted(rows) == list(want)
        assert all(r.dtype == np.float32 and r.shape == (1, 4, 8, 8) and r.max() == r.min() == d
                   for d, r in rows.items())
        assert not any(s[3] is not None for _, steps, _ in log for s in steps if s[0] == "prior")


@pytest.mark.timeout(120)
def test_store_reporter_stops_after_the_store_says_cancelled(cluster: str) -> None:
    from kandinsky.ray.model import StoreReporter
    from kandinsky.server.worker import JobCancelled

    store = recorder(stop_at=5)  # answers False from the 5th step on
    reporter = StoreReporter(store, "key", preview_every=0)
    reporter.interval = 0.0
    steps = [("decoder", 400)]
    with pytest.raises(JobCancelled):
        drive(reporter, 0.01, steps)  # up to 4 s for the answer to come back
    reporter.flush()
    log = [s[:2] for _, sent, _ in ray.get(store.log.remote()) for s in sent]
    assert reporter.cancelled and len(log) >= 5 and log == [("decoder", d) for d in range(1, len(log) + 1)]
    assert len(log) < 400
    # with no store (direct use), nothing is sent and nothing stops
    assert drive(StoreReporter(None, "key")) == [(stage, d, t) for stage, t in LOOPS for d in range(1, t + 1)]


# ============================================================================================== Serve


@pytest.fixture(scope="class")
def app(cluster: str) -> Iterator[str]:
    """The Serve application (2 ingress and 2 model replicas); shut down after the class."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    options = ServeOptions(server=ServerConfig(queue_size=8, api_key=KEY, limits=LIMITS, log_level="warning"),
                           replicas=2, num_cpus_per_replica=0.5, threads_per_replica=1, max_batch_size=2,
                           batch_wait_timeout_s=0.3, ingress_replicas=2, num_cpus_per_ingress=0.05)
    try:
        serve.run(build_app(options), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=WAIT) as c:
            wait_for(lambda: c.get("/healthz").json()["model"] != "loading", what="the model")
            assert c.get("/healthz").json()["model"] == "ready"
        yield url
    finally:
        serve.shutdown()


@pytest.fixture()
def client(app: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=app, timeout=WAIT, headers=AUTH) as c:
        yield c


class TestServe:
    @pytest.mark.timeout(300)  # the first test starts the application
    def test_every_route(self, client: httpx.Client, reference: tuple[np.ndarray, dict[str, Any]]) -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=WAIT) as anonymous:
            assert anonymous.get("/healthz").json()["status"] == "ok"  # public, as in `kandinsky serve`
            assert anonymous.get("/").status_code == 200 and "<html" in anonymous.get("/").text.lower()
            r = anonymous.get("/v1/models")
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        health = client.get("/healthz").json()
        assert health["model"] == "ready" and health["queue"]["capacity"] == 8 and health["queue"]["slots"] == 4
        models = client.get("/v1/models").json()
        model = models["models"][0]
        assert set(model["modes"]) == {"txt2img", "img2img", "inpaint", "mix", "variations"}
        assert model["defaults"]["width"] == 64 and model["threads_per_replica"] == 1 and models["auth"]
        assert models["limits"]["max_steps"] == 200
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/v1/txt2img", "/v1/jobs/{job_id}/events", "/sdapi/v1/txt2img", "/healthz"} <= set(paths)

        # the same image as `kandinsky generate` with one thread, bit for bit
        r = client.post("/v1/txt2img", json={**REF})
        assert r.status_code == 200, r.text
        image = r.json()["images"][0]
        want_pixels, want_record = reference
        assert np.array_equal(pixels(image["image"]), want_pixels)
        assert {k: image["record"][k] for k in want_record} == want_record

        sample = image["image"]
        r = client.post("/v1/img2img", json={"prompt": "a green circle", "image": sample, "strength": 0.5,
                                             "seed": 1, "steps": 4, "prior_steps": 1})
        assert r.status_code == 200 and r.json()["images"][0]["record"]["strength"] == 0.5, r.text
        mask = PIL.Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        r = client.post("/v1/inpaint", json={"prompt": "a square", "image": sample, "mask": png_b64(mask), "seed": 2,
                                             **FAST})
        assert r.status_code == 200 and r.json()["images"][0]["record"]["mode"] == "inpaint", r.text
        r = client.post("/v1/mix", json={"items": [{"text": "a blue square", "weight": 0.3},
                                                   {"image": sample, "weight": 0.7}], "seed": 4, **FAST})
        assert r.status_code == 200 and r.json()["images"][0]["record"]["items"][1]["image"] == "<upload>"
        r = client.post("/v1/variations", json={"image": sample, "seed": 5, "steps": 2})
        assert r.status_code == 200 and r.json()["images"][0]["record"]["mode"] == "variations", r.text

        # the AUTOMATIC1111 subset
        a1111 = {"prompt": "a lighthouse", "seed": 1234, "steps": 2, "cfg_scale": 7, "width": 64, "height": 64,
                 "batch_size": 2, "sampler_name": "DDIM"}
        r = client.post("/sdapi/v1/txt2img", json=a1111)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["all_seeds"] == [1234, 1235] and len(r.json()["images"]) == 2
        r = client.post("/sdapi/v1/img2img", json={**a1111, "batch_size": 1, "init_images": [sample],
                                                   "denoising_strength": 0.5})
        assert r.status_code == 200 and json.loads(r.json()["info"])["denoising_strength"] == 0.5, r.text
        assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
        assert {s["name"] for s in client.get("/sdapi/v1/samplers").json()} >= {"DDIM"}
        assert client.get("/sdapi/v1/options").json()["samples_format"] == "png"
        assert client.get("/sdapi/v1/sd-models").json()[0]["title"]

        # the limits, as `kandinsky serve` checks them
        for body, field in (({"prompt": "x", "steps": 201}, "steps"), ({"prompt": "x", "width": 256, "height": 256},
                                                                       "width"), ({"prompt": "x", "num_images": 3},
                                                                                  "num_images")):
            r = client.post("/v1/txt2img", json=body)
            assert r.status_code == 422 and r.json()["error"].startswith(field), r.text
        assert client.get("/v1/jobs/nope").status_code == 404

    @pytest.mark.timeout(180)
    def test_both_replicas_answer_and_batches_equal_alone(self, client: httpx.Client) -> None:
        bodies = [{"prompt": p, "seed": 20 + k, "steps": 3, "prior_steps": 1, "num_images": 1 + k % 2}
                  for k, p in enumerate(["a red cat", "a blue dog", "an old tree", "a yellow star"])]
        together: dict[int, Any] = {}

        def post(k: int) -> None:
            together[k] = client.post("/v1/txt2img", json=bodies[k])

        threads = [threading.Thread(target=post, args=(k,)) for k in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert all(together[k].status_code == 200 for k in range(len(bodies))), together
        replicas = model_replicas()
        assert len(replicas) == 2 and all(sum(s["batch_sizes"].values()) for s in replicas.values()), replicas
        assert any(s["batch_sizes"].get(2) for s in replicas.values()), replicas  # a batch of two ran
        # one torch thread as configured, also in the thread that runs the jobs (Ray sets OMP_NUM_THREADS itself)
        assert all(s["threads"] == s["run_threads"] == 1 for s in replicas.values()), replicas
        # each caller got its own images and seeds, equal to the same request alone (up to rounding: batching)
        for k, body in enumerate(bodies):
            alone = client.post("/v1/txt2img", json=body).json()["images"]
            got = together[k].json()["images"]
            assert [im["seed"] for im in got] == [body["seed"]] * body["num_images"]
            assert [im["record"] for im in got] == [im["record"] for im in alone]
            for a, b in zip(got, alone, strict=True):
                assert np.abs(pixels(a["image"]) - pixels(b["image"])).max() <= 1
        ingress = {client.get("/healthz").headers[REPLICA] for _ in range(30)}
        assert len(ingress) == 2, ingress

    @pytest.mark.timeout(180)
    def test_async_sse_and_cancel_across_ingress_replicas(self, client: httpx.Client) -> None:
        r = client.post("/v1/txt2img?async=true", json={"prompt": "a red circle", "seed": 7, "steps": 6,
                                                        "prior_steps": 2})
        assert r.status_code == 202, r.text
        job, accepted_by = r.json(), r.headers[REPLICA]
        other = from_other_replica(lambda: client.get(job["url"]), accepted_by)
        assert other.status_code == 200 and other.json()["id"] == job["id"]
        events, streamed_by = sse(client, job["events"])
        names = [e for e, _ in events]
        assert names[:2] == ["queued", "started"] and names[-1] == "done" and names.count("done") == 1
        progress = [(d["stage"], d["done"]) for e, d in events if e == "progress"]
        assert progress == [("prior", 1), ("prior", 2)] + [("decoder", i) for i in range(1, 7)]
        fractions = [d["fraction"] for e, d in events if e == "progress"]
        assert fractions == sorted(fractions) and 0 < fractions[0] < fractions[-1] <= 1
        previews = [d for e, d in events if e == "preview"]
        assert previews and pixels(previews[-1]["image"]).shape == (64, 64, 3)
        assert events[-1][1]["images"][0]["seed"] == 7
        for _ in range(20):  # the replay, from the other ingress replica, has the same events
            replay, replayed_by = sse(client, job["events"])
            if replayed_by != streamed_by:
                break
        assert replayed_by != streamed_by and [e for e, _ in replay] == names
        listed = from_other_replica(lambda: client.get("/v1/jobs"), accepted_by).json()["jobs"]
        assert any(j["id"] == job["id"] and j["state"] == "done" for j in listed)

        # cancel a running job through another ingress replica than the one that took it
        r = client.post("/v1/txt2img?async=true", json={"prompt": "a long one", "seed": 8, "steps": 200,
                                                        "prior_steps": 1})
        long, accepted_by = r.json(), r.headers[REPLICA]
        wait_for(lambda: client.get(long["url"]).json()["progress"]["done"] > 1, what="the long job to run")
        assert client.get("/sdapi/v1/progress").json()["state"]["job"] == long["id"]
        r = from_other_replica(lambda: client.delete(f"/v1/jobs/{long['id']}"), accepted_by)
        assert r.status_code == 200 and r.json()["cancel_requested"], r.text
        events, _ = sse(client, long["events"])
        assert events[-1][0] == "cancelled"
        assert [e for e, d in events if e == "progress" and d["stage"] == "decoder"][-1:]  # it had started
        assert client.get(long["url"]).json()["state"] == "cancelled"
        assert client.post("/v1/txt2img", json={"prompt": "next", "seed": 9, **FAST}).status_code == 200

    @pytest.mark.timeout(240)
    def test_a_replica_dying_fails_its_job_and_the_rest_goes_on(self, client: httpx.Client) -> None:
        jobs = [client.post("/v1/txt2img?async=true", json={"prompt": f"long {k}", "seed": k, "steps": 150,
                                                            "prior_steps": 1}).json() for k in range(2)]
        for job in jobs:
            wait_for(lambda j=job: client.get(j["url"]).json()["progress"]["done"] > 1, what="both jobs to run")
        running = client.get("/healthz").json()["queue"]["running_jobs"]  # job id -> the replica running it
        assert all(running.get(j["id"]) for j in jobs), running
        victim = running[jobs[0]["id"]]["pid"]
        os.kill(victim, signal.SIGKILL)
        states = {j["id"]: wait_for(lambda j=j: (s := client.get(j["url"]).json())["state"] in ("done", "failed") and s,
                                    what="the jobs to end") for j in jobs}
        expected = {j["id"]: "failed" if running[j["id"]]["pid"] == victim else "done" for j in jobs}
        assert {k: s["state"] for k, s in states.items()} == expected, states
        error = states[jobs[0]["id"]]["error"]
        assert "the model replica running this job stopped" in error and "submit it again" in error, error
        r = client.post("/v1/txt2img", json={"prompt": "still serving", "seed": 3, **FAST})
        assert r.status_code == 200, r.text
        assert client.get("/healthz").json()["counts"]["failed"] >= 1


# ============================================================================================== Ray Data

PROMPTS = [
    json.dumps(REF),  # line 1: the reference image
    "# a comment",
    *[f"a painting of a house number {k}" for k in range(3, 8)],
    '--width 63 "a bad size"',  # line 8: refused
    *[f'{{"prompt": "a photo of a cat number {k}", "seed": {1000 + k}}}' for k in range(9, 15)],
    *[f'--prior-steps 2 "an old map number {k}"' for k in range(15, 22)],
]
GOOD = [n for n, line in enumerate(PROMPTS, 1) if not line.startswith("#") and n != 8]


class TestData:
    @pytest.mark.timeout(300)
    def test_batch_killed_then_resumed(self, cluster: str, tmp_path: Path,
                                       reference: tuple[np.ndarray, dict[str, Any]]) -> None:
        from ray.data import DataContext

        source = tmp_path / "prompts.txt"
        source.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
        out = tmp_path / "out"
        cli = [sys.executable, "-m", "kandinsky", "ray", "batch", str(source), "--out", str(out), "--address", cluster,
               "--replicas", "2", "--num-cpus-per-replica", "0.5", "--threads-per-replica", "1", "--steps", "16",
               "--prior-steps", "1", "--seed", "100", "--wait-for-actors", "90"]
        proc = subprocess.Popen([*cli, "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            def entries() -> int:
                try:
                    return len((out / MANIFEST).read_text().splitlines())
                except FileNotFoundError:
                    return 0

            wait_for(lambda: entries() >= 3 or proc.poll() is not None, timeout=200, what="a few images")
            assert proc.poll() is None, proc.communicate()  # still running: killed in the middle
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        before = {int(p.name[:5]) for p in out.glob("[0-9]*.png")}
        assert 3 <= len(before) < len(GOOD), before

        errors: list[str] = []
        context = DataContext.get_current()
        waited = context.wait_for_min_actors_s
        try:
            ds = generate_dataset(source, out, defaults={"steps": 16, "prior_steps": 1}, actors=2,
                                  num_cpus_per_actor=0.5, threads_per_actor=1, wait_for_actors_s=90,
                                  on_error=errors.append)
            rows = ds.take_all()
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                context.wait_for_min_actors_s = waited
        assert errors == [f"{source}:8: argument -W/--width: width must be a positive multiple of 8, got 63"]
        assert not [r for r in rows if r["error"]] and all(r["rendered"] for r in rows)
        assert sorted(r["line"] for r in rows) == sorted(set(GOOD) - before)  # only the rest, once each

        # exactly one image per line, each in the manifest once, with its hash; no temporary files left
        files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        images = [f for f in files if f.endswith(".png")]
        assert sorted(int(f[:5]) for f in images) == GOOD and files == [*images, MANIFEST]
        manifest = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
        assert sorted(e["file"] for e in manifest) == images
        assert all(sha256_file(out / e["file"]) == e["sha256"] for e in manifest)
        seeds = {e["line"]: e["seed"] for e in manifest}
        assert seeds[1] == 11 and seeds[9] == 1009 and seeds[3] == 103 and seeds[15] == 115  # own, or 100 + line
        assert not [p for p in out.iterdir() if re.match(r"^\.kandinsky-ray-\d+", p.name)]

        # line 1 is `kandinsky generate`'s image with the same thread count, bit for bit, with the same record
        first = out / next(f for f in images if f.startswith("00001-"))
        want_pixels, want_record = reference
        assert np.array_equal(pixels(first), want_pixels)
        with PIL.Image.open(first) as img:
            assert json.loads(img.info["kandinsky"]) == want_record

        # once more: nothing left to do (the CLI says so, and names the bad line)
        r = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        report = json.loads(r.stdout)
        assert report["images"] == [] and sorted(report["done_already"]) == GOOD and report["base_seed"] == 100
        assert f"{source}:8: argument -W/--width" in r.stderr
