"""Quality of the bundled model, scored by an attribute checker that knows nothing of our CLIP.

For each prompt (English and Russian, every colour-shape pair including the held-out ones) the bundled model
generates an image; the checker reads it with pixel statistics only:

* background = median colour of the image border; foreground = pixels far from it;
* objects = connected foreground components; an object's colour = the nearest named colour of most of its
  pixels; its shape = a hole in the filled mask -> ring, low solidity (area / convex hull) -> star, then the
  fill ratio of the bounding box: square (~1), circle (~0.79), triangle (~0.5).

Image mixing: the CLIP embedding of a red-circle image mixed 0.5/0.5 with the prompt "a blue square"; a seed
counts when the image carries an attribute of each (red or circle, and blue or square).

    python bench/quality.py [--decoder DIR --prior DIR] [--seeds 6] [--sheet docs/contact_sheet.png] [--mix-seeds 20]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

# named colours, defined here independently of the training code (sRGB)
PALETTE = {
    "red": (220, 30, 30), "orange": (250, 135, 0), "yellow": (250, 215, 10), "green": (25, 160, 45),
    "blue": (30, 65, 215), "purple": (135, 40, 175), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "ring")
HELD_OUT = {("green", "star"), ("purple", "triangle"), ("orange", "ring"), ("white", "square"), ("yellow", "circle")}
EN_BG = "on a {bg} background"
RU = {  # colour adjectives (m, f, n, prepositional) and nouns with gender
    "red": ("красный", "красная", "красное", "красном"), "orange": ("оранжевый", "оранжевая", "оранжевое", "оранжевом"),
    "yellow": ("жёлтый", "жёлтая", "жёлтое", "жёлтом"), "green": ("зелёный", "зелёная", "зелёное", "зелёном"),
    "blue": ("синий", "синяя", "синее", "синем"),
    "purple": ("фиолетовый", "фиолетовая", "фиолетовое", "фиолетовом"),
    "white": ("белый", "белая", "белое", "белом"), "black": ("чёрный", "чёрная", "чёрное", "чёрном"),
}
RU_NOUN = {"circle": ("круг", 0), "square": ("квадрат", 0), "triangle": ("треугольник", 0), "star": ("звезда", 1),
           "ring": ("кольцо", 2)}


# ----------------------------------------------------------------------------------------------------------
# the checker


@dataclass
class Found:
    color: str
    shape: str
    area: int


def nearest_color(rgb: np.ndarray, exclude: str | None = None) -> np.ndarray:
    """Index into PALETTE of the nearest named colour of each (N, 3) pixel, skipping ``exclude``."""
    names = list(PALETTE)
    ref = np.array([PALETTE[n] for n in names], dtype=np.float32)
    d = ((rgb[:, None, :].astype(np.float32) - ref[None]) ** 2).sum(-1)
    if exclude is not None:
        d[:, names.index(exclude)] = np.inf
    return d.argmin(1)


def components(mask: np.ndarray, min_area: int) -> list[np.ndarray]:
    """4-connected components of a boolean mask (largest first), each as a boolean mask."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask)
        queue = deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp[y, x] = True
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if comp.sum() >= min_area:
            out.append(comp)
    return sorted(out, key=lambda c: -int(c.sum()))


def hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points (monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return float(len(pts))

    def half(seq: list) -> list:
        chain: list = []
        for p in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    hull = np.array(half(pts)[:-1] + half(pts[::-1])[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def classify_shape(comp: np.ndarray) -> str:
    """Shape of one object's mask from its hole, solidity and bounding-box fill ratio."""
    ys, xs = np.nonzero(comp)
    area = len(ys)
    box = comp[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    outside = components(np.pad(~box, 1, constant_values=True), 1)
    holes = sum(int(c.sum()) for c in outside[1:])  # background pieces not connected to the border
    if holes > 0.08 * (area + holes):
        return "ring"
    # pixel corners, so that the hull covers whole pixels
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    solidity = area / max(hull_area(corners), 1.0)
    if solidity < 0.78:
        return "star"
    fill = area / box.size
    if fill > 0.88:
        return "square"
    return "circle" if fill > 0.64 else "triangle"


def check(image: np.ndarray, min_area: int = 12) -> tuple[str, list[Found]]:
    """(background colour, objects largest first) of an (H, W, 3) uint8 image."""
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    bg = list(PALETTE)[int(nearest_color(bg_rgb[None])[0])]
    dist = np.sqrt(((image.astype(np.float32) - bg_rgb) ** 2).sum(-1))
    fg = dist > 70
    labels = nearest_color(image.reshape(-1, 3), exclude=bg).reshape(image.shape[:2])
    found = []
    for comp in components(fg, min_area):
        counts = np.bincount(labels[comp], minlength=len(PALETTE))
        found.append(Found(list(PALETTE)[int(counts.argmax())], classify_shape(comp), int(comp.sum())))
    return bg, found


# ----------------------------------------------------------------------------------------------------------
# prompts


@dataclass
class Case:
    prompt: str
    lang: str
    color: str
    shape: str
    background: str | None

    @property
    def held_out(self) -> bool:
        return (self.color, self.shape) in HELD_OUT


def english(color: str, shape: str, bg: str | None) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape}" + (f" {EN_BG.format(bg=bg)}" if bg else "")


def russian(color: str, shape: str, bg: str | None, yo: bool = True) -> str:
    noun, gender = RU_NOUN[shape]
    text = f"{RU[color][gender]} {noun}" + (f" на {RU[bg][3]} фоне" if bg else "")
    return text if yo else text.replace("ё", "е")


def cases(seed: int = 0) -> list[Case]:
    """120 prompts: every colour-shape pair in both languages on a random background, and once more without a
    background (languages alternating); Russian prompts write "ё" as "е" half of the time."""
    rng = random.Random(seed)
    out = []
    for i, (color, shape) in enumerate((c, s) for c in PALETTE for s in SHAPES):
        bg = rng.choice([c for c in PALETTE if c != color])
        out.append(Case(english(color, shape, bg), "en", color, shape, bg))
        out.append(Case(russian(color, shape, bg, yo=rng.random() < 0.5), "ru", color, shape, bg))
        if i % 2:
            out.append(Case(russian(color, shape, None, yo=rng.random() < 0.5), "ru", color, shape, None))
        else:
            out.append(Case(english(color, shape, None), "en", color, shape, None))
    return out


# ----------------------------------------------------------------------------------------------------------


def contact_sheet(items: list[tuple[str, np.ndarray, bool]], path: Path, columns: int = 6, scale: int = 2) -> None:
    """Images with their prompts (a red mark where the checker disagreed) in a grid PNG."""
    font_path = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    font = PIL.ImageFont.truetype(str(font_path), 10) if font_path.is_file() else PIL.ImageFont.load_default()
    size = items[0][1].shape[0] * scale
    cell_w, cell_h = max(size, 170), size + 30
    rows = (len(items) + columns - 1) // columns
    sheet = PIL.Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    for i, (text, img, ok) in enumerate(items):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        sheet.paste(PIL.Image.fromarray(img).resize((size, size), PIL.Image.Resampling.NEAREST),
                    (x + (cell_w - size) // 2, y))
        lines = [text[:34], text[34:68]]
        for k, line in enumerate(lines):
            draw.text((x + 3, y + size + 2 + 12 * k), line, fill="black" if ok else "red", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decoder", type=Path, default=None)
    ap.add_argument("--prior", type=Path, default=None)
    ap.add_argument("--sheet", type=Path, default=Path("docs/contact_sheet.png"))
    ap.add_argument("--mix-seeds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0, help="first seed (prompt backgrounds and sampling)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="run the prompts with this many seeds (seed, seed+1, ...) and pool the results: one seed of "
                         "120 prompts moves by several points from seed to seed")
    ap.add_argument("--steps", type=int, default=None, help="decoder steps (default: the model's)")
    ap.add_argument("--sampler", default=None, help="decoder sampler (default: the model's)")
    ap.add_argument("--guidance", type=float, default=None, help="decoder guidance (default: the model's)")
    ap.add_argument("--prior-guidance", type=float, default=None, help="prior guidance (default: the model's)")
    ap.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                    help="apply a LoRA adapter (repeatable), to check that it leaves prompts without its trigger alone")
    ap.add_argument("--precision", default=None, help="fp32, bf16, auto, ... (default: the library's, fp32)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--self-test", action="store_true", help="score the checker on rendered training images")
    args = ap.parse_args(argv)

    if args.self_test:
        return self_test()
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")

    from kandinsky import Kandinsky21

    t0 = time.time()
    from kandinsky.jobs import lora_spec

    pipe = (Kandinsky21.from_pretrained(decoder=args.decoder, prior=args.prior, precision=args.precision)
            if args.decoder else Kandinsky21.from_pretrained(precision=args.precision))
    pipe.set_loras([lora_spec(spec) for spec in args.lora])
    knobs = {"steps": args.steps, "guidance_scale": args.guidance, "prior_guidance_scale": args.prior_guidance,
             "sampler": args.sampler}
    results, shape_found, per_seed = [], [], []
    for seed in range(args.seed, args.seed + args.seeds):
        all_cases = cases(seed)
        first = len(results)
        for start in range(0, len(all_cases), args.batch):
            chunk = all_cases[start: start + args.batch]
            imgs = pipe.text_to_image([c.prompt for c in chunk], seed=seed + start, output="np", **knobs)
            for case, img in zip(chunk, imgs, strict=True):
                img = (img * 255).round().astype(np.uint8)
                _, found = check(img)
                top = found[0] if found else Found("none", "none", 0)
                results.append((case, img, top.color == case.color, top.shape == case.shape))
                shape_found.append((case.shape, top.shape))
        rows = results[first:]
        per_seed.append({"seed": seed, "colour": float(np.mean([r[2] for r in rows])),
                         "shape": float(np.mean([r[3] for r in rows]))})
    gen_seconds = time.time() - t0

    def rate(rows: list, k: int) -> str:
        return f"{100 * np.mean([r[k] for r in rows]):5.1f}%" if rows else "   n/a"

    figures: dict = {"prompts": len(results), "seconds": round(gen_seconds, 1), "per_seed": per_seed}
    print(f"{len(results)} images ({len(results) // args.seeds} prompts x {args.seeds} seeds), {gen_seconds:.0f} s")
    if args.seeds > 1:
        print("per seed (colour / shape): " + ", ".join(
            f"{r['seed']}: {100 * r['colour']:.1f} / {100 * r['shape']:.1f}" for r in per_seed))
    print(f"{'subset':<22} {'n':>4} {'colour':>7} {'shape':>7}")
    subsets = {"all": results, "english": [r for r in results if r[0].lang == "en"],
               "russian": [r for r in results if r[0].lang == "ru"],
               "held-out (en+ru)": [r for r in results if r[0].held_out],
               "held-out english": [r for r in results if r[0].held_out and r[0].lang == "en"],
               "held-out russian": [r for r in results if r[0].held_out and r[0].lang == "ru"]}
    for name, rows in subsets.items():
        print(f"{name:<22} {len(rows):>4} {rate(rows, 2):>7} {rate(rows, 3):>7}")
        figures[name] = {"n": len(rows), "colour": float(np.mean([r[2] for r in rows])) if rows else None,
                         "shape": float(np.mean([r[3] for r in rows])) if rows else None}

    confusion = {want: Counter(got for asked, got in shape_found if asked == want) for want in SHAPES}
    print("shape asked -> shape found (all prompts): " + "; ".join(
        f"{want}: " + ", ".join(f"{got} {n}" for got, n in found.most_common()) for want, found in confusion.items()))
    figures["shape_confusion"] = {want: dict(found) for want, found in confusion.items()}

    mix_hits, mix_items = mixing(pipe, args.mix_seeds, knobs)
    figures["mixing"] = mix_hits / max(args.mix_seeds, 1)
    print(f"mixing red-circle image + 'a blue square' (0.5/0.5): both present in {mix_hits}/{args.mix_seeds} "
          f"seeds ({100 * figures['mixing']:.0f}%)")

    items = [(c.prompt + (" [held out]" if c.held_out else ""), img, ok_c and ok_s)
             for c, img, ok_c, ok_s in results[: len(results) // args.seeds]] + mix_items
    contact_sheet(items, args.sheet)
    print(f"contact sheet: {args.sheet}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


def mixing(pipe, seeds: int, knobs: dict) -> tuple[int, list[tuple[str, np.ndarray, bool]]]:
    """How many seeds of the 0.5/0.5 mix of a red-circle image and "a blue square" show both."""
    from kandinsky.train.shapes import make_scene, render

    red_circle = PIL.Image.fromarray(render(make_scene("circle", "red", "white", size="big")))
    hits, items = 0, []
    for seed in range(seeds):
        img = pipe.mix([red_circle, "a blue square"], [0.5, 0.5], seed=seed, output="np", **knobs)[0]
        img = (img * 255).round().astype(np.uint8)
        _, found = check(img)
        colors, shapes_ = {f.color for f in found}, {f.shape for f in found}
        ok = bool(({"red"} & colors or {"circle"} & shapes_) and ({"blue"} & colors or {"square"} & shapes_))
        hits += ok
        if seed < 6:
            items.append((f"mix: red circle + 'a blue square' s{seed}", img, ok))
    return hits, items


def self_test(n: int = 400) -> int:
    """The checker on clean renders of random one-object training scenes (should be ~100%)."""
    from kandinsky.train import shapes

    rng = random.Random(0)
    ok_c = ok_s = 0
    for _ in range(n):
        scene = shapes.random_scene(rng, held_out=None, two_objects=0.0)
        _, found = check(shapes.render(scene))
        obj = scene.objects[0]
        ok_c += bool(found) and found[0].color == obj.color
        ok_s += bool(found) and found[0].shape == obj.shape
    print(f"checker on {n} clean renders: colour {100 * ok_c / n:.1f}%, shape {100 * ok_s / n:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
