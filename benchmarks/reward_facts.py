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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="the drawn world's seed (scenes and which object changes)")
    args, overrides = p.parse_known_args()
    from omegaconf import OmegaConf

    from common import default_config
    from uae_lightning.rewards.backbones import Similarity
    from uae_lightning.rewards.facts import CHANGES, fact_costs

    cfg = default_config(overrides)
    weights = OmegaConf.to_container(cfg.reward.backbones)
    reward = Similarity(weights, OmegaConf.to_container(cfg.backbone_sources)).eval()
    costs = fact_costs(reward, args.scenes, args.seed, cfg.data.resolution, cfg.data.max_objects)
    columns = ["reward", *reward.names]
    print(f"\nReward lost by changing one object, relative to removing it ({args.scenes} drawn scenes, "
          f"{cfg.data.resolution} px; reward {weights})\n")
    print("| change | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    print("| removed (1 - similarity) | " + " | ".join(f"{costs['removed'][c]:.4f}" for c in columns) + " |")
    for change in CHANGES:
        print(f"| wrong {change} / removed | " + " | ".join(f"{costs[change][c]:.2f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
