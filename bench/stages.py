"""Every stage of one Kandinsky 2.1 generation, ours against diffusers, side by side in one run (CPU).

The published architecture with random weights (built on the meta device and filled as ``bench/e2e.py make``
does, then shared: ours loads diffusers' tensors with ``assign=True``, so both compute with the same memory).
One stage at a time is built, timed and freed, so that the peak memory is that of the largest stage. Each stage
is called the way each pipeline calls it:

* text encoders: the prior's CLIP ViT-L/14 text tower and the decoder's M-CLIP (XLM-R large), batch 2 (prompt
  and negative), 77 tokens; the CLIP ViT-L/14 image tower (image prompts, mixing), one image;
* prior: ``--steps`` sampling steps, batch 2 (guidance): ours ``prepare_condition`` once then ``step`` per step
  (cached text K/V), diffusers' ``PriorTransformer`` forward per step; reported per step, ours' one-time part
  spread over the steps;
* decoder UNet: ``--steps`` steps, batch 2, at ``--size``: ours ``prepare_condition`` once, then the forwards;
* MoVQ decode (every generation) and encode (img2img, inpainting, image mixing), batch 1, at ``--movq-sizes``.

Ours and diffusers alternate call by call (``--repeats`` timed calls each after one untimed warm-up call, which
packs ours' weights where a stage keeps them packed); the table gives medians of wall time and of process CPU
time (the steadier of the two on a shared machine), the ratios ours / diffusers (lower is better) and the largest
difference between the two outputs. The header gives the CPU model, the threads and the load average; the load
average is printed again after each stage.

``--rss`` adds the peak resident memory of one MoVQ decode at the largest ``--movq-sizes``, ours and diffusers,
each in a fresh process (the model built in that process; before and peak, MB).

    PYTHONPATH=src python bench/stages.py --size 256 --movq-sizes 256 512 --steps 2 --repeats 3 --rss
    PYTHONPATH=src python bench/stages.py --only movq --movq-sizes 512 --repeats 5 [--movq-bf16]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from e2e import _fill  # noqa: E402
from unet_step import PUBLISHED as UNET  # noqa: E402

MOVQ = dict(block_out_channels=[128, 256, 256, 512], down_block_types=["DownEncoderBlock2D"] * 3
            + ["AttnDownEncoderBlock2D"], up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
            norm_type="spatial", num_vq_embeddings=16384, vq_embed_dim=4, sample_size=256)
MCLIP = dict(numDims=768, transformerDimSize=1024, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
             num_hidden_layers=24, vocab_size=250002, max_position_embeddings=514, type_vocab_size=1,
             layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
PRIOR = dict(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768, num_embeddings=77,
             additional_embeddings=4)
CLIP_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                   image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
STAGES = ("text", "prior", "unet", "movq")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def build(cls: type, seed: int, *args: Any, **kwargs: Any) -> torch.nn.Module:
    """A diffusers / transformers module of the published size with random weights (no initialisation pass)."""
    with torch.device("meta"):
        module = cls(*args, **kwargs)
    module = _fill(module, seed).requires_grad_(False)
    mask = getattr(module, "causal_attention_mask", None)  # diffusers' prior: a buffer that _fill zeroed
    if mask is not None:
        mask.fill_(-10000.0).triu_(1)
    return module


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ``ru_maxrss``, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def share(ours: torch.nn.Module, ref: torch.nn.Module) -> torch.nn.Module:
    """Ours (built on the meta device) takes diffusers' tensors themselves, non-persistent buffers included."""
    missing, _ = ours.load_state_dict(ref.state_dict(), strict=False, assign=True)
    if missing:
        raise RuntimeError(f"{type(ours).__name__}: no weights for {missing[:5]}")
    theirs = dict(ref.named_buffers())
    for name, buf in list(ours.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            ours.get_submodule(owner).register_buffer(leaf, theirs[name], persistent=False)
    return ours.eval().requires_grad_(False)


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def first(x: Any) -> torch.Tensor:
    """The tensor a stage is compared on."""
    if isinstance(x, tuple | list):
        return first(x[0])
    return x


class Table:
    def __init__(self, repeats: int) -> None:
        self.repeats = repeats
        self.rows: list[dict[str, Any]] = []

    def compare(self, name: str, ours: Callable[[], Any], ref: Callable[[], Any], per: int = 1) -> dict[str, Any]:
        """Warm up both, then ``repeats`` alternating timed calls; ``per`` divides the times (per-step rows).

        The calls run under ``torch.inference_mode``; the modules must be built outside it (weights that are
        inference tensors have no version counter, which the packed-weight caches read)."""
        ours_fn, ref_fn = ours, ref

        def ours() -> Any:
            with torch.inference_mode():
                return ours_fn()

        def ref() -> Any:
            with torch.inference_mode():
                return ref_fn()

        _, _, out_ours = timed(ours)
        _, _, out_ref = timed(ref)
        diff = float((first(out_ours).float() - first(out_ref).float()).abs().max())
        scale = float(first(out_ref).float().abs().max())
        del out_ours, out_ref
        runs: dict[str, list[tuple[float, float]]] = {"ours": [], "diffusers": []}
        for _ in range(self.repeats):
            for key, fn in (("diffusers", ref), ("ours", ours)):
                wall, cpu, out = timed(fn)
                del out
                runs[key].append((wall / per, cpu / per))
        med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
        row = {"stage": name, "ours_s": med["ours"][0], "diffusers_s": med["diffusers"][0],
               "ratio_wall": med["ours"][0] / med["diffusers"][0], "ours_cpu_s": med["ours"][1],
               "diffusers_cpu_s": med["diffusers"][1], "ratio_cpu": med["ours"][1] / med["diffusers"][1],
               "max_abs_diff": diff, "ref_scale": scale, "load": load(),
               "ours_runs": [round(w, 2) for w, _ in runs["ours"]],
               "diffusers_runs": [round(w, 2) for w, _ in runs["diffusers"]]}
        self.rows.append(row)
        print(f"| {name} | {row['ours_s']:.3f} | {row['diffusers_s']:.3f} | **{row['ratio_wall']:.3f}** | "
              f"{row['ours_cpu_s']:.2f} / {row['diffusers_cpu_s']:.2f} = {row['ratio_cpu']:.3f} | "
              f"{diff:.1e} (of {scale:.2g}) | {row['load']} |", flush=True)
        return row


# ----------------------------------------------------------------------------------------------------------
# stages; each builds its modules, times them and lets them go


def clip_text_stage(table: Table) -> None:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from kandinsky.models.text_encoders import build_clip_text, clip_text_features

    ids = torch.randint(3, 49000, (2, 77), generator=torch.Generator().manual_seed(0))
    ref = build(CLIPTextModelWithProjection, 1, CLIPTextConfig(**CLIP_TEXT))
    with torch.device("meta"):
        ours = build_clip_text(ref.config.to_dict())
    ours = share(ours, ref)
    table.compare("prior text encoder (CLIP ViT-L/14 text), batch 2",
                  lambda: clip_text_features(ours, ids), lambda: ref(ids).text_embeds)


def mclip_stage(table: Table) -> None:
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig
    from diffusers.pipelines.kandinsky.text_encoder import MultilingualCLIP as RefMCLIP

    from kandinsky.models.text_encoders import MultilingualCLIP

    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 77, dtype=torch.long)
    mask[1, 20:] = 0  # a short negative prompt, padded
    ids = torch.randint(3, 250000, (2, 77), generator=g)
    ref = build(RefMCLIP, 2, MCLIPConfig(**MCLIP))
    with torch.device("meta"):
        ours = MultilingualCLIP.from_dict(ref.config.to_dict())
    ours = share(ours, ref)
    table.compare("decoder text encoder (M-CLIP, XLM-R large), batch 2",
                  lambda: ours(ids, mask), lambda: ref(input_ids=ids, attention_mask=mask))


def clip_vision_stage(table: Table) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from kandinsky.models.text_encoders import build_clip_vision, clip_image_embeds

    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ref = build(CLIPVisionModelWithProjection, 3, CLIPVisionConfig(**CLIP_VISION))
    with torch.device("meta"):
        ours = build_clip_vision(ref.config.to_dict())
    ours = share(ours, ref)
    table.compare("image encoder (CLIP ViT-L/14 vision; img2img, mixing), 1 image",
                  lambda: clip_image_embeds(ours, pixels), lambda: ref(pixel_values=pixels).image_embeds)


def prior_stage(table: Table, steps: int) -> None:
    from diffusers import PriorTransformer as RefPrior

    from kandinsky.models.prior import PriorConfig, PriorTransformer

    ref = build(RefPrior, 4, **PRIOR)
    with torch.device("meta"):
        ours = PriorTransformer(PriorConfig.from_dict(dict(ref.config)))
    ours = share(ours, ref)
    g = torch.Generator().manual_seed(0)
    embeds, hidden = torch.randn(2, 768, generator=g), torch.randn(2, 77, 768, generator=g)
    mask = torch.ones(2, 77, dtype=torch.bool)
    mask[0, 10:] = False  # the empty negative prompt
    x = torch.randn(2, 768, generator=g)
    timesteps = torch.linspace(999, 0, steps).long().tolist()

    def run_ours() -> torch.Tensor:
        state = ours.prepare_condition(embeds, hidden, mask)
        return [ours.step(x, t, state) for t in timesteps][-1]

    def run_ref() -> torch.Tensor:
        return [ref(x, timestep=t, proj_embedding=embeds, encoder_hidden_states=hidden,
                    attention_mask=mask).predicted_image_embedding for t in timesteps][-1]

    table.compare(f"prior, per step (batch 2; {steps} steps, ours' text K/V once)", run_ours, run_ref, per=steps)


def unet_stage(table: Table, steps: int, size: int) -> None:
    from diffusers import UNet2DConditionModel

    from kandinsky.models.unet import DecoderUNet, UNetConfig

    ref = build(UNet2DConditionModel, 5, **UNET)
    with torch.device("meta"):
        ours = DecoderUNet(UNetConfig.from_dict(dict(ref.config)))
    ours = share(ours, ref)
    g = torch.Generator().manual_seed(0)
    image, pooled, hidden = (torch.randn(*s, generator=g) for s in ((2, 768), (2, 768), (2, 77, 1024)))
    x = torch.randn(2, 4, size // 8, size // 8, generator=g)
    timesteps = torch.linspace(999, 0, steps).long().tolist()
    added = {"text_embeds": pooled, "image_embeds": image}

    def run_ours() -> torch.Tensor:
        cond = ours.prepare_condition(image, pooled, hidden)
        return [ours(x, t, cond) for t in timesteps][-1]

    def run_ref() -> torch.Tensor:
        return [ref(x, t, hidden, added_cond_kwargs=added).sample for t in timesteps][-1]

    table.compare(f"decoder UNet, per step (batch 2, {size}²; {steps} steps)", run_ours, run_ref, per=steps)


def movq_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    from diffusers import VQModel

    from kandinsky.models.movq import MoVQ, MoVQConfig

    ref = build(VQModel, 6, **MOVQ)
    with torch.device("meta"):
        ours = MoVQ(MoVQConfig.from_dict(dict(ref.config)))
    return share(ours, ref), ref


def movq_stages(table: Table, sizes: list[int], bf16: bool = False) -> None:
    ours, ref = movq_pair()
    g = torch.Generator().manual_seed(0)
    for size in sizes:
        z = torch.randn(1, 4, size // 8, size // 8, generator=g)
        table.compare(f"MoVQ decode, {size}²", lambda z=z: ours.decode(z),
                      lambda z=z: ref.decode(z, force_not_quantize=True).sample)
    if bf16:  # ours in bfloat16 (what precision="auto" picks where the CPU computes it natively) vs diffusers fp32
        from kandinsky.models.movq import MoVQ

        with torch.device("meta"):
            half = MoVQ(ours.config)
        half.load_state_dict({k: v.bfloat16() for k, v in ref.state_dict().items()}, assign=True)
        half.eval().requires_grad_(False)
        for size in sizes:
            z = torch.randn(1, 4, size // 8, size // 8, generator=g)
            table.compare(f"MoVQ decode, {size}², ours bf16 vs diffusers fp32", lambda z=z: half.decode(z.bfloat16()),
                          lambda z=z: ref.decode(z, force_not_quantize=True).sample)
        del half
    for size in sizes:
        pixels = torch.rand(1, 3, size, size, generator=g) * 2 - 1
        table.compare(f"MoVQ encode (img2img), {size}²", lambda p=pixels: ours.encode(p),
                      lambda p=pixels: ref.encode(p).latents)


# ----------------------------------------------------------------------------------------------------------
# peak memory of one MoVQ decode, each implementation in its own process


def rss_child(impl: str, size: int) -> None:
    ours, ref = movq_pair()
    model = ours if impl == "ours" else ref
    del ours, ref
    gc.collect()
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    before = peak_rss_mb()
    with torch.inference_mode():
        wall, cpu, _ = timed(lambda: model.decode(z) if impl == "ours" else model.decode(z, force_not_quantize=True))
    peak = peak_rss_mb()
    print(json.dumps({"impl": impl, "size": size, "rss_before_mb": round(before), "peak_rss_mb": round(peak),
                      "decode_s": round(wall, 1), "decode_cpu_s": round(cpu, 1)}))


def rss_compare(size: int, threads: int) -> list[dict[str, Any]]:
    rows = []
    for impl in ("ours", "diffusers"):
        cmd = [sys.executable, __file__, "--rss-child", impl, "--movq-sizes", str(size), "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])})
        if proc.returncode:
            raise RuntimeError(f"{impl} rss run failed: {proc.stderr[-800:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"peak RSS, one MoVQ decode at {size}² in a fresh process, {impl}: {r['peak_rss_mb']} MB "
              f"({r['rss_before_mb']} MB before the decode: the model and torch; decode {r['decode_s']} s)", flush=True)
    ours, ref = rows
    print(f"    decode's own peak (peak - before): ours {ours['peak_rss_mb'] - ours['rss_before_mb']} MB, diffusers "
          f"{ref['peak_rss_mb'] - ref['rss_before_mb']} MB; whole-process peak ratio "
          f"{ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image size of the UNet stage (pixels)")
    parser.add_argument("--movq-sizes", type=int, nargs="+", default=[256, 512], help="MoVQ image sizes (pixels)")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps timed per prior / UNet call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--rss", action="store_true", help="peak RSS of one MoVQ decode at the largest size")
    parser.add_argument("--movq-bf16", action="store_true",
                        help="also time ours' MoVQ decode in bfloat16 (against diffusers in fp32)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--rss-child", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child, max(args.movq_sizes))
        return

    import diffusers

    from kandinsky.models import fastpath

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), {args.threads} threads, fp32, torch "
          f"{torch.__version__}, diffusers {diffusers.__version__}; fast paths: "
          + ", ".join(f"{op} {state['float32']}" for op, state in fastpath.status().items()))
    print(f"load average at start (1/5/15 min): {load()}; {args.repeats} alternating timed calls per stage, medians")
    print("\n| stage | ours s | diffusers s | ratio wall | CPU s ours / diffusers = ratio | max abs diff | load |")
    print("|---|---|---|---|---|---|---|", flush=True)
    table = Table(args.repeats)
    stages = {"text": [clip_text_stage, mclip_stage, clip_vision_stage],
              "prior": [lambda t: prior_stage(t, args.steps)], "unet": [lambda t: unet_stage(t, args.steps, args.size)],
              "movq": [lambda t: movq_stages(t, args.movq_sizes, args.movq_bf16)]}
    for name in args.only:
        for stage in stages[name]:
            stage(table)  # its modules are freed when it returns
            gc.collect()
    print(f"\nload average at the end: {load()}")
    for row in table.rows:
        if row["stage"].startswith("MoVQ decode") and "bf16" not in row["stage"]:
            print(f"{row['stage']}: ours / diffusers = {row['ratio_wall']:.3f} wall, {row['ratio_cpu']:.3f} CPU time "
                  f"(target <= 0.5 at 512²)")
    rss = rss_compare(max(args.movq_sizes), args.threads) if args.rss else []
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "threads": args.threads, "rows": table.rows,
                                         "rss": rss}, indent=1))


if __name__ == "__main__":
    main()
