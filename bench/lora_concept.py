"""Teach the bundled model a shape it has never seen (a cross, "крест") with a LoRA adapter, and measure it.

    python bench/lora_concept.py data --out runs/cross/data          # 150 crosses + 150 ordinary scenes, captioned
    python bench/lora_concept.py train --data runs/cross/data --out runs/cross/adapter [--steps N]
    python bench/lora_concept.py eval --adapter runs/cross/adapter [--seeds 3]
    python bench/quality.py --seeds 3 --mix-seeds 0 --lora runs/cross/adapter --sheet runs/cross/quality.png

``train`` conditions the cross images on the prior's embedding of their caption (what text-to-image gives the
decoder; the prior has never seen the word) and the ordinary scenes on the CLIP embedding of their own image (the
base decoder's objective, so the adapter learns to leave them alone), and drops a caption in 10% of the rows
instead of the decoder stage's 50% (a row without its caption teaches the image embedding alone to draw a cross).

``eval`` draws "a <colour> cross on a <background> background" (and the Russian) with the base model and with the
adapter, and counts the images whose largest object is a cross by a template detector (the object's mask against
rendered masks of every shape at the object's place and size, best intersection-over-union wins; its accuracy on
clean renders is printed first). Prompts without the trigger are scored by ``bench/quality.py --lora`` (colour
and shape accuracy, to compare with the base model).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from quality import check, components  # noqa: E402

from kandinsky.train import shapes  # noqa: E402

CONCEPT = "cross"
ALL_SHAPES = (*shapes.SHAPES, CONCEPT)
COLOURS = list(shapes.COLOR_NAMES)


# -------------------------------------------------------------------------------------------------- detector


def _template(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    s = 4
    img = PIL.Image.new("L", (size * s, size * s), 0)
    d = PIL.ImageDraw.Draw(img)
    x, y, rr = cx * s, cy * s, r * s
    if shape in ("circle", "ring"):
        d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=255)
        if shape == "ring":
            ri = 0.55 * rr
            d.ellipse([x - ri, y - ri, x + ri, y + ri], fill=0)
    else:
        d.polygon(shapes.shape_points(shape, x, y, rr), fill=255)
    return np.asarray(img.resize((size, size), PIL.Image.Resampling.BOX)) > 127


def _extent(shape: str) -> tuple[float, float]:
    """Half width and half height of a shape's bounding box for r = 1 (measured from a large render)."""
    m = _template(shape, 100, 100, 60, 200)
    ys, xs = np.nonzero(m)
    return (xs.max() - xs.min() + 1) / 120, (ys.max() - ys.min() + 1) / 120


EXTENTS = {s: _extent(s) for s in ALL_SHAPES}


def classify(comp: np.ndarray) -> str:
    """The shape whose template (placed on the object's bounding box) overlaps the object's mask best."""
    ys, xs = np.nonzero(comp)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    bx, by = (xs.max() + xs.min() + 1) / 2, (ys.max() + ys.min() + 1) / 2
    best, best_iou = "circle", -1.0
    for shape in ALL_SHAPES:
        ex, ey = EXTENTS[shape]
        r = (w / (2 * ex) + h / (2 * ey)) / 2
        # a template's bounding-box centre is not its (cx, cy) for every shape: align the boxes
        probe = _template(shape, 100, 100, r, 200)
        pys, pxs = np.nonzero(probe)
        ox, oy = (pxs.max() + pxs.min() + 1) / 2 - 100, (pys.max() + pys.min() + 1) / 2 - 100
        t = _template(shape, bx - ox, by - oy, r, comp.shape[0])
        iou = (t & comp).sum() / max((t | comp).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def top_shape(image: np.ndarray) -> str | None:
    """The shape of the largest object of an image (None when there is none)."""
    _, found = check(image)
    if not found:
        return None
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3)])
    dist = np.sqrt(((image.astype(np.float32) - np.median(border, axis=0)) ** 2).sum(-1))
    comps = components(dist > 70, 12)
    return classify(comps[0]) if comps else None


def self_test(n: int = 300) -> float:
    rng = random.Random(7)
    ok = 0
    for i in range(n):
        shape = ALL_SHAPES[i % len(ALL_SHAPES)]
        color, bg = rng.sample(COLOURS, 2)
        scene = shapes.make_scene(shape, color, bg, rng.choice(shapes.SIZES), rng.choice(shapes.POSITION_NAMES), rng)
        ok += top_shape(shapes.render(scene)) == shape
    return ok / n


# -------------------------------------------------------------------------------------------------- data


def make_data(out: Path, n_concept: int, n_regular: int, seed: int = 0) -> int:
    """Renders ``n_concept`` crosses and ``n_regular`` ordinary scenes (to keep what the model knows), each with
    a caption in a ``.txt`` beside it."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n_concept + n_regular):
        if i < n_concept:
            color, bg = rng.sample(COLOURS, 2)
            size, pos = rng.choice(shapes.SIZES), rng.choice(shapes.POSITION_NAMES)
            scene = shapes.make_scene(CONCEPT, color, bg, size, pos, rng)
            scene = shapes.Scene(scene.background, scene.objects, (shapes._jitter(bg, rng), shapes._jitter(color, rng)))
            m = shapes.Mention(size=rng.random() < 0.5, position=rng.random() < 0.3, background=rng.random() < 0.7)
            text = shapes.caption(scene, rng, None, m)
        else:
            scene = shapes.random_scene(rng, two_objects=0.0)
            text = shapes.caption(scene, rng)
        PIL.Image.fromarray(shapes.render(scene)).save(out / f"{i:04d}.png")
        (out / f"{i:04d}.txt").write_text(text + "\n", encoding="utf-8")
    return n_concept + n_regular


def prompts(seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, language): every colour on a random other background, in English and Russian."""
    rng = random.Random(seed)
    out = []
    for color in COLOURS:
        bg = rng.choice([c for c in COLOURS if c != color])
        article = "an" if color[0] in "aeiou" else "a"
        out.append((f"{article} {color} cross on a {bg} background", "en"))
        out.append((f"{shapes.RU_COLOR[color][0]} крест на {shapes.RU_COLOR[bg][3]} фоне", "ru"))
    return out


# -------------------------------------------------------------------------------------------------- commands


def cmd_data(args: argparse.Namespace) -> int:
    n = make_data(args.out, args.concept, args.regular)
    print(f"{n} images with captions in {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from kandinsky.pipeline import ASSETS
    from kandinsky.train.finetune import FinetuneOptions, finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = FinetuneOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=0.0, lora=True,
                           rank=args.rank, targets=args.targets, trigger_words=("cross", "крест"),
                           save_every=max(args.steps // 4, 50), resolution=64, condition=args.condition,
                           text_drop=args.text_drop)
    wall, cpu = time.perf_counter(), time.process_time()
    finetune("decoder", ASSETS / "decoder", args.data, args.out, opts, prior=ASSETS / "prior")
    print(f"trained {args.steps} steps in {time.perf_counter() - wall:.0f} s wall, "
          f"{time.process_time() - cpu:.0f} s CPU ({torch.get_num_threads()} threads)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kandinsky import Kandinsky21

    print(f"detector on clean renders of {len(ALL_SHAPES)} shapes: {100 * self_test():.1f}%")
    pipe = Kandinsky21.from_pretrained()
    cases = prompts()
    kw = dict(width=64, height=64)
    for label, specs in (("base", []), (f"adapter x{args.scale:g}", [(args.adapter, args.scale)])):
        hits, per_lang = 0, {"en": 0, "ru": 0}
        found: dict[str, int] = {}
        with pipe.loras(specs):
            for seed in range(args.seeds):
                for i, (prompt, lang) in enumerate(cases):
                    (img,) = pipe.text_to_image(prompt, seed=1000 * seed + i, **kw)
                    shape = top_shape(np.asarray(img))
                    found[str(shape)] = found.get(str(shape), 0) + 1
                    hit = shape == CONCEPT
                    hits += hit
                    per_lang[lang] += hit
        n = args.seeds * len(cases)
        print(f"{label}: cross in {hits}/{n} = {100 * hits / n:.1f}% (en {100 * per_lang['en'] / (n / 2):.1f}%, "
              f"ru {100 * per_lang['ru'] / (n / 2):.1f}%); shapes found {dict(sorted(found.items()))}")
    return 0


def cmd_sheet(args: argparse.Namespace) -> int:
    """Before/after picture: the first prompts without (top row) and with the adapter (bottom row)."""
    from kandinsky import Kandinsky21

    pipe = Kandinsky21.from_pretrained()
    cases = prompts()[: args.count]
    rows = []
    for specs in ([], [(args.adapter, args.scale)]):
        with pipe.loras(specs):
            rows.append([pipe.text_to_image(p, seed=1000 + i, width=64, height=64)[0]
                         for i, (p, _) in enumerate(cases)])
    side = 128
    sheet = PIL.Image.new("RGB", (side * len(cases), side * 2), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            sheet.paste(img.resize((side, side), PIL.Image.Resampling.NEAREST), (c * side, r * side))
    sheet.save(args.out)
    print("\n".join(f"{i}: {p}" for i, (p, _) in enumerate(cases)))
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--concept", type=int, default=150, help="images of the new shape")
    d.add_argument("--regular", type=int, default=150, help="images of the shapes the model knows")
    d.set_defaults(func=cmd_data)
    t = sub.add_parser("train")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--targets", default="attn+conv")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--condition", choices=("image", "prior", "trigger"), default="trigger")
    t.add_argument("--text-drop", type=float, default=0.1,
                   help="share of rows trained without their caption (the decoder stage trains with 0.5)")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval")
    e.add_argument("--adapter", type=Path, required=True)
    e.add_argument("--scale", type=float, default=1.0)
    e.add_argument("--seeds", type=int, default=3)
    e.set_defaults(func=cmd_eval)
    sh = sub.add_parser("sheet")
    sh.add_argument("--adapter", type=Path, required=True)
    sh.add_argument("--scale", type=float, default=1.0)
    sh.add_argument("--count", type=int, default=8)
    sh.add_argument("--out", type=Path, default=Path("docs/lora_cross.png"))
    sh.set_defaults(func=cmd_sheet)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
