"""Batch generation on Ray Data: a ``--prompts`` file rendered by a pool of actors, each with one pipeline.

The driver reads the file with the command line's own reader (:func:`kandinsky.cli.batch.read_prompts`: text,
options or JSON lines), checks every line as a :class:`~kandinsky.jobs.Job`, gives it its seed and its output
names, and leaves out the lines already done; the rest become a Dataset (``ray.data.from_items``) mapped by
:class:`Renderer` actors (``map_batches`` with ``ActorPoolStrategy(size=N)``).

* Seeds: a line's own ``seed``, else ``base + line number`` (mod 2^32), so an image does not depend on which
  actor renders it or when. The base seed is ``seed=``, else the one kept in ``DIR/.kandinsky-ray-batch.json``
  from the first run, else a new random one (then kept).
* Files: ``NNNNN-prompt.png`` (``NNNNN-K-prompt.png`` for ``num`` > 1), as ``kandinsky generate --prompts`` names
  them, with the same metadata. Each is written to a temporary file, then moved into place atomically
  (``os.link``, which never replaces a file; ``os.replace`` where hard links are not supported): an image is
  whole or absent, and two actors rendering the same line (a retried task) place it once.
* Manifest ``DIR/manifest.jsonl``: one line per image (``line``, ``index``, ``prompt``, ``seed``, ``file``,
  ``sha256``), appended by the actor that placed the image. Each run first reconciles it with the folder
  (entries for missing or changed files dropped, images without an entry added from their own metadata), so
  after any interruption a rerun renders exactly the missing images and the manifest lists each image once.
* Bad lines (unreadable, invalid, or failing when run) are reported as ``FILE:LINE: message``; the others finish.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import metadata
from ..jobs import MODE_KEYS, NEEDS, Job, ModelChoice, load_pipeline, run
from .common import require_ray, set_threads

MANIFEST = "manifest.jsonl"
STATE = ".kandinsky-ray-batch.json"
TEMP = re.compile(r"^\.kandinsky-ray-\d+-[0-9a-f]{8}\.png$")
NAME = re.compile(r"^(\d{5,})-(?:(\d+)-)?.*\.png$")
MODES = ("txt2img", "img2img", "inpaint")
COLUMNS = ("line", "index", "prompt", "seed", "file", "sha256", "rendered", "error")


def derive_seed(base: int, line: int) -> int:
    """The seed of a line without its own: ``base + line`` (mod 2^32)."""
    return (int(base) + int(line)) % 2**32


def output_names(out: Path, line: int, job: Job) -> list[Path]:
    """The files of a line's images (``kandinsky generate --prompts``'s names)."""
    from ..cli.outputs import job_slug

    num, name = job.num or 1, job_slug(job)
    return [out / (f"{line:05d}-{name}.png" if num == 1 else f"{line:05d}-{k + 1}-{name}.png") for k in range(num)]


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class BatchPlan:
    """What a run has to do: ``todo`` (Dataset rows), the lines ``done`` already and the bad lines (``errors``:
    ``(line, message)``)."""

    source: Path
    out: Path
    mode: str
    base_seed: int
    todo: list[dict[str, Any]] = field(default_factory=list)
    done: list[int] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)

    @property
    def images(self) -> int:
        """Images to render."""
        return sum(len(json.loads(row["files"])) for row in self.todo)

    def where(self, line: int) -> str:
        """``FILE:LINE``."""
        return f"{self.source}:{line}"


# ================================================================================================ the driver


def _base_seed(out: Path, seed: int | None) -> int:
    state = out / STATE
    kept = None
    try:
        kept = json.loads(state.read_text(encoding="utf-8")).get("seed")
    except (OSError, ValueError, AttributeError):
        pass
    base = seed if seed is not None else kept if isinstance(kept, int) else secrets.randbelow(2**32)
    if base != kept:
        _write_text(state, json.dumps({"seed": base}) + "\n")
    return base


def _write_text(path: Path, text: str) -> None:
    """Write a small file atomically (temporary file, fsync, os.replace)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def reconcile_manifest(out: Path) -> dict[str, dict[str, Any]]:
    """Make ``DIR/manifest.jsonl`` list exactly the finished images in ``out``, once each; returns its entries by
    file name. Torn or duplicate lines and entries whose file is gone or changed are dropped; finished images
    without an entry (the run was stopped between the two writes) are added from their own metadata."""
    manifest = out / MANIFEST
    entries: dict[str, dict[str, Any]] = {}
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    for text in lines:
        try:
            entry = json.loads(text)
            name = entry["file"]
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a kill
        if name not in entries and (out / name).is_file() and sha256_file(out / name) == entry.get("sha256"):
            entries[name] = entry
    for path in sorted(out.iterdir()):
        m = NAME.match(path.name)
        if not m or path.name in entries or not path.is_file():
            continue
        if not metadata.is_complete(path):
            continue
        try:
            record = metadata.read_record(path)
        except Exception:  # noqa: BLE001 - not one of ours
            continue
        entries[path.name] = {"line": int(m.group(1)), "index": int(m.group(2) or 1) - 1,
                              "prompt": record.get("prompt"), "seed": record.get("seed"), "file": path.name,
                              "sha256": sha256_file(path)}
    ordered = sorted(entries.values(), key=lambda e: (e.get("line", 0), e.get("index", 0), e["file"]))
    text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in ordered)
    if text != "".join(t + "\n" for t in lines):
        _write_text(manifest, text)
    return {e["file"]: e for e in ordered}


def job_fields(job: Job) -> dict[str, Any]:
    """A validated job as JSON-ready fields (the mode's keys that are set; input images as paths)."""
    out = {}
    for key in MODE_KEYS[job.mode]:
        value = getattr(job, key)
        if value is not None:
            out[key] = str(value) if key in ("image", "mask") else value
    return out


def plan_batch(prompts_file: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, mode: str = "txt2img",
               defaults: Mapping[str, Any] | None = None, seed: int | None = None) -> BatchPlan:
    """Read and check a prompts file, give each line its seed and file names, reconcile the manifest and leave
    out the lines whose images are all there. ``defaults``: job fields for lines that do not set them."""
    from ..cli.batch import read_prompts
    from ..cli.common import CLIError, one_line

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    source, out = Path(prompts_file), Path(out_dir)
    lines = read_prompts(source, mode)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    for path in out.iterdir():  # temporary files of a run that was killed
        if TEMP.match(path.name):
            path.unlink(missing_ok=True)
    plan = BatchPlan(source, out, mode, _base_seed(out, seed))
    entries = reconcile_manifest(out)
    for number, parsed in lines:
        try:
            if isinstance(parsed, Exception):
                raise parsed
            values = {**(defaults or {}), **parsed}
            if values.get("seed") is None:
                values["seed"] = derive_seed(plan.base_seed, number)
            job = Job.from_dict(values, mode).validate()
            files = output_names(out, number, job)
        except (ValueError, OSError, CLIError) as exc:
            plan.errors.append((number, one_line(exc)))
            continue
        if all(f.name in entries for f in files):
            plan.done.append(number)
        else:
            plan.todo.append({"line": number, "job": json.dumps(job_fields(job), ensure_ascii=False),
                              "files": json.dumps([str(f) for f in files], ensure_ascii=False)})
    return plan


# ================================================================================================ the actors


class Renderer:
    """A Ray Data actor: one pipeline (``choice``, ``threads`` torch threads), rendering batches of lines."""

    def __init__(self, choice: ModelChoice, mode: str, out: str, threads: int | None = None) -> None:
        self.threads = set_threads(threads)
        self.mode, self.out = mode, Path(out)
        self.pipe, self.model = load_pipeline(choice, NEEDS[mode])

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[Any]]:
        rows: dict[str, list[Any]] = {k: [] for k in COLUMNS}
        for line, job_json, files_json in zip(batch["line"], batch["job"], batch["files"], strict=True):
            fields_ = json.loads(str(job_json))
            files = [Path(f) for f in json.loads(str(files_json))]
            try:
                for row in self.render(int(line), Job.from_dict(fields_, self.mode), files):
                    for k in COLUMNS:
                        rows[k].append(row[k])
            except Exception as exc:  # noqa: BLE001 - one line's failure is that line's error
                message = " ".join(str(exc).split()) or type(exc).__name__
                if not isinstance(exc, ValueError | OSError):
                    message = f"{type(exc).__name__}: {message}"
                for k, v in zip(COLUMNS, (int(line), -1, fields_.get("prompt") or "", int(fields_.get("seed", 0)),
                                          "", "", False, message), strict=True):
                    rows[k].append(v)
        return rows

    def render(self, line: int, job: Job, files: list[Path]) -> list[dict[str, Any]]:
        """Render one line unless its images are all there; place each image once, append it to the manifest."""
        if all(f.is_file() for f in files):  # another actor (a retried task) finished it
            return [self._row(line, i, job, f, sha256_file(f), False) for i, f in enumerate(files)]
        out = []
        for i, ((img, record), final) in enumerate(zip(run(self.pipe, job, model=self.model), files, strict=True)):
            digest, placed = place(img, record, final)
            if placed:
                append_manifest(self.out, {"line": line, "index": i, "prompt": job.prompt, "seed": record.get("seed"),
                                           "file": final.name, "sha256": digest})
            out.append(self._row(line, i, job, final, digest, placed))
        return out

    @staticmethod
    def _row(line: int, index: int, job: Job, path: Path, digest: str, rendered: bool) -> dict[str, Any]:
        return {"line": line, "index": index, "prompt": job.prompt or "", "seed": int(job.seed or 0),
                "file": str(path), "sha256": digest, "rendered": rendered, "error": ""}


def place(image: Any, record: dict[str, Any], final: Path) -> tuple[str, bool]:
    """Write an image with its metadata to a temporary file, then move it to ``final`` atomically unless a file
    is there already; returns (SHA-256 of the bytes, whether this call placed it)."""
    tmp = final.with_name(f".kandinsky-ray-{os.getpid()}-{secrets.token_hex(4)}.png")
    try:
        metadata.save_image(image, tmp, record, overwrite=True)
        with open(tmp, "rb") as f:
            data = f.read()
            os.fsync(f.fileno())
        digest = hashlib.sha256(data).hexdigest()
        try:
            os.link(tmp, final)
        except FileExistsError:
            return sha256_file(final), False
        except OSError:  # no hard links on this file system
            if final.exists():
                return sha256_file(final), False
            os.replace(tmp, final)
        return digest, True
    finally:
        tmp.unlink(missing_ok=True)


def append_manifest(out: Path, entry: dict[str, Any]) -> None:
    """Append one manifest line (one write, then fsync)."""
    data = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(out / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


# ================================================================================================ the dataset


def render(plan: BatchPlan, *, choice: ModelChoice | None = None, actors: int = 1, num_cpus_per_actor: float = 1.0,
           num_gpus_per_actor: float = 0.0, threads_per_actor: int | None = None, batch_size: int = 1,
           wait_for_actors_s: float | None = None) -> Any:
    """The Dataset that renders a plan's lines (lazy: it runs as it is read). One row per image (or per failed
    line, with ``error``): ``line index prompt seed file sha256 rendered error``."""
    ray = require_ray("kandinsky.ray.generate_dataset")
    from ray.data import ActorPoolStrategy, DataContext

    if wait_for_actors_s is not None:
        with warnings.catch_warnings():  # deprecated, but the only way to fail instead of waiting forever
            warnings.simplefilter("ignore", DeprecationWarning)
            DataContext.get_current().wait_for_min_actors_s = wait_for_actors_s
    threads = threads_per_actor or max(1, int(num_cpus_per_actor))
    rows = plan.todo or []
    if not rows:
        return ray.data.from_items([{k: None for k in COLUMNS}]).limit(0)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / max(1, batch_size))))
    return ds.map_batches(Renderer, batch_size=batch_size, batch_format="numpy",
                          compute=ActorPoolStrategy(size=max(1, int(actors))),
                          fn_constructor_kwargs={"choice": choice or ModelChoice(), "mode": plan.mode,
                                                 "out": str(plan.out), "threads": threads},
                          num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor or None)


def generate_dataset(prompts_file: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                     mode: str = "txt2img", defaults: Mapping[str, Any] | None = None, seed: int | None = None,
                     choice: ModelChoice | None = None, actors: int = 1, num_cpus_per_actor: float = 1.0,
                     num_gpus_per_actor: float = 0.0, threads_per_actor: int | None = None, batch_size: int = 1,
                     wait_for_actors_s: float | None = None,
                     on_error: Callable[[str], None] | None = None) -> Any:
    """Render a prompts file into ``out_dir`` with ``actors`` Ray actors; returns the (lazy) Ray Dataset of the
    images rendered (see :func:`render`; read it, e.g. ``ds.take_all()``, to run it). Lines done by an earlier run
    are skipped; bad lines are reported through ``on_error("FILE:LINE: message")`` (default: stderr)."""
    require_ray("kandinsky.ray.generate_dataset")
    plan = plan_batch(prompts_file, out_dir, mode=mode, defaults=defaults, seed=seed)
    report = on_error or (lambda text: print(text, file=sys.stderr))
    for line, message in plan.errors:
        report(f"{plan.where(line)}: {message}")
    return render(plan, choice=choice, actors=actors, num_cpus_per_actor=num_cpus_per_actor,
                  num_gpus_per_actor=num_gpus_per_actor, threads_per_actor=threads_per_actor, batch_size=batch_size,
                  wait_for_actors_s=wait_for_actors_s)
