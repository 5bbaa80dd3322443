"""The job layer (:mod:`kandinsky.jobs`) on its own: validation names the field, ``from_dict`` refuses unknown keys,
``run`` returns images with their records, and a record fed back as a job reproduces its image bit for bit (the
bundled model, 64×64, two steps). Also the import rules between the layers."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import kandinsky
from kandinsky import jobs
from kandinsky.jobs import NEEDS, Item, Job, JobError, ModelChoice

SMALL = dict(width=64, height=64, steps=2, prior_steps=2)
SRC = Path(kandinsky.__file__).parent


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("jobs")
    PIL.Image.new("RGB", (64, 64), (200, 40, 40)).save(d / "in.png")
    PIL.Image.new("L", (32, 32), 255).save(d / "mask32.png")
    (d / "broken.png").write_text("not an image")
    return d


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("fields, field, message", [
    (dict(prompt="x", width=63), "width", "width must be a positive multiple of 8, got 63"),
    (dict(prompt="x", steps=0), "steps", "steps must be a positive integer"),
    (dict(prompt="x", num=True), "num", "num must be a positive integer"),
    (dict(prompt="x", seed=-1), "seed", "seed must be an integer in [0, 2^64)"),
    (dict(prompt="x", guidance=float("nan")), "guidance", "guidance must be a non-negative number"),
    (dict(prompt="x", sampler="euler"), "sampler", "unknown sampler 'euler'; choose one of ddim"),
    (dict(prompt=3), "prompt", "prompt must be a string"),
    (dict(), "prompt", "no prompt given"),
    (dict(mode="img2img", prompt="x", strength=1.5), "strength", "strength must be in [0, 1]"),
    (dict(mode="img2img", prompt="x"), "image", "img2img needs an input image"),
    (dict(mode="img2img", prompt="x", image="missing.png"), "image", "image file not found"),
    (dict(mode="variations", image="broken.png"), "image", "cannot read image"),
    (dict(mode="inpaint", prompt="x", image="in.png"), "mask", "inpaint needs a mask"),
    (dict(mode="inpaint", prompt="x", image="in.png", mask="mask32.png"), "mask", "mask is 32×32 but the image"),
    (dict(mode="mix"), "items", "mix needs at least 1 --text/--image item"),
    (dict(mode="mix", items=[{"text": "a"}, {"image": "missing.png"}]), "items[1].image", "image file not found"),
    (dict(mode="mix", items=[{"text": "a", "weight": "heavy"}]), "items[0].weight", "must be a finite number"),
    (dict(mode="morph", items=[{"text": "a"}]), "items", "morph needs at least 2"),
    (dict(mode="morph", items=[{"text": "a"}] * 3, frames=2), "frames", "--frames 2 is fewer than the 3 key"),
    (dict(mode="morph", items=[{"text": "a"}] * 2, interp="cubic"), "interp", "unknown interpolation 'cubic'"),
])
def test_validation_names_the_field(images, monkeypatch, fields, field, message):
    monkeypatch.chdir(images)
    with pytest.raises(JobError) as info:
        Job(**fields).validate()
    assert info.value.field == field and message in str(info.value), (info.value.field, str(info.value))
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_valid_jobs_pass(images, monkeypatch):
    monkeypatch.chdir(images)
    job = Job(mode="img2img", prompt="x", image="in.png", strength=0.5, seed=2**64 - 1, **SMALL)
    assert job.validate() is job
    Job(mode="mix", items=[{"text": "a", "weight": 0.5}, {"image": PIL.Image.new("RGB", (8, 8))}]).validate()


def test_bad_items_are_refused_when_built():
    with pytest.raises(JobError, match="bad mix item 'a cat'") as info:
        Job(mode="mix", items=["a cat"])
    assert info.value.field == "items[0]"
    with pytest.raises(JobError, match="not both"):
        Job(mode="mix", items=[{"text": "a", "image": "b.png"}])
    with pytest.raises(JobError) as info:
        Job(mode="mix", items=[{"text": "a", "colour": "red"}])
    assert info.value.field == "items[0].colour"
    with pytest.raises(JobError, match="must be a list"):
        Job(mode="mix", items="a cat")


# ------------------------------------------------------------------------------------------- from_dict


def test_from_dict_refuses_unknown_keys_naming_them():
    with pytest.raises(JobError) as info:
        Job.from_dict({"prompt": "oops", "colour": "red"})
    assert info.value.field == "colour"
    assert str(info.value).startswith("unknown key colour; use guidance, height, loras, negative, num, prior_guidance")
    with pytest.raises(JobError, match="unknown keys mask, strength"):
        Job.from_dict({"prompt": "x", "strength": 0.5, "mask": "m.png"})  # not txt2img's
    with pytest.raises(JobError) as info:
        Job.from_dict({"prior_steps": 3}, "variations")  # variations has no prior
    assert info.value.field == "prior_steps"
    with pytest.raises(JobError) as info:
        Job.from_dict({"mode": "sketch"})
    assert info.value.field == "mode"
    with pytest.raises(JobError, match="does not match"):
        Job.from_dict({"mode": "img2img", "prompt": "x"}, "txt2img")


def test_from_dict_aliases_modes_and_records():
    job = Job.from_dict({"prompt": "a", "negative_prompt": "b", "cfg_scale": 2.5, "num_images": 2, "seed": 4})
    assert (job.mode, job.negative, job.guidance, job.num, job.seed) == ("txt2img", "b", 2.5, 2, 4)
    job = Job.from_dict({"mode": "mix", "items": [{"text": "a", "weight": 0.25}, {"image": "x.png"}]})
    assert job.items == [Item(text="a", weight=0.25), Item(image="x.png")]
    record = {"mode": "img2img", "prompt": "a", "image": "/x.png", "strength": 0.4, "index": 1, "dtype": "float32",
              "version": "0.1.0", "model": "/m", "extra": {"Model hash": "abc"}}
    with pytest.raises(JobError, match="unknown keys dtype, extra, index, model, version"):
        Job.from_dict(record)
    job = Job.from_dict(record, strict=False)  # a record: what is not the job's is ignored
    assert (job.mode, job.image, job.strength) == ("img2img", "/x.png", 0.4)


def test_record_of_uploads_and_weights():
    upload = PIL.Image.new("RGB", (8, 8))
    job = Job(mode="mix", prompt="", seed=3, items=[Item(text="a", weight=0.5), Item(image=upload, weight=0.5),
                                                    Item(image=Path("/in.png"))])
    record = jobs.make_record(job, {"width": 64, "steps": 2, "guidance_scale": 4.0}, {"dtype": "float32"}, num=1)
    assert record["items"] == [{"text": "a", "weight": 0.5}, {"image": "<upload>", "weight": 0.5},
                               {"image": "/in.png"}]
    assert record["negative"] is None and record["guidance"] == 4.0 and record["compat"] == "diffusers"
    assert list(record)[:3] == ["mode", "prompt", "negative"]
    assert record["version"] == kandinsky.__version__ and "seed_per_image" not in record
    assert jobs.mix_weights([3, 1]) == [0.75, 0.25] and jobs.mix_weights([3, -1], raw=True) == [3.0, -1.0]
    with pytest.raises(JobError, match=r"the mix weights sum to 0; .* \(or set raw\)") as info:
        jobs.mix_weights([1, -1], hint="set raw")
    assert info.value.field == "items"


def test_model_choice_from_options():
    import argparse

    p = argparse.ArgumentParser()
    jobs.add_model_arguments(p, speed=True)
    choice = ModelChoice.from_options(p.parse_args(["--prior", "p", "--low-memory", "--tile-decode", "on"]))
    assert choice == ModelChoice(prior="p", low_memory=True, tile_decode="on")
    assert not choice.bundled and ModelChoice().bundled
    assert ModelChoice.from_options(object()) == ModelChoice()


# ------------------------------------------------------------------------------------------- running


def pixels(img: PIL.Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def test_run_and_record_round_trip(bundled):
    pipe, model = bundled
    assert model == {"dtype": "float32", "compat": "diffusers", "model": None, "prior": None, "inpaint": None}
    calls = []
    job = Job.from_dict({"prompt": "a red circle", "seed": 5, "num": 2, **SMALL}).validate()
    made = jobs.run(pipe, job, lambda done, total: calls.append((done, total)), model=model)
    assert calls == [(1, 1)] and len(made) == 2
    first, second = made
    assert second.record == {**second.record, "mode": "txt2img", "prompt": "a red circle", "negative": None,
                             "seed": 5, "num": 2, "index": 1, "width": 64, "height": 64, "steps": 2,
                             "prior_steps": 2, "sampler": "ddim", "dtype": "float32", "compat": "diffusers"}
    assert not np.array_equal(pixels(first.image), pixels(second.image))

    again = Job.from_dict(second.record, strict=False)  # the record of image 2 of 2 is that batch again
    assert again == job.replace(guidance=second.record["guidance"], sampler="ddim",
                                prior_guidance=second.record["prior_guidance"])
    redo = jobs.run(pipe, again, model=model)
    assert np.array_equal(pixels(redo[1].image), pixels(second.image))
    assert redo[1].record == second.record

    job = Job(prompt="a blue square", seed=7, num=2, seed_per_image=True, **SMALL)
    made = jobs.run(pipe, job, model=model)
    assert [o.record["seed"] for o in made] == [7, 8] and all("index" not in o.record for o in made)
    redo = jobs.run(pipe, Job.from_dict(made[1].record, strict=False), model=model)
    assert len(redo) == 1 and np.array_equal(pixels(redo[0].image), pixels(made[1].image))



def test_a_size_off_the_grid_is_recorded_as_made(bundled):
    """72x56 comes out as 80x64 (rounded up to the model's grid, as diffusers does): the record says 80x64, and
    running the record again gives the same image."""
    pipe, model = bundled
    made = jobs.run(pipe, Job(prompt="a red circle", seed=2, **{**SMALL, "width": 72, "height": 56}), model=model)
    image, record = made[0].image, made[0].record
    assert image.size == (record["width"], record["height"]) and image.size[0] >= 72 and image.size[1] >= 56
    redo = jobs.run(pipe, Job.from_dict(record, strict=False), model=model)
    assert np.array_equal(pixels(redo[0].image), pixels(image))

def test_uploads_and_morph_frames(bundled, images):
    pipe, model = bundled
    upload = PIL.Image.open(images / "in.png")
    [out] = jobs.run(pipe, Job(mode="img2img", prompt="a cat", image=upload, strength=0.5, seed=1, **SMALL),
                     model=model)
    assert out.record["image"] == "<upload>" and out.record["strength"] == 0.5
    with pytest.raises(JobError) as info:  # an upload is not in the record: that job cannot be re-run
        Job.from_dict(out.record, strict=False).validate()
    assert info.value.field == "image"

    job = Job(mode="morph", items=[Item(text="a red circle"), Item(image=str(images / "in.png"))], frames=3,
              interp="slerp", seed=2, **SMALL).validate()
    frames = jobs.run(pipe, job, model=model)
    assert [o.record["frame"] for o in frames] == [0, 1, 2]
    assert frames[1].record["items"] == [{"text": "a red circle"}, {"image": str(images / "in.png")}]
    [redo] = jobs.run(pipe, Job.from_dict(frames[1].record, strict=False), frames=[1], model=model)
    assert np.array_equal(pixels(redo.image), pixels(frames[1].image)) and redo.record == frames[1].record


# ------------------------------------------------------------------------------------------- layering


def _imports(path: Path) -> set[str]:
    """The kandinsky modules a source file imports (anywhere in it, relative imports resolved)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)  # a.b.c: level 1 is a.b
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("kandinsky")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:-node.level]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("kandinsky"):
                continue
            out.add(module)
            for a in node.names:  # `from .. import cli` imports the module kandinsky.cli
                sub = SRC.parent.joinpath(*module.split("."), a.name)
                if sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file():
                    out.add(f"{module}.{a.name}")
    return out


def _module(path: Path) -> str:
    name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def test_layers_import_rules():
    server = sorted((SRC / "server").glob("*.py"))
    assert server and (SRC / "cli").is_dir() and not (SRC / "server" / "jobs.py").exists()
    for path in [*server, SRC / "jobs.py"]:
        bad = {m for m in _imports(path) if m == "kandinsky.cli" or m.startswith("kandinsky.cli.")}
        assert not bad, f"{path.name} imports the command line: {bad}"
    front = {m for m in _imports(SRC / "jobs.py") if m.split(".")[1:2] in (["cli"], ["server"], ["train"])}
    assert not front, f"jobs.py imports a front end: {front}"


@pytest.mark.parametrize("package", ["server", "cli"])
def test_no_import_cycles(package):
    """Within the server and the command line packages the modules import each other without a cycle."""
    graph = {_module(p): {m for m in _imports(p) if m.startswith(f"kandinsky.{package}.")}
             for p in (SRC / package).glob("*.py")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 2:
            return
        assert state.get(node) != 1, f"import cycle: {' -> '.join([*trail, node])}"
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])
    if package == "server":
        assert "kandinsky.server.a1111" in graph["kandinsky.server.app"]
        assert "kandinsky.server.app" not in graph["kandinsky.server.a1111"]


def test_job_vocabulary():
    from kandinsky.pipeline import COMPATS

    assert jobs.COMPATS == COMPATS and set(NEEDS) == set(jobs.MODE_KEYS) == set(jobs.MODES)
    record_only = ("index", "frame", "dtype", "compat", *jobs.MODEL_KEYS)
    assert {k for k in jobs.RECORD_KEYS if k not in record_only} <= {f.name for f in dataclasses.fields(Job)}
