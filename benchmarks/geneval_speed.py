"""GenEval scoring speed: images/s of the toy world's reading, and of the paper scorer's two models at their real
sizes (Mask2Former Swin-S for COCO instances, CLIP ViT-L/14 for colours; random weights built from their configs, so
nothing downloads: the arithmetic, not the answers, is what is timed).

    python benchmarks/geneval_speed.py [--images 8] [--resolutions 512 1024] [--device cpu]

Prints a markdown table: per scorer and image size, seconds per image and images/s (the colour classifier per
object crop). On a GPU (`--device cuda`) it also times drawing the 553 x 4 official images when given a model:
`--model <run or export>` (the decoder at the bench's settings).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def paper_scorer(device: str):
    """GenEval's detector and colour classifier at their real architectures, randomly initialised."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, Mask2FormerConfig,
                              Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig)

    from uae_lightning.bench.detectors import HFScorer, object_names

    swin = SwinConfig(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7, image_size=384,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    scorer = HFScorer.__new__(HFScorer)
    scorer.device = torch.device(device)
    scorer.names = object_names()
    scorer.detector = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=swin, num_labels=80)).to(device).eval()
    scorer.processor = Mask2FormerImageProcessor(size={"shortest_edge": 384, "longest_edge": 1333})
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
                  patch_size=14)
    text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    scorer.clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).to(device).eval()
    scorer.clip_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    scorer._classifiers = {"dog": torch.nn.functional.normalize(torch.randn(768, 10, device=device), dim=0)}
    scorer.settings = {}
    return scorer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4, help="images timed per row")
    p.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default=None, help="(GPU) a run or export whose decoder draws the 553 x 4 images")
    args = p.parse_args()
    from uae_lightning.bench import geneval
    from uae_lightning.bench.detectors import ToyScorer
    from uae_lightning.data import toy

    rows = []
    prompts = geneval.toy_prompts()
    toy_images = [toy.render(toy.make_scene(0, i, 3), 32) for i in range(len(prompts))]
    scorer = ToyScorer()
    per = timed(lambda: [geneval.evaluate(geneval.keep(scorer.detect([im])[0], p["tag"]), p,
                                          lambda n, d, im=im: scorer.colours(im, n, d), scorer.colour_names)
                         for im, p in zip(toy_images, prompts)], 2) / len(prompts)
    rows.append(("toy world's reading (detect + rules + colours)", "32²", per))
    paper = paper_scorer(args.device)
    rng = np.random.default_rng(0)
    for res in args.resolutions:
        images = [Image.fromarray((rng.random((res, res, 3)) * 255).astype(np.uint8)) for _ in range(args.images)]
        rows.append(("Mask2Former Swin-S (all 100 queries' masks at the image's size)", f"{res}²",
                     timed(lambda: paper.detect(images), 1) / len(images)))
        mask = np.zeros((res, res), bool)
        mask[res // 4 : res // 2, res // 4 : res // 2] = True
        dets = [geneval.Detection(geneval.box_from_mask(mask), 0.9, mask)] * 4
        rows.append(("CLIP ViT-L/14 colour (one object crop)", f"{res}²",
                     timed(lambda: paper.colours(images[0], "dog", dets), 1) / len(dets)))
    print(f"\nGenEval scoring speed on {args.device} ({torch.get_num_threads()} threads)\n")
    print("| scorer | image | seconds per image | images/s |")
    print("|---|---:|---:|---:|")
    for name, res, s in rows:
        print(f"| {name} | {res} | {s:.4f} | {1 / s:.1f} |")
    if args.model and args.device.startswith("cuda"):
        from uae_lightning.pipeline import load

        pipe = load(args.model).to(args.device)
        official = geneval.official_prompts()
        t0 = time.perf_counter()
        n = geneval.generate(pipe, official, "/tmp/geneval-speed", 4, pipe.bench.get("batch_size") or 8,
                             progress=False, prompt_source="official")
        print(f"\ndrew {n} official images in {time.perf_counter() - t0:.0f} s on {args.device}")


if __name__ == "__main__":
    main()
