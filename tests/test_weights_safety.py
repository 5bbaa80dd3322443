"""Opening weights files is safe: pickles only through ``torch.load(weights_only=True)``, TorchScript archives
through a restricted unpickler that never runs their code; damaged files give errors that name them."""

from __future__ import annotations

import os
import pickle
import re
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from kandinsky.weights import original_format as of
from kandinsky.weights.convert import convert
from kandinsky.weights.io import load_file


class Payload:
    """Unpickling this runs a shell command that creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture
def sentinel(tmp_path) -> Path:
    path = tmp_path / "SENTINEL"
    yield path
    assert not path.exists(), "the pickle payload ran"


def _evil_state_dict(sentinel: Path) -> dict:
    return {"weight": torch.zeros(2, 2), "evil": Payload(sentinel)}


def _assert_refused(exc: pytest.ExceptionInfo, path: Path) -> None:
    message = str(exc.value)
    assert str(path) in message
    assert "safetensors" in message  # says how to convert it


# ----------------------------------------------------------------------------------------------------------------
# pickles


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".th", ".bin", ".pth"])
@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_malicious_torch_pickle_is_refused(tmp_path, sentinel, suffix, zipped):
    path = tmp_path / f"model{suffix}"
    torch.save(_evil_state_dict(sentinel), path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(ValueError) as exc:
        of.read_weights(path)
    _assert_refused(exc, path)
    with pytest.raises(ValueError):
        load_file(path)


def test_plain_pickle_payload_is_refused(tmp_path, sentinel):
    path = tmp_path / "prior_fp16.ckpt"
    path.write_bytes(pickle.dumps(Payload(sentinel), protocol=2))
    with pytest.raises(ValueError) as exc:
        of.read_weights(path)
    _assert_refused(exc, path)


def test_malicious_stats_file_is_refused(tmp_path, sentinel):
    path = tmp_path / "ViT-L-14_stats.th"
    torch.save((torch.zeros(4), Payload(sentinel)), path)
    with pytest.raises(ValueError) as exc:
        of.read_clip_stats(path)
    _assert_refused(exc, path)


def test_load_original_and_convert_refuse_malicious_files(tmp_path, sentinel):
    folder = tmp_path / "Kandinsky_2.1"
    (folder / "text_encoder").mkdir(parents=True)
    (folder / "clip_tokenizer").mkdir()
    for name in ("decoder_fp16.ckpt", "prior_fp16.ckpt", "movq_final.ckpt", "ViT-L-14.pt", "ViT-L-14_stats.th"):
        torch.save(_evil_state_dict(sentinel), folder / name)
    torch.save(_evil_state_dict(sentinel), folder / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(ValueError) as exc:
        of.load_original(folder)
    _assert_refused(exc, folder / "movq_final.ckpt")
    with pytest.raises(ValueError) as exc:
        of.load_original(folder, movq=folder / "decoder_fp16.ckpt", prior=folder / "ViT-L-14.pt")
    _assert_refused(exc, folder / "decoder_fp16.ckpt")
    with pytest.raises(ValueError):
        convert(folder, tmp_path / "out", to="diffusers", progress=False)
    with pytest.raises(ValueError):
        convert(folder / "prior_fp16.ckpt", tmp_path / "prior.safetensors", to="safetensors", progress=False)
    assert not (tmp_path / "prior.safetensors").exists()
    with pytest.raises(ValueError):
        convert(folder, tmp_path / "st", to="safetensors", progress=False)


def test_pickles_are_opened_weights_only_and_memory_mapped(tmp_path, monkeypatch):
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    zipped, legacy = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    torch.save({"w": torch.ones(3)}, zipped)
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    torch.save((torch.zeros(3), torch.ones(3)), tmp_path / "stats.th")
    assert torch.equal(of.read_weights(zipped)["w"], torch.ones(3))
    assert torch.equal(of.read_weights(legacy)["w"], torch.ones(3))
    of.read_clip_stats(tmp_path / "stats.th")
    assert [c.get("weights_only") for c in calls] == [True, True, True]
    assert [c.get("mmap") for c in calls] == [True, False, True]


# ----------------------------------------------------------------------------------------------------------------
# TorchScript archives


def _fake_torchscript(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("archive/version", "3\n")
        z.writestr("archive/code/__torch__.py", "def forward(self):\n  pass\n")
        for name, data in (records or {}).items():
            z.writestr(f"archive/data/{name}", data)
    return path


def _torch_module_pickle(state: dict, protocol: int = 2) -> bytes:
    """Pickle ``state`` as the state of a ``__torch__.Model`` object, as TorchScript archives do."""
    module = types.ModuleType("__torch__")

    class Model:
        def __init__(self, state):
            self.state = state

        def __reduce_ex__(self, protocol):
            return (Model, (), self.state)

    Model.__module__, Model.__qualname__ = "__torch__", "Model"
    module.Model = Model
    sys.modules["__torch__"] = module
    try:
        return pickle.dumps(Model(state), protocol=protocol)
    finally:
        del sys.modules["__torch__"]


def _global_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-2 pickle of ``module.name(arg)``."""
    a = arg.encode()
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + len(a).to_bytes(4, "little") + a + b"\x85R."


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_torchscript_archive_is_refused(tmp_path, sentinel, protocol):
    path = _fake_torchscript(tmp_path / "ViT-L-14.pt", pickle.dumps(Payload(sentinel), protocol=protocol))
    assert of.is_torchscript_archive(path)
    with pytest.raises(ValueError, match="refused") as exc:
        of.read_weights(path)
    _assert_refused(exc, path)
    assert "system" in str(exc.value)
    nested = _fake_torchscript(tmp_path / "nested.pt",
                               _torch_module_pickle({"training": False, "hook": Payload(sentinel)}, protocol))
    with pytest.raises(ValueError, match="refused") as exc:
        of.read_torchscript_tensors(nested)
    _assert_refused(exc, nested)


def test_torchscript_placeholders_cannot_run_code(tmp_path, sentinel):
    code = f"open({str(sentinel)!r}, 'w')"
    for module in ("__torch__.builtins", "__torch__"):
        path = _fake_torchscript(tmp_path / "x.pt", _global_call(module, "eval", code))
        with pytest.raises(ValueError, match="no tensors"):
            of.read_torchscript_tensors(path)
    for module, name in (("builtins", "eval"), ("torch", "load"), ("torch.jit", "load"), ("torch._utils", "os")):
        path = _fake_torchscript(tmp_path / "y.pt", _global_call(module, name, code))
        with pytest.raises(ValueError, match=rf"refused: .* global {re.escape(module)}\.{name}\b"):
            of.read_torchscript_tensors(path)


class Scriptable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.proj = nn.Parameter(torch.randn(3, 2).half())
        self.register_buffer("index", torch.arange(5))
        self.mask = torch.full((2, 2), float("-inf")).triu(1)
        self.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.lin(x)) @ self.proj.float()
        for block in self.blocks:
            y = block(y)
        return y


@pytest.mark.parametrize("mode", ["script", "trace"])
def test_torchscript_tensors_read_without_jit_load(tmp_path, monkeypatch, mode):
    model = Scriptable().eval()
    path = tmp_path / "m.pt"
    jit = torch.jit.script(model) if mode == "script" else torch.jit.trace(model, torch.randn(2, 4))
    torch.jit.save(jit, str(path))

    def forbidden(*args, **kwargs):
        raise AssertionError("the archive must not be loaded as code")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    tensors = of.read_weights(path)
    expected = model.state_dict()
    assert set(expected) <= set(tensors)
    for k, v in expected.items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v), k
    assert set(tensors) - set(expected) <= {"mask"}  # scripted modules keep tensor attributes
    tensors["proj"].add_(1)  # memory-mapped copy-on-write: usable, and the file is untouched
    assert torch.equal(of.read_torchscript_tensors(path)["proj"], expected["proj"])


def test_torchscript_records_are_checked(tmp_path):
    model = torch.jit.script(Scriptable())
    good = tmp_path / "good.pt"
    torch.jit.save(model, str(good))
    with zipfile.ZipFile(good) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    record = next(n for n in entries if "/data/" in n and len(entries[n]) > 8)

    missing = tmp_path / "missing.pt"
    with zipfile.ZipFile(missing, "w") as z:
        for name, data in entries.items():
            if name != record:
                z.writestr(name, data)
    with pytest.raises(ValueError, match=r"missing\.pt.*missing"):
        of.read_torchscript_tensors(missing)

    short = tmp_path / "short.pt"
    with zipfile.ZipFile(short, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data[:4] if name == record else data)
    with pytest.raises(ValueError, match=r"short\.pt.*shorter"):
        of.read_torchscript_tensors(short)

    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    assert torch.equal(of.read_torchscript_tensors(deflated)["lin.weight"],
                       of.read_torchscript_tensors(good)["lin.weight"])


# ----------------------------------------------------------------------------------------------------------------
# truncated and corrupt files


def _damaged(path: Path, how: str) -> Path:
    data = path.read_bytes()
    out = path.with_name(f"{how}_{path.name}")
    out.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00not a weights file\xff" * 40,
                     "empty": b"", "tail": data[:-30]}[how])
    return out


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "tail"])
@pytest.mark.parametrize("kind", ["ckpt", "legacy", "torchscript", "safetensors"])
def test_damaged_files_raise_errors_naming_them(tmp_path, kind, how):
    from safetensors.torch import save_file

    state = {"weight": torch.randn(64, 64), "bias": torch.randn(64)}
    if kind == "ckpt":
        path = tmp_path / "decoder_fp16.ckpt"
        torch.save(state, path)
    elif kind == "legacy":
        path = tmp_path / "movq_final.ckpt"
        torch.save(state, path, _use_new_zipfile_serialization=False)
    elif kind == "torchscript":
        path = tmp_path / "ViT-L-14.pt"
        torch.jit.save(torch.jit.script(Scriptable()), str(path))
    else:
        path = tmp_path / "decoder_fp16.safetensors"
        save_file(state, str(path))
    bad = _damaged(path, how)
    with pytest.raises(ValueError) as exc:
        of.read_weights(bad)
    assert str(bad) in str(exc.value)


@pytest.mark.parametrize("content", ["garbage", "three", "mismatch", "dict"])
def test_bad_stats_files(tmp_path, content):
    path = tmp_path / "ViT-L-14_stats.th"
    if content == "garbage":
        path.write_bytes(b"\x80\x02garbage")
    elif content == "three":
        torch.save((torch.zeros(4), torch.ones(4), torch.ones(4)), path)
    elif content == "mismatch":
        torch.save((torch.zeros(4), torch.ones(5)), path)
    else:
        torch.save({"mean": torch.zeros(4), "std": torch.ones(4)}, path)
        mean, std = of.read_clip_stats(path)
        assert torch.equal(mean, torch.zeros(4)) and torch.equal(std, torch.ones(4))
        return
    with pytest.raises(ValueError, match="ViT-L-14_stats"):
        of.read_clip_stats(path)


def test_damaged_file_in_a_set_is_named(tmp_path):
    folder = tmp_path / "set"
    (folder / "text_encoder").mkdir(parents=True)
    (folder / "clip_tokenizer").mkdir()
    for name in ("decoder_fp16.ckpt", "prior_fp16.ckpt", "ViT-L-14.pt", "ViT-L-14_stats.th"):
        torch.save({"w": torch.zeros(1)}, folder / name)
    (folder / "movq_final.ckpt").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(ValueError, match=r"movq_final\.ckpt"):
        of.load_original(folder)
    with pytest.raises(ValueError, match=r"movq_final\.ckpt"):
        convert(folder, tmp_path / "out", to="diffusers", progress=False)
    assert not (tmp_path / "out").exists()
