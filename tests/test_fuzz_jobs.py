"""Property-based tests (hypothesis: derandomized, bounded) of job validation and of the command line.

* ``Job.from_dict(d).validate()`` over arbitrary field values either succeeds or raises :class:`JobError` whose
  ``field`` names a real field (or the unknown key given) and whose message is one printable line; never any
  other exception. Valid jobs from a strategy of plausible values (edge cases included) run on the bundled model.
* ``kandinsky.cli.main(argv)`` over generated argument vectors, and ``--prompts`` files with broken UTF-8, broken
  JSON, NUL bytes and huge lines: exit 0, or exit 2 with one ``kandinsky: error:`` line (``FILE:LINE:`` for batch
  lines, the other lines still done), never a traceback. A few runs of the real console script as well.

Examples per target are counted in ``COUNTS`` (printed at the end of the module with ``pytest -s``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import PIL.Image
import PIL.PngImagePlugin
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kandinsky import cli, jobs, metadata
from kandinsky.cli import batch, commands, morph
from kandinsky.jobs import MODE_KEYS, MODES, Job, JobError

pytestmark = pytest.mark.timeout(300)

FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=list(HealthCheck))
COUNTS: Counter[str] = Counter()
FIELDS = {f.name for f in dataclasses.fields(Job)}
ERROR = "kandinsky: error: "
HUGE = "x" * 100_000

# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def work(tmp_path_factory):
    """A working folder (the current one for the whole module) with input images: ``inputs/good.png`` (64×64),
    ``mask.png`` of its size, ``mask32.png``, ``broken.png``, a folder, an image with a hostile record."""
    d = tmp_path_factory.mktemp("fuzz")
    inputs = d / "inputs"
    inputs.mkdir()
    PIL.Image.new("RGB", (64, 64), (200, 40, 40)).save(inputs / "good.png")
    PIL.Image.new("L", (64, 64), 255).save(inputs / "mask.png")
    PIL.Image.new("L", (32, 32), 255).save(inputs / "mask32.png")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (inputs / "folder.png").mkdir()
    for name, chunk in {"hostile.png": '{"mode": [1], "index": "x", "prompt": 3}',
                        "deep.png": "[" * 100_000, "list.png": "[1, 2]",
                        "record.png": json.dumps({"mode": "txt2img", "prompt": "a cat", "seed": 3, "width": 64,
                                                  "height": 64, "steps": 1, "prior_steps": 1, "index": 0, "num": 1,
                                                  "dtype": "float64"}),
                        "badmodel.png": json.dumps({"mode": "txt2img", "prompt": "a", "model": ["x"], "steps": 1})
                        }.items():
        info = PIL.PngImagePlugin.PngInfo()
        info.add_text("kandinsky", chunk)
        PIL.Image.new("RGB", (8, 8)).save(inputs / name, pnginfo=info)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        yield d
    print("\ngenerated cases per target:", dict(sorted(COUNTS.items())))


@pytest.fixture(scope="module")
def cli_models(bundled):
    """In-process CLI runs load each model choice once: the loader is wrapped with a cache (device and dtype
    spelt as this machine resolves them; an error is raised every time, as before)."""
    cache = {}
    real = jobs.load_pipeline

    def load(choice, need):
        canon = dataclasses.replace(choice, device=None if choice.device in ("cpu", "auto") else choice.device,
                                    dtype=None if choice.dtype in ("auto", "float32", "fp32") else choice.dtype)
        if canon == jobs.ModelChoice():
            return bundled
        key = repr(canon)
        if key not in cache:
            cache[key] = real(choice, ("decoder", "prior", "inpaint"))
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        for module in (commands, batch, morph):
            mp.setattr(module, "load_pipeline", load)
        yield load


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``kandinsky ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def check_job_error(exc: BaseException, given: dict | None = None) -> None:
    """A JobError naming a real field (or the unknown key given), with a one-line printable message."""
    assert isinstance(exc, JobError), f"{type(exc).__name__}: {exc}"
    field = exc.field
    assert isinstance(field, str)
    m = re.fullmatch(r"(\w+)(\[\d+\](\.\w+)?)?", field)
    unknown = {str(jobs.ALIASES.get(k, k)) for k in (given or {})}
    assert (m and m.group(1) in FIELDS | {"job"}) or field in unknown, f"field {field!r}: {exc}"
    text = str(exc)
    assert text == exc.message and text.strip()
    assert len(text.splitlines()) == 1 and not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", text), repr(text)
    assert len(text) <= 1200


# ------------------------------------------------------------------------------------------- strategies

EDGE_INTS = [0, 1, -1, 7, 8, 63, 64, 65, 1000, 1001, 2**31, 2**63, 2**64 - 1, 2**64, -(2**64), 10**400,
             jobs.MAX_SIDE, jobs.MAX_SIDE + 8]
EDGE_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, 0.5, 1.0, 1.0000001, 4.0, 1e308, 5e-324, -1e-9, 64.0]
TEXTS = ["", " ", "a red cat", "\0", "a\0b", "مرحبا بالعالم", "שלום עולם", "\u202eevil\u202c", "🐱‍👤🎨🏳️‍🌈",
         "\ud800", "a\udcffb", "\udfff\ud800", "line1\nline2", "\r\n", "\x1b[31mred", "\u2028", HUGE]
IMAGES = ["inputs/good.png", "inputs/mask.png", "inputs/mask32.png", "inputs/broken.png", "inputs/missing.png",
          "inputs/folder.png", "", "inputs/a\0b.png", "x" * 5000, "inputs/\ud800.png"]
OTHER = [None, True, False, [], {}, [1], {"a": 1}, b"bytes", 1j, (), frozenset()]

ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(2**70), 2**70), st.integers(0, 100))
floats = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(allow_nan=True, allow_infinity=True))
texts = st.one_of(st.sampled_from(TEXTS), st.text(st.characters(), max_size=20))
scalars = st.one_of(ints, floats, texts, st.sampled_from(OTHER), st.sampled_from(IMAGES))
items = st.lists(st.one_of(
    st.fixed_dictionaries({"text": texts}, optional={"weight": st.one_of(floats, ints, st.sampled_from(OTHER))}),
    st.fixed_dictionaries({"image": st.one_of(st.sampled_from(IMAGES), scalars)}, optional={"weight": floats}),
    st.dictionaries(st.sampled_from(["text", "image", "weight", "colour", 1]), scalars, max_size=3),
    scalars), max_size=4)
keys = st.sampled_from(sorted(FIELDS - {"seed_per_image"}) + sorted(jobs.ALIASES)
                       + ["mode", "colour", "", "\0", "seed_per_image", "index", "dtype", "version"])
job_dicts = st.dictionaries(st.one_of(keys, st.integers(0, 3)),
                            st.one_of(scalars, items, st.sampled_from(MODES + ("sketch",))), max_size=8)


# ------------------------------------------------------------------------------------------- validation


@settings(FUZZ, max_examples=1500)
@given(data=job_dicts, mode=st.sampled_from([None, *MODES]))
def test_validate_is_total(data, mode):
    """Any mapping: a valid job, or a JobError naming the field in one line; nothing else."""
    COUNTS["validate: arbitrary dicts"] += 1
    try:
        job = Job.from_dict(data, mode).validate()
    except Exception as exc:  # noqa: BLE001 - the property: no other exception type
        check_job_error(exc, data)
        return
    COUNTS["validate: arbitrary dicts, valid"] += 1
    for key in ("width", "height"):
        v = getattr(job, key)
        assert v is None or (type(v) is int and 0 < v <= jobs.MAX_SIDE and v % 8 == 0)
    assert job.seed is None or (type(job.seed) is int and 0 <= job.seed < 2**64)
    for key in ("guidance", "prior_guidance", "strength"):
        v = getattr(job, key)
        assert v is None or (math.isfinite(v) and v >= 0)
    for text in (job.prompt, job.negative, *job.texts):
        assert text is None or (isinstance(text, str) and text.encode("utf-8"))


BASE = {"txt2img": {"prompt": "x"}, "img2img": {"prompt": "x", "image": "inputs/good.png"},
        "inpaint": {"prompt": "x", "image": "inputs/good.png", "mask": "inputs/mask.png"},
        "mix": {"items": [{"text": "a"}]}, "variations": {"image": "inputs/good.png"},
        "morph": {"items": [{"text": "a"}, {"text": "b"}]}}
WRONG = {
    "int": ["8", 8.0, 64.5, True, [], {}, b"8", 1j, math.nan, -8, 0],
    "float": ["4", True, [], {}, b"4", 1j, math.nan, math.inf, -math.inf, -1, 10**400, 1e30],
    "str": [1, 1.5, True, [], {}, b"x", ["a"], "\ud800", "a\udcffb"],
    "choice": [1, True, [], {}, b"ddim", "", "DDIM", "\ud800", "slerp "],
    "image": [1, 1.5, True, [], {}, b"inputs/good.png", "inputs/missing.png", "inputs/broken.png",
              "inputs/folder.png", "inputs/a\0b.png", "x" * 5000],
    "items": ["a", 1, {}, [1], ["a"], [{"text": 1}], [{"weight": 1}], [{"text": "a", "weight": "1"}],
              [{"text": None}], [{"image": None}], [{"image": ""}], [{"text": "a", "image": "b"}],
              [{"text": "a", "weight": math.nan}], [{"text": "a", "weight": 10**400}], [{"text": "\ud800"}],
              [{"text": "a", "colour": 1}], [{1: "a", "text": "b"}]],
    "loras": ["a.safetensors", 1, {}, [1], [[1, 1]], [["inputs/good.png", math.nan]], [["inputs/good.png", 1e9]],
              [["inputs/missing", 1]], ["inputs/missing:0.5"], [["", 1]], [["a\0b", 1]], [["\ud800", 1]],
              [{"path": "inputs/good.png", "scale": "x"}], [{"name": "x"}], [[None, 1]], [("a", 1, 2)]],
}
KIND = {"width": "int", "height": "int", "steps": "int", "prior_steps": "int", "num": "int", "frames": "int",
        "seed": "int", "guidance": "float", "prior_guidance": "float", "strength": "float", "prompt": "str",
        "negative": "str", "sampler": "choice", "interp": "choice", "image": "image", "mask": "image",
        "items": "items", "loras": "loras"}


def test_wrong_types_for_every_field():
    """Every field of every mode, given each wrong type or out-of-range value, is refused naming that field."""
    for mode in MODES:
        Job.from_dict(BASE[mode], mode).validate()
        for key in MODE_KEYS[mode]:
            for bad in WRONG[KIND[key]]:
                if key == "seed" and bad in (0,):
                    continue  # 0 is a seed
                if key == "frames" and bad == -8:
                    continue
                COUNTS["validate: wrong type per field"] += 1
                with pytest.raises(JobError) as info:
                    Job.from_dict({**BASE[mode], key: bad}, mode).validate()
                check_job_error(info.value)
                assert info.value.field.split("[")[0] == key, (mode, key, bad, info.value.field, str(info.value))


def test_limits_and_unicode_named():
    assert "over the limit of 16384" in str(pytest.raises(JobError, Job(prompt="x", width=2**40).validate).value)
    assert pytest.raises(JobError, Job(prompt="x", steps=1001).validate).value.field == "steps"
    with pytest.raises(JobError, match=r"not valid Unicode text: a lone surrogate '\\ud800' at position 2"):
        Job(prompt="a \ud800").validate()
    with pytest.raises(JobError, match="not below 2"):
        Job(prompt="x", seed=2**64 - 1, num=2, seed_per_image=True).validate()
    Job(prompt="x", seed=2**64 - 2, num=2, seed_per_image=True).validate()
    with pytest.raises(JobError, match="must be a non-negative number") as info:
        Job(prompt="x", guidance=10**400).validate()
    assert info.value.field == "guidance"
    with pytest.raises(JobError) as info:
        Job.from_dict({"mode": ["img2img"]})
    assert info.value.field == "mode"
    with pytest.raises(JobError) as info:
        Job.from_dict({"prompt": "x", 1: 2, "\0": 3})
    assert info.value.field == "\x00" and "unknown keys" in str(info.value) and "\\x00" in str(info.value)
    long = pytest.raises(JobError, Job(mode="img2img", prompt="x", image="y" * 5000).validate).value
    assert len(str(long)) < 1100 and " ... " in str(long)


# ------------------------------------------------------------------------------------------- valid jobs run

SIZES = [8, 16, 64, 63, 0, None]


@st.composite
def plausible_jobs(draw):
    """Jobs of plausible shape with edge-case values: most validate, and those run quickly (≤ 64×64, ≤ 2
    steps, ≤ 2 images, ≤ 3 frames)."""
    mode = draw(st.sampled_from(MODES))
    d = dict(BASE[mode])
    optional = {
        "prompt": st.sampled_from(TEXTS), "negative": st.sampled_from([None, *TEXTS[:8]]),
        "width": st.sampled_from(SIZES), "height": st.sampled_from(SIZES),
        "steps": st.sampled_from([1, 2, 0, 1001, None]), "prior_steps": st.sampled_from([1, 2, 0, None]),
        "guidance": st.sampled_from([0, 0.0, 1e-300, 4, 7.5, 1000, 1e30, 1e308, math.nan, math.inf, -1, 10**400,
                                     None]),
        "prior_guidance": st.sampled_from([0, 4.0, 1000.0, 1e308, -0.0, math.nan]),
        "sampler": st.sampled_from([*jobs.SAMPLER_CHOICES, "euler", None]),
        "seed": st.sampled_from([0, 1, 2**32, 2**64 - 1, 2**64, -1, 1.5, True, "3", None]),
        "num": st.sampled_from([1, 2, 0, None]), "strength": st.sampled_from([0, 1e-9, 0.3, 1, 1.0, 1.5, -0.0]),
        "mask": st.sampled_from(["inputs/mask.png", "inputs/mask32.png"]),
        "image": st.sampled_from(["inputs/good.png", "inputs/good.png", "inputs/broken.png"]),
        "frames": st.sampled_from([2, 3, 1, None]), "interp": st.sampled_from(["slerp", "lerp", "cubic"]),
        "items": st.lists(st.one_of(
            st.fixed_dictionaries({"text": st.sampled_from(TEXTS)},
                                  optional={"weight": st.sampled_from([0, 0.0, -1, 2.5, 1e308, math.nan,
                                                                       math.inf, -0.0])}),
            st.fixed_dictionaries({"image": st.just("inputs/good.png")},
                                  optional={"weight": st.sampled_from([0, -1, 0.5])})),
            min_size=1, max_size=3),
    }
    for key in MODE_KEYS[mode]:
        if key in optional and draw(st.booleans()):
            d[key] = draw(optional[key])
    return mode, d


@pytest.mark.filterwarnings("error::RuntimeWarning")  # NaN pixels ("invalid value encountered in cast")
@settings(FUZZ, max_examples=90)
@given(case=plausible_jobs())
def test_valid_jobs_run(case, bundled, tmp_path_factory):
    """A job that validates runs on the bundled model (or, for the img2img strength end point its compat
    excludes, is refused as a JobError before any work), and its images carry records that read back."""
    mode, d = case
    COUNTS["run: plausible jobs"] += 1
    pipe, model = bundled
    try:
        job = Job.from_dict(d, mode).validate()
    except Exception as exc:  # noqa: BLE001
        check_job_error(exc, d)
        return
    job = job.replace(steps=job.steps or 1, prior_steps=job.prior_steps or 1)
    if job.mode == "morph":
        job = job.replace(frames=max(len(job.items), min(job.frames or 2, 3)))
    try:
        made = jobs.run(pipe, job, model=model)
    except JobError as exc:
        assert exc.field == "strength" and job.strength in (0, 1), exc
        return
    COUNTS["run: plausible jobs, ran"] += 1
    assert len(made) == (job.frames if job.mode == "morph" else job.num or 1)
    folder = tmp_path_factory.mktemp("runs")
    for i, (img, rec) in enumerate(made):
        assert img.size[0] % 8 == 0 and img.size[0] <= 64
        path = metadata.save_image(img, folder / f"{i}.png", rec)
        back = metadata.read_record(path)
        assert back.get("prompt") == job.prompt and back["seed"] == rec["seed"] and back["mode"] == job.mode
        assert Job.from_dict(back, strict=False).validate().seed == rec["seed"]  # a record is a job again


# ------------------------------------------------------------------------------------------- the command line

COMMANDS = ["generate", "generate", "mix", "img2img", "inpaint", "variations", "morph", "info", "frobnicate"]
VALUES = {
    "size": ["64", "8", "16", "63", "0", "-64", "x", "1e2", "", "99999992", "６４"],
    "steps": ["1", "2", "0", "-1", "1001", "x", "1.5", "２"],
    "seed": ["0", "7", "-1", "18446744073709551615", "18446744073709551616", "1.5", "x", "1" * 5000],
    "num": ["1", "2", "0", "x"],
    "float": ["0", "4", "nan", "inf", "-1", "1e309", "x", "4.5", ""],
    "strength": ["0", "0.5", "1", "1.5", "nan", "-0"],
    "text": TEXTS[:-1] + ["a cat:0.5", "b:-0.5", "c:nan", "d:0", "-starts-with-dash", "x" * 3000],
    "image": IMAGES[:-2] + ["inputs/good.png:0.5", "inputs/good.png:-1"],
    "out": ["out", "out/x.png", "out/x.jpg", "out/x.webp", "out/x.gif", "inputs/good.png/sub", "deep/a/b",
            "out/\x1b.png", "out/x.bmp"],
    "sampler": [*jobs.SAMPLER_CHOICES, "euler", ""],
    "model": ["--device=cpu", "--dtype=float32", "--device=cuda", "--dtype=float64", "--model=nowhere",
              "--prior=owner/name", "--compat=bogus"],
    "from": ["inputs/good.png", "inputs/missing.png", "inputs/broken.png", "inputs/hostile.png", "inputs/deep.png",
             "inputs/list.png", "inputs/record.png", "inputs/badmodel.png"],
}
FLAGS = [("-W", "size"), ("-H", "size"), ("--steps", "steps"), ("--prior-steps", "steps"), ("--seed", "seed"),
         ("--num", "num"), ("--guidance", "float"), ("--prior-guidance", "float"), ("--strength", "strength"),
         ("--sampler", "sampler"), ("-p", "text"), ("-n", "text"), ("-t", "text"), ("--text", "text"),
         ("-i", "image"), ("-m", "image"), ("-o", "out"), ("--frames", "num"), ("--interp", "text"),
         ("--from", "from"), ("--fps", "float"), ("--format", "text")]
SWITCHES = ["--quiet", "--json", "--overwrite", "--raw-weights", "--fast", "--boomerang", "--no-frames",
            "--help", "--bogus"]


GOOD = {"size": ["64", "8", "16"], "steps": ["1", "2"], "seed": ["0", "7", "18446744073709551615"],
        "num": ["1", "2"], "float": ["0", "4", "4.5", "1000"], "strength": ["0.5", "1", "0.01"],
        "text": ["a cat", "мурлыка 🐱", "مرحبا", "a\0b", "", "x" * 3000], "image": ["inputs/good.png"],
        "out": ["out", "out/x.png", "out/x.jpg", "out/x.webp"], "sampler": list(jobs.SAMPLER_CHOICES),
        "from": ["inputs/record.png"]}
SANE = {"generate": ["a cat"], "img2img": ["a cat", "-i", "inputs/good.png"],
        "inpaint": ["a cat", "-i", "inputs/good.png", "-m", "inputs/mask.png"],
        "mix": ["-t", "a cat:0.5", "-i", "inputs/good.png"], "variations": ["-i", "inputs/good.png"],
        "morph": ["-t", "a", "-t", "b", "-o", "out/m.gif"]}
OPTIONS = {"generate": ["-W", "-H", "--steps", "--prior-steps", "--seed", "--num", "--guidance", "--prior-guidance",
                        "--sampler", "-p", "-n", "-o"],
           "img2img": ["--strength"], "inpaint": [], "mix": ["-t", "--text", "-i"], "variations": [],
           "morph": ["--frames", "--fps"]}


@st.composite
def argvs(draw):
    """Argument vectors: half of them a runnable command with a few options (mostly good values, some edge or
    wrong ones), half anything from the whole vocabulary."""
    kinds = dict(FLAGS)
    if draw(st.booleans()):
        command = draw(st.sampled_from(sorted(SANE)))
        argv = [command, *SANE[command]]
        if argv[1:2] == ["a cat"]:
            argv[1] = draw(st.sampled_from(GOOD["text"] + TEXTS[:-1]))
        flags = OPTIONS["generate"] + OPTIONS[command]
        if command == "variations":
            flags = [f for f in flags if f not in ("--prior-steps", "--prior-guidance")]
        for _ in range(draw(st.integers(0, 3))):
            flag = draw(st.sampled_from(flags))
            pool = GOOD if draw(st.integers(0, 3)) else VALUES
            argv += [flag, draw(st.sampled_from(pool.get(kinds[flag], VALUES[kinds[flag]])))]
    else:
        argv = [draw(st.sampled_from(COMMANDS))]
        if draw(st.booleans()):
            argv.append(draw(st.sampled_from(VALUES["text"] + VALUES["image"][:3])))
        for _ in range(draw(st.integers(0, 7))):
            kind = draw(st.sampled_from(["flag"] * 6 + ["switch", "model"]))
            if kind == "flag":
                flag, values = draw(st.sampled_from(FLAGS))
                argv += [flag, draw(st.sampled_from(VALUES[values]))]
            elif kind == "switch":
                argv.append(draw(st.sampled_from(SWITCHES)))
            else:
                argv.append(draw(st.sampled_from(VALUES["model"])))
    if draw(st.integers(0, 3)) == 0:
        argv.append(draw(st.sampled_from(["--quiet", "--json", "--fast", "--overwrite"])))
    if argv[0] in SANE:
        # keep runs quick where the vector does not choose: tiny sizes, 1 step, 2 frames
        for flag, value in (("-W", "64"), ("-H", "64"), ("--steps", "1"), ("--prior-steps", "1"), ("--frames", "2")):
            if flag not in argv and (flag != "--prior-steps" or argv[0] != "variations") and draw(st.integers(0, 9)):
                argv += [flag, value]
    return argv


def _fresh_out(argv: list[str], n: int) -> list[str]:
    """Outputs of each example under its own folder (so that ``--overwrite``-less reruns are not refused)."""
    out = []
    for a in argv:
        out.append(a.replace("out", f"out{n}", 1) if a.startswith(("out", "deep")) else a)
    return out


@settings(FUZZ, max_examples=80)
@given(argv=argvs())
def test_cli_argv(argv, cli_models):
    """Exit 0 with the images written, or exit 2 with exactly one error line; never a crash or a traceback."""
    n = COUNTS["cli: in-process argv"] = COUNTS["cli: in-process argv"] + 1
    argv = _fresh_out(argv, n)
    code, out, err = run_cli(argv)
    assert "Traceback" not in err and "Traceback" not in out
    assert code in (0, 2), f"{argv!r}: exit {code}\n{err}"
    errors = [line for line in err.splitlines() if line.startswith(ERROR)]
    if code == 2:
        assert len(errors) == 1, f"{argv!r}:\n{err}"
        COUNTS["cli: in-process argv, refused"] += 1
    else:
        assert errors == [], err
    for line in err.splitlines():
        assert line.startswith("kandinsky: ") or line.startswith("usage:") or not line.strip() or "--help" in argv, (
            f"{argv!r}: stray stderr line {line!r}")
    if "--json" in argv and "--help" not in argv and code in (0, 2) and out.strip().startswith("{"):
        result = json.loads(out)
        assert result.get("ok", True) is (code == 0) or "errors" in result
    if code == 0 and argv[0] in ("generate", "mix", "img2img", "inpaint", "variations") and "--help" not in argv:
        COUNTS["cli: in-process argv, ran"] += 1
        written = [Path(line.split("  (")[0]) for line in out.splitlines() if "  (" in line] if "--json" not in argv \
            else [Path(im["path"]) for im in json.loads(out)["images"]]
        assert written
        for path in written:
            assert metadata.is_complete(path) and metadata.read_record(path)["mode"]


RECORD_VALUES = {
    "mode": st.sampled_from([*MODES, "sketch", 3, None, ["txt2img"]]),
    "prompt": st.sampled_from(TEXTS[:-1] + [3]), "negative": st.sampled_from([None, "", "blurry", "\ud800"]),
    "width": st.sampled_from([64, 8, 63, "64", None]), "height": st.sampled_from([64, 16, -8]),
    "steps": st.sampled_from([1, 2, 0, "1", 1001]), "prior_steps": st.sampled_from([1, 2, 0]),
    "guidance": st.sampled_from([4.0, 0, "4", 1e30]), "sampler": st.sampled_from(["ddim", "DDIM", "euler", 1]),
    "seed": st.sampled_from([1, 2**64 - 1, 2**64, -1, "7", 1.5]),
    "num": st.sampled_from([1, 2, 0, "2", None]), "index": st.sampled_from([0, 1, 5, -1, "x", True]),
    "frame": st.sampled_from([0, 1, 2, 99, -1, "x"]), "frames": st.sampled_from([2, 3, 0]),
    "items": st.sampled_from([[{"text": "a"}, {"text": "b"}], [{"text": "a", "weight": 0.5}], [],
                              [{"image": "inputs/good.png"}, {"text": "b"}], "a", [{"text": None}]]),
    "image": st.sampled_from(["inputs/good.png", "inputs/missing.png", "<upload>", 3]),
    "mask": st.sampled_from(["inputs/mask.png", "inputs/mask32.png"]),
    "strength": st.sampled_from([0.5, 0, 1, 2]), "interp": st.sampled_from(["slerp", "lerp", "cubic"]),
    "model": st.sampled_from(["nowhere", "owner/name", 3, None, ""]), "prior": st.sampled_from(["nowhere", None]),
    "original": st.sampled_from(["nowhere", None]), "dtype": st.sampled_from(["float32", "float64", 1, None]),
    "compat": st.sampled_from(["diffusers", "bogus", None, 2]), "version": st.sampled_from(["0.1.0", None]),
}
PARAMETER_TEXTS = ["a cat\nSteps: 1, Sampler: DDIM, CFG scale: 4, Seed: 3, Size: 64x64, Model: m, Prior steps: 1",
                   "a cat\nSteps: x, Sampler: DDIM, CFG scale: 4, Seed: 3",
                   "x\nSteps: 1, Seed: 99999999999999999999999, Size: 64x64x64",
                   "x\nSteps: 1, Seed: 1, Size: 64x64, Mix: [[[[, Mode: mix",
                   "x\nSteps: 1, Seed: 1, Size: 64x64, Prior steps: 1, Mode: morph, Morph frame: 7, Morph frames: 2",
                   "only a prompt", "", "Negative prompt: n\nSteps: 1, Seed: 2, Size: 64x64, Prior steps: 1"]


SMALL_RECORD = {"seed": 1, "width": 64, "height": 64, "steps": 1, "prior_steps": 1}


@st.composite
def records(draw):
    """Records as images carry them: a sane one of a mode with up to 3 values changed, or anything."""
    if draw(st.booleans()):
        mode = draw(st.sampled_from(MODES))
        record = {"mode": mode, **SMALL_RECORD, **BASE[mode]}
        if mode == "morph":
            record.update(frames=2, frame=1)
        for key in draw(st.lists(st.sampled_from(sorted(RECORD_VALUES)), max_size=3, unique=True)):
            record[key] = draw(RECORD_VALUES[key])
        return record
    return draw(st.fixed_dictionaries({"mode": RECORD_VALUES["mode"]},
                                      optional={k: v for k, v in RECORD_VALUES.items() if k != "mode"}))


@settings(FUZZ, max_examples=40)
@given(record=records(), text=st.one_of(st.none(), st.sampled_from(PARAMETER_TEXTS)), as_json=st.booleans())
def test_from_hostile_records(record, text, as_json, cli_models):
    """``generate --from IMAGE`` on images whose recorded parameters are anything: a re-run, or one line."""
    n = COUNTS["cli: --from records"] = COUNTS["cli: --from records"] + 1
    info = PIL.PngImagePlugin.PngInfo()
    if as_json or text is None:
        info.add_text("kandinsky", json.dumps(record))
    if text is not None:
        info.add_text("parameters", text)
    PIL.Image.new("RGB", (8, 8)).save(f"from{n}.png", pnginfo=info)
    code, out, err = run_cli(["generate", "--from", f"from{n}.png", "-o", f"from-out{n}", "--quiet"])
    assert "Traceback" not in err and code in (0, 2), f"{record!r} {text!r}: exit {code}\n{err}"
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith(ERROR), err
    else:
        COUNTS["cli: --from records, ran"] += 1
        [path] = [Path(line.split("  (")[0]) for line in out.splitlines()]
        assert metadata.is_complete(path)


# ------------------------------------------------------------------------------------------- --prompts files

LINES = [
    b"a red cat", b"  # a comment", b"", b"   ", "мурлыка кот 🐱".encode(), "مرحبا \u202e".encode(),
    b"a\x00b nul prompt", b"\x00", b"caf\xe9 latin-1", b"\xff\xfe\x00bad", b"\xc3", b"\xed\xa0\x80 surrogate",
    b"x" * 200_000, b'--seed 5 "a blue dog"', b"--seed -1 x", b"--steps 2 --num 2 two", b'--sampler euler "x"',
    b'--bogus "x"', b'"unclosed quote', b"--seed '3", b'--prompt "\x00"', b"-", b"--",
    b'{"prompt": "json cat", "seed": 9}', b'{"prompt": "x", "width": 63}', b'{"prompt": "x", "colour": 1}',
    b'{"prompt": "x"', b"{}", b"{broken", b'{"prompt": "x"}}', b"[1, 2]", b'{"prompt": "\\ud800"}',
    b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}", b"{" + b'"a":' * 1 + b"[" * 100_000 + b"}",
    b'{"prompt": "x", "seed": NaN}', b'{"prompt": "x", "guidance": Infinity}', b'{"prompt": null}',
    b'{"prompt": "x", "mode": "img2img"}', b'{"prompt": "x", "mode": ["x"]}', b'{"prompt": "x", "num": 2}',
    b'{"prompt": "x", "steps": 1001}', b'{"prompt": "x", "width": 99999992}', b'{"prompt": "x", "seed": 1.0}',
    b'{"prompt": "x", "image": "a.png"}', b'{"prompt": "%s"}' % (b"y" * 100_000), b"\xef\xbb\xbfbom inside",
    "line\u2028separator".encode(), b"vertical\x0btab\x0cfeed", b"\r",
]


def _job_lines(data: bytes) -> list[int]:
    """The line numbers of a prompts file that are jobs (not blank, not comments), as editors count lines."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    numbers = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            text = raw.removesuffix(b"\r").decode("utf-8").strip()
        except UnicodeDecodeError:
            numbers.append(n)
            continue
        if text and not text.startswith("#"):
            numbers.append(n)
    return numbers


@settings(FUZZ, max_examples=30)
@given(lines=st.lists(st.sampled_from(LINES), min_size=1, max_size=5), crlf=st.booleans(), bom=st.booleans(),
       json_out=st.booleans())
def test_prompts_files(lines, crlf, bom, json_out, cli_models):
    """Every job line of a prompts file is either done (its PNG, complete, with its record) or reported once as
    ``FILE:LINE: reason``; the exit status is 0 or 2; nothing else is printed as an error, no traceback."""
    n = COUNTS["cli: prompts files"] = COUNTS["cli: prompts files"] + 1
    data = (b"\xef\xbb\xbf" if bom else b"") + (b"\r\n" if crlf else b"\n").join(lines)
    prompts = Path(f"prompts{n}.txt")
    prompts.write_bytes(data)
    out = Path(f"batch{n}")
    argv = ["generate", "--prompts", str(prompts), "-o", str(out), "-W", "64", "-H", "64", "--steps", "1",
            "--prior-steps", "1", "--quiet"] + (["--json"] if json_out else [])
    code, stdout, err = run_cli(argv)
    assert "Traceback" not in err and code in (0, 2), f"exit {code}\n{err}"
    expected = _job_lines(data)
    errors = [line for line in err.splitlines() if line.startswith(ERROR)]
    assert len(errors) == len(err.splitlines()), err  # --quiet: nothing but error lines
    if not expected:
        assert code == 2 and errors == [f"{ERROR}prompts file {prompts} has no jobs"]
        return
    failed = {}
    for line in errors:
        m = re.fullmatch(re.escape(f"{ERROR}{prompts}:") + r"(\d+): (.+)", line)
        assert m, f"not a FILE:LINE error: {line!r}"
        number = int(m.group(1))
        assert number not in failed, f"line {number} reported twice"
        failed[number] = m.group(2)
    made = {}
    for p in out.iterdir():
        assert not p.name.startswith("."), f"temporary file left: {p.name}"
        made.setdefault(int(p.name.split("-")[0]), []).append(p)
        assert metadata.is_complete(p) and metadata.read_record(p)["mode"] == "txt2img"
    assert set(failed) | set(made) == set(expected) and not set(failed) & set(made), (failed, made, expected)
    assert code == (2 if failed else 0)
    if json_out:
        result = json.loads(stdout)
        assert [e["line"] for e in result["errors"]] == sorted(failed)
    COUNTS["cli: prompts file lines"] += len(expected)


# ------------------------------------------------------------------------------------------- the real script


def _script() -> list[str]:
    here = Path(sys.executable).parent / "kandinsky"
    return [str(here)] if here.is_file() else [sys.executable, "-m", "kandinsky"]


def run_script(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run(_script() + argv, cwd=cwd, capture_output=True, timeout=240, env=env)


def test_script_prompts_file(work):
    """The console script on a prompts file with broken UTF-8, broken JSON, a NUL byte and a huge line."""
    COUNTS["cli: subprocess runs"] += 1
    (work / "script.txt").write_bytes(b"a red cat\ncaf\xe9\n{\"prompt\": \"x\"\n--seed 3 \"a\x00b\"\n"
                                      + b"z" * 300_000 + b"\n{\"prompt\": \"deep\", \"x\": " + b"[" * 50_000 + b"}\n")
    proc = run_script(["generate", "--prompts", "script.txt", "-o", "script-out", "-W", "64", "-H", "64",
                       "--steps", "1", "--prior-steps", "1"], work)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(ERROR)]
    assert [e.split(": ")[2].split(":")[1] for e in errors] == ["2", "3", "6"], errors
    assert "script.txt:2: the line is not UTF-8 text (byte 0xe9 at column 4)" in errors[0]
    assert "script.txt:3: invalid JSON" in errors[1] and "script.txt:6: invalid JSON" in errors[2]
    names = sorted(p.name for p in (work / "script-out").iterdir())
    assert [n[:6] for n in names] == ["00001-", "00004-", "00005-"], names
    assert metadata.read_record(work / "script-out" / names[1])["prompt"] == "a\x00b"


@pytest.mark.parametrize("argv, message", [
    (["generate", b"a \xff cat", "-W", "64"], "prompt is not valid Unicode text: a lone surrogate '\\udcff'"),
    (["generate", "x", "--seed", "18446744073709551616"], "seed must be an integer in [0, 2^64)"),
    (["generate", "x", "-W", "131072"], "width 131072 is over the limit of 16384 pixels"),
    (["generate", "--from", "inputs/hostile.png"], "records an invalid mode [1]"),
    (["info", "inputs/deep.png"], "carries no generation parameters"),
])
def test_script_errors(work, argv, message):
    """Refusals through the real console script: one line, exit 2 (undecodable argv bytes included)."""
    COUNTS["cli: subprocess runs"] += 1
    proc = run_script(argv, work)
    err = proc.stderr.decode("utf-8", "backslashreplace")
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith(ERROR) and message in err, err
