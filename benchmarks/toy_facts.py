"""Where a toy run's informativeness comes from, fact by fact: what its captions get right, and what its decoder
makes of a fact (the reward a caption loses by one wrong fact, relative to dropping that object from the caption).

    python benchmarks/toy_facts.py runs/toy/default [--stages captioner g4u] [--decoder-stage pretrain]

Captions: each stage's Unified-Bench captions of the held-out scenes; per fact (shape, colour, size, position), how
many mentions state it and how many of those are right (each mention matched to the scene object it agrees with
most), and mentions per object. Decoder: 128 drawn scenes, the complete caption vs the same caption with one
object's shape, size, colour or position changed, or the object dropped; each redrawn from the same noise and scored
by the run's reward. A fact whose change costs little next to a dropped object is one the decoder does not draw, so
G4U cannot learn to state it right.
"""
from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from dataclasses import replace
from pathlib import Path


def caption_facts(run: Path, stage: str, seed: int, max_objects: int) -> dict:
    from uae_lightning.data import toy

    rows = [json.loads(line) for line in (run / stage / "unified_bench" / "results.jsonl").read_text().splitlines()]
    counts: Counter = Counter()
    for r in rows:
        scene = toy.make_scene(seed + 10_000, int(Path(r["image"]).stem), max_objects)  # the held-out split
        facts = [o.facts() for o in scene.objects]
        counts["objects"] += len(facts)
        for m in toy.parse_caption(r["caption"]):
            counts["mentions"] += 1
            best = max(facts, key=lambda f: sum(f.get(k) == v for k, v in m.items()))
            for k, v in m.items():
                counts[f"{k} stated"] += 1
                counts[f"{k} right"] += best[k] == v
    return counts


def decoder_facts(run: Path, stage: str, cfg, scenes: int = 128) -> dict[str, float]:
    import torch
    from omegaconf import OmegaConf

    from uae_lightning.data import toy
    from uae_lightning.pipeline import UAEPipeline
    from uae_lightning.rewards.backbones import Similarity

    pipe = UAEPipeline.from_weights(run / stage / "weights.safetensors", OmegaConf.to_container(cfg.model, resolve=True),
                                    cfg.data.resolution, num_steps=cfg.bench.num_steps)
    reward = Similarity(OmegaConf.to_container(cfg.reward.backbones)).eval()
    rng = random.Random(0)
    drawn = [toy.make_scene(54_321, i, cfg.data.max_objects) for i in range(scenes)]
    texts: dict[str, list[str]] = {k: [] for k in ("complete", "dropped", "shape", "size", "colour", "position")}
    for s in drawn:
        k = rng.randrange(len(s.objects))
        o = s.objects[k]
        others = s.objects[:k] + s.objects[k + 1 :]

        def caption(new) -> str:
            return toy.caption(toy.Scene(tuple(sorted(others + ((new,) if new else ()), key=lambda x: x.position))))

        free = [c for c in range(9) if c not in [x.position for x in s.objects]]
        texts["complete"].append(toy.caption(s))
        texts["dropped"].append(caption(None) if others else "")
        texts["shape"].append(caption(replace(o, shape=rng.choice([x for x in toy.SHAPES if x != o.shape]))))
        texts["size"].append(caption(replace(o, size=next(x for x in toy.SIZES if x != o.size))))
        texts["colour"].append(caption(replace(o, colour=rng.choice([x for x in toy.COLOURS if x != o.colour]))))
        texts["position"].append(caption(replace(o, position=rng.choice(free))))
    originals = torch.stack([torch.from_numpy(toy.image_array(s, cfg.data.resolution).copy()).permute(2, 0, 1).float() / 255
                             for s in drawn])
    with torch.no_grad():
        scores = {k: float(reward(pipe.generate(v, list(range(scenes))), originals).mean()) for k, v in texts.items()}
    drop = scores["complete"] - scores["dropped"]
    return {"complete": scores["complete"], "dropped": scores["dropped"],
            **{k: (scores["complete"] - scores[k]) / drop for k in ("shape", "size", "colour", "position")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a toy run directory (runs/toy/<name>)")
    p.add_argument("--stages", nargs="+", default=None, help="stages whose captions to read (default: all finished)")
    p.add_argument("--decoder-stage", default="pretrain", help="the stage whose decoder redraws the edited captions")
    args = p.parse_args()
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(args.run / ".hydra" / "config.yaml")
    stages = args.stages or [s for s in cfg.run if (args.run / s / "unified_bench" / "results.jsonl").is_file()]
    print(f"\nCaptions of the held-out scenes ({args.run}): right / stated per fact\n")
    print("| stage | mentions / objects | shape | colour | size | position |")
    print("|---|---:|---:|---:|---:|---:|")
    for stage in stages:
        c = caption_facts(args.run, stage, cfg.data.seed, cfg.data.max_objects)
        cells = [f"{c[f'{k} right']} / {c[f'{k} stated']}" for k in ("shape", "colour", "size", "position")]
        print(f"| {stage} | {c['mentions']} / {c['objects']} | " + " | ".join(cells) + " |")
    d = decoder_facts(args.run, args.decoder_stage, cfg)
    print(f"\nThe {args.decoder_stage} decoder: reward {d['complete']:.4f} from complete captions, {d['dropped']:.4f} "
          f"with one object dropped; reward lost by one wrong fact, relative to dropping the object:\n")
    print("| shape | size | colour | position |\n|---:|---:|---:|---:|")
    print("| " + " | ".join(f"{d[k]:.2f}" for k in ("shape", "size", "colour", "position")) + " |")


if __name__ == "__main__":
    main()
