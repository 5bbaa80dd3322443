"""CPU fast paths and the layers that use them, each used only where it works on this CPU for the dtype at hand.

The fast paths are PyTorch's private oneDNN ops (prepacked convolution and linear with the bias and a residual
add fused) and the channel concatenation of channels-last tensors as an NHWC cat. Whether oneDNN has a kernel
depends on the CPU and the dtype: bfloat16 needs AVX512-BF16/AMX (or at least AVX-512) and fails with "could
not create a primitive descriptor" on an AVX2-only CPU. So each (op, dtype) is decided once, on first use, by a
probe that runs the op on a small input and compares it with the plain PyTorch result; an op that still fails
later is switched off for that dtype with a warning and the call is redone the plain way. Nothing crashes for
want of a kernel: the plain path runs every dtype PyTorch runs (bfloat16 without native support is emulated,
slower than float32).

``KANDINSKY_FAST_PATHS=0`` (or ``set_enabled(False)``) turns every fast path off, for tests and for bug reports.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kandinsky.models.common import page_out, release_pages

ENV = "KANDINSKY_FAST_PATHS"
OPS = ("linear", "conv", "cat_nhwc")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OFF = ("0", "off", "false", "no")
_override: bool | None = None
_broken: set[tuple[str, torch.dtype]] = set()  # ops that failed at run time despite the probe
_lock = threading.Lock()


def enabled() -> bool:
    """Whether fast paths may be used at all: ``set_enabled``'s value, else the ``KANDINSKY_FAST_PATHS`` variable."""
    if _override is not None:
        return _override
    return os.environ.get(ENV, "1").strip().lower() not in _OFF


def set_enabled(flag: bool | None) -> None:
    """Force the fast paths on (still only where the probe passes) or off; ``None`` goes back to the variable."""
    global _override
    _override = flag


@contextmanager
def disabled() -> Iterator[None]:
    """Run a block with every fast path off (the plain PyTorch layers)."""
    old = _override
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(old)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 3e-2


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    got, want = got.float(), want.float()
    scale = max(1.0, float(want.abs().max()))
    return bool(torch.isfinite(got).all()) and float((got - want).abs().max()) <= _tolerance(dtype) * scale


def _probe_linear(dtype: torch.dtype) -> bool:
    g = torch.Generator().manual_seed(0)
    x, w, b, res = (torch.randn(*s, generator=g).to(dtype) for s in ((3, 40), (24, 40), (24,), (3, 24)))
    y = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    z = torch.ops.mkldnn._linear_pointwise.binary(x, res, w, b, "add")
    want = F.linear(x.float(), w.float(), b.float())
    return _close(y, want, dtype) and _close(z, want + res.float(), dtype)


def _probe_conv(dtype: torch.dtype) -> bool:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 6, 6, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, 16, 3, 3, generator=g).to(dtype), torch.randn(8, generator=g).to(dtype)
    res = torch.randn(2, 8, 6, 6, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    geometry = ([1, 1], [1, 1], [1, 1], 1)
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), *geometry, list(x.shape))
    y = torch.ops.mkldnn._convolution_pointwise(x, packed, b, *geometry, "none", [], "")
    z = torch.ops.mkldnn._convolution_pointwise.binary(x, res, packed, b, *geometry, "add", 1.0, None, [], None)
    want = F.conv2d(x.float(), w.float(), b.float(), padding=1)
    return _close(y, want, dtype) and _close(z, want + res.float(), dtype)


def _probe_cat_nhwc(dtype: torch.dtype) -> bool:
    cl = torch.channels_last
    a = torch.randn(2, 3, 4, 5).to(dtype).contiguous(memory_format=cl)
    b = torch.randn(2, 6, 4, 5).to(dtype).contiguous(memory_format=cl)
    got = torch.cat([a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)], dim=3).permute(0, 3, 1, 2)
    return bool(torch.equal(got, torch.cat([a, b], dim=1))) and got.is_contiguous(memory_format=cl)


_PROBES: dict[str, Callable[[torch.dtype], bool]] = {
    "linear": _probe_linear, "conv": _probe_conv, "cat_nhwc": _probe_cat_nhwc}


def _first_sentence(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return text.split(". ")[0].rstrip(".")[:160]


@functools.cache
def probe(op: str, dtype: torch.dtype) -> tuple[bool, str]:
    """Run the fast ``op`` once for ``dtype`` on the CPU: (works, why not). Cached for the process."""
    if op not in _PROBES:
        raise ValueError(f"unknown fast path {op!r}; known: {', '.join(OPS)}")
    if op != "cat_nhwc" and not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (mkldnn)"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok = _PROBES[op](dtype)
    except (AttributeError, RuntimeError, NotImplementedError, TypeError) as exc:
        return False, f"{type(exc).__name__}: {_first_sentence(exc)}"
    return (True, "") if ok else (False, "result differs from the plain PyTorch op")


def usable(op: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether the fast ``op`` is to be used for tensors of ``dtype`` on ``device`` now."""
    return (enabled() and torch.device(device).type == "cpu" and dtype in DTYPES and (op, dtype) not in _broken
            and probe(op, dtype)[0])


def native(dtype: torch.dtype) -> bool:
    """Whether this CPU computes ``dtype`` natively (bfloat16: AVX512-BF16/AMX-class oneDNN support; float16:
    AVX512-FP16/AMX-FP16); without it PyTorch emulates the dtype, slower than float32."""
    if dtype == torch.float32:
        return True
    check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return bool(check and getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        return False


def status() -> dict[str, dict[str, str]]:
    """For each op and dtype: "on", "off (disabled)" or "off (<reason>)"; for ``kandinsky info --system``."""
    out: dict[str, dict[str, str]] = {}
    for op in OPS:
        out[op] = {}
        for dtype in DTYPES:
            name = str(dtype).removeprefix("torch.")
            ok, why = probe(op, dtype)
            if (op, dtype) in _broken:
                ok, why = False, "failed at run time"
            out[op][name] = "on" if ok and enabled() else f"off ({'disabled' if ok else why})"
    return out


def _fail(op: str, dtype: torch.dtype, exc: Exception) -> None:
    with _lock:
        if (op, dtype) in _broken:
            return
        _broken.add((op, dtype))
    warnings.warn(f"the oneDNN {op} fast path failed for {str(dtype).removeprefix('torch.')} on this CPU "
                  f"({type(exc).__name__}: {_first_sentence(exc)}); using plain PyTorch from now on",
                  RuntimeWarning, stacklevel=3)


def _inference(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Autograd not needed (the oneDNN ops have no backward) and not tracing under torch.compile (inductor packs
    the weights itself)."""
    return (x.dtype == w.dtype and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
            and not torch.compiler.is_compiling())


class Linear(nn.Linear):
    """``nn.Linear`` with an optional fused residual; CPU inference goes through oneDNN where it works.

    On CPUs where MKL's sgemm does not take its fastest path (AMD), oneDNN's matmul is about twice as fast, and
    it adds the bias (and ``add``) in the same pass.
    """

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        if _inference(x, self.weight) and usable("linear", x.dtype, x.device):
            try:
                if add is None:
                    return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
                return torch.ops.mkldnn._linear_pointwise.binary(x, add, self.weight, self.bias, "add")
            except RuntimeError as exc:
                _fail("linear", x.dtype, exc)
        out = F.linear(x, self.weight, self.bias)
        return out if add is None else out + add


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` with an optional fused residual; CPU inference reuses a oneDNN-prepacked weight.

    Eager ``F.conv2d`` on CPU re-lays-out the weight into oneDNN's blocked format at every call, which dominates
    at low resolution (a 1536-channel 3x3 weight is 85 MB). The packed copy is made for the input shape (the
    best blocking depends on it) and rebuilt when the shape or the weight changes (new tensor, in-place update,
    dtype or device move), so a sampling loop packs once. ``prepack = False`` frees the packed copies.
    Whenever autograd is needed, off CPU, or where the probe found no kernel for the dtype, this is a plain
    ``nn.Conv2d``.

    Once packed, the source weight's pages are dropped where it is memory-mapped from its file and unmodified
    (``common.release_pages``: it stays in the page cache and is mapped back if a plain call needs it), so the
    packed copy does not double the resident memory; ``page_out_source`` (low-memory mode) drops them from the
    page cache too.
    """

    prepack: bool = True
    page_out_source: bool = False  # low-memory mode: drop the (memory-mapped) source weight's pages once packed

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._packed: torch.Tensor | None = None
        self._packed_key: tuple | None = None

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        if self.prepack and _inference(x, self.weight) and usable("conv", x.dtype, x.device):
            geometry = (self.padding, self.stride, self.dilation, self.groups)
            try:
                w = self._packed_weight(x.shape)
                if add is None:
                    return torch.ops.mkldnn._convolution_pointwise(x, w, self.bias, *geometry, "none", [], "")
                return torch.ops.mkldnn._convolution_pointwise.binary(x, add, w, self.bias, *geometry, "add", 1.0,
                                                                      None, [], None)
            except RuntimeError as exc:
                self.release_packed()
                _fail("conv", x.dtype, exc)
        out = super().forward(x)
        return out if add is None else out + add

    def _packed_weight(self, input_shape: torch.Size) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, tuple(input_shape), torch.get_num_threads())
        if self._packed is None or self._packed_key[0]() is not w or self._packed_key[1:] != key:
            self._packed = None  # free the stale copy first
            self._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                w.detach().to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(input_shape))
            self._packed_key = (weakref.ref(w), *key)
            (page_out if self.page_out_source else release_pages)([w])  # the packed copy stands in for it
        return self._packed

    def release_packed(self) -> None:
        self._packed = self._packed_key = None

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles leave the packed weight behind
        return {**super().__getstate__(), "_packed": None, "_packed_key": None}


def cat_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.cat([a, b], dim=1)``; for channels-last CPU tensors as a cat of their NHWC views, which torch's CPU
    kernel does several times faster than the channel-dim cat of the same memory (same values, same layout)."""
    cl = torch.channels_last
    if (a.is_contiguous(memory_format=cl) and b.is_contiguous(memory_format=cl)
            and usable("cat_nhwc", a.dtype, a.device)):
        return torch.cat([a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)], dim=3).permute(0, 3, 1, 2)
    return torch.cat([a, b], dim=1)
