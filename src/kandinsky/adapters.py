"""LoRA adapters on the decoder UNet, applied unmerged through peft.

The base weights are never modified: each adapted Linear/Conv2d gets peft's low-rank branch beside it, and the
set of active adapters and their scales is switched per call. With no adapter active every branch is off and
the UNet computes exactly what it computed before (bit for bit); adapters stay loaded, so switching between
requests costs no reload. Several adapters mix linearly, each with its own scale (scale * alpha / rank).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from .weights import lora as lora_files

LoraSpec = tuple[Any, float]  # (path or LoraWeights, scale)


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA adapters need the peft package: pip install 'kandinsky[lora]'") from None
    return peft


def _layers(model: nn.Module) -> Iterator[Any]:
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            yield module


class Adapters:
    """The adapters loaded into one UNet, by name, and which are active with what scale."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.loaded: dict[str, lora_files.LoraWeights] = {}
        self.active: list[tuple[str, float]] = []

    def add(self, lora: lora_files.LoraWeights, name: str) -> None:
        """Inject ``lora`` under ``name`` (checked against the model first; nothing changes on error)."""
        if name in self.loaded:
            return
        lora_files.check(lora, self.model)
        peft = _peft()
        ranks = {m: lora.rank(m) for m in lora.targets}
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        config = peft.LoraConfig(
            r=r, lora_alpha=r, lora_dropout=0.0, bias="none", target_modules=lora.targets,
            rank_pattern={re.escape(m): v for m, v in ranks.items() if v != r},
            alpha_pattern={re.escape(m): lora.alpha[m] for m in lora.targets})
        ref = next(self.model.parameters())
        with warnings.catch_warnings():  # "multiple adapters in the model": that is the point
            warnings.filterwarnings("ignore", message=".*peft_config.*")
            peft.inject_adapter_in_model(config, self.model, adapter_name=name)
        state = {}
        for m in lora.targets:
            state[f"{m}.lora_A.weight"] = lora.a[m]
            state[f"{m}.lora_B.weight"] = lora.b[m]
        result = peft.set_peft_model_state_dict(self.model, state, adapter_name=name)
        missing = [k for k in getattr(result, "missing_keys", []) if f".{name}." in k and "lora_" in k]
        if missing:
            raise ValueError(f"{lora.source or lora.name}: could not place {missing[0]}")
        for layer in _layers(self.model):
            for holder in (layer.lora_A, layer.lora_B):
                if name in holder:
                    holder[name].to(device=ref.device, dtype=ref.dtype).requires_grad_(False)
        self.loaded[name] = lora
        self.activate(self.active)  # a new adapter starts inactive

    def activate(self, pairs: Sequence[tuple[str, float]]) -> None:
        """Make exactly ``pairs`` (name, scale) active; scale-0 and unknown names are left out."""
        pairs = [(n, float(s)) for n, s in pairs if n in self.loaded and float(s) != 0.0]
        names = [n for n, _ in pairs]
        for layer in _layers(self.model):
            present = [n for n in names if n in layer.lora_A]
            if not present:
                layer.enable_adapters(False)
                continue
            layer.enable_adapters(True)
            layer.set_adapter(present, inference_mode=True)
            for n, s in pairs:
                layer.set_scale(n, s)
        self.active = pairs


_cache: dict[tuple[str, int, int], lora_files.LoraWeights] = {}


def load(spec: Any) -> lora_files.LoraWeights:
    """A :class:`LoraWeights` from a path (read once per file version) or as it is."""
    if isinstance(spec, lora_files.LoraWeights):
        return spec
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"LoRA adapter not found: {spec}")
    probe = lora_files.adapter_file(path)
    stat = probe.stat() if probe.exists() else path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _cache:
        _cache[key] = lora_files.read(path)
    return _cache[key]


def name_of(lora: lora_files.LoraWeights) -> str:
    """The adapter's name inside the model: its label and the key of its weights (two files with one label
    stay apart; the same file is loaded once)."""
    return re.sub(r"\W", "_", lora.name)[:40] + "_" + re.sub(r"\W", "_", lora.key)


@contextmanager
def applied(models: Sequence[nn.Module], specs: Sequence[LoraSpec], registry: dict[int, Adapters]
            ) -> Iterator[list[tuple[str, float]]]:
    """Within the block, the adapters ``specs`` are active (with their scales) on every model in ``models`` they
    fit; afterwards the previous state is back. Yields the (label, scale) pairs applied, for the records."""
    loras = [(load(spec), float(scale)) for spec, scale in specs]
    used: list[tuple[str, float]] = []
    previous = {}
    try:
        for model in models:
            adapters = registry.setdefault(id(model), Adapters(model))
            previous[id(model)] = list(adapters.active)
            pairs = []
            for lw, scale in loras:
                try:
                    adapters.add(lw, name_of(lw))
                except ValueError:
                    if model is models[0]:
                        raise
                    continue  # e.g. an adapter of conv_in does not fit the 9-channel inpainting UNet
                pairs.append((name_of(lw), scale))
            adapters.activate(pairs)
        used = [(lw.name, scale) for lw, scale in loras]
        yield used
    finally:
        for model in models:
            if id(model) in previous:
                registry[id(model)].activate(previous[id(model)])
