"""The CPU fast paths are used only where they work, and the project runs on CPUs without AVX-512.

An AVX2-only CPU is emulated on any x86 machine by capping oneDNN's and ATen's instruction sets
(``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``): oneDNN then refuses bfloat16 exactly as it does on an
AVX2-only AMD EPYC ("could not create a primitive descriptor").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kandinsky import system
from kandinsky.models import fastpath
from kandinsky.models.fastpath import Conv2d, Linear

ROOT = Path(__file__).resolve().parent.parent
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
EMULATED = os.environ.get("KANDINSKY_TEST_EMULATED_AVX2") == "1"


def _run(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.fixture
def fresh_fastpath():
    """Forget run-time failures and the switch after the test."""
    yield
    fastpath._broken.clear()
    fastpath.set_enabled(None)


def test_environment_variable_turns_every_fast_path_off():
    code = ("import json, torch; from kandinsky.models import fastpath; "
            "print(json.dumps([fastpath.enabled(), fastpath.usable('conv', torch.float32), fastpath.status()]))")
    enabled, usable, status = json.loads(_run(code, {fastpath.ENV: "0"}).stdout)
    assert not enabled and not usable
    assert all(state.startswith("off") for per in status.values() for state in per.values())


def test_switch_and_context_manager(fresh_fastpath):
    fastpath.set_enabled(False)
    assert not fastpath.usable("linear", torch.float32)
    fastpath.set_enabled(None)
    with fastpath.disabled():
        assert not fastpath.enabled()
    assert fastpath.enabled() == (os.environ.get(fastpath.ENV, "1") not in fastpath._OFF)


def test_probe_rejects_unknown_op():
    with pytest.raises(ValueError, match="unknown fast path"):
        fastpath.probe("nope", torch.float32)


def test_never_used_off_cpu_or_for_other_dtypes():
    assert not fastpath.usable("conv", torch.float32, "meta")
    assert not fastpath.usable("conv", torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_kernel_failing_at_run_time_falls_back_once_with_a_warning(monkeypatch, fresh_fastpath, dtype):
    """A fast op that passed its probe but fails on a real shape: plain result, one warning, op off from then."""
    fastpath.status()  # every probe runs (and is cached) before the ops are broken below
    if not (fastpath.probe("linear", dtype)[0] and fastpath.probe("conv", dtype)[0]):
        pytest.skip(f"no oneDNN {dtype} kernels on this CPU: the plain path is already the only one")
    lin, conv = Linear(8, 4).to(dtype).requires_grad_(False), Conv2d(3, 5, 3, padding=1).to(dtype).requires_grad_(False)
    x, img = torch.randn(2, 8).to(dtype), torch.randn(1, 3, 6, 6).to(dtype)
    want_lin, want_conv = torch.nn.functional.linear(x, lin.weight, lin.bias), conv._conv_forward(img, conv.weight,
                                                                                                    conv.bias)

    class Failing:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("could not create a primitive descriptor (simulated)")

        binary = __init__

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Failing)
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", Failing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got_lin, got_conv = lin(x), conv(img)
        lin(x)
        conv(img)
    msgs = [str(w.message) for w in caught if "fast path failed" in str(w.message)]
    assert len(msgs) == 2, msgs  # one per op, not one per call
    assert torch.equal(got_lin, want_lin) and torch.equal(got_conv, want_conv)
    assert not fastpath.usable("linear", dtype) and not fastpath.usable("conv", dtype)
    assert "failed at run time" in fastpath.status()["conv"][str(dtype).removeprefix("torch.")]


def test_system_report_names_the_cpu_and_every_path():
    info = system.report()
    assert info["cpu"] and isinstance(info["cpu_flags"], list)
    assert set(info["fast_path_status"]) == set(fastpath.OPS)
    text = system.format_report(info)
    assert "conv bfloat16:" in text and "torch_cpu_capability:" in text


# -- an AVX2-only CPU, emulated --------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine not in ("x86_64", "AMD64"),
                    reason="the ISA cap emulates an x86 CPU")
@pytest.mark.skipif(EMULATED, reason="already inside the emulated run")
def test_suite_parts_pass_on_an_emulated_avx2_only_cpu():
    """The bfloat16/float16 tests and the fast-path tests, rerun with oneDNN/ATen capped at AVX2."""
    tests = ["tests/test_portability.py", "tests/test_unet.py::test_low_precision_cpu",
             "tests/test_unet.py::test_cpu_fast_path_follows_the_switch",
             "tests/test_loading.py::test_bfloat16_load_runs"]
    env = {**os.environ, **AVX2, "KANDINSKY_TEST_EMULATED_AVX2": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@pytest.mark.skipif(not EMULATED, reason="runs inside the emulated AVX2 run only")
def test_emulated_cpu_has_no_bfloat16_kernels_and_the_pipeline_warns(fresh_fastpath):
    assert not fastpath.native(torch.bfloat16)
    for op in ("linear", "conv"):
        ok, why = fastpath.probe(op, torch.bfloat16)
        assert not ok and why
    assert fastpath.usable("conv", torch.float32)  # fp32 oneDNN kernels exist on AVX2
    from kandinsky import Kandinsky21

    with pytest.warns(RuntimeWarning, match="no native support on this CPU"):
        Kandinsky21(prior=object(), dtype=torch.bfloat16)


def test_cli_info_system_prints_the_report():
    proc = subprocess.run([sys.executable, "-m", "kandinsky", "info", "--system", "--json"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, fastpath.ENV: "0"})
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["fast_paths"].startswith("off") and info["cpu"]
    assert info["env"][fastpath.ENV] == "0"
