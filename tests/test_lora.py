"""LoRA adapters: diffusers-named files map onto our UNet (same output as diffusers with the same adapter in
memory), peft's layout round-trips, scale 0 and switching adapters off leave the base bit-identical, adapters mix
linearly, and files for another architecture are refused naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from test_unet import build_reference, inputs, ours_from, reference_out

from kandinsky import Kandinsky21
from kandinsky.adapters import Adapters
from kandinsky.jobs import lora_spec as parse_spec
from kandinsky.weights import lora as lora_files

peft = pytest.importorskip("peft")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


def _diffusers_adapter(ref, rank: int = 4, alpha: float = 4.0, targets=TARGETS, seed: int = 3):
    torch.manual_seed(seed)
    ref.add_adapter(peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    return peft.get_peft_model_state_dict(ref)


def _as_diffusers_file(state: dict, path: Path, alphas: dict | None = None) -> Path:
    """Write ``state`` as diffusers' Kandinsky LoRA training writes it: ``unet.`` keys, half of them in the old
    ``.lora.down/.lora.up`` naming and half in peft's (a mixed file)."""
    from safetensors.torch import save_file

    out = {}
    for i, (key, value) in enumerate(sorted(state.items())):
        if (i // 2) % 2:  # the (A, B) pair of every other module in the old naming
            key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        out["unet." + key] = value.contiguous()
    for module, alpha in (alphas or {}).items():
        out[f"unet.{module}.alpha"] = torch.tensor(float(alpha))
    save_file(out, str(path))
    return path


def _run(unet, cfg, seed=2):
    image, pooled, hidden = inputs(cfg)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return unet(sample, 7, unet.prepare_condition(image, pooled, hidden))


@pytest.mark.parametrize("alpha_tensors", [False, True])
def test_diffusers_named_file_gives_diffusers_output(tmp_path, alpha_tensors):
    ref = build_reference(seed=11)
    ours = ours_from(ref)
    cfg = ours.config
    rank, alpha = 4, (8.0 if alpha_tensors else 4.0)
    state = _diffusers_adapter(ref, rank=rank, alpha=alpha)
    image, pooled, hidden = inputs(cfg)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_out(ref, sample, 7, image, pooled, hidden)
    modules = {k.rsplit(".lora_", 1)[0] for k in state}
    path = _as_diffusers_file(state, tmp_path / "pytorch_lora_weights.safetensors",
                              alphas={m: alpha for m in modules} if alpha_tensors else None)
    lora = lora_files.read(path)
    assert len(lora.targets) == len(modules) == len(state) // 2
    adapters = Adapters(ours)
    base = _run(ours, cfg)
    adapters.add(lora, "x")
    assert torch.equal(_run(ours, cfg), base)  # loaded but not active: the base, bit for bit
    adapters.activate([("x", 1.0)])
    got = _run(ours, cfg)
    assert (got - expected).abs().max().item() < 1e-4
    assert (got - base).abs().max().item() > 1e-2  # the adapter does something
    adapters.activate([("x", 0.0)])
    assert torch.equal(_run(ours, cfg), base)  # scale 0 = the base model exactly
    adapters.activate([])
    assert torch.equal(_run(ours, cfg), base)


def test_two_adapters_mix_linearly_on_linear_layers():
    ref = build_reference(seed=12)
    ours = ours_from(ref)
    layer_name = "mid_block.attentions.0.to_q"
    state_a = _diffusers_adapter(build_reference(seed=12), seed=1)
    state_b = _diffusers_adapter(build_reference(seed=12), seed=2)
    adapters = Adapters(ours)
    adapters.add(lora_files.from_state_dict(state_a, name="a"), "a")
    adapters.add(lora_files.from_state_dict(state_b, name="b"), "b")
    layer = dict(ours.named_modules())[layer_name]
    x = torch.randn(3, layer.in_features)

    def out(pairs):
        adapters.activate(pairs)
        with torch.inference_mode():
            return layer(x).double()

    base, da, db = out([]), out([("a", 1.0)]), out([("b", 1.0)])
    mixed = out([("a", 0.7), ("b", -0.4)])
    assert torch.allclose(mixed, base + 0.7 * (da - base) + -0.4 * (db - base), atol=1e-5)


def test_peft_layout_round_trip_and_a_new_process(tmp_path):
    pipe = Kandinsky21.from_pretrained()
    unet = pipe.decoder.unet
    torch.manual_seed(0)
    modules = [n for n, m in unet.named_modules() if n.endswith(("to_q", "to_v"))][:4]
    lw = lora_files.LoraWeights(
        name="demo", a={m: torch.randn(2, dict(unet.named_modules())[m].in_features) * 0.3 for m in modules},
        b={m: torch.randn(dict(unet.named_modules())[m].out_features, 2) * 0.3 for m in modules},
        alpha={m: 2.0 for m in modules})
    folder = lora_files.save(lw, tmp_path / "demo", base_model="bundled", trigger_words=["zq"])
    assert {p.name for p in folder.iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    back = lora_files.read(folder)
    assert back.name == "demo" and back.meta["trigger_words"] == ["zq"] and back.targets == sorted(modules)
    assert all(torch.equal(back.a[m], lw.a[m].float()) and torch.equal(back.b[m], lw.b[m].float()) for m in modules)
    kw = dict(width=64, height=64, steps=2, prior_steps=2, seed=5)
    (base,) = pipe.text_to_image("a red circle", **kw)
    with pipe.loras([(folder, 0.8)]) as used:
        assert used == [("demo", 0.8)]
        (adapted,) = pipe.text_to_image("a red circle", **kw)
    (after,) = pipe.text_to_image("a red circle", **kw)
    assert np.array_equal(np.asarray(base), np.asarray(after))  # nothing leaks into the next call
    assert not np.array_equal(np.asarray(base), np.asarray(adapted))
    assert adapted.info["kandinsky"]["loras"] == [["demo", 0.8]] and "loras" not in after.info["kandinsky"]
    code = (f"import numpy as np; from kandinsky import Kandinsky21; p = Kandinsky21.from_pretrained(); "
            f"p.set_loras([({str(folder)!r}, 0.8)]); im, = p.text_to_image('a red circle', **{kw!r}); "
            f"np.save({str(tmp_path / 'x.npy')!r}, np.asarray(im))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "x.npy"), np.asarray(adapted))


def test_files_for_another_architecture_are_refused(tmp_path):
    ours = ours_from(build_reference(seed=13))
    adapters = Adapters(ours)
    bad_key = {"unet.down_blocks.9.attentions.0.to_q.lora_A.weight": torch.zeros(4, 64),
               "unet.down_blocks.9.attentions.0.to_q.lora_B.weight": torch.zeros(64, 4)}
    with pytest.raises(ValueError, match=r"down_blocks\.9\.attentions\.0\.to_q\.lora_A\.weight names a module"):
        adapters.add(lora_files.from_state_dict(bad_key, name="x"), "x")
    module = "mid_block.attentions.0.to_q"
    width = dict(ours.named_modules())[module].in_features
    wrong = {f"{module}.lora_A.weight": torch.zeros(4, width + 8), f"{module}.lora_B.weight": torch.zeros(width, 4)}
    with pytest.raises(ValueError, match=rf"lora_A \(4, {width + 8}\).*needs \(4, {width}\)"):
        adapters.add(lora_files.from_state_dict(wrong, name="y"), "y")
    sd = {"text_model.encoder.layers.0.q_proj.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="not LoRA weights of a UNet.*q_proj"):
        lora_files.from_state_dict(sd, name="te")
    assert not list(adapters.loaded) and not any("lora" in n for n, _ in ours.named_parameters())
    (tmp_path / "x.bin").write_bytes(b"\x80\x02.")
    with pytest.raises(ValueError, match="safetensors only"):
        lora_files.read(tmp_path / "x.bin")


def test_cli_spec():
    assert parse_spec("style.safetensors:0.6") == ("style.safetensors", 0.6)
    assert parse_spec("C:/x/style") == ("C:/x/style", 1.0)
    assert parse_spec("a:b:-1.5e-1") == ("a:b", -0.15)


@pytest.mark.parametrize("fmt", ["folder", "jsonl"])
def test_lora_training_lowers_the_loss_resumes_and_loads(tmp_path, fmt):
    """`finetune decoder --lora` on the bundled model: the loss falls, the base folder is untouched, the adapter
    (peft layout) loads through the pipeline and changes its images, and a rerun resumes from the checkpoint."""
    import json
    import random

    import PIL.Image

    from kandinsky.pipeline import ASSETS
    from kandinsky.train import shapes
    from kandinsky.train.finetune import FinetuneOptions, finetune, fixed_loss

    rng = random.Random(0)
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for i in range(6):
        scene = shapes.random_scene(rng, two_objects=0.0)
        PIL.Image.fromarray(shapes.render(scene, 64)).save(data / f"img{i}.png")
        caption = "zq " + shapes.caption(scene, rng, "en")
        (data / f"img{i}.txt").write_text(caption)
        lines.append(json.dumps({"image": f"img{i}.png", "text": caption}))
    (data / "data.jsonl").write_text("\n".join(lines) + "\n")
    source = data if fmt == "folder" else data / "data.jsonl"
    before_files = {p: p.stat().st_mtime_ns for p in (ASSETS / "decoder").rglob("*") if p.is_file()}
    opts = FinetuneOptions(steps=12, batch_size=3, lr=5e-3, ema_decay=0.0, progress=False, save_every=6, lora=True,
                           rank=4, targets="attn+conv", trigger_words=("zq",))
    out = finetune("decoder", ASSETS / "decoder", source, tmp_path / "adapter", opts, prior=ASSETS / "prior")
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {"adapter_model.safetensors",
                                                                             "adapter_config.json"}
    assert before_files == {p: p.stat().st_mtime_ns for p in (ASSETS / "decoder").rglob("*") if p.is_file()}
    lw = lora_files.read(out)
    assert lw.meta["trigger_words"] == ["zq"] and lw.meta["rank"] == 4
    assert any(".conv1" in t for t in lw.targets) and any(t.endswith("to_q") for t in lw.targets)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    # the loss with the adapter applied is lower than the base model's
    base_loss = fixed_loss("decoder", ASSETS / "decoder", source, prior=ASSETS / "prior")
    pipe = Kandinsky21.from_pretrained()
    kw = dict(width=64, height=64, steps=2, prior_steps=2, seed=1)
    (base,) = pipe.text_to_image("zq a red circle", **kw)
    with pipe.loras([(out, 1.0)]):
        (adapted,) = pipe.text_to_image("zq a red circle", **kw)
    assert not np.array_equal(np.asarray(base), np.asarray(adapted))
    from kandinsky.train import finetune as ft

    parts = pipe.decoder
    with pipe.loras([(out, 1.0)]):
        cached = ft.prepare_decoder_data(parts, pipe.prior, ft.read_pairs(source), 64, torch.device("cpu"))
        gen, rnd = torch.Generator().manual_seed(1234), random.Random(1234)
        idx = torch.arange(16) % 6
        with torch.no_grad():
            from kandinsky.diffusion.schedules import NoiseSchedule

            adapted_loss = float(ft.decoder_loss(parts.unet, NoiseSchedule.from_config(parts.scheduler_config),
                                                 cached, idx, gen, rnd, dropout=False)["loss"])
    assert adapted_loss < base_loss, (base_loss, adapted_loss)
    # a rerun with more steps continues from the checkpoint (step 12) instead of starting over
    state = out / ".finetune" / "ckpt" / "state.json"
    assert json.loads(state.read_text())["step"] == 12
    more = FinetuneOptions(**{**opts.__dict__, "steps": 14, "save_every": 1})
    calls = []
    real_step = ft.decoder_loss
    ft.decoder_loss = lambda *a, **k: (calls.append(1), real_step(*a, **k))[1]
    try:
        finetune("decoder", ASSETS / "decoder", source, tmp_path / "adapter", more, prior=ASSETS / "prior")
    finally:
        ft.decoder_loss = real_step
    assert len(calls) == 2 and json.loads(state.read_text())["step"] == 14


def _random_adapter(folder: Path, name: str = "demo", seed: int = 0) -> Path:
    unet = Kandinsky21.from_pretrained().decoder.unet
    named = dict(unet.named_modules())
    torch.manual_seed(seed)
    modules = [n for n in named if n.endswith(("to_q", "to_v"))][:4]
    lw = lora_files.LoraWeights(name=name, a={m: torch.randn(2, named[m].in_features) * 0.4 for m in modules},
                                b={m: torch.randn(named[m].out_features, 2) * 0.4 for m in modules},
                                alpha={m: 2.0 for m in modules})
    return lora_files.save(lw, folder / name, base_model="bundled")


def test_cli_lora_records_and_from_reproduces(tmp_path):
    from kandinsky import metadata
    from kandinsky.cli import main

    adapter = _random_adapter(tmp_path)
    common = ["a red circle", "--seed", "2", "--steps", "2", "--prior-steps", "2", "-q"]
    assert main(["generate", *common, "--lora", f"{adapter}:0.8", "-o", str(tmp_path / "a.png")]) == 0
    assert main(["generate", *common, "-o", str(tmp_path / "base.png")]) == 0
    meta = metadata.read_metadata(tmp_path / "a.png")
    assert meta["record"]["loras"] == [[str(adapter.resolve()), 0.8]]
    assert meta["parameters"].splitlines()[0] == "a red circle <lora:demo:0.8>"
    parsed = metadata.parse_parameters(meta["parameters"])
    assert parsed["prompt"] == "a red circle" and parsed["loras"] == [[str(adapter.resolve()), 0.8]]
    assert main(["generate", "--from", str(tmp_path / "a.png"), "-o", str(tmp_path / "b.png"), "-q"]) == 0

    def pixels(name):
        return np.asarray(PIL.Image.open(tmp_path / name))

    assert np.array_equal(pixels("a.png"), pixels("b.png"))
    assert not np.array_equal(pixels("a.png"), pixels("base.png"))
    assert main(["generate", *common, "--lora", str(tmp_path / "missing"), "-o", str(tmp_path / "c.png")]) == 2
    assert main(["generate", *common, "--lora", f"{adapter}:nan", "-o", str(tmp_path / "c.png")]) == 2
    assert not (tmp_path / "c.png").exists()


def test_a1111_lora_tags_are_read():
    from kandinsky import metadata

    rec = metadata.parse_parameters("a cat <lora:style:0.7> on a mat <lora:other:-1>\nSteps: 20, Seed: 1, Size: 64x64")
    assert rec["prompt"] == "a cat on a mat" and rec["loras"] == [["style", 0.7], ["other", -1.0]]


def test_server_offers_adapters_by_name_and_leaves_the_base_alone(tmp_path):
    """`--lora-dir`: /v1/models lists the adapters; a request names one (or A1111's <lora:NAME:SCALE>); the next
    request without it gives the base image bit for bit; unknown names are a 422 naming the field."""
    import base64
    import io

    import httpx
    from server_helpers import running, wait_for

    from kandinsky.server.app import create_app
    from kandinsky.server.config import ServerConfig

    library = tmp_path / "loras"
    library.mkdir()
    _random_adapter(library, "style")
    app = create_app(ServerConfig(log_level="warning", threads=1, lora_dir=str(library)))
    body = {"prompt": "a red circle", "seed": 3, "steps": 2, "prior_steps": 2, "width": 64, "height": 64}

    def image(resp):
        assert resp.status_code == 200, resp.text
        return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(resp.json()["images"][0]["image"]))))

    with running(app) as url, httpx.Client(base_url=url, timeout=120) as c:
        wait_for(lambda: c.get("/healthz").json()["model"] == "ready", what="the model")
        listed = c.get("/v1/models").json()["loras"]
        assert [x["name"] for x in listed] == ["style"]
        base = image(c.post("/v1/txt2img", json=body))
        adapted = image(c.post("/v1/txt2img", json={**body, "loras": [{"name": "style", "scale": 0.9}]}))
        again = image(c.post("/v1/txt2img", json=body))
        assert np.array_equal(base, again) and not np.array_equal(base, adapted)
        a1111 = c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle <lora:style:0.9>", "seed": 3, "steps": 2,
                                                   "prior_steps": 2, "width": 64, "height": 64})
        assert a1111.status_code == 200, a1111.text
        assert "<lora:style:0.9>" in a1111.json()["info"]
        bad = c.post("/v1/txt2img", json={**body, "loras": [{"name": "../style", "scale": 1}]})
        assert bad.status_code == 422 and bad.json()["error"].startswith("loras[0].name: unknown LoRA adapter")
        bad = c.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:nope:1>", "steps": 2, "width": 64, "height": 64})
        assert bad.status_code == 422 and "unknown LoRA adapter 'nope'" in bad.text


def test_decoder_text_drop_option(tmp_path):
    """`FinetuneOptions.text_drop` sets how many decoder rows train without their caption: 0 keeps every caption
    (a new concept is learned from its word, not from the image embedding alone), 1 drops them all, the default
    is the decoder stage's share; a value outside [0, 1] is refused before anything loads."""
    import json
    import random
    from types import SimpleNamespace

    from kandinsky.diffusion.schedules import NoiseSchedule
    from kandinsky.pipeline import ASSETS
    from kandinsky.train import finetune as ft
    from kandinsky.train.decoder import TEXT_DROP

    class Recorder(torch.nn.Module):
        config = SimpleNamespace(in_channels=4)

        def __init__(self):
            super().__init__()
            self.rows: list[int] = []

        def prepare_condition(self, image, pooled, hidden, cache_kv=True):
            self.rows += pooled[:, 0].long().tolist()

        def forward(self, x, t, cond):
            return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    n = 6
    data = ft.DecoderData(latents=torch.zeros(n, 4, 2, 2), image=torch.ones(n, 3), zero=torch.zeros(1, 3),
                          pooled=torch.arange(n + 1.0)[:, None].repeat(1, 3), hidden=torch.zeros(n + 1, 77, 3))
    config = json.loads((ASSETS / "decoder" / "scheduler" / "scheduler_config.json").read_text())
    schedule = NoiseSchedule.from_config(config)

    def dropped(**kw) -> float:
        unet, gen, rng = Recorder(), torch.Generator().manual_seed(0), random.Random(0)
        for _ in range(50):
            ft.decoder_loss(unet, schedule, data, torch.arange(n), gen, rng, **kw)
        return float(np.mean([r == n for r in unet.rows]))

    assert dropped(text_drop=0.0) == 0.0
    assert dropped(text_drop=1.0) == 1.0
    assert abs(dropped() - TEXT_DROP) < 0.06 and abs(dropped(text_drop=0.1) - 0.1) < 0.04
    assert ft.FinetuneOptions().text_drop is None
    with pytest.raises(ValueError, match="text_drop"):
        ft.finetune("decoder", ASSETS / "decoder", tmp_path / "missing", tmp_path / "out",
                    ft.FinetuneOptions(lora=True, text_drop=1.5), prior=ASSETS / "prior")


def test_trigger_condition_samples_the_prior_for_trigger_captions_only(tmp_path):
    """`condition="trigger"`: captions with a trigger word get the prior's embedding of the caption (the prior
    has never seen the word), the others the CLIP embedding of their own image, as the base decoder trained."""
    import random

    from kandinsky.train import finetune as ft
    from kandinsky.train import shapes

    assert ft.mentions("Красный крестом на синем фоне", ["крест"]) and ft.mentions("a red Cross", ["cross"])
    assert not ft.mentions("a red acrosss", ["cross"]) and not ft.mentions("a red square", ["cross", ""])
    rng = random.Random(3)
    pairs = []
    for i in range(4):
        scene = shapes.random_scene(rng, two_objects=0.0)
        PIL.Image.fromarray(shapes.render(scene, 64)).save(tmp_path / f"{i}.png")
        pairs.append((tmp_path / f"{i}.png", ("zq " if i % 2 else "") + shapes.caption(scene, rng, "en")))
    pipe = Kandinsky21.from_pretrained()
    cpu = torch.device("cpu")
    plain = ft.prepare_decoder_data(pipe.decoder, pipe.prior, pairs, 64, cpu, "image")
    mixed = ft.prepare_decoder_data(pipe.decoder, pipe.prior, pairs, 64, cpu, "trigger", trigger_words=("zq",))
    sampled = pipe.prior_embeds([pairs[1][1], pairs[3][1]], steps=int(pipe.prior.defaults.get("steps", 25)),
                                guidance_scale=float(pipe.prior.defaults.get("guidance_scale", 4.0)), seed=0).image
    torch.testing.assert_close(mixed.image[[0, 2]], plain.image[[0, 2]])
    torch.testing.assert_close(mixed.image[[1, 3]], sampled)
    assert not torch.allclose(mixed.image[[1, 3]], plain.image[[1, 3]], atol=1e-3)
    torch.testing.assert_close(mixed.latents, plain.latents)
    with pytest.raises(ValueError, match="trigger words"):
        ft.prepare_decoder_data(pipe.decoder, pipe.prior, pairs, 64, cpu, "trigger")
    with pytest.raises(ValueError, match="condition must be one of"):
        ft.prepare_decoder_data(pipe.decoder, pipe.prior, pairs, 64, cpu, "text")
