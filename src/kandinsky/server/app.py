"""The FastAPI application: the ``/v1`` API, the AUTOMATIC1111 subset, the web page, limits and access."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..jobs import Item, Job, JobError, check_strength, mix_weights, new_seed
from .a1111 import add_a1111_routes
from .config import Limits, ServerConfig
from .engine import Engine, PipelineEngine, round64
from .errors import ERROR_RESPONSES, NOT_FOUND, field_error_response, task_field_error
from .images import FieldError, decode_image, decode_mask
from .loras import LoraLibrary
from .loras import describe as describe_loras
from .schemas import (
    GenerationResponse,
    Img2ImgRequest,
    InpaintRequest,
    JobAccepted,
    JobStatus,
    MixRequest,
    Txt2ImgRequest,
    VariationsRequest,
    sampler_names,
)
from .worker import (
    OUT_OF_MEMORY,
    TERMINAL,
    QueueFull,
    ShuttingDown,
    Task,
    Worker,
    plan_job,
    release_memory,
    request_error,
)

STATIC = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/", "/index.html", "/healthz", "/favicon.ico")
log = logging.getLogger("kandinsky.server")


# ================================================================================================ middleware


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413: by Content-Length up front, else while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                too_big = False
            if too_big:
                await _send_json(send, 413, {"detail": f"request body of {int(length)} bytes is over the limit "
                                                      f"of {self.limit}"})
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, f"request body is over the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


class BearerAuth:
    """With an API key, every route but /healthz and the web page's files needs ``Authorization: Bearer KEY``."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _public(scope.get("path", "")) or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
            return
        await _send_json(send, 401, {"detail": "missing or wrong API key: send 'Authorization: Bearer KEY'"},
                         [(b"www-authenticate", b'Bearer realm="kandinsky"')])


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith("/static/")


async def _send_json(send: Send, status: int, body: dict[str, Any],
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


# ================================================================================================ helpers


def _where(loc: Any) -> str:
    parts = [str(p) for p in (loc or ()) if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _decoder_fields(mode: str, req: Any, limits: Limits, library: LoraLibrary | None = None) -> dict[str, Any]:
    """The job fields every mode shares, with the per-request caps checked."""
    if req.num_images > limits.max_images:
        raise FieldError("num_images", f"{req.num_images} is over the limit of {limits.max_images} images per request")
    for key in ("steps", "prior_steps"):
        value = getattr(req, key, None)
        if value is not None and value > limits.max_steps:
            raise FieldError(key, f"{value} is over the limit of {limits.max_steps}")
    if req.width is not None and req.height is not None and req.width * req.height > limits.max_pixels:
        raise FieldError("width", f"{req.width}×{req.height} = {req.width * req.height} pixels is over the limit "
                                  f"of {limits.max_pixels}")
    fields: dict[str, Any] = {"negative": req.negative_prompt, "width": req.width, "height": req.height,
                              "steps": req.steps, "guidance": req.guidance_scale, "sampler": req.sampler,
                              "seed": req.seed if req.seed is not None else new_seed(), "num": req.num_images}
    if hasattr(req, "prior_steps"):
        fields.update(prior_steps=req.prior_steps, prior_guidance=req.prior_guidance_scale)
    if req.loras:
        fields["loras"] = (library or LoraLibrary(None)).resolve((r.name, r.scale) for r in req.loras)
    return fields


def build_job(mode: str, req: Any, limits: Limits, library: LoraLibrary | None = None) -> Job:
    """The job of a ``/v1`` request: caps checked, uploads decoded (sizes checked before decoding), adapters
    looked up by name, validated."""
    job = Job(mode=mode, prompt=req.prompt, **_decoder_fields(mode, req, limits, library))
    if mode in ("img2img", "inpaint", "variations"):
        job.image = decode_image(req.image, "image", limits)
    if mode == "img2img":
        job.strength = req.strength
    if mode == "inpaint":
        job.mask = decode_mask(req.mask, "mask", limits, job.image.size)
    if mode == "mix":
        if len(req.items) > limits.max_items:
            raise FieldError("items", f"{len(req.items)} items is over the limit of {limits.max_items}")
        weights = mix_weights([it.weight for it in req.items], req.raw_weights, hint="set raw_weights")
        job.items = [Item(text=it.text, weight=w) if it.text is not None else
                     Item(image=decode_image(it.image, f"items[{i}].image", limits), weight=w)
                     for i, (it, w) in enumerate(zip(req.items, weights, strict=True))]
    return job.validate()


# ================================================================================================ the app


def create_app(config: ServerConfig | None = None, engine: Engine | None = None, worker: Any = None) -> FastAPI:
    """The server application. ``engine`` defaults to the bundled model (loaded by the worker thread at
    start-up, so /healthz answers at once and reports ``model: loading`` until it is ready). ``worker``: another
    object with the :class:`~kandinsky.server.worker.Worker` interface (default: a ``Worker`` on ``engine``)."""
    config = config or ServerConfig()
    if engine is None:
        engine = worker.engine if worker is not None else PipelineEngine()
    if worker is None:
        worker = Worker(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)

    app = FastAPI(title="Kandinsky 2.1", version=__version__, lifespan=lifespan,
                  description="Text-to-image, mixing, img2img, inpainting and variations with Kandinsky 2.1. "
                              "Images are base64 PNGs carrying their generation parameters. Every generation "
                              "route answers when the image is ready, or at once with `?async=true` (then follow "
                              "`GET /v1/jobs/{id}` or the event stream `GET /v1/jobs/{id}/events`).")
    app.state.worker, app.state.config, app.state.engine = worker, config, engine
    app.state.loras = LoraLibrary(config.lora_dir)
    app.add_middleware(BodyLimit, limit=config.limits.max_body_bytes)
    if config.api_key:
        app.add_middleware(BearerAuth, key=config.api_key)  # added last = runs first

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail, lines = [], []
        for e in exc.errors():
            where = _where(e.get("loc"))
            msg = e.get("msg", "invalid")
            if e.get("type") == "value_error" and msg.startswith("Value error, "):  # our validators' own words
                msg = msg[len("Value error, "):]
            elif e.get("type") == "extra_forbidden":  # a misspelt option, most likely
                msg = "unknown field (misspelt? /docs lists this route's fields)"
            loc = list(e.get("loc") or ())
            if e.get("type") == "json_invalid":  # FastAPI's loc is ("body", character offset)
                at = f" at character {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
                where, msg, loc = "body", f"malformed JSON: {e.get('ctx', {}).get('error', msg)}{at}", ["body"]
            detail.append({"loc": loc, "msg": msg, "type": e.get("type")})
            lines.append(f"{where}: {msg}")
        return JSONResponse(status_code=422, content={"detail": detail, "error": "; ".join(lines)})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and isinstance(exc.__cause__, ValueError):  # FastAPI could not read the body
            cause = exc.__cause__
            reason = "the body is not UTF-8 text" if isinstance(cause, UnicodeDecodeError) else str(cause)
            return field_error_response("body", f"malformed JSON: {reason}")
        return await http_exception_handler(request, exc)

    @app.exception_handler(JobError)  # FieldError included
    async def _field(request: Request, exc: JobError) -> JSONResponse:
        return field_error_response(exc.field, exc.message)

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse(status_code=429, content={"detail": str(exc), "retry_after": exc.retry_after},
                            headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ShuttingDown)
    async def _stopping(request: Request, exc: ShuttingDown) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(exc)},
                            headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(MemoryError)
    async def _memory(request: Request, exc: MemoryError) -> JSONResponse:  # decoding an upload, say
        log.error("out of memory reading a request to %s", request.url.path)
        release_memory()
        return JSONResponse(status_code=503, content={"detail": OUT_OF_MEMORY})

    app.state.submit = _submitter(worker, config)
    _add_v1_routes(app, worker, config)
    add_a1111_routes(app, worker, config)
    _add_page(app)
    return app


def _submitter(worker: Worker, config: ServerConfig) -> Callable[..., Any]:
    async def submit(make_job: Callable[[], Job], kind: str = "v1") -> Task:
        """Build the job off the event loop (uploads are decoded there), check it against the model, queue it.
        A :class:`JobError` names the request's field (``kind``: ``v1`` or ``a1111``)."""
        if getattr(worker, "draining", False):
            raise ShuttingDown()
        try:
            job = await run_in_threadpool(make_job)
            if worker.ready:
                pipe = getattr(worker.engine, "pipe", None)
                if job.mode == "inpaint" and pipe is not None and pipe.inpaint_model is None:
                    raise FieldError("mask", "this server has no inpainting model (start it with --inpaint DIR)")
                if job.mode == "img2img" and pipe is not None:
                    check_strength(pipe, job.strength)
                await run_in_threadpool(plan_job, worker.engine, job, config, kind)
            elif job.image is not None and job.width is None:
                w, h = round64(job.image.width), round64(job.image.height)
                if w * h > config.limits.max_pixels:
                    raise FieldError("image", f"the output would be {w}×{h} = {w * h} pixels, over the limit of "
                                              f"{config.limits.max_pixels}; give width and height")
        except JobError as exc:
            raise request_error(exc, kind) from None
        return worker.submit(job, kind)

    return submit


def job_result_response(task: Task) -> JSONResponse:
    """The synchronous answer for a finished task: 200 with images, else its error status (422 naming the field,
    409 cancelled, 503 shutting down or out of memory, 500 a crash)."""
    if task.state == "done":
        return JSONResponse(task.response())
    if task.status == 422:
        return task_field_error(task)
    return JSONResponse(status_code=task.status if task.status >= 400 else 500,
                        content={"detail": task.error or task.state, "id": task.id, "state": task.state})


def _add_v1_routes(app: FastAPI, worker: Worker, config: ServerConfig) -> None:
    submit = app.state.submit
    responses: dict[int | str, dict[str, Any]] = {
        202: {"model": JobAccepted, "description": "with ?async=true: the job was queued"}, **ERROR_RESPONSES}

    async def run(request_mode: str, req: Any, is_async: bool) -> Any:
        task = await submit(lambda: build_job(request_mode, req, config.limits, app.state.loras))
        if is_async:
            return JSONResponse(status_code=202, content={
                "id": task.id, "state": task.state, "queue_position": worker.position(task),
                "url": f"/v1/jobs/{task.id}", "events": f"/v1/jobs/{task.id}/events"})
        await task.wait()
        return job_result_response(task)

    async_q = Query(False, alias="async", description="answer at once with a job id instead of waiting")

    @app.post("/v1/txt2img", response_model=GenerationResponse, responses=responses, tags=["generate"])
    async def txt2img(req: Txt2ImgRequest, is_async: bool = async_q) -> Any:
        """Text to image."""
        return await run("txt2img", req, is_async)

    @app.post("/v1/img2img", response_model=GenerationResponse, responses=responses, tags=["generate"])
    async def img2img(req: Img2ImgRequest, is_async: bool = async_q) -> Any:
        """Redraw an image towards a prompt (``strength`` = fraction redrawn)."""
        return await run("img2img", req, is_async)

    @app.post("/v1/inpaint", response_model=GenerationResponse, responses=responses, tags=["generate"])
    async def inpaint(req: InpaintRequest, is_async: bool = async_q) -> Any:
        """Repaint the white part of ``mask``."""
        return await run("inpaint", req, is_async)

    @app.post("/v1/mix", response_model=GenerationResponse, responses=responses, tags=["generate"])
    async def mix(req: MixRequest, is_async: bool = async_q) -> Any:
        """Mix prompts and images with weights in CLIP space."""
        return await run("mix", req, is_async)

    @app.post("/v1/variations", response_model=GenerationResponse, responses=responses, tags=["generate"])
    async def variations(req: VariationsRequest, is_async: bool = async_q) -> Any:
        """New images from one image's CLIP embedding."""
        return await run("variations", req, is_async)

    def find(job_id: str) -> Task:
        task = worker.get(job_id)
        if task is None:
            raise HTTPException(404, f"no job {job_id!r} (unknown, or finished long ago)")
        return task

    @app.get("/v1/jobs", tags=["jobs"])
    async def list_jobs() -> dict[str, Any]:
        """Every job the server remembers, newest first, without results."""
        tasks = sorted(worker.jobs.values(), key=lambda t: t.created, reverse=True)
        return {"jobs": [t.summary(worker.position(t), result=False) for t in tasks]}

    @app.get("/v1/jobs/{job_id}", response_model=JobStatus, tags=["jobs"], responses=NOT_FOUND)
    async def get_job(job_id: str) -> Any:
        """A job's state, progress (``fraction`` in [0, 1]), latest preview and, once done, its result."""
        task = find(job_id)
        return task.summary(worker.position(task))

    async def cancel(job_id: str) -> Any:
        task = find(job_id)
        worker.cancel(task)
        out = task.summary(worker.position(task), result=False)
        out["cancel_requested"] = task.cancel_requested or task.state == "cancelled"
        return out

    app.delete("/v1/jobs/{job_id}", tags=["jobs"], summary="Cancel a job", responses=NOT_FOUND)(cancel)
    app.post("/v1/jobs/{job_id}/cancel", tags=["jobs"], summary="Cancel a job", responses=NOT_FOUND)(cancel)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "Server-Sent Events: queued, started, progress, preview "
                                             "(base64 PNG), then done (the result), failed or cancelled"},
                        **NOT_FOUND})
    async def job_events(job_id: str, last_event_id: str | None = Header(
            None, alias="Last-Event-ID", description="resume after this event (a browser's EventSource sends it "
                                                     "when it reconnects); anything but an event id: from the start")
    ) -> StreamingResponse:
        """Follow a job: every event from the start (or after ``Last-Event-ID``), until it finishes."""
        task = find(job_id)
        try:
            start = max(0, int(last_event_id or "-1") + 1)
        except ValueError:
            start = 0
        return StreamingResponse(_sse(task, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/models", tags=["server"])
    async def models() -> dict[str, Any]:
        """The loaded model, its modes and defaults, the samplers and this server's limits."""
        return {"models": [worker.engine.info()], "state": worker.model_state,
                "samplers": list(sampler_names()), "loras": describe_loras(app.state.loras),
                "limits": config.limits.as_dict(),
                "queue_size": config.queue_size, "auth": bool(config.api_key)}

    @app.get("/healthz", tags=["server"])
    async def healthz() -> dict[str, Any]:
        """Liveness (always 200 while the process serves) with the model's state and the queue."""
        return {"status": "ok", "model": worker.model_state, "error": worker.model_error,
                "queue": worker.queue_info(), "counts": dict(worker.counts), "version": __version__}


async def _sse(task: Task, start: int) -> AsyncIterator[str]:
    index = start
    with task.watch() as w:
        while True:
            events = task.events_since(index)
            for seq, event, data in events:
                yield f"id: {seq}\nevent: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
                index = seq + 1
                if event in TERMINAL:
                    return
            if not events and task.finished_state:  # resumed after the end
                return
            await w.wait(15.0)
            if not task.events_since(index):
                yield ": keep-alive\n\n"


def _add_page(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    @app.get("/index.html", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")
