"""Batched txt2img (kandinsky.ray.batching, no Ray needed): every caller gets its own images, seeds and records, equal
to the same job run alone up to rounding, measured here on the bundled model.

Measured (CPU, float32, 1 thread): of 16 images batched four at a time, every record is identical, and the 8-bit
pixels differ from the job run alone by at most 1, in about 0.01% of the values (float rounding of the larger
matrix products); about half of the images are bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from kandinsky import jobs
from kandinsky.jobs import Job, ModelChoice
from kandinsky.ray.batching import batch_key, run_batched


@pytest.fixture(scope="module")
def loaded() -> Iterator[jobs.Loaded]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield jobs.load_pipeline(ModelChoice(), ("decoder", "prior"))
    finally:
        torch.set_num_threads(threads)


def _pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.mark.timeout(300)
def test_batched_equals_alone(loaded: jobs.Loaded) -> None:
    pipe, model = loaded
    batches = [
        [Job(prompt="a red cat", seed=1, steps=3, prior_steps=2, num=2),
         Job(prompt="a blue dog", negative="blurry", seed=7, steps=3, prior_steps=2),
         Job(prompt="a green tree", seed=5, steps=3, prior_steps=2, num=2, seed_per_image=True)],
        [Job(prompt=p, seed=40 + k, steps=4, prior_steps=1, sampler="dpmpp_2m")
         for k, p in enumerate(["a house by the sea", "blue sky", "an old man", "a yellow star"])],
    ]
    values = differing = worst = identical = 0
    for batch in batches:
        seen: list[tuple[int, str, int]] = []
        together = run_batched(pipe, batch, model,
                               lambda i, stage, done, total, lat, seen=seen: seen.append((i, stage, done)))
        assert len(together) == len(batch)
        for i, (job, outputs) in enumerate(zip(batch, together, strict=True)):
            alone = jobs.run(pipe, job, model=model)
            assert [o.record for o in outputs] == [o.record for o in alone]  # seeds, indexes, sizes: its own
            for got, want in zip(outputs, alone, strict=True):
                d = np.abs(_pixels(got.image) - _pixels(want.image))
                values, differing, worst = values + d.size, differing + int((d > 0).sum()), max(worst, int(d.max()))
                identical += int(d.max() == 0)
            assert (i, "prior", 1) in seen and (i, "decoder", job.steps) in seen  # each caller's progress
    assert worst <= 1 and differing / values < 0.002, (worst, differing, values)
    assert identical >= 1, identical  # of 9 (about half, measured)


@pytest.mark.timeout(60)
def test_only_compatible_jobs_batch(loaded: jobs.Loaded) -> None:
    pipe, _ = loaded
    base = Job(prompt="x", seed=1, steps=3)
    assert batch_key(pipe, base) == batch_key(pipe, base.replace(prompt="y", seed=9, negative="z", num=2))
    assert batch_key(pipe, base) != batch_key(pipe, base.replace(steps=4))
    assert batch_key(pipe, base.replace(sampler="ddpm")) is None  # draws noise every step
    assert batch_key(pipe, base.replace(mode="variations")) is None
    assert batch_key(pipe, base.replace(loras=[("some/adapter", 1.0)])) is None  # adapters are per call
    with pytest.raises(ValueError, match="equal sizes"):
        run_batched(pipe, [base, base.replace(width=128)])
