"""Time one decoder-UNet forward (one sampling step) of ours against diffusers' UNet2DConditionModel.

Full published config, random weights (shared between the two models), fp32 on CPU, batch 2 (one CFG step),
``torch.inference_mode()``. Step-invariant conditioning is computed once outside the timed loop for ours (that is
how the pipeline calls it) and reported on its own; diffusers recomputes it inside every forward.

    PYTHONPATH=src python bench/unet_step.py --sizes 32 64 --repeats 3
    python bench/unet_step.py --sizes 64 --precision auto     # also ours in the precision auto chooses here

With ``--precision`` other than fp32, ours also runs in that precision (a converted copy of the same weights):
its time against diffusers' fp32 and the cosine similarity of its output to ours in fp32 (the quality gate of
a lower precision is >= 0.999 per step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from kandinsky.models.unet import DecoderUNet, UNetConfig

PUBLISHED = dict(
    in_channels=4, out_channels=8, block_out_channels=(384, 768, 1152, 1536), layers_per_block=3,
    attention_head_dim=64, cross_attention_dim=768, encoder_hid_dim=1024, norm_num_groups=32, norm_eps=1e-5,
    encoder_hid_dim_type="text_image_proj", addition_embed_type="text_image", resnet_time_scale_shift="scale_shift",
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", class_embed_type=None, sample_size=64,
)


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def timed_both(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds). On a shared VM the CPU time is the steadier of the two."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


PEAK_CPU = [0.0]  # best GEMM rate per CPU second seen in this run (see gemm_peak)


def gemm_peak(n: int = 2048, repeats: int = 5) -> float:
    """The fp32 GEMM rate of this machine now, GFLOP/s: the best of torch.mm (MKL) and oneDNN's matmul (the
    faster on AMD CPUs), best of ``repeats``, on n×n operands. Also keeps the best rate per second of process CPU
    time in ``PEAK_CPU`` (with one thread, the rate of an unshared core)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    candidates = [lambda: a @ b]
    if torch.backends.mkldnn.is_available():
        candidates.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = 0.0
    for fn in candidates:
        fn()
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            fn()
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
            PEAK_CPU[0] = max(PEAK_CPU[0], 2 * n**3 / max(time.process_time() - c, 1e-9) / 1e9)
    return best


def count_flops(config: UNetConfig, batch: int, size: int) -> int:
    """FLOPs of our forward, counted on the meta device (no compute), attention matmuls included."""
    with torch.device("meta"):
        unet = DecoderUNet(config)
        cond = unet.prepare_condition(torch.zeros(batch, 768), torch.zeros(batch, 768), torch.zeros(batch, 77, 1024))
        sample = torch.zeros(batch, config.in_channels, size, size)
        with FlopCounterMode(display=False) as counter:
            unet(sample, torch.full((batch,), 500), cond)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sizes (image = 8x)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="fp32", help="also time ours in this precision (auto, bf16, fp16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from diffusers import UNet2DConditionModel  # test/benchmark-time oracle only

    t0 = time.perf_counter()
    ref = UNet2DConditionModel(**PUBLISHED).eval().requires_grad_(False)
    config = UNetConfig.from_dict(dict(ref.config))
    with torch.device("meta"):
        ours = DecoderUNet(config)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)  # shares the weights, no copy
    ours.eval().requires_grad_(False)
    n_params = sum(p.numel() for p in ours.parameters())
    from kandinsky import precision

    low = precision.resolve(args.precision)
    low_name = precision.NAMES[low]
    if args.precision == "auto":
        print(f"precision auto: {precision.choose().precision} ({precision.choose().reason})")
    ours_low = None
    if low != torch.float32:
        with torch.device("meta"):
            ours_low = DecoderUNet(config)
        ours_low.load_state_dict({k: v.to(low) for k, v in ref.state_dict().items()}, strict=True, assign=True)
        ours_low.eval().requires_grad_(False)
    print(f"built models in {time.perf_counter() - t0:.1f}s: {n_params:,} parameters, {args.threads} threads, "
          f"batch {args.batch}, fp32, torch {torch.__version__}")

    b = args.batch
    image, pooled, hidden = torch.randn(b, 768), torch.randn(b, 768), torch.randn(b, 77, 1024)
    timestep = torch.full((b,), 500)
    added = {"text_embeds": pooled, "image_embeds": image}
    summary = []
    peak = gemm_peak()
    print(f"fp32 GEMM peak now: {peak:.0f} GFLOP/s (best of MKL / oneDNN, 2048², {args.threads} threads)")
    with torch.inference_mode():
        prep, cond = timed(lambda: ours.prepare_condition(image, pooled, hidden))
        print(f"prepare_condition (once per sampling call): {prep * 1e3:.1f} ms")
        for size in args.sizes:
            x = torch.randn(b, 4, size, size)
            t_ref_warm, out_ref = timed(lambda x=x: ref(x, timestep, hidden, added_cond_kwargs=added).sample)
            t_ours_warm, out = timed(lambda x=x: ours(x, timestep, cond))
            diff = (out - out_ref).abs().max().item()
            ref_runs, our_runs = [], []
            for _ in range(args.repeats):  # interleaved, so drifts in machine speed hit both alike
                ref_runs.append(timed_both(lambda x=x: ref(x, timestep, hidden, added_cond_kwargs=added)))
                our_runs.append(timed_both(lambda x=x: ours(x, timestep, cond)))
            ref_times, our_times = [r[0] for r in ref_runs], [r[0] for r in our_runs]
            t_ref, t_ours = statistics.median(ref_times), statistics.median(our_times)
            c_ref, c_ours = statistics.median(r[1] for r in ref_runs), statistics.median(r[1] for r in our_runs)
            flops = count_flops(config, b, size)
            peak = max(peak, gemm_peak())  # re-measured after each size; the machine is shared
            print(f"latent {size}x{size} (image {8 * size}px), median of {args.repeats}: diffusers {t_ref:.3f}s, "
                  f"ours {t_ours:.3f}s, ratio {t_ours / t_ref:.3f} (best-of {min(our_times) / min(ref_times):.3f}; "
                  f"CPU time {c_ours:.2f}s vs {c_ref:.2f}s, ratio {c_ours / c_ref:.3f})")
            print(f"    {flops / 1e9:.0f} GFLOP per forward: ours {flops / t_ours / 1e9:.0f} GFLOP/s "
                  f"({100 * flops / t_ours / 1e9 / peak:.0f}% of the GEMM peak; best run "
                  f"{100 * flops / min(our_times) / 1e9 / peak:.0f}%), diffusers {flops / t_ref / 1e9:.0f} GFLOP/s "
                  f"({100 * flops / t_ref / 1e9 / peak:.0f}%) | first call: diffusers {t_ref_warm:.2f}s, ours "
                  f"{t_ours_warm:.2f}s (packs the conv weights) | max|ours - diffusers| {diff:.1e}")
            print(f"    wall: diffusers {[round(t, 2) for t in ref_times]}, ours {[round(t, 2) for t in our_times]}")
            print(f"    per CPU second: ours {flops / c_ours / 1e9:.0f} GFLOP/s, diffusers {flops / c_ref / 1e9:.0f}, "
                  f"GEMM {PEAK_CPU[0]:.0f}: ours at {100 * flops / c_ours / 1e9 / PEAK_CPU[0]:.0f}% of the GEMM rate "
                  f"per CPU second (with 1 thread, the unshared-core view)")
            summary.append(f"{size}x{size} {t_ours / t_ref:.2f}x ({t_ours:.2f}s vs {t_ref:.2f}s, "
                           f"{100 * flops / t_ours / 1e9 / peak:.0f}% of peak)")
            if ours_low is not None:
                cond_low = ours_low.prepare_condition(image.to(low), pooled.to(low), hidden.to(low))
                xl = x.to(low)
                out_low = ours_low(xl, timestep, cond_low).float()  # warm-up (packs the weights)
                low_runs = []
                for _ in range(args.repeats):
                    low_runs.append(timed_both(lambda xl=xl, c=cond_low: ours_low(xl, timestep, c))[0])
                    ref_times.append(timed_both(lambda x=x: ref(x, timestep, hidden, added_cond_kwargs=added))[0])
                t_low, t_ref2 = statistics.median(low_runs), statistics.median(ref_times)
                cos = torch.nn.functional.cosine_similarity(out_low.flatten(), out.flatten(), dim=0).item()
                print(f"    ours {low_name}: {t_low:.3f}s, ratio to diffusers fp32 {t_low / t_ref2:.3f}; cosine "
                      f"similarity to ours fp32 {cos:.5f} (gate >= 0.999)")
                summary.append(f"{size}x{size} {low_name} {t_low / t_ref2:.2f}x (cosine {cos:.4f})")
    print(f"summary, {args.threads} threads, ours/diffusers per forward (lower is better): " + ", ".join(summary))


if __name__ == "__main__":
    main()
