"""Fine-tune a diffusers-format decoder (or inpaint) UNet or prior on image-caption pairs, or train a LoRA adapter.

The folder is loaded with the project's loader and the result is written as a copy of it with the trained
component's weights replaced (safetensors, in the dtype the folder stored). The objectives are those of the
``train`` stages: the decoder's epsilon MSE + learned-variance VLB with condition dropout, the prior's x0 MSE
in normalised CLIP space. AdamW or Adafactor, EMA, gradient checkpointing, autocast (bf16 or fp16 with loss
scaling) on CUDA; CPU runs fp32. The frozen encoders run once: latents, CLIP and M-CLIP features are cached.
A run is resumable: its checkpoint lives in ``<out>/.finetune``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import imaging
from ..diffusion.schedules import NoiseSchedule
from ..models.text_encoders import clip_image_embeds, clip_text_features
from ..weights.diffusers_format import DecoderParts, PriorParts, load_decoder, load_prior
from ..weights.io import find_weights, load_file
from .common import Trainer
from .decoder import IMAGE_DROP, TEXT_DROP, random_keep_masks
from .losses import hybrid_loss
from .prior import TEXT_DROP as PRIOR_TEXT_DROP


@dataclass
class FinetuneOptions:
    steps: int = 500
    batch_size: int = 4
    lr: float = 1e-5
    optimizer: str = "adamw"
    ema_decay: float = 0.999
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16 (CUDA only)
    device: str = "auto"
    seed: int = 0
    save_every: int = 100
    resolution: int | None = None  # decoder image size (default: the folder's recorded width, else 512)
    progress: bool = True
    lora: bool = False  # train a LoRA adapter (peft) instead of all the weights; ``out`` is the adapter folder
    rank: int = 8
    alpha: float | None = None  # default: the rank (scale 1)
    targets: str = "attn"  # attn | attn+conv | all (train.lora.target_modules)
    trigger_words: tuple[str, ...] = ()
    # the decoder's image embedding: "image" (CLIP of the training image) or "prior" (the prior's sample for the
    # caption, what text-to-image feeds the decoder: teaches a concept the prior does not know from the text) or
    # "trigger" (the prior's sample for captions with a trigger word, the CLIP image embedding for the others)
    condition: str = "image"
    # the share of decoder training rows whose caption is replaced by "" (default: the decoder stage's, for
    # guidance); with a new concept, every row trained without its caption teaches the image embedding alone to
    # draw it, so that prompts without the trigger whose prior embedding is near start drawing it too
    text_drop: float | None = None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_pairs(path: Path) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from a folder of images each with a ``.txt`` caption beside it, a JSONL file
    (``{"image" | "file_name": ..., "text" | "caption": ...}`` per line) or a CSV (image path, caption; a
    header row is skipped). Relative paths are from the file's folder."""
    path = Path(path)
    if path.is_dir():
        rows = []
        for image in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            caption = image.with_suffix(".txt")
            if not caption.is_file():
                raise FileNotFoundError(f"{image}: no caption file {caption.name} beside it")
            rows.append((image, caption.read_text(encoding="utf-8").strip()))
        if not rows:
            raise ValueError(f"{path} has no images ({', '.join(IMAGE_SUFFIXES)}) with .txt captions")
        return rows
    if path.suffix.lower() == ".jsonl":
        return _read_jsonl(path)
    return _read_csv(path)


def _pair(path: Path, line: int, image: str, caption: str) -> tuple[Path, str]:
    file = Path(image) if Path(image).is_absolute() else path.parent / image
    if not file.is_file():
        raise FileNotFoundError(f"{path}:{line}: image not found: {file}")
    return file, caption


def _read_jsonl(path: Path) -> list[tuple[Path, str]]:
    import json

    rows = []
    for i, text in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not text.strip():
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i + 1}: not JSON ({exc.msg})") from None
        image = item.get("image", item.get("file_name")) if isinstance(item, dict) else None
        caption = item.get("text", item.get("caption")) if isinstance(item, dict) else None
        if not isinstance(image, str) or not isinstance(caption, str):
            raise ValueError(f"{path}:{i + 1}: expected {{\"image\": PATH, \"text\": CAPTION}}")
        rows.append(_pair(path, i + 1, image, caption))
    if not rows:
        raise ValueError(f"{path} has no (image, caption) lines")
    return rows


def _read_csv(path: Path) -> list[tuple[Path, str]]:
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{i + 1}: expected two columns (image path, caption), got {row!r}")
            image, caption = row[0].strip(), ",".join(row[1:]).strip()
            if i == 0 and image.lower() in ("image", "path", "file", "image_path", "filename"):
                continue
            rows.append(_pair(path, i + 1, image, caption))
    if not rows:
        raise ValueError(f"{path} has no (image, caption) rows")
    return rows


def _autocast(device: torch.device, mode: str) -> tuple[Any, Any]:
    """(autocast context factory, GradScaler or None) for a device and --mixed-precision value."""
    if device.type != "cuda" or mode == "no":
        return contextlib.nullcontext, None
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return functools.partial(torch.autocast, "cuda", dtype=dtype), scaler


def _resolve_device(name: str) -> torch.device:
    from ..pipeline import resolve_device

    return resolve_device(name)


def _checkpoint_blocks(blocks: nn.ModuleList) -> None:
    """Gradient checkpointing for a list of transformer blocks, without changing their parameter names."""
    for block in blocks:
        forward = block.forward

        def run(*args: Any, _f: Any = forward) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_f, *args, use_reentrant=False)
            return _f(*args)

        block.forward = run


# ----------------------------------------------------------------------------------------------------------
# decoder


@dataclass
class DecoderData:
    latents: torch.Tensor  # (N, C, h, w)
    image: torch.Tensor  # (N, D) CLIP image embeddings
    zero: torch.Tensor  # (1, D)
    pooled: torch.Tensor  # (N + 1, D): captions, then ""
    hidden: torch.Tensor  # (N + 1, 77, W)


CONDITIONS = ("image", "prior", "trigger")


def mentions(caption: str, words: tuple[str, ...] | list[str]) -> bool:
    """Whether ``caption`` has a word starting with one of ``words`` (any case: "крест" finds "крестом")."""
    return any(re.search(r"(?<!\w)" + re.escape(w), caption, re.IGNORECASE) for w in words if w)


@torch.no_grad()
def prepare_decoder_data(parts: DecoderParts, prior: PriorParts, pairs: list[tuple[Path, str]], size: int,
                         device: torch.device, condition: str = "image", seed: int = 0,
                         trigger_words: tuple[str, ...] = ()) -> DecoderData:
    """Latents, image embeddings and text features of ``pairs``. ``condition``: "image" embeds each image with
    CLIP (the decoder's own training condition), "prior" samples the prior on each caption (what text-to-image
    feeds the decoder), "trigger" does the latter for the captions that mention a trigger word only, so that
    ordinary scenes keep the base model's objective (the adapter has nothing to change there)."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")
    images = [imaging.open_image(p).convert("RGB") for p, _ in pairs]
    pixels = torch.cat([imaging.to_model_range(im, size, size) for im in images]).to(device)
    latents = torch.cat([parts.movq.encode(pixels[i: i + 8]) for i in range(0, len(pixels), 8)])
    clip_px = imaging.clip_preprocess(images, prior.image_processor_config).to(device)
    image = torch.cat([clip_image_embeds(prior.image_encoder, clip_px[i: i + 64]) for i in range(0, len(pairs), 64)])
    if condition == "trigger":
        if not trigger_words:
            raise ValueError("condition 'trigger' needs trigger words: the captions that mention one are "
                             "conditioned on the prior's embedding")
        rows = [i for i, (_, c) in enumerate(pairs) if mentions(c, trigger_words)]
    else:
        rows = list(range(len(pairs))) if condition == "prior" else []
    if rows:
        from ..pipeline import Kandinsky21

        sampler = Kandinsky21(prior=prior, device=device)
        steps = int(prior.defaults.get("steps", 25))  # the prior folder's recommended settings
        guidance = float(prior.defaults.get("guidance_scale", 4.0))
        sampled = torch.cat([sampler.prior_embeds([pairs[r][1] for r in rows[i: i + 32]], steps=steps,
                                                  guidance_scale=guidance, seed=seed + i).image
                             for i in range(0, len(rows), 32)])
        image[torch.tensor(rows, device=image.device)] = sampled.to(image.dtype)
    s = prior.image_encoder.config.image_size
    zero = clip_image_embeds(prior.image_encoder, torch.zeros(1, 3, s, s, device=device))
    captions = [c for _, c in pairs] + [""]
    tok = parts.tokenizer(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    pooled, hidden = parts.text_encoder(tok.input_ids.to(device), tok.attention_mask.to(device))
    return DecoderData(latents, image, zero, pooled, hidden)


def decoder_loss(unet: nn.Module, schedule: NoiseSchedule, d: DecoderData, idx: torch.Tensor,
                 gen: torch.Generator, rng: random.Random, *, dropout: bool = True,
                 text_drop: float = TEXT_DROP) -> dict[str, torch.Tensor]:
    """The decoder objective on rows ``idx`` of the cached data (noise and dropout drawn from ``gen``/``rng``;
    a row's caption is dropped with probability ``text_drop``, its image embedding with ``IMAGE_DROP``)."""
    dev = d.latents.device
    b = len(idx)
    text_rows = torch.tensor([len(d.pooled) - 1 if dropout and rng.random() < text_drop else int(i)
                              for i in idx.tolist()])
    drop_img = (torch.rand(b, 1, generator=gen) < IMAGE_DROP).to(dev) if dropout else torch.zeros(b, 1, dtype=bool,
                                                                                                   device=dev)
    image = torch.where(drop_img, d.zero, d.image[idx.to(dev)])
    z0 = d.latents[idx.to(dev)].float()
    t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=gen)
    noise = torch.randn(z0.shape, generator=gen).to(dev)
    x_t = schedule.add_noise(z0, noise, t.to(dev))
    inp = x_t
    if unet.config.in_channels > z0.shape[1]:
        keep = random_keep_masks(b, z0.shape[-1], gen).to(dev)
        inp = torch.cat([x_t, z0 * keep, keep], dim=1)
    cond = unet.prepare_condition(image, d.pooled[text_rows.to(dev)], d.hidden[text_rows.to(dev)], cache_kv=False)
    out = unet(inp, t.to(dev), cond)
    mse, vlb = hybrid_loss(schedule, z0, x_t, t.to(dev), noise, out)
    return {"loss": mse + vlb, "mse": mse.detach(), "vlb": vlb.detach()}


# ----------------------------------------------------------------------------------------------------------
# prior


@dataclass
class PriorData:
    target: torch.Tensor  # (N, D) normalised CLIP image embeddings
    embeds: torch.Tensor  # (N + 1, D): captions, then ""
    hidden: torch.Tensor  # (N + 1, L, D)
    mask: torch.Tensor  # (N + 1, L) bool


@torch.no_grad()
def prepare_prior_data(parts: PriorParts, pairs: list[tuple[Path, str]], device: torch.device) -> PriorData:
    images = [imaging.open_image(p).convert("RGB") for p, _ in pairs]
    pixels = imaging.clip_preprocess(images, parts.image_processor_config).to(device)
    emb = clip_image_embeds(parts.image_encoder, pixels)
    target = (emb - parts.prior.clip_mean) / parts.prior.clip_std
    captions = [c for _, c in pairs] + [""]
    tok = parts.tokenizer(captions, padding="max_length", max_length=parts.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
    embeds, hidden = clip_text_features(parts.text_encoder, tok.input_ids.to(device))
    return PriorData(target, embeds, hidden, tok.attention_mask.bool().to(device))


def prior_loss(prior: nn.Module, schedule: NoiseSchedule, d: PriorData, idx: torch.Tensor, gen: torch.Generator,
               rng: random.Random, *, dropout: bool = True) -> dict[str, torch.Tensor]:
    dev = d.target.device
    rows = torch.tensor([len(d.embeds) - 1 if dropout and rng.random() < PRIOR_TEXT_DROP else int(i)
                         for i in idx.tolist()]).to(dev)
    x0 = d.target[idx.to(dev)]
    t = torch.randint(0, schedule.num_train_timesteps, (len(idx),), generator=gen)
    x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=gen).to(dev), t.to(dev))
    pred = prior(x_t, t.to(dev), d.embeds[rows], d.hidden[rows], d.mask[rows])
    return {"loss": F.mse_loss(pred.float(), x0.float())}


# ----------------------------------------------------------------------------------------------------------


def finetune(component: str, model: Path | str, data: Path | str, out: Path | str,
             opts: FinetuneOptions | None = None, prior: Path | str | None = None) -> Path:
    """Fine-tune ``component`` ("decoder" or "prior") of the folder ``model``; write the result to ``out``."""
    opts = opts or FinetuneOptions()
    if component not in ("decoder", "prior"):
        raise ValueError(f"component must be 'decoder' or 'prior', got {component!r}")
    if opts.lora and component != "decoder":
        raise ValueError("LoRA fine-tuning adapts the decoder UNet (styles, subjects); use component 'decoder'")
    text_drop = TEXT_DROP if opts.text_drop is None else float(opts.text_drop)
    if not 0.0 <= text_drop <= 1.0:
        raise ValueError(f"text_drop must be in [0, 1], got {opts.text_drop!r}")
    model, out = Path(model), Path(out)
    device = _resolve_device(opts.device)
    pairs = read_pairs(Path(data))
    torch.manual_seed(opts.seed)
    amp, scaler = _autocast(device, opts.mixed_precision)
    work = out / ".finetune"

    if component == "decoder":
        if prior is None:
            raise ValueError("decoder fine-tuning needs --prior DIR: its CLIP image encoder embeds the images")
        parts = load_decoder(model, device=device)
        prior_parts = load_prior(prior, device=device)
        size = opts.resolution or int(parts.defaults.get("width", 512))
        cached = prepare_decoder_data(parts, prior_parts, pairs, size, device, opts.condition, opts.seed,
                                      tuple(opts.trigger_words))
        del prior_parts
        net: nn.Module = parts.unet
        net.gradient_checkpointing = opts.gradient_checkpointing
        schedule = NoiseSchedule.from_config(parts.scheduler_config)
        weights_dir, stem = "unet", "diffusion_pytorch_model"

        def loss_fn(idx: torch.Tensor, gen: torch.Generator, rng: random.Random) -> dict[str, torch.Tensor]:
            return decoder_loss(net, schedule, cached, idx, gen, rng, text_drop=text_drop)
    else:
        parts = load_prior(model, device=device)
        cached = prepare_prior_data(parts, pairs, device)
        net = parts.prior
        if opts.gradient_checkpointing:
            _checkpoint_blocks(net.transformer_blocks)
        schedule = NoiseSchedule.from_config(parts.scheduler_config)
        weights_dir, stem = "prior", "diffusion_pytorch_model"

        def loss_fn(idx: torch.Tensor, gen: torch.Generator, rng: random.Random) -> dict[str, torch.Tensor]:
            return prior_loss(net, schedule, cached, idx, gen, rng)

    if opts.lora:  # only the adapter's branches train; the base stays frozen
        from . import lora as train_lora

        key, trained = "lora", train_lora.inject(net, opts.rank, opts.alpha or opts.rank, opts.targets)
    else:
        key, trained = component, net
        net.requires_grad_(True)
        if component == "prior":  # the CLIP statistics are data, not parameters to train
            net.clip_mean.requires_grad_(False)
            net.clip_std.requires_grad_(False)
    n = len(pairs)
    trainer = Trainer(f"finetune {component}{' (LoRA)' if opts.lora else ''}", work, {key: trained},
                      steps=opts.steps, lr=opts.lr, warmup=min(50, max(1, opts.steps // 10)), seed=opts.seed,
                      optimizer=opts.optimizer, weight_decay=0.01 if opts.optimizer == "adamw" else 0.0,
                      ema=(key,) if opts.ema_decay > 0 else (), ema_decay=opts.ema_decay or 0.999,
                      ckpt_every=opts.save_every, progress=opts.progress, scaler=scaler)

    def step(i: int, gen: torch.Generator, rng: random.Random) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, n, (min(opts.batch_size, max(n, 1)),), generator=gen)
        with amp():
            return loss_fn(idx, gen, rng)

    trainer.run(step)
    final = trainer.final_state(key)
    if opts.lora:
        from ..weights import lora as lora_files

        meta = {"steps": opts.steps, "targets_option": opts.targets, "images": n}
        weights = train_lora.to_weights(final, opts.alpha or opts.rank, out.name, meta)
        lora_files.save(weights, out, base_model=str(model), trigger_words=list(opts.trigger_words))
        return out
    _write_folder(model, out, weights_dir, stem, final)
    return out


def _write_folder(src: Path, out: Path, component_dir: str, stem: str, state: dict[str, torch.Tensor]) -> None:
    """Copy the source folder to ``out`` (keeping ``.finetune``) and replace one component's weights."""
    source_file = find_weights(src / component_dir, (stem,))
    dtype = next((v.dtype for v in load_file(source_file).values() if v.is_floating_point()), torch.float32)
    for item in src.iterdir():
        if item.name == ".finetune":
            continue
        target = out / item.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)
    for old in (out / component_dir).glob(f"{stem}.*"):
        old.unlink()
    from .export import save_weights

    save_weights(state, out / component_dir / f"{stem}.safetensors", dtype)


@torch.no_grad()
def fixed_loss(component: str, model: Path | str, data: Path | str, prior: Path | str | None = None,
               samples: int = 16, seed: int = 1234, resolution: int | None = None) -> float:
    """The objective of a folder on the CSV's pairs with fixed noise and timesteps and no dropout (to compare
    a model before and after fine-tuning)."""
    pairs = read_pairs(Path(data))
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    idx = torch.arange(samples) % len(pairs)
    if component == "decoder":
        parts = load_decoder(model)
        size = resolution or int(parts.defaults.get("width", 512))
        cached = prepare_decoder_data(parts, load_prior(prior), pairs, size, torch.device("cpu"))
        return float(decoder_loss(parts.unet, NoiseSchedule.from_config(parts.scheduler_config), cached, idx, gen,
                                  rng, dropout=False)["loss"])
    parts = load_prior(model)
    cached = prepare_prior_data(parts, pairs, torch.device("cpu"))
    return float(prior_loss(parts.prior, NoiseSchedule.from_config(parts.scheduler_config), cached, idx, gen, rng,
                            dropout=False)["loss"])

