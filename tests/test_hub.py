"""Hub ids resolve through huggingface_hub's own cache, offline, without touching the network."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


def _run(code: str, cache: Path, offline: bool = True) -> subprocess.CompletedProcess:
    guard = textwrap.dedent("""
        import socket
        def _blocked(*a, **k):
            raise AssertionError("network access attempted")
        socket.socket.connect = socket.socket.connect_ex = _blocked
        socket.create_connection = socket.getaddrinfo = _blocked
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
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
