"""Broken model folders give one clear error that names the file: missing or truncated files, configs that lie
about shapes, wrong JSON, symbolic-link loops and dangling links. Each case damages a copy of the bundled model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from kandinsky import Kandinsky21
from kandinsky.pipeline import ASSETS


def _copy(tmp_path: Path, role: str) -> Path:
    folder = tmp_path / role
    shutil.copytree(ASSETS / role, folder)
    return folder


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _edit_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _relink(path: Path, target: str) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    os.symlink(target, path)


UNET_W = "unet/diffusion_pytorch_model.safetensors"
MOVQ_W = "movq/diffusion_pytorch_model.safetensors"

DECODER_CASES = {
    "missing weights": (lambda d: (d / UNET_W).unlink(), FileNotFoundError, r"no weights in .*unet"),
    "missing config": (lambda d: (d / "unet/config.json").unlink(), FileNotFoundError, r"unet/config\.json"),
    "missing index": (lambda d: (d / "model_index.json").unlink(), FileNotFoundError, r"model_index\.json"),
    "missing tokenizer": (lambda d: shutil.rmtree(d / "tokenizer"), FileNotFoundError, r"tokenizer"),
    "truncated header": (lambda d: _truncate(d / UNET_W, 6), ValueError, r"unet/diffusion_pytorch_model\.safetensors"),
    "truncated data": (lambda d: _truncate(d / MOVQ_W, 100_000), ValueError,
                       r"movq/diffusion_pytorch_model\.safetensors is not a readable"),
    "zero bytes": (lambda d: _truncate(d / "text_encoder/model.safetensors", 0), ValueError,
                   r"text_encoder/model\.safetensors"),
    "config lies about width": (lambda d: _edit_json(d / "unet/config.json", cross_attention_dim=64), ValueError,
                                r"unet/diffusion_pytorch_model\.safetensors has tensors of the wrong shape.*"
                                r"unet/config\.json"),
    "config lies about levels": (lambda d: _edit_json(d / "unet/config.json", block_out_channels=[64, 128, 192, 256]),
                                 ValueError, r"unet/config\.json: .*down_block_types"),
    "config lies about depth": (lambda d: _edit_json(d / "text_encoder/config.json", num_hidden_layers=7),
                                ValueError, r"text_encoder/model\.safetensors does not match.*text_encoder/config"),
    "inconsistent config": (lambda d: _edit_json(d / "movq/config.json", latent_channels=8), ValueError,
                            r"movq/config\.json: .*latent_channels"),
    "config of the wrong type": (lambda d: _edit_json(d / "unet/config.json", layers_per_block="three"),
                                 ValueError, r"unet/config\.json: .*layers_per_block"),
    "not JSON": (lambda d: (d / "unet/config.json").write_text("{nope"), ValueError, r"config\.json is not valid JSON"),
    "JSON list": (lambda d: (d / "movq/config.json").write_text("[1, 2]"), ValueError, r"must hold a JSON object"),
    "wrong pipeline": (lambda d: _edit_json(d / "model_index.json", _class_name="StableDiffusionPipeline"),
                       ValueError, r"holds a 'StableDiffusionPipeline' pipeline"),
    "weights file is a folder": (lambda d: ((d / MOVQ_W).unlink(), (d / MOVQ_W).mkdir()), FileNotFoundError,
                                 r"is a folder, expected a file"),
    "symlink loop": (lambda d: (_relink(d / UNET_W, "other.safetensors"),
                                os.symlink("diffusion_pytorch_model.safetensors", d / "unet/other.safetensors")),
                     FileNotFoundError, r"unet/diffusion_pytorch_model\.safetensors is a symbolic link loop"),
    "folder symlink loop": (lambda d: _relink(d / "movq", "movq"), FileNotFoundError,
                            r"movq is a symbolic link loop"),
    "dangling symlink": (lambda d: _relink(d / MOVQ_W, "/nonexistent/movq.safetensors"), FileNotFoundError,
                         r"broken symbolic link"),
}


@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_broken_decoder_folder(tmp_path, case):
    damage, error, pattern = DECODER_CASES[case]
    folder = _copy(tmp_path, "decoder")
    damage(folder)
    with pytest.raises(error, match=pattern) as info:
        Kandinsky21.from_pretrained(decoder=folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["truncated prior", "vision config lies", "missing processor is fine"])
def test_broken_prior_folder(tmp_path, case):
    folder = _copy(tmp_path, "prior")
    if case == "truncated prior":
        _truncate(folder / "prior/diffusion_pytorch_model.safetensors", 3000)
        with pytest.raises(ValueError, match=r"prior/diffusion_pytorch_model\.safetensors is not a readable"):
            Kandinsky21.from_pretrained(prior=folder)
    elif case == "vision config lies":
        _edit_json(folder / "image_encoder/config.json", hidden_size=48)
        with pytest.raises(ValueError, match=r"image_encoder/model\.safetensors has tensors of the wrong shape"):
            Kandinsky21.from_pretrained(prior=folder)
    else:
        shutil.rmtree(folder / "image_processor")
        assert Kandinsky21.from_pretrained(prior=folder).prior is not None


def test_missing_folder_and_a_file_given_as_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="decoder folder not found"):
        Kandinsky21.from_pretrained(decoder=tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file, expected a folder"):
        Kandinsky21.from_pretrained(decoder=tmp_path / "file")
