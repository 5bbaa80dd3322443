"""Faults around the command line's outputs: ``kill -9`` during a ``--prompts`` batch (then resumed), a disk that
fills up, and Ctrl+C while a model loads. Images are written whole or not at all (a temporary file in the same
folder, fsync, rename), a resumed batch keeps only complete outputs, and nothing partial is ever left behind."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image
import pytest

from kandinsky import cli, jobs, metadata
from kandinsky.cli import batch, commands, morph

pytestmark = pytest.mark.timeout(300)
ERROR = "kandinsky: error: "
SMALL = ["-W", "64", "-H", "64", "--steps", "2", "--prior-steps", "2"]
NAME = re.compile(r"^(\d{5})-.+\.png$")


def _script() -> list[str]:
    here = Path(sys.executable).parent / "kandinsky"
    return [str(here)] if here.is_file() else [sys.executable, "-m", "kandinsky"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if NAME.match(p.name)) if folder.is_dir() else []


def _check_batch_folder(folder: Path, lines: list[str]) -> None:
    """Exactly one complete PNG with its record per line, nothing else (no temporary or partial files)."""
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == len(lines) and all(NAME.match(n) for n in names), names
    for n, (name, prompt) in enumerate(zip(names, lines, strict=True), 1):
        assert int(name[:5]) == n
        with PIL.Image.open(folder / name) as img:
            img.verify()
        with PIL.Image.open(folder / name) as img:
            assert img.size == (64, 64) and img.info["parameters"].startswith(prompt)
        record = metadata.read_record(folder / name)
        assert record["prompt"] == prompt and record["steps"] == 2


# ------------------------------------------------------------------------------------------- kill -9


@pytest.mark.timeout(400)
def test_kill_9_and_resume(tmp_path):
    """SIGKILL at random moments (loading, generating, writing), the same command again each time; at the end
    exactly one complete PNG per line, and no temporary files."""
    lines = [f"prompt number {i}, a red cat" for i in range(1, 11)]
    (tmp_path / "jobs.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    cmd = [*_script(), "generate", "--prompts", "jobs.txt", "-o", "out", "--seed", "5", *SMALL]
    rng = random.Random(20240611)
    kills, seen = 0, []
    for _ in range(4):
        before = len(_pngs(out))
        if before == len(lines):
            break
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        target = min(before + rng.randint(0, 3), len(lines) - 1)  # 0: kill while it loads or imports
        deadline = time.monotonic() + 120
        while len(_pngs(out)) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
        seen.append(len(_pngs(out)))
        for p in _pngs(out):  # whatever a kill interrupted, what is there under a final name is whole
            assert metadata.is_complete(p), p
    assert kills >= 3, seen
    final = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)
    assert final.returncode == 0, final.stderr
    assert "Traceback" not in final.stderr
    _check_batch_folder(out, lines)


def test_resume_replaces_partial_outputs_and_removes_stale_temporaries(tmp_path, in_process):
    """What a kill during a write left (an older version's truncated PNG; a temporary file of a process that is
    gone) is not taken for a finished line: the line is made again and the temporary file removed. Another
    running process's temporary file is left alone."""
    lines = ["a red cat", "a blue dog", "a green bird"]
    (tmp_path / "jobs.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = ["generate", "--prompts", tmp_path / "jobs.txt", "-o", tmp_path / "out", "--seed", "3", *SMALL]
    code, _, err = in_process(*argv)
    assert code == 0, err
    out = tmp_path / "out"
    first, second, third = _pngs(out)
    kept = third.stat().st_mtime_ns
    second.write_bytes(second.read_bytes()[:-40])  # cut short: no IEND
    first.unlink()
    first.write_bytes(b"")  # created, never written
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = out / f".kandinsky-{gone.pid}-0123abcd.tmp"
    stale.write_bytes(b"\x89PNG partial")
    alive = out / f".kandinsky-{os.getppid()}-0123abcd.tmp"
    alive.write_bytes(b"\x89PNG another run's")
    assert not metadata.is_complete(first) and not metadata.is_complete(second)
    code, _, err = in_process(*argv)
    assert code == 0, err
    assert f"{first.name} is incomplete; writing it again" in err and f"{second.name} is incomplete" in err
    assert not stale.exists() and alive.exists()
    alive.unlink()
    _check_batch_folder(out, lines)
    assert third.stat().st_mtime_ns == kept  # a complete output is not redone


def test_write_atomic_never_leaves_a_partial_file(tmp_path, monkeypatch):
    """A failure (or Ctrl+C) at any step of a write leaves the old file or none, and no temporary file."""
    path = tmp_path / "x.png"
    for step in ("write", "fsync", "link", "replace"):
        for exc in (OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()):
            with monkeypatch.context() as mp:
                real = getattr(os, step)

                def boom(*a, _real=real, _exc=exc, _step=step, **k):
                    if _step == "write":
                        _real(a[0], bytes(a[1])[:10])  # part of it reaches the disk
                    raise _exc

                mp.setattr(os, step, boom)
                overwrite = step == "replace"
                with pytest.raises(type(exc)) as info:
                    metadata.write_atomic(path, b"new content", overwrite=overwrite)
            if isinstance(exc, OSError):
                assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
            assert sorted(p.name for p in tmp_path.iterdir()) == [], (step, exc)
    metadata.write_atomic(path, b"old")
    with pytest.raises(FileExistsError):
        metadata.write_atomic(path, b"new")
    metadata.write_atomic(path, b"new", overwrite=True)
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["x.png"]


# ------------------------------------------------------------------------------------------- a full disk


@pytest.fixture(scope="module")
def bundled():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield jobs.load_pipeline(jobs.ModelChoice(), ("decoder", "prior"))
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def in_process(bundled):
    """``cli.main`` in this process; the bundled model is loaded once."""
    real = jobs.load_pipeline

    def load(choice, need):
        canon = dataclasses.replace(choice, device=None, dtype=None)
        return bundled if canon == jobs.ModelChoice() and "inpaint" not in need else real(choice, need)

    with pytest.MonkeyPatch.context() as mp:
        for module in (commands, batch, morph):
            mp.setattr(module, "load_pipeline", load)

        def run(*argv) -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main([str(a) for a in argv])
            return code, out.getvalue(), err.getvalue()

        yield run


def _fill_disk_after(monkeypatch, folder: Path, images: int, where: str) -> None:
    """Once ``folder`` holds ``images`` images, writes of files in it fail with ENOSPC (``where``: in
    ``os.write``, after part of the bytes reached the disk, or in ``os.fsync``, as file systems that allocate
    late report it)."""
    real = getattr(os, where)

    def failing(fd, *args):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.startswith(str(folder)) and len(_pngs(folder)) >= images:
            if where == "write":
                real(fd, bytes(args[0])[: len(args[0]) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, *args)

    monkeypatch.setattr(os, where, failing)


@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell the output files")
@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_stops_the_batch(tmp_path, in_process, monkeypatch, where):
    lines = [f"line {i}" for i in range(1, 7)]
    (tmp_path / "jobs.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["generate", "--prompts", tmp_path / "jobs.txt", "-o", out, "--seed", "4", "--quiet", *SMALL]
    with monkeypatch.context() as mp:
        _fill_disk_after(mp, out, 3, where)
        code, stdout, err = in_process(*argv)
    assert code == 2
    assert err.splitlines() == [f"{ERROR}no space left on device: cannot write to {out} (line 4); batch stopped "
                                f"after 3 image(s) written, nothing partial left; make room and run the same "
                                f"command again to finish"], err
    assert len(stdout.splitlines()) == 3
    written = _pngs(out)
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in written] and len(written) == 3
    stamps = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in written}
    for p in written:
        assert metadata.is_complete(p) and metadata.read_record(p)["prompt"] == lines[int(p.name[:5]) - 1]
    code, stdout, err = in_process(*argv)  # room again: the same command finishes the batch
    assert code == 0, err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in written} == stamps
    names = [p.name for p in out.iterdir()]
    assert len(names) == 6 and all(NAME.match(n) for n in names)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell the output files")
@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_single_image(tmp_path, in_process, monkeypatch, where):
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        _fill_disk_after(mp, out, 0, where)
        code, stdout, err = in_process("generate", "a cat", "-o", out / "cat.png", "--seed", "1", "-q", *SMALL)
    assert code == 2 and err.splitlines() == [f"{ERROR}{out / 'cat.png'}: No space left on device"], err
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------------- Ctrl+C


def _wait_for_torch(pid: int, timeout: float = 90) -> None:
    """Until the process has torch's library mapped (it is loading the model), or a moment where /proc is
    absent."""
    maps = Path(f"/proc/{pid}/maps")
    if not maps.parent.is_dir():
        time.sleep(1.0)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "libtorch" in maps.read_text(errors="replace"):
                return
        except OSError:
            return
        time.sleep(0.02)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("delay", [0.0, 0.3, 0.8])
def test_ctrl_c_while_loading(tmp_path, delay):
    """SIGINT while torch is imported or the model read: exit 130 promptly, one line, nothing written."""
    out = tmp_path / "out"
    proc = subprocess.Popen([*_script(), "generate", "a red cat", "-o", "out/cat.png", "--seed", "1", *SMALL],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_torch(proc.pid)
    time.sleep(delay)
    if proc.poll() is not None:
        pytest.fail(f"finished before the signal: {proc.communicate()}")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["kandinsky: interrupted"], stderr
    assert stdout == "" and elapsed < 10, elapsed
    assert not out.exists() or list(out.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]
