"""What this machine is and which compute paths kandinsky uses on it (``kandinsky info --system``)."""

from __future__ import annotations

import os
import platform
import shutil
from typing import Any

import torch

from . import precision
from .models import fastpath

# CPU flags that decide the fast paths (Linux /proc/cpuinfo names)
FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
         "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_ne_convert")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and which of :data:`FLAGS` it reports (empty where /proc/cpuinfo is absent)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return model, [f for f in FLAGS if f in flags]


def report() -> dict[str, Any]:
    """Machine, torch build, detected ISA and the state of every fast path, as plain JSON-able values."""
    model, flags = cpu_model_and_flags()
    info: dict[str, Any] = {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "cpu_flags": flags,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn": torch.backends.mkldnn.is_available(),
        "native_bfloat16": fastpath.native(torch.bfloat16),
        "native_float16": fastpath.native(torch.float16),
        "fast_paths": "on" if fastpath.enabled() else f"off ({fastpath.ENV}={os.environ.get(fastpath.ENV, '')!r} "
                                                        "or set_enabled(False))",
        "fast_path_status": fastpath.status(),
        "compile_cxx": shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++"),
        "env": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS",
                                           fastpath.ENV) if k in os.environ},
        "cuda": torch.cuda.is_available(),
        "precision": precision.report(),
    }
    if info["cuda"]:
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def format_report(info: dict[str, Any]) -> str:
    """``report()`` as aligned text lines."""
    lines = []
    for key, value in info.items():
        if key == "fast_path_status":
            lines.append("fast path per op and dtype:")
            for op, per_dtype in value.items():
                for dtype, state in per_dtype.items():
                    lines.append(f"  {op} {dtype}: {state}")
            continue
        if key == "precision":
            lines.append(f"precision auto: {value['auto']} ({value['why']}; cached in {value['cache']})")
            for name, rates in value["gflops"].items():
                cos = f", cosine to fp32 {value['cosine_to_fp32'][name]}" if name in value["cosine_to_fp32"] else ""
                lines.append(f"  {name}: conv {rates['conv']} GFLOP/s, linear {rates['linear']} GFLOP/s{cos}")
            continue
        if isinstance(value, list):
            value = " ".join(map(str, value)) or "-"
        elif isinstance(value, dict):
            value = " ".join(f"{k}={v}" for k, v in value.items()) or "-"
        lines.append(f"{key}: {value}")
    return "\n".join(lines)
