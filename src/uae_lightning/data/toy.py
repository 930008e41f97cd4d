"""The shapes world: seeded scenes, their images, captions at four detail levels, and caption informativeness.

Every scene is a pure function of (seed, index), so train/held-out splits and tests are reproducible without files.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "white": (240, 240, 240),
}
SIZES = {"small": 0.26, "large": 0.42}  # half-extent of an object, as a fraction of a grid cell's side
# 3x3 grid cells, row-major. Each cell is one word (one token), so a position is never a prefix of another.
POSITIONS = (
    "top-left", "top", "top-right",
    "left", "centre", "right",
    "bottom-left", "bottom", "bottom-right",
)
BACKGROUND = (30, 30, 30)
# Detail levels: the facts each states besides the shape, from the shortest caption to the complete one.
LEVEL_FACTS = {
    "short": (),
    "placed": ("position",),
    "coloured": ("colour",),
    "sized": ("size", "colour"),
    "complete": ("size", "colour", "position"),
}
LEVELS = tuple(LEVEL_FACTS)


@dataclass(frozen=True)
class ToyObject:
    shape: str
    colour: str
    size: str
    position: int  # index into POSITIONS

    def facts(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": POSITIONS[self.position]}


@dataclass(frozen=True)
class Scene:
    objects: tuple[ToyObject, ...]

    def to_dict(self) -> list[dict[str, str]]:
        return [o.facts() for o in self.objects]

    @staticmethod
    def from_dict(objs: list[dict[str, str]]) -> "Scene":
        return Scene(tuple(ToyObject(o["shape"], o["colour"], o["size"], POSITIONS.index(o["position"])) for o in objs))


def make_scene(seed: int, index: int, max_objects: int = 3) -> Scene:
    """Scene `index` of the world with this seed: 1..max_objects objects in distinct grid cells."""
    rng = random.Random(seed * 1_000_003 + index)
    n = rng.randint(1, max_objects)
    cells = rng.sample(range(len(POSITIONS)), n)
    objs = tuple(
        ToyObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), cell) for cell in sorted(cells)
    )
    return Scene(objs)


def render(scene: Scene, resolution: int = 32) -> Image.Image:
    """Draw the scene; supersampled 4x then downsampled so edges are anti-aliased and sizes stay distinguishable."""
    ss = 4
    side = resolution * ss
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = side / 3
    for obj in scene.objects:
        row, col = divmod(obj.position, 3)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        r = SIZES[obj.size] * cell
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif obj.shape == "square":
            s = r
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)], fill=colour)
    return img.resize((resolution, resolution), Image.Resampling.LANCZOS)


def _position_phrase(position: int) -> str:
    name = POSITIONS[position]
    return "in the centre" if name == "centre" else f"at the {name}"


def caption(scene: Scene, level: str = "complete") -> str:
    """The caption of a scene at one detail level (see LEVELS)."""
    if level not in LEVELS:
        raise ValueError(f"caption level {level!r} is not one of {LEVELS}")
    stated = LEVEL_FACTS[level]
    parts = []
    for o in scene.objects:
        words = ["a"]
        if "size" in stated:
            words.append(o.size)
        if "colour" in stated:
            words.append(o.colour)
        words.append(o.shape)
        if "position" in stated:
            words.append(_position_phrase(o.position))
        parts.append(" ".join(words))
    return " and ".join(parts)


def vocabulary() -> list[str]:
    """Every word the grammar can produce (the tokenizer's vocabulary, besides special tokens and the prompts)."""
    words = {"a", "and", "at", "the", "in"}
    words.update(SHAPES, COLOURS, SIZES)
    words.update(POSITIONS)
    return sorted(words)


def parse_caption(text: str) -> list[dict[str, str]]:
    """Parse a caption into object mentions, each a dict of the facts it states.

    Lenient by design: a mention is any run of words between "and"s that names a shape, colour, size or position;
    words outside the grammar are ignored (a policy cannot gain informativeness by babbling).
    """
    mentions = []
    for chunk in f" {text.lower()} ".split(" and "):
        words = chunk.split()
        m: dict[str, str] = {}
        for w in words:
            if w in SHAPES and "shape" not in m:
                m["shape"] = w
            elif w in COLOURS and "colour" not in m:
                m["colour"] = w
            elif w in SIZES and "size" not in m:
                m["size"] = w
        for a, b, c in zip(words, words[1:], words[2:]):
            if (a, b) in (("at", "the"), ("in", "the")) and c in POSITIONS:
                m["position"] = c
                break
        if m:
            mentions.append(m)
    return mentions


def informativeness(text: str, scene: Scene) -> float:
    """Share of the scene's facts (shape, colour, size, position of every object) the caption states correctly,
    minus the statements that are wrong, clipped to [0, 1].

    Mentions are matched to objects one-to-one, greedily by most agreeing facts; a mention matched to no object
    counts all its statements as wrong.
    """
    facts = [o.facts() for o in scene.objects]
    total = 4 * len(facts)
    mentions = parse_caption(text)
    free = list(range(len(facts)))
    correct = wrong = 0
    # Match the mentions that agree most first, so the order of the caption does not matter.
    scored = sorted(
        ((sum(facts[j].get(k) == v for k, v in m.items()), i, j) for i, m in enumerate(mentions) for j in range(len(facts))),
        reverse=True,
    )
    used_mentions: set[int] = set()
    for _, i, j in scored:
        if i in used_mentions or j not in free:
            continue
        used_mentions.add(i)
        free.remove(j)
        for k, v in mentions[i].items():
            if facts[j][k] == v:
                correct += 1
            else:
                wrong += 1
    for i, m in enumerate(mentions):
        if i not in used_mentions:
            wrong += len(m)
    return max(0.0, (correct - wrong) / total)


def image_array(scene: Scene, resolution: int = 32) -> np.ndarray:
    return np.asarray(render(scene, resolution), dtype=np.uint8)
