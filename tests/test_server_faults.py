"""Fault injection on the server: a job that raises, a job that runs out of memory, requests over the caps, and
SIGTERM to a real ``python -m kandinsky.server`` / ``kandinsky serve`` process with a running job and queued ones.

Every test has a timeout (pytest-timeout) and every wait is bounded, so a fault can fail a test but never hang it.
"""

from __future__ import annotations

import base64
import io
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import PIL.Image
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from server_helpers import GateEngine, ServerProcess, running, sse_events, wait_for  # noqa: E402

from kandinsky.jobs import Job  # noqa: E402
from kandinsky.server import Limits, ServerConfig, create_app  # noqa: E402

WAIT = 60.0


class OutOfMemoryError(RuntimeError):
    """Named like torch's CUDA out-of-memory error (``torch.OutOfMemoryError``)."""


class FaultEngine(GateEngine):
    """:class:`GateEngine` whose jobs fail on marked prompts, after their first step (mid-run, as in a real
    pipeline): ``crash: MESSAGE`` raises RuntimeError(MESSAGE), ``oom`` MemoryError, ``cuda-oom`` an
    ``OutOfMemoryError``. Counts the jobs it ran."""

    def __init__(self, steps: int = 2) -> None:
        super().__init__(steps)
        self.runs: list[str] = []

    def plan(self, job: Job) -> dict[str, Any]:  # the real engine's sizes: an input image's, rounded up to 64
        from kandinsky.server.engine import round64

        image = job.image
        width = job.width or (round64(image.width) if image is not None else 8)
        height = job.height or (round64(image.height) if image is not None else 8)
        return {"width": width, "height": height, "steps": job.steps or self.steps,
                "prior_steps": job.prior_steps or 1, "units": self.steps}

    def run(self, job: Job, report: Any) -> list[tuple[PIL.Image.Image, dict[str, Any]]]:
        self.runs.append(job.prompt)
        prompt = job.prompt or ""
        if prompt.startswith(("crash:", "oom", "cuda-oom")):
            report("decoder", 1, self.steps, None)
            if prompt.startswith("crash:"):
                raise RuntimeError(prompt[len("crash:"):].strip())
            if prompt == "oom":
                raise MemoryError()
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().run(job, report)


def post_async(c: httpx.Client, prompt: str, **fields: Any) -> dict[str, Any]:
    r = c.post("/v1/txt2img?async=true", json={"prompt": prompt, **fields})
    assert r.status_code == 202, r.text
    return r.json()


def last_event(c: httpx.Client, job: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return sse_events(c, job["events"])[-1]


# ============================================================================================== a job that raises


@pytest.mark.timeout(120)
def test_exception_fails_only_that_job() -> None:
    engine = FaultEngine()
    app = create_app(ServerConfig(queue_size=4, log_level="critical"), engine)
    with running(app) as url, httpx.Client(base_url=url, timeout=WAIT) as c:
        first = post_async(c, "before")
        assert engine.running.wait(10)
        bad = post_async(c, "crash: the decoder fell over at step 1")
        after = post_async(c, "after")
        assert c.get("/healthz").json()["queue"]["pending"] == 2
        engine.step(100)

        assert last_event(c, first)[0] == "done"
        events = sse_events(c, bad["events"])
        names = [e for e, _ in events]
        assert names[:2] == ["queued", "started"] and "progress" in names  # it failed mid-run
        assert names[-1] == "failed" and names.count("failed") == 1
        assert "the decoder fell over at step 1" in events[-1][1]["error"], events[-1]
        status = c.get(bad["url"]).json()
        assert status["state"] == "failed" and "the decoder fell over at step 1" in status["error"]
        assert status["result"] is None and status["finished"] is not None
        done, data = last_event(c, after)  # the worker went on to the next job
        assert done == "done" and data["images"][0]["width"] == 8

        r = c.post("/v1/txt2img", json={"prompt": "crash: again, synchronously"})  # a crash is a 500 that says why
        assert r.status_code == 500 and "again, synchronously" in r.json()["detail"], r.text
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "crash: in A1111", "steps": 1, "width": 8, "height": 8})
        assert r.status_code == 500 and "in A1111" in r.json()["detail"], r.text
        r = c.post("/v1/txt2img", json={"prompt": "fine", "seed": 4})
        assert r.status_code == 200 and r.json()["images"][0]["seed"] == 4
        health = c.get("/healthz").json()
        assert health["status"] == "ok" and health["model"] == "ready" and health["queue"]["running"] is None
        assert health["counts"]["failed"] == 3 and health["counts"]["done"] == 3, health
        assert engine.runs == ["before", "crash: the decoder fell over at step 1", "after", "crash: again, "
                               "synchronously", "crash: in A1111", "fine"]


# ============================================================================================== out of memory


@pytest.mark.timeout(120)
def test_out_of_memory_fails_the_job_cleanly() -> None:
    engine = FaultEngine()
    engine.step(1000)
    app = create_app(ServerConfig(queue_size=4, log_level="critical"), engine)
    with running(app) as url, httpx.Client(base_url=url, timeout=WAIT) as c:
        for prompt in ("oom", "cuda-oom"):
            job = post_async(c, prompt)
            event, data = last_event(c, job)
            assert event == "failed" and data["error"].startswith("out of memory"), data
            assert "smaller size" in data["error"] and data["status"] == 503
            status = c.get(job["url"]).json()
            assert status["state"] == "failed" and status["error"].startswith("out of memory")
            r = c.post("/v1/txt2img", json={"prompt": prompt})
            assert r.status_code == 503 and r.json()["detail"].startswith("out of memory"), r.text
            r = c.post("/v1/txt2img", json={"prompt": "next", "seed": 8})  # the worker is alive and runs it
            assert r.status_code == 200 and r.json()["images"][0]["seed"] == 8, r.text
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "oom", "steps": 1, "width": 8, "height": 8})
        assert r.status_code == 503 and "out of memory" in r.json()["detail"], r.text
        health = c.get("/healthz").json()
        assert health["model"] == "ready" and health["counts"]["failed"] == 5 and health["counts"]["done"] == 2


@pytest.mark.timeout(120)
def test_out_of_memory_reading_an_upload(monkeypatch: pytest.MonkeyPatch) -> None:
    from kandinsky.server import app as app_module

    def exhausted(*args: Any, **kwargs: Any) -> None:
        raise MemoryError()

    monkeypatch.setattr(app_module, "decode_image", exhausted)
    engine = FaultEngine()
    engine.step(1000)
    app = create_app(ServerConfig(log_level="critical"), engine)
    with running(app) as url, httpx.Client(base_url=url, timeout=WAIT) as c:
        r = c.post("/v1/img2img", json={"prompt": "x", "image": "AAAA"})
        assert r.status_code == 503 and r.json()["detail"].startswith("out of memory"), r.text
        assert c.post("/v1/txt2img", json={"prompt": "x"}).status_code == 200
        assert engine.runs == ["x"]


@pytest.mark.timeout(300)
def test_out_of_memory_inside_the_real_pipeline() -> None:
    """The bundled model runs out of memory in the middle of its decoder loop; the next job on the same model is
    the image it would have been without the failure."""
    from kandinsky.server.engine import PipelineEngine

    class Exhausted(PipelineEngine):
        def run(self, job: Job, report: Any) -> list[tuple[PIL.Image.Image, dict[str, Any]]]:
            if job.prompt != "oom":
                return super().run(job, report)

            def failing(stage: str, done: int, total: int, latents: Any = None) -> None:
                report(stage, done, total, latents)
                if stage == "decoder" and done == 2:
                    raise MemoryError()

            return super().run(job, failing)

    limits = Limits(max_pixels=64 * 64, max_steps=4, max_images=1)
    app = create_app(ServerConfig(limits=limits, log_level="critical", threads=1), Exhausted())
    fast = {"steps": 4, "prior_steps": 2, "seed": 5, "width": 64, "height": 64}
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as c:
        wait_for(lambda: c.get("/healthz").json()["model"] == "ready", timeout=120, what="the model")
        before = c.post("/v1/txt2img", json={"prompt": "a red square", **fast})
        assert before.status_code == 200, before.text
        job = c.post("/v1/txt2img?async=true", json={"prompt": "oom", **fast}).json()
        events = sse_events(c, job["events"])
        assert [(d["stage"], d["done"]) for e, d in events if e == "progress"][-1] == ("decoder", 2)
        assert events[-1][0] == "failed" and events[-1][1]["error"].startswith("out of memory"), events[-1]
        again = c.post("/v1/txt2img", json={"prompt": "a red square", **fast})
        assert again.status_code == 200, again.text
        assert again.json()["images"][0]["image"] == before.json()["images"][0]["image"]


# ============================================================================================== over the caps


@pytest.mark.timeout(120)
def test_too_large_requests_are_refused_up_front() -> None:
    engine = FaultEngine()
    limits = Limits(max_pixels=64 * 64, max_steps=4, max_images=1, max_items=2, max_upload_pixels=128 * 128)
    app = create_app(ServerConfig(limits=limits, log_level="critical"), engine)
    big = PIL.Image.new("RGB", (100, 100), "red")
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    big_b64 = base64.b64encode(buf.getvalue()).decode()
    huge = io.BytesIO()
    PIL.Image.new("L", (200, 200)).save(huge, format="PNG")
    huge_b64 = base64.b64encode(huge.getvalue()).decode()
    cases = [
        ("/v1/txt2img", {"prompt": "x", "width": 128, "height": 128}, "width"),
        ("/v1/txt2img", {"prompt": "x", "width": 64, "height": 72}, "width"),
        ("/v1/txt2img", {"prompt": "x", "steps": 5}, "steps"),
        ("/v1/txt2img", {"prompt": "x", "prior_steps": 5}, "prior_steps"),
        ("/v1/txt2img", {"prompt": "x", "num_images": 2}, "num_images"),
        ("/v1/img2img", {"prompt": "x", "image": big_b64}, "image"),  # a 128×128 output from a 100×100 input
        ("/v1/img2img", {"prompt": "x", "image": huge_b64, "width": 64, "height": 64}, "image"),  # upload pixels
        ("/v1/mix", {"items": [{"text": "a"}, {"text": "b"}, {"text": "c"}]}, "items"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 2}, "width"),  # A1111's default 512×512
        ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "width": 64, "height": 64, "n_iter": 2}, "batch_size"),
        ("/sdapi/v1/txt2img", {"prompt": "x", "width": 64, "height": 64}, "steps"),  # A1111's default 50
    ]
    with running(app) as url, httpx.Client(base_url=url, timeout=WAIT) as c:
        for path, body, field in cases:
            for suffix in ("", "?async=true") if path.startswith("/v1/") else ("",):
                r = c.post(path + suffix, json=body, timeout=10)
                assert r.status_code == 422, (path, body, r.text)
                assert r.json()["error"].startswith(field), (path, body, r.json()["error"])
                assert r.json()["detail"][0]["loc"][:2] == ["body", field], r.json()
        health = c.get("/healthz").json()
        assert health["counts"]["submitted"] == 0 and health["queue"]["pending"] == 0  # nothing was queued
        assert engine.runs == [] and c.get("/v1/jobs").json()["jobs"] == []
        engine.step(10)
        r = c.post("/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 4})  # at the caps
        assert r.status_code == 200, r.text


# ============================================================================================== SIGTERM


def _in_thread(target: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = target(*args)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=120) as c:
        return c.post(path, json=body)


def _events(url: str, path: str, first: threading.Event) -> list[tuple[str, dict[str, Any]]]:
    with httpx.Client(base_url=url, timeout=120) as c:
        return sse_events(c, path, first)


def _result(thread: threading.Thread, out: dict[str, Any], timeout: float) -> Any:
    thread.join(timeout)
    assert not thread.is_alive(), "no answer in time"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _running_job(c: httpx.Client) -> dict[str, Any]:
    jobs = [j for j in c.get("/v1/jobs").json()["jobs"] if j["state"] == "running" and j["progress"]["done"] > 0]
    return jobs[0] if jobs else {}


def _stop_with_jobs(proc: ServerProcess, running_body: dict[str, Any], sig: int = signal.SIGTERM
                    ) -> dict[str, Any]:
    """Start a long synchronous job and, once it is sampling, queue two synchronous and one async job (with its
    event stream open); send ``sig``; collect every answer and the exit code."""
    url = proc.url
    proc.wait_ready()
    with httpx.Client(base_url=url, timeout=30) as c:
        run_thread = _in_thread(_post, url, "/v1/txt2img", running_body)
        job = wait_for(lambda: _running_job(c), timeout=120, what="the long job to start sampling")
        streams_open = [threading.Event(), threading.Event()]  # both event streams connected before the signal
        run_events = _in_thread(_events, url, f"/v1/jobs/{job['id']}/events", streams_open[0])
        queued_sync = [_in_thread(_post, url, path, body) for path, body in (
            ("/v1/txt2img", {"prompt": "queued one", "steps": 2, "prior_steps": 2}),
            ("/sdapi/v1/txt2img", {"prompt": "queued two", "steps": 2, "width": 64, "height": 64}))]
        queued = c.post("/v1/txt2img?async=true", json={"prompt": "queued three", "steps": 2, "prior_steps": 2})
        assert queued.status_code == 202, queued.text
        queued_events = _in_thread(_events, url, queued.json()["events"], streams_open[1])
        wait_for(lambda: c.get("/healthz").json()["queue"]["pending"] == 3, timeout=30, what="3 queued jobs")
        wait_for(lambda: all(e.is_set() for e in streams_open), timeout=30, what="both event streams to open")
        assert c.get(f"/v1/jobs/{job['id']}").json()["state"] == "running"
    started = time.monotonic()
    proc.signal(sig)
    try:
        code = proc.wait(45)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within 45 s of {signal.Signals(sig).name}:\n{proc.output()[-3000:]}")
    return {"code": code, "seconds": time.monotonic() - started, "running": _result(*run_thread, 30),
            "running_events": _result(*run_events, 30), "queued_sync": [_result(*t, 30) for t in queued_sync],
            "queued_events": _result(*queued_events, 30), "output": proc.output()}


def _check_queued_cancelled(out: dict[str, Any]) -> None:
    for r in out["queued_sync"]:  # the waiting clients are answered, not dropped
        assert r.status_code == 503, r.text
        assert "shutting down" in r.json()["detail"], r.text
    names = [e for e, _ in out["queued_events"]]
    assert names == ["queued", "cancelled"], names
    assert "shutting down" in out["queued_events"][-1][1]["reason"]
    assert out["code"] == 0, out["output"][-3000:]
    assert "Traceback" not in out["output"], out["output"][-3000:]


@pytest.mark.timeout(240)
def test_sigterm_cancels_the_queue_and_the_running_job_after_the_grace(tmp_path: Path) -> None:
    args = ["--queue-size", "4", "--threads", "1", "--shutdown-grace", "1", "--log-level", "warning"]
    with ServerProcess(args, tmp_path / "server.log") as proc:
        out = _stop_with_jobs(proc, {"prompt": "a long job", "steps": 200, "prior_steps": 2, "num_images": 4})
    _check_queued_cancelled(out)
    assert out["seconds"] < 30, out["seconds"]
    r = out["running"]  # 200 × 4 images take far longer than the 1 s grace: cancelled, and its client told so
    assert r.status_code == 503 and "shutting down" in r.json()["detail"], r.text
    assert out["running_events"][-1][0] == "cancelled", out["running_events"][-1]
    assert "shutting down" in out["running_events"][-1][1]["reason"]


@pytest.mark.timeout(240)
def test_sigterm_lets_the_running_job_finish_within_the_grace(tmp_path: Path) -> None:
    args = ["--queue-size", "4", "--threads", "1", "--shutdown-grace", "25", "--log-level", "warning"]
    with ServerProcess(args, tmp_path / "server.log", cli=True) as proc:  # kandinsky serve
        out = _stop_with_jobs(proc, {"prompt": "a job that finishes", "steps": 60, "prior_steps": 2, "seed": 3})
    _check_queued_cancelled(out)
    assert out["seconds"] < 30, out["seconds"]
    r = out["running"]
    assert r.status_code == 200, r.text
    assert r.json()["images"][0]["seed"] == 3 and r.json()["images"][0]["record"]["steps"] == 60
    assert out["running_events"][-1][0] == "done"


@pytest.mark.timeout(120)
def test_sigint_on_an_idle_server_exits_0(tmp_path: Path) -> None:
    with ServerProcess(["--threads", "1", "--log-level", "warning"], tmp_path / "server.log") as proc:
        proc.wait_ready()
        started = time.monotonic()
        proc.signal(signal.SIGINT)
        assert proc.wait(30) == 0, proc.output()[-3000:]
        assert time.monotonic() - started < 10
        assert "Traceback" not in proc.output() and "KeyboardInterrupt" not in proc.output(), proc.output()
