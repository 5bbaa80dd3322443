"""Which arithmetic to run in: ``precision="auto" | "fp32" | "bf16" | "fp16"``, chosen by measurement on CPUs.

``auto`` on a CPU measures, once per CPU model, flags, torch version and thread count, the rate of the two ops
the models spend their time in (a channels-last 3x3 convolution and a linear layer, through the same layers the
UNet uses) in float32 and in every lower precision the CPU computes natively (bfloat16 with AVX512-BF16/AMX), checks
that a small conv/norm/attention stack in that precision stays within a cosine similarity of 0.999 of float32,
and takes the fastest that passes if it is at least :data:`MIN_GAIN` times float32's speed; float32 otherwise.
The result is cached in ``$KANDINSKY_CACHE`` (default ``~/.cache/kandinsky``) as ``precision.json``, so later runs
decide at once. On CUDA ``auto`` is float16; on other devices float32. ``KANDINSKY_PRECISION`` overrides ``auto``.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .models import fastpath

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
MIN_GAIN = 1.1  # a lower precision must be this much faster than float32 to be chosen
MIN_COSINE = 0.999
ENV = "KANDINSKY_PRECISION"
CACHE_VERSION = 1


@dataclass
class Choice:
    """What ``auto`` chose on this machine and why: measured rates (GFLOP/s) and parity per precision."""

    precision: str
    reason: str
    rates: dict[str, dict[str, float]] = field(default_factory=dict)  # precision -> {"conv": .., "linear": ..}
    cosine: dict[str, float] = field(default_factory=dict)  # precision -> parity with float32
    key: str = ""

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


def normalize(precision: str) -> str:
    """A precision name (or a dtype alias such as ``bfloat16``) as one of :data:`PRECISIONS`."""
    name = ALIASES.get(str(precision).strip().lower(), str(precision).strip().lower())
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return name


def resolve(precision: str | None, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype to run in for ``precision`` on ``device`` (None: float16 on CUDA, else float32)."""
    device = torch.device(device)
    if precision is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    name = normalize(precision)
    if name == "auto":
        name = normalize(os.environ.get(ENV) or "auto")
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.float16
    if device.type != "cpu":
        return torch.float32
    return choose().dtype


# ------------------------------------------------------------------------------------------ the measurement


def _candidates() -> list[torch.dtype]:
    """Lower precisions worth measuring here: natively computed, and the fast paths have kernels for them."""
    out = []
    for dtype in (torch.bfloat16,):
        if fastpath.native(dtype) and all(fastpath.probe(op, dtype)[0] for op in ("conv", "linear")):
            out.append(dtype)
    return out


def _timed(fn: Any, repeats: int = 5) -> float:
    fn()  # warm-up: packs the weight, picks the kernel
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rates(dtype: torch.dtype) -> dict[str, float]:
    """GFLOP/s of a UNet-sized 3x3 convolution and linear layer in ``dtype`` (fast paths as the models use them)."""
    g = torch.Generator().manual_seed(0)
    conv = fastpath.Conv2d(320, 320, 3, padding=1).requires_grad_(False).to(dtype)
    x = torch.randn(2, 320, 32, 32, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    lin = fastpath.Linear(1280, 1280).requires_grad_(False).to(dtype)
    y = torch.randn(2048, 1280, generator=g).to(dtype)
    with torch.inference_mode():
        t_conv = _timed(lambda: conv(x))
        t_lin = _timed(lambda: lin(y))
    conv_flops = 2 * 2 * 320 * 320 * 9 * 32 * 32
    lin_flops = 2 * 2048 * 1280 * 1280
    return {"conv": round(conv_flops / t_conv / 1e9, 1), "linear": round(lin_flops / t_lin / 1e9, 1)}


def _parity(dtype: torch.dtype) -> float:
    """Cosine similarity to float32 of a small conv -> group norm -> SiLU -> conv -> attention stack in ``dtype``."""
    g = torch.Generator().manual_seed(1)
    c1, c2 = fastpath.Conv2d(64, 128, 3, padding=1), fastpath.Conv2d(128, 64, 3, padding=1)
    qkv, out = fastpath.Linear(64, 192), fastpath.Linear(64, 64)
    for m in (c1, c2, qkv, out):
        m.requires_grad_(False)
    x = torch.randn(2, 64, 16, 16, generator=g)

    def stack(dt: torch.dtype) -> torch.Tensor:
        h = x.to(dt).contiguous(memory_format=torch.channels_last)
        h = c2.to(dt)(F.silu(F.group_norm(c1.to(dt)(h), 32)), add=h)
        t = h.flatten(2).transpose(1, 2)
        q, k, v = qkv.to(dt)(t).chunk(3, dim=-1)
        return out.to(dt)(F.scaled_dot_product_attention(q, k, v), add=t).float()

    with torch.inference_mode():
        want, got = stack(torch.float32), stack(dtype)
    if not bool(torch.isfinite(got).all()):
        return 0.0
    return float(F.cosine_similarity(want.flatten(), got.flatten(), dim=0))


def machine_key() -> str:
    """What a measurement holds for: the CPU model and flags, the torch version and the thread count."""
    from .system import cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    isa = ",".join(f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ)
    return (f"{model}|{','.join(flags)}|{torch.backends.cpu.get_cpu_capability()}{'|' + isa if isa else ''}|"
            f"torch {torch.__version__}|{torch.get_num_threads()} threads|"
            f"fast paths {'on' if fastpath.enabled() else 'off'}|v{CACHE_VERSION}")


def measure() -> Choice:
    """Measure every candidate precision on this CPU now (about a second) and choose."""
    rates = {"fp32": _rates(torch.float32)}
    cosine: dict[str, float] = {}
    best, best_speed, reason = "fp32", 1.0, "no lower precision is computed natively on this CPU"
    candidates = _candidates()
    for dtype in candidates:
        name = NAMES[dtype]
        rates[name] = _rates(dtype)
        cosine[name] = round(_parity(dtype), 6)
        speed = min(rates[name][op] / rates["fp32"][op] for op in ("conv", "linear"))
        if cosine[name] < MIN_COSINE:
            reason = f"{name} failed the parity check (cosine {cosine[name]:.4f} < {MIN_COSINE})"
        elif speed < MIN_GAIN:
            reason = f"{name} is only {speed:.2f}x float32's speed here (needs {MIN_GAIN}x)"
        elif speed > best_speed:
            best, best_speed = name, speed
            reason = f"{name} is {speed:.2f}x float32's speed here and passes the parity check"
    return Choice(best, reason, rates, cosine, machine_key())


# ------------------------------------------------------------------------------------------ the cache


def cache_path() -> Path:
    base = os.environ.get("KANDINSKY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kandinsky")
    return Path(base) / "precision.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    """Atomically; a cache that cannot be written only means measuring again next time."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".precision-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, path)
        except OSError:
            os.unlink(tmp)


_chosen: dict[str, Choice] = {}


def choose(refresh: bool = False) -> Choice:
    """The CPU's ``auto`` precision: from this process's memory, else the disk cache, else :func:`measure`."""
    key = machine_key()
    if not refresh and key in _chosen:
        return _chosen[key]
    path = cache_path()
    cached = _read_cache(path).get(key)
    choice = None
    if not refresh and isinstance(cached, dict):
        with contextlib.suppress(TypeError):
            choice = Choice(**cached)
    if choice is not None and choice.precision in DTYPES and choice.dtype not in (torch.float32, *_candidates()):
        choice = None  # a record this machine no longer supports (fast paths turned off, a capped ISA)
    if choice is None or choice.precision not in DTYPES:  # not measured, or a record this version cannot use
        choice = measure()
        data = _read_cache(path)
        data[key] = asdict(choice)
        _write_cache(path, data)
    _chosen[key] = choice
    return choice


def report() -> dict[str, Any]:
    """For ``kandinsky info --system``: the CPU's ``auto`` choice, why, and the measured rates."""
    choice = choose()
    return {"auto": choice.precision, "why": choice.reason, "gflops": choice.rates, "cosine_to_fp32": choice.cosine,
            "cache": str(cache_path())}
