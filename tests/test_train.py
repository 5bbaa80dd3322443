"""Training: data generator, tokenizers, a miniature run of every stage, checkpoints, resume, export, fine-tuning
and the bundled model."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import tiny
import torch
from torch import nn

from kandinsky import Kandinsky21
from kandinsky.train import shapes
from kandinsky.train.common import Trainer, read_log
from kandinsky.train.workspace import Workspace

ASSETS = Path(__file__).resolve().parents[1] / "src" / "kandinsky" / "assets"
STAGES = ("clip", "mclip", "movq", "prior", "decoder", "inpaint")


# ----------------------------------------------------------------------------------------------------------
# data


def test_generator_is_deterministic_per_seed():
    a, b, c = shapes.generate(40, seed=3), shapes.generate(40, seed=3), shapes.generate(40, seed=4)
    assert a.images.shape == (40, 64, 64, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and a.scenes == b.scenes
    assert not np.array_equal(a.images, c.images)
    rng1, rng2 = random.Random(7), random.Random(7)
    assert [shapes.caption(s, rng1) for s in a.scenes] == [shapes.caption(s, rng2) for s in a.scenes]


def test_held_out_pairs_never_in_training_data():
    data = shapes.generate(3000, seed=0)
    pairs = {(o.color, o.shape) for s in data.scenes for o in s.objects}
    assert not pairs & shapes.HELD_OUT
    assert len(pairs) == len(shapes.COLOR_NAMES) * len(shapes.SHAPES) - len(shapes.HELD_OUT)
    assert sum(len(s.objects) == 2 for s in data.scenes) > 500
    test = shapes.generate(50, seed=1, held_out=True)
    assert all(s.held_out() for s in test.scenes)


def test_captions_both_languages():
    scene = shapes.make_scene("circle", "red", "blue", size="small")
    full = shapes.Mention(size=True, position=False, background=True)
    rng = random.Random(0)
    en = {shapes.caption_en(scene, full, rng) for _ in range(100)}
    assert "a small red circle on a blue background" in en
    ru = {shapes.caption_ru(scene, full, rng) for _ in range(100)}
    assert "маленький красный круг на синем фоне" in ru
    star = shapes.make_scene("star", "yellow", "green")
    texts = {shapes.caption(star, rng, "ru", shapes.Mention(False, False, False)) for _ in range(60)}
    assert {"жёлтая звезда", "желтая звезда"} <= {t.lower() for t in texts}


def test_tokenizers(tmp_path):
    from kandinsky.train import vocab

    corpus = shapes.caption_corpus(300, 0)
    clip_tok = vocab.train_clip_tokenizer(corpus, 700, 24, tmp_path / "clip")
    ids = clip_tok("a small red circle", padding="max_length", max_length=24).input_ids
    assert ids[0] == clip_tok.bos_token_id and len(ids) == 24
    assert clip_tok.convert_ids_to_tokens(ids[1:5]) == ["a</w>", "small</w>", "red</w>", "circle</w>"]
    assert len(clip_tok("маленький красный круг").input_ids) == 5
    xt = vocab.train_mclip_tokenizer(corpus, 400, tmp_path / "mclip")
    assert xt("").input_ids == [0, 2] and xt.pad_token_id == 1
    assert xt.convert_ids_to_tokens(xt("красный круг").input_ids) == ["<s>", "▁красный", "▁круг", "</s>"]


# ----------------------------------------------------------------------------------------------------------
# a miniature run of every stage


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from kandinsky.train.stages import run_all

    root = tmp_path_factory.mktemp("tiny_run")
    ws = Workspace.open(root / "run", "tiny", seed=0, progress=False)
    records = run_all(ws, root / "export")
    return ws, records, root / "export"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_loss_falls(tiny_run, stage):
    ws, records, _ = tiny_run
    log = read_log(ws.root / stage)
    steps = ws.preset.schedule(stage).steps
    assert len(log) == steps == records[stage]["steps"]
    losses = np.array([r["loss"] for r in log])
    k = max(3, steps // 4)
    assert losses[-k:].mean() < losses[:k].mean(), f"{stage}: {losses[:k].mean():.4f} -> {losses[-k:].mean():.4f}"
    assert records[stage]["seconds"] > 0 and (ws.root / stage / "ckpt" / "model.safetensors").is_file()


def test_mixing_augmentation_conditions_on_mixes_of_the_objects(tiny_run):
    from kandinsky.models.text_encoders import clip_image_embeds
    from kandinsky.train import data as D
    from kandinsky.train.decoder import Conditioner, object_embeds

    ws, _, _ = tiny_run
    ds = ws.data()
    two = [j for j, s in enumerate(ds.scenes) if len(s.objects) == 2]
    parts = object_embeds(ws, ds, centred=0.0)
    assert two and sorted(parts) == two
    j = two[0]
    assert parts[j].shape == (2, ws.preset.clip_dim)
    # each part is the embedding of one of the scene's objects drawn alone, in place, on the scene's background
    _, vision = ws.clip_models()
    scene = ds.scenes[j]
    alone = [shapes.render(shapes.Scene(scene.background, (o,), (scene.rgb[0], rgb)), ws.preset.image_size)
             for o, rgb in zip(scene.objects, scene.rgb[1:], strict=True)]
    with torch.no_grad():
        direct = clip_image_embeds(vision, D.to_clip_input(np.stack(alone)))
    torch.testing.assert_close(parts[j], direct, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(direct[0], direct[1])
    centred = object_embeds(ws, ds, centred=1.0)[j]  # big and centred: another picture of the same objects
    assert not torch.allclose(centred, direct, atol=1e-3)

    cond = Conditioner(ws, image_drop=0.0, mix_aug=1.0)
    parts = cond.parts
    idx = torch.tensor([j, j])
    image, _, _ = cond(idx, torch.Generator().manual_seed(0), random.Random(0))
    a, b = parts[j]
    for row in image:  # a convex mix with weight in [0.3, 0.7], never the scene's own embedding
        w = float(((row - b) @ (a - b)) / ((a - b) @ (a - b)))
        assert 0.3 - 1e-4 <= w <= 0.7 + 1e-4
        torch.testing.assert_close(row, w * a + (1 - w) * b, atol=1e-4, rtol=1e-4)
    single = next(i for i, s in enumerate(ds.scenes) if len(s.objects) == 1)
    image, _, _ = cond(torch.tensor([single]), torch.Generator().manual_seed(0), random.Random(0))
    torch.testing.assert_close(image[0], cond.image[single])


def test_rerun_of_finished_stage_is_a_no_op(tiny_run):
    from kandinsky.train.stages import run_stage

    ws, records, _ = tiny_run
    before = (ws.root / "prior" / "final.safetensors").stat().st_mtime_ns
    assert run_stage(ws, "prior") == records["prior"]
    assert (ws.root / "prior" / "final.safetensors").stat().st_mtime_ns == before


def test_export_loads_in_ours_and_diffusers(tiny_run):
    from diffusers import KandinskyInpaintPipeline, KandinskyPipeline, KandinskyPriorPipeline

    ws, _, export = tiny_run
    pipe = Kandinsky21.from_pretrained(decoder=export / "decoder", prior=export / "prior", inpaint=export / "inpaint")
    size = ws.preset.image_size
    assert pipe.defaults("decoder")["width"] == size
    img = pipe.text_to_image("a red circle", seed=0)[0]
    assert img.size == (size, size)
    ours = pipe.text_to_image("a blue star", seed=1, output="np")
    inpainted = pipe.inpaint(img, np.ones((size, size), np.float32), "a green ring", seed=0, width=size,
                             height=size)[0]
    assert inpainted.size == (size, size)

    prior = KandinskyPriorPipeline.from_pretrained(str(export / "prior"), torch_dtype=torch.float32)
    decoder = KandinskyPipeline.from_pretrained(str(export / "decoder"), torch_dtype=torch.float32)
    KandinskyInpaintPipeline.from_pretrained(str(export / "inpaint"), torch_dtype=torch.float32)
    for p in (prior, decoder):
        p.set_progress_bar_config(disable=True)
    d = pipe.defaults("decoder")
    g = torch.Generator().manual_seed(1)
    dp = pipe.defaults("prior")
    emb = prior("a blue star", num_inference_steps=dp["steps"], guidance_scale=dp["guidance_scale"], generator=g)
    theirs = decoder("a blue star", image_embeds=emb.image_embeds, negative_image_embeds=emb.negative_image_embeds,
                     height=size, width=size, num_inference_steps=d["steps"], guidance_scale=d["guidance_scale"],
                     generator=g, output_type="np").images
    assert np.abs(ours - theirs).max() < 1e-3


def test_stage_checkpoint_reloads_identically(tiny_run):
    """The exported weights equal the stage's final weights, and a reloaded model gives identical outputs."""
    from kandinsky.train.decoder import load_unet

    ws, _, export = tiny_run
    unet_a, unet_b = load_unet(ws, "decoder"), load_unet(ws, "decoder")
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    img, pooled, hidden = torch.randn(2, ws.preset.clip_dim), torch.randn(2, ws.preset.clip_dim), \
        torch.randn(2, 77, ws.preset.mclip_width)
    with torch.no_grad():
        a = unet_a(x, 500, unet_a.prepare_condition(img, pooled, hidden))
        b = unet_b(x, 500, unet_b.prepare_condition(img, pooled, hidden))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# checkpoints and resume


class _Toy(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def _toy_step(model: _Toy, stop_at: int | None = None):
    def step(i, gen, rng):
        if stop_at is not None and i == stop_at:
            raise KeyboardInterrupt
        x = torch.randn(16, 4, generator=gen)
        y = x.sum(1, keepdim=True).sin() + 0.1 * rng.random()
        return {"loss": (model.net(x) - y).square().mean()}
    return step


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    whole = _Toy(0)
    Trainer("toy", tmp_path / "a", {"m": whole}, steps=20, lr=1e-2, warmup=3, ckpt_every=5, progress=False,
            ema=("m",)).run(_toy_step(whole))
    first = _Toy(0)
    with pytest.raises(KeyboardInterrupt):
        Trainer("toy", tmp_path / "b", {"m": first}, steps=20, lr=1e-2, warmup=3, ckpt_every=5, progress=False,
                ema=("m",)).run(_toy_step(first, stop_at=13))
    resumed = _Toy(1)  # different init: everything must come from the checkpoint
    trainer = Trainer("toy", tmp_path / "b", {"m": resumed}, steps=20, lr=1e-2, warmup=3, ckpt_every=5,
                      progress=False, ema=("m",))
    trainer.run(_toy_step(resumed))
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert [r["step"] for r in read_log(tmp_path / "b")] == list(range(20))
    assert [r["loss"] for r in read_log(tmp_path / "a")] == [r["loss"] for r in read_log(tmp_path / "b")]
    assert trainer.final_state("m").keys() == whole.state_dict().keys()


def test_cli_stage_resumes(tmp_path):
    from kandinsky.train.cli import main

    out = tmp_path / "run"
    assert main(["movq", "--out", str(out), "--preset", "tiny", "--steps", "4", "--no-progress"]) == 0
    state = json.loads((out / "movq" / "ckpt" / "state.json").read_text())
    assert state["step"] == 4
    assert main(["movq", "--out", str(out), "--steps", "8", "--force", "--no-progress"]) == 0
    assert json.loads((out / "movq" / "ckpt" / "state.json").read_text())["step"] == 8
    assert [r["step"] for r in read_log(out / "movq")] == list(range(8))
    with pytest.raises(ValueError, match="preset"):
        main(["movq", "--out", str(out), "--preset", "bundled", "--no-progress"])


# ----------------------------------------------------------------------------------------------------------
# pieces


def test_latent_normalisation_is_folded_exactly():
    from kandinsky.train import config as C
    from kandinsky.train.movq import fold_latent_norm

    movq = tiny_movq = C.build_movq(C.get_preset("tiny")).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = movq.encode(x)
        before = movq.decode(z)
        mean, std = z.mean((0, 2, 3), keepdim=True), z.std((0, 2, 3), keepdim=True)
        fold_latent_norm(tiny_movq, mean, std)
        z2 = movq.encode(x)
        torch.testing.assert_close(z2, (z - mean) / std, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(movq.decode(z2), before, atol=1e-4, rtol=1e-4)


def test_vlb_vanishes_for_the_true_posterior():
    from kandinsky.diffusion.schedules import decoder_schedule
    from kandinsky.train.losses import hybrid_loss

    s = decoder_schedule()
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([1, 10, 500, 999])
    x_t = s.add_noise(x0, noise, t)
    out = torch.cat([noise, -torch.ones_like(noise)], 1)  # exact epsilon, variance = posterior variance
    mse, vlb = hybrid_loss(s, x0, x_t, t, noise, out)
    assert float(mse) == 0 and abs(float(vlb)) < 1e-4
    _, worse = hybrid_loss(s, x0, x_t, t, noise, torch.cat([noise, torch.ones_like(noise)], 1))
    assert float(worse) > float(vlb)


def test_quality_checker_reads_clean_renders():
    path = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality", path)
    quality = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = quality
    spec.loader.exec_module(quality)
    for shape in shapes.SHAPES:
        for size in shapes.SIZES:
            bg, found = quality.check(shapes.render(shapes.make_scene(shape, "orange", "purple", size=size)))
            assert bg == "purple" and (found[0].color, found[0].shape) == ("orange", shape)


# ----------------------------------------------------------------------------------------------------------
# fine-tuning


@pytest.fixture(scope="module")
def finetune_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    rng = random.Random(0)
    rows = ["image,caption"]
    for i in range(4):
        scene = shapes.random_scene(rng, two_objects=0.0)
        PIL.Image.fromarray(shapes.render(scene, 32)).save(root / f"img{i}.png")
        rows.append(f"img{i}.png,{shapes.caption(scene, rng, 'en')}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    decoder = tiny.save_decoder(tiny.build_decoder_pipeline("a"), root / "decoder")
    prior = tiny.save_prior(tiny.build_prior_pipeline(root / "_tok", "a"), root / "prior")
    return root, decoder, prior


@pytest.mark.parametrize("component,optimizer", [("decoder", "adamw"), ("prior", "adafactor")])
def test_finetune_lowers_the_loss(finetune_setup, component, optimizer):
    from kandinsky.train.finetune import FinetuneOptions, finetune, fixed_loss

    root, decoder, prior = finetune_setup
    model = decoder if component == "decoder" else prior
    extra = {"prior": prior, "resolution": 32} if component == "decoder" else {}
    before = fixed_loss(component, model, root / "data.csv", **extra)
    opts = FinetuneOptions(steps=25, batch_size=4, lr=2e-3 if optimizer == "adamw" else 1e-2, optimizer=optimizer,
                           ema_decay=0.9, gradient_checkpointing=True, resolution=32, progress=False, save_every=10)
    out = finetune(component, model, root / "data.csv", root / f"out_{component}", opts,
                   prior=prior if component == "decoder" else None)
    after = fixed_loss(component, out, root / "data.csv", **extra)
    assert after < before, (before, after)
    for f in (p for p in model.rglob("*") if p.is_file()):  # same layout, same configs
        rel = f.relative_to(model)
        assert (out / rel.with_suffix(".safetensors") if f.suffix == ".bin" else out / rel).exists(), rel
    if component == "decoder":
        Kandinsky21.from_pretrained(decoder=out, prior=prior).text_to_image("a red circle", seed=0, steps=2,
                                                                            width=32, height=32)
    shutil.rmtree(out)


# ----------------------------------------------------------------------------------------------------------
# the bundled model


needs_assets = pytest.mark.skipif(not (ASSETS / "decoder").is_dir(), reason="no bundled model in assets/")


@needs_assets
def test_bundled_model_loads_by_default_and_generates():
    pipe = Kandinsky21.from_pretrained()
    d = pipe.defaults("decoder")
    img = pipe.text_to_image("a red circle", seed=0)[0]
    assert img.size == (d["width"], d["height"]) == (64, 64)
    assert pipe.inpaint_model is not None


@needs_assets
def test_bundled_model_loads_in_diffusers_and_fits_the_size_budget():
    from diffusers import KandinskyInpaintPipeline, KandinskyPipeline, KandinskyPriorPipeline

    KandinskyPriorPipeline.from_pretrained(str(ASSETS / "prior"), torch_dtype=torch.float32)
    KandinskyPipeline.from_pretrained(str(ASSETS / "decoder"), torch_dtype=torch.float32)
    KandinskyInpaintPipeline.from_pretrained(str(ASSETS / "inpaint"), torch_dtype=torch.float32)
    total = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    assert total <= 40e6, f"bundled model is {total / 1e6:.1f} MB"
    assert not list(ASSETS.rglob("*.bin"))
