"""The ``kandinsky`` command line: the real console script in a subprocess on tiny random models, plus in-process
checks of errors and metadata (``cli.main(argv)`` is what the script runs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest

from kandinsky import cli, jobs, metadata
from kandinsky.cli.options import split_weight

SMALL = ["-W", "64", "-H", "64", "--steps", "3", "--prior-steps", "2"]


def _script() -> list[str]:
    here = Path(sys.executable).parent / "kandinsky"
    found = str(here) if here.is_file() else shutil.which("kandinsky")
    return [found] if found else [sys.executable, "-m", "kandinsky"]


def run(args: list, cwd: Path, code: int = 0, module: bool = False) -> subprocess.CompletedProcess:
    """Run the console script (or ``python -m kandinsky``) and check its exit status."""
    env = {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "kandinsky"] if module else _script()
    proc = subprocess.run(cmd + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def pixels(path: Path) -> np.ndarray:
    with PIL.Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def models(prior_pipe, decoder_pipe, inpaint_pipe) -> list[str]:
    return ["--model", str(decoder_pipe[1]), "--prior", str(prior_pipe[1]), "--inpaint", str(inpaint_pipe[1])]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A working folder with an input image, a matching mask and a mask of the wrong size."""
    d = tmp_path_factory.mktemp("cli")
    img = PIL.Image.new("RGB", (64, 64), (200, 40, 40))
    PIL.ImageDraw.Draw(img).ellipse((16, 16, 48, 48), fill=(20, 20, 220))
    img.save(d / "in.png")
    mask = PIL.Image.new("L", (64, 64), 0)
    PIL.ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    mask.save(d / "mask.png")
    PIL.Image.new("L", (32, 32), 255).save(d / "mask32.png")
    (d / "broken.png").write_text("not an image")
    return d


# ------------------------------------------------------------------------------------------- the console script


def test_generate_json_info_and_from(models, work):
    out = work / "gen"
    proc = run(["generate", "a red cat", "--num", "2", "--seed", "7", "--json", "-o", out, *models, *SMALL], work)
    result = json.loads(proc.stdout)
    assert result["ok"] and result["seed"] == 7 and len(result["images"]) == 2
    assert set(result["timings"]) == {"load_s", "generate_s", "total_s"}
    paths = [Path(work, im["path"]) for im in result["images"]]
    assert [p.name for p in paths] == ["00001-7-a-red-cat.png", "00002-7-a-red-cat.png"]
    assert not np.array_equal(pixels(paths[0]), pixels(paths[1]))

    with PIL.Image.open(paths[1]) as img:
        text = img.info["parameters"]
    assert text.startswith("a red cat\nSteps: 3, Sampler: DDIM, CFG scale: 4.0, Seed: 7, Size: 64x64, Model: model")
    assert "Batch size: 2, Batch pos: 1, Prior steps: 2" in text
    assert metadata.parse_parameters(text)["seed"] == 7

    info = run(["info", paths[1]], work, module=True)  # python -m kandinsky is the same program
    assert info.stdout.strip() == text

    again = run(["generate", "--from", paths[1], "-o", "again.png", "--json", *models], work)
    record = json.loads(again.stdout)["images"][0]["parameters"]
    assert record["seed"] == 7 and record["index"] == 1 and record["num"] == 2
    assert np.array_equal(pixels(work / "again.png"), pixels(paths[1])), "--from must reproduce the image exactly"


def test_mix(models, work):
    proc = run(["mix", "--text", "a red cat:3", "--image", "in.png:1", "--seed", "3", "--json", "-o", "mix.png",
                *models, *SMALL], work)
    record = json.loads(proc.stdout)["images"][0]["parameters"]
    assert record["mode"] == "mix"
    assert record["items"] == [{"text": "a red cat", "weight": 0.75}, {"image": str(work / "in.png"), "weight": 0.25}]
    assert pixels(work / "mix.png").shape == (64, 64, 3)
    assert "Mode: mix, Mix: " in metadata.read_metadata(work / "mix.png")["parameters"]


def test_img2img_inpaint_variations(models, work):
    run(["img2img", "blue square", "-i", "in.png", "--strength", "0.5", "--seed", "3", "-o", "i2i.png", *models,
         *SMALL], work)
    record = metadata.read_record(work / "i2i.png")
    assert record["mode"] == "img2img" and record["strength"] == 0.5 and record["image"] == str(work / "in.png")

    proc = run(["inpaint", "green star", "-i", "in.png", "-m", "mask.png", "--seed", "3", "-o", "inp.png", "--json",
                *models, *SMALL], work)
    assert json.loads(proc.stdout)["images"][0]["parameters"]["mask"] == str(work / "mask.png")
    assert metadata.read_record(work / "inp.png")["inpaint"].endswith("model")

    proc = run(["variations", "-i", "in.png", "--num", "2", "--seed", "3", "-o", "var", "--quiet",
                *models, "-W", "64", "-H", "64", "--steps", "3"], work)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and all("(seed 3, image" in line for line in lines)
    assert sorted(p.name for p in (work / "var").iterdir()) == ["00001-3-variations.png", "00002-3-variations.png"]
    assert proc.stderr == ""  # --quiet: no notes, no progress bars


def test_morph_and_frame_from(models, work):
    proc = run(["morph", "-t", "a red cat", "-i", "in.png", "-t", "a blue dog", "--frames", "4", "--seed", "5",
                "-o", "morph.gif", "--json", *models, *SMALL], work)
    result = json.loads(proc.stdout)
    assert result["animation"] == "morph.gif" and len(result["frames"]) == 4
    with PIL.Image.open(work / "morph.gif") as gif:
        assert gif.n_frames == 4 and gif.info.get("loop") == 0
    frames = sorted((work / "morph-frames").glob("frame-*.png"))
    assert [f.name for f in frames] == ["frame-001.png", "frame-002.png", "frame-003.png", "frame-004.png"]
    assert not np.array_equal(pixels(frames[0]), pixels(frames[1]))
    record = metadata.read_record(frames[2])
    assert record["mode"] == "morph" and record["frame"] == 2 and record["interp"] == "slerp"

    run(["generate", "--from", frames[2], "-o", "frame3.png", *models], work)
    assert np.array_equal(pixels(work / "frame3.png"), pixels(frames[2]))


def test_batch_bad_line_and_resume(models, work):
    (work / "jobs.txt").write_text(
        "# one job a line\n"
        "a red cat\n"
        '--seed 5 --steps 2 "a blue dog"\n'
        '{"prompt": "a green circle", "seed": 9, "num": 2}\n'
        '{"prompt": "bad size", "width": 63}\n'
        "\n"
        '{"prompt": "oops", "colour": "red"}\n', encoding="utf-8")
    proc = run(["generate", "--prompts", "jobs.txt", "-o", "batch", "--json", *models, *SMALL], work, code=2)
    result = json.loads(proc.stdout)
    assert [e["line"] for e in result["errors"]] == [5, 7]
    assert "jobs.txt:5: width must be a positive multiple of 8, got 63" in proc.stderr
    assert "jobs.txt:7: unknown key colour" in proc.stderr
    names = sorted(p.name for p in (work / "batch").iterdir())
    assert names == ["00002-a-red-cat.png", "00003-a-blue-dog.png", "00004-1-a-green-circle.png",
                     "00004-2-a-green-circle.png"]
    assert metadata.read_record(work / "batch" / "00003-a-blue-dog.png")["steps"] == 2
    stamps = {n: (work / "batch" / n).stat().st_mtime_ns for n in names}

    proc = run(["generate", "--prompts", "jobs.txt", "-o", "batch", "--json", *models, *SMALL], work, code=2)
    result = json.loads(proc.stdout)
    assert result["images"] == [] and [s["line"] for s in result["skipped"]] == [2, 3, 4]
    assert {n: (work / "batch" / n).stat().st_mtime_ns for n in names} == stamps


def test_error_is_one_line_without_traceback(work):
    proc = run(["generate", "a cat", "--model", "no-such-folder", "--prior", "no-such-prior", "--json", *SMALL], work,
               code=2)
    assert proc.stderr.strip().splitlines() == ["kandinsky: error: decoder model folder not found: no-such-folder"]
    assert json.loads(proc.stdout) == {"ok": False, "error": "decoder model folder not found: no-such-folder",
                                       "exit_code": 2}


# ------------------------------------------------------------------------------------------- in process


@pytest.fixture
def one_thread():
    """In-process runs share 2 busy cores with other work: one torch thread is faster and as deterministic."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def main(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [
    (["generate", "x", "-W", "63"], "argument -W/--width: width must be a positive multiple of 8, got 63"),
    (["generate", "x", "--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
    (["img2img", "x", "-i", "broken.png"], "cannot read image"),
    (["img2img", "x", "-i", "missing.png"], "image file not found"),
    (["img2img", "x"], "img2img needs an input image"),
    (["inpaint", "x", "-i", "in.png", "-m", "mask32.png"], "mask is 32×32 but the image is 64×64"),
    (["generate", "x", "-o", "in.png/sub"], "cannot create output folder in.png/sub"),
    (["generate"], "no prompt given"),
    (["mix", "--text", "a:1", "--text", "b:-1"], "the mix weights sum to 0"),
    (["morph", "-t", "a"], "morph needs at least 2 --text/--image items"),
    (["variations", "-i", "in.png", "--prior-steps", "3"], "unrecognized arguments: --prior-steps"),
    (["info", "in.png"], "carries no generation parameters"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_errors(capsys, work, monkeypatch, argv, message):
    monkeypatch.chdir(work)
    code, out, err = main(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kandinsky: error: ") and message in lines[0], err


def test_never_overwrites(capsys, models, work, monkeypatch, one_thread):
    monkeypatch.chdir(work)
    args = ["generate", "a cat", "--seed", "1", "-o", "once.png", "--quiet", *models, *SMALL]
    assert main(capsys, *args)[0] == 0
    before = (work / "once.png").read_bytes()
    code, _, err = main(capsys, *args[:3], "2", *args[4:])
    assert code == 2 and "once.png already exists; pass --overwrite" in err
    assert (work / "once.png").read_bytes() == before
    assert main(capsys, *args[:3], "2", *args[4:], "--overwrite")[0] == 0
    assert metadata.read_record(work / "once.png")["seed"] == 2


def test_from_round_trips_every_mode(capsys, models, work, monkeypatch, one_thread):
    """--from of mix / img2img / inpaint / variations images (made in this process) reproduces them bit for bit."""
    monkeypatch.chdir(work)
    runs = {
        "m.png": ["mix", "--text", "a blue dog:0.4", "--image", "in.png:0.6", "--negative", "red", "--num", "2"],
        "i.png": ["img2img", "a green circle", "-i", "in.png", "--strength", "0.2", "--sampler", "ddpm",
                  "--compat", "original"],
        "p.png": ["inpaint", "a cat", "-i", "in.png", "-m", "mask.png", "--negative", "", "--sampler", "dpmpp_2m"],
        "v.png": ["variations", "-i", "in.png", "--sampler", "p_sampler", "--guidance", "1"],
    }
    for name, argv in runs.items():
        size = SMALL if argv[0] != "variations" else SMALL[:6]
        assert main(capsys, *argv, "--seed", "11", "-o", name, *models, *size)[0] == 0
    for name in ("m-2.png", "i.png", "p.png", "v.png"):
        code, out, err = main(capsys, "generate", "--from", name, "-o", f"re-{name}", "--json", *models)
        assert code == 0, err
        assert np.array_equal(pixels(work / f"re-{name}"), pixels(work / name)), name
    assert metadata.read_record(work / "p.png")["negative"] == ""
    assert "Compat: original" in metadata.read_metadata(work / "i.png")["parameters"]
    assert metadata.read_record(work / "re-i.png")["compat"] == "original"


def test_morph_webp_without_frames(capsys, models, work, monkeypatch, one_thread):
    monkeypatch.chdir(work)
    code, out, _ = main(capsys, "morph", "-t", "a cat", "-t", "a dog", "--frames", "3", "--interp", "lerp",
                        "--boomerang", "--no-frames", "--format", "webp", "-o", "anims", *models, *SMALL)
    assert code == 0
    [anim] = list((work / "anims").glob("*/morph.webp"))
    with PIL.Image.open(anim) as img:
        assert img.n_frames == 4  # 3 frames, then back through the middle one
    assert list(anim.parent.glob("*.png")) == []


def test_parameters_text_round_trip():
    record = {"mode": "mix", "prompt": "a, red: cat\nsecond line", "negative": "", "width": 64, "height": 96,
              "steps": 3, "guidance": 4.5, "sampler": "dpmpp_2m", "seed": 2**40, "num": 2, "index": 1,
              "prior_steps": 2, "prior_guidance": 1.5, "items": [{"text": "a: b, c", "weight": 0.3}],
              "dtype": "float32"}
    text = metadata.build_parameters(record)
    assert "Sampler: DPM++ 2M, CFG scale: 4.5, Seed: 1099511627776, Size: 64x96" in text
    parsed = metadata.parse_parameters(text)
    assert {k: parsed[k] for k in record} == record
    a1111 = ("masterpiece, cat\nNegative prompt: lowres\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 42, "
             "Size: 512x768, Model hash: abc123, Model: v1-5")
    parsed = metadata.parse_parameters(a1111)
    assert parsed["prompt"] == "masterpiece, cat" and parsed["negative"] == "lowres"
    assert (parsed["steps"], parsed["seed"], parsed["width"], parsed["height"]) == (20, 42, 512, 768)
    assert parsed["extra"] == {"Model hash": "abc123"}


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_exif_parameters(tmp_path, suffix):
    record = {"prompt": "кот, cat", "negative": None, "seed": 5, "steps": 3, "width": 8, "height": 8}
    path = metadata.save_image(PIL.Image.new("RGB", (8, 8)), tmp_path / f"x{suffix}", record)
    meta = metadata.read_metadata(path)
    assert meta["parameters"] == metadata.build_parameters(record)
    assert meta["record"]["prompt"] == "кот, cat" and meta["record"]["seed"] == 5


def test_model_info(capsys, models):
    code, out, _ = main(capsys, "info", models[1], "--json")
    assert code == 0
    info = json.loads(out)
    [model] = info["models"].values()
    assert model["pipeline"] == "KandinskyPipeline" and model["parameters"] > 0
    assert model["components"]["unet"]["config"]["in_channels"] == 4


def test_weight_parsing():
    assert split_weight("a red cat:0.3", "text") == ("a red cat", 0.3)
    assert split_weight("photo: a cat", "text") == ("photo: a cat", None)
    assert split_weight("ratio 16:9", "text") == ("ratio 16", 9.0)
    assert split_weight("C:\\img.png", "image") == ("C:\\img.png", None)
    assert split_weight("x.png:-0.5", "image") == ("x.png", -0.5)


def test_convert_and_train_are_wired(capsys, models, tmp_path):
    code, out, err = main(capsys, "convert", models[1], tmp_path / "st", "--to", "safetensors", "--dtype", "fp16",
                          "--json")
    assert code == 0, err
    assert any(p.endswith("diffusion_pytorch_model.safetensors") for p in json.loads(out)["written"])
    code, out, _ = main(capsys, "info", tmp_path / "st", "--json")
    [model] = json.loads(out)["models"].values()
    assert set(model["components"]["unet"]["dtypes"]) == {"F16"}
    code, out, _ = main(capsys, "train", "--help")
    assert code == 0 and "kandinsky train" in out


def test_sampler_choices_follow_the_library():
    from kandinsky.diffusion.samplers import SAMPLERS

    assert jobs.SAMPLER_CHOICES == SAMPLERS
