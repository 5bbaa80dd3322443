"""The decoder's training objective: epsilon MSE plus the variational bound for the learned-range variance.

As improved DDPM's hybrid loss (the original Kandinsky's RESCALED_MSE): the UNet's channels 4-7 give
v in [-1, 1], log sigma^2 = frac * log beta_t + (1 - frac) * log beta~_t with frac = (v + 1) / 2 (exactly
what the samplers use), and the VLB term KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) is computed with a
stop-gradient on the predicted mean, so it trains only the variance. At t = 0 the term is the Gaussian
negative log-likelihood of x_0. Both terms are means over elements; the VLB is in bits.
"""

from __future__ import annotations

import math

import torch

from ..diffusion.schedules import NoiseSchedule


def _gather(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return table.to(t.device)[t].view(-1, *([1] * (ndim - 1)))


def posterior_log_variance_clipped(schedule: NoiseSchedule) -> torch.Tensor:
    """log beta~_t, with t = 0 (where beta~ = 0) replaced by t = 1, as improved DDPM."""
    ac = schedule.alphas_cumprod.double()
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    var = (1 - prev) / (1 - ac) * schedule.betas.double()
    var = torch.cat([var[1:2], var[1:]])
    return var.log().float()


def hybrid_loss(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor, output: torch.Tensor, max_weight: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(epsilon MSE, VLB in bits) for the UNet ``output`` = [epsilon, v] at timesteps ``t`` (B,).

    ``max_weight`` > 1 weights each sample's epsilon MSE by min(1 / alpha_bar_t, max_weight): the
    v-prediction weighting, truncated. At high noise an epsilon error e moves the x0 estimate by
    e * sqrt((1 - alpha_bar) / alpha_bar), so plain epsilon MSE barely teaches a small model the image's
    global colours, which the first sampling steps decide.
    """
    c = x0.shape[1]
    n = x0.ndim
    eps, v = output[:, :c].float(), output[:, c:].float()
    ac = _gather(schedule.alphas_cumprod, t, n)
    weight = (1 / ac).clamp(max=max_weight) if max_weight > 1 else torch.ones_like(ac)
    mse = ((eps - noise).square() * weight).mean()

    ac_prev = _gather(torch.cat([torch.ones(1), schedule.alphas_cumprod[:-1]]), t, n)
    beta = _gather(schedule.betas, t, n)
    log_post = _gather(posterior_log_variance_clipped(schedule), t, n)

    def mean_from_x0(x0_: torch.Tensor) -> torch.Tensor:
        return (ac_prev.sqrt() * beta / (1 - ac)) * x0_ + ((1 - beta).sqrt() * (1 - ac_prev) / (1 - ac)) * x_t

    true_mean = mean_from_x0(x0)
    x0_pred = (x_t - (1 - ac).sqrt() * eps.detach()) / ac.sqrt()
    model_mean = mean_from_x0(x0_pred)
    frac = (v + 1) / 2
    model_log = frac * beta.log() + (1 - frac) * log_post
    kl = 0.5 * (-1.0 + model_log - log_post + (log_post - model_log).exp()
                + (true_mean - model_mean).square() * (-model_log).exp())
    nll = 0.5 * (math.log(2 * math.pi) + model_log + (x0 - model_mean).square() * (-model_log).exp())
    first = (t == 0).view(-1, *([1] * (n - 1)))
    vlb = torch.where(first, nll, kl).mean() / math.log(2.0)
    return mse, vlb
