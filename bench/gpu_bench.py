"""GPU benchmark in one short run: the published Kandinsky 2.1 architecture (random weights), ours against
diffusers, text-to-image at 768×768 with 25 decoder steps, fp16 and bf16, eager and torch.compile (CUDA graphs).

Models are built on the meta device and filled with random values directly on the GPU (nothing is written to
disk); diffusers' modules share the very same weight tensors. Tokenizers are the bundled model's (the sequence
length is the published 77). Each section is timed after a warm-up with the GPU synchronised, and a section that
fails prints its error and the run goes on. ``--tiny`` runs the same code on tiny configs (CPU is fine) to check
the script itself.

    python bench/gpu_bench.py [--size 768] [--steps 25] [--json out.json] [--budget 420]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).parent))

ASSETS = Path(__file__).resolve().parents[1] / "src" / "kandinsky" / "assets"
T_START = time.time()

PUBLISHED = {
    "unet": dict(in_channels=4, out_channels=8, block_out_channels=(384, 768, 1152, 1536), layers_per_block=3,
                 attention_head_dim=64, cross_attention_dim=768, encoder_hid_dim=1024),
    "prior": dict(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768),
    "movq": dict(block_out_channels=(128, 256, 256, 512), layers_per_block=2),
    "xlmr": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                 vocab_size=250002, max_position_embeddings=514),
    "clip_text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                      projection_dim=768, vocab_size=49408),
    "clip_vision": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                        image_size=224, patch_size=14, projection_dim=768),
}
TINY = {
    "unet": dict(in_channels=4, out_channels=8, block_out_channels=(32, 64), layers_per_block=1,
                 attention_head_dim=8, cross_attention_dim=32, encoder_hid_dim=48),
    "prior": dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, embedding_dim=32),
    "movq": dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("DownEncoderBlock2D",
                 "AttnDownEncoderBlock2D"), up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D")),
    "xlmr": dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
                 vocab_size=300, max_position_embeddings=80),
    "clip_text": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
                      projection_dim=32, vocab_size=900),
    "clip_vision": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
                        image_size=32, patch_size=8, projection_dim=32),
}


def log(msg: str) -> None:
    print(f"[{time.time() - T_START:6.1f}s] {msg}", flush=True)


def fill(module: torch.nn.Module, device: torch.device, seed: int) -> torch.nn.Module:
    """Random weights at O(1) activation scale, made on ``device`` (the same recipe as e2e.py's CPU models)."""
    from e2e import _fill

    return _fill(module, seed, device=str(device)).requires_grad_(False)


def build_ours(sizes: dict, device: torch.device, dtype: torch.dtype):
    """A Kandinsky21 of the given sizes with random weights, built directly on ``device``."""
    from transformers import CLIPTokenizer, XLMRobertaTokenizer

    from kandinsky import Kandinsky21
    from kandinsky.models.movq import MoVQ, MoVQConfig
    from kandinsky.models.prior import PriorConfig, PriorTransformer
    from kandinsky.models.text_encoders import MultilingualCLIP, build_clip_text, build_clip_vision
    from kandinsky.models.unet import DecoderUNet, UNetConfig
    from kandinsky.weights.diffusers_format import DecoderParts, PriorParts

    u, x, ct, cv = sizes["unet"], sizes["xlmr"], sizes["clip_text"], sizes["clip_vision"]
    with torch.device("meta"):
        unet = DecoderUNet(UNetConfig(**u))
        movq = MoVQ(MoVQConfig(**sizes["movq"]))
        text = MultilingualCLIP.from_dict(dict(x, transformerDimensions=x["hidden_size"],
                                               numDims=u["cross_attention_dim"], type_vocab_size=1, pad_token_id=1,
                                               bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5))
        prior = PriorTransformer(PriorConfig(**sizes["prior"]))
        clip_text = build_clip_text(dict(ct, max_position_embeddings=77, hidden_act="quick_gelu"))
        clip_vision = build_clip_vision(dict(cv, hidden_act="quick_gelu"))
    for i, m in enumerate((unet, movq, text, prior, clip_text, clip_vision)):
        fill(m, device, i).to(dtype)
    xlmr_tok = XLMRobertaTokenizer.from_pretrained(str(ASSETS / "decoder" / "tokenizer"))
    clip_tok = CLIPTokenizer.from_pretrained(str(ASSETS / "prior" / "tokenizer"), model_max_length=77)
    ddim = json.loads((ASSETS / "decoder" / "scheduler" / "scheduler_config.json").read_text())
    unclip = json.loads((ASSETS / "prior" / "scheduler" / "scheduler_config.json").read_text())
    proc = {"crop_size": {"height": cv["image_size"], "width": cv["image_size"]}, "do_center_crop": True,
            "do_normalize": True, "do_resize": True, "size": {"shortest_edge": cv["image_size"]},
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    dec = DecoderParts(unet=unet, movq=movq, text_encoder=text, tokenizer=xlmr_tok, scheduler_config=ddim,
                       ddpm_scheduler_config=None, folder=Path("."))
    pri = PriorParts(prior=prior, text_encoder=clip_text, image_encoder=clip_vision, tokenizer=clip_tok,
                     scheduler_config=unclip, image_processor_config=proc, folder=Path("."))
    return Kandinsky21(decoder=dec, prior=pri, device=device, dtype=dtype)


def build_diffusers(pipe, sizes: dict):
    """diffusers' prior and decoder pipelines sharing our weight tensors (identical state-dict keys)."""
    from diffusers import (
        DDIMScheduler,
        KandinskyPipeline,
        KandinskyPriorPipeline,
        PriorTransformer,
        UnCLIPScheduler,
        UNet2DConditionModel,
        VQModel,
    )
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP
    from transformers import CLIPImageProcessor
    from unet_step import PUBLISHED as UNET_KW

    u, m = sizes["unet"], sizes["movq"]
    unet_kw = dict(UNET_KW, **{k: v for k, v in u.items()}, norm_num_groups=32, sample_size=96)
    n = len(u["block_out_channels"])
    unet_kw["down_block_types"] = ("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (n - 1)
    unet_kw["up_block_types"] = ("SimpleCrossAttnUpBlock2D",) * (n - 1) + ("ResnetUpsampleBlock2D",)
    levels = len(m["block_out_channels"])
    movq_kw = dict(block_out_channels=list(m["block_out_channels"]), layers_per_block=m["layers_per_block"],
                   down_block_types=["DownEncoderBlock2D"] * (levels - 1) + ["AttnDownEncoderBlock2D"],
                   up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (levels - 1),
                   in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32, norm_type="spatial",
                   num_vq_embeddings=16384, vq_embed_dim=4)
    x = sizes["xlmr"]
    with torch.device("meta"):
        d_unet = UNet2DConditionModel(**unet_kw)
        d_movq = VQModel(**movq_kw)
        d_prior = PriorTransformer(num_embeddings=77, additional_embeddings=4, **sizes["prior"])
        d_text = MultilingualCLIP(MCLIPConfig(numDims=u["cross_attention_dim"], transformerDimSize=x["hidden_size"],
                                              type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
                                              bos_token_id=0, eos_token_id=2, **x))
    dec, pri = pipe.decoder, pipe.prior
    for theirs, ours in ((d_unet, dec.unet), (d_movq, dec.movq), (d_prior, pri.prior), (d_text, dec.text_encoder)):
        missing = theirs.load_state_dict(ours.state_dict(), strict=False, assign=True).missing_keys
        for key in missing:  # e.g. the XLM-R pooler diffusers builds and we leave out: unused values
            owner, leaf = (theirs.get_submodule(key.rsplit(".", 1)[0]), key.rsplit(".", 1)[1]) if "." in key else (
                theirs, key)
            old = getattr(owner, leaf)
            setattr(owner, leaf, torch.nn.Parameter(torch.zeros(old.shape, device=pipe.device, dtype=pipe.dtype),
                                                    requires_grad=False))
        for name, b in list(theirs.named_buffers()):
            if b.is_meta:  # non-persistent buffers (causal mask, position ids) are not in the state dict
                owner = theirs.get_submodule(name.rsplit(".", 1)[0]) if "." in name else theirs
                leaf = name.rsplit(".", 1)[-1]
                if "position_ids" in leaf:
                    value = torch.arange(b.shape[-1], device=pipe.device).expand(b.shape).clone()
                elif "token_type_ids" in leaf:
                    value = torch.zeros(b.shape, dtype=torch.long, device=pipe.device)
                else:
                    value = torch.full(b.shape, -10000.0, device=pipe.device, dtype=pipe.dtype).triu_(1)
                owner.register_buffer(leaf, value, persistent=False)
        theirs.eval()
    proc = CLIPImageProcessor(crop_size=224, size=224)
    prior = KandinskyPriorPipeline(prior=d_prior, image_encoder=pri.image_encoder, text_encoder=pri.text_encoder,
                                   tokenizer=pri.tokenizer, image_processor=proc,
                                   scheduler=UnCLIPScheduler.from_config(pri.scheduler_config))
    decoder = KandinskyPipeline(text_encoder=d_text, tokenizer=dec.tokenizer, unet=d_unet, movq=d_movq,
                                scheduler=DDIMScheduler.from_config(dec.scheduler_config))
    for p in (prior, decoder):
        p.set_progress_bar_config(disable=True)
    return prior, decoder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="tiny configs (checks the script, e.g. on CPU)")
    ap.add_argument("--budget", type=float, default=420, help="seconds; sections that would start later are skipped")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip", nargs="*", default=[], help="section names to skip")
    ap.add_argument("--ab", type=int, default=0, help="rounds of ours / diffusers alternately (0: none)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = TINY if args.tiny else PUBLISHED
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    log(f"torch {torch.__version__}, device {gpu}, size {args.size}, {args.steps} steps")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results: list[dict] = []
    prompt = "a red cat on a blue sofa, oil painting"
    state: dict = {}

    def record(**row) -> None:
        results.append(row)
        log(json.dumps(row))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    def section(name: str, fn) -> None:
        if name in args.skip:
            return
        if time.time() - T_START > args.budget:
            log(f"skip {name}: over the time budget")
            return
        try:
            fn()
        except Exception:  # noqa: BLE001 - report and go on with the next section
            log(f"{name} FAILED:\n{traceback.format_exc()[-2500:]}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def peak_gb() -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")

    def ours_images(name: str, dtype: torch.dtype, sampler: str = "unipc", prior_steps: int = 25, num: int = 1,
                    repeats: int | None = None, **kw) -> None:
        pipe = state["ours"][dtype]
        run = lambda: pipe.text_to_image(prompt, width=args.size, height=args.size, steps=args.steps,  # noqa: E731
                                         sampler=sampler, prior_steps=prior_steps, seed=0, num_images=num,
                                         output="pt", **kw)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        warm = timed(run, device, 1)[0]
        times = timed(run, device, repeats or args.repeats)
        per_image = statistics.median(times) / num
        record(section=name, impl="ours", dtype=str(dtype).split(".")[-1], sampler=sampler, steps=args.steps,
               prior_steps=prior_steps, batch=num, warmup_s=round(warm, 2), s_per_image=round(per_image, 3),
               it_per_s=round(args.steps / statistics.median(times), 1), peak_gb=round(peak_gb(), 2),
               times=[round(t, 3) for t in times], **{k: str(v) for k, v in kw.items()})

    def build(dtype: torch.dtype) -> None:
        t = time.time()
        state.setdefault("ours", {})[dtype] = build_ours(sizes, device, dtype)
        log(f"built ours in {dtype} in {time.time() - t:.1f}s")

    section("build_fp16", lambda: build(torch.float16 if device.type == "cuda" else torch.float32))
    dt16 = torch.float16 if device.type == "cuda" else torch.float32
    if "ours" not in state:
        return 1

    section("ours_fp16_unipc", lambda: ours_images("ours eager", dt16))

    def unet_step(name: str, unet, call) -> None:
        b, lat = 2, args.size // 8
        x = torch.randn(b, 4, lat, lat, device=device, dtype=dt16)
        with torch.inference_mode():
            call(x)
            times = timed(lambda: call(x), device, 10)
        from torch.utils.flop_counter import FlopCounterMode

        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            call(x)
        flops = fc.get_total_flops()
        t = statistics.median(times)
        record(section=name, batch=b, latent=lat, ms=round(1e3 * t, 2), tflops=round(flops / t / 1e12, 1),
               gflop=round(flops / 1e9))

    def diffusers_part() -> None:
        prior, decoder = build_diffusers(state["ours"][dt16], sizes)
        state["diffusers"] = (prior, decoder)

        def run() -> None:
            g = torch.Generator("cpu").manual_seed(0)
            emb = prior(prompt, num_inference_steps=25, generator=g)
            decoder(prompt, image_embeds=emb.image_embeds, negative_image_embeds=emb.negative_image_embeds,
                    width=args.size, height=args.size, num_inference_steps=args.steps, generator=g, output_type="pt")

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        warm = timed(run, device, 1)[0]
        times = timed(run, device, args.repeats)
        record(section="diffusers eager", impl="diffusers", dtype=str(dt16).split(".")[-1], sampler="ddim",
               steps=args.steps, prior_steps=25, batch=1, warmup_s=round(warm, 2),
               s_per_image=round(statistics.median(times), 3),
               it_per_s=round(args.steps / statistics.median(times), 1), peak_gb=round(peak_gb(), 2),
               times=[round(t, 3) for t in times])

    section("diffusers", diffusers_part)

    def ab() -> None:
        """Ours (UniPC and DDIM) and diffusers (DDIM) alternately, one image each per round: the fair ratio."""
        pipe, (prior, decoder) = state["ours"][dt16], state["diffusers"]

        def theirs() -> None:
            g = torch.Generator("cpu").manual_seed(0)
            emb = prior(prompt, num_inference_steps=25, generator=g)
            decoder(prompt, image_embeds=emb.image_embeds, negative_image_embeds=emb.negative_image_embeds,
                    width=args.size, height=args.size, num_inference_steps=args.steps, generator=g, output_type="pt")

        runs = {"ours unipc": lambda: pipe.text_to_image(prompt, width=args.size, height=args.size, steps=args.steps,
                                                         sampler="unipc", seed=0, output="pt"),
                "ours ddim": lambda: pipe.text_to_image(prompt, width=args.size, height=args.size, steps=args.steps,
                                                        sampler="ddim", seed=0, output="pt"),
                "diffusers ddim": theirs}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for fn in runs.values():
            timed(fn, device, 1)
        for _ in range(args.ab):
            for name, fn in runs.items():
                times[name] += timed(fn, device, 1)
        for name, ts in times.items():
            med = statistics.median(ts)
            record(section=f"A/B {name}", impl=name.split()[0], dtype=str(dt16).split(".")[-1],
                   sampler=name.split()[1], steps=args.steps, prior_steps=25, batch=1, s_per_image=round(med, 3),
                   it_per_s=round(args.steps / med, 1), peak_gb=round(peak_gb(), 2), times=[round(t, 3) for t in ts])

    if args.ab:
        section("ab", ab)

    def unet_steps() -> None:
        pipe = state["ours"][dt16]
        unet = pipe.decoder.unet
        d = unet.config.cross_attention_dim
        img, pooled, hidden = (torch.randn(2, d, device=device, dtype=dt16), torch.randn(2, d, device=device,
                               dtype=dt16), torch.randn(2, 77, sizes["xlmr"]["hidden_size"], device=device, dtype=dt16))
        with torch.inference_mode():
            cond = unet.prepare_condition(img, pooled, hidden)
        unet_step("unet forward ours", unet, lambda x: unet(x, 500, cond))
        if "diffusers" in state:
            ref = state["diffusers"][1].unet
            added = {"text_embeds": pooled, "image_embeds": img}
            unet_step("unet forward diffusers", ref, lambda x: ref(x, 500, hidden, added_cond_kwargs=added))

    section("unet_steps", unet_steps)

    def compiled() -> None:
        pipe = state["ours"][dt16]
        t = time.time()
        pipe.decoder.unet.set_compile(True, mode="reduce-overhead")
        ours_images("ours torch.compile (CUDA graphs)", dt16, repeats=args.repeats)
        log(f"compile section took {time.time() - t:.0f}s (compile included in its warm-up)")
        pipe.decoder.unet.set_compile(False)

    section("compile", compiled)

    def channels_last() -> None:
        unet = state["ours"][dt16].decoder.unet
        unet.channels_last = True
        try:
            ours_images("ours eager channels-last UNet", dt16)
        finally:
            unet.channels_last = None

    section("channels_last", channels_last)
    section("ours_fp16_batch4", lambda: ours_images("ours eager batch 4", dt16, num=4, repeats=2))
    section("ours_fp16_fast_prior", lambda: ours_images("ours eager, prior 10 steps", dt16, prior_steps=10))
    section("ours_fp16_ddim", lambda: ours_images("ours eager ddim", dt16, sampler="ddim"))

    def bf16() -> None:
        state["diffusers"] = None
        state["ours"].pop(dt16, None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        build(torch.bfloat16)
        ours_images("ours eager bf16", torch.bfloat16, repeats=2)

    if device.type == "cuda":
        section("bf16", bf16)

    log(f"summary (s/image at {args.size}x{args.size}, {args.steps} decoder steps):")
    for r in results:
        if "s_per_image" in r:
            log(f"  {r['section']:<36} {r['dtype']:<9} {r['sampler']:<6} prior {r['prior_steps']:>2} batch "
                f"{r['batch']}: {r['s_per_image']:.3f} s/image, {r['it_per_s']} it/s, peak {r['peak_gb']} GB")
        else:
            log(f"  {r['section']:<36} {r['ms']} ms, {r['tflops']} TFLOP/s ({r['gflop']} GFLOP)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
