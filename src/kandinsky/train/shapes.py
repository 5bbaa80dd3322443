"""A procedural, seeded image-caption generator: one or two flat shapes on a plain background.

Every image is a ``Scene`` (background colour + objects with shape, colour, size and position), drawn with
4x supersampling. Captions are made from a scene at training time, from varied English and Russian templates
(Russian adjectives agree with the noun's gender; ``ё`` is written as ``е`` half of the time, as people do).
Some colour-shape pairs are held out: they never occur in a training scene and test generalisation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 135, 0),
    "yellow": (250, 215, 10),
    "green": (25, 160, 45),
    "blue": (30, 65, 215),
    "purple": (135, 40, 175),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle", "star", "ring")
SIZES = ("small", "big")
# position name -> grid offset (dx, dy) in {-1, 0, 1}
POSITIONS: dict[str, tuple[int, int]] = {
    "center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1),
    "top left": (-1, -1), "top right": (1, -1), "bottom left": (-1, 1), "bottom right": (1, 1),
}
POSITION_NAMES = tuple(POSITIONS)
RADIUS = {"small": 8.5, "big": 15.0}  # half-extent in pixels at 64x64
OFFSET = {"small": 17.0, "big": 12.0}  # distance of the off-centre positions from the centre
JITTER = 2.0
COLOR_JITTER = 10
TWO_OBJECT_PAIRS = (("left", "right"), ("top", "bottom"), ("top left", "bottom right"), ("top right", "bottom left"))

# colour-shape pairs that never appear in training scenes
HELD_OUT: frozenset[tuple[str, str]] = frozenset({
    ("green", "star"), ("purple", "triangle"), ("orange", "ring"), ("white", "square"), ("yellow", "circle"),
})


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour, size and position names, and its exact centre in pixels."""

    shape: str
    color: str
    size: str
    position: str
    cx: float
    cy: float


@dataclass(frozen=True)
class Scene:
    """A background colour and one or two objects; ``rgb`` holds the jittered colours actually drawn."""

    background: str
    objects: tuple[Obj, ...]
    rgb: tuple[tuple[int, int, int], ...]  # background first, then one per object

    def held_out(self) -> bool:
        return any((o.color, o.shape) in HELD_OUT for o in self.objects)


# ----------------------------------------------------------------------------------------------------------
# sampling and drawing


def _centre(size: str, position: str, rng: random.Random, size_px: int = IMAGE_SIZE) -> tuple[float, float]:
    dx, dy = POSITIONS[position]
    scale = size_px / IMAGE_SIZE
    off = OFFSET[size] * scale
    return (size_px / 2 + dx * off + rng.uniform(-JITTER, JITTER) * scale,
            size_px / 2 + dy * off + rng.uniform(-JITTER, JITTER) * scale)


def _jitter(color: str, rng: random.Random) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.randint(-COLOR_JITTER, COLOR_JITTER), 0, 255)) for c in COLORS[color])


def random_scene(rng: random.Random, *, held_out: bool | None = False, two_objects: float = 0.25) -> Scene:
    """A random scene. ``held_out``: False never uses a held-out pair, True forces one, None ignores them."""
    while True:
        if rng.random() < two_objects:
            pair = rng.choice(TWO_OBJECT_PAIRS)
            if rng.random() < 0.5:
                pair = pair[::-1]
            colors = rng.sample(COLOR_NAMES, 3)
            objs = tuple(Obj(rng.choice(SHAPES), c, "small", p, *_centre("small", p, rng))
                         for c, p in zip(colors[:2], pair, strict=True))
            background = colors[2]
        else:
            obj_color, background = rng.sample(COLOR_NAMES, 2)
            size, position = rng.choice(SIZES), rng.choice(POSITION_NAMES)
            objs = (Obj(rng.choice(SHAPES), obj_color, size, position, *_centre(size, position, rng)),)
        scene = Scene(background, objs, (_jitter(background, rng),) + tuple(_jitter(o.color, rng) for o in objs))
        if held_out is None or scene.held_out() == held_out:
            return scene


def make_scene(shape: str, color: str, background: str, size: str = "big", position: str = "center",
               rng: random.Random | None = None) -> Scene:
    """A one-object scene with exact palette colours (for tests and evaluation)."""
    rng = rng or random.Random(0)
    cx, cy = _centre(size, position, rng)
    return Scene(background, (Obj(shape, color, size, position, cx, cy),), (COLORS[background], COLORS[color]))


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a square, triangle, star (or cross) with half-extent ``r`` centred at (cx, cy)."""
    if shape == "square":
        h = 0.85 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        w, h = 1.05 * r, 1.85 * r
        return [(cx, cy - h / 2), (cx + w, cy + h / 2), (cx - w, cy + h / 2)]
    if shape == "star":
        outer, inner = 1.2 * r, 0.5 * 1.2 * r
        dy = 0.1 * outer  # centre the bounding box vertically
        pts = []
        for k in range(10):
            rad = outer if k % 2 == 0 else inner
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + rad * np.cos(a), cy + dy + rad * np.sin(a)))
        return pts
    if shape == "cross":  # a plus sign: not in SHAPES (the bundled model never saw one); the LoRA demo's concept
        a = 0.38 * r
        return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
                (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
                (cx - r, cy - a), (cx - a, cy - a)]
    raise ValueError(f"unknown polygon shape {shape!r}")


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw a scene as an (size, size, 3) uint8 array (antialiased by supersampling)."""
    s = SUPERSAMPLE * size / IMAGE_SIZE
    big = SUPERSAMPLE * size
    img = PIL.Image.new("RGB", (big, big), scene.rgb[0])
    draw = PIL.ImageDraw.Draw(img)
    for obj, rgb in zip(scene.objects, scene.rgb[1:], strict=True):
        cx, cy, r = obj.cx * s, obj.cy * s, RADIUS[obj.size] * s
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        elif obj.shape == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
            ri = 0.55 * r
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=scene.rgb[0])
        else:
            draw.polygon(shape_points(obj.shape, cx, cy, r), fill=rgb)
    return np.asarray(img.resize((size, size), PIL.Image.Resampling.BOX))


# ----------------------------------------------------------------------------------------------------------
# captions

EN_COLOR = {c: c for c in COLOR_NAMES}
# Russian colour adjectives by gender (m, f, n) and the prepositional masculine for "на ... фоне"
RU_COLOR = {
    "red": ("красный", "красная", "красное", "красном"),
    "orange": ("оранжевый", "оранжевая", "оранжевое", "оранжевом"),
    "yellow": ("жёлтый", "жёлтая", "жёлтое", "жёлтом"),
    "green": ("зелёный", "зелёная", "зелёное", "зелёном"),
    "blue": ("синий", "синяя", "синее", "синем"),
    "purple": ("фиолетовый", "фиолетовая", "фиолетовое", "фиолетовом"),
    "white": ("белый", "белая", "белое", "белом"),
    "black": ("чёрный", "чёрная", "чёрное", "чёрном"),
}
RU_SHAPE = {"circle": ("круг", 0), "square": ("квадрат", 0), "triangle": ("треугольник", 0),
            "star": ("звезда", 1), "ring": ("кольцо", 2), "cross": ("крест", 0)}
RU_SIZE = {"small": ("маленький", "маленькая", "маленькое"), "big": ("большой", "большая", "большое")}
EN_SIZE = {"small": ("small", "little", "tiny"), "big": ("big", "large")}
EN_POS = {"center": "in the center", "left": "on the left", "right": "on the right", "top": "at the top",
          "bottom": "at the bottom", "top left": "in the top left corner", "top right": "in the top right corner",
          "bottom left": "in the bottom left corner", "bottom right": "in the bottom right corner"}
RU_POS = {"center": "в центре", "left": "слева", "right": "справа", "top": "сверху", "bottom": "снизу",
          "top left": "в левом верхнем углу", "top right": "в правом верхнем углу",
          "bottom left": "в левом нижнем углу", "bottom right": "в правом нижнем углу"}
EN_PREFIX = ("", "", "", "a picture of ", "an image of ", "a drawing of ", "a photo of ")
RU_PREFIX = ("", "", "", "картинка: ", "рисунок: ", "изображение: ")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Mention:
    """Which attributes a caption mentions: size, position and background are optional."""

    size: bool
    position: bool
    background: bool


def random_mention(rng: random.Random) -> Mention:
    return Mention(size=rng.random() < 0.6, position=rng.random() < 0.4, background=rng.random() < 0.7)


def _en_object(obj: Obj, m: Mention, rng: random.Random, with_article: bool = True) -> str:
    words = []
    if m.size:
        words.append(rng.choice(EN_SIZE[obj.size]))
    words += [EN_COLOR[obj.color], obj.shape]
    phrase = " ".join(words)
    if with_article:
        phrase = f"{_article(phrase)} {phrase}"
    if m.position:
        phrase += " " + EN_POS[obj.position]
    return phrase


def _ru_object(obj: Obj, m: Mention) -> str:
    noun, gender = RU_SHAPE[obj.shape]
    words = [RU_SIZE[obj.size][gender]] if m.size else []
    words += [RU_COLOR[obj.color][gender], noun]
    phrase = " ".join(words)
    if m.position:
        phrase += " " + RU_POS[obj.position]
    return phrase


def caption_en(scene: Scene, m: Mention, rng: random.Random) -> str:
    """An English caption of ``scene`` mentioning the attributes selected by ``m``."""
    article = rng.random() < 0.75
    objs = [_en_object(o, m, rng, article) for o in scene.objects]
    text = " and ".join(objs)
    if m.background:
        bg = scene.background
        text += rng.choice((f" on {_article(bg)} {bg} background", f" on a {bg} background",
                            f", {bg} background", f" on {bg}"))
    prefix = rng.choice(EN_PREFIX)
    if prefix and not article:
        prefix = ""
    return prefix + text


def caption_ru(scene: Scene, m: Mention, rng: random.Random) -> str:
    """A Russian caption of ``scene`` mentioning the attributes selected by ``m``."""
    text = " и ".join(_ru_object(o, m) for o in scene.objects)
    if m.background:
        bg = RU_COLOR[scene.background][3]
        text += rng.choice((f" на {bg} фоне", f" на {bg} фоне", f", фон {RU_COLOR[scene.background][0]}"))
    text = rng.choice(RU_PREFIX) + text
    if rng.random() < 0.5:
        text = text.replace("ё", "е")
    return text


def caption(scene: Scene, rng: random.Random, lang: str | None = None, mention: Mention | None = None) -> str:
    """A random caption; ``lang`` "en", "ru" or None (either, equally likely)."""
    m = mention or random_mention(rng)
    lang = lang or rng.choice(("en", "ru"))
    text = caption_en(scene, m, rng) if lang == "en" else caption_ru(scene, m, rng)
    if rng.random() < 0.15:
        text = text[:1].upper() + text[1:]
    return text


def caption_pair(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """An English and a Russian caption mentioning the same attributes (for M-CLIP distillation)."""
    m = random_mention(rng)
    return caption(scene, rng, "en", m), caption(scene, rng, "ru", m)


# ----------------------------------------------------------------------------------------------------------
# datasets


@dataclass
class ShapesData:
    """Rendered images (N, S, S, 3) uint8 and their scenes."""

    images: np.ndarray
    scenes: list[Scene]

    def __len__(self) -> int:
        return len(self.scenes)


def scene_rng(seed: int, index: int) -> random.Random:
    """The generator of item ``index`` of a dataset with ``seed`` (independent of how items are batched)."""
    return random.Random(seed * 1_000_003 + index)


def generate(n: int, seed: int, *, held_out: bool | None = False, size: int = IMAGE_SIZE) -> ShapesData:
    """``n`` seeded scenes and their images; training data uses ``held_out=False``."""
    scenes = [random_scene(scene_rng(seed, i), held_out=held_out) for i in range(n)]
    images = np.stack([render(s, size) for s in scenes]) if n else np.zeros((0, size, size, 3), np.uint8)
    return ShapesData(images, scenes)


def caption_corpus(n: int, seed: int) -> list[str]:
    """Captions of ``n`` random training scenes in both languages (tokenizer training text)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        en, ru = caption_pair(random_scene(rng), rng)
        out += [en, ru]
    return out
