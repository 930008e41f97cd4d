"""What the toy reward pays for each fact a caption can state: on drawn scenes, one object is changed (another shape,
size or colour, everything else kept) or removed, and the reward lost against the original (1 - similarity) is
compared with the loss from removing that object. A fact whose change costs little next to a removal is one the
captioner can get wrong without losing reward.

    python benchmarks/reward_facts.py [--scenes 200] [--seed 0] [reward.backbones=...]

Prints a markdown table: per change, the mean reward lost relative to removing the object, for the configured reward
and for each backbone alone.
"""
from __future__ import annotations

import argparse
import random
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="the drawn world's seed (scenes and which object changes)")
    args, overrides = p.parse_known_args()
    import torch
    from omegaconf import OmegaConf

    from common import default_config
    from uae_lightning.data import toy
    from uae_lightning.rewards.backbones import Similarity

    cfg = default_config(overrides)
    weights = OmegaConf.to_container(cfg.reward.backbones)
    reward = Similarity(weights, OmegaConf.to_container(cfg.backbone_sources)).eval()
    resolution = cfg.data.resolution
    rng = random.Random(args.seed)

    def image(scene) -> torch.Tensor:
        return torch.from_numpy(toy.image_array(scene, resolution).copy()).permute(2, 0, 1).float() / 255

    originals, variants = [], {"removed": [], "shape": [], "size": [], "colour": []}
    for i in range(args.scenes):
        scene = toy.make_scene(args.seed + 20_000, i, cfg.data.max_objects)
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
        lost = {name: {"reward": 1 - reward(torch.stack(imgs), ref),
                       **{b: 1 - s for b, s in reward.per_backbone(torch.stack(imgs), ref).items()}}
                for name, imgs in variants.items()}
    columns = ["reward", *reward.names]
    print(f"\nReward lost by changing one object, relative to removing it ({args.scenes} drawn scenes, "
          f"{resolution} px; reward {weights})\n")
    print("| change | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    removal = {c: float(lost["removed"][c].mean()) for c in columns}
    print("| removed (1 - similarity) | " + " | ".join(f"{removal[c]:.4f}" for c in columns) + " |")
    for change in ("shape", "size", "colour"):
        print(f"| wrong {change} / removed | "
              + " | ".join(f"{float(lost[change][c].mean()) / removal[c]:.2f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
