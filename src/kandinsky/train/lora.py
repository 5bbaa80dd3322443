"""LoRA fine-tuning of the decoder UNet with peft: which layers to adapt, the trainable part, the saved adapter.

The base UNet is frozen; peft puts a low-rank branch (``lora_A`` initialised at random, ``lora_B`` at zero, so
training starts from the base model) beside every target layer. The branches are gathered in one small module
so that the finetune machinery (optimizer, EMA, checkpoints, resume) sees only them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..weights import lora as lora_files

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
TARGET_CHOICES = ("attn", "attn+conv", "all")
ADAPTER = "finetuned"


def target_modules(unet: nn.Module, targets: str) -> list[str]:
    """Names of the UNet layers to adapt: ``attn`` the attention projections (queries, keys, values, output,
    context keys/values), ``attn+conv`` also the ResBlock convolutions, ``all`` every Linear and Conv2d."""
    if targets not in TARGET_CHOICES:
        raise ValueError(f"targets must be one of {', '.join(TARGET_CHOICES)}, got {targets!r}")
    names = []
    for name, module in unet.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        attn = name.endswith(tuple("." + a for a in ATTENTION))
        conv = isinstance(module, nn.Conv2d) and ".resnets." in name and name.endswith((".conv1", ".conv2"))
        if attn or (targets != "attn" and conv) or targets == "all":
            names.append(name)
    return names


def inject(unet: nn.Module, rank: int, alpha: float, targets: str) -> nn.ModuleDict:
    """Freeze ``unet``, add a trainable LoRA adapter to its target layers; returns the module of LoRA layers."""
    import peft

    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    names = target_modules(unet, targets)
    unet.requires_grad_(False)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=names)
    peft.inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    ref = next(p for n, p in unet.named_parameters() if "lora_" not in n)
    branches = nn.ModuleDict()
    for name, module in unet.named_modules():
        if hasattr(module, "lora_A") and ADAPTER in module.lora_A:
            pair = nn.ModuleDict({"A": module.lora_A[ADAPTER], "B": module.lora_B[ADAPTER]})
            branches[name.replace(".", "__")] = pair.to(device=ref.device).requires_grad_(True)
    return branches


def to_weights(state: dict[str, torch.Tensor], alpha: float, name: str, meta: dict[str, Any] | None = None
               ) -> lora_files.LoraWeights:
    """A :class:`~kandinsky.weights.lora.LoraWeights` from the state dict of :func:`inject`'s module."""
    a, b = {}, {}
    for key, value in state.items():
        branch, part, _ = key.split(".")  # "<module with __>.A.weight"
        module = branch.replace("__", ".")
        (a if part == "A" else b)[module] = value.detach().float().cpu()
    return lora_files.LoraWeights(name=name, a=a, b=b, alpha={m: float(alpha) for m in a}, meta=dict(meta or {}))
