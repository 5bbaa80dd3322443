"""Generation metadata in images, and model-folder summaries.

Images carry the AUTOMATIC1111 ``parameters`` text (PNG text chunk; EXIF UserComment for JPEG and WebP), which
other tools read::

    a red cat on a sofa
    Negative prompt: blurry
    Steps: 50, Sampler: DDIM, CFG scale: 4.0, Seed: 42, Size: 512x512, Model: kandinsky-2-1, Prior steps: 25, ...

PNGs also carry the same record as JSON in a ``kandinsky`` chunk (exact types and the model folders). A *record*
is a flat dict with the CLI's names: ``mode prompt negative width height steps guidance sampler seed num index
prior_steps prior_guidance strength image mask items frames frame interp model prior inpaint original dtype
compat``.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import secrets
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.PngImagePlugin

PARAMETERS_KEY = "parameters"
JSON_KEY = "kandinsky"
EXIF_IFD, USER_COMMENT = 0x8769, 0x9286
SAMPLER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "p_sampler": "P sampler", "dpmpp_2m": "DPM++ 2M"}

# (A1111 key, record key, type), in the order they are written after Steps/Sampler/CFG scale/Seed/Size/Model.
FIELDS: tuple[tuple[str, str, Any], ...] = (
    ("Denoising strength", "strength", float),
    ("Batch size", "num", int),
    ("Batch pos", "index", int),
    ("Prior steps", "prior_steps", int),
    ("Prior CFG scale", "prior_guidance", float),
    ("Mode", "mode", str),
    ("Mix", "items", "json"),
    ("Morph keys", "items", "json"),
    ("Init image", "image", str),
    ("Mask", "mask", str),
    ("Morph frames", "frames", int),
    ("Morph frame", "frame", int),
    ("Interpolation", "interp", str),
    ("LoRA", "loras", "json"),
    ("Dtype", "dtype", str),
    ("Compat", "compat", str),
    ("Version", "version", str),
)
_PARAM = re.compile(r'\s*(\w[\w \-/+]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


# ---------------------------------------------------------------------------------------------- A1111 text


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if any(c in text for c in ',\n:"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def model_label(record: dict[str, Any]) -> str:
    """The ``Model:`` value: the name of the folder the images came from (``bundled`` for the bundled model)."""
    key = "inpaint" if record.get("mode") == "inpaint" else "model"
    folder = record.get("original") or record.get(key)
    return Path(folder).name if folder else "kandinsky-2.1-bundled"


def build_parameters(record: dict[str, Any]) -> str:
    """The AUTOMATIC1111 ``parameters`` text of a record (prompt, ``Negative prompt:`` line, settings line).

    LoRA adapters appear as A1111 does, ``<lora:NAME:SCALE>`` after the prompt, and (with their paths) as the
    ``LoRA`` setting."""
    lines = [(record.get("prompt") or "") + lora_tags(record.get("loras"))]
    if record.get("negative") is not None:
        lines.append(f"Negative prompt: {record['negative']}")
    params: list[tuple[str, Any]] = []
    for key, name in (("steps", "Steps"), ("sampler", "Sampler"), ("guidance", "CFG scale"), ("seed", "Seed")):
        if record.get(key) is not None:
            value = SAMPLER_NAMES.get(record[key], record[key]) if key == "sampler" else record[key]
            params.append((name, value))
    if record.get("width") is not None and record.get("height") is not None:
        params.append(("Size", f"{record['width']}x{record['height']}"))
    params.append(("Model", model_label(record)))
    for name, key, kind in FIELDS:
        value = record.get(key)
        if value is None or (key in ("num", "index") and (record.get("num") or 1) <= 1):
            continue
        if key == "items" and (name == "Mix") == (record.get("mode") == "morph"):
            continue
        if key == "compat" and value == "diffusers":  # the default; absent means diffusers
            continue
        params.append((name, json.dumps(value, ensure_ascii=False) if kind == "json" else value))
    lines.append(", ".join(f"{name}: {_quote(value)}" for name, value in params))
    return "\n".join(lines)


_LORA_TAG = re.compile(r"\s*<lora:([^:<>]+):([-+0-9.eE]+)>")


def lora_tag_pattern() -> re.Pattern[str]:
    """The regular expression of A1111's ``<lora:NAME:SCALE>`` prompt tags (name, scale groups)."""
    return _LORA_TAG


def lora_label(path: str) -> str:
    """An adapter's name in ``<lora:NAME:SCALE>``: its file name without the suffix, or its folder's name."""
    name = re.split(r"[\\/]", str(path).rstrip("/\\"))[-1]
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name


def lora_tags(loras: Any) -> str:
    """`` <lora:NAME:SCALE>`` for each (path, scale) of a record (empty for none or a malformed value)."""
    if not isinstance(loras, list):
        return ""
    return "".join(f" <lora:{lora_label(e[0])}:{e[1]:g}>" for e in loras
                   if isinstance(e, list | tuple) and len(e) == 2 and isinstance(e[1], int | float))


def _sampler_id(name: str) -> str:
    for key, label in SAMPLER_NAMES.items():
        if name.lower() in (key, label.lower()):
            return key
    return name


def _float_text(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def parse_parameters(text: str) -> dict[str, Any]:
    """A record from an AUTOMATIC1111 ``parameters`` text. Keys it does not know are kept under ``extra``."""
    lines = text.split("\n")
    last = lines[-1] if lines else ""
    if len(_PARAM.findall(last)) >= 3:
        lines = lines[:-1]
    else:
        last = ""
    prompt: list[str] = []
    negative: list[str] | None = None
    for line in lines:
        if negative is None and line.startswith("Negative prompt:"):
            rest = line[len("Negative prompt:"):]
            negative = [rest[1:] if rest.startswith(" ") else rest]
        elif negative is not None:
            negative.append(line)
        else:
            prompt.append(line)
    text = "\n".join(prompt)
    tags = [(name, float(scale)) for name, scale in _LORA_TAG.findall(text) if _float_text(scale)]
    record: dict[str, Any] = {"prompt": _LORA_TAG.sub("", text) if tags else text,
                              "negative": None if negative is None else "\n".join(negative)}
    if tags:  # A1111's own images name adapters only by tag; ours also carry the paths (the LoRA setting)
        record["loras"] = [[name, scale] for name, scale in tags]
    types = {name: (key, kind) for name, key, kind in FIELDS}
    extra: dict[str, str] = {}
    for name, raw in _PARAM.findall(last):
        value = _unquote(raw)
        try:
            if name == "Steps":
                record["steps"] = int(value)
            elif name == "Sampler":
                record["sampler"] = _sampler_id(value)
            elif name == "CFG scale":
                record["guidance"] = float(value)
            elif name == "Seed":
                record["seed"] = int(value)
            elif name == "Size":
                w, h = value.lower().split("x")
                record["width"], record["height"] = int(w), int(h)
            elif name == "Model":
                record["model_name"] = value
            elif name in types:
                key, kind = types[name]
                record[key] = json.loads(value) if kind == "json" else kind(value)
            else:
                extra[name] = value
        except (ValueError, RecursionError) as exc:  # json.JSONDecodeError is a ValueError
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ValueError(f"cannot read {name!r} = {shown} in the image's parameters: {exc}") from None
    if extra:
        record["extra"] = extra
    return record


# ---------------------------------------------------------------------------------------------- image files


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if not (isinstance(v, float) and not math.isfinite(v))}


def _text_safe(text: str) -> str:
    """``text`` as UTF-8 can carry it: a lone surrogate (an undecodable byte of a file name) becomes ``\\udcXX``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def encode_image(image: PIL.Image.Image, path: Path, record: dict[str, Any]) -> bytes:
    """The bytes of ``image`` saved as ``path``'s type with its metadata (PNG chunks, or EXIF UserComment for
    JPEG/WebP)."""
    text = _text_safe(build_parameters(record))
    suffix = Path(path).suffix.lower()
    kwargs: dict[str, Any] = {}
    if suffix == ".png":
        info = PIL.PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_KEY, text)
        record_json = json.dumps(_json_safe(record), ensure_ascii=False)
        if _text_safe(record_json) != record_json:  # lone surrogates: JSON escapes read back as the same text
            record_json = json.dumps(_json_safe(record))
        info.add_text(JSON_KEY, record_json)
        kwargs = {"format": "PNG", "pnginfo": info}
    elif suffix in (".jpg", ".jpeg", ".webp"):
        exif = PIL.Image.Exif()
        exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\0" + text.encode("utf-16-be")
        kwargs = {"format": "WEBP" if suffix == ".webp" else "JPEG", "exif": exif.tobytes(), "quality": 95}
        image = image.convert("RGB")
    else:
        raise ValueError(f"unsupported image type {Path(path).suffix!r} for {path}; use .png, .jpg or .webp")
    buf = io.BytesIO()
    image.save(buf, **kwargs)
    return buf.getvalue()


def save_image(image: PIL.Image.Image, path: Path, record: dict[str, Any], overwrite: bool = False) -> Path:
    """Write ``image`` with its metadata (PNG chunks, or EXIF UserComment for JPEG/WebP).

    The file appears whole or not at all (:func:`write_atomic`), and never replaces an existing file unless
    ``overwrite``.
    """
    path = Path(path)
    data = encode_image(image, path, record)
    try:
        write_atomic(path, data, overwrite)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; pass --overwrite or choose another --out") from None
    return path


# temporary files of write_atomic: hidden, named by the writing process (stale ones are removed by remove_stale)
TEMP_PATTERN = re.compile(r"^\.kandinsky-(\d+)-[0-9a-f]{8}\.tmp$")


def write_atomic(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` so that the file appears whole or not at all, even if the process is killed or
    the disk fills up: written to a temporary file in the same folder, flushed to disk (fsync), then renamed.

    Without ``overwrite`` an existing ``path`` is never replaced (FileExistsError). On any failure the temporary
    file is removed and an OSError names ``path`` (a full disk: ``errno.ENOSPC``).
    """
    path = Path(path)
    tmp = path.with_name(f".kandinsky-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    placed = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and refuses an existing path
            except FileExistsError:
                raise
            except OSError as exc:  # a file system without hard links: the check and the rename are two steps
                if exc.errno not in _NO_LINKS:
                    raise
                if os.path.lexists(path):
                    raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
                os.replace(tmp, path)
        placed = True
        _fsync_folder(path.parent)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    finally:
        try:
            if not placed or not overwrite:
                os.unlink(tmp)
        except OSError:
            pass
    return path


_NO_LINKS = {errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOSYS, errno.EXDEV,
             getattr(errno, "ENOTSUP", errno.EPERM), getattr(errno, "EOPNOTSUPP", errno.EPERM)}


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale(folder: str | Path) -> list[Path]:
    """Remove the temporary files :func:`write_atomic` left in ``folder`` when a process was killed (those of
    processes that are no longer running); returns them."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = TEMP_PATTERN.match(p.name)
        if m and not _running(int(m.group(1))):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # (on Windows os.kill would end the process: assume it runs)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return pid > 0  # another user's process, or a platform without signals: assume it runs
    return True


def is_complete(path: str | Path) -> bool:
    """True when ``path`` is a whole image file (for a PNG: every chunk there up to the end, each checksum
    right): an output a resumed batch can keep. A file cut short by a crash (or by an older version killed while
    writing) is not."""
    try:
        with PIL.Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001 - anything unreadable is not complete
        return False


def _user_comment(image: PIL.Image.Image) -> str | None:
    try:
        raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    except Exception:  # noqa: BLE001 - broken EXIF just means no metadata
        return None
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes | bytearray):
        return None
    head, body = bytes(raw[:8]), bytes(raw[8:])
    if head == b"UNICODE\0":
        for enc in ("utf-16-be", "utf-16-le"):
            try:
                return body.decode(enc)
            except UnicodeDecodeError:
                continue
    return body.decode("utf-8", errors="replace") if head in (b"ASCII\0\0\0", b"\0" * 8) else None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """``{"parameters": text or None, "record": dict or None}`` from an image file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with PIL.Image.open(path) as img:
            info = dict(img.info)
            text = info.get(PARAMETERS_KEY) or _user_comment(img)
    except PIL.Image.DecompressionBombError as exc:
        raise ValueError(f"cannot read image {path}: too large to open safely ({exc})") from None
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc
    record = None
    if isinstance(info.get(JSON_KEY), str):
        try:
            record = json.loads(info[JSON_KEY])
        except (ValueError, RecursionError):  # broken JSON, a number too long, nesting too deep
            record = None
        if not isinstance(record, dict):
            record = None
    if record is None and isinstance(text, str):
        record = parse_parameters(text)
    return {"parameters": text if isinstance(text, str) else None, "record": record}


# record keys a re-run reads directly (the rest are checked as job fields): the types each may have
_RECORD_TYPES: dict[str, tuple[type, ...]] = {"mode": (str,), "index": (int,), "frame": (int,), "num": (int,),
                                             "dtype": (str,), "compat": (str,), "model": (str,), "prior": (str,),
                                             "inpaint": (str,), "original": (str,)}


def read_record(path: str | Path) -> dict[str, Any]:
    """The generation record of an image (our JSON chunk, else its A1111 text); ValueError if it has none, or if
    a value a re-run reads directly (mode, batch position, frame, model folders, dtype) has the wrong type."""
    meta = read_metadata(path)
    record = meta["record"]
    if not record:
        raise ValueError(f"{path} carries no generation parameters (no 'parameters' text chunk or EXIF comment)")
    for key, types in _RECORD_TYPES.items():
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)
                                  or (isinstance(value, int) and value < 0)):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ValueError(f"{path} records an invalid {key} {shown}")
    return record


# ---------------------------------------------------------------------------------------------- model folders

SUMMARY_KEYS = (
    "_class_name", "in_channels", "out_channels", "block_out_channels", "layers_per_block", "attention_head_dim",
    "cross_attention_dim", "encoder_hid_dim", "num_layers", "num_attention_heads", "embedding_dim",
    "num_embeddings", "hidden_size", "num_hidden_layers", "projection_dim", "image_size", "patch_size",
    "transformerDimSize", "numDims", "latent_channels", "num_vq_embeddings", "vq_embed_dim",
    "num_train_timesteps", "beta_schedule", "prediction_type", "variance_type", "crop_size", "size",
)
CONFIG_FILES = ("config.json", "scheduler_config.json", "preprocessor_config.json")


def count_parameters(path: Path) -> tuple[int, dict[str, int]]:
    """(number of parameters, {dtype: tensors}) of a weights file; safetensors are read from the header only."""
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        tensors = [v for k, v in header.items() if k != "__metadata__"]
        return sum(math.prod(v["shape"]) for v in tensors), dict(Counter(v["dtype"] for v in tensors))
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() for t in tensors), dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def describe_pipeline_folder(folder: Path) -> dict[str, Any]:
    """Components, config summaries, parameter counts and recorded defaults of one diffusers pipeline folder."""
    index = _read_json(folder / "model_index.json")
    out: dict[str, Any] = {"folder": str(folder), "pipeline": index.get("_class_name"), "components": {}}
    total = 0
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or not (folder / name).is_dir():
            continue
        comp: dict[str, Any] = {"class": spec[1] if len(spec) > 1 else None}
        sub = folder / name
        for cfg_name in CONFIG_FILES:
            if (sub / cfg_name).is_file():
                cfg = _read_json(sub / cfg_name)
                comp["config"] = {k: cfg[k] for k in SUMMARY_KEYS if cfg.get(k) is not None and k != "_class_name"}
                break
        weights = sorted(p for p in sub.iterdir() if p.suffix in (".safetensors", ".bin"))
        weights = [p for p in weights if p.suffix == ".safetensors"] or weights
        if weights:
            params, dtypes = 0, Counter()
            for w in weights:
                n, d = count_parameters(w)
                params += n
                dtypes.update(d)
            comp.update(parameters=params, dtypes=dict(dtypes), files=[w.name for w in weights],
                        bytes=sum(w.stat().st_size for w in weights))
            total += params
        out["components"][name] = comp
    out["parameters"] = total
    defaults = folder / "kandinsky_defaults.json"
    if defaults.is_file():
        out["defaults"] = _read_json(defaults)
    return out


def describe_model(folder: str | Path) -> dict[str, Any]:
    """Describe a pipeline folder, or a folder holding ``decoder``/``prior``/``inpaint`` pipeline folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if (folder / "model_index.json").is_file():
        return {"folder": str(folder), "models": {folder.name: describe_pipeline_folder(folder)}}
    models = {p.name: describe_pipeline_folder(p) for p in sorted(folder.iterdir())
              if p.is_dir() and (p / "model_index.json").is_file()}
    if not models:
        raise ValueError(f"{folder} is not a model folder: no model_index.json in it or in its sub-folders")
    return {"folder": str(folder), "models": models}


def format_model_info(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`describe_model`'s result."""
    lines = []
    for role, model in info["models"].items():
        lines.append(f"{role}: {model['pipeline']}  ({_count(model['parameters'])} parameters)  {model['folder']}")
        for name, comp in model["components"].items():
            size = f"  {_count(comp['parameters'])} params, {'/'.join(comp['dtypes'])}" if "parameters" in comp else ""
            lines.append(f"  {name}: {comp['class']}{size}")
            if comp.get("config"):
                lines.append("    " + ", ".join(f"{k}={v}" for k, v in comp["config"].items()))
        if model.get("defaults"):
            lines.append("  defaults: " + ", ".join(f"{k}={v}" for k, v in model["defaults"].items()))
    return "\n".join(lines)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
