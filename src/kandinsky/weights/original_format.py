"""Load the original Kandinsky 2.1 release files (ai-forever/Kandinsky_2.1 and OpenAI's ``ViT-L-14.pt``).

The file set (SPEC 4.3): ``decoder_fp16.ckpt``, ``inpainting_fp16.ckpt`` (optional), ``prior_fp16.ckpt``,
``movq_final.ckpt``, ``ViT-L-14_stats.th``, ``ViT-L-14.pt`` and the ``text_encoder/`` folder (M-CLIP config,
weights and XLM-R tokenizer). The same names with ``.safetensors`` (see ``kandinsky.weights.convert``) are
preferred when present.

Each ``*_from_original`` function renames a checkpoint's tensors to our module names (which are diffusers'),
splitting the fused attention projections (SPEC 4.4), and raises a ValueError that names the file and every
missing or unused tensor. Each ``*_to_original`` function is the exact inverse. Architectures are read off the
tensor shapes; what shapes cannot tell (head width, GroupNorm groups) defaults to the published model and can be
overridden per component with ``configs=``.

Safety: pickle-based files go through ``io.load_file`` (``torch.load(weights_only=True)``, memory-mapped when
the file is a zip archive). OpenAI's ``ViT-L-14.pt`` is a TorchScript archive; :func:`read_torchscript_tensors`
reads its tensor records with a restricted unpickler that can rebuild tensors and nothing else, and never
loads or runs the archive's code.
"""

from __future__ import annotations

import collections
import gzip
import math
import mmap
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..imaging import CLIP_MEAN, CLIP_STD
from ..models.movq import MoVQ, MoVQConfig
from ..models.prior import PriorConfig, PriorTransformer
from ..models.text_encoders import MultilingualCLIP, build_clip_text, build_clip_vision
from ..models.unet import DecoderUNet, UNetConfig
from .diffusers_format import (
    TRANSFORMERS_WEIGHTS,
    DecoderParts,
    PriorParts,
    _ignore_hf_extras,
    _tokenizer,
    resolve_dtype,
)
from .io import PICKLE_SUFFIXES, fill_module, find_weights, load_file, read_json

Tensors = dict[str, torch.Tensor]

# default file names in an original folder, best first; ".safetensors" beats the pickle suffixes
ORIGINAL_FILES: dict[str, tuple[str, ...]] = {
    "decoder": ("decoder_fp16", "decoder"),
    "inpaint": ("inpainting_fp16", "inpainting"),
    "prior": ("prior_fp16", "prior"),
    "movq": ("movq_final", "movq"),
    "clip": ("ViT-L-14",),
    "clip_stats": ("ViT-L-14_stats",),
}
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
TEXT_ENCODER_DIR = "text_encoder"
CLIP_TOKENIZER_DIR = "clip_tokenizer"
OPENAI_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_IMAGE_TOKENS = 10
PRIOR_EXTRA_TOKENS = 4
# tensors an OpenAI CLIP file may hold that neither tower uses
OPENAI_CLIP_EXTRAS = ("logit_scale", "input_resolution", "context_length", "vocab_size")

DDIM_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.00085,
    "beta_end": 0.012, "trained_betas": None, "clip_sample": False, "clip_sample_range": 1.0,
    "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon", "thresholding": False,
    "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "timestep_spacing": "leading",
}
DDPM_CONFIG: dict[str, Any] = {
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.00085,
    "beta_end": 0.012, "trained_betas": None, "variance_type": "learned_range", "clip_sample": False,
    "clip_sample_range": 2.0, "thresholding": True, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 2.0,
    "steps_offset": 0, "prediction_type": "epsilon", "timestep_spacing": "leading",
}
UNCLIP_CONFIG: dict[str, Any] = {
    "_class_name": "UnCLIPScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
    "variance_type": "fixed_small_log", "clip_sample": True, "clip_sample_range": 10.0, "prediction_type": "sample",
}


def clip_image_processor_config(image_size: int = 224) -> dict[str, Any]:
    """OpenAI CLIP preprocessing (SPEC 1.2) as a transformers ``preprocessor_config.json`` mapping."""
    return {
        "crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor", "image_std": list(CLIP_STD), "resample": 3,
        "rescale_factor": 1 / 255, "size": {"shortest_edge": image_size},
    }


# ================================================================================================================
# reading files


class _Inert:
    """Stand-in for every TorchScript class (``__torch__.*``): keeps the pickled state, has no behaviour."""

    __slots__ = ("state",)

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        obj = super().__new__(cls)
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass(frozen=True)
class _StorageKind:
    """What ``torch.<Name>Storage`` unpickles to: just its dtype."""

    dtype: torch.dtype


_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def _rebuild_tensor(storage: Any, offset: int, size: Sequence[int], stride: Sequence[int], *_: Any) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("tensor record without a storage")
    return storage.as_strided(tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _identity(value: Any, *_: Any) -> Any:
    return value


_SAFE_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_floatlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
}


class _ArchiveRecords:
    """The ``data/<key>`` records of a torch zip archive as tensors: memory-mapped when stored uncompressed."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, root: str) -> None:
        self.path, self.archive, self.root = path, archive, root
        self.cache: dict[str, torch.Tensor] = {}
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def tensor(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if key in self.cache:
            return self.cache[key]
        try:
            info = self.archive.getinfo(f"{self.root}data/{key}")
        except KeyError:
            raise pickle.UnpicklingError(f"tensor record data/{key} is missing") from None
        nbytes = int(numel) * torch.empty((), dtype=dtype).element_size()
        if numel < 0 or info.file_size < nbytes:
            raise pickle.UnpicklingError(f"tensor record data/{key} is shorter than its {numel} elements")
        if nbytes == 0:
            flat = torch.empty(0, dtype=dtype)
        elif info.compress_type == zipfile.ZIP_STORED:
            header = self.map[info.header_offset: info.header_offset + 30]
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                raise pickle.UnpicklingError(f"bad zip entry header for data/{key}")
            start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + \
                int.from_bytes(header[28:30], "little")
            if start + nbytes > len(self.map):
                raise pickle.UnpicklingError(f"tensor record data/{key} runs past the end of the file")
            flat = torch.frombuffer(self.map, dtype=dtype, count=int(numel), offset=start)
        else:
            flat = torch.frombuffer(bytearray(self.archive.read(info)[:nbytes]), dtype=dtype)
        self.cache[key] = flat
        return flat


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles tensors, containers and inert module placeholders; any other global is refused."""

    def __init__(self, data: bytes, records: _ArchiveRecords) -> None:
        super().__init__(BytesIO(data))
        self.records = records

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageKind(_STORAGE_DTYPES[name])
        if module == "__torch__" or module.startswith("__torch__."):
            return _Inert
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageKind) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"unsupported persistent record {str(pid)[:80]}")
        return self.records.tensor(pid[2], pid[1].dtype, pid[4])


def _archive_root(archive: zipfile.ZipFile) -> str:
    roots = [n[: -len("data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(roots) != 1:
        raise pickle.UnpicklingError("no single <name>/data.pkl record")
    return roots[0]


def is_torchscript_archive(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript zip archive (it has ``constants.pkl`` or ``code/`` records)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(len(p := n.split("/")) > 1 and p[1] in ("constants.pkl", "code")
                       for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _torchscript_hint(path: Path) -> str:
    out = path.with_suffix(".safetensors")
    return (f"If you trust {path.name}, export its tensors once in a trusted environment, e.g. "
            f"`python -c \"import torch, safetensors.torch as st; m = torch.jit.load('{path}', map_location='cpu'); "
            f"st.save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, '{out}')\"`, "
            "and pass the .safetensors file instead.")


def read_torchscript_tensors(path: str | Path) -> Tensors:
    """Every tensor of a TorchScript archive (e.g. OpenAI's ``ViT-L-14.pt``), keyed by attribute path.

    Reads ``<name>/data.pkl`` with an unpickler that knows only tensor rebuilding, containers and inert
    placeholders for the archive's module classes, and takes tensor bytes from the ``data/`` records
    (memory-mapped). The archive's code is never loaded or run (no ``torch.jit.load``). Besides parameters and
    buffers the result holds tensor-valued attributes (e.g. ``attn_mask``). Raises ValueError naming the file
    when it is corrupt or references anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing weights file: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            root = _archive_root(archive)
            order = archive.read(f"{root}byteorder").decode().strip() if f"{root}byteorder" in archive.namelist() \
                else "little"
            if order != "little":
                raise pickle.UnpicklingError(f"byte order {order!r} is not supported")
            records = _ArchiveRecords(path, archive, root)
            obj = _RestrictedUnpickler(archive.read(f"{root}data.pkl"), records).load()
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refused global"):
            raise ValueError(f"{path} was refused: its data.pkl references a {str(exc)[8:]}, which a weights file "
                             f"never needs (nothing was run). {_torchscript_hint(path)}") from exc
        raise ValueError(f"{path} is not a readable TorchScript archive ({exc})") from exc
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, TypeError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    tensors = _collect(obj)
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    return tensors


def _collect(root: Any) -> Tensors:
    """Tensors reachable through placeholder states and dicts, keyed by dotted attribute path (iteratively)."""
    out: Tensors = {}
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(root, "")]
    while stack:
        obj, prefix = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        state = obj.state if isinstance(obj, _Inert) else obj
        if not isinstance(state, Mapping):
            continue
        for name, value in state.items():
            if not isinstance(name, str):
                continue
            if isinstance(value, torch.Tensor):
                out[prefix + name] = value
            elif isinstance(value, _Inert | Mapping):
                stack.append((value, f"{prefix}{name}."))
    return out


def read_weights(path: str | Path) -> Tensors:
    """Tensors of one weights file: safetensors, a ``weights_only`` pickle, or a TorchScript archive."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing weights file: {path}")
    if path.suffix != ".safetensors" and is_torchscript_archive(path):
        return read_torchscript_tensors(path)
    try:
        return load_file(path)
    except (KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})") from exc


def read_clip_stats(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of CLIP image embeddings from ``ViT-L-14_stats.th`` (a pickled pair, ``weights_only``)
    or from a safetensors/state-dict file with ``mean`` and ``std`` tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing CLIP stats file: {path}")
    obj: Any
    if path.suffix == ".safetensors":
        obj = load_file(path)
    elif is_torchscript_archive(path):  # torch.load would hand it to torch.jit.load
        raise ValueError(f"{path} is a TorchScript archive, not a CLIP stats file (a pickled (mean, std) pair)")
    elif path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as exc:
            raise ValueError(f"{path} needs arbitrary code to unpickle and was refused ({exc}). If you trust it, "
                             "save its (mean, std) tensors with safetensors.torch.save_file({'mean': ..., 'std': ...}) "
                             "in a trusted environment and pass that file.") from exc
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, KeyError, ValueError) as exc:
            raise ValueError(f"{path} is truncated or corrupt: {exc}") from exc
    else:
        raise ValueError(f"unsupported CLIP stats file type {path.suffix!r} ({path})")
    if isinstance(obj, Mapping):
        obj = (obj.get("mean", obj.get("clip_mean")), obj.get("std", obj.get("clip_std")))
    if (not isinstance(obj, tuple | list) or len(obj) != 2 or not all(isinstance(t, torch.Tensor) for t in obj)
            or obj[0].numel() != obj[1].numel() or obj[0].numel() == 0):
        raise ValueError(f"{path} must hold (mean, std): two tensors of the CLIP embedding width")
    return obj[0].reshape(-1), obj[1].reshape(-1)


# ================================================================================================================
# key mapping machinery


@dataclass(frozen=True)
class _Rule:
    """One original tensor <-> one or more of our tensors.

    ``split`` "heads": the original rows are head-major chunks of ``head_dim`` rows dealt round-robin to ``dst``;
    "parts": contiguous equal parts. ``squeeze``: trailing unit kernel dims of the original weight (Conv1d 1,
    1x1 Conv2d 2). ``transpose``: the original stores the matrix as (in, out).
    """

    src: str
    dst: tuple[str, ...]
    split: str | None = None
    head_dim: int = 0
    squeeze: int = 0
    transpose: bool = False
    optional: bool = False

    def forward(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.squeeze and t.ndim > 2:
            if t.ndim != 2 + self.squeeze or any(s != 1 for s in t.shape[2:]):
                raise ValueError(f"{self.src} has shape {tuple(t.shape)}; expected a 1x1 kernel")
            t = t.reshape(t.shape[:2])
        if self.transpose:
            t = t.t().contiguous()
        n = len(self.dst)
        if n == 1:
            return [t]
        rest = tuple(t.shape[1:])
        if self.split == "heads":
            if t.shape[0] % (n * self.head_dim):
                raise ValueError(f"{self.src} has {t.shape[0]} rows, not a multiple of {n} x head width "
                                 f"{self.head_dim}")
            grouped = t.reshape(-1, n, self.head_dim, *rest)
            return [grouped[:, i].reshape(-1, *rest).contiguous() for i in range(n)]
        if t.shape[0] % n:
            raise ValueError(f"{self.src} has {t.shape[0]} rows, which do not split into {n} equal parts")
        return [p.clone() for p in t.chunk(n, 0)]

    def inverse(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if len(parts) == 1:
            t = parts[0]
        elif self.split == "heads":
            rest = tuple(parts[0].shape[1:])
            t = torch.stack([p.reshape(-1, self.head_dim, *rest) for p in parts], 1).reshape(-1, *rest)
        else:
            t = torch.cat(parts, 0)
        if self.transpose:
            t = t.t().contiguous()
        if self.squeeze and t.ndim == 2:
            t = t.reshape(*t.shape, *([1] * self.squeeze))
        return t


class _Rules(list):
    """Builder for a list of ``_Rule``: ``param(src, dst)`` adds the weight and bias of one layer."""

    def param(self, src: str, dst: str | Sequence[str], *, bias: bool = True, **kw: Any) -> None:
        dsts = (dst,) if isinstance(dst, str) else tuple(dst)
        self.append(_Rule(f"{src}.weight", tuple(f"{d}.weight" for d in dsts), **kw))
        if bias:
            kw.pop("transpose", None)
            kw.pop("squeeze", None)
            self.append(_Rule(f"{src}.bias", tuple(f"{d}.bias" for d in dsts), **kw))

    def tensor(self, src: str, dst: str, **kw: Any) -> None:
        self.append(_Rule(src, (dst,), **kw))


def _few(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _apply(rules: Iterable[_Rule], sd: Mapping[str, torch.Tensor], source: str, *, reverse: bool = False,
           ignore: Callable[[str], bool] | None = None) -> Tensors:
    """Rename ``sd`` by ``rules`` (original -> ours, or ours -> original with ``reverse``), strictly."""
    out: Tensors = {}
    used: set[str] = set()
    missing: list[str] = []
    for rule in rules:
        keys = rule.dst if reverse else (rule.src,)
        present = [k for k in keys if k in sd]
        if len(present) != len(keys):
            if present or not rule.optional:
                missing += [k for k in keys if k not in sd]
            continue
        used.update(keys)
        if reverse:
            out[rule.src] = rule.inverse([sd[k] for k in keys])
        else:
            for name, t in zip(rule.dst, rule.forward(sd[rule.src]), strict=True):
                out[name] = t
    unused = sorted(k for k in sd if k not in used and not (ignore and ignore(k)))
    if missing or unused:
        parts = []
        if missing:
            parts.append(f"missing tensors {_few(missing)}")
        if unused:
            parts.append(f"unused tensors {_few(unused)}")
        raise ValueError(f"{source} does not have the expected layout: " + "; ".join(parts))
    return out


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (a regex with one group) at the start of the keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _count(keys: Iterable[str], pattern: str, source: str, what: str) -> int:
    found = _indices(keys, pattern)
    if not found or found != list(range(len(found))):
        raise ValueError(f"{source}: cannot find the {what} (keys matching {pattern!r}: {found})")
    return len(found)


def _get(sd: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"{source} has no tensor {key!r}; is it the right file?")
    return sd[key]


# ================================================================================================================
# UNet


def _unet_layout(sd: Mapping[str, torch.Tensor], source: str) -> tuple[int, int]:
    """(levels, ResBlocks per down level) of an original UNet state dict."""
    outputs = _count(sd, r"output_blocks\.(\d+)\.", source, "output blocks")
    upsamplers = _indices(sd, r"output_blocks\.(\d+)\.[12]\.in_layers\.")
    if not upsamplers or (outputs % (upsamplers[0] + 1)):
        raise ValueError(f"{source}: cannot find the UNet's upsamplers (output_blocks.<i>.2.in_layers.*)")
    layers = upsamplers[0]
    return outputs // (layers + 1), layers


def _unet_rules(levels: int, layers: int, head_dim: int) -> _Rules:
    r = _Rules()

    def res(src: str, dst: str) -> None:
        for a, b in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                     ("out_layers.0", "norm2"), ("out_layers.3", "conv2")):
            r.param(f"{src}.{a}", f"{dst}.{b}")
        r.param(f"{src}.skip_connection", f"{dst}.conv_shortcut", optional=True)

    def attn(src: str, dst: str) -> None:
        r.param(f"{src}.norm", f"{dst}.group_norm")
        r.param(f"{src}.qkv", [f"{dst}.to_q", f"{dst}.to_k", f"{dst}.to_v"], split="heads", head_dim=head_dim,
                squeeze=1)
        r.param(f"{src}.encoder_kv", [f"{dst}.add_k_proj", f"{dst}.add_v_proj"], split="heads",
                head_dim=head_dim, squeeze=1)
        r.param(f"{src}.proj_out", f"{dst}.to_out.0", squeeze=1)

    r.param("time_embed.0", "time_embedding.linear_1")
    r.param("time_embed.2", "time_embedding.linear_2")
    r.param("input_blocks.0.0", "conv_in")
    r.param("ln_model_n", "add_embedding.text_norm")
    r.param("proj_n", "add_embedding.text_proj")
    r.param("img_layer", "add_embedding.image_proj")
    r.param("clip_to_seq", "encoder_hid_proj.image_embeds")
    r.param("to_model_dim_n", "encoder_hid_proj.text_proj")
    per = layers + 1
    for i in range(levels):
        for j in range(layers):
            res(f"input_blocks.{1 + i * per + j}.0", f"down_blocks.{i}.resnets.{j}")
            if i > 0:
                attn(f"input_blocks.{1 + i * per + j}.1", f"down_blocks.{i}.attentions.{j}")
        if i < levels - 1:
            res(f"input_blocks.{1 + i * per + layers}.0", f"down_blocks.{i}.downsamplers.0")
    res("middle_block.0", "mid_block.resnets.0")
    attn("middle_block.1", "mid_block.attentions.0")
    res("middle_block.2", "mid_block.resnets.1")
    for i in range(levels):
        for j in range(per):
            res(f"output_blocks.{i * per + j}.0", f"up_blocks.{i}.resnets.{j}")
            if i < levels - 1:
                attn(f"output_blocks.{i * per + j}.1", f"up_blocks.{i}.attentions.{j}")
        if i < levels - 1:
            res(f"output_blocks.{i * per + layers}.2", f"up_blocks.{i}.upsamplers.0")
    r.param("out.0", "conv_norm_out")
    r.param("out.2", "conv_out")
    return r


def unet_config_from_original(sd: Mapping[str, torch.Tensor], *, source: str = "UNet checkpoint",
                              **overrides: Any) -> dict[str, Any]:
    """The diffusers ``unet/config.json`` of an original UNet (decoder or inpainting), read off its shapes.

    Head width (``attention_head_dim``, 64) and ``norm_num_groups`` (32) cannot be seen in the tensors; they
    take the published values unless given in ``overrides`` (which may override any key).
    """
    levels, layers = _unet_layout(sd, source)
    conv_in = _get(sd, "input_blocks.0.0.weight", source)
    chans = [int(_get(sd, f"input_blocks.{1 + i * (layers + 1)}.0.out_layers.3.weight", source).shape[0])
             for i in range(levels)]
    text_proj = _get(sd, "to_model_dim_n.weight", source)
    cross = int(text_proj.shape[0])
    image = _get(sd, "clip_to_seq.weight", source)
    if tuple(image.shape) != (NUM_IMAGE_TOKENS * cross, cross):
        raise ValueError(f"{source}: clip_to_seq.weight has shape {tuple(image.shape)}, expected "
                         f"({NUM_IMAGE_TOKENS * cross}, {cross})")
    config: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_image",
        "addition_embed_type_num_heads": 64, "attention_head_dim": 64, "block_out_channels": chans,
        "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False,
        "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": cross, "cross_attention_norm": None,
        "down_block_types": ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * (levels - 1),
        "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": int(text_proj.shape[1]),
        "encoder_hid_dim_type": "text_image_proj", "flip_sin_to_cos": True, "freq_shift": 0,
        "in_channels": int(conv_in.shape[1]), "layers_per_block": layers, "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "norm_eps": 1e-5,
        "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False,
        "out_channels": int(_get(sd, "out.2.weight", source).shape[0]), "projection_class_embeddings_input_dim": None,
        "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "scale_shift",
        "sample_size": 64, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
        "time_embedding_type": "positional", "timestep_post_act": None,
        "up_block_types": ["SimpleCrossAttnUpBlock2D"] * (levels - 1) + ["ResnetUpsampleBlock2D"],
        "upcast_attention": False, "use_linear_projection": False,
    }
    config.update(overrides)
    return config


def unet_from_original(sd: Mapping[str, torch.Tensor], *, head_dim: int = 64,
                       source: str = "UNet checkpoint") -> Tensors:
    """Original UNet state dict (``decoder_fp16.ckpt`` / ``inpainting_fp16.ckpt``) -> our (diffusers) names.

    Fused ``qkv`` / ``encoder_kv`` Conv1d weights are split head-major with ``head_dim`` rows per head.
    """
    levels, layers = _unet_layout(sd, source)
    return _apply(_unet_rules(levels, layers, head_dim), sd, source)


def unet_to_original(sd: Mapping[str, torch.Tensor], *, head_dim: int = 64,
                     source: str = "UNet state dict") -> Tensors:
    """Inverse of :func:`unet_from_original`."""
    levels = _count(sd, r"down_blocks\.(\d+)\.", source, "down blocks")
    layers = _count(sd, r"down_blocks\.0\.resnets\.(\d+)\.", source, "ResBlocks of down block 0")
    return _apply(_unet_rules(levels, layers, head_dim), sd, source, reverse=True)


# ================================================================================================================
# prior


def _prior_rules(layers: int, head_dim: int) -> _Rules:
    r = _Rules()
    r.param("model.time_embed.0", "time_embedding.linear_1")
    r.param("model.time_embed.2", "time_embedding.linear_2")
    r.param("model.clip_img_proj", "proj_in")
    r.param("model.text_emb_proj", "embedding_proj")
    r.param("model.text_enc_proj", "encoder_hidden_states_proj")
    r.tensor("model.positional_embedding", "positional_embedding")
    r.tensor("model.prd_emb", "prd_embedding")
    for i in range(layers):
        src, dst = f"model.transformer.resblocks.{i}", f"transformer_blocks.{i}"
        r.param(f"{src}.ln_1", f"{dst}.norm1")
        r.param(f"{src}.attn.c_qkv", [f"{dst}.attn1.to_q", f"{dst}.attn1.to_k", f"{dst}.attn1.to_v"],
                split="heads", head_dim=head_dim)
        r.param(f"{src}.attn.c_proj", f"{dst}.attn1.to_out.0")
        r.param(f"{src}.ln_2", f"{dst}.norm3")
        r.param(f"{src}.mlp.c_fc", f"{dst}.ff.net.0.proj")
        r.param(f"{src}.mlp.c_proj", f"{dst}.ff.net.2")
    r.param("model.final_ln", "norm_out")
    r.param("model.out_proj", "proj_to_clip_embeddings")
    return r


def _with_model_prefix(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Accept a prior state dict saved without the ``model.`` prefix."""
    if "model.positional_embedding" not in sd and "positional_embedding" in sd and "prd_emb" in sd:
        return {f"model.{k}": v for k, v in sd.items()}
    return sd


def prior_config_from_original(sd: Mapping[str, torch.Tensor], *, attention_head_dim: int = 64,
                               source: str = "prior checkpoint", **overrides: Any) -> dict[str, Any]:
    """The diffusers ``prior/config.json`` of an original prior, read off its shapes.

    The head width is 64 unless ``attention_head_dim`` (or ``num_attention_heads`` in ``overrides``) says otherwise.
    """
    sd = _with_model_prefix(sd)
    layers = _count(sd, r"model\.transformer\.resblocks\.(\d+)\.", source, "transformer blocks")
    pos = _get(sd, "model.positional_embedding", source)
    inner = int(pos.shape[-1])
    heads = overrides.pop("num_attention_heads", None)
    if heads:
        attention_head_dim = inner // int(heads)
    if inner % attention_head_dim:
        raise ValueError(f"{source}: width {inner} is not a multiple of the head width {attention_head_dim}")
    ff = _get(sd, "model.transformer.resblocks.0.mlp.c_fc.weight", source)
    if ff.shape[0] != 4 * inner:
        raise ValueError(f"{source}: feed-forward width {ff.shape[0]} is not 4 x {inner}")
    emb = int(_get(sd, "model.clip_img_proj.weight", source).shape[1])
    time_hidden = int(_get(sd, "model.time_embed.0.weight", source).shape[0])
    pooled = int(_get(sd, "model.text_emb_proj.weight", source).shape[1])
    out = int(_get(sd, "model.out_proj.weight", source).shape[0])
    config: dict[str, Any] = {
        "_class_name": "PriorTransformer", "num_attention_heads": inner // attention_head_dim,
        "attention_head_dim": attention_head_dim, "num_layers": layers, "embedding_dim": emb,
        "num_embeddings": int(pos.shape[1]) - PRIOR_EXTRA_TOKENS, "additional_embeddings": PRIOR_EXTRA_TOKENS,
        "dropout": 0.0, "time_embed_act_fn": "silu", "norm_in_type": None, "embedding_proj_norm_type": None,
        "encoder_hid_proj_type": "linear", "added_emb_type": "prd",
        "time_embed_dim": None if time_hidden == inner else time_hidden,
        "embedding_proj_dim": None if pooled == emb else pooled,
        "clip_embed_dim": None if out == emb else out,
    }
    config.update(overrides)
    return config


def prior_from_original(sd: Mapping[str, torch.Tensor], stats: tuple[torch.Tensor, torch.Tensor] | None, *,
                        head_dim: int = 64, source: str = "prior checkpoint") -> Tensors:
    """Original prior (``prior_fp16.ckpt``, keys ``model.*``) plus ``ViT-L-14_stats.th`` -> our names.

    ``c_qkv`` is split head-major; ``stats`` (mean, std) become ``clip_mean`` / ``clip_std`` of shape (1, D).
    """
    sd = _with_model_prefix(sd)
    layers = _count(sd, r"model\.transformer\.resblocks\.(\d+)\.", source, "transformer blocks")
    out = _apply(_prior_rules(layers, head_dim), sd, source)
    if stats is None:
        raise ValueError(f"{source}: the prior needs the CLIP embedding statistics (ViT-L-14_stats.th)")
    width = out["proj_to_clip_embeddings.weight"].shape[0]
    mean, std = (t.reshape(-1) for t in stats)
    if mean.numel() != width or std.numel() != width:
        raise ValueError(f"CLIP stats have {mean.numel()} / {std.numel()} values; the prior ({source}) "
                         f"outputs {width}")
    out["clip_mean"], out["clip_std"] = mean.reshape(1, -1), std.reshape(1, -1)
    return out


def prior_to_original(sd: Mapping[str, torch.Tensor], *, head_dim: int = 64, source: str = "prior state dict"
                      ) -> tuple[Tensors, tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of :func:`prior_from_original`: ``(original state dict, (mean, std))``."""
    sd = dict(sd)
    try:
        stats = (sd.pop("clip_mean").reshape(-1), sd.pop("clip_std").reshape(-1))
    except KeyError:
        raise ValueError(f"{source} has no clip_mean / clip_std") from None
    layers = _count(sd, r"transformer_blocks\.(\d+)\.", source, "transformer blocks")
    return _apply(_prior_rules(layers, head_dim), sd, source, reverse=True), stats


# ================================================================================================================
# MoVQ


def _movq_rules(levels: int, layers: int, enc_attn: set[int], dec_attn: set[int]) -> _Rules:
    """``enc_attn`` / ``dec_attn``: diffusers block indices (encoder down_blocks / decoder up_blocks) with attention."""
    r = _Rules()

    def norm(src: str, dst: str, spatial: bool) -> None:
        if spatial:
            for sub in ("norm_layer", "conv_y", "conv_b"):
                r.param(f"{src}.{sub}", f"{dst}.{sub}")
        else:
            r.param(src, dst)

    def res(src: str, dst: str, spatial: bool) -> None:
        norm(f"{src}.norm1", f"{dst}.norm1", spatial)
        r.param(f"{src}.conv1", f"{dst}.conv1")
        norm(f"{src}.norm2", f"{dst}.norm2", spatial)
        r.param(f"{src}.conv2", f"{dst}.conv2")
        r.param(f"{src}.nin_shortcut", f"{dst}.conv_shortcut", optional=True)

    def attn(src: str, dst: str, spatial: bool) -> None:
        norm(f"{src}.norm", f"{dst}.spatial_norm" if spatial else f"{dst}.group_norm", spatial)
        for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            r.param(f"{src}.{a}", f"{dst}.{b}", squeeze=2)

    def mid(src: str, dst: str, spatial: bool) -> None:
        res(f"{src}.block_1", f"{dst}.resnets.0", spatial)
        attn(f"{src}.attn_1", f"{dst}.attentions.0", spatial)
        res(f"{src}.block_2", f"{dst}.resnets.1", spatial)

    r.param("encoder.conv_in", "encoder.conv_in")
    for i in range(levels):
        for j in range(layers):
            res(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", False)
            if i in enc_attn:
                attn(f"encoder.down.{i}.attn.{j}", f"encoder.down_blocks.{i}.attentions.{j}", False)
        if i < levels - 1:
            r.param(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    mid("encoder.mid", "encoder.mid_block", False)
    r.param("encoder.norm_out", "encoder.conv_norm_out")
    r.param("encoder.conv_out", "encoder.conv_out")
    r.param("quant_conv", "quant_conv")
    r.param("quantize.embedding", "quantize.embedding", bias=False)
    r.param("post_quant_conv", "post_quant_conv")
    r.param("decoder.conv_in", "decoder.conv_in")
    mid("decoder.mid", "decoder.mid_block", True)
    for i in range(levels):
        level = levels - 1 - i  # the original indexes decoder levels by resolution
        for j in range(layers + 1):
            res(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", True)
            if i in dec_attn:
                attn(f"decoder.up.{level}.attn.{j}", f"decoder.up_blocks.{i}.attentions.{j}", True)
        if level > 0:
            r.param(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    norm("decoder.norm_out", "decoder.conv_norm_out", True)
    r.param("decoder.conv_out", "decoder.conv_out")
    return r


def _movq_layout(sd: Mapping[str, torch.Tensor], source: str) -> tuple[int, int, set[int], set[int]]:
    levels = _count(sd, r"encoder\.down\.(\d+)\.", source, "encoder levels")
    layers = _count(sd, r"encoder\.down\.0\.block\.(\d+)\.", source, "encoder ResBlocks")
    enc = set(_indices(sd, r"encoder\.down\.(\d+)\.attn\."))
    dec = {levels - 1 - i for i in _indices(sd, r"decoder\.up\.(\d+)\.attn\.")}
    return levels, layers, enc, dec


def movq_config_from_original(sd: Mapping[str, torch.Tensor], *, source: str = "MoVQ checkpoint",
                              **overrides: Any) -> dict[str, Any]:
    """The diffusers ``movq/config.json`` of an original MoVQ (``norm_num_groups`` 32 unless overridden)."""
    levels, layers, enc, dec = _movq_layout(sd, source)
    codebook = _get(sd, "quantize.embedding.weight", source)
    config: dict[str, Any] = {
        "_class_name": "VQModel", "act_fn": "silu",
        "block_out_channels": [int(_get(sd, f"encoder.down.{i}.block.0.conv1.weight", source).shape[0])
                               for i in range(levels)],
        "down_block_types": ["AttnDownEncoderBlock2D" if i in enc else "DownEncoderBlock2D" for i in range(levels)],
        "up_block_types": ["AttnUpDecoderBlock2D" if i in dec else "UpDecoderBlock2D" for i in range(levels)],
        "in_channels": int(_get(sd, "encoder.conv_in.weight", source).shape[1]),
        "out_channels": int(_get(sd, "decoder.conv_out.weight", source).shape[0]),
        "latent_channels": int(_get(sd, "encoder.conv_out.weight", source).shape[0]),
        "layers_per_block": layers, "norm_num_groups": 32, "norm_type": "spatial",
        "num_vq_embeddings": int(codebook.shape[0]), "vq_embed_dim": int(codebook.shape[1]),
        "sample_size": 32, "scaling_factor": 0.18215, "lookup_from_codebook": False, "force_upcast": False,
        "mid_block_add_attention": True,
    }
    config.update(overrides)
    return config


def movq_from_original(sd: Mapping[str, torch.Tensor], *, source: str = "MoVQ checkpoint") -> Tensors:
    """Original MoVQ (``movq_final.ckpt``) -> our (diffusers ``VQModel``) names; 1x1-conv attention -> linear."""
    return _apply(_movq_rules(*_movq_layout(sd, source)), sd, source)


def movq_to_original(sd: Mapping[str, torch.Tensor], *, source: str = "MoVQ state dict") -> Tensors:
    """Inverse of :func:`movq_from_original`."""
    levels = _count(sd, r"encoder\.down_blocks\.(\d+)\.", source, "encoder levels")
    layers = _count(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", source, "encoder ResBlocks")
    enc = set(_indices(sd, r"encoder\.down_blocks\.(\d+)\.attentions\."))
    dec = set(_indices(sd, r"decoder\.up_blocks\.(\d+)\.attentions\."))
    return _apply(_movq_rules(levels, layers, enc, dec), sd, source, reverse=True)


# ================================================================================================================
# OpenAI CLIP <-> transformers CLIP


def _clip_tower_rules(src: str, dst: str, layers: int) -> _Rules:
    r = _Rules()
    for i in range(layers):
        s, d = f"{src}.resblocks.{i}", f"{dst}.encoder.layers.{i}"
        r.param(f"{s}.ln_1", f"{d}.layer_norm1")
        r.append(_Rule(f"{s}.attn.in_proj_weight", tuple(f"{d}.self_attn.{p}_proj.weight" for p in "qkv"),
                       split="parts"))
        r.append(_Rule(f"{s}.attn.in_proj_bias", tuple(f"{d}.self_attn.{p}_proj.bias" for p in "qkv"),
                       split="parts"))
        r.param(f"{s}.attn.out_proj", f"{d}.self_attn.out_proj")
        r.param(f"{s}.ln_2", f"{d}.layer_norm2")
        r.param(f"{s}.mlp.c_fc", f"{d}.mlp.fc1")
        r.param(f"{s}.mlp.c_proj", f"{d}.mlp.fc2")
    return r


def _clip_text_rules(layers: int) -> _Rules:
    r = _Rules()
    r.tensor("token_embedding.weight", "text_model.embeddings.token_embedding.weight")
    r.tensor("positional_embedding", "text_model.embeddings.position_embedding.weight")
    r.extend(_clip_tower_rules("transformer", "text_model", layers))
    r.param("ln_final", "text_model.final_layer_norm")
    r.tensor("text_projection", "text_projection.weight", transpose=True)
    return r


def _clip_vision_rules(layers: int) -> _Rules:
    r = _Rules()
    r.tensor("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight")
    r.tensor("visual.class_embedding", "vision_model.embeddings.class_embedding")
    r.tensor("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight")
    r.param("visual.ln_pre", "vision_model.pre_layrnorm")
    r.extend(_clip_tower_rules("visual.transformer", "vision_model", layers))
    r.param("visual.ln_post", "vision_model.post_layernorm")
    r.tensor("visual.proj", "visual_projection.weight", transpose=True)
    return r


def _openai_extra(key: str) -> bool:
    return key in OPENAI_CLIP_EXTRAS or key.endswith(".attn_mask")


def _clip_heads(width: int, head_dim: int, given: Any, source: str, part: str) -> int:
    """Attention heads of a CLIP tower: ``given`` (``configs``' ``num_attention_heads``) or width / ``head_dim``,
    which must divide (OpenAI's model is built with width // 64 heads and cannot have a remainder)."""
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given < 1 or width % given:
            raise ValueError(f"{source}: num_attention_heads={given!r} for the CLIP {part} tower must be a positive "
                             f"divisor of its width {width}")
        return given
    if width < head_dim or width % head_dim:
        raise ValueError(f"{source}: the CLIP {part} width {width} is not a multiple of {head_dim}, so its number of "
                         f"attention heads cannot be inferred (OpenAI's rule is width / {head_dim}); pass "
                         f"configs={{'clip_{part}': {{'num_attention_heads': N}}}}")
    return width // head_dim


def clip_from_openai(sd: Mapping[str, torch.Tensor], *, head_dim: int = 64, source: str = "CLIP checkpoint",
                     text_heads: int | None = None, vision_heads: int | None = None
                     ) -> tuple[Tensors, Tensors, dict[str, Any], dict[str, Any]]:
    """OpenAI CLIP (ViT) state dict -> ``(text_sd, vision_sd, text_config, vision_config)`` for transformers'
    ``CLIPTextModelWithProjection`` / ``CLIPVisionModelWithProjection``.

    ``in_proj`` is split into contiguous thirds (q, k, v); projections are transposed. Configs come from the
    shapes; heads = width / ``head_dim`` (OpenAI's rule, 64) unless ``text_heads`` / ``vision_heads`` say; a
    width that ``head_dim`` does not divide raises ValueError without them. ``logit_scale`` and tensor
    attributes such as ``attn_mask`` are accepted and dropped; any other unused tensor raises.
    """
    text_layers = _count(sd, r"transformer\.resblocks\.(\d+)\.", source, "text transformer blocks")
    vision_layers = _count(sd, r"visual\.transformer\.resblocks\.(\d+)\.", source, "vision transformer blocks")
    text_rules, vision_rules = _clip_text_rules(text_layers), _clip_vision_rules(vision_layers)
    vision_keys = {r.src for r in vision_rules}
    text_sd = _apply(text_rules, {k: v for k, v in sd.items() if k not in vision_keys}, source,
                     ignore=lambda k: k.startswith("visual.") or _openai_extra(k))
    vision_sd = _apply(vision_rules, {k: v for k, v in sd.items() if k.startswith("visual.")}, source,
                       ignore=_openai_extra)

    tok = text_sd["text_model.embeddings.token_embedding.weight"]
    width = int(tok.shape[1])
    vocab = int(tok.shape[0])
    text_config: dict[str, Any] = {
        "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "vocab_size": vocab,
        "hidden_size": width, "intermediate_size": int(text_sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "projection_dim": int(text_sd["text_projection.weight"].shape[0]), "num_hidden_layers": text_layers,
        "num_attention_heads": _clip_heads(width, head_dim, text_heads, source, "text"),
        "max_position_embeddings": int(text_sd["text_model.embeddings.position_embedding.weight"].shape[0]),
        # eos_token_id 2 selects transformers' legacy pooling at argmax(input_ids), which is OpenAI's rule;
        # these are the ids of the published openai/clip-vit-large-patch14 config
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }
    patch = vision_sd["vision_model.embeddings.patch_embedding.weight"]
    positions = int(vision_sd["vision_model.embeddings.position_embedding.weight"].shape[0]) - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise ValueError(f"{source}: visual.positional_embedding has {positions + 1} rows, not a square grid + 1")
    vwidth = int(patch.shape[0])
    vision_config: dict[str, Any] = {
        "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model", "hidden_size": vwidth,
        "intermediate_size": int(vision_sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "projection_dim": int(vision_sd["visual_projection.weight"].shape[0]), "num_hidden_layers": vision_layers,
        "num_attention_heads": _clip_heads(vwidth, head_dim, vision_heads, source, "vision"),
        "num_channels": int(patch.shape[1]),
        "image_size": grid * int(patch.shape[-1]), "patch_size": int(patch.shape[-1]), "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    return text_sd, vision_sd, text_config, vision_config


def clip_to_openai(text_sd: Mapping[str, torch.Tensor], vision_sd: Mapping[str, torch.Tensor], *,
                   source: str = "CLIP state dicts") -> Tensors:
    """Inverse of :func:`clip_from_openai` (without ``logit_scale``)."""
    text_layers = _count(text_sd, r"text_model\.encoder\.layers\.(\d+)\.", source, "text layers")
    vision_layers = _count(vision_sd, r"vision_model\.encoder\.layers\.(\d+)\.", source, "vision layers")
    out = _apply(_clip_text_rules(text_layers), text_sd, source, reverse=True, ignore=_ignore_hf_extras_clip)
    out.update(_apply(_clip_vision_rules(vision_layers), vision_sd, source, reverse=True,
                      ignore=_ignore_hf_extras_clip))
    return out


def _ignore_hf_extras_clip(key: str) -> bool:
    return key.endswith("position_ids")


# ================================================================================================================
# tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points 256+."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


def clip_tokenizer_files_from_openai_bpe(bpe_path: str | Path, out_dir: str | Path,
                                         max_merges: int = 49152 - 256 - 2) -> Path:
    """Write a transformers ``CLIPTokenizer`` folder (vocab.json, merges.txt, tokenizer_config.json) from
    OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, with the ids OpenAI's ``SimpleTokenizer`` assigns."""
    import json

    bpe_path, out_dir = Path(bpe_path), Path(out_dir)
    try:
        raw = gzip.open(bpe_path).read() if bpe_path.suffix == ".gz" else bpe_path.read_bytes()
        lines = raw.decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(f"{bpe_path} is not a readable BPE merges file ({exc})") from exc
    merges = [m for m in lines[1: 1 + max_merges] if m.strip()]
    if not merges or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{bpe_path} is not a BPE merges file (one 'a b' pair per line after a header)")
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True}), encoding="utf-8")
    return out_dir


def find_clip_tokenizer(folder: str | Path | None, clip_tokenizer: str | Path | None, *, fetch: bool = True
                        ) -> Path:
    """Where the prior's CLIP tokenizer is: ``clip_tokenizer`` if given, else ``<folder>/clip_tokenizer/``,
    else ``<folder>/bpe_simple_vocab_16e6.txt.gz``, else (``fetch``) OpenAI's, as
    :func:`kandinsky.weights.original_hub.clip_tokenizer` finds or downloads it."""
    if clip_tokenizer is not None:
        path = Path(clip_tokenizer)
        if not path.exists():
            raise FileNotFoundError(f"CLIP tokenizer not found: {path}")
        return path
    if folder is not None:
        for candidate in (Path(folder) / CLIP_TOKENIZER_DIR, Path(folder) / OPENAI_BPE_FILE):
            if candidate.exists():
                return candidate
    if fetch:
        from .original_hub import clip_tokenizer as openai_clip_tokenizer

        return openai_clip_tokenizer()
    raise FileNotFoundError(
        "the original Kandinsky 2.1 files do not include the prior's CLIP tokenizer (OpenAI BPE). Pass "
        "clip_tokenizer= a transformers CLIPTokenizer folder (vocab.json + merges.txt, e.g. the tokenizer/ folder of "
        "kandinsky-community/kandinsky-2-1-prior or openai/clip-vit-large-patch14) or OpenAI's "
        f"{OPENAI_BPE_FILE} (from the `clip` package), or put either in the model folder as "
        f"{CLIP_TOKENIZER_DIR}/ or {OPENAI_BPE_FILE}.")


def load_clip_tokenizer(path: str | Path, max_length: int = 77) -> Any:
    """A transformers ``CLIPTokenizer`` from a tokenizer folder or an OpenAI BPE merges file."""
    from transformers import CLIPTokenizer

    path = Path(path)
    if path.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = _tokenizer(CLIPTokenizer, clip_tokenizer_files_from_openai_bpe(path, tmp))
    else:
        tokenizer = _tokenizer(CLIPTokenizer, path)
    if tokenizer.model_max_length > max_length:
        tokenizer.model_max_length = max_length
    return tokenizer


# ================================================================================================================
# loading the whole file set


@dataclass
class OriginalPaths:
    """Resolved paths of an original file set (``inpaint`` None when absent)."""

    decoder: Path
    inpaint: Path | None
    prior: Path
    movq: Path
    clip: Path
    clip_stats: Path
    text_encoder: Path
    folder: Path | None


def _default_file(folder: Path | None, role: str) -> Path | None:
    if folder is None:
        return None
    for stem in ORIGINAL_FILES[role]:
        for suffix in WEIGHT_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def resolve_original_paths(folder: str | Path | None = None, *, decoder: str | Path | None = None,
                           inpaint: str | Path | bool | None = None, prior: str | Path | None = None,
                           movq: str | Path | None = None, clip: str | Path | None = None,
                           clip_stats: str | Path | None = None, text_encoder: str | Path | None = None,
                           fetch: bool = True) -> OriginalPaths:
    """Paths of the original files: explicit arguments win over the default names in ``folder``.

    ``inpaint``: a path, None (use ``inpainting_fp16.ckpt`` if the folder has it) or False (skip). OpenAI's
    ``ViT-L-14.pt`` is not part of the release: when neither given nor in the folder, ``fetch`` takes it (once
    every other file is found) from :func:`kandinsky.weights.original_hub.openai_clip`'s cache or OpenAI's URL.
    """
    base = Path(folder) if folder is not None else None
    if base is not None and not base.is_dir():
        raise FileNotFoundError(f"original model folder not found: {base}")
    given = {"decoder": decoder, "prior": prior, "movq": movq, "clip": clip, "clip_stats": clip_stats}
    found: dict[str, Path] = {}
    for role, value in given.items():
        path = Path(value) if value is not None else _default_file(base, role)
        if path is None and role == "clip" and fetch:
            continue  # fetched last
        if path is None:
            names = " / ".join(f"{s}.ckpt|.safetensors" for s in ORIGINAL_FILES[role])
            where = f"in {base}" if base is not None else "(no folder given)"
            raise FileNotFoundError(f"no {role} file {where}: expected {names}, or pass {role}=PATH")
        if not path.is_file():
            raise FileNotFoundError(f"{role} file not found: {path}")
        found[role] = path
    if inpaint is False:
        inpaint_path = None
    elif inpaint is None or inpaint is True:
        inpaint_path = _default_file(base, "inpaint")
        if inpaint is True and inpaint_path is None:
            raise FileNotFoundError(f"no inpainting checkpoint (inpainting_fp16.ckpt) in {base}")
    else:
        inpaint_path = Path(inpaint)
        if not inpaint_path.is_file():
            raise FileNotFoundError(f"inpaint file not found: {inpaint_path}")
    te = Path(text_encoder) if text_encoder is not None else (base / TEXT_ENCODER_DIR if base is not None else None)
    if te is None or not te.is_dir():
        raise FileNotFoundError(f"M-CLIP text encoder folder not found: {te} (pass text_encoder=DIR holding "
                                "config.json, pytorch_model.bin and the XLM-R tokenizer files)")
    if "clip" not in found:
        from .original_hub import openai_clip

        found["clip"] = openai_clip()
    return OriginalPaths(decoder=found["decoder"], inpaint=inpaint_path, prior=found["prior"], movq=found["movq"],
                         clip=found["clip"], clip_stats=found["clip_stats"], text_encoder=te, folder=base)


def auto_dtype(device: torch.device | str, dtype: torch.dtype | str | None) -> torch.dtype:
    """None: float16 on CUDA (the files' precision), float32 elsewhere (fp16 kernels are slow or missing on CPU)."""
    if dtype is not None:
        return resolve_dtype(dtype)
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _build(cls_or_fn: Callable[[Any], nn.Module], config: Any) -> nn.Module:
    with torch.device("meta"):
        return cls_or_fn(config)


def mclip_config(folder: Path, sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The M-CLIP ``config.json`` of an original ``text_encoder/`` folder, with the head sizes filled in from
    the weights when the file lacks ``transformerDimensions`` / ``numDims``."""
    config = dict(read_json(folder / "config.json"))
    head = sd.get("LinearTransformation.weight")
    if head is not None:
        config.setdefault("transformerDimensions", int(head.shape[1]))
        config.setdefault("numDims", int(head.shape[0]))
    return config


def load_unet_original(path: str | Path, *, config: Mapping[str, Any] | None = None, device: Any = "cpu",
                       dtype: torch.dtype = torch.float32, in_channels: int | None = None
                       ) -> tuple[DecoderUNet, dict[str, Any]]:
    """Our UNet from an original checkpoint, and its diffusers config. ``in_channels`` checks the variant."""
    path = Path(path)
    sd = read_weights(path)
    cfg = unet_config_from_original(sd, source=str(path), **(config or {}))
    if in_channels is not None and cfg["in_channels"] != in_channels:
        kind = "inpainting (9-channel)" if cfg["in_channels"] == 9 else f"{cfg['in_channels']}-channel"
        raise ValueError(f"{path} is the {kind} UNet; expected {in_channels} input channels "
                         "(decoder_fp16.ckpt: 4, inpainting_fp16.ckpt: 9)")
    ours = unet_from_original(sd, head_dim=int(cfg["attention_head_dim"]), source=str(path))
    unet = fill_module(_build(DecoderUNet, UNetConfig.from_dict(cfg)), ours, str(path), dtype=dtype, device=device)
    return unet, cfg


def load_original(folder: str | Path | None = None, *, decoder: str | Path | None = None,
                  inpaint: str | Path | bool | None = None, prior: str | Path | None = None,
                  movq: str | Path | None = None, clip: str | Path | None = None,
                  clip_stats: str | Path | None = None, text_encoder: str | Path | None = None,
                  clip_tokenizer: str | Path | None = None, device: torch.device | str = "cpu",
                  dtype: torch.dtype | str | None = None,
                  configs: Mapping[str, Mapping[str, Any]] | None = None,
                  ) -> tuple[DecoderParts, PriorParts, DecoderParts | None]:
    """Load the original Kandinsky 2.1 files into ``(decoder, prior, inpaint)`` parts, as ``load_decoder`` /
    ``load_prior`` return them for diffusers folders.

    ``folder`` supplies the default file names (SPEC 4.3; ``.safetensors`` versions preferred), or is a Hub id
    (``"ai-forever/Kandinsky_2.1[@REV]"``, shortcut ``"kandinsky-2-1-original"``) resolved by
    :func:`kandinsky.weights.original_hub.resolve` (the inpainting UNet only with ``inpaint=True``); any of
    ``decoder``, ``inpaint``, ``prior``, ``movq``, ``clip`` (``ViT-L-14.pt``), ``clip_stats``
    (``ViT-L-14_stats.th``) and ``text_encoder`` (folder) given explicitly overrides it. ``inpaint=False`` skips
    the inpainting UNet; None loads it only if present.

    The file set has no tokenizer for the prior's CLIP text tower (OpenAI ships its BPE with the ``clip``
    package): ``clip_tokenizer`` is a transformers CLIPTokenizer folder or OpenAI's
    ``bpe_simple_vocab_16e6.txt.gz``; by default ``<folder>/clip_tokenizer/`` or that file in ``folder``, else
    OpenAI's own (:func:`find_clip_tokenizer`). Neither has ``ViT-L-14.pt``: it is fetched as the release does.

    ``dtype`` None means float16 on CUDA and float32 elsewhere (the fp16 files are upcast on CPU). Scheduler
    configs are the published ones (DDIM and DDPM for the decoders, UnCLIP for the prior); the image processor
    config is CLIP's. ``configs`` overrides what tensor shapes cannot reveal, per component: ``"unet"`` and
    ``"movq"`` (diffusers config keys, e.g. ``norm_num_groups``), ``"prior"`` (``attention_head_dim``),
    ``"clip_text"`` / ``"clip_vision"`` (transformers CLIP config keys, e.g. ``num_attention_heads``).
    """
    if isinstance(folder, str) and not Path(folder).exists():
        from . import hub
        from .original_hub import is_hub_id, resolve

        if is_hub_id(folder) or hub.is_hub_id(folder):  # the release's id, or a diffusers one resolve refuses
            given = dict(decoder=decoder, prior=prior, movq=movq, clip_stats=clip_stats, text_encoder=text_encoder)
            folder = resolve(folder, inpaint=inpaint is True, skip=[k for k, v in given.items() if v is not None])
    paths = resolve_original_paths(folder, decoder=decoder, inpaint=inpaint, prior=prior, movq=movq, clip=clip,
                                   clip_stats=clip_stats, text_encoder=text_encoder)
    tokenizer_path = find_clip_tokenizer(folder, clip_tokenizer)
    configs = dict(configs or {})
    unknown = sorted(set(configs) - {"unet", "movq", "prior", "clip_text", "clip_vision"})
    if unknown:
        raise ValueError(f"configs has unknown components {unknown}; use unet, movq, prior, clip_text, clip_vision")
    dt = auto_dtype(device, dtype)

    movq_sd = read_weights(paths.movq)
    movq_cfg = movq_config_from_original(movq_sd, source=str(paths.movq), **configs.get("movq", {}))
    movq_model = fill_module(_build(MoVQ, MoVQConfig.from_dict(movq_cfg)),
                             movq_from_original(movq_sd, source=str(paths.movq)), str(paths.movq),
                             dtype=dt, device=device)
    del movq_sd
    text_encoder_model, xlmr_tokenizer = load_mclip(paths.text_encoder, device=device, dtype=dt)

    def decoder_parts(path: Path, channels: int) -> DecoderParts:
        unet, _ = load_unet_original(path, config=configs.get("unet"), device=device, dtype=dt,
                                     in_channels=channels)
        return DecoderParts(unet=unet, movq=movq_model, text_encoder=text_encoder_model, tokenizer=xlmr_tokenizer,
                            scheduler_config=dict(DDIM_CONFIG), ddpm_scheduler_config=dict(DDPM_CONFIG),
                            folder=paths.folder or path.parent)

    decoder_out = decoder_parts(paths.decoder, 4)
    inpaint_out = decoder_parts(paths.inpaint, 9) if paths.inpaint is not None else None
    prior_out = load_prior_original(paths, tokenizer_path, configs=configs, device=device, dtype=dt)
    return decoder_out, prior_out, inpaint_out


def load_mclip(folder: str | Path, *, device: Any = "cpu", dtype: torch.dtype = torch.float32
               ) -> tuple[MultilingualCLIP, Any]:
    """M-CLIP and its XLM-R tokenizer from an original ``text_encoder/`` folder."""
    from transformers import XLMRobertaTokenizer

    folder = Path(folder)
    path = find_weights(folder, TRANSFORMERS_WEIGHTS)
    sd = read_weights(path)
    model = fill_module(_build(MultilingualCLIP.from_dict, mclip_config(folder, sd)), sd, str(path),
                        ignore=_ignore_hf_extras, dtype=dtype, device=device)
    return model, _tokenizer(XLMRobertaTokenizer, folder)


def openai_clip_parts(path: str | Path, *, configs: Mapping[str, Mapping[str, Any]] | None = None
                      ) -> tuple[Tensors, Tensors, dict[str, Any], dict[str, Any]]:
    """Read an OpenAI CLIP file and map it: ``(text_sd, vision_sd, text_config, vision_config)``."""
    path = Path(path)
    configs = configs or {}
    text_sd, vision_sd, text_cfg, vision_cfg = clip_from_openai(
        read_weights(path), source=str(path), text_heads=configs.get("clip_text", {}).get("num_attention_heads"),
        vision_heads=configs.get("clip_vision", {}).get("num_attention_heads"))
    text_cfg.update(configs.get("clip_text", {}))
    vision_cfg.update(configs.get("clip_vision", {}))
    return text_sd, vision_sd, text_cfg, vision_cfg


def load_prior_original(paths: OriginalPaths, tokenizer_path: str | Path, *,
                        configs: Mapping[str, Mapping[str, Any]] | None = None, device: Any = "cpu",
                        dtype: torch.dtype = torch.float32) -> PriorParts:
    """The prior part (prior, CLIP towers, CLIP tokenizer) from resolved original paths."""
    configs = configs or {}
    sd = read_weights(paths.prior)
    cfg = prior_config_from_original(sd, source=str(paths.prior), **configs.get("prior", {}))
    ours = prior_from_original(sd, read_clip_stats(paths.clip_stats), head_dim=int(cfg["attention_head_dim"]),
                               source=str(paths.prior))
    prior_model = fill_module(_build(PriorTransformer, PriorConfig.from_dict(cfg)), ours, str(paths.prior),
                              dtype=dtype, device=device)
    del sd, ours
    text_sd, vision_sd, text_cfg, vision_cfg = openai_clip_parts(paths.clip, configs=configs)
    tokenizer = load_clip_tokenizer(tokenizer_path, text_cfg["max_position_embeddings"])
    text_model = fill_module(_build(build_clip_text, text_cfg), text_sd, str(paths.clip), dtype=dtype,
                             device=device)
    vision_model = fill_module(_build(build_clip_vision, vision_cfg), vision_sd, str(paths.clip), dtype=dtype,
                               device=device)
    return PriorParts(prior=prior_model, text_encoder=text_model, image_encoder=vision_model, tokenizer=tokenizer,
                      scheduler_config=dict(UNCLIP_CONFIG),
                      image_processor_config=clip_image_processor_config(int(vision_cfg["image_size"])),
                      folder=paths.folder or paths.prior.parent)
