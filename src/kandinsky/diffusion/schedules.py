"""Noise schedules and timestep selections used by Kandinsky 2.1.

Arithmetic follows diffusers bit for bit where it matters for seed parity (float32 tables, numpy rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete diffusion schedule: per-step betas and their cumulative alpha products (float32)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> NoiseSchedule:
        betas = betas.to(torch.float32)
        return cls(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def linear(cls, beta_start: float, beta_end: float, num_train_timesteps: int = 1000) -> NoiseSchedule:
        """Betas linear in beta (the decoder's schedule; not Stable Diffusion's scaled-linear)."""
        return cls.from_betas(torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32))

    @classmethod
    def squared_cosine(cls, num_train_timesteps: int = 1000, max_beta: float = 0.999) -> NoiseSchedule:
        """The cosine schedule ("squaredcos_cap_v2") of the prior, betas computed in float64 then stored float32."""

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
            for i in range(num_train_timesteps)
        ]
        return cls.from_betas(torch.tensor(betas, dtype=torch.float32))

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        """Build from a diffusers ``scheduler_config.json`` mapping (linear or squaredcos_cap_v2 only)."""
        kind = config.get("beta_schedule", "linear")
        steps = int(config.get("num_train_timesteps", 1000))
        if config.get("trained_betas") is not None:
            return cls.from_betas(torch.tensor(config["trained_betas"], dtype=torch.float32))
        if kind == "linear":
            return cls.linear(float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02)), steps)
        if kind == "squaredcos_cap_v2":
            return cls.squared_cosine(steps)
        raise ValueError(f"scheduler config has beta_schedule={kind!r}; supported: 'linear', 'squaredcos_cap_v2'")

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0) at integer timesteps ``t`` of shape (B,)."""
        ac = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device)]
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return (ac**0.5).reshape(shape) * x0 + ((1 - ac) ** 0.5).reshape(shape) * noise


def decoder_schedule() -> NoiseSchedule:
    """The decoder UNet's training schedule: linear betas 0.00085 to 0.012 over 1000 steps."""
    return NoiseSchedule.linear(0.00085, 0.012)


def prior_schedule() -> NoiseSchedule:
    """The prior's training schedule: squared cosine over 1000 steps."""
    return NoiseSchedule.squared_cosine()


def img2img_noise_schedule() -> NoiseSchedule:
    """The schedule both upstreams use to noise img2img latents (DDPM default 1e-4..0.02, not the model's)."""
    return NoiseSchedule.linear(0.0001, 0.02)


def leading_timesteps(steps: int, num_train_timesteps: int = 1000, offset: int = 0) -> list[int]:
    """diffusers' "leading" spacing: k * (T // S) + offset for k = S-1 .. 0."""
    check_steps(steps, num_train_timesteps)
    ratio = num_train_timesteps // steps
    return [k * ratio + offset for k in range(steps - 1, -1, -1)]


def original_ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The original repository's DDIM set: range(0, T, T // S) + 1, descending (S = 75 gives 77 steps)."""
    check_steps(steps, num_train_timesteps)
    return [t + 1 for t in range(0, num_train_timesteps, num_train_timesteps // steps)][::-1]


def spaced_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Evenly spaced over [0, T-1] with round-half-even (UnCLIP prior and the original respacing)."""
    check_steps(steps, num_train_timesteps)
    if steps == 1:
        return [0]
    ratio = (num_train_timesteps - 1) / (steps - 1)
    return [int(v) for v in (np.arange(0, steps) * ratio).round()[::-1]]


def linspace_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Evenly spaced from T-1 down to 0 (diffusers "linspace"; used by the fast solvers)."""
    check_steps(steps, num_train_timesteps)
    return [int(v) for v in np.linspace(0, num_train_timesteps - 1, steps).round()[::-1]]


def solver_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers' "linspace" spacing of its multistep solvers (DPMSolverMultistep, UniPC): the first S of S + 1
    evenly spaced points from T-1 down to 0 (the solver's last step then goes to sigma = 0)."""
    check_steps(steps, num_train_timesteps)
    return [int(v) for v in np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1]]


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """Fractional training timestep of a sigma, interpolated in log-sigma (diffusers ``_sigma_to_t``)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]  # (T, 1)
    low = int(np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)[0])
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).item()


SPACINGS = ("linspace", "karras", "exponential")


def solver_sigmas(schedule: NoiseSchedule, steps: int, karras: bool = False, rho: float = 7.0, *,
                  spacing: str | None = None) -> tuple[list[int], torch.Tensor]:
    """Timesteps and sigmas (float32, S + 1 values, the last 0) of diffusers' multistep solvers, sigma = √((1-ᾱ)/ᾱ).

    ``spacing`` (one of :data:`SPACINGS`; ``karras=True`` is another way to say "karras"):
    "linspace": :func:`solver_timesteps` and the schedule's sigmas there (diffusers' default);
    "karras": Karras et al.'s ρ = 7 spacing of sigma between the schedule's extremes, each solved for at its
    continuous sigma and given to the model at the nearest timestep (``use_karras_sigmas=True``);
    "exponential": sigma evenly spaced in log sigma (= in log-SNR) between the same extremes, given to the model at
    the timestep below its fractional one (diffusers truncates here: ``use_exponential_sigmas=True``).
    """
    spacing = spacing or ("karras" if karras else "linspace")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown sigma spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    check_steps(steps, schedule.num_train_timesteps)
    ac = schedule.alphas_cumprod
    sigmas = np.array(((1 - ac) / ac) ** 0.5)  # float32, as diffusers computes it
    if spacing == "linspace":
        timesteps = solver_timesteps(steps, schedule.num_train_timesteps)
        chosen = sigmas[timesteps]
    else:
        log_sigmas = np.log(sigmas)
        s_min, s_max = sigmas[0].item(), sigmas[-1].item()
        if spacing == "karras":
            ramp = np.linspace(0, 1, steps)
            chosen = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
            timesteps = [int(v) for v in np.array([_sigma_to_t(s, log_sigmas) for s in chosen]).round()]
        else:
            chosen = np.exp(np.linspace(math.log(s_max), math.log(s_min), steps))
            timesteps = [int(_sigma_to_t(s, log_sigmas)) for s in chosen]
    return timesteps, torch.from_numpy(np.concatenate([chosen, [0.0]]).astype(np.float32))


def karras_timesteps(steps: int, schedule: NoiseSchedule, rho: float = 7.0) -> list[int]:
    """Karras et al. sigma spacing mapped back to the nearest integer training timesteps (may merge duplicates)."""
    check_steps(steps, schedule.num_train_timesteps)
    ac = schedule.alphas_cumprod.double()
    sigmas = ((1 - ac) / ac).sqrt()
    lo, hi = sigmas[0].item(), sigmas[-1].item()
    ramp = np.linspace(0, 1, steps)
    wanted = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    log_sigmas = sigmas.log().numpy()
    out: list[int] = []
    for s in wanted:
        t = int(np.abs(log_sigmas - math.log(s)).argmin())
        if not out or t < out[-1]:
            out.append(t)
    return out


def check_steps(steps: int, num_train_timesteps: int = 1000) -> None:
    """Raise a ValueError unless 1 <= steps <= T."""
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {num_train_timesteps}, got {steps}")
