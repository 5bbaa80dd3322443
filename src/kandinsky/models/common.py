"""Small pieces shared by the Kandinsky modules: config validation and the timestep sinusoid."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

_MISSING = object()


def config_value(config: Mapping[str, Any], key: str, default: Any = _MISSING, allowed: Iterable | None = None,
                 component: str = "model") -> Any:
    """Read ``key`` from a diffusers-style ``config.json`` mapping.

    A missing key takes ``default`` (or raises when there is none); a value outside ``allowed`` raises a
    ValueError that names the key, the value and what this implementation supports.
    """
    if key in config and config[key] is not None:
        value = config[key]
    elif default is not _MISSING:
        value = default
    else:
        raise ValueError(f"{component} config is missing required key {key!r}")
    if allowed is not None:
        allowed = list(allowed)
        if value not in allowed:
            raise ValueError(
                f"{component} config has {key}={value!r}, which Kandinsky 2.1 does not use; supported: {allowed}"
            )
    return value


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, cosine half first (diffusers ``flip_sin_to_cos=True``).

    Computed in float32 whatever the caller's dtype; ``timesteps`` is a 1-D tensor of shape (B,).
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
