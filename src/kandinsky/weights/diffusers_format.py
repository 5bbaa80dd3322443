"""Load the diffusers-format Kandinsky 2.1 folders (kandinsky-2-1, -2-1-prior, -2-1-inpaint) into our modules.

Configs come from each component's ``config.json``; weights from ``.safetensors`` (memory-mapped) or ``.bin``
(``weights_only``). Modules are built on the meta device and filled in place, so nothing is initialised twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.movq import MoVQ, MoVQConfig
from ..models.prior import PriorConfig, PriorTransformer
from ..models.text_encoders import MultilingualCLIP, build_clip_text, build_clip_vision
from ..models.unet import DecoderUNet, UNetConfig
from .io import fill_module, find_weights, load_file_as, read_json, why_missing

DECODER_CLASSES = ("KandinskyPipeline", "KandinskyImg2ImgPipeline", "KandinskyInpaintPipeline")
PRIOR_CLASSES = ("KandinskyPriorPipeline",)
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model",)
TRANSFORMERS_WEIGHTS = ("model", "pytorch_model")
DEFAULTS_FILE = "kandinsky_defaults.json"


@dataclass
class DecoderParts:
    """Everything a decoder folder holds: UNet, MoVQ, M-CLIP text encoder, tokenizer and sampler configs."""

    unet: DecoderUNet
    movq: MoVQ
    text_encoder: MultilingualCLIP
    tokenizer: Any
    scheduler_config: dict[str, Any]
    ddpm_scheduler_config: dict[str, Any] | None
    folder: Path
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class PriorParts:
    """Everything a prior folder holds: prior, CLIP text and vision towers, tokenizer, preprocessing config."""

    prior: PriorTransformer
    text_encoder: nn.Module
    image_encoder: nn.Module
    tokenizer: Any
    scheduler_config: dict[str, Any]
    image_processor_config: dict[str, Any]
    folder: Path
    defaults: dict[str, Any] = field(default_factory=dict)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"fp32"``, ``"float16"``/``"fp16"``, ``"bfloat16"``/``"bf16"`` or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.float16, torch.bfloat16):
            return dtype
    else:
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if str(dtype).lower() in names:
            return names[str(dtype).lower()]
    raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")


def read_model_index(folder: Path, allowed: tuple[str, ...], role: str) -> dict[str, Any]:
    """Check that ``folder`` is a diffusers pipeline folder of one of the ``allowed`` classes."""
    folder = Path(folder)
    if not folder.is_dir():
        why = why_missing(folder, "folder")
        raise FileNotFoundError(f"{role} folder not found: {folder}" if why.startswith("missing") else why)
    index = read_json(folder / "model_index.json")
    cls = index.get("_class_name")
    if cls not in allowed:
        raise ValueError(f"{folder} holds a {cls!r} pipeline, but the {role} must be one of {list(allowed)}")
    return index


def _config(path: Path, parse: Any = None) -> Any:
    """Read a component's ``config.json`` and parse it; an invalid config raises a ValueError naming the file."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    try:
        return parse(raw) if parse is not None else raw
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


def _build(cls_or_fn: Any, config: Any, config_path: Path) -> nn.Module:
    try:
        with torch.device("meta"):
            return cls_or_fn(config)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise ValueError(f"{config_path} describes a model that cannot be built: {exc}") from exc


def _load_component(build: Any, folder: Path, stems: tuple[str, ...], *, dtype: torch.dtype,
                    device: torch.device | str, ignore: Any = None, parse: Any = None) -> nn.Module:
    """Build the module ``folder/config.json`` describes (``parse`` turns the JSON into ``build``'s argument)
    and fill it from the folder's weights; a config that does not match the weights is named in the error."""
    config_path = folder / "config.json"
    module = _build(build, _config(config_path, parse), config_path)
    path = find_weights(folder, stems)
    try:
        return fill_module(module, load_file_as(path, dtype, device), str(path), ignore=ignore, dtype=dtype,
                           device=device)
    except ValueError as exc:
        if "does not match the model config" in str(exc) or "wrong shape" in str(exc):
            raise ValueError(f"{exc} (the config is {config_path})") from exc
        raise


def _defaults(folder: Path) -> dict[str, Any]:
    path = folder / DEFAULTS_FILE
    return read_json(path) if path.is_file() else {}


def _ignore_hf_extras(key: str) -> bool:
    """Tensors some transformers checkpoints carry that no computation uses."""
    return key.endswith("position_ids") or key.startswith("transformer.pooler.")


def load_decoder(folder: str | Path, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, inpaint: bool | None = None) -> DecoderParts:
    """Load a kandinsky-2-1 (or -2-1-inpaint) folder. ``inpaint`` checks the UNet's input channels."""
    from transformers import XLMRobertaTokenizer

    folder = Path(folder)
    role = "inpaint model" if inpaint else "decoder"
    read_model_index(folder, DECODER_CLASSES, role)
    unet_cfg = _config(folder / "unet" / "config.json", UNetConfig.from_dict)
    if inpaint is True and unet_cfg.in_channels != 9:
        raise ValueError(f"{folder} has a {unet_cfg.in_channels}-channel UNet; inpainting needs the 9-channel "
                         "kandinsky-2-1-inpaint model")
    if inpaint is False and unet_cfg.in_channels != 4:
        raise ValueError(f"{folder} has a {unet_cfg.in_channels}-channel UNet; pass it as inpaint=, not decoder=")
    unet = _load_component(DecoderUNet, folder / "unet", DIFFUSERS_WEIGHTS, dtype=dtype, device=device,
                           parse=UNetConfig.from_dict)
    movq = _load_component(MoVQ, folder / "movq", DIFFUSERS_WEIGHTS, dtype=dtype, device=device,
                           parse=MoVQConfig.from_dict)
    text_encoder = _load_component(MultilingualCLIP.from_dict, folder / "text_encoder", TRANSFORMERS_WEIGHTS,
                                   dtype=dtype, device=device, ignore=_ignore_hf_extras)
    tokenizer = _tokenizer(XLMRobertaTokenizer, folder / "tokenizer")
    ddpm_path = folder / "ddpm_scheduler" / "scheduler_config.json"
    return DecoderParts(
        unet=unet, movq=movq, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
        ddpm_scheduler_config=read_json(ddpm_path) if ddpm_path.is_file() else None,
        folder=folder, defaults=_defaults(folder),
    )


def load_prior(folder: str | Path, *, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> PriorParts:
    """Load a kandinsky-2-1-prior folder."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    read_model_index(folder, PRIOR_CLASSES, "prior")
    prior = _load_component(PriorTransformer, folder / "prior", DIFFUSERS_WEIGHTS, dtype=dtype, device=device,
                            parse=PriorConfig.from_dict)
    text_encoder = _load_component(build_clip_text, folder / "text_encoder", TRANSFORMERS_WEIGHTS, dtype=dtype,
                                   device=device, ignore=_ignore_hf_extras)
    image_encoder = _load_component(build_clip_vision, folder / "image_encoder", TRANSFORMERS_WEIGHTS, dtype=dtype,
                                    device=device, ignore=_ignore_hf_extras)
    proc_path = folder / "image_processor" / "preprocessor_config.json"
    return PriorParts(
        prior=prior, text_encoder=text_encoder, image_encoder=image_encoder,
        tokenizer=_tokenizer(CLIPTokenizer, folder / "tokenizer"),
        scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
        image_processor_config=read_json(proc_path) if proc_path.is_file() else {},
        folder=folder, defaults=_defaults(folder),
    )


def _tokenizer(cls: Any, folder: Path) -> Any:
    if not folder.is_dir():
        why = why_missing(folder, "folder")
        raise FileNotFoundError(f"tokenizer folder not found: {folder}" if why.startswith("missing") else why)
    try:
        return cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load the tokenizer in {folder}: {exc}") from exc
