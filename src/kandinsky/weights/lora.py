"""LoRA adapter files for the decoder UNet: peft's standard layout, and diffusers' naming for the Kandinsky UNet.

Read:
- a folder (or its ``adapter_model.safetensors``) in peft's layout: ``adapter_model.safetensors`` with keys
  ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` and ``adapter_config.json`` (``r``,
  ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``target_modules``);
- a diffusers LoRA file (``pytorch_lora_weights.safetensors``): keys prefixed ``unet.``, in any of the namings
  diffusers writes for this UNet, mixed within one file (``...to_q.lora.down.weight``, the attention-processor
  ``...processor.to_q_lora.down.weight``, peft's ``...add_k_proj.lora_A.weight``), with optional ``.alpha``
  tensors (kohya's per-module alpha).

Everything is mapped onto our module names (diffusers' for this UNet) as :class:`LoraWeights`, checked against
a UNet with an error that names the first mismatching key and the expected shapes. Our own adapters are saved in
peft's layout with our metadata (base model, rank, targets, trigger words) in the safetensors header.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import read_json

ADAPTER_FILE, CONFIG_FILE, DIFFUSERS_FILE = "adapter_model.safetensors", "adapter_config.json", \
    "pytorch_lora_weights.safetensors"
ADAPTER_FILES = (ADAPTER_FILE, DIFFUSERS_FILE)  # what a folder holding one adapter has, in order of preference
META_KEY = "kandinsky_lora"
_PEFT_PREFIX = "base_model.model."
# diffusers' attention-processor names -> our module names
_PROC = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0",
         "add_k_proj_lora": "add_k_proj", "add_v_proj_lora": "add_v_proj"}


@dataclass
class LoraWeights:
    """One adapter: ``A``/``B`` weights per target module (our names), its ranks and alphas, and metadata."""

    name: str
    a: dict[str, torch.Tensor]  # module -> lora_A weight (r, in[, k, k])
    b: dict[str, torch.Tensor]  # module -> lora_B weight (out, r[, 1, 1])
    alpha: dict[str, float]  # module -> lora_alpha (scaling = alpha / r)
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    key: str = ""  # identifies the weights (a digest of the file); in-memory adapters get one from their id

    def __post_init__(self) -> None:
        self.key = self.key or f"mem{id(self):x}"

    @property
    def targets(self) -> list[str]:
        return sorted(self.a)

    def rank(self, module: str) -> int:
        return int(self.a[module].shape[0])


def _our_key(key: str) -> tuple[str, str] | None:
    """A LoRA tensor name in any supported naming -> (module, "A" | "B" | "alpha"), or None if not LoRA."""
    for prefix in (_PEFT_PREFIX, "unet."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    m = re.match(r"^(.*)\.processor\.(\w+_lora)\.(down|up)\.weight$", key)
    if m and m.group(2) in _PROC:
        return f"{m.group(1)}.{_PROC[m.group(2)]}", "A" if m.group(3) == "down" else "B"
    m = re.match(r"^(.*)\.lora(?:\.|_)(down|up|A|B)(?:\.default)?\.weight$", key)
    if m:
        return m.group(1), "A" if m.group(2) in ("down", "A") else "B"
    return None


def from_state_dict(state: Mapping[str, torch.Tensor], *, name: str, source: str = "",
                    config: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None) -> LoraWeights:
    """Map a LoRA state dict in any supported naming; ``config`` is peft's ``adapter_config.json`` if any."""
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key, value in state.items():
        parsed = _our_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        module, part = parsed
        if part == "alpha":
            alphas[module] = float(value.reshape(-1)[0])
        else:
            (a if part == "A" else b)[module] = value
    if unknown:
        raise ValueError(f"{source or name}: {len(unknown)} tensors are not LoRA weights of a UNet "
                         f"(first: {unknown[0]!r}); this file was made for another architecture or format")
    if not a:
        raise ValueError(f"{source or name} holds no LoRA weights")
    if set(a) != set(b):
        odd = sorted(set(a) ^ set(b))[0]
        raise ValueError(f"{source or name}: module {odd!r} has only one of its lora_A / lora_B weights")
    config = dict(config or {})
    default_alpha = config.get("lora_alpha")
    alpha_pattern = config.get("alpha_pattern") or {}
    for module in a:
        r = int(a[module].shape[0])
        pattern = next((v for k, v in alpha_pattern.items() if module == k or module.endswith("." + k)), None)
        if pattern is not None:  # peft: alpha_pattern, else lora_alpha; scaling = alpha / r
            alphas[module] = float(pattern)
        elif module not in alphas:  # diffusers / kohya without an alpha tensor: alpha = rank (scaling 1)
            alphas[module] = float(default_alpha) if default_alpha is not None else float(r)
        if int(b[module].shape[1]) != r:
            raise ValueError(f"{source or name}: {module} has lora_A rank {r} but lora_B rank {b[module].shape[1]}")
    return LoraWeights(name=name, a=a, b=b, alpha=alphas, meta=dict(meta or {}), source=source)


def adapter_file(path: str | Path) -> Path:
    """The weights file of an adapter given as a file, or as a folder holding ``adapter_model.safetensors`` (peft)
    or ``pytorch_lora_weights.safetensors`` (diffusers); for a folder with neither, the peft name (missing)."""
    path = Path(path)
    if not path.is_dir():
        return path
    return next((path / f for f in ADAPTER_FILES if (path / f).is_file()), path / ADAPTER_FILE)


def read(path: str | Path, name: str | None = None) -> LoraWeights:
    """An adapter from a peft folder, its ``adapter_model.safetensors``, or a diffusers ``.safetensors`` file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    file = adapter_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA adapter at {path} (expected {ADAPTER_FILE} + {CONFIG_FILE}, or a "
                                ".safetensors file)")
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: LoRA adapters are read from .safetensors only (pickles are not opened)")
    stat = file.stat()
    digest = hashlib.sha1(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{file} is not a readable safetensors file ({exc})") from exc
    config_path = folder / CONFIG_FILE
    config = read_json(config_path) if file.name == ADAPTER_FILE and config_path.is_file() else None
    meta = json.loads(header[META_KEY]) if META_KEY in header else {}
    label = name or meta.get("name") or (folder.name if file.name in (ADAPTER_FILE, DIFFUSERS_FILE) else file.stem)
    lora = from_state_dict(state, name=label, source=str(file), config=config, meta=meta)
    lora.key = digest
    return lora


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of an adapter (our safetensors header entry) without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(adapter_file(path)), framework="pt") as f:
        header = f.metadata() or {}
    return json.loads(header[META_KEY]) if META_KEY in header else {}


def check(lora: LoraWeights, model: nn.Module) -> None:
    """Raise ValueError naming the first key of ``lora`` that does not fit ``model`` (a missing module, or
    lora_A/lora_B shapes that do not match the module's in/out features)."""
    modules = dict(model.named_modules())
    for target in lora.targets:
        module = modules.get(target)
        where = f"{lora.source or lora.name}: {target}"
        if module is None:
            raise ValueError(f"{where}.lora_A.weight names a module this UNet does not have; the adapter was made "
                             "for another architecture")
        module = getattr(module, "base_layer", module)  # already adapted: peft's wrapper around the layer
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear | nn.Conv2d) or weight is None:
            raise ValueError(f"{where} is a {type(module).__name__}, which LoRA does not adapt here")
        r, a, b = lora.rank(target), lora.a[target], lora.b[target]
        if isinstance(module, nn.Conv2d):
            want_a = (r, module.in_channels, *module.kernel_size)
            want_b = (module.out_channels, r, 1, 1)
        else:
            want_a, want_b = (r, module.in_features), (module.out_features, r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, but this UNet needs "
                             f"{want_a} / {want_b}; the adapter was made for another architecture or size")


def save(lora: LoraWeights, folder: str | Path, *, base_model: str | None = None,
         trigger_words: list[str] | None = None) -> Path:
    """Write ``lora`` in peft's layout (``adapter_model.safetensors`` + ``adapter_config.json``) with our
    metadata; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ranks = {m: lora.rank(m) for m in lora.targets}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    default_alpha = max(set(lora.alpha.values()), key=list(lora.alpha.values()).count)
    config = {
        "peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": default_alpha, "lora_dropout": 0.0,
        "bias": "none", "target_modules": lora.targets, "init_lora_weights": True, "use_rslora": False,
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in lora.alpha.items() if v != default_alpha},
        "base_model_name_or_path": base_model, "inference_mode": True,
    }
    meta = {**lora.meta, "name": lora.name, "base_model": base_model, "rank": r, "targets": lora.targets,
            "trigger_words": list(trigger_words or lora.meta.get("trigger_words") or [])}
    state = {}
    for m in lora.targets:
        state[f"{_PEFT_PREFIX}{m}.lora_A.weight"] = lora.a[m].detach().to("cpu").contiguous()
        state[f"{_PEFT_PREFIX}{m}.lora_B.weight"] = lora.b[m].detach().to("cpu").contiguous()
    tmp = folder / (ADAPTER_FILE + ".partial")
    save_file(state, str(tmp), metadata={"format": "pt", META_KEY: json.dumps(meta)})
    tmp.replace(folder / ADAPTER_FILE)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder
