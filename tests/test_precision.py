"""Precision choice (``precision="auto" | "fp32" | "bf16" | "fp16"``) and the lean-memory page release.

Speed is not tested here (see ``bench/``): these tests check the choice logic, its cache, that a lower precision
runs and stays close to float32, that ``auto`` never picks what the CPU cannot compute natively, and that
dropping the pages of memory-mapped weights never changes a value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kandinsky import Kandinsky21, precision
from kandinsky.models import fastpath
from kandinsky.models.common import release_pages

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KANDINSKY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(precision.ENV, raising=False)
    precision._chosen.clear()
    yield tmp_path / "cache" / "precision.json"
    precision._chosen.clear()


def _fake(monkeypatch, *, candidates, rates, cosine=1.0):
    calls = []

    def fake_rates(dtype):
        calls.append(dtype)
        return dict(rates[precision.NAMES[dtype]])

    monkeypatch.setattr(precision, "_candidates", lambda: list(candidates))
    monkeypatch.setattr(precision, "_rates", fake_rates)
    monkeypatch.setattr(precision, "_parity", lambda dtype: cosine)
    return calls


def test_names():
    assert precision.normalize("BF16") == "bf16" and precision.normalize("bfloat16") == "bf16"
    assert precision.normalize("float32") == "fp32" and precision.normalize("auto") == "auto"
    with pytest.raises(ValueError, match="unknown precision 'int4'; use one of auto, fp32, bf16, fp16"):
        precision.normalize("int4")
    assert precision.resolve(None) == torch.float32 and precision.resolve(None, "cuda") == torch.float16
    assert precision.resolve("fp32") == torch.float32 and precision.resolve("bf16") == torch.bfloat16
    assert precision.resolve("auto", "cuda") == torch.float16 and precision.resolve("auto", "meta") == torch.float32


def test_auto_takes_a_faster_lower_precision_that_passes_parity(cache, monkeypatch):
    _fake(monkeypatch, candidates=[torch.bfloat16],
          rates={"fp32": {"conv": 50, "linear": 50}, "bf16": {"conv": 150, "linear": 100}})
    choice = precision.choose()
    assert choice.precision == "bf16" and choice.dtype == torch.bfloat16
    assert "2.00x" in choice.reason and choice.rates["bf16"]["conv"] == 150
    assert precision.resolve("auto") == torch.bfloat16
    saved = json.loads(cache.read_text())
    assert saved[precision.machine_key()]["precision"] == "bf16"


@pytest.mark.parametrize("rates, cosine, why", [
    ({"fp32": {"conv": 50, "linear": 50}, "bf16": {"conv": 52, "linear": 200}}, 1.0, "only 1.04x"),
    ({"fp32": {"conv": 50, "linear": 50}, "bf16": {"conv": 200, "linear": 200}}, 0.99, "failed the parity check"),
])
def test_auto_keeps_fp32_when_the_lower_precision_is_slow_or_wrong(cache, monkeypatch, rates, cosine, why):
    _fake(monkeypatch, candidates=[torch.bfloat16], rates=rates, cosine=cosine)
    choice = precision.choose()
    assert choice.precision == "fp32" and why in choice.reason


def test_auto_without_native_lower_precision_is_fp32(cache, monkeypatch):
    calls = _fake(monkeypatch, candidates=[], rates={"fp32": {"conv": 50, "linear": 50}})
    choice = precision.choose()
    assert choice.precision == "fp32" and "natively" in choice.reason and calls == [torch.float32]


def test_the_choice_is_cached_on_disk_and_refused_when_unusable(cache, monkeypatch):
    calls = _fake(monkeypatch, candidates=[torch.bfloat16],
                  rates={"fp32": {"conv": 50, "linear": 50}, "bf16": {"conv": 150, "linear": 150}})
    assert precision.choose().precision == "bf16" and len(calls) == 2
    precision._chosen.clear()
    assert precision.choose().precision == "bf16" and len(calls) == 2  # from the file: nothing measured
    precision._chosen.clear()
    monkeypatch.setattr(precision, "_candidates", lambda: [])  # e.g. the ISA capped since: measured again
    assert precision.choose().precision == "fp32" and len(calls) == 3
    for junk in ("{not json", "[1, 2]", json.dumps({precision.machine_key(): {"precision": "int8", "reason": ""}}),
                 json.dumps({precision.machine_key(): {"unexpected": 1}})):
        precision._chosen.clear()
        cache.write_text(junk)
        assert precision.choose().precision == "fp32"
    assert json.loads(cache.read_text())[precision.machine_key()]["precision"] == "fp32"


def test_an_unwritable_cache_only_means_measuring_again(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("KANDINSKY_CACHE", str(blocker / "sub"))  # a file where the folder should be
    precision._chosen.clear()
    _fake(monkeypatch, candidates=[], rates={"fp32": {"conv": 1, "linear": 1}})
    try:
        assert precision.choose().precision == "fp32"
    finally:
        precision._chosen.clear()


def test_environment_override(cache, monkeypatch):
    monkeypatch.setenv(precision.ENV, "fp32")
    monkeypatch.setattr(precision, "choose", lambda: pytest.fail("measured despite the override"))
    assert precision.resolve("auto") == torch.float32


def test_real_measurement_on_this_cpu(cache):
    """The probe runs here and chooses something this CPU computes natively (fp32 on an AVX2-only CPU)."""
    choice = precision.choose()
    assert choice.precision in ("fp32", "bf16") and choice.rates["fp32"]["conv"] > 0
    if choice.precision == "bf16":
        assert fastpath.native(torch.bfloat16) and choice.cosine["bf16"] >= precision.MIN_COSINE
    assert "precision" in json.loads(cache.read_text())[precision.machine_key()]


def test_auto_is_fp32_on_an_emulated_avx2_cpu(tmp_path):
    """Capping the ISA (an AVX2-only CPU's view) is a different machine for the cache, and bf16 is not native."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
           "KANDINSKY_CACHE": str(tmp_path)}
    env.pop(precision.ENV, None)
    code = "from kandinsky import precision; c = precision.choose(); print(c.precision, '|', c.reason)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("fp32 |"), out.stdout


def test_pipeline_precision(monkeypatch):
    """bf16 runs and stays near fp32; precision and a disagreeing dtype are refused; auto resolves."""
    kw = dict(prompt="a red circle on a blue background", width=64, height=64, steps=4, prior_steps=2, seed=3,
              output="np")
    want = Kandinsky21.from_pretrained(precision="fp32").text_to_image(**kw)
    with pytest.warns(RuntimeWarning) if not fastpath.native(torch.bfloat16) else _nothing():
        pipe = Kandinsky21.from_pretrained(precision="bf16")
    assert pipe.dtype == torch.bfloat16
    got = pipe.text_to_image(**kw)
    assert abs(got.astype("float64") - want).mean() < 0.05, abs(got - want).mean()
    with pytest.raises(ValueError, match="disagree"):
        Kandinsky21.from_pretrained(precision="bf16", dtype="float32")
    monkeypatch.setenv(precision.ENV, "fp32")
    assert Kandinsky21.from_pretrained(precision="auto", dtype="float32").dtype == torch.float32


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_release_pages_never_changes_a_value(tmp_path):
    tensors = {f"w{i}": torch.randn(64, 1024) for i in range(4)}
    save_file(tensors, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    total = sum(float(t.sum()) for t in loaded.values())
    dropped = release_pages(loaded.values())
    if sys.platform.startswith("linux"):
        assert dropped > 0  # memory-mapped from the file: its clean pages go
    assert sum(float(t.sum()) for t in loaded.values()) == total  # and come back unchanged
    loaded["w0"].add_(1)  # a write makes private copies of those pages: they must stay
    changed = float(loaded["w0"].sum())
    release_pages(loaded.values())
    assert float(loaded["w0"].sum()) == changed
    assert torch.equal(loaded["w1"], tensors["w1"])
    anonymous = torch.randn(1 << 16)
    before = anonymous.clone()
    assert release_pages([anonymous]) == 0 and torch.equal(anonymous, before)


def test_converted_copies_are_cached_and_memory_mapped(tmp_path, monkeypatch):
    from kandinsky.weights import io

    monkeypatch.setenv("KANDINSKY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(io, "CONVERT_MIN_BYTES", 0)
    src = {"a": torch.randn(256, 1024), "b": torch.randn(8), "steps": torch.arange(4)}
    save_file(src, tmp_path / "w.safetensors")
    path = tmp_path / "w.safetensors"
    got = io.load_file_as(path, torch.bfloat16)
    want = src["a"].to(torch.bfloat16)
    assert got["a"].dtype == torch.bfloat16 and torch.equal(got["a"], want)
    assert got["steps"].dtype == torch.int64 and torch.equal(got["steps"], src["steps"])
    copy = io.converted_path(path, torch.bfloat16)
    assert copy.is_file() and copy.parent == tmp_path / "cache" / "converted"
    stamp = copy.stat().st_mtime_ns
    assert torch.equal(io.load_file_as(path, torch.bfloat16)["a"], want) and copy.stat().st_mtime_ns == stamp
    assert release_pages(io.load_file_as(path, torch.bfloat16).values()) > 0 or not sys.platform.startswith("linux")
    del got  # memory-mapped from the copy, which is now damaged in place (kandinsky itself only ever replaces it)
    copy.write_bytes(b"damaged")  # a broken copy is made again
    assert torch.equal(io.load_file_as(path, torch.bfloat16)["a"], want)
    assert io.load_file_as(path, torch.float32)["a"].dtype == torch.float32  # already in the dtype: the file itself
    monkeypatch.setenv(io.CONVERTED_ENV, "0")
    assert io.load_file_as(path, torch.bfloat16)["a"].dtype == torch.float32  # converted later, in memory
    monkeypatch.delenv(io.CONVERTED_ENV)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    monkeypatch.setenv("KANDINSKY_CACHE", str(blocker))  # cannot be written: the file itself
    assert io.load_file_as(path, torch.float16)["a"].dtype == torch.float32


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    full.pop(precision.ENV, None) if precision.ENV not in env else None
    return subprocess.run([sys.executable, "-m", "kandinsky", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=300)


def test_cli_precision_is_recorded_as_the_dtype_it_ran_in(tmp_path):
    small = ["--seed", "3", "--steps", "2", "--prior-steps", "2", "--json"]
    out = _cli(["generate", "a red circle", "--precision", "bf16", "-o", "a.png", *small], tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["images"][0]["parameters"]["dtype"] == "bfloat16"
    out = _cli(["generate", "a red circle", "--precision", "auto", "-o", "b.png", *small], tmp_path,
               **{precision.ENV: "fp32"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["images"][0]["parameters"]["dtype"] == "float32"
    again = _cli(["generate", "--from", "a.png", "-o", "c.png", "--json"], tmp_path)  # the record's dtype again
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["images"][0]["parameters"]["dtype"] == "bfloat16"
    bad = _cli(["generate", "x", "--precision", "bf16", "--dtype", "fp32", "-o", "d.png"], tmp_path)
    assert bad.returncode == 2 and "disagree" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    bad = _cli(["generate", "x", "--precision", "int4"], tmp_path)
    assert bad.returncode == 2 and "--precision" in bad.stderr
