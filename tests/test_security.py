"""The defences SECURITY.md lists that no other test file proves: no request field reaches the file system, CORS
is off, the server binds to loopback, the API key is compared in constant time."""

from __future__ import annotations

import base64
import builtins
import io
import os
from pathlib import Path

import PIL.Image
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from kandinsky.server import app as app_module  # noqa: E402
from kandinsky.server.app import create_app  # noqa: E402
from kandinsky.server.config import DEFAULT_HOST, ServerConfig  # noqa: E402


class EchoEngine:
    """A model stand-in that returns a small image for any job at once."""

    def load(self) -> None:
        pass

    def info(self) -> dict:
        return {"name": "echo", "modes": ["txt2img", "img2img", "inpaint", "mix", "variations"]}

    def plan(self, job):
        return {"width": 8, "height": 8, "steps": 1, "prior_steps": 1, "units": 1}

    def run(self, job, report):
        return [(PIL.Image.new("RGB", (8, 8)), {"mode": job.mode, "seed": job.seed})]

    def preview(self, *args, **kwargs):
        return None


@pytest.fixture()
def marker(tmp_path):
    """A real PNG at a path a hostile request names: if any request made the server open it, we would see it."""
    path = tmp_path / "secret.png"
    PIL.Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    return path


def test_no_request_field_reaches_the_file_system(marker, monkeypatch):
    opened: list[str] = []
    real_open, real_os_open, real_pil_open = builtins.open, os.open, PIL.Image.open

    def note(target):
        if isinstance(target, str | os.PathLike) and "secret" in str(target):
            opened.append(str(target))

    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (note(f), real_open(f, *a, **k))[1])
    monkeypatch.setattr(os, "open", lambda f, *a, **k: (note(f), real_os_open(f, *a, **k))[1])
    monkeypatch.setattr(PIL.Image, "open", lambda f, *a, **k: (note(f), real_pil_open(f, *a, **k))[1])
    paths = [str(marker), f"file://{marker}", f"../../..{marker}", str(Path(marker).relative_to("/"))]
    statuses = []
    with TestClient(create_app(ServerConfig(log_level="warning"), EchoEngine())) as client:
        for p in paths:
            for route, body in (
                ("/v1/img2img", {"prompt": "x", "image": p}),
                ("/v1/variations", {"image": p}),
                ("/v1/inpaint", {"prompt": "x", "image": p, "mask": p}),
                ("/v1/mix", {"items": [{"image": p, "weight": 1}]}),
                ("/v1/txt2img", {"prompt": p, "negative_prompt": p, "sampler": p}),
                ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [p], "mask": p}),
                ("/sdapi/v1/txt2img", {"prompt": p, "sampler_name": p}),
            ):
                resp = client.post(route, json=body)
                statuses.append(resp.status_code)
                assert resp.status_code in (200, 422), (route, resp.status_code, resp.text[:300])
            for get in (f"/v1/jobs/{p}", f"/{p}", f"/static/{p}", f"/v1/jobs/..%2F..%2F{marker.name}"):
                assert client.get(get).status_code in (404, 422), get
    assert not opened, opened
    assert 422 in statuses


def test_cors_is_off_by_default():
    with TestClient(create_app(ServerConfig(log_level="warning"), EchoEngine())) as client:
        resp = client.get("/healthz", headers={"Origin": "https://evil.example"})
        assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers
        pre = client.options("/v1/txt2img", headers={"Origin": "https://evil.example",
                                                     "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers


def test_loopback_bind_by_default():
    assert DEFAULT_HOST == "127.0.0.1" and ServerConfig().host == "127.0.0.1"
    from kandinsky.cli import build_parser

    args = build_parser(["serve"]).parse_args(["serve"])
    assert args.host == "127.0.0.1"


def test_api_key_is_compared_in_constant_time(monkeypatch):
    """Every key check goes through hmac.compare_digest (a spy counts the calls); a wrong key is 401."""
    calls = []
    real = app_module.hmac.compare_digest
    monkeypatch.setattr(app_module.hmac, "compare_digest", lambda a, b: (calls.append((a, b)), real(a, b))[1])
    with TestClient(create_app(ServerConfig(log_level="warning", api_key="s3cret"), EchoEngine())) as client:
        assert client.post("/v1/txt2img", json={"prompt": "x"}).status_code == 401
        assert client.post("/v1/txt2img", json={"prompt": "x"},
                           headers={"Authorization": "Bearer s3cre"}).status_code == 401
        ok = client.post("/v1/txt2img", json={"prompt": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert PIL.Image.open(io.BytesIO(base64.b64decode(ok.json()["images"][0]["image"]))).size == (8, 8)
    assert len(calls) == 2 and all(b"s3cret" in (a, b) for a, b in calls)
