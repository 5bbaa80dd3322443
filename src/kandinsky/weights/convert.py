"""Convert Kandinsky 2.1 weights: the original file set -> diffusers-format folders; any weights -> safetensors.

Every input is read safely (``original_format.read_weights``: safetensors, ``weights_only`` pickles, TorchScript
tensor records); outputs are written atomically (temporary file, then rename). An existing non-empty destination
is never overwritten unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..models.movq import MoVQ, MoVQConfig
from ..models.prior import PriorConfig, PriorTransformer
from ..models.text_encoders import MultilingualCLIP, build_clip_text, build_clip_vision
from ..models.unet import DecoderUNet, UNetConfig
from . import original_format as of
from .diffusers_format import _ignore_hf_extras, resolve_dtype
from .io import PICKLE_SUFFIXES, fill_module, find_weights

DIFFUSERS_VERSION = "0.21.0"  # written into the configs; any diffusers >= this reads them
XLMR_TOKENIZER_FILES = ("sentencepiece.bpe.model", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json", "added_tokens.json")
WEIGHT_FILE_SUFFIXES = PICKLE_SUFFIXES + (".safetensors",)
FILE_KWARGS = ("decoder", "inpaint", "prior", "movq", "clip", "clip_stats", "text_encoder")


def convert(src: str | Path | None, dst: str | Path, *, to: str = "diffusers",
            dtype: str | torch.dtype | None = None, progress: bool = True, overwrite: bool = False,
            clip_tokenizer: str | Path | None = None, configs: Mapping[str, Mapping[str, Any]] | None = None,
            **files: Any) -> list[Path]:
    """Convert ``src`` into ``dst``; returns the written paths.

    ``to="diffusers"``: ``src`` is an original Kandinsky 2.1 folder (individual files may be given or overridden
    with ``decoder=``, ``inpaint=``, ``prior=``, ``movq=``, ``clip=``, ``clip_stats=``, ``text_encoder=``, as for
    ``load_original``; ``clip_tokenizer`` and ``configs`` too). Writes ``dst/decoder``, ``dst/prior`` and, when
    the inpainting checkpoint exists, ``dst/inpaint``, in the published kandinsky-community layout (loadable by
    ``diffusers.KandinskyPipeline.from_pretrained`` etc. and by ``load_decoder`` / ``load_prior``); returns those
    folders. ``dtype`` defaults to fp32 (as published).

    ``to="safetensors"``: ``src`` is one weights file (``.ckpt``/``.pt``/``.th``/``.bin``/``.pth``/
    ``.safetensors``, a TorchScript archive, or the CLIP stats pair) or a folder, converted file by file with the
    other files copied (``pytorch_model.bin`` becomes ``model.safetensors``). ``dst`` is a ``.safetensors`` file
    (single-file input) or a folder. ``dtype`` None keeps each tensor's precision. Returns the written files.

    ``dtype``: "fp16", "fp32" or "bf16" (floating tensors only). A progress bar goes to stderr unless
    ``progress=False``. A non-empty ``dst`` raises FileExistsError unless ``overwrite=True``.
    """
    unknown = sorted(set(files) - set(FILE_KWARGS))
    if unknown:
        raise TypeError(f"convert() got unexpected arguments {unknown}")
    if to == "diffusers":
        return _to_diffusers(src, Path(dst), dtype=resolve_dtype(dtype or "fp32"), progress=progress,
                             overwrite=overwrite, clip_tokenizer=clip_tokenizer, configs=configs or {}, files=files)
    if to == "safetensors":
        if files or clip_tokenizer is not None or configs:
            raise TypeError("to='safetensors' takes only src and dst (no file, tokenizer or config overrides)")
        if src is None:
            raise ValueError("to='safetensors' needs src (a weights file or a folder)")
        return _to_safetensors(Path(src), Path(dst), dtype=resolve_dtype(dtype) if dtype is not None else None,
                               progress=progress, overwrite=overwrite)
    raise ValueError(f"to must be 'diffusers' or 'safetensors', got {to!r}")


# ----------------------------------------------------------------------------------------------------------------
# writing helpers


def _check_destination(dst: Path, overwrite: bool) -> None:
    if dst.is_file() or (dst.is_dir() and any(dst.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{dst} already exists and is not empty; pass overwrite=True to replace it")


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not progress, leave=True)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, *, dtype: torch.dtype | None = None,
                     bar: tqdm | None = None) -> Path:
    """Write ``tensors`` (floating ones cast to ``dtype``) to ``path`` atomically, with ``format: pt`` metadata.

    Tensors sharing memory are copied, as safetensors requires.
    """
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
        if bar is not None:
            bar.update(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        save_file(out, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_json(path: Path, data: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(data), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def _diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {**config, "_diffusers_version": DIFFUSERS_VERSION}


def _verify(builder: Any, config: Any, tensors: Mapping[str, torch.Tensor], source: str,
            ignore: Any = None) -> None:
    """Check names and shapes against our module built on the meta device (no memory is used)."""
    with torch.device("meta"):
        module = builder(config)
    fill_module(module, {k: v.to("meta") for k, v in tensors.items()}, source, ignore=ignore, device="meta")


# ----------------------------------------------------------------------------------------------------------------
# original -> diffusers


def _to_diffusers(src: str | Path | None, dst: Path, *, dtype: torch.dtype, progress: bool, overwrite: bool,
                  clip_tokenizer: str | Path | None, configs: Mapping[str, Mapping[str, Any]],
                  files: Mapping[str, Any]) -> list[Path]:
    paths = of.resolve_original_paths(src, **files)
    tokenizer_path = of.find_clip_tokenizer(src, clip_tokenizer)
    unknown = sorted(set(configs) - {"unet", "movq", "prior", "clip_text", "clip_vision"})
    if unknown:
        raise ValueError(f"configs has unknown components {unknown}; use unet, movq, prior, clip_text, clip_vision")
    _check_destination(dst, overwrite)
    targets = {"decoder": dst / "decoder", "prior": dst / "prior"}
    if paths.inpaint is not None:
        targets["inpaint"] = dst / "inpaint"

    # read and map everything first, so that a bad file fails before anything is written
    movq_sd = of.read_weights(paths.movq)
    movq_cfg = of.movq_config_from_original(movq_sd, source=str(paths.movq), **configs.get("movq", {}))
    movq = of.movq_from_original(movq_sd, source=str(paths.movq))
    _verify(MoVQ, MoVQConfig.from_dict(movq_cfg), movq, str(paths.movq))
    del movq_sd

    te_weights = find_weights(paths.text_encoder, ("model", "pytorch_model"))
    te_sd = {k: v for k, v in of.read_weights(te_weights).items() if not k.endswith("position_ids")}
    te_cfg = of.mclip_config(paths.text_encoder, te_sd)
    te_cfg["architectures"] = ["MultilingualCLIP"]
    _verify(MultilingualCLIP.from_dict, te_cfg, te_sd, str(te_weights), ignore=_ignore_hf_extras)
    tokenizer_files = [paths.text_encoder / n for n in XLMR_TOKENIZER_FILES if (paths.text_encoder / n).is_file()]
    if not tokenizer_files:
        raise FileNotFoundError(f"no XLM-R tokenizer files in {paths.text_encoder} (expected "
                                f"{', '.join(XLMR_TOKENIZER_FILES[:2])})")

    unets: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}
    for role, path, channels in (("decoder", paths.decoder, 4), ("inpaint", paths.inpaint, 9)):
        if path is None:
            continue
        sd = of.read_weights(path)
        cfg = of.unet_config_from_original(sd, source=str(path), **configs.get("unet", {}))
        if cfg["in_channels"] != channels:
            raise ValueError(f"{path} has a {cfg['in_channels']}-channel UNet; the {role} needs {channels}")
        mapped = of.unet_from_original(sd, head_dim=int(cfg["attention_head_dim"]), source=str(path))
        _verify(DecoderUNet, UNetConfig.from_dict(cfg), mapped, str(path))
        unets[role] = (cfg, mapped)

    prior_sd = of.read_weights(paths.prior)
    prior_cfg = of.prior_config_from_original(prior_sd, source=str(paths.prior), **configs.get("prior", {}))
    prior = of.prior_from_original(prior_sd, of.read_clip_stats(paths.clip_stats),
                                   head_dim=int(prior_cfg["attention_head_dim"]), source=str(paths.prior))
    _verify(PriorTransformer, PriorConfig.from_dict(prior_cfg), prior, str(paths.prior))
    del prior_sd
    text_sd, vision_sd, text_cfg, vision_cfg = of.openai_clip_parts(paths.clip, configs=configs)
    _verify(build_clip_text, text_cfg, text_sd, str(paths.clip))
    _verify(build_clip_vision, vision_cfg, vision_sd, str(paths.clip))
    clip_tok = of.load_clip_tokenizer(tokenizer_path, text_cfg["max_position_embeddings"])

    for folder in targets.values():
        if folder.exists():
            shutil.rmtree(folder)  # only reached with overwrite=True, once every input has been read and checked
    total = len(prior) + len(text_sd) + len(vision_sd) + sum(len(movq) + len(te_sd) + len(m) for _, m in unets.values())
    with _bar(total, "converting to diffusers", progress) as bar:
        for role, (cfg, mapped) in unets.items():
            folder = targets[role]
            cls = "KandinskyInpaintPipeline" if role == "inpaint" else "KandinskyPipeline"
            _write_json(folder / "model_index.json", {
                "_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION, "movq": ["diffusers", "VQModel"],
                "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["kandinsky", "MultilingualCLIP"],
                "tokenizer": ["transformers", "XLMRobertaTokenizerFast"],
                "unet": ["diffusers", "UNet2DConditionModel"]})
            _write_json(folder / "unet" / "config.json", _diffusers_config(cfg))
            save_safetensors(mapped, folder / "unet" / "diffusion_pytorch_model.safetensors", dtype=dtype, bar=bar)
            _write_json(folder / "movq" / "config.json", _diffusers_config(movq_cfg))
            save_safetensors(movq, folder / "movq" / "diffusion_pytorch_model.safetensors", dtype=dtype, bar=bar)
            _write_json(folder / "text_encoder" / "config.json", te_cfg)
            save_safetensors(te_sd, folder / "text_encoder" / "model.safetensors", dtype=dtype, bar=bar)
            for f in tokenizer_files:
                (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, folder / "tokenizer" / f.name)
            _write_json(folder / "scheduler" / "scheduler_config.json", _diffusers_config(of.DDIM_CONFIG))
            _write_json(folder / "ddpm_scheduler" / "scheduler_config.json", _diffusers_config(of.DDPM_CONFIG))

        folder = targets["prior"]
        _write_json(folder / "model_index.json", {
            "_class_name": "KandinskyPriorPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "image_processor": ["transformers", "CLIPImageProcessor"], "prior": ["diffusers", "PriorTransformer"],
            "scheduler": ["diffusers", "UnCLIPScheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"]})
        _write_json(folder / "prior" / "config.json", _diffusers_config(prior_cfg))
        save_safetensors(prior, folder / "prior" / "diffusion_pytorch_model.safetensors", dtype=dtype, bar=bar)
        _write_transformers_config("CLIPTextConfig", text_cfg, folder / "text_encoder", dtype)
        save_safetensors(text_sd, folder / "text_encoder" / "model.safetensors", dtype=dtype, bar=bar)
        _write_transformers_config("CLIPVisionConfig", vision_cfg, folder / "image_encoder", dtype)
        save_safetensors(vision_sd, folder / "image_encoder" / "model.safetensors", dtype=dtype, bar=bar)
        clip_tok.save_pretrained(str(folder / "tokenizer"))
        _write_json(folder / "scheduler" / "scheduler_config.json", _diffusers_config(of.UNCLIP_CONFIG))
        _write_json(folder / "image_processor" / "preprocessor_config.json",
                    of.clip_image_processor_config(int(vision_cfg["image_size"])))
    return [targets[k] for k in ("decoder", "prior", "inpaint") if k in targets]


def _write_transformers_config(cls_name: str, config: Mapping[str, Any], folder: Path, dtype: torch.dtype) -> Path:
    import transformers

    cfg = dict(config)
    architectures = cfg.pop("architectures", None)
    cfg.pop("model_type", None)
    obj = getattr(transformers, cls_name)(**cfg)
    obj.architectures = architectures
    folder.mkdir(parents=True, exist_ok=True)
    data = obj.to_dict()
    data["dtype" if "dtype" in data else "torch_dtype"] = str(dtype).removeprefix("torch.")
    return _write_json(folder / "config.json", data)


# ----------------------------------------------------------------------------------------------------------------
# any -> safetensors


def _safetensors_name(path: Path) -> str:
    return {"pytorch_model": "model"}.get(path.stem, path.stem) + ".safetensors"


def read_any(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of any supported weights file; the CLIP stats pair becomes ``{"mean", "std"}``."""
    path = Path(path)
    try:
        return of.read_weights(path)
    except ValueError as exc:
        if path.suffix not in PICKLE_SUFFIXES or of.is_torchscript_archive(path):
            raise  # a TorchScript archive is never the stats pair: no second reading of a refused file
        try:
            mean, std = of.read_clip_stats(path)
        except ValueError:
            raise exc from None
        return {"mean": mean, "std": std}


def _to_safetensors(src: Path, dst: Path, *, dtype: torch.dtype | None, progress: bool,
                    overwrite: bool) -> list[Path]:
    if not src.exists():
        raise FileNotFoundError(f"nothing to convert: {src} does not exist")
    if src.is_file():
        if src.suffix not in WEIGHT_FILE_SUFFIXES:
            raise ValueError(f"{src} is not a weights file ({', '.join(WEIGHT_FILE_SUFFIXES)})")
        out = dst if dst.suffix == ".safetensors" else dst / _safetensors_name(src)
        _check_destination(out, overwrite)
        if out.resolve() == src.resolve():
            raise ValueError(f"{src}: source and destination are the same file")
        tensors = read_any(src)
        with _bar(len(tensors), src.name, progress) as bar:
            return [save_safetensors(tensors, out, dtype=dtype, bar=bar)]
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError(f"destination {dst} must not be {src} or inside it")
    _check_destination(dst, overwrite)
    plan = _folder_plan(src)
    written: list[Path] = []
    with tqdm(total=len(plan), desc="converting to safetensors", unit="file", file=sys.stderr,
              disable=not progress) as bar:
        for source, rel, convert_it in plan:
            out = dst / rel
            if convert_it:
                bar.set_postfix_str(source.name)
                written.append(save_safetensors(read_any(source), out, dtype=dtype))
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, out)
                written.append(out)
            bar.update(1)
    return written


def _folder_plan(src: Path) -> list[tuple[Path, Path, bool]]:
    """(source, relative output path, convert?) for every file under ``src``; a pickle whose safetensors
    counterpart already exists is skipped (the existing one is converted or copied instead)."""
    plan: list[tuple[Path, Path, bool]] = []
    taken: set[Path] = set()
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for path in sorted(files, key=lambda p: p.suffix != ".safetensors"):
        rel = path.relative_to(src)
        if path.suffix in WEIGHT_FILE_SUFFIXES:
            out = rel.with_name(_safetensors_name(path))
            if out in taken:
                continue
            taken.add(out)
            plan.append((path, out, True))
        else:
            plan.append((path, rel, False))
    return sorted(plan, key=lambda item: str(item[1]))

