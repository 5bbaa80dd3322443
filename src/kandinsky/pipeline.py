"""The public Kandinsky 2.1 pipeline: text-to-image, image mixing, img2img, inpainting and variations.

Randomness is consumed exactly as diffusers' Kandinsky pipelines consume a CPU ``torch.Generator``, so a seed
gives the same image here and in diffusers (CPU, fp32).
"""

from __future__ import annotations

import contextlib
import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from . import imaging
from . import precision as precisions
from .diffusion import samplers
from .diffusion.schedules import (
    NoiseSchedule,
    check_steps,
    img2img_noise_schedule,
    leading_timesteps,
    original_ddim_timesteps,
    solver_sigmas,
    spaced_timesteps,
)
from .models import fastpath
from .models.common import page_out, release_pages
from .models.text_encoders import clip_image_embeds, clip_text_features
from .models.unet import DeepCache
from .weights import hub
from .weights.diffusers_format import DecoderParts, PriorParts, load_decoder, load_prior, resolve_dtype

ASSETS = Path(__file__).parent / "assets"
OUTPUTS = ("pil", "np", "pt")
COMPATS = ("diffusers", "original")
DDPM_DEFAULTS = {"beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 0,
                 "thresholding": True, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 2.0}
MixItem = str | PIL.Image.Image | Path | torch.Tensor
# Speed presets: values used where the call leaves an argument unset (before the model folder's defaults).
# "fast" was chosen from measurements (docs/benchmarks.md, "Fewer steps: 8-16 decoder steps"): UniPC with Karras
# sigmas at 10 decoder steps and 10 prior steps. On the bundled model its attribute accuracy over 6 seeds x 120
# prompts is +0.6 points (se 0.4, no seed below) from the 100-step DDIM result of the same seeds, with 20 decoder
# UNet evaluations per image (the 20-step preset before it: 40, -0.0 points; DDIM 100: 200). 8 steps lose 3.2
# points (3 seeds); the other solvers at 12 steps (UniPC-3 -1.7, DPM++ 2M Karras +0.6, its SDE -0.3) cost more.
# DeepCache and partial guidance stay off: their quality cost was not clearly negligible (-4.6 to +0.8 points),
# and guidance on 70% of 16 steps (+2.4, 3 seeds) still costs 28 evaluations.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "fast": {"sampler": "unipc_karras", "steps": 10, "prior_steps": 10},
}
Progress = Callable[[str, int, int], None] | None


@dataclass
class Embeds:
    """Image embeddings for the decoder: ``image`` (N, D) and the unconditional ``negative`` (N, D)."""

    image: torch.Tensor
    negative: torch.Tensor

    def __iter__(self):
        return iter((self.image, self.negative))


class TqdmProgress:
    """One tqdm bar per sampling loop (``prior``, ``decoder``), closed when the loop completes."""

    def __init__(self) -> None:
        self._bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if self._bar is None or done == 1:
            if self._bar is not None:
                self._bar.close()
            self._bar = tqdm(total=total, desc=stage, unit="step", leave=False, dynamic_ncols=True)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self._bar.close()
            self._bar = None


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA, then MPS, then CPU; anything else must be available."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, mps or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use --device cpu")
    return dev


class Kandinsky21:
    """Kandinsky 2.1: a CLIP-space prior, an image-conditioned decoder UNet and a MoVQ decoder.

    Build with :meth:`from_pretrained`. Every generation method takes ``seed`` (or a ``generator``) and
    ``output`` (``"pil"``, ``"np"`` or ``"pt"``).
    """

    def __init__(self, decoder: DecoderParts | None = None, prior: PriorParts | None = None,
                 inpaint: DecoderParts | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, compat: str = "diffusers", *, low_memory: bool = False,
                 compile: bool = False, tile_decode: bool | None = None) -> None:
        if decoder is None and prior is None and inpaint is None:
            raise ValueError("a pipeline needs at least one of decoder, prior or inpaint")
        if compat not in COMPATS:
            raise ValueError(f"compat must be one of {COMPATS}, got {compat!r}")
        self.decoder, self.prior, self.inpaint_model = decoder, prior, inpaint
        self.device, self.dtype = torch.device(device), dtype
        if self.device.type == "cpu" and not fastpath.native(dtype):
            warnings.warn(f"{str(dtype).removeprefix('torch.')} has no native support on this CPU (it needs "
                          "AVX512-BF16/AMX for bfloat16, AVX512-FP16 for float16): it runs correctly but emulated, "
                          "slower than float32; use dtype='float32' for speed", RuntimeWarning, stacklevel=2)
        self.compat = compat
        self.progress: Progress = None
        self._zero_embed: torch.Tensor | None = None
        self._adapters: dict[int, Any] = {}  # LoRA adapters per UNet (kandinsky.adapters)
        self._loras_used: list[tuple[str, float]] = []
        self.low_memory = bool(low_memory)
        self.tile_decode = tile_decode
        for parts in (decoder, inpaint):
            if parts is not None:
                parts.unet.set_low_memory(self.low_memory)
                if compile:
                    kw = {"mode": "reduce-overhead"} if self.device.type == "cuda" else {}
                    parts.unet.set_compile(True, **kw)

    @property
    def original(self) -> bool:
        """True under ``compat="original"``: the ai-forever repository's semantics instead of diffusers'."""
        return self.compat == "original"

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, decoder: str | Path | None = None, prior: str | Path | None = None,
                        inpaint: str | Path | None = None, device: str | torch.device = "cpu",
                        dtype: str | torch.dtype | None = None, *, original: str | Path | None = None,
                        compat: str = "diffusers", low_memory: bool = False, compile: bool = False,
                        tile_decode: bool | None = None, loras: Sequence[tuple[Any, float]] | None = None,
                        precision: str | None = None, **original_files: Any) -> Kandinsky21:
        """Load diffusers-format folders or Hugging Face Hub ids (``"kandinsky-community/kandinsky-2-1[@rev]"``,
        or the shortcuts ``"kandinsky-2-1"``, ``"kandinsky-2-1-prior"``, ``"kandinsky-2-1-inpaint"``; see
        :mod:`kandinsky.weights.hub`); with no folder at all, the bundled model.

        ``original=DIR`` (or its Hub id ``"ai-forever/Kandinsky_2.1[@rev]"``) loads the ai-forever release files
        instead (see
        :func:`kandinsky.weights.original_format.load_original`; single files may be given as keywords such as
        ``clip=``, ``movq=``, ``clip_tokenizer=``). ``dtype`` None means float32, except for the fp16 original
        files on CUDA, which stay fp16. ``compat="original"`` switches to the original repository's sampling
        semantics (see the README's table). ``loras`` [(path, scale), ...] become the adapters of every call
        (:meth:`set_loras`). ``precision`` ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"auto"`` (the fastest this
        machine computes correctly, measured once and cached; see :mod:`kandinsky.precision`) is another way to
        give ``dtype``.

        Speed and memory: weights are memory-mapped and built without initialisation either way.
        ``low_memory=True`` drops each model's resident pages once its part of a call is done (text encoders
        after encoding, the prior after sampling, the UNet and its packed weights after the loop) and decodes
        large images in tiles; ``compile=True`` runs the UNet through ``torch.compile`` (slow first call, falls
        back to eager on failure); ``tile_decode`` True / False forces tiled MoVQ decoding on or off (None:
        tiles above 1024×1024 pixels, or above 512×512 under ``low_memory``).
        """
        speed = dict(low_memory=low_memory, compile=compile, tile_decode=tile_decode)
        dev = resolve_device(device)
        if precision is not None:
            chosen = precisions.resolve(precision, dev)
            if dtype is not None and resolve_dtype(dtype) != chosen:
                raise ValueError(f"dtype={dtype!r} and precision={precision!r} disagree; give one of them")
            dtype = chosen
        if original is not None or original_files:
            if decoder is not None or prior is not None or inpaint is not None:
                raise ValueError("give either original=DIR or decoder/prior/inpaint folders, not both")
            from .weights.original_format import auto_dtype, load_original

            dt = auto_dtype(dev, dtype)
            dec, pri, inp = load_original(original, device=dev, dtype=dt, **original_files)
            pipe = cls(decoder=dec, prior=pri, inpaint=inp, device=dev, dtype=dt, compat=compat, **speed)
            pipe.set_loras(loras or [])
            return pipe
        dt = resolve_dtype(dtype if dtype is not None else "float32")
        decoder, prior, inpaint = (hub.model_path(x) for x in (decoder, prior, inpaint))  # Hub ids -> snapshots
        if decoder is None and prior is None and inpaint is None:
            decoder, prior = ASSETS / "decoder", ASSETS / "prior"
            inpaint = ASSETS / "inpaint" if (ASSETS / "inpaint").is_dir() else None
            if not (Path(decoder).is_dir() and Path(prior).is_dir()):
                raise FileNotFoundError(
                    f"no model given and no bundled model in {ASSETS}; pass decoder=DIR and prior=DIR "
                    "(diffusers-format kandinsky-2-1 and kandinsky-2-1-prior folders)"
                )
        pipe = cls(
            decoder=load_decoder(decoder, device=dev, dtype=dt, inpaint=False) if decoder is not None else None,
            prior=load_prior(prior, device=dev, dtype=dt) if prior is not None else None,
            inpaint=load_decoder(inpaint, device=dev, dtype=dt, inpaint=True) if inpaint is not None else None,
            device=dev, dtype=dt, compat=compat, **speed,
        )
        pipe.set_loras(loras or [])
        return pipe

    # ------------------------------------------------------------------ LoRA adapters

    @contextlib.contextmanager
    def loras(self, specs: Sequence[tuple[Any, float]]) -> Iterator[list[tuple[str, float]]]:
        """Within the block, the LoRA adapters ``specs`` ((path or ``LoraWeights``, scale) pairs; a peft folder,
        its ``adapter_model.safetensors`` or a diffusers ``pytorch_lora_weights.safetensors``) are active on the
        decoder and inpainting UNets, unmerged; afterwards the previous adapters are back (the base weights are
        never changed). Outputs record the adapters as ``info["loras"]``. Yields the (name, scale) pairs."""
        from . import adapters

        models = [p.unet for p in (self.decoder, self.inpaint_model) if p is not None]
        if not specs:
            yield []
            return
        if not models:
            raise ValueError("LoRA adapters need a decoder or an inpainting model")
        before = self._loras_used
        with adapters.applied(models, specs, self._adapters) as used:
            self._loras_used = [*before, *used]
            try:
                yield used
            finally:
                self._loras_used = before

    def set_loras(self, specs: Sequence[tuple[Any, float]]) -> list[tuple[str, float]]:
        """Make ``specs`` the adapters of every following call (``[]`` for none); see :meth:`loras`."""
        if getattr(self, "_lora_stack", None) is not None:
            self._lora_stack.close()
            self._lora_stack = None
        if not specs:
            return []
        stack = contextlib.ExitStack()
        used = stack.enter_context(self.loras(specs))
        self._lora_stack = stack
        return used

    def _need(self, part: str) -> Any:
        value = {"decoder": self.decoder, "prior": self.prior, "inpaint": self.inpaint_model}[part]
        if value is None:
            hint = {"decoder": "decoder=DIR (kandinsky-2-1)", "prior": "prior=DIR (kandinsky-2-1-prior)",
                    "inpaint": "inpaint=DIR (kandinsky-2-1-inpaint)"}[part]
            raise ValueError(f"this call needs the {part} model; load it with Kandinsky21.from_pretrained({hint})")
        return value

    def _offload(self, *modules: torch.nn.Module) -> None:
        """Drop the resident pages of modules whose work in this call is done: by default only the clean pages
        memory-mapped from their weight files (they stay in the OS page cache, so the next call maps them back
        cheaply); under ``low_memory`` every page, out of the page cache too (``common.page_out``)."""
        if self.device.type != "cpu":
            return
        tensors = (t for m in modules for t in (*m.parameters(), *m.buffers()))
        page_out(tensors) if self.low_memory else release_pages(tensors)

    def defaults(self, part: str = "decoder") -> dict[str, Any]:
        """Recommended call defaults recorded in the model folder (empty for the published model)."""
        parts = {"decoder": self.decoder or self.inpaint_model, "prior": self.prior}
        owner = parts.get(part)
        return dict(owner.defaults) if owner is not None else {}

    # ------------------------------------------------------------------ randomness

    @staticmethod
    def make_generator(seed: int | None = None, generator: torch.Generator | None = None
                       ) -> tuple[torch.Generator, int | None]:
        """The generator a call uses: the given one, or a CPU generator seeded with ``seed`` (random if None)."""
        if generator is not None:
            return generator, None
        if seed is None:
            seed = secrets.randbelow(2**32)
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        return torch.Generator("cpu").manual_seed(int(seed)), int(seed)

    # ------------------------------------------------------------------ text encoders

    @torch.inference_mode()
    def _prior_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = self._need("prior")
        tok = parts.tokenizer(prompts, padding="max_length", max_length=parts.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt")
        embeds, hidden = clip_text_features(parts.text_encoder, tok.input_ids.to(self.device))
        return embeds, hidden, tok.attention_mask.bool().to(self.device)

    @torch.inference_mode()
    def _decoder_text(self, parts: DecoderParts, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = parts.tokenizer(prompts, padding="max_length", truncation=True, max_length=77,
                              return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        return parts.text_encoder(tok.input_ids.to(self.device), tok.attention_mask.to(self.device))

    @torch.inference_mode()
    def image_embeds(self, images: Sequence[imaging.ImageInput]) -> torch.Tensor:
        """CLIP ViT-L/14 image embeddings (N, 768) of PIL images or paths (projected, not normalised)."""
        parts = self._need("prior")
        pil = [imaging.open_image(im) for im in images]
        pixels = imaging.clip_preprocess(pil, parts.image_processor_config)
        out = clip_image_embeds(parts.image_encoder, pixels.to(self.device, self.dtype))
        self._offload(parts.image_encoder)
        return out

    @torch.inference_mode()
    def zero_image_embeds(self, rows: int = 1) -> torch.Tensor:
        """The unconditional image embedding: CLIP vision of an all-zero normalised image, repeated."""
        if self._zero_embed is None:
            parts = self._need("prior")
            size = parts.image_encoder.config.image_size
            zeros = torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype)
            self._zero_embed = clip_image_embeds(parts.image_encoder, zeros)
            self._offload(parts.image_encoder)
        return self._zero_embed.repeat(rows, 1)

    # ------------------------------------------------------------------ prior

    @torch.inference_mode()
    def prior_embeds(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                     steps: int = 25, guidance_scale: float = 4.0, seed: int | None = None,
                     num_images: int = 1, *, generator: torch.Generator | None = None,
                     latents: torch.Tensor | None = None) -> Embeds:
        """CLIP image embeddings for prompts: ``(image_embeds, negative_image_embeds)``, each (P·n, D).

        As diffusers' ``KandinskyPriorPipeline.__call__``: with a negative prompt, the negatives are sampled in
        the same batch and returned as the negative embeddings; without, the zero-image embedding is.
        """
        prompts = _prompt_list(prompt, "prompt")
        check_steps(steps)
        _check_count(num_images, "num_images")
        _check_guidance(guidance_scale, "guidance_scale")
        generator, _ = self.make_generator(seed, generator)
        negatives = None if negative_prompt is None else _prompt_list(negative_prompt, "negative_prompt")
        if negatives is not None:
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}; "
                                 "give one negative per prompt, or a single one for all")
            rows, uncond = prompts + negatives, negatives + negatives
        else:
            rows, uncond = prompts, [""] * len(prompts)
        x = self._run_prior(rows, uncond, steps, guidance_scale, num_images, generator, latents)
        if negatives is not None:
            image, negative = x.chunk(2)
            return Embeds(image, negative)
        return Embeds(x, self.zero_image_embeds(x.shape[0]).to(x.dtype))

    def _run_prior(self, prompts: list[str], uncond: list[str], steps: int, guidance_scale: float, n: int,
                   generator: torch.Generator, latents: torch.Tensor | None) -> torch.Tensor:
        parts = self._need("prior")
        cfg = guidance_scale > 1.0
        embeds, hidden, mask = self._prior_text(prompts)
        embeds, hidden, mask = (t.repeat_interleave(n, dim=0) for t in (embeds, hidden, mask))
        if cfg:
            u_embeds, u_hidden, u_mask = self._prior_text(uncond)
            embeds = torch.cat([u_embeds.repeat_interleave(n, 0), embeds])
            hidden = torch.cat([u_hidden.repeat_interleave(n, 0), hidden])
            mask = torch.cat([u_mask.repeat_interleave(n, 0), mask])
        self._offload(parts.text_encoder)
        rows = len(prompts) * n
        shape = (rows, parts.prior.config.embedding_dim)
        if latents is None:
            x = samplers.randn(shape, generator, embeds.dtype, self.device)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"prior latents must have shape {shape}, got {tuple(latents.shape)}")
            x = latents.to(self.device)
        prior = parts.prior
        state = prior.prepare_condition(embeds, hidden, mask)

        def denoiser(x_t: torch.Tensor, t: int) -> torch.Tensor:
            inp = torch.cat([x_t, x_t]) if cfg else x_t
            out = prior.step(inp, t, state)
            if cfg:
                uncond_out, cond_out = out.chunk(2)
                out = uncond_out + guidance_scale * (cond_out - uncond_out)
            return out

        schedule = NoiseSchedule.from_config(parts.scheduler_config)
        timesteps = spaced_timesteps(steps, schedule.num_train_timesteps)
        x = samplers.unclip(denoiser, x, schedule, timesteps, generator=generator,
                            clip_range=float(parts.scheduler_config.get("clip_sample_range", 10.0)),
                            callback=self._step_callback("prior", len(timesteps)))
        self._offload(prior)
        return prior.denormalize(x)

    @torch.inference_mode()
    def mix_embeds(self, items: Sequence[MixItem], weights: Sequence[float], steps: int = 25,
                   guidance_scale: float = 4.0, seed: int | None = None, *, num_images: int = 1,
                   negative_prompt: str = "", negative_prior_prompt: str | None = None,
                   generator: torch.Generator | None = None) -> Embeds:
        """Weighted sum of the CLIP image embeddings of prompts (``str``) and images (PIL or ``Path``).

        As diffusers' ``KandinskyPriorPipeline.interpolate``: weights are not normalised, each prompt is one
        prior run, and one more prior run on ``negative_prompt`` gives the negative embedding. Returns (1, D).
        """
        items, weights = list(items) if items is not None else [], list(weights) if weights is not None else []
        if not items:
            raise ValueError("items is empty; give at least one prompt or image to mix")
        if len(items) != len(weights):
            raise ValueError(f"items has {len(items)} entries but weights has {len(weights)}; give one weight each")
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
                raise ValueError(f"weights must be finite numbers, got {w!r}")
        check_steps(steps)
        generator, _ = self.make_generator(seed, generator)
        parts = []
        for item, weight in zip(items, weights, strict=True):
            if isinstance(item, str):
                emb = self.prior_embeds(item, negative_prior_prompt, steps, guidance_scale, num_images=num_images,
                                        generator=generator).image
            elif isinstance(item, PIL.Image.Image | Path):
                emb = self.image_embeds([item])
            elif isinstance(item, torch.Tensor):
                emb = clip_image_embeds(self._need("prior").image_encoder, item.to(self.device, self.dtype))
            else:
                raise ValueError(f"mix items must be prompts (str), PIL images or Paths, got {type(item).__name__}")
            parts.append(emb * weight)
        image = torch.cat(parts).sum(dim=0, keepdim=True)
        if self.original:  # no extra prior run: the zero-image embedding, or the negative prompt's sample
            if negative_prompt == "":
                return Embeds(image, self.zero_image_embeds(1).to(image.dtype))
            return Embeds(image, self.prior_embeds(negative_prompt, None, steps, guidance_scale,
                                                   generator=generator).image)
        zero = self.prior_embeds(negative_prompt, negative_prior_prompt, steps, guidance_scale,
                                 num_images=num_images, generator=generator)
        return Embeds(image, zero.negative if negative_prompt == "" else zero.image)

    # ------------------------------------------------------------------ decoder

    def resolve(self, part: str, preset: str | None = None, **given: Any) -> dict[str, Any]:
        """Fill unspecified (None) arguments from the ``preset`` (see ``PRESETS``), then the model folder's
        defaults, then the published ones."""
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        published = {"width": 512, "height": 512, "steps": 100, "guidance_scale": 4.0, "sampler": "ddim",
                     "prior_steps": 25, "prior_guidance_scale": 4.0, "cfg_until": 1.0, "deep_cache": 1}
        if self.original:
            published.update(guidance_scale=7.0, sampler="p_sampler")
        folder = self.defaults(part)
        folder.update({f"prior_{k}": v for k, v in self.defaults("prior").items() if not k.startswith("prior_")})
        folder.update(PRESETS.get(preset or "default", {}))
        return {k: (v if v is not None else folder.get(k, published.get(k))) for k, v in given.items()}

    def _embeds_for(self, prompts: list[str], negative_prompt: Any, n: int, image_embeds: Any,
                    negative_image_embeds: Any, prior_steps: int, prior_guidance_scale: float,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, Any, int]:
        """Image embeddings (from the caller or the prior), the decoder's negative text, and images per row."""
        if image_embeds is None:
            if negative_image_embeds is not None:
                raise ValueError("negative_image_embeds was given without image_embeds; give both or neither")
            if self.original:  # the negative prompt only replaces the unconditional image embedding
                image = self.prior_embeds(prompts, None, prior_steps, prior_guidance_scale, num_images=n,
                                          generator=generator).image
                if negative_prompt is None or negative_prompt == "":
                    return image, self.zero_image_embeds(image.shape[0]).to(image.dtype), None, 1
                negatives = _prompt_list(negative_prompt, "negative_prompt")
                negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
                negative = self.prior_embeds(negatives, None, prior_steps, prior_guidance_scale, num_images=n,
                                             generator=generator).image
                return image, negative, None, 1
            embeds = self.prior_embeds(prompts, negative_prompt, prior_steps, prior_guidance_scale,
                                       num_images=n, generator=generator)
            return embeds.image, embeds.negative, None, 1
        image = _as_rows(image_embeds, "image_embeds")
        if negative_image_embeds is None:
            negative = self.zero_image_embeds(image.shape[0]) if self.prior is not None else None
            if negative is None:
                raise ValueError("give negative_image_embeds too (no prior model is loaded to make the zero embedding)")
        else:
            negative = _as_rows(negative_image_embeds, "negative_image_embeds")
        if negative.shape[0] == 1 and image.shape[0] > 1:
            negative = negative.expand(image.shape[0], -1)
        if negative.shape != image.shape:
            raise ValueError(f"negative_image_embeds has shape {tuple(negative.shape)} but image_embeds has "
                             f"{tuple(image.shape)}")
        return image, negative, negative_prompt, n

    @torch.inference_mode()
    def _decode(self, parts: DecoderParts, prompts: list[str], negative_prompt: Any, image: torch.Tensor,
                negative: torch.Tensor, n: int, width: int, height: int, steps: int, guidance_scale: float,
                sampler: str, generator: torch.Generator, *, init: torch.Tensor | None = None,
                strength: float | None = None, inpaint: tuple[torch.Tensor, torch.Tensor] | None = None,
                latents: torch.Tensor | None = None, cfg_until: float = 1.0, deep_cache: int = 1) -> torch.Tensor:
        """Run the decoder UNet loop and MoVQ decode; returns images in [-1, 1] (B, 3, H, W).

        ``cfg_until`` < 1 guides only the first fraction of the steps (the rest run the conditional half
        alone, at half the cost); ``deep_cache`` N > 1 runs the full UNet every N-th step and only its
        shallowest level in between (``DeepCache``)."""
        rows = image.shape[0]
        if len(prompts) == 1 and rows > 1:
            prompts = prompts * rows
        elif rows == 1 and len(prompts) > 1:
            image, negative = image.expand(len(prompts), -1), negative.expand(len(prompts), -1)
            rows = len(prompts)
        if len(prompts) != rows:
            raise ValueError(f"{len(prompts)} prompts but {rows} image embeddings; give one embedding per prompt")
        cfg = guidance_scale > 1.0
        pooled, hidden = self._decoder_text(parts, prompts)
        pooled, hidden = pooled.repeat_interleave(n, 0), hidden.repeat_interleave(n, 0)
        image = image.repeat_interleave(n, 0)
        batch = rows * n
        if cfg:
            if self.original:
                negative_prompt = None  # the original decoder's unconditional text is always ""
            uncond = [""] * len(prompts) if negative_prompt is None else _prompt_list(negative_prompt, "negative")
            if len(uncond) == 1:
                uncond = uncond * len(prompts)
            if len(uncond) != len(prompts):
                raise ValueError(f"negative_prompt has {len(uncond)} entries but there are {len(prompts)} prompts")
            u_pooled, u_hidden = self._decoder_text(parts, uncond)
            pooled = torch.cat([u_pooled.repeat_interleave(n, 0), pooled])
            hidden = torch.cat([u_hidden.repeat_interleave(n, 0), hidden])
            image = torch.cat([negative.repeat_interleave(n, 0), image])
        self._offload(parts.text_encoder)
        image = image.to(device=self.device, dtype=pooled.dtype)
        unet = parts.unet
        cond = unet.prepare_condition(image, pooled, hidden)
        lh, lw = latent_size(height, width, parts.movq.config.downscale_factor)
        channels = parts.movq.config.latent_channels
        shape = (batch, channels, lh, lw)

        timesteps, schedule, run = self._sampler(parts, sampler, steps, generator)
        if init is not None:  # img2img: noise the encoded image part of the way and denoise the rest
            z0 = _to_batch(parts.movq.encode(init.to(self.device, pooled.dtype)), batch)
            timesteps, t_noise = self._img2img_timesteps(timesteps, sampler, strength, schedule.num_train_timesteps)
            noise = samplers.randn(z0.shape, generator, hidden.dtype, self.device)
            x = img2img_noise_schedule().add_noise(z0, noise, torch.full((batch,), max(t_noise, 0)))
        elif latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            x = latents.to(self.device, hidden.dtype)
        else:
            x = samplers.randn(shape, generator, hidden.dtype, self.device)

        extra = known = None
        if inpaint is not None:
            masked, keep = (_to_batch(t.repeat_interleave(n, 0), batch) for t in inpaint)
            known = (masked, keep) if sampler == "p_sampler" else None
            extra = torch.cat([masked, keep], dim=1)
            if cfg:
                extra = extra.repeat(2, 1, 1, 1)

        guided_steps = math.ceil(cfg_until * len(timesteps)) if cfg else 0
        cond_only = cond.rows(slice(batch, None)) if cfg and guided_steps < len(timesteps) else cond
        cache = DeepCache(deep_cache) if deep_cache > 1 else None
        calls = [0]

        def denoiser(x_t: torch.Tensor, t: int) -> torch.Tensor:
            guided = calls[0] < guided_steps
            calls[0] += 1
            inp = torch.cat([x_t, x_t]) if guided else x_t
            if extra is not None:
                inp = torch.cat([inp, extra if guided or not cfg else extra[batch:]], dim=1)
            out = unet(inp, t, cond if guided or not cfg else cond_only, cache=cache)
            if guided:
                eps, var = out.split(channels, dim=1)
                eps_u, eps_c = eps.chunk(2)
                out = torch.cat([eps_u + guidance_scale * (eps_c - eps_u), var.chunk(2)[1]], dim=1)
            return out

        x = run(denoiser, x, timesteps, known, self._step_callback("decoder", len(timesteps)))
        if self.low_memory:
            unet.release_memory()
        else:  # the packed conv weights stay for the next call; the rest is mapped back from the page cache
            self._offload(unet)
        pixels = self._movq_decode(parts.movq, x)
        self._offload(parts.movq)
        return pixels

    def _movq_decode(self, movq: Any, z: torch.Tensor) -> torch.Tensor:
        """MoVQ decode: in overlapping tiles when ``tile_decode`` says so (None: above 1024² pixels, or 512²
        under ``low_memory``); under ``low_memory`` one image at a time."""
        f = movq.config.downscale_factor
        limit = (512 if self.low_memory else 1024) // f
        tiled = self.tile_decode if self.tile_decode is not None else z.shape[-2] * z.shape[-1] > limit * limit
        if self.low_memory and z.shape[0] > 1:
            return torch.cat([self._movq_decode(movq, row[None]) for row in z])
        return movq.decode_tiled(z) if tiled else movq.decode(z)

    def _img2img_timesteps(self, timesteps: list[int], sampler: str, strength: float,
                           total: int) -> tuple[list[int], int]:
        """The part of the trajectory img2img denoises, and the timestep its input is noised to.

        diffusers: ``strength`` is the fraction denoised; noise at ⌊T·s⌋ − 2. Original: ``strength`` is the
        fraction kept; DDIM keeps the steps ≤ ⌊T(1−s)⌋ and noises at that minus one, p_sampler keeps the first
        ⌊S(1−s)⌋ respaced steps and noises at the last of them.
        """
        steps = len(timesteps)
        if not self.original:
            init_steps = min(int(steps * strength), steps)
            return timesteps[steps - init_steps:], int(total * strength) - 2
        if sampler == "p_sampler":
            start = int(steps * (1 - strength))
            if start < 1:
                raise ValueError(f"strength {strength} keeps no step under compat='original'; use a smaller strength")
            return timesteps[steps - start:], timesteps[steps - start]
        start = int(total * (1 - strength))
        return [t for t in timesteps if t <= start], start - 1

    def _sampler(self, parts: DecoderParts, sampler: str, steps: int, generator: torch.Generator
                 ) -> tuple[list[int], NoiseSchedule, Callable]:
        """Timesteps, schedule and a runner ``run(denoiser, x, timesteps, known, callback)`` for a sampler."""
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
        cfg = parts.scheduler_config
        if sampler == "ddpm":
            cfg = {**DDPM_DEFAULTS, **(parts.ddpm_scheduler_config or {})}
        schedule = NoiseSchedule.from_config(cfg)
        total = schedule.num_train_timesteps
        check_steps(steps, total)

        if sampler == "ddim":
            final = torch.tensor(1.0) if cfg.get("set_alpha_to_one", False) else schedule.alphas_cumprod[0]
            if self.original:
                timesteps = original_ddim_timesteps(steps, total)
            else:
                timesteps = leading_timesteps(steps, total, int(cfg.get("steps_offset", 1)))
            return timesteps, schedule, lambda d, x, ts, known, progress: samplers.ddim(
                d, x, schedule, ts, final_alpha_cumprod=final, callback=progress)
        if sampler == "ddpm":
            timesteps = leading_timesteps(steps, total, int(cfg.get("steps_offset", 0)))
            return timesteps, schedule, lambda d, x, ts, known, progress: samplers.ddpm(
                d, x, schedule, ts, generator=generator, thresholding=bool(cfg.get("thresholding", True)),
                threshold_ratio=float(cfg.get("dynamic_thresholding_ratio", 0.995)),
                sample_max_value=float(cfg.get("sample_max_value", 2.0)), callback=progress)
        if sampler == "p_sampler":
            return spaced_timesteps(steps, total), schedule, lambda d, x, ts, known, progress: samplers.p_sampler(
                d, x, schedule, ts, generator=generator, known=known, callback=progress)
        # multistep solvers (diffusers' DPMSolverMultistep / UniPC, default, Karras or exponential sigmas)
        solver, spacing = samplers.multistep(sampler, generator)
        timesteps, sigmas = solver_sigmas(schedule, steps, spacing=spacing)
        return timesteps, schedule, lambda d, x, ts, known, progress: solver(
            d, x, schedule, ts, sigmas=sigmas[len(timesteps) - len(ts):], callback=progress)

    def set_progress(self, progress: bool | Callable[[str, int, int], None]) -> None:
        """Report sampling progress: ``True`` for tqdm bars on stderr, a callable ``(stage, done, total)``,
        or ``False`` for none (the default). A callable with a true ``wants_latents`` attribute is also given
        ``latents=`` the current sample after each step (the prior's embeddings, the decoder's latents)."""
        if progress is True:
            self.progress = TqdmProgress()
        elif progress is False or progress is None:
            self.progress = None
        elif callable(progress):
            self.progress = progress
        else:
            raise ValueError("progress must be True, False or a callable (stage, done, total)")

    def _step_callback(self, stage: str, total: int) -> samplers.Callback:
        if self.progress is None:
            return None
        report = self.progress
        if getattr(report, "wants_latents", False):  # a callback may ask for the current sample (live previews)
            return lambda i, t, x: report(stage, i + 1, total, latents=x)
        return lambda i, t, x: report(stage, i + 1, total)

    def _conditioned_job(self, part: str, prompt: Any, negative_prompt: Any, num_images: int, output: str,
                         seed: int | None, generator: torch.Generator | None, image_embeds: Any,
                         negative_image_embeds: Any, **given: Any) -> _Job:
        """Shared set-up of the prompt-conditioned modes: defaults, validation, generator, image embeddings."""
        a = self.resolve("decoder", **given)
        parts = self._need(part)
        prompts = _prompt_list(prompt, "prompt")
        self._validate(a, num_images, output)
        generator, used_seed = self.make_generator(seed, generator)
        image, negative, dec_negative, n = self._embeds_for(
            prompts, negative_prompt, num_images, image_embeds, negative_image_embeds, a["prior_steps"],
            a["prior_guidance_scale"], generator)
        return _Job(a, parts, prompts, generator, used_seed, image, negative, dec_negative, n)

    def _run_job(self, job: _Job, **extra: Any) -> torch.Tensor:
        a = job.args
        return self._decode(job.parts, job.prompts, job.decoder_negative, job.image, job.negative, job.n,
                            a["width"], a["height"], a["steps"], a["guidance_scale"], a["sampler"], job.generator,
                            cfg_until=a["cfg_until"], deep_cache=a["deep_cache"], **extra)

    # ------------------------------------------------------------------ public generation

    def text_to_image(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                      width: int | None = None, height: int | None = None, steps: int | None = None,
                      guidance_scale: float | None = None, sampler: str | None = None, seed: int | None = None,
                      image_embeds: torch.Tensor | None = None, negative_image_embeds: torch.Tensor | None = None,
                      prior_steps: int | None = None, prior_guidance_scale: float | None = None,
                      num_images: int = 1, output: str = "pil", generator: torch.Generator | None = None,
                      latents: torch.Tensor | None = None,
                      preset: str | None = None, cfg_until: float | None = None,
                      deep_cache: int | None = None) -> Any:
        """Generate images from prompts.

        Without ``image_embeds`` the prior runs first (``negative_prompt`` then steers the prior, as diffusers'
        combined pipeline does) and the same generator continues into the decoder. With ``image_embeds`` only
        the decoder runs and ``negative_prompt`` is the decoder's unconditional text (``KandinskyPipeline``).
        """
        job = self._conditioned_job("decoder", prompt, negative_prompt, num_images, output, seed, generator,
                                    image_embeds, negative_image_embeds, width=width, height=height, steps=steps,
                                    guidance_scale=guidance_scale, sampler=sampler, prior_steps=prior_steps,
                                    prior_guidance_scale=prior_guidance_scale,
                                    preset=preset, cfg_until=cfg_until, deep_cache=deep_cache)
        pixels = self._run_job(job, latents=latents)
        return self._finish(pixels, output, mode="txt2img", prompt=prompt, negative_prompt=negative_prompt,
                            seed=job.seed, **job.args)

    def img2img(self, image: imaging.ImageInput, prompt: str | list[str],
                negative_prompt: str | list[str] | None = None, *, strength: float | None = None,
                width: int | None = None, height: int | None = None, steps: int | None = None,
                guidance_scale: float | None = None, sampler: str | None = None, seed: int | None = None,
                image_embeds: torch.Tensor | None = None, negative_image_embeds: torch.Tensor | None = None,
                prior_steps: int | None = None, prior_guidance_scale: float | None = None,
                num_images: int = 1, output: str = "pil", generator: torch.Generator | None = None,
                preset: str | None = None, cfg_until: float | None = None, deep_cache: int | None = None) -> Any:
        """Redraw ``image`` towards ``prompt``. ``strength`` is the fraction of the trajectory denoised, in
        (0, 1], default 0.3 (diffusers' meaning); under ``compat="original"`` the fraction kept, in [0, 1),
        default 0.7. Size defaults to the image's own, rounded up to a multiple of 64."""
        if strength is None:
            strength = 0.7 if self.original else 0.3
        valid = isinstance(strength, int | float) and not isinstance(strength, bool) and (
            0 <= strength < 1 if self.original else 0 < strength <= 1)
        if not valid:
            interval = "[0, 1) (the fraction kept, compat='original')" if self.original else "(0, 1]"
            raise ValueError(f"strength must be in {interval}, got {strength!r}")
        src = imaging.open_image(image, "image")
        job = self._conditioned_job("decoder", prompt, negative_prompt, num_images, output, seed, generator,
                                    image_embeds, negative_image_embeds, width=width or _round64(src.width),
                                    height=height or _round64(src.height), steps=steps,
                                    guidance_scale=guidance_scale, sampler=sampler, prior_steps=prior_steps,
                                    prior_guidance_scale=prior_guidance_scale,
                                    preset=preset, cfg_until=cfg_until, deep_cache=deep_cache)
        f = job.parts.movq.config.downscale_factor
        lh, lw = latent_size(job.args["height"], job.args["width"], f)
        init = imaging.to_model_range(src, lw * f, lh * f)
        pixels = self._run_job(job, init=init, strength=float(strength))
        return self._finish(pixels, output, mode="img2img", prompt=prompt, negative_prompt=negative_prompt,
                            seed=job.seed, strength=strength, **job.args)

    def inpaint(self, image: imaging.ImageInput, mask: Any, prompt: str | list[str],
                negative_prompt: str | list[str] | None = None, *, width: int | None = None,
                height: int | None = None, steps: int | None = None, guidance_scale: float | None = None,
                sampler: str | None = None, seed: int | None = None, image_embeds: torch.Tensor | None = None,
                negative_image_embeds: torch.Tensor | None = None, prior_steps: int | None = None,
                prior_guidance_scale: float | None = None, num_images: int = 1, output: str = "pil",
                generator: torch.Generator | None = None,
                preset: str | None = None, cfg_until: float | None = None, deep_cache: int | None = None) -> Any:
        """Repaint the masked part of ``image``. ``mask``: PIL image (white = repaint), path, or an H×W array
        or tensor in [0, 1] (1 = repaint) of the image's size; under ``compat="original"`` 1 / white = keep.
        Needs the inpainting model."""
        parts = self._need("inpaint")
        src = imaging.open_image(image, "image")
        if isinstance(mask, str | Path | PIL.Image.Image):
            mask = imaging.open_image(mask, "mask")
        if isinstance(mask, PIL.Image.Image) and mask.size != src.size:
            raise ValueError(f"mask is {mask.width}×{mask.height} but the image is {src.width}×{src.height}; "
                             "give a mask of the image's size")
        if not isinstance(mask, PIL.Image.Image | np.ndarray | torch.Tensor):
            raise ValueError(f"mask must be a PIL image, a path, an array or a tensor, got {type(mask).__name__}")
        if self.original:  # the original's mask means 1 = keep
            mask = PIL.ImageOps.invert(mask.convert("L")) if isinstance(mask, PIL.Image.Image) else 1 - mask
        if not isinstance(mask, PIL.Image.Image):
            repaint = imaging.mask_to_tensor(mask, src.width, src.height)
        job = self._conditioned_job("inpaint", prompt, negative_prompt, num_images, output, seed, generator,
                                    image_embeds, negative_image_embeds, width=width or _round64(src.width),
                                    height=height or _round64(src.height), steps=steps,
                                    guidance_scale=guidance_scale, sampler=sampler, prior_steps=prior_steps,
                                    prior_guidance_scale=prior_guidance_scale,
                                    preset=preset, cfg_until=cfg_until, deep_cache=deep_cache)
        f = parts.movq.config.downscale_factor
        lh, lw = latent_size(job.args["height"], job.args["width"], f)
        if isinstance(mask, PIL.Image.Image):
            repaint = imaging.mask_to_tensor(mask, lw * f, lh * f)
        else:
            repaint = imaging.resize_mask_nearest(repaint, (lh * f, lw * f))
        with torch.inference_mode():
            pixels_in = imaging.to_inpaint_range(src, lw * f, lh * f).to(self.device, self.dtype)
            z = parts.movq.encode(pixels_in)
            keep = imaging.resize_mask_nearest((1 - repaint).to(self.device, z.dtype), z.shape[-2:])
            keep = imaging.dilate_keep_mask(keep)
        pixels = self._run_job(job, inpaint=(z * keep, keep))
        return self._finish(pixels, output, mode="inpaint", prompt=prompt, negative_prompt=negative_prompt,
                            seed=job.seed, **job.args)

    def mix(self, items: Sequence[MixItem], weights: Sequence[float], prompt: str = "", *,
            negative_prompt: str = "", negative_prior_prompt: str | None = None, width: int | None = None,
            height: int | None = None, steps: int | None = None, guidance_scale: float | None = None,
            sampler: str | None = None, seed: int | None = None, prior_steps: int | None = None,
            prior_guidance_scale: float | None = None, num_images: int = 1, output: str = "pil",
            generator: torch.Generator | None = None,
            preset: str | None = None, cfg_until: float | None = None, deep_cache: int | None = None) -> Any:
        """Mix prompts and images with weights in CLIP space, then decode (decoder prompt ``prompt``)."""
        a = self.resolve("decoder", width=width, height=height, steps=steps, guidance_scale=guidance_scale,
                          sampler=sampler, prior_steps=prior_steps, prior_guidance_scale=prior_guidance_scale,
                         preset=preset, cfg_until=cfg_until, deep_cache=deep_cache)
        parts = self._need("decoder")
        self._validate(a, num_images, output)
        generator, used_seed = self.make_generator(seed, generator)
        emb = self.mix_embeds(items, weights, a["prior_steps"], a["prior_guidance_scale"], generator=generator,
                              negative_prompt=negative_prompt, negative_prior_prompt=negative_prior_prompt)
        pixels = self._decode(parts, [prompt], None, emb.image, emb.negative, num_images, a["width"], a["height"],
                              a["steps"], a["guidance_scale"], a["sampler"], generator,
                              cfg_until=a["cfg_until"], deep_cache=a["deep_cache"])
        return self._finish(pixels, output, mode="mix", prompt=prompt, seed=used_seed, weights=list(weights),
                            items=[i if isinstance(i, str) else "<image>" for i in items], **a)

    def variations(self, image: imaging.ImageInput, prompt: str = "", *, negative_prompt: str | None = None,
                   width: int | None = None, height: int | None = None, steps: int | None = None,
                   guidance_scale: float | None = None, sampler: str | None = None, seed: int | None = None,
                   num_images: int = 1, output: str = "pil", generator: torch.Generator | None = None,
                   preset: str | None = None, cfg_until: float | None = None, deep_cache: int | None = None) -> Any:
        """New images from one image's CLIP embedding (negative: the zero-image embedding); ``prompt`` and
        ``negative_prompt`` are the decoder's text (empty by default)."""
        a = self.resolve("decoder", width=width, height=height, steps=steps, guidance_scale=guidance_scale,
                          sampler=sampler, preset=preset, cfg_until=cfg_until,
                         deep_cache=deep_cache)
        parts = self._need("decoder")
        self._validate(a, num_images, output)
        emb = self.image_embeds([image])
        generator, used_seed = self.make_generator(seed, generator)
        pixels = self._decode(parts, [prompt], negative_prompt, emb, self.zero_image_embeds(1), num_images, a["width"],
                              a["height"], a["steps"], a["guidance_scale"], a["sampler"], generator,
                              cfg_until=a["cfg_until"], deep_cache=a["deep_cache"])
        return self._finish(pixels, output, mode="variations", prompt=prompt, seed=used_seed, **a)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _validate(a: dict[str, Any], num_images: int, output: str) -> None:
        for key in ("width", "height"):
            v = a[key]
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v <= 0 or v % 8:
                raise ValueError(f"{key} must be a positive multiple of 8, got {v!r}")
        check_steps(a["steps"])
        if "prior_steps" in a:
            check_steps(a["prior_steps"])
            _check_guidance(a["prior_guidance_scale"], "prior_guidance_scale")
        _check_guidance(a["guidance_scale"], "guidance_scale")
        until = a.get("cfg_until", 1.0)
        if isinstance(until, bool) or not isinstance(until, int | float) or not 0 < until <= 1:
            raise ValueError(f"cfg_until must be a fraction of the steps in (0, 1], got {until!r}")
        _check_count(a.get("deep_cache", 1), "deep_cache")
        if a["sampler"] not in samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {a['sampler']!r}; choose one of {', '.join(samplers.SAMPLERS)}")
        _check_count(num_images, "num_images")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")

    def _finish(self, pixels: torch.Tensor, output: str, **info: Any) -> Any:
        if self.original:  # the original crops the decoded image to the requested size
            pixels = pixels[..., : info["height"], : info["width"]]
        elif info.get("width") is not None:  # a size off the model's grid comes out rounded up, as in diffusers:
            info["height"], info["width"] = pixels.shape[-2:]  # the record says what the image is
        info["compat"] = self.compat
        if self._loras_used:
            info["loras"] = [[name, scale] for name, scale in self._loras_used]
        result = imaging.postprocess(pixels.float(), output)
        if output == "pil":
            for img in result:
                img.info["kandinsky"] = info
        return result


@dataclass
class _Job:
    """What a prompt-conditioned call has resolved before the decoder runs."""

    args: dict[str, Any]
    parts: DecoderParts
    prompts: list[str]
    generator: torch.Generator
    seed: int | None
    image: torch.Tensor
    negative: torch.Tensor
    decoder_negative: Any
    n: int


def latent_size(height: int, width: int, factor: int = 8) -> tuple[int, int]:
    """Latent (h', w') for a pixel size: ceil(h / f²) · f for MoVQ factor f (512 → 64 with f = 8)."""
    return math.ceil(height / factor**2) * factor, math.ceil(width / factor**2) * factor


def _to_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat a one-row tensor to ``batch`` rows (rows already equal to ``batch`` pass through)."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] != 1:
        raise ValueError(f"cannot spread {x.shape[0]} rows over a batch of {batch}")
    return x.expand(batch, *x.shape[1:])


def _round64(v: int) -> int:
    return max(64, math.ceil(v / 64) * 64)


def _prompt_list(prompt: Any, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list | tuple) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")


def _as_rows(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, list | tuple):
        x = torch.cat([torch.as_tensor(t) for t in x])
    x = torch.as_tensor(x)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(x.shape)}")
    return x


def _check_count(v: Any, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _check_guidance(v: Any, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a non-negative number, got {v!r}")
