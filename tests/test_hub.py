"""Hub ids resolve through huggingface_hub's own cache, offline, without touching the network."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from kandinsky.pipeline import ASSETS
from kandinsky.weights import hub

pytest.importorskip("huggingface_hub")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_snapshot(cache: Path, repo_id: str, source: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """Put ``source`` into ``cache`` as huggingface_hub lays out a downloaded snapshot: content-addressed blobs,
    a snapshot folder of relative links to them, and a ref naming the commit."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    cache_snapshot(cache, hub.REPOS["decoder"], ASSETS / "decoder")
    cache_snapshot(cache, hub.REPOS["prior"], ASSETS / "prior", ref="v1.0")
    return cache


def _run(code: str, cache: Path, offline: bool = True, extra_env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    guard = textwrap.dedent("""
        import socket
        def _blocked(*a, **k):
            raise AssertionError("network access attempted")
        socket.socket.connect = socket.socket.connect_ex = _blocked
        socket.create_connection = socket.getaddrinfo = _blocked
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1", **(extra_env or {})}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("TRANSFORMERS_OFFLINE", None)  # huggingface_hub takes it for HF_HUB_OFFLINE
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", guard + textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_cache_is_huggingface_hubs_own_layout(hf_cache):
    from huggingface_hub import scan_cache_dir

    repos = {r.repo_id: r for r in scan_cache_dir(hf_cache).repos}
    assert set(repos) == {hub.REPOS["decoder"], hub.REPOS["prior"]}
    assert {"main"} == {ref for rev in repos[hub.REPOS["decoder"]].revisions for ref in rev.refs}


@pytest.mark.parametrize("offline", [True, False])
def test_cached_hub_ids_load_without_network(hf_cache, offline):
    """Ids, a shortcut, a tag and a commit revision load from the cache, with every socket call blocked; the
    images equal the bundled model's (the snapshot holds the same files)."""
    proc = _run(f"""
        import numpy as np
        from kandinsky import Kandinsky21
        kw = dict(width=64, height=64, steps=2, prior_steps=2, seed=4)
        pipe = Kandinsky21.from_pretrained(decoder="kandinsky-2-1", prior="{hub.REPOS['prior']}@v1.0")
        ref = Kandinsky21.from_pretrained(decoder="{ASSETS / 'decoder'}", prior="{ASSETS / 'prior'}")
        a, = pipe.text_to_image("a red circle", **kw)
        b, = ref.text_to_image("a red circle", **kw)
        assert np.array_equal(np.asarray(a), np.asarray(b))
        again = Kandinsky21.from_pretrained(decoder="{hub.REPOS['decoder']}@{COMMIT}")
        print("ok", pipe.decoder.folder)
    """, hf_cache, offline)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "snapshots" in proc.stdout


def test_missing_snapshot_offline_says_what_to_do(hf_cache):
    proc = _run("""
        from kandinsky import Kandinsky21
        from kandinsky.weights.hub import HubError
        try:
            Kandinsky21.from_pretrained(inpaint="kandinsky-2-1-inpaint")
        except HubError as exc:
            print(exc)
    """, hf_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kandinsky-community/kandinsky-2-1-inpaint is not in the Hugging Face cache" in proc.stdout
    assert "kandinsky download" in proc.stdout


def test_plan_takes_safetensors_never_also_the_bin():
    listing = ["model_index.json", "README.md", ".gitattributes", "unet/config.json",
               "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
               "unet/diffusion_pytorch_model.fp16.safetensors", "movq/config.json", "movq/diffusion_pytorch_model.bin",
               "text_encoder/config.json", "text_encoder/pytorch_model.bin", "text_encoder/model.safetensors",
               "tokenizer/sentencepiece.bpe.model", "tokenizer/tokenizer_config.json",
               "scheduler/scheduler_config.json"]
    assert hub.plan_files(listing) == sorted([
        "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "movq/config.json",
        "movq/diffusion_pytorch_model.bin", "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/sentencepiece.bpe.model", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"])


def test_what_counts_as_a_hub_id(tmp_path):
    assert hub.parse("kandinsky-2-1") == (hub.REPOS["decoder"], None)
    assert hub.parse("owner/name@v2") == ("owner/name", "v2")
    assert hub.parse(str(tmp_path)) is None  # an existing folder is a folder
    for not_id in ("", "a/b/c", "../x", "/abs/path", "./rel", "name", "own er/x"):
        assert hub.parse(not_id) is None, not_id


def test_cli_download_and_model_options_offline(hf_cache, tmp_path):
    """`kandinsky download` prints the cached folders offline; `--model ID` generates and records the id, and
    `--from` reproduces the image from that record."""
    env = {**os.environ, "HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "kandinsky", *args], env=env, capture_output=True, text=True,
                              timeout=300)

    proc = cli("download", "decoder")
    assert proc.returncode == 0, proc.stderr
    assert "snapshots" in proc.stdout
    proc = cli("download", "inpaint")
    assert proc.returncode == 2 and "not in the Hugging Face cache" in proc.stderr
    out = tmp_path / "a.png"
    proc = cli("generate", "a red circle", "--model", "kandinsky-2-1", "--seed", "3", "--steps", "2",
               "--prior-steps", "2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    from kandinsky import metadata

    assert metadata.read_metadata(out)["record"]["model"] == "kandinsky-2-1"
    again = tmp_path / "b.png"
    proc = cli("generate", "--from", str(out), "-o", str(again))
    assert proc.returncode == 0, proc.stderr
    import numpy as np
    import PIL.Image

    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(PIL.Image.open(again)))


# ----------------------------------------------------------------------------------------------------------------
# the original release by Hub id (ai-forever/Kandinsky_2.1), OpenAI's CLIP and its tokenizer


@pytest.fixture(scope="module")
def original_release(tmp_path_factory, decoder_pipe, prior_pipe, inpaint_pipe):
    """A tiny original file set as a local folder (with ViT-L-14.pt and clip_tokenizer/), and the same files laid
    out as the Hub and the release serve them: the repository's files (no CLIP, no CLIP tokenizer) and the CLIP
    tokenizer repository in a huggingface_hub cache, ViT-L-14.pt in the kandinsky cache."""
    from unittest import mock

    from test_original_format import TINY, write_original

    from kandinsky.weights import original_hub

    root = tmp_path_factory.mktemp("original_hub")
    local = write_original(root / "Kandinsky_2.1", decoder_pipe, prior_pipe, inpaint_pipe, fp16_names=True)
    release = root / "repo"
    shutil.copytree(local, release, ignore=shutil.ignore_patterns("ViT-L-14.pt", "clip_tokenizer"))
    (release / "README.md").write_text("not read by the loader")
    cache = root / "hf" / "hub"
    cache_snapshot(cache, original_hub.ORIGINAL_REPO, release)
    cache_snapshot(cache, original_hub.CLIP_TOKENIZER_REPO, local / "clip_tokenizer")
    kandinsky_cache = root / "kandinsky-cache"
    with mock.patch.dict(os.environ, {"KANDINSKY_CACHE": str(kandinsky_cache)}):
        clip = original_hub.clip_path()
    clip.parent.mkdir(parents=True)
    shutil.copyfile(local / "ViT-L-14.pt", clip)
    home = root / "home"  # an empty home: no ~/.cache/clip of the `clip` package
    home.mkdir()
    env = {"KANDINSKY_CACHE": str(kandinsky_cache), "HOME": str(home)}
    return SimpleNamespace(local=local, release=release, cache=cache, env=env, tiny=TINY, root=root)


def _code(*parts: str) -> str:
    """Python source for :func:`_run` from indented parts, after a preamble."""
    preamble = """
        import json
        from kandinsky.weights import original_hub
        original_hub.BPE_PACKAGES = ()  # an installed `clip` package would supply the real vocabulary instead
    """
    return "".join(textwrap.dedent(part) for part in (preamble, *parts))


@pytest.mark.parametrize("offline", [True, False])
def test_original_release_by_hub_id_loads_without_network(original_release, offline):
    """The release's id, its shortcut at a commit and its old name load from the caches with every socket call
    blocked, and give the pipeline the local folder gives: same tensors, same images."""
    r = original_release
    proc = _run(_code(f"""
        import numpy as np
        import torch
        from kandinsky import Kandinsky21
        TINY = json.loads({json.dumps(r.tiny)!r})
        ref = Kandinsky21.from_pretrained(original="{r.local}", configs=TINY)
        kw = dict(width=64, height=64, steps=2, prior_steps=2, seed=4, output="np")
        want = ref.text_to_image("a red circle", **kw)
        for spec in ("ai-forever/Kandinsky_2.1", "kandinsky-2-1-original@{COMMIT}", "sberbank-ai/Kandinsky_2.1"):
            pipe = Kandinsky21.from_pretrained(original=spec, configs=TINY)
            assert "snapshots" in str(pipe.decoder.folder), pipe.decoder.folder
            for a, b in ((pipe.decoder.unet, ref.decoder.unet), (pipe.inpaint_model.unet, ref.inpaint_model.unet),
                         (pipe.prior.prior, ref.prior.prior), (pipe.prior.text_encoder, ref.prior.text_encoder),
                         (pipe.prior.image_encoder, ref.prior.image_encoder), (pipe.decoder.movq, ref.decoder.movq),
                         (pipe.decoder.text_encoder, ref.decoder.text_encoder)):
                sa, sb = a.state_dict(), b.state_dict()
                assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), spec
            assert pipe.prior.tokenizer.get_vocab() == ref.prior.tokenizer.get_vocab()
            assert np.array_equal(pipe.text_to_image("a red circle", **kw), want), spec
        print("ok", pipe.decoder.folder)
    """), r.cache, offline, r.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok" in proc.stdout


def test_original_release_through_the_jobs_layer_records_the_id(original_release):
    """`--original ID` in the jobs layer: the inpainting UNet is asked for only when the mode needs it, and the
    record keeps the id (so `--from` finds the same snapshot)."""
    r = original_release
    proc = _run(_code(f"""
        import functools
        from kandinsky import jobs
        from kandinsky.weights import original_format
        TINY = json.loads({json.dumps(r.tiny)!r})
        original_format.load_original = functools.partial(original_format.load_original, configs=TINY)
        choice = jobs.ModelChoice(original="kandinsky-2-1-original")
        loaded = jobs.load_pipeline(choice, ("decoder", "prior"))
        assert loaded.model["original"] == "kandinsky-2-1-original", loaded.model
        assert loaded.pipe.inpaint_model is None
        loaded = jobs.load_pipeline(choice, ("inpaint", "prior"))
        assert loaded.pipe.inpaint_model is not None
        try:
            jobs.load_pipeline(jobs.ModelChoice(original="kandinsky-2-1"), ("decoder", "prior"))
        except OSError as exc:
            print(exc)
    """), r.cache, True, r.env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kandinsky-community/kandinsky-2-1 is a diffusers-format repository" in proc.stdout


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection attempt in this process fails the test."""
    import socket

    def blocked(*a, **k):
        raise AssertionError("network access attempted")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, blocked)
    monkeypatch.setattr(socket, "create_connection", blocked)
    monkeypatch.setattr(socket, "getaddrinfo", blocked)


def test_original_release_missing_offline_says_what_to_download(original_release, tmp_path, monkeypatch,
                                                                no_network):
    """Offline, whatever is not cached is an error that names `kandinsky download original`: the snapshot, one
    file of it, OpenAI's CLIP (a file with the wrong checksum in the `clip` package's cache is not taken) and
    the CLIP tokenizer; nothing touches the network."""
    from huggingface_hub import constants

    from kandinsky.weights import original_format, original_hub

    r = original_release
    partial = tmp_path / "partial-hf"
    cache_snapshot(partial, "ai-forever/Kandinsky_2.1", r.release, commit="f" * 40)
    (partial / "models--ai-forever--Kandinsky_2.1" / "snapshots" / ("f" * 40) / "inpainting_fp16.ckpt").unlink()
    home = tmp_path / "home"
    (home / ".cache" / "clip").mkdir(parents=True)
    (home / ".cache" / "clip" / "ViT-L-14.pt").write_bytes(b"not OpenAI's file")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(original_hub, "BPE_PACKAGES", ())
    for key, value in r.env.items():
        monkeypatch.setenv(key, value)

    def error(cache: Path, **kw) -> str:
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        with pytest.raises(FileNotFoundError) as err:
            original_format.load_original(**kw)
        assert isinstance(err.value, original_hub.NotCached), repr(err.value)
        assert "HF_HUB_OFFLINE=1" in str(err.value) and "`kandinsky download original`" in str(err.value)
        return str(err.value)

    assert "ai-forever/Kandinsky_2.1 is not in the Hugging Face cache" in error(tmp_path / "empty-hf",
                                                                                   folder="ai-forever/Kandinsky_2.1")
    assert "ai-forever/Kandinsky_2.1 in the Hugging Face cache lacks inpainting_fp16.ckpt" in error(
        partial, folder="ai-forever/Kandinsky_2.1", inpaint=True)
    monkeypatch.setenv("KANDINSKY_CACHE", str(tmp_path / "no-kandinsky-cache"))
    monkeypatch.setenv("HOME", str(home))
    clip = error(partial, folder=f"ai-forever/Kandinsky_2.1@{'f' * 40}", inpaint=False)
    assert "OpenAI's CLIP ViT-L/14" in clip and original_hub.CLIP_URL in clip
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(r.local, no_tokenizer, ignore=shutil.ignore_patterns("clip_tokenizer"))
    tokenizer = error(tmp_path / "empty-hf", folder=no_tokenizer)
    assert "CLIP tokenizer" in tokenizer and "openai/clip-vit-large-patch14" in tokenizer
    assert "clip_tokenizer=" in tokenizer


def test_cli_download_original_offline(original_release, tmp_path):
    """`kandinsky download original` offline: where the cached files are; with nothing cached, exit status 2 and
    what to do."""
    r = original_release
    env = {**os.environ, **r.env, "HF_HUB_CACHE": str(r.cache), "HF_HUB_OFFLINE": "1"}

    def cli(*args, **extra):
        return subprocess.run([sys.executable, "-m", "kandinsky", *args], env={**env, **extra},
                              capture_output=True, text=True, timeout=300)

    proc = cli("download", "original", "--json")
    assert proc.returncode == 0, proc.stderr
    import json as _json

    folders = _json.loads(proc.stdout)["folders"]
    assert set(folders) == {"original", "clip", "clip_tokenizer"}
    assert "snapshots" in folders["original"] and folders["clip"].startswith(r.env["KANDINSKY_CACHE"])
    assert Path(folders["clip_tokenizer"]).parent.parent.name == "models--openai--clip-vit-large-patch14"
    proc = cli("download", "original", HF_HUB_CACHE=str(tmp_path / "empty"))
    assert proc.returncode == 2
    assert "ai-forever/Kandinsky_2.1 is not in the Hugging Face cache" in proc.stderr
    assert "kandinsky download original" in proc.stderr


def test_original_plan_and_ids():
    from kandinsky.weights import original_hub as oh

    assert oh.plan() == sorted(["decoder_fp16.ckpt", "prior_fp16.ckpt", "movq_final.ckpt", "ViT-L-14_stats.th",
                                *(f"text_encoder/{n}" for n in oh.TEXT_ENCODER_FILES)])
    assert "inpainting_fp16.ckpt" in oh.plan(inpaint=True)
    assert "decoder_fp16.ckpt" not in oh.plan(skip=["decoder"])
    assert not any(f.startswith("text_encoder/") for f in oh.plan(skip=["text_encoder"]))
    assert oh.parse("kandinsky-2-1-original@v1") == ("ai-forever/Kandinsky_2.1", "v1")
    assert oh.parse("sberbank-ai/Kandinsky_2.1") == ("ai-forever/Kandinsky_2.1", None)
    assert oh.parse("someone/kandinsky-2.1-copy") == ("someone/kandinsky-2.1-copy", None)
    for diffusers_id in ("kandinsky-2-1", "kandinsky-community/kandinsky-2-1-prior"):
        assert oh.parse(diffusers_id) is None
        with pytest.raises(hub.HubError, match="diffusers-format repository"):
            oh.check_spec(diffusers_id)
    with pytest.raises(hub.HubError, match="neither a local folder nor"):
        oh.check_spec("Kandinsky_2.1")


# ----------------------------------------------------------------------------------------------------------------
# the checksum-verified download (the transport replaced, the code under test as it is)


class FakeHTTP(urllib.request.BaseHandler):
    """Serves ``data`` for any http(s) URL, honouring ``Range: bytes=N-`` when ``ranges``."""

    handler_order = 100  # before urllib's own HTTP handlers

    def __init__(self, data: bytes, ranges: bool = True) -> None:
        self.data, self.ranges, self.seen = data, ranges, []

    def http_open(self, req):
        import email.message
        import io
        import urllib.response

        rng = req.get_header("Range")
        self.seen.append(rng)
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng and self.ranges else 0
        body = self.data[start:]
        headers = email.message.Message()
        headers["Content-Length"] = str(len(body))
        resp = urllib.response.addinfourl(io.BytesIO(body), headers, req.full_url, 206 if start else 200)
        resp.msg = "Partial Content" if start else "OK"
        return resp

    https_open = http_open


def test_download_refuses_a_wrong_checksum_and_leaves_nothing(tmp_path):
    from kandinsky.weights.original_hub import download_verified

    source = tmp_path / "ViT-L-14.pt"
    source.write_bytes(os.urandom(3000))
    target = tmp_path / "cache" / "ViT-L-14.pt"
    wrong = hashlib.sha256(b"another file").hexdigest()
    with pytest.raises(hub.HubError, match="SHA-256 .* not the published .*refused"):
        download_verified(source.as_uri(), wrong, target, progress=False)
    assert not target.exists() and not target.with_name("ViT-L-14.pt.part").exists()
    opener = urllib.request.build_opener(FakeHTTP(b"tampered" + source.read_bytes()))
    with pytest.raises(hub.HubError, match="refused"):
        download_verified("https://example.invalid/x/ViT-L-14.pt", hashlib.sha256(source.read_bytes()).hexdigest(),
                          target, progress=False, opener=opener)
    assert not target.exists() and not target.with_name("ViT-L-14.pt.part").exists()
    right = hashlib.sha256(source.read_bytes()).hexdigest()
    assert download_verified(source.as_uri(), right, target, progress=False).read_bytes() == source.read_bytes()


def test_download_resumes_a_partial_file(tmp_path):
    """A ``.part`` file left by an interrupted download is continued with a range request; a stale one (its bytes
    do not add up) is thrown away and the file fetched whole, once."""
    from kandinsky.weights.original_hub import download_verified

    data = os.urandom(5000)
    sha = hashlib.sha256(data).hexdigest()
    target = tmp_path / "f.pt"
    part = tmp_path / "f.pt.part"
    part.write_bytes(data[:1234])
    server = FakeHTTP(data)
    assert download_verified("https://h/f.pt", sha, target, progress=False,
                             opener=urllib.request.build_opener(server)).read_bytes() == data
    assert server.seen == ["bytes=1234-"] and not part.exists()

    target.unlink()
    part.write_bytes(b"x" * 100)  # not the file's first bytes
    server = FakeHTTP(data)
    assert download_verified("https://h/f.pt", sha, target, progress=False,
                             opener=urllib.request.build_opener(server)).read_bytes() == data
    assert server.seen == ["bytes=100-", None]
    target.unlink()
    part.write_bytes(data[:10])  # a server without ranges sends the whole file: no double bytes
    assert download_verified("https://h/f.pt", sha, target, progress=False,
                             opener=urllib.request.build_opener(FakeHTTP(data, ranges=False))).read_bytes() == data
