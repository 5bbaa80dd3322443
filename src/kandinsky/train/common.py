"""The training loop shared by every stage: seeded steps, resumable safetensors checkpoints, EMA, progress bar.

Randomness of step ``k`` comes only from generators seeded with (seed, k), so a resumed run reproduces an
uninterrupted one exactly. A checkpoint (``<stage>/ckpt/``) holds the model and EMA weights, the optimizer
state (all safetensors) and ``state.json`` (step, elapsed seconds); ``<stage>/log.jsonl`` records the losses.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

StepFn = Callable[[int, torch.Generator, random.Random], dict[str, torch.Tensor]]


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A distinct 63-bit seed for (seed, step, salt)."""
    return (seed * 1_000_003 + step * 7919 + salt * 104_729) % (2**63 - 1)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = None) -> None:
    """Save a flat tensor dict as safetensors (contiguous copies; floating tensors cast to ``dtype``)."""
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class EMA:
    """Exponential moving average of parameters with a warm-up: decay = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v.detach().float(), 1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    def copy_to(self, module: nn.Module) -> None:
        module.load_state_dict({k: v.to(p.dtype) for (k, v), p in
                                zip(self.shadow.items(), module.state_dict().values(), strict=True)})


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float = 0.0
                   ) -> torch.optim.Optimizer:
    """``adamw`` or ``adafactor`` (torch's, or transformers' where torch has none)."""
    params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    if name == "adafactor":
        if hasattr(torch.optim, "Adafactor"):
            return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False)
    raise ValueError(f"unknown optimizer {name!r}; use adamw or adafactor")


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value
            else:
                meta["scalars"][f"{idx}.{name}"] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


@dataclass
class Trainer:
    """Runs ``steps`` optimisation steps of ``step_fn`` over ``modules`` with checkpoints in ``folder``.

    ``step_fn(step, torch_generator, python_random)`` returns a dict of scalar losses whose ``"loss"`` entry is
    minimised. ``ema`` names the modules that keep an EMA copy (exported instead of the raw weights).
    """

    name: str
    folder: Path
    modules: dict[str, nn.Module]
    steps: int
    lr: float
    seed: int = 0
    warmup: int = 50
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: tuple[str, ...] = ()
    ema_decay: float = 0.999
    ckpt_every: int = 200
    progress: bool = True
    params: list[nn.Parameter] | None = None
    scaler: Any = None  # a torch.amp.GradScaler for fp16 autocast
    history: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        params = self.params if self.params is not None else [
            p for m in self.modules.values() for p in m.parameters()]
        self.opt = make_optimizer(params, self.optimizer, self.lr, self.weight_decay)
        self.emas = {k: EMA(self.modules[k], self.ema_decay) for k in self.ema}
        self.step = 0
        self.elapsed = 0.0  # wall-clock seconds of optimisation steps, over all sessions
        self.cpu = 0.0  # process CPU seconds of the same steps (all threads)
        self.session_wall = self.session_cpu = 0.0  # the same, this session only

    # -- checkpoints -------------------------------------------------------------------------------------------

    @property
    def ckpt_dir(self) -> Path:
        return self.folder / "ckpt"

    def save(self) -> None:
        """Write the checkpoint atomically (a temporary folder renamed over the old one)."""
        tmp = self.folder / "ckpt.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_tensors({f"{n}.{k}": v for n, m in self.modules.items() for k, v in m.state_dict().items()},
                     tmp / "model.safetensors")
        if self.emas:
            save_tensors({f"{n}.{k}": v for n, e in self.emas.items() for k, v in e.state_dict().items()},
                         tmp / "ema.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(self.opt.state_dict())
        save_tensors(opt_tensors, tmp / "optim.safetensors")
        write_json(tmp / "state.json", {"step": self.step, "elapsed": self.elapsed, "cpu": self.cpu,
                                        "optimizer": opt_meta,
                                        "steps": self.steps, "seed": self.seed})
        old = self.folder / "ckpt.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.ckpt_dir.exists():
            os.replace(self.ckpt_dir, old)
        os.replace(tmp, self.ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)

    def load(self) -> bool:
        """Resume from the checkpoint if there is one; returns whether it did."""
        if not (self.ckpt_dir / "state.json").is_file():
            return False
        state = json.loads((self.ckpt_dir / "state.json").read_text())
        weights = load_file(str(self.ckpt_dir / "model.safetensors"))
        for n, m in self.modules.items():
            m.load_state_dict({k[len(n) + 1:]: v for k, v in weights.items() if k.startswith(n + ".")})
        if self.emas:
            ema = load_file(str(self.ckpt_dir / "ema.safetensors"))
            for n, e in self.emas.items():
                e.load_state_dict({k[len(n) + 1:]: v for k, v in ema.items() if k.startswith(n + ".")})
        self.opt.load_state_dict(_unflatten_optimizer(load_file(str(self.ckpt_dir / "optim.safetensors")),
                                                      state["optimizer"]))
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        self.cpu = float(state.get("cpu", 0.0))
        return True

    def final_state(self, name: str) -> dict[str, torch.Tensor]:
        """Weights to export for module ``name``: its EMA if it keeps one, else the raw weights."""
        if name in self.emas:
            return dict(self.emas[name].state_dict())
        return self.modules[name].state_dict()

    # -- the loop ----------------------------------------------------------------------------------------------

    def run(self, step_fn: StepFn) -> list[dict[str, float]]:
        """Train to ``steps`` (resuming if a checkpoint exists); returns this session's loss history."""
        self.load()
        log_path = self.folder / "log.jsonl"
        if log_path.is_file():  # drop entries of steps after the checkpoint (they will be redone)
            kept = [r for r in read_log(self.folder) if r["step"] < self.step]
            log_path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        log = log_path.open("a", encoding="utf-8")
        for m in self.modules.values():
            m.train()
        bar = tqdm(total=self.steps, initial=self.step, desc=self.name, file=sys.stderr, dynamic_ncols=True,
                   disable=not self.progress, mininterval=1.0)
        smooth: float | None = None
        try:
            while self.step < self.steps:
                t0, c0 = time.time(), time.process_time()
                step = self.step
                for g in self.opt.param_groups:
                    g["lr"] = lr_at(step, self.steps, self.lr, self.warmup)
                torch.manual_seed(step_seed(self.seed, step, 99))
                gen = torch.Generator().manual_seed(step_seed(self.seed, step))
                rng = random.Random(step_seed(self.seed, step, 1))
                losses = step_fn(step, gen, rng)
                self.opt.zero_grad(set_to_none=True)
                loss = losses["loss"]
                (self.scaler.scale(loss) if self.scaler else loss).backward()
                if self.scaler:
                    self.scaler.unscale_(self.opt)
                if self.grad_clip:
                    nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]],
                                             self.grad_clip)
                if self.scaler:
                    self.scaler.step(self.opt)
                    self.scaler.update()
                else:
                    self.opt.step()
                for n, e in self.emas.items():
                    e.update(self.modules[n], step)
                self.step += 1
                self.elapsed += time.time() - t0
                self.cpu += time.process_time() - c0
                self.session_wall += time.time() - t0
                self.session_cpu += time.process_time() - c0
                values = {k: float(v.detach()) for k, v in losses.items()}
                self.history.append(values)
                log.write(json.dumps({"step": step, **values}) + "\n")
                smooth = values["loss"] if smooth is None else 0.95 * smooth + 0.05 * values["loss"]
                bar.update(1)
                bar.set_postfix(loss=f"{smooth:.4f}", refresh=False)
                if self.step % self.ckpt_every == 0 or self.step == self.steps:
                    self.save()
        finally:
            bar.close()
            log.close()
        if self.step == self.steps and not (self.ckpt_dir / "state.json").is_file():
            self.save()
        for m in self.modules.values():
            m.eval()
        return self.history


class StageClock:
    """Times a stage: its optimisation steps over every session plus this session's other work."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.time(), time.process_time()

    def record(self, trainer: Trainer | None = None, **extra: Any) -> dict[str, Any]:
        wall, cpu = time.time() - self.wall0, time.process_time() - self.cpu0
        if trainer is not None:
            wall += trainer.elapsed - trainer.session_wall
            cpu += trainer.cpu - trainer.session_cpu
            extra = {"steps": trainer.step, **extra}
        return {"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), **extra}


def read_log(folder: Path) -> list[dict[str, float]]:
    """The loss log of a stage folder (one dict per step)."""
    path = Path(folder) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
