"""End-to-end text-to-image, ours against diffusers, on the published Kandinsky 2.1 architecture (random weights).

``make`` writes diffusers-format ``decoder/`` and ``prior/`` folders of the full published sizes (UNet 1.23 B,
prior 1.0 B, XLM-R large, CLIP ViT-L/14 text and vision, MoVQ; 13 GB in fp32) with random weights, built on the
meta device and filled directly (no initialisation pass), with the bundled model's small tokenizers (token ids
stay in range, sequence lengths are the published 77). Both implementations then load the same files.

``run`` is one generation in this process (so that peak resident memory and the time from process start are its
own): load, prior, decoder loop, MoVQ decode. It prints one JSON line: time from process start to the end of the
first decoder step, load time, per-step decoder times, total, CPU time and peak RSS. The process start is taken
from ``E2E_T0`` (set by ``compare`` just before it spawns the process), else from the kernel's record of it.

``compare`` runs ``run`` subprocesses alternately (ours, diffusers, ours, diffusers, ...) and prints a table.
A full diffusers run at its defaults (100 DDIM steps) takes over half an hour on a 2-core machine; with
``--ref-steps N`` (N < 100) its decoder runs N steps and the 100-step time is extrapolated from the measured
per-step median (``fixed + 100 × step``), which the table says.

    python bench/e2e.py make --out /tmp/k21
    python bench/e2e.py compare --model /tmp/k21 --size 512 --repeats 2 --ref-steps 10 [--low-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "src" / "kandinsky" / "assets"


def since_process_start() -> float:
    """Seconds since this process started (``E2E_T0`` if the parent set it, else /proc)."""
    if "E2E_T0" in os.environ:
        return time.time() - float(os.environ["E2E_T0"])
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    return float(Path("/proc/uptime").read_text().split()[0]) - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------------
# make


def _fill(module, seed: int, device: str = "cpu"):
    """Random weights at O(1) activation scale, made on ``device``: N(0, 1/fan_in) matrices, unit norm scales,
    zero biases (also used by gpu_bench.py)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("clip_std"):
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / max(p[0].numel(), 1) ** 0.5, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in module.named_buffers():
            if "position_ids" in name:
                b.copy_(torch.arange(b.shape[-1], device=device).expand(b.shape))
            else:  # token_type_ids and float buffers
                b.zero_()
    return module.eval()


def make(out: Path) -> None:
    import shutil

    import torch
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
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        XLMRobertaTokenizer,
    )

    sys.path.insert(0, str(Path(__file__).parent))
    from unet_step import PUBLISHED

    t0 = time.time()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**PUBLISHED)
        movq = VQModel(block_out_channels=[128, 256, 256, 512], down_block_types=["DownEncoderBlock2D"] * 3
                       + ["AttnDownEncoderBlock2D"], up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
                       in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                       norm_type="spatial", num_vq_embeddings=16384, vq_embed_dim=4, sample_size=256)
        text = MultilingualCLIP(MCLIPConfig(numDims=768, transformerDimSize=1024, hidden_size=1024,
                                            intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                                            vocab_size=250002, max_position_embeddings=514, type_vocab_size=1,
                                            layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2))
        prior = PriorTransformer(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768,
                                 num_embeddings=77, additional_embeddings=4)
        clip_text = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"))
        clip_vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, image_size=224,
            patch_size=14, projection_dim=768, hidden_act="quick_gelu"))
    for i, m in enumerate((unet, movq, text, prior, clip_text, clip_vision)):
        _fill(m, i)
    print(f"built random published-size modules in {time.time() - t0:.0f}s", flush=True)
    ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                         thresholding=False)
    decoder = KandinskyPipeline(text_encoder=text, tokenizer=XLMRobertaTokenizer.from_pretrained(
        str(ASSETS / "decoder" / "tokenizer")), unet=unet, scheduler=ddim, movq=movq)
    decoder.save_pretrained(str(out / "decoder"))
    del decoder, unet, movq, text
    processor = CLIPImageProcessor(crop_size=224, size=224, do_center_crop=True, do_normalize=True, do_resize=True,
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711], resample=3)
    unclip = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                             clip_sample=True, clip_sample_range=10.0)
    pri = KandinskyPriorPipeline(prior=prior, image_encoder=clip_vision, text_encoder=clip_text,
                                 tokenizer=CLIPTokenizer.from_pretrained(str(ASSETS / "prior" / "tokenizer"),
                                                                         model_max_length=77),
                                 scheduler=unclip, image_processor=processor)
    pri.save_pretrained(str(out / "prior"))
    for folder in ("decoder", "prior"):  # no recorded defaults: the published ones apply
        (out / folder / "kandinsky_defaults.json").unlink(missing_ok=True)
    shutil.rmtree(out / "decoder" / "ddpm_scheduler", ignore_errors=True)
    print(f"wrote {out} in {time.time() - t0:.0f}s", flush=True)


# ----------------------------------------------------------------------------------------------------------
# run


def run(args: argparse.Namespace) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    stamps: list[float] = []
    cpu_stamps: list[float] = []
    prompt = "a red cat on a blue sofa, oil painting"
    result: dict = {"impl": args.impl, "size": args.size, "threads": torch.get_num_threads()}
    cpu0 = time.process_time()
    t_load = time.time()
    if args.impl == "ours":
        from kandinsky import Kandinsky21

        pipe = Kandinsky21.from_pretrained(decoder=args.model / "decoder", prior=args.model / "prior",
                                           low_memory=args.low_memory, compile=args.compile)
        result["load_s"] = time.time() - t_load

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "decoder":
                stamps.append(time.time())
                cpu_stamps.append(time.process_time())
                if done == 1:
                    result["start_to_first_step_s"] = since_process_start()

        pipe.set_progress(progress)
        kw = dict(steps=args.steps, prior_steps=args.prior_steps, sampler=args.sampler, preset=args.preset,
                  cfg_until=args.cfg_until, deep_cache=args.deep_cache)
        t_gen = time.time()
        image = pipe.text_to_image(prompt, width=args.size, height=args.size, seed=0, output="np",
                                   **{k: v for k, v in kw.items() if v is not None})[0]
        result["settings"] = pipe.resolve("decoder", preset=args.preset, steps=args.steps, sampler=args.sampler,
                                          prior_steps=args.prior_steps, cfg_until=args.cfg_until,
                                          deep_cache=args.deep_cache)
        result["settings"]["low_memory"] = args.low_memory
    else:
        from diffusers import KandinskyPipeline, KandinskyPriorPipeline

        prior = KandinskyPriorPipeline.from_pretrained(str(args.model / "prior"))
        decoder = KandinskyPipeline.from_pretrained(str(args.model / "decoder"))
        for p in (prior, decoder):
            p.set_progress_bar_config(disable=True)
        result["load_s"] = time.time() - t_load

        def callback(i: int, t: int, latents) -> None:
            stamps.append(time.time())
            cpu_stamps.append(time.process_time())
            if i == 0:
                result["start_to_first_step_s"] = since_process_start()

        steps = args.steps or 100
        t_gen = time.time()
        g = torch.Generator("cpu").manual_seed(0)
        emb = prior(prompt, num_inference_steps=args.prior_steps or 25, generator=g)
        image = decoder(prompt, image_embeds=emb.image_embeds, negative_image_embeds=emb.negative_image_embeds,
                        width=args.size, height=args.size, num_inference_steps=steps, generator=g,
                        callback=callback, callback_steps=1, output_type="np").images[0]
        result["settings"] = {"sampler": "ddim", "steps": steps, "prior_steps": args.prior_steps or 25,
                              "guidance_scale": 4.0, "prior_guidance_scale": 4.0}
    t_end = time.time()
    steps_s = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    steps_cpu = [b - a for a, b in zip(cpu_stamps, cpu_stamps[1:], strict=False)]
    result.update(
        generate_s=t_end - t_gen, total_s=since_process_start(), cpu_s=time.process_time() - cpu0,
        first_step_end_s=stamps[0] - t_gen if stamps else None, decoder_loop_s=stamps[-1] - t_gen if stamps else None,
        step_median_s=statistics.median(steps_s) if steps_s else None, after_loop_s=t_end - stamps[-1],
        step_cpu_median_s=statistics.median(steps_cpu) if steps_cpu else None,
        cpu_before_first_step_s=cpu_stamps[0] - cpu0 if cpu_stamps else None,
        decoder_steps=len(stamps), peak_rss_mb=peak_rss_mb(), finite=bool(abs(float(image.mean())) < 10),
    )
    return result


# ----------------------------------------------------------------------------------------------------------
# compare


def _spawn(argv: list[str], env_extra: dict[str, str]) -> dict:
    env = {**os.environ, **env_extra, "E2E_T0": repr(time.time())}
    proc = subprocess.run([sys.executable, __file__, "run", *argv], env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"run {argv} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def compare(args: argparse.Namespace) -> None:
    common = ["--model", str(args.model), "--size", str(args.size)] + (
        ["--threads", str(args.threads)] if args.threads else [])
    ours_argv = common + ["--impl", "ours", "--preset", args.preset or "fast"] + (
        ["--low-memory"] if args.low_memory else [])
    ref_argv = common + ["--impl", "diffusers", "--steps", str(args.ref_steps)]
    ref_env = {"PYTHONPATH": os.pathsep.join(filter(None, [args.ref_pythonpath, os.environ.get("PYTHONPATH")]))}
    rows: dict[str, list[dict]] = {"ours": [], "diffusers": []}
    for _ in range(args.repeats):
        for name, argv, env in (("ours", ours_argv, {}), ("diffusers", ref_argv, ref_env)):
            r = _spawn(argv, env)
            rows[name].append(r)
            print(json.dumps(r), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))

    summarize(rows, args.size)


def summarize(rows: dict[str, list[dict]], size: int) -> None:
    """Medians, the diffusers 100-step extrapolation (wall and CPU time) and the ratios, from ``compare`` rows."""

    def med(name: str, key: str) -> float:
        values = [r[key] for r in rows[name] if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    ref = rows["diffusers"]
    steps = ref[0]["decoder_steps"]
    fixed = statistics.median(r["total_s"] - steps * r["step_median_s"] for r in ref)
    ref_total = fixed + 100 * med("diffusers", "step_median_s")
    ours_total = med("ours", "total_s")
    note = "" if steps == 100 else f" (extrapolated from {steps}-step runs: fixed + 100 × step)"
    print(f"\n{size}x{size}, {rows['ours'][0]['threads']} threads, medians of {len(rows['ours'])} / {len(ref)} runs:")
    print(f"  ours {rows['ours'][0]['settings']}: {ours_total:.1f} s from process start to image, "
          f"{med('ours', 'step_median_s'):.2f} s/step, peak RSS {med('ours', 'peak_rss_mb'):.0f} MB, "
          f"first decoder step done at {med('ours', 'start_to_first_step_s'):.1f} s")
    print(f"  diffusers (DDIM 100 + prior 25): {ref_total:.1f} s{note}, {med('diffusers', 'step_median_s'):.2f} "
          f"s/step, peak RSS {med('diffusers', 'peak_rss_mb'):.0f} MB, first decoder step done at "
          f"{med('diffusers', 'start_to_first_step_s'):.1f} s")
    print(f"  ratios ours/diffusers (wall): time {ours_total / ref_total:.3f}, peak RSS "
          f"{med('ours', 'peak_rss_mb') / med('diffusers', 'peak_rss_mb'):.3f}, start to first step "
          f"{med('ours', 'start_to_first_step_s') / med('diffusers', 'start_to_first_step_s'):.3f}, per UNet step "
          f"{med('ours', 'step_median_s') / med('diffusers', 'step_median_s'):.3f}")
    if all(r.get("step_cpu_median_s") for r in ref + rows["ours"]):
        cpu_fixed = statistics.median(r["cpu_s"] - steps * r["step_cpu_median_s"] for r in ref)
        ref_cpu = cpu_fixed + 100 * med("diffusers", "step_cpu_median_s")
        print(f"  ratios ours/diffusers (process CPU time): whole run {med('ours', 'cpu_s') / ref_cpu:.3f} "
              f"({med('ours', 'cpu_s'):.0f} s vs {ref_cpu:.0f} s), per UNet step "
              f"{med('ours', 'step_cpu_median_s') / med('diffusers', 'step_cpu_median_s'):.3f}, before the first "
              f"step {med('ours', 'cpu_before_first_step_s') / med('diffusers', 'cpu_before_first_step_s'):.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sm = sub.add_parser("summarize", help="the table of an earlier compare --json file")
    sm.add_argument("json_file", type=Path)
    sm.add_argument("--size", type=int, default=512)
    m = sub.add_parser("make")
    m.add_argument("--out", type=Path, required=True)
    for name in ("run", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--model", type=Path, required=True)
        p.add_argument("--size", type=int, default=512)
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--preset", default=None)
        p.add_argument("--low-memory", action="store_true")
        p.add_argument("--json", type=Path, default=None)
    r = sub.choices["run"]
    r.add_argument("--impl", choices=("ours", "diffusers"), required=True)
    r.add_argument("--steps", type=int, default=None)
    r.add_argument("--prior-steps", type=int, default=None)
    r.add_argument("--sampler", default=None)
    r.add_argument("--cfg-until", type=float, default=None)
    r.add_argument("--deep-cache", type=int, default=None)
    r.add_argument("--compile", action="store_true")
    c = sub.choices["compare"]
    c.add_argument("--repeats", type=int, default=2)
    c.add_argument("--ref-steps", type=int, default=100)
    c.add_argument("--ref-pythonpath", default=None, help="extra PYTHONPATH for the diffusers runs (accelerate)")
    args = ap.parse_args(argv)
    if args.cmd == "make":
        make(args.out)
    elif args.cmd == "summarize":
        summarize(json.loads(args.json_file.read_text()), args.size)
    elif args.cmd == "run":
        print(json.dumps(run(args)), flush=True)
    else:
        compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
