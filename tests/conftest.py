"""Shared fixtures: tiny diffusers pipelines saved in the published folder layout, built once per session."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "KANDINSKY_CACHE" not in os.environ:  # precision choices and converted weights: never the user's cache
    import tempfile

    os.environ["KANDINSKY_CACHE"] = tempfile.mkdtemp(prefix="kandinsky-test-cache-")
warnings.filterwarnings("ignore")

import tiny  # noqa: E402


def _silence_progress(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def prior_pipe(tmp_path_factory):
    """(diffusers prior pipeline, saved folder) for tiny prior config "a"."""
    folder = tmp_path_factory.mktemp("prior_a")
    pipe = _silence_progress(tiny.build_prior_pipeline(folder / "_tok", "a"))
    return pipe, tiny.save_prior(pipe, folder / "model")


@pytest.fixture(scope="session")
def decoder_pipe(tmp_path_factory):
    """(diffusers decoder pipeline, saved folder) for tiny UNet config "a"."""
    folder = tmp_path_factory.mktemp("decoder_a")
    pipe = _silence_progress(tiny.build_decoder_pipeline("a"))
    return pipe, tiny.save_decoder(pipe, folder / "model")


@pytest.fixture(scope="session")
def inpaint_pipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inpaint_a")
    pipe = _silence_progress(tiny.build_decoder_pipeline("a", seed=5, inpaint=True))
    return pipe, tiny.save_decoder(pipe, folder / "model")


@pytest.fixture(scope="session")
def ours(prior_pipe, decoder_pipe, inpaint_pipe):
    from kandinsky import Kandinsky21

    return Kandinsky21.from_pretrained(decoder=decoder_pipe[1], prior=prior_pipe[1], inpaint=inpaint_pipe[1])


def run_threads(fn, threads: int):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def assert_matches(ours, reference_fn, base: float = 1e-4):
    """Compare ``ours`` with a diffusers computation.

    Random tiny models amplify float rounding, so the reference is run with 1 and with 2 torch threads; the
    tolerance is ``base`` or 10 × that measured self-disagreement, whichever is larger. Returns the reference.
    """
    one = run_threads(reference_fn, 1)
    two = run_threads(reference_fn, 2)
    flat = [(o, a, b) for o, a, b in zip(_leaves(ours), _leaves(one), _leaves(two), strict=True)]
    for o, a, b in flat:
        floor = float((a - b).abs().max())
        tol = max(base, 10 * floor)
        assert o.shape == b.shape, f"shape {tuple(o.shape)} != reference {tuple(b.shape)}"
        diff = float((o - b).abs().max())
        assert diff <= tol, f"max abs diff {diff:.3g} > tolerance {tol:.3g} (diffusers' own floor {floor:.3g})"
    return two


def _leaves(x):
    if isinstance(x, tuple | list):
        return [t for item in x for t in _leaves(item)]
    return [torch.as_tensor(x).float()]


@pytest.fixture(params=["fast", "plain"])
def fast_paths(request):
    """Run a test once with the CPU fast paths (where this CPU has them) and once with plain PyTorch layers.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("fast_paths")``.
    """
    from kandinsky.models import fastpath

    fastpath.set_enabled(request.param == "fast")
    try:
        yield request.param
    finally:
        fastpath.set_enabled(None)


@pytest.fixture(scope="module")
def bundled():
    """The bundled model's ``jobs.Loaded`` (decoder, prior and inpainting decoder) on one torch thread (faster on
    2 busy cores, and as deterministic)."""
    from kandinsky import jobs

    if not jobs.bundled_inpaint():
        pytest.skip("no bundled model")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield jobs.load_pipeline(jobs.ModelChoice(), ("decoder", "prior", "inpaint"))
    torch.set_num_threads(old)
