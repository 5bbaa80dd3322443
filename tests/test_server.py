"""The HTTP server on a real uvicorn (127.0.0.1, a free port): every route with the bundled model, async jobs,
SSE progress, cancellation, the full queue, auth, every cap, malformed input, and the AUTOMATIC1111 subset.

Timing-sensitive behaviour (queue full, cancellation, client disconnects, A1111 progress) runs on a fake engine
whose steps wait on an event the test controls, so nothing races.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import PIL.Image
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")


from server_helpers import GateEngine, running, sse_events, wait_for  # noqa: E402

from kandinsky.server import Limits, ServerConfig, create_app  # noqa: E402

FAST = {"steps": 2, "prior_steps": 1}  # the bundled model, as few steps as it takes
LIMITS = Limits(max_pixels=128 * 128, max_steps=30, max_images=2, max_items=3, max_body_bytes=2_000_000,
                max_upload_bytes=300_000, max_upload_pixels=512 * 512)
WAIT = 120.0  # seconds: generous bounds for polling on a busy 2-core machine


# ============================================================================================== helpers


def png_b64(img: PIL.Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def decode_png(b64: str) -> PIL.Image.Image:
    img = PIL.Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def error_of(resp: httpx.Response) -> str:
    return resp.json().get("error") or json.dumps(resp.json())


# ============================================================================================== fake engine


@pytest.fixture()
def gate() -> Iterator[tuple[str, GateEngine]]:
    engine = GateEngine()
    app = create_app(ServerConfig(queue_size=1, log_level="warning"), engine)
    with running(app) as url:
        yield url, engine
        engine.step(100)


# ============================================================================================== the real model


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    app = create_app(ServerConfig(queue_size=8, limits=LIMITS, log_level="warning", threads=1))
    with running(app) as url:
        with httpx.Client(base_url=url, timeout=WAIT) as c:
            state = wait_for(lambda: c.get("/healthz").json()["model"] != "loading", what="the model to load")
            assert c.get("/healthz").json()["model"] == "ready", state
        yield url


@pytest.fixture()
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=WAIT) as c:
        yield c


@pytest.fixture(scope="module")
def sample_image(server: str) -> str:
    with httpx.Client(base_url=server, timeout=WAIT) as c:
        r = c.post("/v1/txt2img", json={"prompt": "a red circle on a blue background", "seed": 3, **FAST})
        assert r.status_code == 200, r.text
        return r.json()["images"][0]["image"]


def test_healthz_models_openapi(client: httpx.Client) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == "ready"
    assert health["queue"]["capacity"] == 8
    models = client.get("/v1/models").json()
    model = models["models"][0]
    assert set(model["modes"]) == {"txt2img", "img2img", "inpaint", "mix", "variations"}
    assert model["defaults"]["width"] == 64 and "ddim" in models["samplers"]
    assert models["limits"]["max_pixels"] == LIMITS.max_pixels
    paths = client.get("/openapi.json").json()["paths"]
    for route in ("/v1/txt2img", "/v1/img2img", "/v1/inpaint", "/v1/mix", "/v1/variations", "/v1/jobs/{job_id}",
                  "/v1/jobs/{job_id}/events", "/v1/models", "/healthz", "/sdapi/v1/txt2img", "/sdapi/v1/img2img",
                  "/sdapi/v1/progress"):
        assert route in paths, route


def test_txt2img_returns_png_with_metadata(client: httpx.Client) -> None:
    r = client.post("/v1/txt2img", json={"prompt": "a yellow star", "negative_prompt": "blurry", "seed": 11,
                                         "num_images": 2, **FAST})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "txt2img" and body["seed"] == 11 and len(body["images"]) == 2
    first = body["images"][0]
    img = decode_png(first["image"])
    assert img.format == "PNG" and img.size == (64, 64)
    assert img.info["parameters"] == first["parameters"]
    assert "Seed: 11" in first["parameters"] and "Negative prompt: blurry" in first["parameters"]
    record = json.loads(img.info["kandinsky"])
    assert record["prompt"] == "a yellow star" and record["seed"] == 11 and record["steps"] == 2
    assert [im["index"] for im in body["images"]] == [0, 1]
    again = client.post("/v1/txt2img", json={"prompt": "a yellow star", "negative_prompt": "blurry", "seed": 11,
                                             "num_images": 2, **FAST}).json()
    assert again["images"][1]["image"] == body["images"][1]["image"]  # a seed gives the same image


def test_img2img_inpaint_mix_variations(client: httpx.Client, sample_image: str) -> None:
    r = client.post("/v1/img2img", json={"prompt": "a green circle", "image": sample_image, "strength": 0.5,
                                         "seed": 1, "steps": 4, "prior_steps": 1})
    assert r.status_code == 200, r.text
    assert r.json()["images"][0]["record"]["mode"] == "img2img"
    assert r.json()["images"][0]["record"]["strength"] == 0.5

    mask = PIL.Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    r = client.post("/v1/inpaint", json={"prompt": "a yellow square", "image": sample_image, "mask": png_b64(mask),
                                         "seed": 2, **FAST})
    assert r.status_code == 200, r.text
    assert r.json()["images"][0]["record"]["mode"] == "inpaint"

    r = client.post("/v1/mix", json={"items": [{"text": "a blue square", "weight": 0.3},
                                               {"image": "data:image/png;base64," + sample_image, "weight": 0.7}],
                                     "seed": 4, **FAST})
    assert r.status_code == 200, r.text
    record = r.json()["images"][0]["record"]
    assert record["mode"] == "mix"
    assert [round(it["weight"], 6) for it in record["items"]] == [0.3, 0.7]
    assert record["items"][1]["image"] == "<upload>"

    r = client.post("/v1/variations", json={"image": sample_image, "seed": 5, "steps": 2})
    assert r.status_code == 200, r.text
    assert r.json()["images"][0]["record"]["mode"] == "variations"


def test_async_job_and_sse_progress_in_order(client: httpx.Client) -> None:
    r = client.post("/v1/txt2img?async=true", json={"prompt": "a red circle", "seed": 7, "steps": 6,
                                                    "prior_steps": 2})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["events"] == f"/v1/jobs/{job['id']}/events"
    events = sse_events(client, job["events"])
    names = [e for e, _ in events]
    assert names[0] == "queued" and names[1] == "started" and names[-1] == "done"
    assert names.count("done") == 1 and "failed" not in names
    progress = [d for e, d in events if e == "progress"]
    assert [(p["stage"], p["done"]) for p in progress] == [("prior", 1), ("prior", 2)] + [
        ("decoder", i) for i in range(1, 7)]
    fractions = [p["fraction"] for p in progress]
    assert fractions == sorted(fractions) and 0 < fractions[0] < fractions[-1] <= 1
    previews = [d for e, d in events if e == "preview"]
    assert previews and all(d["stage"] == "decoder" for d in previews)
    preview = decode_png(previews[0]["image"])
    assert preview.mode == "RGB" and preview.size == (64, 64)
    assert names.index("preview") > names.index("progress")
    final = events[-1][1]
    assert final["id"] == job["id"] and final["images"][0]["seed"] == 7

    status = client.get(job["url"]).json()
    assert status["state"] == "done" and status["progress"]["fraction"] == 1.0
    assert status["result"]["images"][0]["image"] == final["images"][0]["image"]
    # the stream replays from the start for a late subscriber (with the last preview's image only), and resumes
    # after Last-Event-ID
    replay = sse_events(client, job["events"])
    assert [e for e, _ in replay] == names
    assert [bool(d.get("image")) for e, d in replay if e == "preview"] == [False] * (len(previews) - 1) + [True]
    with client.stream("GET", job["events"], headers={"Last-Event-ID": str(len(names) - 2)}) as resp:
        tail = [line for line in resp.iter_lines() if line.startswith("event:")]
    assert tail == ["event: done"]
    assert client.get("/v1/jobs/nope").status_code == 404


def test_async_poll_until_done(client: httpx.Client) -> None:
    job = client.post("/v1/variations?async=true", json={"image": png_b64(PIL.Image.new("RGB", (40, 30), "red")),
                                                         "seed": 9, "steps": 2}).json()
    status = wait_for(lambda: (s := client.get(job["url"]).json())["state"] in ("done", "failed") and s,
                      what="the job")
    assert status["state"] == "done", status
    assert status["result"]["images"][0]["seed"] == 9
    assert any(j["id"] == job["id"] for j in client.get("/v1/jobs").json()["jobs"])


# ---------------------------------------------------------------------------------------------- caps and bad input


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "width": 256, "height": 256}, "width"),
    ({"prompt": "x", "steps": 31}, "steps"),
    ({"prompt": "x", "prior_steps": 99}, "prior_steps"),
    ({"prompt": "x", "num_images": 3}, "num_images"),
    ({"prompt": "x", "width": 60}, "width"),
    ({"prompt": "x", "sampler": "euler"}, "sampler"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "guidance_scale": "lots"}, "guidance_scale"),
    ({"prompt": "x", "colour": "red"}, "colour"),
    ({"negative_prompt": "x"}, "prompt"),
])
def test_caps_and_bad_fields_name_the_field(client: httpx.Client, body: dict[str, Any], field: str) -> None:
    r = client.post("/v1/txt2img", json=body)
    assert r.status_code == 422, r.text
    assert error_of(r).startswith(field), error_of(r)


def test_malformed_requests(client: httpx.Client, sample_image: str) -> None:
    r = client.post("/v1/txt2img", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "malformed JSON" in error_of(r)
    r = client.post("/v1/txt2img", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 422
    noise = png_b64(PIL.Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)))  # a truncated copy below
    cases = [
        ("not base64 at all!", "image: is not valid base64"),
        (base64.b64encode(b"plain text, not an image").decode(), "image: is not a readable image"),
        (base64.b64encode(base64.b64decode(noise)[:3000]).decode(), "image: image cannot be decoded"),
        (png_b64(PIL.Image.new("RGB", (8, 8)), "TIFF"), "image: image format TIFF"),
    ]
    for data, message in cases:
        r = client.post("/v1/img2img", json={"prompt": "x", "image": data, **FAST})
        assert r.status_code == 422 and error_of(r).startswith(message), (message, error_of(r))
    r = client.post("/v1/mix", json={"items": [{"text": "a", "image": sample_image}], **FAST})
    assert r.status_code == 422 and error_of(r).startswith("items[0]"), error_of(r)
    r = client.post("/v1/mix", json={"items": [{"text": "a", "weight": 0}], **FAST})
    assert r.status_code == 422 and error_of(r).startswith("items"), error_of(r)
    r = client.post("/v1/mix", json={"items": [{"text": str(i)} for i in range(4)], **FAST})
    assert r.status_code == 422 and "over the limit" in error_of(r)
    r = client.post("/v1/inpaint", json={"prompt": "x", "image": sample_image,
                                         "mask": png_b64(PIL.Image.new("L", (32, 32), 255)), **FAST})
    assert r.status_code == 422 and error_of(r).startswith("mask: mask is 32×32"), error_of(r)
    r = client.post("/v1/img2img", json={"prompt": "x", "image": png_b64(PIL.Image.new("RGB", (300, 300))),
                                         **FAST})
    assert r.status_code == 422 and error_of(r).startswith("image"), error_of(r)  # 320×320 output > cap


def _bomb_header(width: int, height: int) -> bytes:
    """A PNG that claims a huge size: signature, IHDR, one tiny IDAT, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_upload_caps_refuse_before_decoding(client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    import PIL.ImageFile

    decoded = []
    original = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original(self))
    bomb = PIL.Image.new("L", (2000, 2000), 0)  # 4 M pixels in a few kB
    data = png_b64(bomb)
    assert len(data) < LIMITS.max_upload_bytes
    for image in (data, base64.b64encode(_bomb_header(100_000, 100_000)).decode()):
        r = client.post("/v1/img2img", json={"prompt": "x", "image": image, "width": 64, "height": 64, **FAST})
        assert r.status_code == 422, r.text
        assert error_of(r).startswith("image") and "pixels" in error_of(r), error_of(r)
    assert not [size for size in decoded if size[0] * size[1] > LIMITS.max_upload_pixels]
    noise = PIL.Image.frombytes("RGB", (400, 400), os.urandom(400 * 400 * 3))  # 160 k pixels, ~480 kB as PNG
    r = client.post("/v1/img2img", json={"prompt": "x", "image": png_b64(noise), "width": 64, "height": 64})
    assert r.status_code == 422 and "bytes" in error_of(r) and error_of(r).startswith("image"), error_of(r)


def test_body_limit(client: httpx.Client) -> None:
    big = {"prompt": "x" * (LIMITS.max_body_bytes + 10)}
    r = client.post("/v1/txt2img", json=big)
    assert r.status_code == 413
    payload = json.dumps(big).encode()

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        for i in range(0, len(payload), 65536):
            yield payload[i:i + 65536]

    r = client.post("/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text


# ---------------------------------------------------------------------------------------------- A1111


A1111_TXT2IMG = {  # what typical A1111 clients send (several fields this model ignores)
    "enable_hr": False, "denoising_strength": 0, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2,
    "prompt": "a red circle on a blue background", "styles": [], "seed": 1234, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": "Euler a", "batch_size": 2, "n_iter": 1,
    "steps": 2, "cfg_scale": 7, "width": 64, "height": 64, "restore_faces": False, "tiling": False,
    "do_not_save_samples": False, "do_not_save_grid": False, "negative_prompt": "", "eta": 0, "s_churn": 0,
    "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
    "script_args": [], "sampler_index": "Euler", "script_name": "", "send_images": True, "save_images": False,
    "alwayson_scripts": {},
}


def test_a1111_txt2img(client: httpx.Client) -> None:
    r = client.post("/sdapi/v1/txt2img", json=A1111_TXT2IMG)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"} and len(body["images"]) == 2
    info = json.loads(body["info"])
    assert info["seed"] == 1234 and info["all_seeds"] == [1234, 1235]
    assert info["width"] == 64 and info["steps"] == 2 and info["cfg_scale"] == 7
    assert info["sampler_name"] == "DDIM"  # "Euler a" is not ours: the model's default ran, and info says so
    assert len(info["infotexts"]) == 2 and "Seed: 1235" in info["infotexts"][1]
    img = decode_png(body["images"][1])
    assert img.size == (64, 64) and "Seed: 1235" in img.info["parameters"]
    assert body["parameters"]["prompt"] == A1111_TXT2IMG["prompt"]
    # seed + i is each image's own seed: image 2 alone again
    one = client.post("/sdapi/v1/txt2img", json={**A1111_TXT2IMG, "seed": 1235, "batch_size": 1}).json()
    assert one["images"][0] == body["images"][1]


def test_a1111_defaults_and_caps(client: httpx.Client) -> None:
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2})  # A1111's 512×512 is over this cap
    assert r.status_code == 422 and error_of(r).startswith("width"), error_of(r)
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64})  # steps default 50
    assert r.status_code == 422 and error_of(r).startswith("steps"), error_of(r)
    r = client.post("/sdapi/v1/txt2img", json={**A1111_TXT2IMG, "batch_size": 2, "n_iter": 2})
    assert r.status_code == 422 and error_of(r).startswith("batch_size"), error_of(r)
    r = client.post("/sdapi/v1/img2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 2})
    assert r.status_code == 422 and error_of(r).startswith("init_images"), error_of(r)


def test_a1111_img2img_and_inpaint(client: httpx.Client, sample_image: str) -> None:
    base = {"prompt": "a green circle", "negative_prompt": "", "seed": 77, "steps": 4, "cfg_scale": 4,
            "width": 64, "height": 64, "batch_size": 1, "sampler_name": "DDIM", "resize_mode": 0,
            "mask_blur": 4, "inpainting_fill": 1, "inpaint_full_res": False, "include_init_images": False}
    r = client.post("/sdapi/v1/img2img", json={**base, "init_images": ["data:image/png;base64," + sample_image],
                                               "denoising_strength": 0.5})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [77] and info["denoising_strength"] == 0.5
    assert "Mode: img2img" in info["infotexts"][0] and "Denoising strength: 0.5" in info["infotexts"][0]
    mask = PIL.Image.new("RGB", (32, 32), "black")  # another size: resized, as A1111 does
    mask.paste((255, 255, 255), (8, 8, 24, 24))
    r = client.post("/sdapi/v1/img2img", json={**base, "steps": 2, "init_images": [sample_image],
                                               "mask": png_b64(mask)})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["is_using_inpainting_conditioning"] and "Mode: inpaint" in info["infotexts"][0]
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    assert {s["name"] for s in client.get("/sdapi/v1/samplers").json()} >= {"DDIM", "DPM++ 2M"}


# ============================================================================================== queue, cancel, auth


def test_queue_full_429_then_all_complete(gate: tuple[str, GateEngine]) -> None:
    url, engine = gate
    with httpx.Client(base_url=url, timeout=30) as c:
        first = c.post("/v1/txt2img?async=true", json={"prompt": "a", "seed": 1}).json()
        assert engine.running.wait(10)
        second = c.post("/v1/txt2img?async=true", json={"prompt": "b", "seed": 2})
        assert second.status_code == 202 and second.json()["queue_position"] == 1
        third = c.post("/v1/txt2img?async=true", json={"prompt": "c", "seed": 3})
        assert third.status_code == 429, third.text
        assert int(third.headers["Retry-After"]) >= 1 and "queue is full" in third.json()["detail"]
        a1111 = c.post("/sdapi/v1/txt2img", json={"prompt": "d", "steps": 1, "width": 8, "height": 8})
        assert a1111.status_code == 429
        engine.step(6)
        for job_id, seed in ((first["id"], 1), (second.json()["id"], 2)):
            status = wait_for(lambda j=job_id: (s := c.get(f"/v1/jobs/{j}").json())["state"] == "done" and s)
            assert status["result"]["images"][0]["seed"] == seed
        counts = c.get("/healthz").json()["counts"]
        assert counts == {"submitted": 2, "refused": 2, "done": 2, "failed": 0, "cancelled": 0}


def test_cancel_running_and_queued(gate: tuple[str, GateEngine]) -> None:
    url, engine = gate
    with httpx.Client(base_url=url, timeout=30) as c:
        running_job = c.post("/v1/txt2img?async=true", json={"prompt": "a"}).json()
        assert engine.running.wait(10)
        queued_job = c.post("/v1/txt2img?async=true", json={"prompt": "b"}).json()
        engine.step(1)
        wait_for(lambda: c.get(f"/v1/jobs/{running_job['id']}").json()["progress"]["done"] == 1)
        progress = c.get("/sdapi/v1/progress").json()
        assert progress["state"]["job"] == running_job["id"] and progress["state"]["sampling_step"] == 1
        assert progress["state"]["sampling_steps"] == 3 and 0 < progress["progress"] < 1
        assert progress["state"]["job_count"] == 2
        r = c.delete(f"/v1/jobs/{queued_job['id']}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        r = c.post(f"/v1/jobs/{running_job['id']}/cancel")
        assert r.status_code == 200 and r.json()["cancel_requested"]
        events = sse_events(c, running_job["events"])
        assert events[-1][0] == "cancelled"
        assert [e for e, _ in sse_events(c, queued_job["events"])] == ["queued", "cancelled"]
        # the worker is alive and runs the next job
        nxt = c.post("/v1/txt2img?async=true", json={"prompt": "c", "seed": 5}).json()
        engine.step(3)
        assert sse_events(c, nxt["events"])[-1][0] == "done"
        # a synchronous request for a job that is then cancelled answers 409
        holder: dict[str, Any] = {}
        t = threading.Thread(target=lambda: holder.update(r=c.post("/v1/txt2img", json={"prompt": "d"})))
        t.start()
        assert engine.running.wait(10)
        c.post("/sdapi/v1/interrupt")
        t.join(30)
        assert holder["r"].status_code == 409


def test_client_disconnect_does_not_stop_the_worker(gate: tuple[str, GateEngine]) -> None:
    url, engine = gate
    with httpx.Client(base_url=url, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/txt2img", json={"prompt": "gone", "seed": 42})
    with httpx.Client(base_url=url, timeout=30) as c:
        assert engine.running.wait(10)
        engine.step(3)
        jobs = wait_for(lambda: [j for j in c.get("/v1/jobs").json()["jobs"] if j["state"] == "done"])
        assert len(jobs) == 1 and jobs[0]["mode"] == "txt2img"
        engine.step(3)
        r = c.post("/v1/txt2img", json={"prompt": "next", "seed": 43})
        assert r.status_code == 200 and r.json()["images"][0]["seed"] == 43


def test_api_key() -> None:
    engine = GateEngine(steps=1)
    app = create_app(ServerConfig(api_key="s3cret", log_level="warning"), engine)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/").status_code == 200 and "Kandinsky" in c.get("/").text
        assert c.get("/static/app.js").status_code == 200 and c.get("/static/style.css").status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/openapi.json"), ("POST", "/v1/txt2img"),
                             ("GET", "/v1/jobs"), ("GET", "/sdapi/v1/progress"), ("POST", "/sdapi/v1/txt2img")):
            r = c.request(method, path, json={"prompt": "x"})
            assert r.status_code == 401, (path, r.status_code)
            assert r.headers["www-authenticate"].startswith("Bearer")
            r = c.request(method, path, json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401, path
        auth = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=auth).json()["auth"] is True
        engine.step(1)
        r = c.post("/v1/txt2img", json={"prompt": "x", "seed": 1}, headers=auth)
        assert r.status_code == 200 and r.json()["images"][0]["seed"] == 1


def test_no_key_means_open(gate: tuple[str, GateEngine]) -> None:
    url, _ = gate
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/v1/models").status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_serve_cli_options() -> None:
    from kandinsky import cli
    from kandinsky.server import config_from_args

    args = cli.build_parser(["serve"]).parse_args(["serve", "--port", "9001", "--queue-size", "3", "--max-steps",
                                                   "12", "--api-key", "k"])
    config = config_from_args(args)
    assert (config.host, config.port, config.queue_size, config.api_key) == ("127.0.0.1", 9001, 3, "k")
    assert config.limits.max_steps == 12 and config.limits.max_pixels == Limits().max_pixels
    assert cli.build_parser(["serve"]).parse_args(["serve"]).port == 7860


def test_server_module_options() -> None:
    """``python -m kandinsky.server`` parses the options of ``kandinsky serve`` without the command line package."""
    from kandinsky.jobs import ModelChoice
    from kandinsky.server import build_parser, config_from_args

    args = build_parser().parse_args(["--port", "9002", "--model", "dec", "--dtype", "fp16", "--max-images", "2"])
    config = config_from_args(args)
    assert config.port == 9002 and config.limits.max_images == 2
    choice = ModelChoice.from_options(args)
    assert (choice.model, choice.prior, choice.dtype, choice.bundled) == ("dec", None, "fp16", False)
    assert ModelChoice.from_options(build_parser().parse_args([])).bundled


def test_finished_jobs_are_forgotten_oldest_first() -> None:
    engine = GateEngine(steps=1)
    app = create_app(ServerConfig(keep_jobs=2, log_level="warning"), engine)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        engine.step(3)
        ids = [c.post("/v1/txt2img", json={"prompt": str(i)}).json()["id"] for i in range(3)]
        assert c.get(f"/v1/jobs/{ids[0]}").status_code == 404
        assert [c.get(f"/v1/jobs/{i}").json()["state"] for i in ids[1:]] == ["done", "done"]
