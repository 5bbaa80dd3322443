"""Loading diffusers-format folders: .bin and .safetensors, other configs, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import tiny
import torch
from conftest import assert_matches
from safetensors.torch import load_file, save_file

from kandinsky import Kandinsky21
from kandinsky.weights.diffusers_format import load_decoder, load_prior


def _state(module):
    return {k: v for k, v in module.state_dict().items()}


def test_bin_and_safetensors_give_identical_tensors(decoder_pipe, prior_pipe, tmp_path):
    pipe, folder = decoder_pipe
    tiny.save_decoder(pipe, tmp_path / "bin", safe=False)
    assert (tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin").is_file()
    a, b = load_decoder(folder), load_decoder(tmp_path / "bin")
    for name in ("unet", "movq", "text_encoder"):
        sa, sb = _state(getattr(a, name)), _state(getattr(b, name))
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    tiny.save_prior(prior_pipe[0], tmp_path / "prior_bin", safe=False)
    pa, pb = load_prior(prior_pipe[1]), load_prior(tmp_path / "prior_bin")
    assert all(torch.equal(v, _state(pb.prior)[k]) for k, v in _state(pa.prior).items())


def test_loaded_weights_equal_diffusers(decoder_pipe):
    pipe, folder = decoder_pipe
    parts = load_decoder(folder)
    ref = pipe.unet.state_dict()
    ours = parts.unet.state_dict()
    assert ref.keys() == ours.keys()
    assert all(torch.equal(ref[k], ours[k]) for k in ref)


@pytest.mark.parametrize("variant", ["b"])
def test_other_configs_match_diffusers(tmp_path, variant):
    prior = tiny.build_prior_pipeline(tmp_path / "tok", variant, seed=3)
    decoder = tiny.build_decoder_pipeline(variant, seed=3)
    for p in (prior, decoder):
        p.set_progress_bar_config(disable=True)
    tiny.save_prior(prior, tmp_path / "prior")
    tiny.save_decoder(decoder, tmp_path / "decoder")
    ours = Kandinsky21.from_pretrained(decoder=tmp_path / "decoder", prior=tmp_path / "prior")
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    got = ours.prior_embeds(["a red star", "green"], "a dog", steps=5, seed=1)
    assert_matches((got.image, got.negative), lambda: tuple(
        getattr(prior(["a red star", "green"], negative_prompt=["a dog", "a dog"], num_inference_steps=5,
                      generator=g(1)), k) for k in ("image_embeds", "negative_image_embeds")))
    emb, neg = got.image[:1], got.negative[:1]
    img = ours.text_to_image("a red star", image_embeds=emb, negative_image_embeds=neg, width=96, height=64,
                             steps=6, seed=2, output="np")
    assert_matches(img, lambda: decoder("a red star", image_embeds=emb, negative_image_embeds=neg, width=96,
                                        height=64, num_inference_steps=6, generator=g(2), output_type="np").images)


def test_missing_folder_and_files(decoder_pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="decoder folder not found"):
        Kandinsky21.from_pretrained(decoder=tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(decoder_pipe[1], broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*unet"):
        load_decoder(broken)


def test_wrong_pipeline_kind(prior_pipe, decoder_pipe):
    with pytest.raises(ValueError, match="KandinskyPriorPipeline"):
        Kandinsky21.from_pretrained(decoder=prior_pipe[1])
    with pytest.raises(ValueError, match="9-channel"):
        Kandinsky21.from_pretrained(inpaint=decoder_pipe[1])


def test_missing_and_unexpected_keys_are_named(decoder_pipe, tmp_path):
    broken = tmp_path / "keys"
    shutil.copytree(decoder_pipe[1], broken)
    path = broken / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state.pop("conv_in.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"missing keys conv_in\.weight.*unexpected keys extra\.weight"):
        load_decoder(broken)


def test_unsupported_config_option_is_named(decoder_pipe, tmp_path):
    broken = tmp_path / "cfg"
    shutil.copytree(decoder_pipe[1], broken)
    cfg_path = broken / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["resnet_time_scale_shift"] = "default"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        load_decoder(broken)


def test_malformed_json_names_file(decoder_pipe, tmp_path):
    broken = tmp_path / "json"
    shutil.copytree(decoder_pipe[1], broken)
    (broken / "movq" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="movq.config.json is not valid JSON"):
        load_decoder(broken)


def test_dtype_and_device_validation(decoder_pipe):
    with pytest.raises(ValueError, match="dtype"):
        Kandinsky21.from_pretrained(decoder=decoder_pipe[1], dtype="int8")
    with pytest.raises(ValueError, match="device"):
        Kandinsky21.from_pretrained(decoder=decoder_pipe[1], device="tpu9")


def test_bfloat16_load_runs(decoder_pipe, prior_pipe):
    pipe = Kandinsky21.from_pretrained(decoder=decoder_pipe[1], prior=prior_pipe[1], dtype="bfloat16")
    assert next(pipe.decoder.unet.parameters()).dtype == torch.bfloat16
    out = pipe.text_to_image("a red circle", width=64, height=64, steps=2, prior_steps=2, seed=0, output="np")
    assert out.shape == (1, 64, 64, 3) and out.dtype.name == "float32"
