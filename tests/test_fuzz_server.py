"""Fuzz every operation of the server's OpenAPI schema with schemathesis, against a real ``python -m
kandinsky.server`` (uvicorn on 127.0.0.1, the bundled model, caps of 64×64, 2 steps, 1 image).

Each operation gets a fixed budget of positive (schema-valid) and negative (schema-invalid) cases, derandomized so
CI sees the same cases every run (what they get back can still vary with timing: a full queue answers 429).
Positive cases of the generation routes are often fitted to the caps (steps, sizes, counts) and given real small
images in their image fields, so that decoding and the model run too, with the prompts, guidance scales, samplers,
strengths and weights schemathesis drew. Every response must be: no 5xx; a documented status code and content
type; a body that matches the documented response schema; for 4xx a JSON body with ``detail``, and for 422 an
``error`` line that begins with the offending field. Afterwards the server is alive, its log has no traceback,
and its resident memory is within 100 MB of the value after the warm-up (it levels off at about +50 MB).
The number of cases per operation, with the statuses they got, is printed. ``KANDINSKY_FUZZ_SCALE=10`` multiplies
the budget for a longer local run.
"""

from __future__ import annotations

import base64
import io
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")

import PIL.Image  # noqa: E402
import requests  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from server_helpers import ServerProcess, wait_for  # noqa: E402

SERVER_ARGS = ["--max-pixels", str(64 * 64), "--max-steps", "2", "--max-images", "1", "--max-items", "3",
               "--max-body-bytes", "200000", "--max-upload-bytes", "60000", "--max-upload-pixels", str(128 * 128),
               "--queue-size", "4", "--keep-jobs", "8", "--threads", "1", "--log-level", "warning"]
# examples per operation and generation mode: the whole file runs in about two minutes on two busy cores
BUDGET = {"POST /v1/txt2img": 80, "POST /v1/img2img": 80, "POST /v1/inpaint": 80, "POST /v1/mix": 80,
          "POST /v1/variations": 60, "POST /sdapi/v1/txt2img": 60, "POST /sdapi/v1/img2img": 80}
DEFAULT_BUDGET = 20
SCALE = float(os.environ.get("KANDINSKY_FUZZ_SCALE", "1"))
RSS_SLACK = 100 * 2**20
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
IMAGE_FIELDS = ("image", "mask", "init_images")


# ============================================================================================== the server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = Path(tmp_path_factory.mktemp("fuzz_server")) / "server.log"
    with ServerProcess(SERVER_ARGS, log) as proc:
        proc.wait_ready()
        yield proc


def _tiny_png(width: int, height: int, mode: str, shade: int) -> str:
    colour = {"L": shade, "RGB": (shade, 255 - shade, 128), "RGBA": (shade, 80, 255 - shade, shade)}[mode]
    img = PIL.Image.new(mode, (width, height), colour)
    img.paste({"L": 255 - shade, "RGB": (0, 0, 0), "RGBA": (255, 255, 255, 255)}[mode], (0, 0, width // 2, height))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


real_images = st.builds(_tiny_png, st.integers(1, 80), st.integers(1, 80), st.sampled_from(["RGB", "L", "RGBA"]),
                        st.integers(0, 255))
# values inside the server's caps, put over what schemathesis drew so that many positive cases really run the model
# (schemathesis alone draws sizes and steps far over the caps, or leaves out steps whose default is over them)
within_caps = st.fixed_dictionaries({
    "steps": st.integers(1, 2), "prior_steps": st.sampled_from([1, 2, 2, None]),  # None: the default, over the cap
    "size": st.sampled_from([(None, None), (64, 64), (8, 8), (16, 64), (64, 16), (32, 32), (40, 48), (63, 9)]),
    "num": st.just(1), "strength": st.one_of(st.none(), st.floats(0.05, 1.0)),
})


def _fit_caps(body: Any, props: set[str], fit: dict[str, Any], a1111: bool) -> Any:
    """``body`` with steps, sizes and counts inside the caps (only the fields the operation has)."""
    if not isinstance(body, dict):
        return body
    out = dict(body)
    width, height = fit["size"]
    if width is not None and not a1111:  # /v1 sizes are multiples of 8; A1111 floors them
        width, height = width // 8 * 8 or 8, height // 8 * 8 or 8
    values = {"steps": fit["steps"], "prior_steps": fit["prior_steps"], "width": width, "height": height,
              "num_images": fit["num"], "batch_size": fit["num"], "n_iter": 1}
    if a1111 and width is None:
        values.update(width=64, height=64)  # A1111's default is 512×512
    if fit["strength"] is not None:
        values.update(strength=fit["strength"], denoising_strength=fit["strength"])
    for key, value in values.items():
        if key in props:
            if value is None:
                out.pop(key, None)
            else:
                out[key] = value
    if isinstance(out.get("items"), list):
        out["items"] = out["items"][:3]
    return out


def _with_real_images(body: Any, images: list[str], same: bool) -> Any:
    """``body`` with its image fields (and mix items' images) replaced by real PNGs, in order (or all by the
    first one when ``same``: an inpainting mask of the image's size)."""
    if not isinstance(body, dict) or not images:
        return body
    pool = iter([images[0]] * 8 if same else images)
    out = dict(body)
    for key in IMAGE_FIELDS:
        if isinstance(out.get(key), str):
            out[key] = next(pool, out[key])
        elif isinstance(out.get(key), list) and out[key]:
            out[key] = [next(pool, v) if isinstance(v, str) else v for v in out[key]]
    if isinstance(out.get("items"), list):
        out["items"] = [{**it, "image": next(pool, it["image"])} if isinstance(it, dict) and
                        isinstance(it.get("image"), str) else it for it in out["items"]]
    return out


# ============================================================================================== our own checks


FIELD = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)[\w.\[\]]*: \S")


def _names(case: Any) -> set[str]:
    """Field names a 422 may begin with: the body's properties, the parameters, or the body as a whole."""
    names = {"body", "query", "path", "header"}
    op = case.operation
    for param in op.iter_parameters():
        names.add(param.name)
    body = case.body if isinstance(case.body, dict) else {}
    names.update(str(k) for k in body)
    for content in ((op.definition.raw.get("requestBody") or {}).get("content") or {}).values():
        names.update(_properties(op.schema.raw_schema, content.get("schema") or {}))
    return names


def _properties(spec: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    """The property names of a (possibly ``$ref``) body schema."""
    ref = schema.get("$ref")
    if ref:
        for part in ref.lstrip("#/").split("/"):
            spec = spec[part]
        schema = spec
    return set((schema.get("properties") or {}).keys())


def error_body_names_the_field(case: Any, response: requests.Response) -> str | None:
    """Every 4xx is JSON with a ``detail``; a 422's ``error`` line begins with a field of the request."""
    if not 400 <= response.status_code < 500:
        return None
    if response.status_code == 405:  # Starlette's own answer to a wrong method (schemathesis probes)
        return None
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} without a JSON body: {response.text[:200]!r}"
    if not isinstance(body, dict) or not body.get("detail"):
        return f"{response.status_code} body has no 'detail': {response.text[:200]!r}"
    if response.status_code == 422:
        error, names = body.get("error"), _names(case)
        if not isinstance(error, str):
            return f"422 without an 'error' line: {response.text[:300]!r}"
        m = FIELD.match(error)
        if (m is None or m.group("name") not in names) and not any(error.startswith(f"{n}: ") for n in names):
            return f"422 error does not begin with a field of the request: {error[:300]!r}"
        for item in body["detail"] if isinstance(body["detail"], list) else []:
            loc = [str(p) for p in item.get("loc") or []]
            if loc[:1] in (["body"], ["query"], ["path"], ["header"]) and len(loc) > 1:
                loc = loc[1:]
            if not loc or loc[0] not in names:  # loc[0]: a property, a parameter or a key the body had
                return f"422 detail does not name a field of the request: {item}"
    return None


# ============================================================================================== the fuzzing


def _fuzz_operation(url: str, operation: Any, mode: GenerationMode, budget: int, counts: Counter,
                    statuses: dict[str, Counter], failures: list[str], session: requests.Session,
                    job_ids: Callable[[], list[str]]) -> None:
    label = operation.label
    strategy = operation.as_strategy(generation_mode=mode)
    if "{job_id}" in operation.path and mode is GenerationMode.POSITIVE:  # real jobs as well as unknown ids
        strategy = st.one_of(strategy, *[operation.as_strategy(generation_mode=mode, path_parameters={"job_id": i})
                                         for i in job_ids()])
    body_schema = ((operation.definition.raw.get("requestBody") or {}).get("content") or {}).get(
        "application/json", {}).get("schema") or {}
    props = _properties(operation.schema.raw_schema, body_schema)
    generates = label.startswith("POST") and "steps" in props
    images_too = mode is GenerationMode.POSITIVE and bool(props & {*IMAGE_FIELDS, "items"})
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
    # positive cases: as schemathesis drew them, with steps/sizes fitted to the caps, with real images, or both
    positive = mode is GenerationMode.POSITIVE
    plans = ["as drawn"] + (["fit"] if generates else []) + (["images"] if images_too else []) + (
        ["fit+images"] * 3 if generates and images_too else [])
    extras = st.fixed_dictionaries({
        "plan": st.sampled_from(plans) if positive else st.just("as drawn"),
        "images": st.lists(real_images, min_size=1, max_size=3) if images_too else st.just([]),
        "same": st.booleans(), "fit": within_caps if generates else st.none(),
    })

    @settings(max_examples=budget, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(case=strategy, extra=extras)
    def run(case: Any, extra: dict[str, Any]) -> None:
        if "fit" in extra["plan"]:
            case.body = _fit_caps(case.body, props, extra["fit"], label.startswith("POST /sdapi"))
        if "images" in extra["plan"]:
            case.body = _with_real_images(case.body, extra["images"], extra["same"])
        counts[f"{label} [{mode.value}]"] += 1
        try:
            response = case.call(base_url=url, session=session, timeout=120)
        except requests.RequestException as exc:
            failures.append(f"{label} [{mode.value}]: no response ({type(exc).__name__}: {exc})\n"
                            f"{case.as_curl_command()}")
            return
        statuses.setdefault(f"{label} [{mode.value}]", Counter())[response.status_code] += 1
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as exc:
            titles = ", ".join(sorted({f"{f.title} ({response.status_code})" for f in exc.exceptions}))
            failures.append(f"{label} [{mode.value}]: {titles}\n{str(exc)[:1500]}")
            return
        problem = error_body_names_the_field(case, response)
        if problem:
            failures.append(f"{label} [{mode.value}]: {problem}\n{case.as_curl_command()}")

    try:
        run()
    except Unsatisfiable:
        pass  # no schema-invalid value exists for this operation (e.g. only free-form strings)


@pytest.mark.timeout(900)
def test_fuzz_every_operation(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    url = server.url
    with httpx.Client(base_url=url, timeout=120) as c:  # warm-up: every mode and size the fuzzing runs, twice
        small = _tiny_png(40, 24, "RGB", 90)
        fast = {"steps": 2, "prior_steps": 2, "seed": 1}
        for size in ({"width": 64, "height": 64}, {"width": 8, "height": 8}, {"width": 16, "height": 64}) * 2:
            for path, body in (("/v1/txt2img", {"prompt": "warm-up", **fast}),
                               ("/v1/img2img", {"prompt": "warm-up", "image": small, "strength": 0.5, **fast}),
                               ("/v1/inpaint", {"prompt": "warm-up", "image": small, "mask": small, **fast}),
                               ("/v1/mix", {"items": [{"text": "a"}, {"image": small}], **fast}),
                               ("/v1/variations", {"image": small, "steps": 2, "seed": 1}),
                               ("/sdapi/v1/txt2img", {"prompt": "warm-up", "steps": 2, "batch_size": 1}),
                               ("/sdapi/v1/img2img", {"prompt": "warm-up", "steps": 2, "init_images": [small],
                                                      "mask": small})):
                r = c.post(path, json={**body, **size})
                assert r.status_code == 200, (path, r.text)
    baseline = server.rss()

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations() if hasattr(result, "ok")]
    labels = {op.label for op in operations}
    for expected in ("POST /v1/txt2img", "POST /v1/mix", "POST /v1/img2img", "POST /v1/inpaint",
                     "POST /v1/variations", "GET /v1/jobs/{job_id}", "GET /v1/jobs/{job_id}/events",
                     "DELETE /v1/jobs/{job_id}", "GET /v1/models", "GET /healthz", "POST /sdapi/v1/txt2img",
                     "POST /sdapi/v1/img2img", "GET /sdapi/v1/progress"):
        assert expected in labels, (expected, sorted(labels))

    def job_ids() -> list[str]:  # jobs the server remembers now (running, queued or finished)
        return [j["id"] for j in requests.get(f"{url}/v1/jobs", timeout=30).json()["jobs"][:3]]

    counts: Counter[str] = Counter()
    statuses: dict[str, Counter[int]] = {}
    failures: list[str] = []
    started = time.monotonic()
    with requests.Session() as session:
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                budget = round(SCALE * BUDGET.get(op.label, DEFAULT_BUDGET))
                _fuzz_operation(url, op, mode, budget, counts, statuses, failures, session, job_ids)
    elapsed = time.monotonic() - started

    with capsys.disabled():
        print(f"\nschemathesis cases per operation ({sum(counts.values())} in {elapsed:.0f} s):")
        for label in sorted(counts):
            shown = " ".join(f"{code}×{n}" for code, n in sorted(statuses.get(label, Counter()).items()))
            print(f"  {counts[label]:4d}  {label:42s} {shown}")

    with httpx.Client(base_url=url, timeout=120) as c:
        health = c.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        wait_for(lambda: c.get("/healthz").json()["queue"]["running"] is None and
                 c.get("/healthz").json()["queue"]["pending"] == 0, what="the queue to drain")
        r = c.post("/v1/txt2img", json={"prompt": "after", "steps": 2, "prior_steps": 2, "seed": 2})
        assert r.status_code == 200, r.text
    after = server.rss()
    grown = after - baseline
    with capsys.disabled():
        print(f"server RSS after the warm-up {baseline / 2**20:.0f} MB, after the fuzzing {after / 2**20:.0f} MB")
    log = server.output()
    distinct: dict[str, str] = {}
    for failure in failures:  # one example of each kind (the operation and the first line of the problem)
        distinct.setdefault(failure.split("\n")[0][:160], failure)
    assert not failures, (f"{len(failures)} failing cases, {len(distinct)} kinds:\n\n"
                          + "\n\n".join(list(distinct.values())[:30]))
    assert "Traceback" not in log, log[-5000:]
    assert grown < RSS_SLACK, f"RSS grew by {grown / 2**20:.0f} MB over the fuzzing"
    assert all(counts[f"{label} [positive]"] > 0 for label in labels), counts
