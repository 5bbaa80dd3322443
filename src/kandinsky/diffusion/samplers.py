"""Samplers: short functions of a denoiser, independent of any model.

A denoiser is ``denoiser(x_t, t) -> output``: for the decoder the (already guided) UNet output, whose first
``x.shape[1]`` channels are epsilon and whose optional remaining channels are the learned-range variance value;
for the prior the predicted clean sample x0. Every sampler takes the timesteps it walks (descending) and returns
the final sample. ``callback(i, t, x)`` is called after each step. Noise is drawn exactly as diffusers'
``randn_tensor`` does, so a ``torch.Generator`` gives the same stream here and there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from .schedules import NoiseSchedule

Denoiser = Callable[[torch.Tensor, int], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor], None] | None

# the multistep solvers, each with diffusers' default sigmas, Karras (``_karras``) or exponential (``_exponential``)
SOLVERS = ("dpmpp_2m", "dpmpp_2m_sde", "unipc", "unipc3")
SAMPLERS = ("ddim", "ddpm", "p_sampler",
            "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_exponential",
            "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "dpmpp_2m_sde_exponential",
            "unipc", "unipc_karras", "unipc_exponential",
            "unipc3", "unipc3_karras", "unipc3_exponential")


def randn(shape: Sequence[int], generator: torch.Generator | None, dtype: torch.dtype,
          device: torch.device | str) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved (diffusers ``randn_tensor``)."""
    draw_device = generator.device if generator is not None else torch.device(device)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=draw_device).to(device)


def _alpha(schedule: NoiseSchedule, t: int, fallback: torch.Tensor | float = 1.0) -> torch.Tensor:
    """ᾱ_t as a 0-d float32 tensor, or ``fallback`` for t < 0."""
    if t >= 0:
        return schedule.alphas_cumprod[t]
    return fallback if isinstance(fallback, torch.Tensor) else torch.tensor(fallback)


def _split(out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if out.shape[1] == 2 * channels:
        return out[:, :channels], out[:, channels:]
    return out[:, :channels], None


def _posterior(x0: torch.Tensor, x: torch.Tensor, a: torch.Tensor, a_prev: torch.Tensor, beta: torch.Tensor,
               alpha: torch.Tensor) -> torch.Tensor:
    """Mean of q(x_prev | x_t, x0) for a (possibly respaced) step with step-beta ``beta`` = 1 - ``alpha``."""
    return (a_prev**0.5 * beta) / (1 - a) * x0 + alpha**0.5 * (1 - a_prev) / (1 - a) * x


def _log_variance(v: torch.Tensor | None, a: torch.Tensor, a_prev: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Log-variance of a step: the posterior β̃ (clamped ≥ 1e-20), or with learned-range values ``v`` the
    interpolation between log β̃ (frac 0) and log β (frac 1), frac = (v + 1) / 2."""
    posterior = torch.clamp((1 - a_prev) / (1 - a) * beta, min=1e-20)
    if v is None:
        return torch.log(posterior)
    frac = (v + 1) / 2
    return frac * torch.log(beta) + (1 - frac) * torch.log(posterior)


def ddim(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], *,
         final_alpha_cumprod: torch.Tensor | None = None, callback: Callback = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0), as diffusers' DDIMScheduler; the last step goes to ``final_alpha_cumprod``
    (ᾱ_0 with ``set_alpha_to_one=False``, the published config)."""
    final = schedule.alphas_cumprod[0] if final_alpha_cumprod is None else final_alpha_cumprod
    channels = x.shape[1]
    for i, t in enumerate(timesteps):
        eps, _ = _split(denoiser(x, t), channels)
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a, a_prev = schedule.alphas_cumprod[t], _alpha(schedule, prev, final)
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        x = a_prev**0.5 * x0 + (1 - a_prev - 0.0) ** 0.5 * eps
        if callback is not None:
            callback(i, t, x)
    return x


def _threshold_per_row(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen) with a per-row quantile clamped to [1, max_value], computed in fp32."""
    dtype, shape = x0.dtype, x0.shape
    flat = x0.float().reshape(shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(shape).to(dtype)


def _ancestral(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int],
               generator: torch.Generator | None, fix_x0: Callable[[torch.Tensor], torch.Tensor],
               noise_every_step: bool, callback: Callback) -> torch.Tensor:
    """Ancestral sampling over (possibly respaced) steps: ε → x̂0, ``fix_x0``, posterior mean, plus noise with
    the step's (learned-range) variance while t > 0. ``noise_every_step`` also draws (unused) noise at t = 0."""
    channels = x.shape[1]
    for i, t in enumerate(timesteps):
        eps, v = _split(denoiser(x, t), channels)
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a, a_prev = schedule.alphas_cumprod[t], _alpha(schedule, prev)
        alpha = a / a_prev
        beta = 1 - alpha
        x0 = fix_x0((x - (1 - a) ** 0.5 * eps) / a**0.5)
        mean = _posterior(x0, x, a, a_prev, beta, alpha)
        if t > 0 or noise_every_step:
            dtype = torch.float32 if noise_every_step else eps.dtype
            noise = randn(eps.shape, generator, dtype, eps.device).to(eps.dtype)
            if t > 0:
                mean = mean + torch.exp(0.5 * _log_variance(v, a, a_prev, beta)) * noise
        x = mean
        if callback is not None:
            callback(i, t, x)
    return x


def ddpm(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], *,
         generator: torch.Generator | None = None, thresholding: bool = True, threshold_ratio: float = 0.995,
         sample_max_value: float = 2.0, callback: Callback = None) -> torch.Tensor:
    """Ancestral DDPM with learned-range variance, as diffusers' DDPMScheduler with the ``ddpm_scheduler``
    config of kandinsky-2-1 (per-row dynamic thresholding, no pre-clamp, no noise at t = 0)."""

    def fix_x0(x0: torch.Tensor) -> torch.Tensor:
        return _threshold_per_row(x0, threshold_ratio, sample_max_value) if thresholding else x0

    return _ancestral(denoiser, x, schedule, timesteps, generator, fix_x0, False, callback)


def p_sampler(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], *,
              generator: torch.Generator | None = None, clamp: float = 2.0, percentile: float = 0.995,
              known: tuple[torch.Tensor, torch.Tensor] | None = None, callback: Callback = None) -> torch.Tensor:
    """The original repository's decoder sampler: respaced ancestral DDPM with learned-range variance.

    x̂0 is clamped to ±``clamp``, then (inpainting) the known region is pasted from ``known = (z_init, keep)``,
    then thresholded by the ``percentile`` of batch row 0's |x̂0| (at least 1). Noise is drawn at every step,
    including the last, where it is not used.
    """

    def fix_x0(x0: torch.Tensor) -> torch.Tensor:
        x0 = x0.clamp(-clamp, clamp)
        if known is not None:
            z_init, keep = known
            x0 = x0 * (1 - keep) + z_init * keep
        s = torch.quantile(x0[0].float().abs().flatten(), percentile).clamp(min=1).to(x0.dtype)
        return x0.clamp(-s, s) / s

    return _ancestral(denoiser, x, schedule, timesteps, generator, fix_x0, True, callback)


def _sigmas_at(schedule: NoiseSchedule, timesteps: Sequence[int], sigmas: torch.Tensor | None) -> torch.Tensor:
    """The solver's sigmas: given (S + 1 values), or the schedule's at ``timesteps`` followed by 0 (float32)."""
    if sigmas is not None:
        if len(sigmas) != len(timesteps) + 1:
            raise ValueError(f"{len(timesteps)} timesteps need {len(timesteps) + 1} sigmas, got {len(sigmas)}")
        return sigmas.to(torch.float32)
    ac = schedule.alphas_cumprod
    at = ac[torch.as_tensor(list(timesteps), dtype=torch.long)]
    return torch.cat([((1 - at) / at) ** 0.5, torch.zeros(1)])


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t, σ_t) of the VP process at sigma = σ_t / α_t (0-d float32, diffusers' arithmetic)."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR λ = log α - log σ (+inf at sigma = 0)."""
    alpha, s = _alpha_sigma(sigma)
    return torch.log(alpha) - torch.log(s)


def dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], *,
             sigmas: torch.Tensor | None = None, callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), as diffusers' DPMSolverMultistepScheduler with its defaults
    (midpoint, first-order first and last steps, final sigma 0).

    ``sigmas`` (S + 1 values, from :func:`~kandinsky.diffusion.schedules.solver_sigmas`) are where the solver
    steps, e.g. Karras-spaced; by default the schedule's sigmas at ``timesteps``. Deterministic; the last step
    returns the final clean-sample estimate.
    """
    return _dpmpp_2m(denoiser, x, schedule, timesteps, sigmas, False, None, callback)


def dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], *,
                 sigmas: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, as diffusers' DPMSolverMultistepScheduler with ``algorithm_type="sde-dpmsolver++"``
    (midpoint): the data-prediction update of the SDE, which keeps e^-h of the sample's noise and draws the rest
    afresh (float32 noise from ``generator`` at every step, the last included, where its weight is 0)."""
    return _dpmpp_2m(denoiser, x, schedule, timesteps, sigmas, True, generator, callback)


def _dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int],
              sigmas: torch.Tensor | None, sde: bool, generator: torch.Generator | None,
              callback: Callback) -> torch.Tensor:
    """DPM-Solver++(2M): the ODE solver, or with ``sde`` the SDE solver (noise from ``generator``)."""
    sig = _sigmas_at(schedule, timesteps, sigmas)
    channels, dtype = x.shape[1], x.dtype
    prev_x0: torch.Tensor | None = None
    for i, t in enumerate(timesteps):
        eps, _ = _split(denoiser(x, t), channels)
        alpha_s, sigma_s = _alpha_sigma(sig[i])
        x0 = (x - sigma_s * eps) / alpha_s
        alpha_t, sigma_t = _alpha_sigma(sig[i + 1])
        h = _lambda(sig[i + 1]) - _lambda(sig[i])
        xf = x.to(torch.float32)
        second = prev_x0 is not None and i + 1 < len(timesteps)
        d1 = (1.0 / ((_lambda(sig[i]) - _lambda(sig[i - 1])) / h)) * (x0 - prev_x0) if second else None
        if sde:
            noise = randn(eps.shape, generator, torch.float32, eps.device)
            decay = 1 - torch.exp(-2.0 * h)
            x = (sigma_t / sigma_s * torch.exp(-h)) * xf + (alpha_t * decay) * x0
            if d1 is not None:
                x = x + 0.5 * (alpha_t * decay) * d1
            x = x + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        else:
            phi = alpha_t * (torch.exp(-h) - 1.0)
            x = (sigma_t / sigma_s) * xf - phi * x0
            if d1 is not None:
                x = x - 0.5 * phi * d1
        x = x.to(dtype)
        prev_x0 = x0
        if callback is not None:
            callback(i, t, x)
    return x


def _bh2(h: torch.Tensor, rks: list[torch.Tensor], order: int) -> tuple[torch.Tensor, ...]:
    """UniPC's B(h) = e^h - 1 ("bh2") coefficients in data-prediction form: (R, b, h·φ₁, B(h))."""
    r = torch.stack([*rks, torch.ones(())])
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = torch.expm1(hh)
    rows, b, factorial = [], [], 1
    for i in range(1, order + 1):
        rows.append(torch.pow(r, i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(rows), torch.stack(b), h_phi_1, b_h


def _unipc_update(x: torch.Tensor, m: list[torch.Tensor], sig: torch.Tensor, t_index: int, s_index: int,
                  order: int, model_t: torch.Tensor | None = None) -> torch.Tensor:
    """One UniP (predictor, ``model_t`` None) or UniC (corrector with the new model output ``model_t``) step
    of ``order`` from sigma index ``s_index`` to ``t_index``; ``m`` holds the data predictions at the sigma
    indices up to ``s_index``, the newest (at s) last."""
    alpha_t, sigma_t = _alpha_sigma(sig[t_index])
    _, sigma_s0 = _alpha_sigma(sig[s_index])
    lambda_s0 = _lambda(sig[s_index])
    h = _lambda(sig[t_index]) - lambda_s0
    m0 = m[-1]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (_lambda(sig[s_index - k]) - lambda_s0) / h
        rks.append(rk)
        d1s.append((m[-(k + 1)] - m0) / rk)
    r, b, h_phi_1, b_h = _bh2(h, rks, order)
    d1 = torch.stack(d1s, dim=1) if d1s else None
    x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    if model_t is None:  # predictor
        if d1 is None:
            return x_t.to(x.dtype)
        if order == 2:
            rhos = torch.ones(1, dtype=x.dtype) * 0.5
        else:
            rhos = torch.linalg.solve(r[:-1, :-1], b[:-1]).to(x.dtype)
        rhos = rhos.to(x.device)
        return (x_t - alpha_t * b_h * torch.einsum("k,bkc...->bc...", rhos, d1)).to(x.dtype)
    rhos = torch.ones(1, dtype=x.dtype) * 0.5 if order == 1 else torch.linalg.solve(r, b).to(x.dtype)
    rhos = rhos.to(x.device)
    corr = torch.einsum("k,bkc...->bc...", rhos[:-1], d1) if d1 is not None else 0
    return (x_t - alpha_t * b_h * (corr + rhos[-1] * (model_t - m0))).to(x.dtype)


def unipc(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], *,
          sigmas: torch.Tensor | None = None, order: int = 2, callback: Callback = None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), as diffusers' UniPCMultistepScheduler with its defaults: B(h) = e^h - 1,
    data prediction, the corrector after every model call, lower order at the start and the end; ``order`` is
    its ``solver_order`` (2, the default, or 3: UniPC-3 uses the last three data predictions).

    One model call per step (the corrector reuses the next step's call). ``sigmas`` as for :func:`dpmpp_2m`.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order!r}")
    sig = _sigmas_at(schedule, timesteps, sigmas)
    channels, n = x.shape[1], len(timesteps)
    m: list[torch.Tensor] = []
    last_sample: torch.Tensor | None = None
    this_order = 0
    for i, t in enumerate(timesteps):
        eps, _ = _split(denoiser(x, t), channels)
        alpha_s, sigma_s = _alpha_sigma(sig[i])
        m_new = (x - sigma_s * eps) / alpha_s
        if last_sample is not None:  # correct the sample this output was computed at
            x = _unipc_update(last_sample, m, sig, i, i - 1, this_order, model_t=m_new)
        m = [*m, m_new][-order:]
        this_order = min(order, n - i, i + 1)
        last_sample = x
        x = _unipc_update(x, m, sig, i + 1, i, this_order)
        if callback is not None:
            callback(i, t, x)
    return x


def multistep(name: str, generator: torch.Generator | None = None) -> tuple[Callable[..., torch.Tensor], str]:
    """A multistep sampler name of :data:`SAMPLERS` (a :data:`SOLVERS` entry, optionally ``_karras`` or
    ``_exponential``) as ``(solver, spacing)``: the solver function, called ``solver(denoiser, x, schedule,
    timesteps, sigmas=..., callback=...)`` (``generator`` bound where it draws noise), and the sigma spacing
    for :func:`~kandinsky.diffusion.schedules.solver_sigmas`."""
    base, spacing = name, "linspace"
    for suffix in ("karras", "exponential"):
        if name.endswith("_" + suffix):
            base, spacing = name[: -len(suffix) - 1], suffix
    if name not in SAMPLERS or base not in SOLVERS:
        raise ValueError(f"{name!r} is not a multistep sampler; choose one of "
                         f"{', '.join(s for s in SAMPLERS if s.startswith(SOLVERS))}")
    solver = {"dpmpp_2m": dpmpp_2m, "dpmpp_2m_sde": functools.partial(dpmpp_2m_sde, generator=generator),
              "unipc": unipc, "unipc3": functools.partial(unipc, order=3)}[base]
    return solver, spacing


def unclip(denoiser: Denoiser, x: torch.Tensor, schedule: NoiseSchedule, timesteps: Sequence[int], *,
           generator: torch.Generator | None = None, clip_range: float = 10.0,
           callback: Callback = None) -> torch.Tensor:
    """The prior's ancestral sampler, as diffusers' UnCLIPScheduler (x0-prediction, fixed-small-log variance,
    x̂0 clamped to ±``clip_range``, no noise at t = 0)."""
    one = torch.tensor(1.0)
    for i, t in enumerate(timesteps):
        x0 = denoiser(x, t)
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else t - 1
        a, a_prev = schedule.alphas_cumprod[t], _alpha(schedule, prev, one)
        if prev == t - 1:
            beta, alpha = schedule.betas[t], 1 - schedule.betas[t]
        else:
            beta = 1 - a / a_prev
            alpha = 1 - beta
        x0 = torch.clamp(x0, -clip_range, clip_range)
        mean = _posterior(x0, x, a, a_prev, beta, alpha)
        if t > 0:
            noise = randn(x0.shape, generator, x0.dtype, x0.device)
            mean = mean + torch.exp(0.5 * _log_variance(None, a, a_prev, beta)) * noise
        x = mean
        if callback is not None:
            callback(i, t, x)
    return x
