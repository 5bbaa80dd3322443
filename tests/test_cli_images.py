"""The hostile image corpus (:mod:`corpus`) through the command line: img2img (a ``--prompts`` batch through the
real console script, one line per image), inpaint (a batch, one line per mask), variations, mix, ``info`` and
``generate --from`` with each file. Usable files make a PNG; refused ones are reported once, as ``FILE:LINE:`` in
batches, with the corpus's reason, and the rest of the batch is finished; single runs exit 2 with one line."""

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
from pathlib import Path

import corpus
import PIL.Image
import pytest

from kandinsky import cli, jobs, metadata
from kandinsky.cli import batch, commands, morph

pytestmark = pytest.mark.timeout(300)
ERROR = "kandinsky: error: "
SMALL = ["--steps", "1", "--prior-steps", "1"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, corpus.Case]:
    return corpus.build(tmp_path_factory.mktemp("corpus") / "files")


@pytest.fixture(scope="module")
def in_process(bundled):
    """``cli.main`` in this process with the bundled model loaded once (the loader returns it for the default
    model choice and loads anything else as usual)."""
    real = jobs.load_pipeline

    def load(choice, need):
        canon = dataclasses.replace(choice, device=None if choice.device in ("cpu", "auto") else choice.device,
                                    dtype=None if choice.dtype in ("auto", "float32", "fp32") else choice.dtype)
        return bundled if canon == jobs.ModelChoice() else real(choice, need)

    with pytest.MonkeyPatch.context() as mp:
        for module in (commands, batch, morph):
            mp.setattr(module, "load_pipeline", load)

        def run(*argv) -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main([str(a) for a in argv])
            return code, out.getvalue(), err.getvalue()

        yield run


def _round64(v: int) -> int:
    return max(64, math.ceil(v / 64) * 64)


def _batch_results(err: str, prompts: Path, out: Path) -> tuple[dict[int, str], dict[int, Path]]:
    """({line: error}, {line: output}) of a batch; every error line must be ``FILE:LINE: reason``, once."""
    failed: dict[int, str] = {}
    for line in err.splitlines():
        if not line.startswith(ERROR):
            continue
        m = re.fullmatch(re.escape(f"{ERROR}{prompts}:") + r"(\d+): (.+)", line)
        assert m, f"not a FILE:LINE error line: {line!r}"
        assert int(m.group(1)) not in failed
        failed[int(m.group(1))] = m.group(2)
    made = {}
    for p in out.iterdir():
        assert not p.name.startswith("."), f"temporary file left: {p}"
        number = int(p.name.split("-")[0])
        assert number not in made
        made[number] = p
    return failed, made


def test_img2img_batch_through_the_script(cases, tmp_path):
    """One img2img batch line per corpus file, through the real console script."""
    names = sorted(cases)
    prompts = tmp_path / "img2img.txt"
    prompts.write_text("".join(json.dumps({"prompt": "a cat", "image": str(cases[n].path), "strength": 0.5}) + "\n"
                               for n in names), encoding="utf-8")
    here = Path(sys.executable).parent / "kandinsky"
    script = [str(here)] if here.is_file() else [sys.executable, "-m", "kandinsky"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([*script, "img2img", "--prompts", "img2img.txt", "-o", "out", "--seed", "1", *SMALL],
                          cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert "Traceback" not in proc.stderr
    failed, made = _batch_results(proc.stderr, Path("img2img.txt"), tmp_path / "out")
    for number, name in enumerate(names, 1):
        case = cases[name]
        if case.error:
            assert number in failed and number not in made, (name, proc.stderr)
            assert re.search(case.error, failed[number]) and str(case.path) in failed[number], (name, failed[number])
        else:
            assert number in made and number not in failed, (name, failed.get(number))
            with PIL.Image.open(made[number]) as img:
                img.verify()
            record = metadata.read_record(made[number])
            assert record["image"] == str(case.path) and record["strength"] == 0.5
            w, h = case.size
            assert (record["width"], record["height"]) == (_round64(w), _round64(h))
    assert proc.returncode == 2 and len(failed) == sum(1 for c in cases.values() if c.error)


def test_inpaint_batch_each_mask(cases, tmp_path, in_process, monkeypatch):
    """One inpaint line per corpus file as the mask of ``ok.png`` (48×32): masks of that size are used, others
    refused naming both sizes, unreadable ones refused with the corpus's reason."""
    monkeypatch.chdir(tmp_path)
    image = cases["ok.png"]
    names = sorted(cases)
    lines = [f'--mask "{cases[n].path}" --image "{image.path}" "a cat"' for n in names]
    Path("inpaint.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = in_process("inpaint", "--prompts", "inpaint.txt", "-o", "out", "--seed", "2", "-W", "64",
                                "-H", "64", *SMALL)
    failed, made = _batch_results(err, Path("inpaint.txt"), tmp_path / "out")
    for number, name in enumerate(names, 1):
        case = cases[name]
        if case.error:
            assert re.search(case.error, failed[number]) and number not in made, (name, failed.get(number))
        elif case.size != image.size:
            w, h = case.size
            assert failed[number] == f"mask is {w}×{h} but the image is 48×32; give a mask of the image's size"
        else:
            assert number in made and number not in failed, (name, failed.get(number))
            record = metadata.read_record(made[number])
            assert record["mask"] == str(case.path) and record["mode"] == "inpaint"
    assert code == 2 and "Traceback" not in err


def test_inpaint_mask_of_another_size_single_run(cases, tmp_path, in_process, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = in_process("inpaint", "a cat", "-i", cases["ok.png"].path, "-m",
                                cases["mask_other_size.png"].path, "-o", "out", *SMALL)
    assert code == 2 and err.splitlines() == [
        f"{ERROR}mask is 24×16 but the image is 48×32; give a mask of the image's size"]
    assert not Path("out").exists() or not any(Path("out").iterdir())


@pytest.mark.parametrize("command", ["variations", "mix"])
def test_each_image_single_runs(cases, tmp_path, in_process, monkeypatch, command):
    """variations -i FILE and mix -t TEXT -i FILE with each corpus file: a PNG, or exit 2 with one line."""
    monkeypatch.chdir(tmp_path)
    for name, case in sorted(cases.items()):
        extra = ["-t", "a cat"] if command == "mix" else []
        code, out, err = in_process(command, *extra, "-i", case.path, "-o", f"{command}-{name}.png", "--seed", "3",
                                    "--steps", "1", *(["--prior-steps", "1"] if command == "mix" else []))
        if case.error:
            assert code == 2 and len(err.splitlines()) == 1 and err.startswith(ERROR), (name, err)
            assert re.search(case.error, err), (name, err)
            assert not Path(f"{command}-{name}.png").exists()
        else:
            assert code == 0, (name, err)
            with PIL.Image.open(f"{command}-{name}.png") as img:
                img.verify()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_info_and_from_each_file(cases, in_process):
    """``info FILE`` and ``generate --from FILE`` on files without parameters: exit 2, one line, no crash (the
    decompression bomb included)."""
    for name, case in sorted(cases.items()):
        for argv in (["info", case.path], ["generate", "--from", case.path]):
            code, out, err = in_process(*argv)
            assert code == 2 and len(err.splitlines()) == 1 and err.startswith(ERROR), (name, argv, err)
            assert "unexpected" not in err
            assert re.search(r"carries no generation parameters|cannot read image", err), (name, err)
