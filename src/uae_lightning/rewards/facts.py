"""What a toy reward pays for each fact a caption can state: on drawn scenes, one object is changed (another shape,
size or colour, everything else kept) or removed, and the reward lost against the original (1 - similarity) is
compared with the loss from removing that object. A fact whose change costs little next to a removal is one a
captioner can get wrong without losing reward (benchmarks/reward_facts.py prints the table; tests check it)."""
from __future__ import annotations

import random
from dataclasses import replace

import torch

CHANGES = ("shape", "size", "colour")


def fact_costs(similarity, scenes: int = 200, seed: int = 0, resolution: int = 32,
               max_objects: int = 3) -> dict[str, dict[str, float]]:
    """{"removed": {column: mean reward lost}, "shape" | "size" | "colour": {column: mean lost / removal's}} for
    the configured similarity ("reward") and each of its backbones alone, over `scenes` drawn scenes (a world with
    seed + 20000, so none is a training or held-out scene); the changed object and its new value are drawn at
    random with `seed`."""
    from uae_lightning.data import toy

    rng = random.Random(seed)

    def image(scene) -> torch.Tensor:
        return torch.from_numpy(toy.image_array(scene, resolution).copy()).permute(2, 0, 1).float() / 255

    originals, variants = [], {"removed": [], **{c: [] for c in CHANGES}}
    for i in range(scenes):
        scene = toy.make_scene(seed + 20_000, i, max_objects)
        k = rng.randrange(len(scene.objects))
        obj = scene.objects[k]

        def with_object(new) -> toy.Scene:
            return toy.Scene(scene.objects[:k] + ((new,) if new is not None else ()) + scene.objects[k + 1 :])

        originals.append(image(scene))
        variants["removed"].append(image(with_object(None)))
        variants["shape"].append(image(with_object(replace(obj, shape=rng.choice([s for s in toy.SHAPES if s != obj.shape])))))
        variants["size"].append(image(with_object(replace(obj, size=next(s for s in toy.SIZES if s != obj.size)))))
        variants["colour"].append(image(with_object(replace(obj, colour=rng.choice([c for c in toy.COLOURS if c != obj.colour])))))
    ref = torch.stack(originals)
    with torch.no_grad():
        lost = {name: {"reward": 1 - similarity(torch.stack(imgs), ref),
                       **{b: 1 - s for b, s in similarity.per_backbone(torch.stack(imgs), ref).items()}}
                for name, imgs in variants.items()}
    removal = {c: float(v.mean()) for c, v in lost["removed"].items()}
    return {"removed": removal,
            **{change: {c: float(lost[change][c].mean()) / removal[c] for c in removal} for change in CHANGES}}
