"""Schedules and samplers against the published reference values and diffusers' schedulers."""

from __future__ import annotations

import pytest
import torch

from kandinsky.diffusion import samplers
from kandinsky.diffusion.schedules import (
    NoiseSchedule,
    decoder_schedule,
    img2img_noise_schedule,
    karras_timesteps,
    leading_timesteps,
    linspace_timesteps,
    prior_schedule,
    solver_sigmas,
    solver_timesteps,
    spaced_timesteps,
)


def test_reference_values():
    ac = decoder_schedule().alphas_cumprod
    assert ac[0].item() == pytest.approx(0.99915, abs=1e-6)
    assert ac[299].item() == pytest.approx(0.46923, abs=1e-5)
    assert ac[999].item() == pytest.approx(0.0015790, abs=1e-6)
    assert img2img_noise_schedule().alphas_cumprod[299].item() == pytest.approx(0.3964, abs=1e-4)


def test_timestep_sets():
    assert leading_timesteps(100, offset=1)[:3] == [991, 981, 971] and leading_timesteps(100, offset=1)[-1] == 1
    assert spaced_timesteps(25)[:4] == [999, 957, 916, 874] and spaced_timesteps(25)[-2:] == [42, 0]
    assert spaced_timesteps(5) == [999, 749, 500, 250, 0]
    assert spaced_timesteps(1) == [0]
    assert linspace_timesteps(4) == [999, 666, 333, 0]
    ks = karras_timesteps(10, decoder_schedule())
    assert ks == sorted(ks, reverse=True) and len(set(ks)) == len(ks) and ks[0] == 999


@pytest.mark.parametrize("bad", [0, -3, 1001, 2.5, "10", True])
def test_bad_steps(bad):
    with pytest.raises(ValueError, match="steps"):
        leading_timesteps(bad)


def test_schedules_match_diffusers():
    from diffusers import DDIMScheduler, UnCLIPScheduler

    d = DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012)
    assert torch.equal(decoder_schedule().alphas_cumprod, d.alphas_cumprod)
    u = UnCLIPScheduler()
    assert torch.equal(prior_schedule().alphas_cumprod, u.alphas_cumprod)
    assert torch.equal(prior_schedule().betas, u.betas)


def _toy_eps(x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic stand-in denoiser with learned-range variance channels."""
    eps = torch.tanh(x * 0.7 + t / 1000.0)
    return torch.cat([eps, torch.tanh(x * 0.3)], dim=1)


def test_ddim_and_ddpm_bitwise_like_diffusers():
    from diffusers import DDIMScheduler, DDPMScheduler

    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ddim = DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False,
                         steps_offset=1, clip_sample=False)
    ddim.set_timesteps(20)
    x = x0.clone()
    for t in ddim.timesteps:
        x = ddim.step(_toy_eps(x, int(t))[:, :4], t, x).prev_sample
    ours = samplers.ddim(_toy_eps, x0.clone(), decoder_schedule(), leading_timesteps(20, offset=1))
    assert torch.equal(ours, x)

    ddpm = DDPMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, variance_type="learned_range",
                         thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=2.0,
                         clip_sample=False)
    ddpm.set_timesteps(15)
    g = torch.Generator().manual_seed(1)
    x = x0.clone()
    for t in ddpm.timesteps:
        x = ddpm.step(_toy_eps(x, int(t)), t, x, generator=g).prev_sample
    ours = samplers.ddpm(_toy_eps, x0.clone(), decoder_schedule(), leading_timesteps(15),
                         generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ours, x, atol=1e-6, rtol=0)


def test_unclip_matches_diffusers():
    from diffusers import UnCLIPScheduler

    sched = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", clip_sample=True,
                            clip_sample_range=10.0)
    sched.set_timesteps(7)

    def model(x, t):
        return torch.sin(x * 3) * 4 + t / 300.0

    x0 = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(5)
    x = x0.clone()
    ts = sched.timesteps
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else None
        x = sched.step(model(x, int(t)), t, x, prev_timestep=prev, generator=g).prev_sample
    ours = samplers.unclip(model, x0.clone(), prior_schedule(), spaced_timesteps(7),
                           generator=torch.Generator().manual_seed(5))
    assert torch.allclose(ours, x, atol=1e-6, rtol=0)


def test_p_sampler_clamps_thresholds_and_pastes():
    schedule = decoder_schedule()
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3)) * 3
    z_init = torch.full((2, 4, 6, 6), 0.5)
    keep = torch.zeros(2, 1, 6, 6)
    keep[..., :3] = 1
    seen = []

    def denoiser(x_t, t):
        seen.append(t)
        return torch.cat([torch.zeros_like(x_t), torch.zeros_like(x_t)], dim=1)

    out = samplers.p_sampler(denoiser, x, schedule, spaced_timesteps(5), generator=torch.Generator().manual_seed(0),
                             known=(z_init, keep))
    assert seen == [999, 749, 500, 250, 0]
    # with ε = 0 the last step returns the pasted x̂0 divided by the row-0 threshold s >= 1
    kept = out[..., :3]
    assert torch.allclose(kept, kept.flatten()[0].expand_as(kept)) and 0 < kept.flatten()[0] <= 0.5
    assert out.abs().max() <= 1.0 + 1e-6


def test_dpmpp_2m_recovers_known_x0():
    """With an oracle ε for a fixed x0, DPM-Solver++ lands on x0 exactly."""
    schedule = decoder_schedule()
    target = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(4))
    ac = schedule.alphas_cumprod

    def oracle(x, t):
        return (x - ac[t].sqrt() * target) / (1 - ac[t]).sqrt()

    x = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(6))
    out = samplers.dpmpp_2m(oracle, x * (1 - ac[999]).sqrt() + ac[999].sqrt() * target, schedule,
                            linspace_timesteps(8))
    assert torch.allclose(out, target, atol=1e-4)


def test_add_noise_matches_formula():
    s = NoiseSchedule.linear(0.0001, 0.02)
    x0, noise = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    out = s.add_noise(x0, noise, torch.tensor([0, 298]))
    assert out[1].mean().item() == pytest.approx(s.alphas_cumprod[298].sqrt().item(), rel=1e-6)


@pytest.mark.parametrize("spacing", ["linspace", "karras", "exponential"])
@pytest.mark.parametrize("kind", ["dpmpp_2m", "dpmpp_2m_sde", "unipc", "unipc3"])
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20])
def test_multistep_solvers_match_diffusers(kind, spacing, steps):
    """DPM-Solver++(2M) (ODE and SDE) and UniPC (order 2 and 3), with default, Karras or exponential sigmas, step
    for step like diffusers' schedulers (the SDE with the same noise stream)."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    options = {"use_karras_sigmas": spacing == "karras", "use_exponential_sigmas": spacing == "exponential"}
    if kind.startswith("dpmpp_2m"):
        algorithm = "sde-dpmsolver++" if kind == "dpmpp_2m_sde" else "dpmsolver++"
        sched = DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                                            algorithm_type=algorithm, **options)
    else:
        sched = UniPCMultistepScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                                        solver_order=3 if kind == "unipc3" else 2, **options)
    sched.set_timesteps(steps)
    timesteps, sigmas = solver_sigmas(decoder_schedule(), steps, spacing=spacing)
    assert timesteps == [int(t) for t in sched.timesteps]
    assert torch.equal(sigmas, sched.sigmas)

    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    x = x0.clone()
    g = torch.Generator().manual_seed(11)
    for t in sched.timesteps:
        extra = {"generator": g} if kind == "dpmpp_2m_sde" else {}
        x = sched.step(_toy_eps(x, int(t))[:, :4], t, x, **extra).prev_sample
    solver, solver_spacing = samplers.multistep(kind if spacing == "linspace" else f"{kind}_{spacing}",
                                                generator=torch.Generator().manual_seed(11))
    assert solver_spacing == spacing
    seen = []
    ours = solver(_toy_eps, x0.clone(), decoder_schedule(), timesteps, sigmas=sigmas,
                  callback=lambda i, t, z: seen.append(t))
    assert seen == timesteps
    assert torch.allclose(ours, x, atol=1e-5, rtol=1e-5), (ours - x).abs().max()


def test_multistep_names():
    """Every multistep sampler name resolves to its solver and spacing; the others are refused."""
    names = [s for s in samplers.SAMPLERS if s not in ("ddim", "ddpm", "p_sampler")]
    assert len(names) == len(samplers.SOLVERS) * 3
    assert samplers.multistep("unipc")[1] == "linspace" and samplers.multistep("dpmpp_2m_sde_karras")[1] == "karras"
    assert samplers.multistep("unipc3_exponential")[1] == "exponential"
    for bad in ("ddim", "unipc4", "unipc_karras_karras", "karras", "dpmpp_2m_exp"):
        with pytest.raises(ValueError, match="multistep"):
            samplers.multistep(bad)
    with pytest.raises(ValueError, match="spacing"):
        solver_sigmas(decoder_schedule(), 5, spacing="cosine")
    with pytest.raises(ValueError, match="order"):
        samplers.unipc(_toy_eps, torch.zeros(1, 4, 2, 2), decoder_schedule(), [999, 0], order=4)


def test_sde_solver_draws_its_noise_from_the_generator():
    """The SDE solver is reproducible per generator seed, differs between seeds, and differs from the ODE."""
    timesteps, sigmas = solver_sigmas(decoder_schedule(), 8, spacing="karras")
    x0 = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(2))

    def run(seed):
        return samplers.dpmpp_2m_sde(_toy_eps, x0.clone(), decoder_schedule(), timesteps, sigmas=sigmas,
                                     generator=torch.Generator().manual_seed(seed))

    ode = samplers.dpmpp_2m(_toy_eps, x0.clone(), decoder_schedule(), timesteps, sigmas=sigmas)
    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1), atol=1e-3) and not torch.allclose(run(0), ode, atol=1e-3)


def test_solver_timesteps_default_sigmas():
    """Without explicit sigmas the solvers use the schedule's sigmas at the timesteps (diffusers' default)."""
    timesteps, sigmas = solver_sigmas(decoder_schedule(), 9)
    assert timesteps == solver_timesteps(9) and sigmas[-1] == 0
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    for sampler in (samplers.dpmpp_2m, samplers.unipc, samplers.multistep("unipc3")[0]):
        a = sampler(_toy_eps, x0.clone(), decoder_schedule(), timesteps)
        b = sampler(_toy_eps, x0.clone(), decoder_schedule(), timesteps, sigmas=sigmas)
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="sigmas"):
        samplers.unipc(_toy_eps, x0, decoder_schedule(), timesteps, sigmas=sigmas[:-1])


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_recovers_known_x0(order):
    schedule = decoder_schedule()
    target = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(4))
    ac = schedule.alphas_cumprod

    def oracle(x, t):
        return (x - ac[t].sqrt() * target) / (1 - ac[t]).sqrt()

    timesteps, sigmas = solver_sigmas(schedule, 6, karras=True)
    x = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(6))
    # the oracle is exact at integer timesteps; Karras sigmas are continuous, so start on the model's own sigma
    out = samplers.unipc(oracle, x * (1 - ac[999]).sqrt() + ac[999].sqrt() * target, schedule, timesteps,
                         order=order)
    assert torch.allclose(out, target, atol=1e-4)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde_karras", "unipc3_exponential"])
def test_new_solvers_in_the_pipeline_match_diffusers(ours, decoder_pipe, prior_pipe, sampler):
    """The pipeline runs the new names as diffusers' KandinskyPipeline with the matching scheduler, latents step for
    step; the SDE draws its step noise from the call's generator after the initial latents, as diffusers does.
    (Latents, not images: the tiny random MoVQ turns their float rounding into visible differences.)"""
    from diffusers import DPMSolverMultistepScheduler
    from test_speed_features import _embeds, _gen, _UniPC

    emb, neg = _embeds(prior_pipe)
    kw = dict(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas="karras" in sampler,
              use_exponential_sigmas="exponential" in sampler)
    if sampler.startswith("dpm"):
        scheduler = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", **kw)
    else:
        scheduler = _UniPC.make(solver_order=3, **kw)
    pipe = decoder_pipe[0]
    old = pipe.scheduler
    pipe.scheduler = scheduler
    expected, got = [], []

    def progress(stage, done, total, latents=None):
        if stage == "decoder":
            got.append(latents.clone())

    progress.wants_latents = True
    try:
        pipe("a red circle", image_embeds=emb, negative_image_embeds=neg, height=64, width=64,
             num_inference_steps=5, generator=_gen(1), output_type="np",
             callback=lambda i, t, latents: expected.append(latents.clone()))
        ours.set_progress(progress)
        ours.text_to_image("a red circle", image_embeds=emb, negative_image_embeds=neg, height=64, width=64,
                           steps=5, sampler=sampler, seed=1, output="np")
    finally:
        pipe.scheduler = old
        ours.set_progress(False)
    assert len(got) == len(expected) == 5
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-5 * float(b.abs().max()), rtol=0), (a - b).abs().max()
